"""lmadapt predict: labels or generated text for an input file."""
from __future__ import annotations

from pathlib import Path

from .common import load_run, common_args


def read_inputs(path: str) -> list:
    """Plain text (one example per line), or .jsonl/.json/.tsv/.csv with a `text` (and optional
    `text_pair`) column."""
    from ..data import DataError, Example, read_rows
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: does not exist")
    if p.suffix in (".jsonl", ".json", ".tsv", ".csv"):
        rows = read_rows(p, required=("text",))
        return [Example(text=str(r["text"]), text_pair=r.get("text_pair")) for _, r in rows]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # else the message would not say which file
        raise DataError(f"{path}: is not UTF-8 text (bad byte at offset {e.start})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty file")
    return [Example(text=ln) for ln in lines]


def cmd_predict(a) -> int:
    import lmadapt
    from ..tasks import get_task
    inputs = read_inputs(a.input)  # a bad input file fails before seconds of model loading
    adapted = load_run(a.run)
    task = get_task(a.task) if a.task else _task_of_run(a.run, adapted)
    for p in lmadapt.predict(adapted, task, inputs, batch_size=a.batch_size, precision=a.precision,
                             progress=not a.no_progress):
        print(p)
    return 0


def _task_of_run(run: str, adapted):
    from ..tasks import get_task
    res = Path(run) / "result.json"
    if res.exists():
        from ..atomic import read_json_file
        name = (read_json_file(res, "pass --task, or train the run again") or {}).get("task")
        try:
            return get_task(name)
        except ValueError:
            pass
    if adapted.num_labels:
        from ..tasks import Task
        return Task(name="run", kind="classification", label_names=tuple(adapted.label_names),
                    metric="accuracy", splits={"none": lambda root: []}, uses_data_root=False)
    raise ValueError(f"{run}: cannot tell which task this run was trained on; pass --task")


def register(sub) -> None:
    pr = sub.add_parser("predict", help="predict labels / generate text for an input file",
                        description="Input: a text file (one example per line) or .jsonl/.tsv/.csv with a "
                                    "'text' column. Example: lmadapt predict --run runs/x --input reviews.txt")
    pr.add_argument("--run", required=True)
    pr.add_argument("--input", required=True)
    pr.add_argument("--task", help="task (default: the run's)")
    pr.add_argument("--batch-size", type=int, default=32)
    common_args(pr)
    pr.set_defaults(func=cmd_predict)
