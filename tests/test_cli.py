"""The CLI: malformed input gives one line naming file, line and field, and exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmadapt.cli import main, parse_method_args
from conftest import REPO, _toy_examples, make_model, make_tokenizer, subprocess_env

BIN = Path(sys.executable).parent



def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("lmadapt: error: "), err  # one line, no traceback
    return code, err


def _train_file(tiny_dir, path, *cols, extra=()):
    cols = cols or ("--text-col", "sentence", "--label-col", "label")
    return ("train", "--model", str(tiny_dir), "--train", str(path), "--dev", str(path), *cols,
            "--out", str(path.parent / "out"), "--no-progress", *extra)


def test_bad_label_in_task_file(tmp_path, capsys, tiny_dir):
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    (root / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood film \t1\nbad film \tpos\n")
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\ngood film \t1\n")
    code, err = _run(capsys, "train", "--model", str(tiny_dir), "--task", "sst2", "--data-root", str(root),
                     "--out", str(tmp_path / "o"))
    assert code == 2
    assert "sst2/train.tsv line 3: label 'pos' is not one of 0, 1" in err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_missing_column(tmp_path, capsys, tiny_dir):
    p = tmp_path / "mine.tsv"
    p.write_text("text\tgold\nhello\t1\n")
    code, err = _run(capsys, *_train_file(tiny_dir, p))
    assert code == 2 and "mine.tsv line 1: missing column 'sentence'" in err


def test_truncated_json_line(tmp_path, capsys, tiny_dir):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n{"sentence": "meh", "lab\n')
    code, err = _run(capsys, *_train_file(tiny_dir, p))
    assert code == 2 and "mine.jsonl line 3: invalid JSON" in err


def test_empty_file(tmp_path, capsys, tiny_dir):
    p = tmp_path / "empty.csv"
    p.write_text("")
    code, err = _run(capsys, *_train_file(tiny_dir, p))
    assert code == 2 and "empty.csv" in err and "empty" in err.split("empty.csv", 1)[1]


def test_path_does_not_exist(tmp_path, capsys, tiny_dir):
    code, err = _run(capsys, *_train_file(tiny_dir, tmp_path / "nope.tsv"))
    assert code == 2 and "nope.tsv" in err and "does not exist" in err


def test_unknown_names(tmp_path, capsys, tiny_dir):
    code, err = _run(capsys, "train", "--task", "sst3", "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown task 'sst3'; choose one of:" in err and "sst2" in err
    code, err = _run(capsys, "train", "--model", "gpt9", "--task", "sst2", "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown model 'gpt9'; choose one of: smollm2-135m, minilm-l6" in err
    code, err = _run(capsys, "train", "--model", str(tiny_dir), "--task", "sst2", "--method", "lora2",
                     "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown method 'lora2'; choose one of:" in err


def test_bad_method_args_and_out(tmp_path, capsys, tiny_dir):
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    code, err = _run(capsys, *_train_file(tiny_dir, p, extra=("--method", "lora", "--method-args", "r=abc")))
    assert code == 2 and "method 'lora': r must be int, got 'abc'" in err
    code, err = _run(capsys, *_train_file(tiny_dir, p, extra=("--method", "adapter", "--method-args", "bottleneck=2.5")))
    assert code == 2 and "bottleneck must be int, got 2.5" in err
    (tmp_path / "afile").write_text("x")
    code, err = _run(capsys, "train", "--model", str(tiny_dir), "--train", str(p), "--dev", str(p), "--text-col",
                     "sentence", "--label-col", "label", "--out", str(tmp_path / "afile"))
    assert code == 2 and "afile: exists and is not a folder" in err
    code, err = _run(capsys, "train", "--model", str(tiny_dir), "--train", str(p), "--text-col", "sentence",
                     "--label-col", "label", "--out", str(tmp_path / "o"))
    assert code == 2 and "--train needs --dev" in err


def test_method_args_parsing():
    assert parse_method_args("r=8,alpha=16.5,targets=q_proj+v_proj,reparam=false") == {
        "r": 8, "alpha": 16.5, "targets": ("q_proj", "v_proj"), "reparam": False}
    with pytest.raises(ValueError, match="not key=value"):
        parse_method_args("r8")


def test_train_eval_predict_end_to_end(tmp_path, tiny_dir):
    """Real processes: exit codes, result.json, eval on another file, predict from a text file."""
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{'pos' if e.label else 'neg'}\n" for e in _toy_examples(32)))
    out = tmp_path / "run"
    r = subprocess.run([str(BIN / "lmadapt"), "train", "--model", str(tiny_dir), "--train", str(p), "--dev", str(p),
                        "--text-col", "sentence", "--label-col", "label", "--method", "probe", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == "probe" and res["metrics"]["dev"]["n"] == 32
    inp = tmp_path / "in.txt"
    inp.write_text("the movie was good\nawful boring plot\n")
    r = subprocess.run([str(BIN / "lmadapt"), "predict", "--run", str(out), "--input", str(inp)],
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert all(line in ("neg", "pos") for line in r.stdout.split()) and len(r.stdout.split()) == 2
    r = subprocess.run([str(BIN / "lmadapt"), "predict", "--run", str(out), "--input", str(tmp_path / "missing.txt")],
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and "missing.txt: does not exist" in r.stderr


def test_subprocesses_import_this_checkout():
    """The CLI tests run `lmadapt` in subprocesses: they must exercise this checkout's code, not
    whichever checkout is pip-installed into the environment."""
    r = subprocess.run([str(BIN / "python"), "-c", "import lmadapt; print(lmadapt.__file__)"],
                       capture_output=True, text=True, env=subprocess_env(), cwd="/")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == REPO / "lmadapt" / "__init__.py"
