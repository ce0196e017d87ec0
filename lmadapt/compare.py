"""A resumable grid of runs: tasks x shots x seeds x methods, each cell one `train` run (or PET)
in its own folder.

Layout: OUT/compare.json (the options every cell shares) and one folder per cell,
OUT/{task}/{method}/shots-{k|full}/seed-{s}[/{axis}-{value}], holding what `lmadapt train --out`
writes (result.json, best/, checkpoint/) plus cell.json (the cell and its wall time).

- Resumable: a cell with result.json is finished and skipped; an interrupted one resumes from
  its checkpoint (train's --resume), so a killed grid rerun with the same command picks up where
  it stopped. A rerun whose shared options differ from compare.json's is refused (cells trained
  with other settings would be mixed in one table); the axes (methods, shots, seeds) may grow.
- A failed cell writes error.json (the error) and traceback.txt, and the grid goes on. A rerun
  tries it again; success removes both files.
- Sharding: `shard=(i, n)` runs every n-th cell from the i-th (0-based here; the CLI's --shard
  is 1-based), so n processes or machines share one OUT without overlap.
- How a cell runs is the caller's `run(cell, folder)`: `train_cell` in this process,
  `subprocess_cell` as a command (e.g. `accelerate launch -m lmadapt train ...`), `pet_cell` for PET.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import read_json_file, write_json

FEW_SHOT_ONLY = ("pet",)  # methods that need a labeled k-shot set (not 'full') and a classification task


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    shots: int | None                    # None: the full training set
    seed: int
    extra: tuple = ()                    # more axes as (name, value) pairs, e.g. (("lr", 1e-3),)

    @property
    def path(self) -> str:
        parts = [self.task, self.method, f"shots-{self.shots or 'full'}", f"seed-{self.seed}"]
        return "/".join(parts + [f"{k}-{v}" for k, v in self.extra])

    @property
    def label(self) -> str:
        more = "".join(f" {k}={v}" for k, v in self.extra)
        return f"{self.task} {self.method} shots={self.shots or 'full'} seed={self.seed}{more}"

    def to_dict(self) -> dict:
        return {"task": self.task, "method": self.method, "shots": self.shots or "full", "seed": self.seed,
                **{k: v for k, v in self.extra}}


def parse_seeds(value: str) -> list[int]:
    """'3' -> [0, 1, 2] (a count); '0,7' -> [0, 7] (a list)."""
    text = str(value).strip()
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: '{value}' is neither a count (3: seeds 0, 1, 2) nor a list (0,7)") from None
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds: '{value}' repeats a seed or is empty")
    return seeds


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """'2/4' (1-based: the second of four shards) -> (1, 4)."""
    if value is None:
        return None
    try:
        i, n = (int(x) for x in str(value).split("/"))
    except ValueError:
        i = n = 0
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"--shard: '{value}' is not i/n with 1 <= i <= n (e.g. --shard 1/2 and --shard 2/2)")
    return i - 1, n


def make_grid(tasks: dict, methods: list[str], shots: list[int | None], seeds: list[int],
              extra: list[tuple] = ((),)) -> tuple[list[Cell], list[str]]:
    """-> (cells, notes on the combinations left out). Order: task, shots, seed, method, extra, so
    the first cells of a grid already compare every method at one setting."""
    from .batching import is_classification
    cells, notes = [], []
    for name, task in tasks.items():
        for k in shots:
            runs = []
            for method in methods:
                if method in FEW_SHOT_ONLY and (k is None or not is_classification(task)):
                    why = "a classification task" if not is_classification(task) else "k shots, not 'full'"
                    notes.append(f"{method} at shots={k or 'full'} on {name}: left out ({method} needs {why})")
                else:
                    runs.append(method)
            cells += [Cell(name, m, k, seed, tuple(e)) for seed in seeds for m in runs for e in extra]
    return cells, notes


def check_options(out: Path, options: dict, methods: list[str] | None = None) -> None:
    """Record the shared options in OUT/compare.json, or refuse a rerun with different ones.

    With `methods` (this run's), the per-method entries are checked for those methods only, so a
    later run may add or leave out methods: `method_args` is compared method by method (each method
    run is recorded, `{}` for its defaults, so a method not recorded yet is new), and `pet` (PET's own
    settings) only when both runs have PET cells; what this run adds is recorded."""
    path = out / "compare.json"
    if methods is not None:
        options = options | {"method_args": {m: options.get("method_args", {}).get(m, {}) for m in methods}}
    if not path.exists():
        write_json(path, {"options": options})
        return
    saved = read_json_file(path, f"delete {path} if the grid's cells were all made with today's options")
    old = saved.get("options", {})
    per_method = {"method_args", "pet"} if methods is not None else set()
    diff = [f"{k} ({old.get(k)!r} -> {options.get(k)!r})" for k in sorted(set(old) | set(options))
            if k not in per_method and old.get(k) != options.get(k)]
    merged = dict(old)
    if methods is not None:
        was = old.get("method_args", {})
        now = options["method_args"]
        diff += [f"method_args of {m} ({was[m]!r} -> {now[m]!r})" for m in methods if m in was and was[m] != now[m]]
        merged["method_args"] = was | now
        if "pet" in options:
            if "pet" in old and old["pet"] != options["pet"]:
                diff.append(f"pet ({old['pet']!r} -> {options['pet']!r})")
            merged["pet"] = options["pet"]
    if diff:
        raise ValueError(f"{out}: its cells were run with other options: {', '.join(diff)}; rerun with "
                         "the same options, or compare into a new --out")
    if merged != old:
        write_json(path, saved | {"options": merged})


def cell_state(folder: Path) -> str:
    if (folder / "result.json").exists():
        return "done"
    return "failed" if (folder / "error.json").exists() else "pending"


def _headline(result: dict) -> str:
    parts = []
    for split, m in result.get("metrics", {}).items():
        vals = [f"{k} {v:.2f}" for k, v in m.items() if k not in ("n", "n_available") and isinstance(v, (int, float))]
        if vals:
            parts.append(f"{split} {', '.join(vals)}")
    return "; ".join(parts)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f}s"


def run_grid(cells: list[Cell], out, run: Callable[[Cell, Path], None], *, shard: tuple[int, int] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run every cell of this shard that has no result.json; -> {'done', 'ran', 'failed', 'cells'}
    (lists of Cells). A cell's exception is recorded in its folder and the grid goes on;
    KeyboardInterrupt stops it (rerun to resume)."""
    out = Path(out)
    mine = cells[shard[0]::shard[1]] if shard else list(cells)
    where = f" (shard {shard[0] + 1}/{shard[1]}: {len(mine)} of {len(cells)} cells)" if shard else ""
    done = [c for c in mine if cell_state(out / c.path) == "done"]
    log(f"grid: {len(mine)} cells{where}, {len(done)} already finished, {len(mine) - len(done)} to run -> {out}")
    ran, failed, spent = [], [], []
    for k, cell in enumerate(mine, 1):
        folder = out / cell.path
        head = f"[{k:>{len(str(len(mine)))}}/{len(mine)}] {cell.label}"
        if cell in done:
            log(f"{head}: finished before, skipped")
            continue
        resuming = (folder / "checkpoint").exists()
        log(f"{head}: running{' (resuming its checkpoint)' if resuming else ''}")
        t0 = time.perf_counter()
        try:
            run(cell, folder)
            if not (folder / "result.json").exists():
                raise RuntimeError(f"the run finished without writing {folder / 'result.json'}")
        except Exception as e:  # noqa: BLE001 -- one cell's failure must not stop the grid
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "traceback.txt").write_text(traceback.format_exc())
            msg = f"{type(e).__name__}: {e}".strip()
            write_json(folder / "error.json", {"cell": cell.to_dict(), "error": msg, "traceback": "traceback.txt",
                                               "seconds": time.perf_counter() - t0})
            failed.append(cell)
            log(f"{head}: FAILED ({msg.splitlines()[0] if msg else type(e).__name__}); traceback in "
                f"{folder / 'traceback.txt'}; the grid goes on")
        else:
            seconds = time.perf_counter() - t0
            for stale in ("error.json", "traceback.txt"):
                (folder / stale).unlink(missing_ok=True)
            write_json(folder / "cell.json", {"cell": cell.to_dict(), "wall_seconds": seconds})
            ran.append(cell)
            spent.append(seconds)
            result = json.loads((folder / "result.json").read_text())
            left = sum(1 for c in mine[k:] if c not in done)
            eta = f", about {_minutes(left * sum(spent) / len(spent))} to go" if left else ""
            log(f"{head}: done in {_minutes(seconds)}: {_headline(result)} "
                f"({len(done) + len(ran)}/{len(mine)} finished, {len(failed)} failed{eta})")
        finally:
            gc.collect()
    if failed:
        log(f"{len(failed)} cell(s) failed: " + "; ".join(c.label for c in failed) +
            " (error.json + traceback.txt in each folder; rerun the same command to retry them)")
    return {"cells": mine, "done": done + ran, "ran": ran, "failed": failed}


