"""lmadapt tasks | methods."""
from __future__ import annotations

import dataclasses
from .common import table


def cmd_tasks(a) -> int:
    from ..tasks import list_tasks
    rows = list_tasks()
    join = lambda v: (v if isinstance(v, str) else ",".join(v)) or "-"  # noqa: E731
    print(table([[r["name"], r["kind"], join(r["labels"]), r["metric"], join(r["splits"])]
                  for r in rows], ["task", "kind", "labels", "metric", "splits"]))
    return 0


def cmd_methods(a) -> int:
    from ..methods import METHODS
    rows = []
    for name, cls in sorted(METHODS.items()):
        args = ", ".join(f"{f.name}={f.default if f.default is not dataclasses.MISSING else '?'}"
                         for f in dataclasses.fields(cls))
        rows.append([name, cls.summary, args or "-", "yes" if cls.supports_slots else "no",
                     f"{cls.default_lr:g}", f"{cls.generation_lr:g}" if cls.generation_lr is not None else "-",
                     f"{cls.default_epochs:g}"])
    print(table(rows, ["method", "what", "args (defaults)", "slots", "lr", "lr (generation)", "epochs"]))
    return 0


def register(sub) -> None:
    sub.add_parser("tasks", help="list the tasks").set_defaults(func=cmd_tasks)
    sub.add_parser("methods", help="list the methods and their arguments").set_defaults(func=cmd_methods)
