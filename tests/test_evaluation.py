"""Evaluation paths a user hits: out-of-domain metrics in result.json, preference (log-likelihood)
scoring against a hand computation, and the probe's feature pass counted in its training time."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import TOY_CLS, make_model, make_tokenizer

import lmadapt
from lmadapt.batching import Encoder
from lmadapt.data import Example
from lmadapt.evaluation import sequence_logprobs
from lmadapt.tasks import Task

IMDB_ROWS = [("the movie was good and fun", 1), ("awful boring plot", 0), ("a great story with a fine actor", 1),
             ("not good , really bad", 0), ("it was fun", 1), ("the plot was too boring", 0), ("very bad film", 0)]


def write_imdb(root):
    """A data root holding only imdb/dev.jsonl. This IMDB copy stores '0' for positive (the loader
    flips it), so the file holds 1 - label."""
    (root / "imdb").mkdir(parents=True)
    (root / "imdb" / "dev.jsonl").write_text(
        "".join(json.dumps({"ori": t, "label": str(1 - y)}) + "\n" for t, y in IMDB_ROWS))
    return root


def accuracy_by_hand(adapted, tok, rows):
    with torch.no_grad():
        preds = [int(adapted(**tok([t], return_tensors="pt")).logits.argmax(-1)) for t, _ in rows]
    return 100.0 * sum(p == y for p, (_, y) in zip(preds, rows)) / len(rows)


@pytest.mark.parametrize("how", ["task_ood", "ood_argument"])
def test_out_of_domain_metrics_in_result_json(tmp_path, how):
    root = write_imdb(tmp_path / "data")
    tok = make_tokenizer()
    task = dataclasses.replace(TOY_CLS, ood=("imdb",)) if how == "task_ood" else TOY_CLS
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=task, tokenizer=tok, init_seed=0)
    lmadapt.train(a, task, max_steps=4, batch_size=8, lr=2e-2, progress=False, out=tmp_path / "run",
                  data_root=root, **({"ood": ["imdb"]} if how == "ood_argument" else {}))
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(r["metrics"]) == {"dev", "imdb"}
    assert r["metrics"]["imdb"]["n"] == len(IMDB_ROWS)
    # the restored (best) model's own predictions on those rows, one at a time
    assert r["metrics"]["imdb"]["accuracy"] == pytest.approx(accuracy_by_hand(a, tok, IMDB_ROWS))
    assert r["metrics"]["dev"]["accuracy"] == pytest.approx(accuracy_by_hand(
        a, tok, [(e.text, e.label) for e in TOY_CLS.load("dev")]))


# --- preference ------------------------------------------------------------------------------------
PREF = Task(name="pref", kind="preference", metric="preference_accuracy", prompt="{text} :",
            splits={"dev": lambda root: []}, uses_data_root=False)
PAIRS = [("the movie", "was good", "was very bad"), ("the cafe", "is cheap", "is not"), ("it", "was fun", "the plot")]


def logprob_by_hand(adapted, tok, prompt: str, response: str) -> float:
    """sum_t log p(response token t | prompt, response tokens < t), eos included, one example alone."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(" " + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = F.log_softmax(adapted(ids).logits[0].double(), -1)            # (T, V)
    return sum(float(logp[len(p) - 1 + t, tok_id]) for t, tok_id in enumerate(r))


def test_preference_scoring_is_the_response_log_likelihood():
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("gpt2", len(tok)), "lora", tokenizer=tok).eval()
    # each pair both ways round: exactly one of the two is won, so the accuracy is exactly 50
    examples = [Example(text=t, target=c, rejected=r) for t, c, r in PAIRS] + \
               [Example(text=t, target=r, rejected=c) for t, c, r in PAIRS]
    enc = Encoder(tok, causal=True)
    chosen = sequence_logprobs(a, PREF, examples, enc, "target", batch_size=4)   # batched, left-padded
    rejected = sequence_logprobs(a, PREF, examples, enc, "rejected", batch_size=4)
    want_c = [logprob_by_hand(a, tok, PREF.format(e), e.target) for e in examples]
    want_r = [logprob_by_hand(a, tok, PREF.format(e), e.rejected) for e in examples]
    assert chosen == pytest.approx(want_c, abs=1e-4) and rejected == pytest.approx(want_r, abs=1e-4)
    assert all(c < -1 for c in chosen)                                          # several tokens' worth
    wins = [c > r for c, r in zip(want_c, want_r)]
    assert lmadapt.predict(a, PREF, examples) == wins
    assert lmadapt.evaluate(a, PREF, examples=examples) == {"preference_accuracy": 50.0, "n": 6, "n_available": 6}


# --- timings ---------------------------------------------------------------------------------------
def test_probe_train_seconds_include_the_feature_pass(monkeypatch):
    """The probe's backbone pass is part of its training cost: a feature pass made to take >= 1 s
    must show in train_seconds (2 head steps on cached features take milliseconds)."""
    import lmadapt.trainer as trainer
    real, calls = trainer.extract_features, []

    def slow(*args, **kw):
        calls.append(1)
        time.sleep(0.5)
        return real(*args, **kw)
    monkeypatch.setattr(trainer, "extract_features", slow)
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "probe", task=TOY_CLS, tokenizer=tok)
    r = lmadapt.train(a, TOY_CLS, max_steps=2, batch_size=8, progress=False)
    assert len(calls) == 2                                                   # train and dev features
    assert r["train_seconds"] >= 1.0
    assert r["examples_per_second"] == pytest.approx(16 / r["train_seconds"])
