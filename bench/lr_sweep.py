"""Learning-rate sweep per method at the CLI's default budget (issue 12, part 1: defaults that learn).

Every (method, lr) pair is one cell of a compare grid (lmadapt.compare: resumable, so a killed
sweep rerun with the same command skips what finished; a failed cell is recorded and the sweep
goes on). Each cell is what `lmadapt train --task T --method M --max-train N --lr LR` does with
every other option at its default: batch 8, the method's default epochs, 6% warmup, evaluation
once per epoch with the best dev checkpoint kept, the head `attach` picks (the verbalizer head
for a causal LM on a task with patterns, the linear head for the probe). The N training examples
are the same seeded subset for every cell. Prints dev metric per method x lr, the winner per
method, its margin over the majority class (classification), and writes OUT/sweep.json.

The lrs: `--factors` times each method's default lr (`lmadapt methods`, "lr": the SST-2-selected one,
also on generation tasks, so that a sweep's cells keep their lrs), or `--lrs METHOD:a,b,c`. The
default shown by the winner is the one `train` uses on the task (Method.lr_for: "lr (generation)"
on a generation task where the method has one).

OUT/sweep.json also holds every finished cell's result.json and the settings they ran with;
`--reuse FILE` (such a sweep.json, e.g. a committed copy: run folders do not survive a new machine)
counts its cells as finished when the settings match, and names the first one that differs
otherwise. A cell's precision is its own (result.json "precision"): the table marks the cells that
ran in another precision than the rest.

    OMP_NUM_THREADS=2 .venv/bin/python bench/lr_sweep.py --task sst2 --max-train 1000 --out runs/lr_sst2
    # or one process per core (the table and sweep.json of each cover every cell finished so far):
    OMP_NUM_THREADS=1 .venv/bin/python bench/lr_sweep.py --task sst2 --max-train 1000 --out runs/lr_sst2 --shard 1/2 &
    OMP_NUM_THREADS=1 .venv/bin/python bench/lr_sweep.py --task sst2 --max-train 1000 --out runs/lr_sst2 --shard 2/2
    .venv/bin/python bench/lr_sweep.py --task sst2 --max-train 1000 --out runs/lr_sst2 --table   # so far, running nothing
    OMP_NUM_THREADS=2 .venv/bin/python bench/lr_sweep.py --task e2e_nlg --max-train 1000 --max-eval 200 \\
        --methods full,prompt,prefix,lora,adapter,bitfit --out runs/lr_e2e
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import lmadapt
from lmadapt.atomic import write_json
from lmadapt.compare import Cell, base_loader, parse_shard, run_grid, train_cell
from lmadapt.methods import METHODS
from lmadapt.tasks import get_task

# Methods that cannot be built from defaults alone, and why: refused when asked for, skipped by default.
UNSWEPT = {"ipt": "needs a prompt decoder trained by IPT first; its subspace tuning is measured by "
                  "bench/learned_prompts.py --parts ipt"}
SKIP = ("none", *UNSWEPT)  # none: nothing trains


def lrs_of(a) -> dict[str, list[float]]:
    methods = [m for m in a.methods.split(",") if m] if a.methods else [m for m in METHODS if m not in SKIP]
    given = {}
    for spec in a.lrs or []:
        name, _, values = spec.partition(":")
        given[name] = [float(v) for v in values.split(",") if v]
    factors = [float(f) for f in a.factors.split(",")]
    out = {}
    for m in methods:
        if m in UNSWEPT:
            raise SystemExit(f"lr_sweep: method '{m}' {UNSWEPT[m]}")
        lmadapt.get_method(m)  # unknown names fail here
        out[m] = given.get(m) or sorted({float(f"{METHODS[m].default_lr * f:.2g}") for f in factors})
    return out


def majority(task, data_root, max_eval) -> float | None:
    """The majority class's accuracy on the same dev examples the cells are scored on."""
    from lmadapt.batching import is_classification
    from lmadapt.data import subsample
    if not is_classification(task):
        return None
    labels = [e.label for e in subsample(task.load("dev", data_root), max_eval)]
    return 100.0 * max(labels.count(c) for c in set(labels)) / len(labels)


def settings_of(a) -> dict:
    """What a cell's figure depends on besides its method and lr (not where it is written)."""
    return {"model": a.model, "task": a.task, "max_train": a.max_train, "max_eval": a.max_eval,
            "max_steps": a.max_steps, "head": a.head, "seed": a.seed}


