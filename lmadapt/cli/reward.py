"""lmadapt reward: a reward model (the scalar reward head, Bradley-Terry on preference pairs)."""
from __future__ import annotations

from pathlib import Path

from .common import align_args, align_start, chat_flag, fit_options, summary_table


def cmd_reward(a) -> int:
    from ..align import train_reward
    task, adapted = align_start(a, reward_head=True)
    result = train_reward(adapted, task, chat=chat_flag(a), max_response_length=a.max_response_length, out=a.out,
                          resume=a.resume, seed=a.seed, data_root=a.data_root, max_train=a.max_train, **fit_options(a))
    print(summary_table([result]))
    print(f"wrote {Path(a.out) / 'result.json'} and the reward model {Path(a.out) / 'best'}")
    return 0


def register(sub) -> None:
    sp = sub.add_parser("reward", help="train a reward model on preference pairs; writes OUT/result.json and OUT/best/",
                        description="A scalar reward head on the LM, any method as the trainable part, the pairwise "
                                    "Bradley-Terry loss; dev: pairwise accuracy. Example: lmadapt reward --task hh_rlhf "
                                    "--method lora --out runs/rm")
    align_args(sp, "hh_rlhf")
    sp.add_argument("--max-response-length", type=int, default=128, help="response tokens kept (128)")
    sp.set_defaults(func=cmd_reward)
