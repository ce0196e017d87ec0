"""In-context learning (lmadapt/prompting/icl.py, embed.py): kNN picks the nearest demonstrations
by a hand-made embedding and puts the nearest last; balanced draws equal labels from a skewed pool;
seeds reproduce and differ; k = 0 gives exactly the zero-shot verbalizer head's scores; the prompt
is the demonstrations' text + the query as the head encodes it; over the window the prompt is
refused or k reduced with a warning, and always fits; pool embeddings are cached by content and
model; `lmadapt icl` is a thin command over it."""
import json
import math
import warnings

import pytest
import torch

import lmadapt
from lmadapt import LmadaptWarning
from lmadapt.cli import main
from lmadapt.data import Example
from lmadapt.prompting.embed import embeddings
from lmadapt.prompting.ensemble import member_scores
from lmadapt.prompting.icl import (IclConfig, choose, demonstration, fit_prompts, kept_demonstrations, run_icl,
                                   run_seed)
from lmadapt.tasks import Task
from toy_prompts import TOY_PVP, causal

# pool words (all in the tiny vocabulary) at angles 0, 10, 20, ... degrees; queries at their own angle
POOL_WORDS = ["cat", "dog", "table", "food", "price", "area", "pub", "cafe", "cheap", "high"]
ANGLE = {w: 10.0 * i for i, w in enumerate(POOL_WORDS)} | {"near": 42.0, "low": 78.0}


class HandEmbedder:
    """A text's vector: the unit vector at its first word's angle (cosine = cos of the angle gap)."""
    fingerprint = None

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        rad = torch.tensor([math.radians(ANGLE[t.split()[0]]) for t in texts])
        return torch.stack([rad.cos(), rad.sin()], 1)


def sims_of(queries, pool):
    e = HandEmbedder()
    return e([q.text for q in queries]) @ e([p.text for p in pool]).T


POOL = [Example(w, label=i % 2) for i, w in enumerate(POOL_WORDS)]
QUERIES = [Example("near", label=0), Example("low", label=1)]
HAND = Task(name="hand", kind="classification", label_names=("negative", "positive"), metric="accuracy",
            splits={"train": lambda root: list(POOL), "dev": lambda root: list(QUERIES)}, uses_data_root=False,
            pvps=(("{text} it was {mask} .", "negative=bad,positive=good"),))


def test_knn_returns_the_nearest_and_similar_last_puts_the_nearest_last():
    # near = 42 deg: nearest 40 (price), 50 (area), 30 (food); low = 78 deg: 80 (cheap), 70 (cafe), 90 (high)
    cfg = IclConfig(k=3, select="knn", order="similar-last", seeds=(0,), pool=None)
    got = choose(POOL, 2, cfg, 0, sims_of(QUERIES, POOL))
    assert [[POOL_WORDS[i] for i in row] for row in got] == [["food", "area", "price"], ["high", "cafe", "cheap"]]
    # random order: the same three, shuffled
    shuffled = choose(POOL, 2, IclConfig(k=3, select="knn", order="random", seeds=(0,)), 0, sims_of(QUERIES, POOL))
    assert [sorted(r) for r in shuffled] == [sorted(r) for r in got]


def test_knn_through_run_icl_uses_the_embedder_and_renders_nearest_last():
    model, tok = causal()
    adapted = lmadapt.attach(model, "none", task=HAND, tokenizer=tok, head="verbalizer")
    emb = HandEmbedder()
    res = run_icl(adapted, HAND, IclConfig(k=2, select="knn", order="similar-last", seeds=(0,), pool=None),
                  embedder=emb, cache_dir=None)
    # demonstrations: area (50 deg, label 1 -> good), then price (40 deg, label 0 -> bad), then the query
    assert res["per_seed"][0]["first_prompt"] == "area it was good price it was bad near it was"
    assert emb.calls == 2   # the pool once, the queries once


def test_balanced_has_equal_labels_from_a_skewed_pool():
    pool = [Example(f"x{i}", label=0 if i < 30 else 1) for i in range(40)]          # 30 vs 10
    for seed in range(6):
        for k, want in ((4, [2, 2]), (8, [4, 4])):
            row = choose(pool, 3, IclConfig(k=k, select="balanced", seeds=(seed,)), seed, num_labels=2)
            assert all(r == row[0] for r in row)                                      # one set per seed
            assert [sum(pool[i].label == c for i in row[0]) for c in (0, 1)] == want
    three = [Example(f"x{i}", label=i % 3) for i in range(30)]
    row = choose(three, 1, IclConfig(k=6, select="balanced"), 0, num_labels=3)[0]
    assert sorted(three[i].label for i in row) == [0, 0, 1, 1, 2, 2]
    odd = [sorted(three[i].label for i in choose(three, 1, IclConfig(k=4, select="balanced"), s, num_labels=3)[0])
           for s in range(10)]
    assert all(max(r.count(c) for c in range(3)) - min(r.count(c) for c in range(3)) == 1 for r in odd)
    with pytest.raises(ValueError, match="needs 4 demonstrations of label 1 but the pool has 3"):
        choose(pool[20:33], 1, IclConfig(k=8, select="balanced"), 0, num_labels=2)


