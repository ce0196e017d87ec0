"""lmadapt instruct: instruction tuning on a FLAN-style mixture with the NLI cluster held out."""
from __future__ import annotations

from pathlib import Path

from .common import DEFAULT_MODEL, common_args, parse_method_args, table


def _names(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def cmd_instruct(a) -> int:
    import lmadapt
    from ..data import parse_cap
    from ..prompting.instruct import InstructConfig, run_instruct
    method_args = parse_method_args(a.method_args)
    lmadapt.get_method(a.method, **method_args)   # bad arguments fail before any data or model loads
    train = {k: v for k, v in (("lr", a.lr), ("epochs", a.epochs), ("max_steps", a.max_steps)) if v is not None}
    train |= {"batch_size": a.batch_size, "max_length": a.max_length, "precision": a.precision}
    cfg = InstructConfig(tasks=_names(a.tasks), held_out=_names(a.held_out), cap=a.cap,
                         total=parse_cap(a.total, "--total"), method=a.method, method_args=method_args,
                         eval_limit=a.limit, seed=a.seed, train=train)
    model, tok = lmadapt.load(a.model)
    res = run_instruct(model, tok, cfg, a.out, data_root=a.data_root, progress=not a.no_progress)
    print(f"mixture: {res['mixture']['n']} examples " +
          ", ".join(f"{k} {v}" for k, v in res["mixture"]["counts"].items()) +
          f"; held out: {', '.join(res['mixture']['held_out_tasks'])}")
    print(table([[name, "held out" if m["held_out"] else "seen", f"{m['before']:.2f}", f"{m['after']:.2f}",
                  f"{m['majority']:.2f}", m["n"]] for name, m in res["metrics"].items()],
                ["task", "cluster", "zero-shot before", "after", "majority", "n"]))
    print(f"wrote {Path(a.out) / 'result.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("instruct", help="instruction tuning (FLAN-style mixture, NLI held out); zero-shot RTE "
                                        "before/after",
                       description="Example: lmadapt instruct --method lora --total 4000 --cap 1000 --out runs/instruct")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data-root", help="datasets folder (default: $LMADAPT_DATA or ../shared/data)")
    p.add_argument("--tasks", default="sst2,squad,xsum,scitldr,e2e_nlg,webnlg,alpaca", help="the mixture's tasks")
    p.add_argument("--held-out", default="nli", help="held-out clusters (nli = rte, mnli, snli)")
    p.add_argument("--cap", type=int, default=3000, help="per-task cap of examples-proportional mixing (3000)")
    p.add_argument("--total", default="4000", help="mixture examples (4000; 'all': the sum of the capped sizes)")
    p.add_argument("--method", default="lora", help="lora (default), full, or any method")
    p.add_argument("--method-args", help="k=v,... for --method")
    for name, typ in (("lr", float), ("epochs", float), ("max-steps", int)):
        p.add_argument(f"--{name}", type=typ, help="default: the method's" if name != "max-steps" else "overrides epochs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="tokens of instruction + response (512)")
    p.add_argument("--limit", type=int, help="zero-shot evaluation on the first N dev examples of each task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    common_args(p)
    p.set_defaults(func=cmd_instruct)
