"""lmadapt compare: the grid resumes after a kill, a failed cell is recorded and the grid goes on,
shards split the grid, train's options reach every cell; on a tiny random LLaMA folder and a
small toy task in tsv files."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import TOY_GEN, _toy_examples, load_bench, make_model, make_tokenizer, subprocess_env
from lmadapt.compare import Cell, check_options, make_grid, parse_seeds, parse_shard, run_grid, train_command


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("toyfiles")
    for split, n, seed in (("train", 40, 0), ("dev", 16, 1)):
        rows = [f"{e.text}\t{('negative', 'positive')[e.label]}" for e in _toy_examples(n, seed)]
        (d / f"{split}.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return ["--train", str(d / "train.tsv"), "--dev", str(d / "dev.tsv"), "--text-col", "text", "--label-col", "label"]


def _args(tiny_dir, files, out, *more):
    return ["compare", "--model", str(tiny_dir), *files, "--max-steps", "2", "--no-progress", "--out", str(out), *more]


def _done(out) -> dict:
    """Finished cells -> result.json's mtime. Walked while a grid runs: a checkpoint's temp folder can
    be renamed away mid-walk (atomic writes), so a walk that meets one vanishing starts again."""
    while True:
        try:
            return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("result.json")}
        except FileNotFoundError:
            continue


def test_grid_resumes_after_a_kill(tiny_dir, files, tmp_path, capsys):
    from lmadapt.cli import main
    out = tmp_path / "cmp"
    args = _args(tiny_dir, files, out, "--methods", "probe,lora", "--shots", "4", "--seeds", "2", "--no-report")
    proc = subprocess.Popen([sys.executable, "-m", "lmadapt", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.time() + 120
    while not _done(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)                     # mid-grid: no chance to clean up
    proc.wait()
    before = _done(out)
    assert 1 <= len(before) < 4, f"the kill should land mid-grid, found {len(before)} finished cells"
    assert main(args) == 0                               # the same command again, here in-process
    text = capsys.readouterr().out
    after = _done(out)
    assert len(after) == 4
    assert all(after[k] == v for k, v in before.items())  # finished cells were not run again
    assert text.count("finished before, skipped") == len(before)
    assert f"grid: 4 cells, {len(before)} already finished, {4 - len(before)} to run" in text
    r = json.loads((out / "custom/lora/shots-4/seed-1/result.json").read_text())
    assert (r["method"], r["shots"], r["seed"], r["steps"]) == ("lora", 4, 1, 2)  # train's --max-steps reached it


def test_a_failed_cell_is_recorded_and_the_grid_goes_on(tiny_dir, files, tmp_path, capsys):
    from lmadapt.cli import main
    out = tmp_path / "cmp"
    # shots=100 per class cannot be drawn from 40 examples: those cells fail, and come first.
    rc = main(_args(tiny_dir, files, out, "--methods", "probe,lora", "--shots", "100,4", "--seeds", "1",
                    "--method-args", "lora:r=2"))
    text = capsys.readouterr().out
    assert rc == 1
    assert text.count("FAILED (DataError: class") == 2 and "the grid goes on" in text
    err = json.loads((out / "custom/lora/shots-100/seed-0/error.json").read_text())
    assert "cannot sample 100 per class" in err["error"] and err["cell"]["shots"] == 100
    assert "Traceback" in (out / "custom/lora/shots-100/seed-0/traceback.txt").read_text()
    assert sorted(_done(out)) == ["custom/lora/shots-4/seed-0", "custom/probe/shots-4/seed-0"]
    lora = json.loads((out / "custom/lora/shots-4/seed-0/result.json").read_text())
    assert lora["method_args"]["r"] == 2                 # --method-args lora:... reached the lora cell
    page = (out / "report.html").read_text()
    assert 'id="failed"' in page and "cannot sample 100 per class" in page
    assert "2 failed (error.json" in text and "report.html" in text
    # Other options than the grid was run with are refused (they would mix in one table).
    with pytest.raises(ValueError, match=r"other options: max_steps \(2 -> 3\)"):
        check_options(out, json.loads((out / "compare.json").read_text())["options"] | {"max_steps": 3})
    assert main(_args(tiny_dir, files, out, "--methods", "probe", "--shots", "4", "--lr", "0.5")) == 2


def test_pet_cell_in_the_grid(tiny_dir, files, tmp_path, capsys):
    from lmadapt.cli import main
    out = tmp_path / "cmp"
    rc = main(_args(tiny_dir, files, out, "--methods", "pet,probe", "--shots", "4,full", "--seeds", "1",
                    "--template", "{text} it was {mask} .", "--verbalizer", "negative=bad,positive=good",
                    "--pet-unlabeled", "8", "--no-report"))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "pet at shots=full on custom: left out (pet needs k shots, not 'full')" in text
    r = json.loads((out / "custom/pet/shots-4/seed-0/result.json").read_text())
    assert r["method"] == "pet" and r["n_train"] == 8 and r["pet"]["n_unlabeled"] == 8
    assert len(r["pet"]["members"]) == 1 and r["bytes_on_disk"] > 0 and "accuracy" in r["metrics"]["dev"]
    assert (out / "custom/probe/shots-full/seed-0/result.json").exists()


def test_shards_split_the_grid_without_overlap():
    from lmadapt.tasks import get_task
    tasks = {"sst2": get_task("sst2"), "e2e_nlg": get_task("e2e_nlg")}
    cells, notes = make_grid(tasks, ["probe", "lora", "pet"], [16, None], [0, 1, 2])
    # pet: only k-shot classification -> sst2 at 16 shots; 2 tasks x 2 shots x 3 seeds x 2 + 3
    assert len(cells) == 2 * 2 * 3 * 2 + 3 == len(set(cells)) and len(notes) == 3
    assert cells[:3] == [Cell("sst2", m, 16, 0) for m in ("probe", "lora", "pet")]  # every method first
    parts = [cells[i::3] for i in range(3)]
    assert sum(map(len, parts)) == len(cells) and set().union(*map(set, parts)) == set(cells)
    assert parse_shard("2/3") == (1, 3) and parse_shard(None) is None
    for bad in ("0/3", "4/3", "1", "a/b"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,7") == [0, 7]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("0")


def test_a_cell_as_a_command(tmp_path):
    cell = Cell("sst2", "lora", 16, 2, (("lr", 0.002),))
    folder = tmp_path / cell.path
    margs = {"lora": {"r": 8, "targets": ("q", "v")}}
    cmd = train_command(cell, folder, ["accelerate", "launch"], ["--max-steps", "5"], margs)
    assert cmd == ["accelerate", "launch", "-m", "lmadapt", "train", "--task", "sst2", "--method", "lora",
                   "--shots", "16", "--seed", "2", "--out", str(folder), "--method-args", "r=8,targets=q+v",
                   "--lr", "0.002", "--max-steps", "5"]
    (folder / "checkpoint").mkdir(parents=True)
    assert "--resume" in train_command(cell, folder, ["python"], [])
    assert "--task" not in train_command(cell, folder, ["python"], ["--train", "t.tsv"])


def test_launcher_runs_each_cell_as_its_own_process(tiny_dir, files, tmp_path, capsys):
    from lmadapt.cli import main
    out = tmp_path / "cmp"
    assert main(_args(tiny_dir, files, out, "--methods", "bitfit", "--shots", "4", "--seeds", "1", "--launcher",
                      "python", "--no-report")) == 0
    log = (out / "custom/bitfit/shots-4/seed-0/log.txt").read_text()
    assert "-m lmadapt train" in log and "--max-steps 2" in log and "--no-progress" in log
    assert json.loads((out / "custom/bitfit/shots-4/seed-0/result.json").read_text())["steps"] == 2


def test_extra_metrics_are_reported_next_to_the_main_one():
    from lmadapt.api import attach
    from lmadapt.evaluation import evaluate_examples
    tok = make_tokenizer()
    task = dataclasses.replace(TOY_GEN, extra_metrics=("rouge_l",))
    adapted = attach(make_model("llama", len(tok)), "lora", tokenizer=tok)
    m = evaluate_examples(adapted, task, task.load("dev")[:2], adapted.input_encoder(), max_new_tokens=3)
    assert set(m) == {"bleu", "rouge_l"}


def test_run_grid_runs_its_shard_and_retries_failed_cells(tmp_path):
    from lmadapt.compare import run_grid
    cells = [Cell("t", m, 4, s) for s in (0, 1) for m in ("a", "b", "c")]
    calls = []

    def run(cell, folder):
        calls.append(cell)
        if cell.method == "b" and calls.count(cell) == 1:
            raise RuntimeError("flaky")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps({"metrics": {"dev": {"accuracy": 50.0}}}))
    first = run_grid(cells, tmp_path, run, shard=(1, 2), log=lambda s: None)
    assert first["cells"] == cells[1::2] == calls                  # its share, nothing else
    assert first["failed"] == [Cell("t", "b", 4, 0)] and (tmp_path / "t/b/shots-4/seed-0/error.json").exists()
    again = run_grid(cells, tmp_path, run, shard=(1, 2), log=lambda s: None)
    assert again["ran"] == [Cell("t", "b", 4, 0)] and not again["failed"]   # only the failed one, retried
    assert not (tmp_path / "t/b/shots-4/seed-0/error.json").exists()


def test_lr_sweep_default_methods_all_construct():
    """The sweep's default method list (every registered method but those it skips) must build with
    no arguments: a method with a required argument (ipt's decoder) crashed the whole sweep."""
    import argparse
    from lmadapt.methods import METHODS
    sweep = load_bench("lr_sweep")
    lrs = sweep.lrs_of(argparse.Namespace(methods=None, lrs=None, factors="0.1,1,10"))
    assert set(lrs) == set(METHODS) - set(sweep.SKIP) and "lora" in lrs and "ipt" not in lrs
    assert lrs["lora"] == sorted({float(f"{METHODS['lora'].default_lr * f:.2g}") for f in (0.1, 1, 10)})
    with pytest.raises(SystemExit, match="ipt"):
        sweep.lrs_of(argparse.Namespace(methods="lora,ipt", lrs=None, factors="1"))


def test_lr_sweep_reuse_counts_earlier_cells_as_finished(tmp_path):
    """--reuse SWEEP_JSON: the committed copy of a sweep stands for its run folders (they do not
    survive a new machine); only with the same settings, and never over a cell's own result."""
    import argparse
    import json
    sweep = load_bench("lr_sweep")
    a = argparse.Namespace(model="smollm2-135m", task="sst2", max_train=1000, max_eval=None, max_steps=None,
                           head=None, seed=0)
    cells = [Cell("sst2", "lora", None, 0, (("lr", lr),)) for lr in (5e-4, 1.5e-3)]
    earlier = {"settings": sweep.settings_of(a),
               "results": {cells[0].path: {"best_dev": 81.0, "precision": "bf16"},
                           "sst2/bitfit/shots-full/seed-0/lr-0.001": {"best_dev": 84.0}}}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(earlier))
    out = tmp_path / "out"
    n, results = sweep.reuse(path, sweep.settings_of(a), cells, out)
    assert n == 1 and len(results) == 2              # other methods' cells are carried into the new sweep.json
    assert json.loads((out / cells[0].path / "result.json").read_text())["best_dev"] == 81.0
    assert not (out / cells[1].path).exists()        # not in the file: it runs
    calls = []
    run_grid(cells, out, lambda c, f: calls.append(c) or (f.mkdir(parents=True, exist_ok=True),
                                                        (f / "result.json").write_text('{"best_dev": 1}')),
             log=lambda s: None)
    assert calls == [cells[1]]
    assert sweep.reuse(path, sweep.settings_of(a), cells, out)[0] == 0    # a cell's own result is kept
    with pytest.raises(SystemExit, match="max_train = 1000, this sweep with 500"):
        sweep.reuse(path, sweep.settings_of(argparse.Namespace(**(vars(a) | {"max_train": 500}))), cells, out)
    path.write_text('{"winners": {}}')
    with pytest.raises(SystemExit, match="not a sweep.json"):
        sweep.reuse(path, sweep.settings_of(a), cells, out)