def test_seeds_reproduce_and_differ():
    pool = [Example(f"x{i}", label=i % 2) for i in range(50)]
    draw = lambda s, how="random": choose(pool, 2, IclConfig(k=4, select=how, seeds=(s,)), s, num_labels=2)  # noqa: E731
    assert draw(3) == draw(3) and draw(3, "balanced") == draw(3, "balanced")
    assert len({tuple(draw(s)[0]) for s in range(5)}) == 5
    model, tok = causal()
    adapted = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, head="verbalizer")
    cfg = IclConfig(k=3, seeds=(0, 1), pool=20)
    a, b = (run_icl(adapted, TOY_PVP, cfg, limit=8, cache_dir=None) for _ in range(2))
    assert [r["first_prompt"] for r in a["per_seed"]] == [r["first_prompt"] for r in b["per_seed"]]
    assert a["per_seed"][0]["first_prompt"] != a["per_seed"][1]["first_prompt"]
    s = a["summary"]["accuracy"]
    values = [r["metrics"]["accuracy"] for r in a["per_seed"]]
    assert (s["min"], s["max"], s["n_seeds"]) == (min(values), max(values), 2)
    assert s["mean"] == pytest.approx(sum(values) / 2) and s["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)


def test_k0_is_the_zero_shot_head_and_the_prompt_is_demonstrations_then_the_query():
    model, tok = causal()
    adapted = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, head="verbalizer")
    train, queries = TOY_PVP.load("train"), TOY_PVP.load("dev")[:6]
    zero = run_seed(adapted, TOY_PVP, train, queries, IclConfig(k=0, seeds=(0,)), 0)
    torch.testing.assert_close(zero["scores"], member_scores(adapted, queries), atol=1e-5, rtol=1e-5)
    assert demonstration(TOY_PVP, Example("the movie was fun", label=1), adapted.head) == "the movie was fun it was good"
    # k = 2: the scores are the head's on "demo 1 <sep> demo 2 <sep> query", read after the last token
    r = run_seed(adapted, TOY_PVP, train, queries[:1], IclConfig(k=2, seeds=(0,), pool=10), 0)
    prompt = r["first_prompt"]
    assert prompt.endswith(queries[0].text + " it was") and prompt.count(" it was ") == 2
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    words = [tok(" bad", add_special_tokens=False)["input_ids"][0], tok(" good", add_special_tokens=False)["input_ids"][0]]
    torch.testing.assert_close(r["scores"][0], logp[words], atol=1e-5, rtol=1e-5)


def test_over_the_window_k_is_reduced_with_a_warning_or_refused():
    assert kept_demonstrations([5, 5, 5], 4, 15) == 2 and kept_demonstrations([5, 5, 5], 4, 100) == 3
    with pytest.warns(LmadaptWarning, match=r"k reduced from 3 .* for 1 of 2 queries \(down to 2"):
        prompts, kept = fit_prompts([[[1] * 5, [2] * 5, [3] * 5]] * 2, [[9] * 4, [9] * 10], 20, "test", 3, "reduce")
    assert kept == [3, 2] and prompts[1] == [2] * 5 + [3] * 5 + [9] * 10    # the first (farthest) one goes
    with pytest.raises(ValueError, match=r"query 1's prompt with 3 demonstrations is 25 tokens, over the window of 20"):
        fit_prompts([[[1] * 5, [2] * 5, [3] * 5]] * 2, [[9] * 4, [9] * 10], 20, "test", 3, "error")
    model, tok = causal()
    adapted = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, head="verbalizer")
    cfg = IclConfig(k=8, seeds=(0,), pool=20, max_length=40)
    with pytest.warns(LmadaptWarning, match="k reduced from 8"):
        res = run_icl(adapted, TOY_PVP, cfg, limit=4, cache_dir=None)
    seed = res["per_seed"][0]
    assert seed["prompt_tokens"]["max"] <= 40 and 0 < seed["demonstrations_used"]["mean"] < 8
    with pytest.raises(ValueError, match="over the window of 40"):
        run_icl(adapted, TOY_PVP, IclConfig(k=8, seeds=(0,), pool=20, max_length=40, overflow="error"),
                limit=4, cache_dir=None)
    with warnings.catch_warnings():   # the model's own window (256 positions) holds 8 toy demonstrations
        warnings.simplefilter("error", LmadaptWarning)
        assert run_icl(adapted, TOY_PVP, IclConfig(k=8, seeds=(0,), pool=20), limit=4,
                       cache_dir=None)["per_seed"][0]["demonstrations_used"]["mean"] == 8


