"""Evaluation a user can wait for: --max-eval caps every dev evaluation (the final one too),
--max-ood caps each out-of-domain set, result.json says how many examples each figure used, and
long passes show progress in examples/s."""
import json

import pytest
import lmadapt
import lmadapt.evaluation as evaluation
from lmadapt.cli import main
from lmadapt.data import Example, parse_cap, subsample
from lmadapt.tasks import Task
from conftest import TOY_CLS, TOY_GEN, _toy_examples, make_model, make_tokenizer

OOD = Task(name="toy_ood", kind="classification", label_names=("negative", "positive"), metric="accuracy",
           splits={"train": lambda root: _toy_examples(8, 5), "dev": lambda root: _toy_examples(40, 7)},
           uses_data_root=False, description="toy out-of-domain")


@pytest.fixture
def counted(monkeypatch):
    """Records the size of every batch of examples handed to prediction."""
    sizes, real = [], evaluation.predict_examples

    def spy(adapted, task, examples, *a, **kw):
        sizes.append((task.name, len(examples)))
        return real(adapted, task, examples, *a, **kw)
    monkeypatch.setattr(evaluation, "predict_examples", spy)
    return sizes


def test_subsample_and_parse_cap():
    exs = [Example(text=str(i), label=i % 2) for i in range(50)]
    a, b = subsample(exs, 10), subsample(exs, 10)
    assert [e.text for e in a] == [e.text for e in b] and len(a) == 10
    assert [int(e.text) for e in a] == sorted(int(e.text) for e in a)   # file order kept
    assert [e.text for e in a] != [str(i) for i in range(10)]           # not simply the first 10
    assert subsample(exs, None) == exs and subsample(exs, 80) == exs
    assert parse_cap("all", "--max-ood") is None and parse_cap("7", "--max-ood") == 7
    with pytest.raises(ValueError, match="--max-ood must be a positive integer or 'all', got '0'"):
        parse_cap("0", "--max-ood")


def test_max_eval_caps_every_dev_evaluation_and_max_ood(counted):
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok, init_seed=0)
    r = lmadapt.train(a, TOY_CLS, max_steps=4, eval_every=2, batch_size=8, progress=False, max_eval=5, ood=[])
    assert r["metrics"]["dev"]["n"] == 5 and r["metrics"]["dev"]["n_available"] == 32
    assert counted and all(n == 5 for name, n in counted if name == "toy")   # the final one too
    counted.clear()
    import lmadapt.api as api
    api_task = api._task
    try:  # an OOD task object by name: register it the way tasks are looked up
        api._task = lambda t: OOD if t == "toy_ood" else api_task(t)
        r = lmadapt.train(a, TOY_CLS, max_steps=2, batch_size=8, progress=False, ood=["toy_ood"], max_ood=7)
    finally:
        api._task = api_task
    assert r["metrics"]["toy_ood"]["n"] == 7 and r["metrics"]["toy_ood"]["n_available"] == 40
    assert ("toy_ood", 7) in counted and ("toy", 32) in counted               # no cap on dev: all of it


def test_generation_max_eval_decodes_only_that_many(counted):
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("gpt2", len(tok)), "prefix", tokenizer=tok, init_seed=0)
    r = lmadapt.train(a, TOY_GEN, max_steps=1, batch_size=4, progress=False, max_eval=2, max_new_tokens=3)
    assert counted == [("toygen", 2)] and r["metrics"]["dev"]["n"] == 2


def test_length_sorted_batches_keep_order():
    """Predictions come back in the caller's order although batches are formed by length."""
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok, init_seed=0).eval()
    texts = ["good", "the movie was very good and fun", "bad plot", "it was awful and boring and bad"] * 3
    exs = [Example(text=t) for t in texts]
    batched = lmadapt.predict(a, TOY_CLS, exs, batch_size=3)
    alone = [lmadapt.predict(a, TOY_CLS, [e], batch_size=1)[0] for e in exs]
    assert batched == alone
    # The reordering itself, with a result that identifies each input:
    feats = [{"input_ids": list(range(n))} for n in (3, 9, 1, 5, 7, 2, 8)]
    got = evaluation._run_batches(feats, 3, lambda fs: [len(f["input_ids"]) for f in fs], "x", False)
    assert got == [3, 9, 1, 5, 7, 2, 8]
    assert [len(b) for b in evaluation.by_length(feats, 3)] == [3, 3, 1]
    assert [[len(feats[i]["input_ids"]) for i in b] for b in evaluation.by_length(feats, 3)][0] == [9, 8, 7]


def test_progress_bars(capsys):
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok, init_seed=0)
    lmadapt.evaluate(a, TOY_CLS, progress=True)
    err = capsys.readouterr().err
    assert "eval toy" in err and "ex/s" in err
    lmadapt.evaluate(a, TOY_CLS, progress=False)
    assert capsys.readouterr().err == ""



def test_cli_max_eval_max_ood_and_no_progress(tmp_path, tiny_dir, capsys):
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in _toy_examples(40)))
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_dir), "--train", str(p), "--dev", str(p), "--text-col", "sentence",
                 "--label-col", "label", "--method", "probe", "--max-eval", "9", "--out", str(out), "--no-progress"])
    assert code == 0
    res = json.loads((out / "result.json").read_text())
    assert res["metrics"]["dev"] == res["metrics"]["dev"] | {"n": 9, "n_available": 40}
    assert res["precision"] == "fp32" and res["precision_requested"] == "auto"
    err = capsys.readouterr().err
    assert "ex/s" not in err and "it/s" not in err  # --no-progress: no bar at all
    code = main(["eval", "--run", str(out), "--train", str(p), "--dev", str(p), "--text-col", "sentence",
                 "--label-col", "label", "--max-eval", "6", "--no-progress"])
    assert code == 0 and json.loads(capsys.readouterr().out)["n"] == 6
    code = main(["train", "--model", str(tiny_dir), "--train", str(p), "--dev", str(p), "--text-col", "sentence",
                 "--label-col", "label", "--max-ood", "zero", "--out", str(tmp_path / "r2")])
    assert code == 2 and "--max-ood must be a positive integer or 'all'" in capsys.readouterr().err