def test_lr_sweep_table_runs_nothing_and_writes_sweep_json(tmp_path, capsys):
    """--table: a killed sweep's finished cells become sweep.json (to commit and --reuse) without
    running (or loading) anything; a cell with no result is shown as not finished."""
    import json
    sweep = load_bench("lr_sweep")
    cell = Cell("sst2", "lora", None, 0, (("lr", 5e-4),))
    (tmp_path / cell.path).mkdir(parents=True)
    (tmp_path / cell.path / "result.json").write_text(json.dumps({"best_dev": 80.0, "precision": "fp32"}))
    assert sweep.main(["--task", "sst2", "--lrs", "lora:5e-4,1.5e-3", "--methods", "lora", "--table",
                       "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert written["results"] == {cell.path: {"best_dev": 80.0, "precision": "fp32"}}
    assert written["winners"]["lora"]["lr"] == 5e-4 and written["settings"]["task"] == "sst2"
    assert "0.0015: not run" in capsys.readouterr().out


def test_lr_sweep_shards_split_the_cells_and_each_table_covers_all(tmp_path, monkeypatch):
    """--shard i/n: two processes on one --out run disjoint cells that together are the sweep; the
    second one's sweep.json has every cell."""
    import json
    sweep = load_bench("lr_sweep")
    ran = []

    def fake_train(cell, folder, **kw):
        ran.append(cell.path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps({"best_dev": 1000 * dict(cell.extra)["lr"]}))
    monkeypatch.setattr(sweep, "train_cell", fake_train)
    argv = ["--task", "sst2", "--lrs", "lora:1e-4,3e-4,1e-3", "--methods", "lora", "--out", str(tmp_path)]
    assert sweep.main(argv + ["--shard", "1/2"]) == 0
    first = list(ran)
    assert sweep.main(argv + ["--shard", "2/2"]) == 0
    assert len(first) == 2 and len(ran) == 3 and len(set(ran)) == 3
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert len(written["results"]) == 3 and written["winners"]["lora"]["lr"] == 1e-3
    with pytest.raises(SystemExit, match="--shard"):
        sweep.main(argv + ["--shard", "3/2"])


def test_compare_cells_export_restore_round_trip_and_the_grid_skips_restored_cells(tmp_path):
    """bench/compare_cells.py: a grid's cells committed as one JSON file go back into run folders
    that `lmadapt report` reads and the same grid's rerun skips; a conflicting folder is refused."""
    from lmadapt.compare import check_options, run_grid
    from lmadapt.report import collect
    tool = load_bench("compare_cells")
    grid = tmp_path / "cmp"
    cells = [Cell("sst2", m, 16, s) for s in (0, 1) for m in ("lora", "prefix")]

    def run(cell, folder):
        folder.mkdir(parents=True, exist_ok=True)
        acc = 60.0 + 10 * (cell.method == "lora") + cell.seed
        (folder / "result.json").write_text(json.dumps(
            {"task": "sst2", "method": cell.method, "shots": 16, "seed": cell.seed,
             "metrics": {"dev": {"accuracy": acc, "n": 8}, "imdb": {"accuracy": acc - 5, "n": 8}}}))
    check_options(grid, {"max_train": 1000, "min_steps": 64})
    run_grid(cells[:2], grid, run, log=lambda s: None)
    (grid / "sst2/lora/shots-16/seed-0/pet/g0").mkdir(parents=True)          # a nested run is not a cell
    (grid / "sst2/lora/shots-16/seed-0/pet/g0/result.json").write_text('{"method": "lora"}')
    saved = tmp_path / "cells.json"
    assert tool.export([grid], saved, "the grid's command") == 2

    back = tmp_path / "elsewhere"
    assert tool.restore(saved, back) == 2 and tool.restore(saved, back) == 0   # twice: nothing rewritten
    rows = {(r["method"], r["seed"]): (r["dev"], r["ood_mean"], r["wall_seconds"] is not None)
            for r in collect(back)[0]}
    assert rows == {("lora", 0): (70.0, 65.0, True), ("prefix", 0): (60.0, 55.0, True)}
    assert json.loads((back / "compare.json").read_text()) == json.loads((grid / "compare.json").read_text())
    check_options(back, {"max_train": 1000, "min_steps": 64})                 # the same options: accepted
    with pytest.raises(ValueError, match="min_steps"):
        check_options(back, {"max_train": 1000, "min_steps": 8})
    calls = []
    run_grid(cells, back, lambda c, f: calls.append(c) or run(c, f), log=lambda s: None)
    assert calls == cells[2:]                                                 # only the new seed runs

    two = tmp_path / "two.json"                                               # several grids in one file
    assert tool.export([grid, back], two, "") == 6
    tool.restore(two, tmp_path / "all")
    assert json.loads((tmp_path / "all/elsewhere/compare.json").read_text()) == json.loads(
        (grid / "compare.json").read_text())
    assert len(collect(tmp_path / "all")[0]) == 6

    r = back / "sst2/prefix/shots-16/seed-0/result.json"
    r.write_text(r.read_text().replace("60.0", "61.0"))
    with pytest.raises(SystemExit, match="differs"):
        tool.restore(saved, back)
    saved.write_text('{"command": ""}')
    with pytest.raises(SystemExit, match="'cells' is missing"):
        tool.restore(saved, tmp_path / "x")


def test_a_grid_grows_by_methods_but_refuses_other_per_method_options(tmp_path):
    """A grid made with PET and lora:r=4 may be rerun with only some of its methods (the per-method
    entries of the runs without them are not "other options"), and a later run's new methods are
    recorded; a method's or PET's own settings that changed are refused."""
    from lmadapt.compare import check_options
    out = tmp_path / "cmp"
    out.mkdir()
    pet = {"unlabeled": 500, "method": "lora", "final_method": "lora"}
    shared = {"max_train": 1000, "min_steps": 64}
    check_options(out, shared | {"method_args": {"lora": {"r": 4}}, "pet": pet}, methods=["lora", "pet"])
    check_options(out, shared | {"method_args": {}}, methods=["probe"])                      # a subset: accepted
    check_options(out, shared | {"method_args": {"prefix": {"k": 5}}}, methods=["prefix"])  # a new method's args
    saved = json.loads((out / "compare.json").read_text())["options"]
    assert saved["method_args"] == {"lora": {"r": 4}, "pet": {}, "probe": {}, "prefix": {"k": 5}}
    assert saved["pet"] == pet
    with pytest.raises(ValueError, match=r"method_args of lora \(\{'r': 4\} -> \{\}\)"):
        check_options(out, shared | {"method_args": {}}, methods=["lora"])                 # lora without its r=4
    with pytest.raises(ValueError, match=r"method_args of prefix"):
        check_options(out, shared | {"method_args": {"prefix": {"k": 8}}}, methods=["prefix"])
    # A method first run with its defaults keeps them: its cells exist, so new args are refused.
    check_options(out, shared | {"method_args": {}}, methods=["adapter"])
    with pytest.raises(ValueError, match=r"method_args of adapter \(\{\} -> \{'bottleneck': 8\}\)"):
        check_options(out, shared | {"method_args": {"adapter": {"bottleneck": 8}}}, methods=["adapter"])
    with pytest.raises(ValueError, match=r"pet \("):
        check_options(out, shared | {"method_args": {}, "pet": pet | {"unlabeled": 8}}, methods=["pet"])
    with pytest.raises(ValueError, match=r"min_steps \(64 -> 8\)"):
        check_options(out, {"max_train": 1000, "min_steps": 8, "method_args": {}}, methods=["probe"])
    # Without `methods` (a caller that does not say which), every entry is compared as before.
    with pytest.raises(ValueError, match=r"pet \("):
        check_options(out, shared | {"method_args": {"lora": {"r": 4}, "prefix": {"k": 5}}})
