"""The CLI commands beyond `train`'s happy path, run in process through `main()`: `eval` (own files
and a named task), `tasks`, `methods`, `--shots` through `train`, and exit status 2 with one line
naming the file for bad input to `train`, `eval` and `predict` (header-only files, wrong field
counts, undecodable bytes, missing runs)."""
from __future__ import annotations

import json
import re

import pytest
from conftest import _toy_examples, make_model, make_tokenizer

import lmadapt
from lmadapt.cli import main
from lmadapt.methods import METHODS
from lmadapt.tasks import TASKS



def write_tsv(path, examples):
    path.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{'pos' if e.label else 'neg'}\n" for e in examples))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return write_tsv(d / "train.tsv", _toy_examples(64, 0)), write_tsv(d / "dev.tsv", _toy_examples(24, 5))


def own_files(train, dev):
    return ("--train", str(train), "--dev", str(dev), "--text-col", "sentence", "--label-col", "label")


@pytest.fixture(scope="module")
def run(tiny_dir, files, tmp_path_factory):
    """A LoRA run trained on train.tsv, best checkpoint chosen on dev.tsv."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    code = main(["train", "--model", str(tiny_dir), *own_files(*files), "--method", "lora", "--max-steps", "4",
                 "--lr", "0.02", "--eval-every", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def usage_error(capsys, *argv) -> str:
    """Runs the CLI; it must exit 2 with one line `lmadapt: error: ...` and no traceback. (eval and
    predict load the run's model first, so transformers' loading bar may come before it.)"""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert lines[-1].startswith("lmadapt: error: ") and err.endswith("\n") and "Traceback" not in err, err
    assert sum("lmadapt: error" in ln for ln in lines) == 1, err
    return lines[-1]


# --- eval ------------------------------------------------------------------------------------------
def test_eval_on_own_files_matches_the_runs_dev_metrics(run, files, capsys):
    train, dev = files
    capsys.readouterr()
    assert main(["eval", "--run", str(run), *own_files(train, dev)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval-custom-dev.json").read_text())
    result = json.loads((run / "result.json").read_text())
    assert printed == saved
    assert printed["split"] == "dev" and printed["n"] == 24
    assert printed["accuracy"] == result["metrics"]["dev"]["accuracy"]      # the same best weights, same file
    # the artifact folder itself works too, and --split train evaluates the train file
    assert main(["eval", "--run", str(run / "best"), *own_files(train, dev), "--split", "train"]) == 0
    on_train = json.loads(capsys.readouterr().out)
    assert on_train["n"] == 64
    adapted = lmadapt.load_adapted(run / "best")
    task = lmadapt.tasks.task_from_files(train, dev, "sentence", "label")
    assert on_train["accuracy"] == lmadapt.evaluate(adapted, task, split="train")["accuracy"]


def test_eval_on_a_named_task(run, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "imdb").mkdir(parents=True)
    rows = [("the movie was good and fun", "0"), ("awful boring plot", "1"), ("a great story", "0")]
    (root / "imdb" / "dev.jsonl").write_text("".join(json.dumps({"ori": t, "label": y}) + "\n" for t, y in rows))
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--task", "imdb", "--data-root", str(root)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["task"], got["split"], got["n"]) == ("imdb", "dev", 3)
    assert json.loads((run / "eval-imdb-dev.json").read_text()) == got


def test_eval_bad_input_exits_2(run, files, tmp_path, capsys):
    train, _ = files
    header_only = tmp_path / "h.tsv"
    header_only.write_text("sentence\tlabel\n")
    err = usage_error(capsys, "eval", "--run", str(run), *own_files(train, header_only))
    assert "h.tsv: has no data rows" in err
    err = usage_error(capsys, "eval", "--run", str(tmp_path / "nope"), "--task", "sst2")
    assert "nope" in err
    err = usage_error(capsys, "eval", "--run", str(run))
    assert "give --task NAME" in err
    root = tmp_path / "data"                                                  # 3 labels, the head has 2
    (root / "mnli_subset").mkdir(parents=True)
    (root / "mnli_subset" / "heldout.jsonl").write_text(
        json.dumps({"text_a": "a cat", "text_b": "a dog", "label": "neutral"}) + "\n")
    err = usage_error(capsys, "eval", "--run", str(run), "--task", "mnli", "--data-root", str(root))
    assert "task 'mnli' has 3 labels but the model's head has 2" in err


# --- predict -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,message", [
    ("h.tsv", b"text\n", "h.tsv: has no data rows"),
    ("f.tsv", b"text\nfine\nbad\textra\n", "f.tsv line 3: expected 1 fields (text), got 2"),
    ("c.tsv", b"sentence\nfine\n", "c.tsv line 1: missing column 'text'"),
    ("u.tsv", b"text\ngood \xff movie\n", "u.tsv: is not UTF-8 text (bad byte at offset 10)"),
    ("u.txt", b"good \xff movie\n", "u.txt: is not UTF-8 text (bad byte at offset 5)"),
    ("e.txt", b"\n  \n", "e.txt: empty file"),
])
def test_predict_bad_input_exits_2(run, tmp_path, capsys, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    assert message in usage_error(capsys, "predict", "--run", str(run), "--input", str(p))


def test_predict_labels_from_a_tsv(run, tmp_path, capsys):
    p = tmp_path / "in.tsv"
    p.write_text("text\nthe movie was good\nawful boring plot\nfun\n")
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--input", str(p)]) == 0
    out = capsys.readouterr().out.split()
    adapted = lmadapt.load_adapted(run / "best")
    tok = adapted.tokenizer
    want = [adapted.label_names[int(adapted(**tok([t], return_tensors="pt")).logits.argmax(-1))]
            for t in ("the movie was good", "awful boring plot", "fun")]
    assert out == want and set(out) <= {"neg", "pos"}


# --- train: bad files, --shots ---------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    (b"sentence\tlabel\n", "bad.tsv: has no data rows"),
    (b"sentence\tlabel\ngood\tpos\nbad\tneg\tx\n", "bad.tsv line 3: expected 2 fields (sentence, label), got 3"),
    (b"sentence\tlabel\ngood\tpos\nb\xe9d\tneg\n", "bad.tsv: is not UTF-8 text (bad byte at offset 25)"),
])
def test_train_bad_file_exits_2(tiny_dir, files, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(content)
    for train, dev in ((bad, files[1]), (files[0], bad)):
        err = usage_error(capsys, "train", "--model", str(tiny_dir), *own_files(train, dev), "--out",
                          str(tmp_path / "o"), "--no-progress")
        assert message in err
    assert not (tmp_path / "o").exists()


def test_shots_through_train(tiny_dir, files, tmp_path):
    out = tmp_path / "k"
    assert main(["train", "--model", str(tiny_dir), *own_files(*files), "--method", "probe", "--shots", "4",
                 "--max-steps", "2", "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "result.json").read_text())
    assert (r["shots"], r["n_train"], r["seed"]) == (4, 8, 1)                  # 4 per class, 2 classes
    assert r["metrics"]["dev"]["n"] == 24


def test_bad_shots_exits_2(tiny_dir, files, tmp_path, capsys):
    err = usage_error(capsys, "train", "--model", str(tiny_dir), *own_files(*files), "--shots", "many",
                      "--out", str(tmp_path / "o"))
    assert "positive integer or 'full'" in err
    err = usage_error(capsys, "train", "--model", str(tiny_dir), *own_files(*files), "--shots", "40",
                      "--out", str(tmp_path / "o"))
    assert "cannot sample 40 per class" in err


# --- tasks, methods --------------------------------------------------------------------------------
def table(text: str) -> list[list[str]]:
    """Rows of a printed table (columns are separated by 2+ spaces), header and rule dropped."""
    lines = text.strip("\n").splitlines()
    assert set(lines[1].replace(" ", "")) == {"-"}
    return [re.split(r"\s{2,}", ln.strip()) for ln in lines[2:]]


def test_tasks_lists_every_task(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert re.split(r"\s{2,}", out.splitlines()[0].strip()) == ["task", "kind", "labels", "metric", "splits"]
    rows = {r[0]: r for r in table(out)}
    assert list(rows) == list(TASKS)
    assert rows["sst2"] == ["sst2", "classification", "negative, positive", "accuracy", "train, dev, test"]
    assert rows["hh_rlhf"][1:] == ["preference", "-", "preference_accuracy", "train, dev"]
    assert rows["e2e_nlg"][1] == "generation" and rows["e2e_nlg"][3] == "bleu"


def test_methods_lists_every_method_with_its_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    rows = {r[0]: r for r in table(out)}
    assert sorted(rows) == sorted(METHODS)
    for name, cls in METHODS.items():
        row = rows[name]
        assert row[1] == cls.summary
        gen = f"{cls.generation_lr:g}" if cls.generation_lr is not None else "-"
        assert row[-4:] == ["yes" if cls.supports_slots else "no", f"{cls.default_lr:g}", gen, f"{cls.default_epochs:g}"]
    assert rows["lora"][2] == "r=4, alpha=8.0, dropout=0.0, targets=()"
    assert rows["full"][2] == "-" and rows["full"][-4] == "no"
    assert rows["probe"][-1] == "30"