def reuse(path, settings: dict, cells, out: Path) -> tuple[int, dict]:
    """Write result.json of every cell of `cells` that the earlier sweep.json at `path` finished
    and `out` has not; -> (how many, all of its results: kept in the new sweep.json, cells of
    other methods too). SystemExit if that sweep ran with other settings."""
    try:
        earlier = json.loads(Path(path).read_text())
        old, results = earlier["settings"], earlier["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--reuse {path}: not a sweep.json with settings and results ({e})")
    for name, value in settings.items():
        if old.get(name) != value:
            raise SystemExit(f"--reuse {path}: its cells ran with {name} = {old.get(name)!r}, this sweep with {value!r}")
    n = 0
    for cell in cells:
        folder = out / cell.path
        if cell.path in results and not (folder / "result.json").exists():
            write_json(folder / "result.json", results[cell.path])
            write_json(folder / "cell.json", {"cell": cell.to_dict(), "reused_from": str(path)})
            n += 1
    return n, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--methods", help="comma-separated (default: every method but none)")
    ap.add_argument("--factors", default="0.1,0.3,1,3,10", help="lrs = each method's default x these")
    ap.add_argument("--lrs", action="append", help="METHOD:lr,lr,... instead of the factors for that method")
    ap.add_argument("--max-train", type=int, default=1000, help="training examples, a seeded subset (1000)")
    ap.add_argument("--max-eval", type=int, help="dev examples, a fixed subset (default all)")
    ap.add_argument("--max-steps", type=int, help="override the default budget (smoke tests only)")
    ap.add_argument("--head", help="override the default head (linear, verbalizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root")
    ap.add_argument("--out", required=True)
    ap.add_argument("--progress", action="store_true", help="per-run progress bars")
    ap.add_argument("--table", action="store_true",
                    help="run nothing: the table and OUT/sweep.json from the cells finished so far (a killed sweep's)")
    ap.add_argument("--shard", help="i/n: run only every n-th cell from the i-th (1-based): one process per core, "
                                   "--shard 1/2 and --shard 2/2 on the same --out")
    ap.add_argument("--reuse", action="append", metavar="SWEEP_JSON",
                    help="count the cells of an earlier sweep.json with the same settings as finished")
    a = ap.parse_args(argv)
    try:
        shard = parse_shard(a.shard)
    except ValueError as e:
        raise SystemExit(f"lr_sweep: {e}")
    task = get_task(a.task)
    lrs = lrs_of(a)
    cell_of = {(m, lr): Cell(task.name, m, None, a.seed, (("lr", lr),)) for m, values in lrs.items() for lr in values}
    cells = list(cell_of.values())
    train_args = {"progress": a.progress} | ({"max_eval": a.max_eval} if a.max_eval else {}) | (
        {"max_steps": a.max_steps} if a.max_steps else {})
    attach_args = {"head": a.head} if a.head else {}
    load_base = base_loader(a.model)
    out = Path(a.out)

    def run(cell, folder):
        train_cell(cell, folder, load_base=load_base, task=task, attach_args=attach_args, train_args=train_args,
                   ood=[], data_root=a.data_root, max_train=a.max_train)
    carried = {}
    for path in a.reuse or []:
        n, earlier = reuse(path, settings_of(a), cells, out)
        carried |= earlier
        print(f"reused {n} finished cell(s) of {path}")
    if not a.table:
        run_grid(cells, out, run, shard=shard)

    base = majority(task, a.data_root, a.max_eval)
    winners, results, precisions = {}, {}, {}
    for m, values in lrs.items():
        scores = {}
        for lr in values:
            cell = cell_of[m, lr]
            path = out / cell.path / "result.json"
            if path.exists():
                r = json.loads(path.read_text())
                scores[lr] = r["best_dev"]
                results[cell.path] = r
                precisions[m, lr] = r.get("precision")
        if scores:
            best = max(scores, key=scores.get)
            winners[m] = {"lr": best, "dev": scores[best], "default_lr": METHODS[m].lr_for(task),
                          "scores": {str(k): v for k, v in scores.items()}}
    print(f"\n{task.name}: best dev {task.metric} per method x lr ({a.max_train} training examples, "
          f"defaults otherwise)" + (f"; majority class {base:.1f}" if base is not None else ""))
    usual = max(set(precisions.values()), key=list(precisions.values()).count) if precisions else None

    def odd(m, lr) -> str:   # a cell of another precision than most says which
        return f" ({precisions[m, lr]})" if (m, lr) in precisions and precisions[m, lr] != usual else ""
    for m, values in lrs.items():
        got = winners.get(m, {}).get("scores", {})
        def missing(lr) -> str:   # no result.json: a failed cell has error.json
            return "failed" if (out / cell_of[m, lr].path / "error.json").exists() else "not run"
        cells_txt = "  ".join(f"{lr:g}: " + (f"{got[str(lr)]:.1f}{odd(m, lr)}" if str(lr) in got else missing(lr))
                              for lr in values)
        print(f"  {m:10s} {cells_txt}")
    if usual:
        print(f"  (precision {usual}" + (", other precisions in brackets)" if any(odd(*k) for k in precisions) else ")"))
    print("\nwinner per method (default lr in brackets):")
    for m, w in winners.items():
        gain = f", {w['dev'] - base:+.1f} over the majority class" if base is not None else ""
        flag = "" if base is None or w["dev"] - base >= 20 else "  <- under the issue's 20-point goal"
        print(f"  {m:10s} lr {w['lr']:g} [{w['default_lr']:g}]: {w['dev']:.1f}{gain}{flag}")
    write_json(out / "sweep.json", {"task": task.name, "max_train": a.max_train, "majority": base,
                                     "lrs": lrs, "winners": winners, "settings": settings_of(a),
                                     "results": carried | results})
    print(f"\nwrote {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
