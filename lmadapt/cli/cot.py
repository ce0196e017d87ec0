"""lmadapt cot: chain-of-thought vs answer-only few-shot, and self-consistency (GSM8K)."""
from __future__ import annotations

import json
from pathlib import Path

from .common import DEFAULT_MODEL, common_args, table


def cmd_cot(a) -> int:
    import lmadapt
    from ..api import eval_record
    from ..atomic import write_file, write_json
    from ..prompting.cot import CotConfig, run_cot
    from ..tasks import get_task
    task = get_task(a.task)
    if task.kind != "generation":
        raise ValueError(f"cot decodes worked solutions: task '{task.name}' is {task.kind}; use --task gsm8k")
    cfg = CotConfig(k=a.k, self_consistency=a.self_consistency, temperature=a.temperature, top_p=a.top_p,
                    max_new_tokens=a.max_new_tokens, direct=not a.no_direct, seed=a.seed, overflow=a.overflow,
                    max_length=a.max_length, batch_size=a.batch_size)
    model, tok = lmadapt.load(a.model)
    adapted = lmadapt.attach(model, "none", tokenizer=tok)
    res = run_cot(adapted, task, cfg, split=a.split, limit=a.limit, data_root=a.data_root, precision=a.precision,
                  progress=not a.no_progress)
    m = res["metrics"]
    print(table([[name, f"{v['numeric_accuracy']:.2f}", f"{v['no_answer']:.1f}", v["n"]] for name, v in m.items()],
                ["prompt", "accuracy", "no answer %", "n"]))
    if a.out:
        out = Path(a.out)
        records = res.pop("records")
        metrics = {"numeric_accuracy": m["cot"]["numeric_accuracy"], "n": res["n"], "n_available": res["n_available"]}
        write_file(out / "predictions.jsonl",
                   lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in records)))
        write_json(out / "result.json", eval_record(adapted, task, a.split, metrics, cot=res))
        print(f"wrote {out / 'result.json'} and {out / 'predictions.jsonl'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("cot", help="chain-of-thought few-shot vs answer-only, and self-consistency (GSM8K)",
                       description="Example: lmadapt cot --task gsm8k --k 8 --self-consistency 5 --limit 200 "
                                   "--out runs/cot. Exemplars (with rationales) come from train.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--data-root", help="datasets folder (default: $LMADAPT_DATA or ../shared/data)")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=int, default=8, help="exemplars (8), drawn from train with --seed")
    p.add_argument("--self-consistency", type=int, default=0, metavar="N",
                   help="also sample N chains per problem and vote on their answers (0: off)")
    p.add_argument("--temperature", type=float, default=0.7, help="self-consistency sampling temperature (0.7)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per chain (256)")
    p.add_argument("--no-direct", action="store_true", help="skip the answer-only baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overflow", choices=["reduce", "error"], default="reduce")
    p.add_argument("--max-length", type=int, help="window in tokens (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="the first N problems of --split")
    p.add_argument("--out", help="folder for result.json and predictions.jsonl")
    common_args(p)
    p.set_defaults(func=cmd_cot)
