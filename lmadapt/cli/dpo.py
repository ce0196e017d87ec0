"""lmadapt dpo: DPO on preference pairs, the reference from the disabled adapter."""
from __future__ import annotations

from pathlib import Path

from .common import align_args, align_start, chat_flag, fit_options, summary_table


def cmd_dpo(a) -> int:
    from ..align import dpo
    task, adapted = align_start(a)
    result = dpo(adapted, task, beta=a.beta, label_smoothing=a.label_smoothing, precompute_ref=a.precompute_ref,
                 chat=chat_flag(a), max_response_length=a.max_response_length, out=a.out, resume=a.resume,
                 seed=a.seed, data_root=a.data_root, max_train=a.max_train, **fit_options(a))
    print(summary_table([result]))
    print(f"wrote {Path(a.out) / 'result.json'} and the artifact {Path(a.out) / 'best'}")
    return 0


def register(sub) -> None:
    sp = sub.add_parser("dpo", help="DPO on preference pairs; writes OUT/result.json and OUT/best/",
                        description="Direct preference optimization; the reference is the model with the delta off "
                                    "(no second copy; a frozen copy only for --method full). Example: lmadapt dpo "
                                    "--task hh_rlhf --init runs/sft --method lora --out runs/dpo")
    align_args(sp, "hh_rlhf")
    sp.add_argument("--beta", type=float, default=0.1, help="DPO's beta (0.1)")
    sp.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: preference noise (0)")
    sp.add_argument("--precompute-ref", action="store_true", help="compute each pair's reference log-probs once")
    sp.add_argument("--max-response-length", type=int, default=128, help="response tokens kept (128)")
    sp.set_defaults(func=cmd_dpo)
