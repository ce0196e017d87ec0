"""lmadapt icl: in-context learning, k demonstrations before each query, over several seeds."""
from __future__ import annotations

from pathlib import Path

from .common import DEFAULT_MODEL, common_args, data_args, head_args, table, task_from_args, unescape


def cmd_icl(a) -> int:
    import lmadapt
    from ..api import eval_record
    from ..atomic import write_json
    from ..batching import is_classification
    from ..data import parse_cap
    from ..prompting.embed import SentenceEmbedder
    from ..prompting.icl import IclConfig, run_icl
    task = task_from_args(a)
    if a.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {a.seeds}")
    cfg = IclConfig(k=a.k, select=a.select, order=a.order, seeds=tuple(range(a.seed, a.seed + a.seeds)),
                    pool=parse_cap(a.pool, "--pool"), separator=unescape(a.separator), overflow=a.overflow,
                    max_length=a.max_length, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    model, tok = lmadapt.load(a.model)
    if is_classification(task):
        h = head_args(a) | {"head": "verbalizer"}
        adapted = lmadapt.attach(model, "none", task=task, tokenizer=tok, **h)
    else:
        if a.template or a.verbalizer:
            raise ValueError(f"--template/--verbalizer are for classification tasks; '{task.name}' is {task.kind}")
        adapted = lmadapt.attach(model, "none", tokenizer=tok)
    embedder = SentenceEmbedder(a.embed_model) if cfg.needs_similarity else None
    res = run_icl(adapted, task, cfg, split=a.split, limit=a.limit, data_root=a.data_root, embedder=embedder,
                  precision=a.precision, progress=not a.no_progress)
    keys = list(res["summary"])
    rows = [[r["seed"], *(f"{r['metrics'][k]:.2f}" for k in keys), f"{r['demonstrations_used']['mean']:.2f}",
             f"{r['prompt_tokens']['max']}"] for r in res["per_seed"]]
    print(table(rows, ["seed", *keys, "demos used", "max tokens"]))
    for k in keys:
        s = res["summary"][k]
        print(f"{task.name} k={cfg.k} {cfg.select}/{cfg.order}: {k} {s['mean']:.2f} ± {s['std']:.2f} "
              f"(min {s['min']:.2f}, max {s['max']:.2f}) over {s['n_seeds']} seeds, {res['n']} examples")
    if a.out:
        metrics = {k: res["summary"][k]["mean"] for k in keys} | {"n": res["n"], "n_available": res["n_available"]}
        write_json(Path(a.out) / "result.json", eval_record(adapted, task, a.split, metrics, icl=res))
        print(f"wrote {Path(a.out) / 'result.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("icl", help="in-context learning: k demonstrations before the query, scored or decoded",
                       description="Example: lmadapt icl --task sst2 --k 8 --select knn --order similar-last --seeds 5 "
                                   "--limit 200 --out runs/icl. Reports mean ± std and min/max over seeds.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    data_args(p, train_file=True)
    p.add_argument("--split", default="dev", help="the queries (dev)")
    p.add_argument("--k", type=int, default=8, help="demonstrations per prompt (8)")
    p.add_argument("--select", choices=["random", "balanced", "knn"], default="random",
                   help="random: one set per seed; balanced: k/C per label; knn: per query, nearest by embedding")
    p.add_argument("--order", choices=["random", "similar-last"], default="random",
                   help="demonstration order: seeded random, or ascending similarity (nearest next to the query)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (5): seeds --seed .. --seed + N - 1")
    p.add_argument("--seed", type=int, default=0, help="first seed (0)")
    p.add_argument("--pool", default="1000", help="candidate demonstrations per seed, a seeded subset of train "
                   "(1000; 'all')")
    p.add_argument("--embed-model", default="minilm-l6", help="sentence embeddings for knn / similar-last (minilm-l6)")
    p.add_argument("--overflow", choices=["reduce", "error"], default="reduce",
                   help="a prompt over the window: drop demonstrations with a warning (reduce), or refuse (error)")
    p.add_argument("--max-length", type=int, help="window in tokens (default: the model's)")
    p.add_argument("--separator", default="\\n\\n", help="between demonstrations (\\n\\n)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation tasks (48)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="the first N examples of --split")
    p.add_argument("--out", help="folder to write result.json into")
    p.add_argument("--template", action="append", help="classification: the pattern (default: the task's first)")
    p.add_argument("--verbalizer", action="append", help="classification: label words (default: the task's)")
    p.add_argument("--token-score", choices=["sum", "mean"], default="sum")
    p.add_argument("--word-combine", choices=["mean", "logsumexp"], default="mean")
    common_args(p)
    p.set_defaults(func=cmd_icl, head=None)
