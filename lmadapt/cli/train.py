"""lmadapt train: one method on one task; OUT/result.json and OUT/best/.

Its options (model, data, head, optimization, out-of-domain sets, precision) are registered by
`train_options`, which `lmadapt compare` reuses so every cell of a grid takes the same ones."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .common import DEFAULT_MODEL, parse_method_args, task_from_args, head_args, data_args, prompt_args, common_args, summary_table


def train_config(a) -> dict:
    """The TrainConfig keywords the options give (unset ones left to the method's defaults)."""
    from ..data import parse_cap
    from ..trainer import TrainConfig
    cfg_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = {k: v for k, v in vars(a).items() if k in cfg_fields and v is not None and k not in ("seed", "max_ood")}
    cfg["progress"] = not a.no_progress
    cfg["max_ood"] = parse_cap(a.max_ood, "--max-ood")
    return cfg


def ood_tasks(a) -> list[str] | None:
    """--ood as a list; None: the task's own out-of-domain sets."""
    return None if a.ood is None else [t for t in a.ood.split(",") if t]


def cmd_train(a) -> int:
    import lmadapt
    from ..data import parse_shots
    task = task_from_args(a)
    shots = parse_shots(a.shots)
    for split in ("train", "dev"):  # bad data fails here, before minutes of model loading
        task.load(split, a.data_root)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    method_args = parse_method_args(a.method_args)
    if a.init is not None:   # --init pretrained:DIR (PPT) is the prompt method's init argument
        method_args["init"] = a.init
    lmadapt.get_method(a.method, **method_args)  # bad method arguments fail before the model loads
    model, tok = lmadapt.load(a.model)
    adapted = lmadapt.attach(model, a.method, task=task, tokenizer=tok, pooling=a.pooling, layer=a.layer,
                             init_seed=a.seed, **head_args(a), **method_args)
    result = lmadapt.train(adapted, task, shots=shots, seed=a.seed, data_root=a.data_root, out=a.out,
                           resume=a.resume, max_train=a.max_train, ood=ood_tasks(a), **train_config(a))
    from ..api import is_main_process
    if not is_main_process():
        return 0
    print(summary_table([result]))
    print(f"wrote {Path(a.out) / 'result.json'} and the artifact {Path(a.out) / 'best'}")
    return 0


def train_options(t) -> None:
    """Every option of `lmadapt train` except the ones a grid sets per run (--method,
    --method-args, --shots, --seed, --out, --resume)."""
    t.add_argument("--model", default=DEFAULT_MODEL, help=f"packaged name or local HF dir (default {DEFAULT_MODEL})")
    data_args(t)
    t.add_argument("--max-train", type=int, help="random subset of the training set of this size")
    t.add_argument("--pooling", choices=["cls", "mean", "last"], help="classification pooling (default last/mean)")
    t.add_argument("--layer", type=int, default=-1, help="hidden layer fed to the head (default -1: last)")
    prompt_args(t)
    g = t.add_argument_group("optimization (defaults: the method's own, see `lmadapt methods`)")
    for name, typ, text in [
            ("lr", float, "peak learning rate of AdamW (default: the method's)"),
            ("epochs", float, "passes over the training set (default: the method's, e.g. 1; probe 30)"),
            ("max-steps", int, "optimizer steps; overrides --epochs"),
            ("min-steps", int, "at least this many optimizer steps: a shorter run (few-shot: 32 examples are "
                               "4 steps an epoch) is stretched, with as many dev evaluations as its epochs"),
            ("batch-size", int, "GLOBAL examples per optimizer step, across processes and accumulation (8)"),
            ("grad-accum", int, "micro-batches per optimizer step (1)"),
            ("warmup-ratio", float, "fraction of steps with linear warmup (0.06), then linear decay to 0"),
            ("weight-decay", float, "AdamW weight decay (0)"),
            ("eval-every", int, "steps between dev evaluations; the best is kept (default: once per epoch)"),
            ("save-every", int, "steps between resumable checkpoints (default: --eval-every)"),
            ("max-length", int, "tokens per input, longer ones truncated (128)"),
            ("max-eval", int, "dev examples used by every dev evaluation, the final one included: a fixed "
                              "random subset (default: all)")]:
        g.add_argument(f"--{name}", type=typ, help=text)
    t.add_argument("--ood", help="comma-separated out-of-domain tasks to evaluate (default: the task's own)")
    t.add_argument("--max-ood", default="500", help="examples per out-of-domain set, a fixed random subset, "
                                                    "or 'all' (default 500)")
    common_args(t)


def register(sub) -> None:
    t = sub.add_parser("train", help="train a method on a task; writes OUT/result.json and OUT/best/",
                       description="Train a method on a task, keep the best dev checkpoint, evaluate on dev and "
                                   "out-of-domain sets. Example: lmadapt train --task sst2 --method probe --out runs/x")
    train_options(t)
    t.add_argument("--method", default="probe", help="see `lmadapt methods` (default probe)")
    t.add_argument("--method-args", help="k=v,... e.g. r=8,alpha=16,targets=q_proj+v_proj")
    t.add_argument("--init", help="the method's init argument, e.g. --method prompt --init pretrained:DIR "
                                  "(a prompt pre-trained by `lmadapt ppt`)")
    t.add_argument("--shots", default="full", help="examples per class (k-shot, class-balanced) or 'full'")
    t.add_argument("--seed", type=int, default=0, help="seeds the data order, k-shot sample and initial weights (0)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint after a crash")
    t.set_defaults(func=cmd_train)