# --- how a cell runs ----------------------------------------------------------------------------

def base_loader(model: str):
    """-> load_base(): a fresh (model, tokenizer) per call, from one load (a deep copy each time:
    attaching a method changes the model in place)."""
    import copy
    cache = {}

    def load_base():
        if "model" not in cache:
            from .models import load
            cache["model"], cache["tok"] = load(model)
        return copy.deepcopy(cache["model"]), cache["tok"]
    return load_base


def train_cell(cell: Cell, folder: Path, *, load_base, task, method_args: dict | None = None,
               attach_args: dict | None = None, train_args: dict | None = None, ood: list[str] | None = None,
               data_root=None, max_train: int | None = None) -> dict:
    """One `train` run in this process: attach cell.method to a fresh base model, train on
    cell.shots with cell.seed into `folder`. The cell's extra axes (lr, ...) override train_args.
    A probe keeps its linear head: the verbalizer head options go to the other methods."""
    from .api import attach, train
    from .methods import METHODS
    args = dict(attach_args or {})
    cls = METHODS.get(cell.method)
    if cls is not None and cls.frozen_features:
        for k in ("template", "verbalizer"):
            args.pop(k, None)
        if args.get("head") == "verbalizer":
            args.pop("head")
    model, tok = load_base()
    adapted = attach(model, cell.method, task=task, tokenizer=tok, init_seed=cell.seed, **args,
                     **(method_args or {}).get(cell.method, {}))
    return train(adapted, task, shots=cell.shots, seed=cell.seed, data_root=data_root, out=folder,
                 resume=(folder / "checkpoint").exists(), max_train=max_train, ood=ood,
                 **((train_args or {}) | dict(cell.extra)))