def test_pool_embeddings_are_cached_by_content_and_model(tmp_path):
    class Counting(HandEmbedder):
        fingerprint = "hand-v1"
    e = Counting()
    first = embeddings(e, ["cat", "dog"], tmp_path)
    again = embeddings(e, ["cat", "dog"], tmp_path)
    assert e.calls == 1 and torch.equal(first, again) and len(list(tmp_path.glob("*.safetensors"))) == 1
    embeddings(e, ["cat", "table"], tmp_path)
    assert e.calls == 2
    other = Counting()
    other.fingerprint = "hand-v2"
    embeddings(other, ["cat", "dog"], tmp_path)
    assert other.calls == 1 and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_generation_demonstrations_are_prompt_and_target(toy_gen):
    model, tok = causal()
    adapted = lmadapt.attach(model, "none", tokenizer=tok)
    ex = toy_gen.load("train")[0]
    assert demonstration(toy_gen, ex, None) == f"{ex.text} text : {ex.target}"
    res = run_icl(adapted, toy_gen, IclConfig(k=2, seeds=(0,), pool=10, max_new_tokens=4), limit=3, cache_dir=None)
    assert set(res["summary"]) == {"bleu"} and len(res["per_seed"][0]["predictions"]) == 3
    with pytest.raises(ValueError, match="balanced selection needs a classification task"):
        run_icl(adapted, toy_gen, IclConfig(k=2, select="balanced", seeds=(0,)), limit=1, cache_dir=None)


def test_cli_icl_writes_result_json(tiny_dir, tmp_path, capsys):
    from test_cli_commands import own_files, write_tsv
    from conftest import _toy_examples
    train, dev = write_tsv(tmp_path / "train.tsv", _toy_examples(40, 0)), write_tsv(tmp_path / "dev.tsv", _toy_examples(8, 5))
    out = tmp_path / "icl"
    args = ["icl", "--model", str(tiny_dir), *own_files(train, dev), "--template", "{text} it was {mask} .",
            "--verbalizer", "neg=bad,pos=good", "--k", "2", "--seeds", "2", "--pool", "16", "--limit", "4",
            "--no-progress"]
    assert main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "over 2 seeds, 4 examples" in printed
    rec = json.loads((out / "result.json").read_text())
    assert rec["icl"]["summary"]["accuracy"]["n_seeds"] == 2 and rec["metrics"]["dev"]["n"] == 4
    assert rec["head"]["template"] == "{text} it was {mask} ." and rec["icl"]["k"] == 2
    assert main(args[:-1] + ["--k", "30"]) == 2
    assert "k=30 demonstrations but the pool has 16" in capsys.readouterr().err


@pytest.mark.integration
def test_minilm_embeds_a_paraphrase_nearest():
    from lmadapt.prompting.embed import SentenceEmbedder
    e = SentenceEmbedder("minilm-l6")
    pool = e(["the stock market fell sharply today", "a touching and beautiful movie", "rain is expected tomorrow"])
    query = e(["a wonderful, moving film"])
    assert torch.allclose(pool.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert int((query @ pool.T).argmax()) == 1


@pytest.mark.integration
def test_with_smollm2s_bpe_tokenizer_k0_is_zero_shot_and_demonstrations_keep_their_spaces():
    """SmolLM2's BPE tokenizer (a tiny random LLaMA under it): spaces matter there, so the query
    must be encoded exactly as the verbalizer head encodes it, and a demonstration reads
    '<text> It was great' with the word's leading space."""
    from transformers import AutoTokenizer
    from conftest import make_model
    from lmadapt.models import prepare_tokenizer, resolve
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m")[0])
    prepare_tokenizer(tok, "causal")
    sst2 = lmadapt.TASKS["sst2"]
    adapted = lmadapt.attach(make_model("llama", len(tok)), "none", task=sst2, tokenizer=tok, head="verbalizer")
    queries = sst2.load("dev")[:4]
    zero = run_seed(adapted, sst2, [], queries, IclConfig(k=0, seeds=(0,)), 0)
    torch.testing.assert_close(zero["scores"], member_scores(adapted, queries), atol=1e-5, rtol=1e-5)
    assert demonstration(sst2, Example("a gem .", label=1), adapted.head) == "a gem . It was great"
    r = run_seed(adapted, sst2, queries, queries[:1], IclConfig(k=2, seeds=(0,), pool=None), 0)
    assert r["first_prompt"].count(" It was ") == 2 and r["first_prompt"].endswith(queries[0].text + " It was")
