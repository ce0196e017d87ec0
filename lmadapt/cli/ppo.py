"""lmadapt ppo: PPO against a reward model, on a task's prompts."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .common import align_args, align_start, chat_flag, summary_table


def cmd_ppo(a) -> int:
    import lmadapt
    from ..align import PPOConfig, ppo
    if not a.reward_model:
        raise ValueError("give --reward-model RM_DIR (a run of `lmadapt reward`)")
    rm_dir = Path(a.reward_model)
    rm_dir = rm_dir / "best" if (rm_dir / "best" / "method.json").exists() else rm_dir
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    given = {k: v for k, v in vars(a).items() if k in fields and v is not None and k not in ("chat", "progress")}
    cfg = PPOConfig(chat=chat_flag(a), progress=not a.no_progress, **given)   # bad settings fail before loading
    task, policy = align_start(a)
    reward_model = lmadapt.load_adapted(rm_dir)
    result = ppo(policy, task, reward_model, cfg, out=a.out, resume=a.resume, data_root=a.data_root,
                 max_train=a.max_train)
    print(summary_table([result]))
    print(f"wrote {Path(a.out) / 'result.json'} and the policy {Path(a.out) / 'best'}")
    return 0


def register(sub) -> None:
    sp = sub.add_parser("ppo", help="PPO against a reward model; writes OUT/result.json and OUT/best/",
                        description="Rollouts with sampled generation, the reward model's score at the end, a per-token "
                                    "KL penalty to the reference (the disabled adapter), a value head, GAE, clipped "
                                    "losses. Example: lmadapt ppo --task alpaca --init runs/sft --reward-model runs/rm "
                                    "--out runs/ppo")
    align_args(sp, "alpaca")
    sp.add_argument("--reward-model", help="the reward model's run or artifact folder (lmadapt reward)")
    g = sp.add_argument_group("PPO (defaults: align.PPOConfig)")
    for name, typ, text in [
            ("minibatch-size", int, "rollouts per optimizer step (default: the whole batch)"),
            ("ppo-epochs", int, "passes over each rollout batch (4)"),
            ("max-new-tokens", int, "response tokens sampled (32)"),
            ("temperature", float, "sampling temperature (1.0)"),
            ("top-p", float, "nucleus sampling (1.0: off)"),
            ("kl-coef", float, "coefficient of the per-token KL penalty (0.05)"),
            ("kl-target", float, "adaptive KL: the per-sequence KL to track (6)"),
            ("kl-horizon", int, "adaptive KL: horizon in rollouts (10000)"),
            ("clip-range", float, "policy ratio clip (0.2)"),
            ("value-clip", float, "value clip (0.2)"),
            ("vf-coef", float, "value loss weight (0.1)"),
            ("gamma", float, "discount (1.0)"),
            ("lam", float, "GAE lambda (0.95)")]:
        g.add_argument(f"--{name}", type=typ, help=text)
    g.add_argument("--adaptive-kl", action="store_true", default=None, help="adapt the KL coefficient to --kl-target")
    sp.set_defaults(func=cmd_ppo)