def pet_cell(cell: Cell, folder: Path, *, load_base, task, train_args: dict | None = None,
             ood: list[str] | None = None, data_root=None, pet_args: dict | None = None) -> dict:
    """PET (lmadapt.prompting.pet) on cell.shots labeled examples per class, into folder/pet/;
    then folder/result.json in train's shape, so a PET cell sits in the same tables: the final
    (distilled) classifier's dev metrics, trainable share and bytes, its out-of-domain metrics,
    and as train_seconds the members' plus the final classifier's training time (scoring the
    unlabeled set is not counted; cell.json has the wall time)."""
    from .api import _task, evaluate, is_main_process, load_adapted
    from .prompting.pet import PetConfig, run_pet
    t = _task(task)
    targs = dict(train_args or {}) | dict(cell.extra)
    pet = dict(pet_args or {})
    cfg = PetConfig(shots=cell.shots, seed=cell.seed, dev_limit=targs.get("max_eval"),
                    train=targs, final_train=targs, **pet)
    res = run_pet(load_base, t, cfg, folder / "pet", data_root=data_root, progress=targs.get("progress", False))
    final = read_json_file(folder / "pet" / "final" / "result.json", f"delete {folder} to run the cell again")
    members = [read_json_file(p, f"delete {folder} to run the cell again")
               for p in sorted((folder / "pet").glob("g*/p*/result.json"))]
    model, tok = load_base()
    adapted = load_adapted(folder / "pet" / "final" / "best", model=model, tokenizer=tok)
    opts = {k: targs[k] for k in ("max_length", "precision") if k in targs}
    metrics = {"dev": final["metrics"]["dev"]}
    for name in (ood if ood is not None else list(t.ood)):
        split = "dev" if "dev" in _task(name).splits else "test"
        metrics[name] = evaluate(adapted, name, split=split, data_root=data_root,
                                 limit=targs.get("max_ood", 500), **opts)
    record = final | {
        "method": "pet", "method_args": {"members": cfg.method, "final": cfg.final_method, **pet},
        "shots": cell.shots, "seed": cell.seed, "n_train": res["n_labeled"], "metrics": metrics,
        "train_seconds": sum(m["train_seconds"] for m in members) + final["train_seconds"],
        "peak_memory_mb": max([m["peak_memory_mb"] for m in members] + [final["peak_memory_mb"]]),
        "pet": {"n_unlabeled": res["n_unlabeled"], "ensemble_dev_accuracy": res["ensemble"]["dev_accuracy"],
                "members": res["generations"][-1]["members"], "final_artifact": str(folder / "pet" / "final" / "best")},
    }
    record["bytes_on_disk"] = final.get("bytes_on_disk")
    if is_main_process():
        write_json(folder / "result.json", record)
    return record


