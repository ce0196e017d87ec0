"""lmadapt compare: a resumable grid of `train` runs (methods x shots x seeds x tasks), then the
report (results.csv, report.html). Takes every option of `lmadapt train` and passes it to every cell."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import head_args, parse_method_args
from .train import ood_tasks, train_config, train_options

# Options that do not change what a cell computes: left out of the rerun check (compare.json).
NOT_CHECKED = ("no_progress", "data_root")


def _train_actions():
    p = argparse.ArgumentParser(add_help=False)
    train_options(p)
    return [act for act in p._actions if act.option_strings and act.dest != "task"]


def forwarded(a) -> tuple[list[str], dict]:
    """-> (the train options given, as `lmadapt train` arguments; the same as a dict)."""
    argv, given = [], {}
    for act in _train_actions():
        value = getattr(a, act.dest)
        if value is None or value == act.default:
            continue
        flag = act.option_strings[-1]
        given[act.dest] = value
        if isinstance(act, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(act, argparse._AppendAction):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv, given


def method_args_of(specs: list[str] | None, methods: list[str]) -> dict:
    """['lora:r=8,alpha=16', 'prefix:k=5'] -> {'lora': {'r': 8, 'alpha': 16}, 'prefix': {'k': 5}}."""
    out = {}
    for spec in specs or []:
        name, sep, rest = spec.partition(":")
        if not sep or name not in methods:
            raise ValueError(f"--method-args '{spec}': write METHOD:k=v,... for one of --methods "
                             f"({', '.join(methods)}), e.g. lora:r=8,alpha=16")
        out.setdefault(name, {}).update(parse_method_args(rest))
    return out


def tasks_of(a) -> dict:
    from ..tasks import get_task, task_from_files
    if a.train:
        if not (a.dev and a.text_col and a.label_col):
            raise ValueError("--train needs --dev, --text-col and --label-col (and --text-pair-col for pairs)")
        task = task_from_files(a.train, a.dev, a.text_col, a.label_col, text_pair_col=a.text_pair_col)
        return {task.name: task}
    if not a.task:
        raise ValueError("give --task NAME[,NAME...] (see `lmadapt tasks`) or --train FILE with --text-col/--label-col")
    return {name: get_task(name) for name in a.task.split(",") if name}


def cmd_compare(a) -> int:
    import lmadapt
    from ..compare import (FEW_SHOT_ONLY, base_loader, check_options, make_grid, parse_seeds, parse_shard,
                           pet_cell, run_grid, subprocess_cell, train_cell)
    from ..data import parse_shots
    from .report import print_report
    tasks = tasks_of(a)
    methods = [m for m in a.methods.split(",") if m]
    margs = method_args_of(a.method_args, methods)
    for m in methods:  # unknown methods and bad arguments fail before any cell runs
        if m not in FEW_SHOT_ONLY:
            lmadapt.get_method(m, **margs.get(m, {}))
    shots = [parse_shots(s) for s in a.shots.split(",") if s]
    seeds, shard = parse_seeds(a.seeds), parse_shard(a.shard)
    for task in tasks.values():  # bad data too
        for split in ("train", "dev"):
            task.load(split, a.data_root)
    out = Path(a.out)
    argv, given = forwarded(a)
    pet_args = {"unlabeled": a.pet_unlabeled, "method": a.pet_method, "final_method": a.pet_final_method}
    check_options(out, {k: v for k, v in given.items() if k not in NOT_CHECKED}
                  | {"method_args": margs} | ({"pet": pet_args} if "pet" in methods else {}), methods=methods)
    cells, notes = make_grid(tasks, methods, shots, seeds)
    for note in notes:
        print(note)
    attach_args = {"pooling": a.pooling, "layer": a.layer, **head_args(a)}
    train_args, ood = train_config(a), ood_tasks(a)
    load_base = base_loader(a.model)
    launcher = a.launcher.split() if a.launcher else None
    if launcher == ["python"]:
        launcher = [sys.executable]

    def run(cell, folder):
        task = tasks[cell.task]
        if cell.method == "pet":
            from ..prompting.ensemble import pvps_of
            one = [attach_args["template"]] if attach_args["template"] else []
            words = [attach_args["verbalizer"]] if attach_args["verbalizer"] else []
            patterns = tuple(pvps_of(task, None, one, words))  # none given: all of the task's PVPs
            pet_cell(cell, folder, load_base=load_base, task=task, train_args=train_args, ood=ood,
                     data_root=a.data_root, pet_args=pet_args | {"patterns": patterns})
        elif launcher:
            subprocess_cell(cell, folder, launcher, argv, margs)
        else:
            train_cell(cell, folder, load_base=load_base, task=task, method_args=margs, attach_args=attach_args,
                       train_args=train_args, ood=ood, data_root=a.data_root, max_train=a.max_train)
    summary = run_grid(cells, out, run, shard=shard)
    if not a.no_report:
        print_report(out)
    return 1 if summary["failed"] else 0


def register(sub) -> None:
    c = sub.add_parser(
        "compare", help="a resumable grid of train runs (methods x shots x seeds), then report.html",
        description="Every method x shots x seed (x task) as its own `lmadapt train` run in OUT/TASK/METHOD/"
                    "shots-K/seed-S, then OUT/results.csv and OUT/report.html. Rerun the same command to resume: "
                    "finished cells are skipped, an interrupted one resumes from its checkpoint, a failed one "
                    "is retried. Takes every option of `lmadapt train` and passes it to every cell. Example: "
                    "lmadapt compare --task sst2 --methods probe,lora,prefix --shots 16,64,full --seeds 3 "
                    "--ood imdb --out runs/cmp")
    train_options(c)  # --task here takes a comma-separated list too
    c.add_argument("--methods", default="probe,lora,prompt,prefix",
                   help="comma-separated methods (`lmadapt methods`) and/or 'pet' (default probe,lora,prompt,prefix)")
    c.add_argument("--method-args", action="append",
                   help="METHOD:k=v,... for one method, repeatable (e.g. --method-args lora:r=8,alpha=16)")
    c.add_argument("--shots", default="16,64,full",
                   help="comma-separated: examples per class (generation tasks: in total) or 'full' (16,64,full)")
    c.add_argument("--seeds", default="3", help="a count (3: seeds 0,1,2) or a list (0,7) (default 3)")
    c.add_argument("--out", required=True, help="grid folder (rerun with the same one to resume)")
    c.add_argument("--shard", help="i/n: run only every n-th cell from the i-th (1-based), e.g. one machine "
                                   "--shard 1/2, another --shard 2/2, same --out on a shared disk")
    c.add_argument("--launcher", help="run each cell as its own command, e.g. 'python' (a fresh process: clean "
                                      "memory figures) or 'accelerate launch --num_processes 2'; default: in "
                                      "this process (PET cells always are)")
    c.add_argument("--pet-unlabeled", type=int, default=2000, help="pet cells: unlabeled examples (2000)")
    c.add_argument("--pet-method", default="lora", help="pet cells: the PVP models' method (lora)")
    c.add_argument("--pet-final-method", default="lora", help="pet cells: the distilled classifier's method (lora)")
    c.add_argument("--no-report", action="store_true", help="do not write results.csv / report.html at the end")
    c.set_defaults(func=cmd_compare)