def train_command(cell: Cell, folder: Path, launcher: list[str], train_argv: list[str],
                  method_args: dict | None = None) -> list[str]:
    """The `lmadapt train` command line of a cell; launcher e.g. [sys.executable] or
    ['accelerate', 'launch', '--num_processes', '2']."""
    cmd = list(launcher) + ["-m", "lmadapt", "train", "--task", cell.task, "--method", cell.method,
                            "--shots", str(cell.shots or "full"), "--seed", str(cell.seed), "--out", str(folder)]
    margs = (method_args or {}).get(cell.method)
    if margs:
        cmd += ["--method-args", ",".join(f"{k}={'+'.join(v) if isinstance(v, tuple) else v}"
                                          for k, v in margs.items())]
    for k, v in cell.extra:
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if (folder / "checkpoint").exists():
        cmd.append("--resume")
    # --task comes from the cell; a custom task (--train/--dev files) travels in train_argv instead.
    if "--train" in train_argv:
        i = cmd.index("--task")
        del cmd[i:i + 2]
    return cmd + list(train_argv)


def subprocess_cell(cell: Cell, folder: Path, launcher: list[str], train_argv: list[str],
                    method_args: dict | None = None) -> None:
    """Run the cell as its own command; its output is shown and kept in folder/log.txt. A
    non-zero exit is an error naming the last line the command printed."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = train_command(cell, folder, launcher, train_argv, method_args)
    env = {**os.environ}
    repo = str(Path(__file__).resolve().parent.parent)  # this checkout's lmadapt, in the child too
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(folder / "log.txt", "ab") as logf:
        logf.write(("$ " + " ".join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        tail = b""
        while chunk := proc.stdout.read1(4096):  # chunks, not lines: progress bars end in \r
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            logf.write(chunk)
            tail = (tail + chunk)[-4000:]
        rc = proc.wait()
    if rc:
        lines = [ln for ln in tail.decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
        raise RuntimeError(f"exit code {rc}: {lines[-1] if lines else '(no output)'} (full log: {folder / 'log.txt'})")

