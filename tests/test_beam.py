"""Beam search in lmadapt's own KV-cache loop (lmadapt/beam.py) on tiny LLaMA / GPT-2: num_beams=1
is greedy for every method, a left-padded mixed-slot batch decodes like each row alone, the loop's
log-probs equal a separate full forward pass, beam >= greedy, exhaustive search is found, parity with
transformers' beam search (EOS, length_penalty, early_stopping), no_repeat_ngram_size, the cache
contract (three methods only), and the E2E / WebNLG task default reaching evaluation."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn as nn
from conftest import CAUSAL, TOY_GEN, make_model, make_tokenizer

import lmadapt
from lmadapt.batching import Encoder
from lmadapt.evaluation import evaluate_examples, predict_examples
from lmadapt.methods import METHODS
from lmadapt.tasks import get_task

SMALL = {"prompt": {"k": 4}, "ptuning": {"k": 4, "encoder_hidden_size": 16},
         # init=random: the tests need rows whose tokens vary, which N(0, 1) keys/values give here
         "prefix": {"k": 3, "prefix_hidden": 16, "init": "random"}, "ptuning2": {"k": 3}}
GEN_METHODS = sorted(m for m in METHODS if m not in ("probe", "ipt"))   # ipt: test_ppt_ipt.py (it needs a decoder)
TEXTS = ["the movie was very good", "bad", "it is a fun film with a great plot", "name cafe price cheap"]
TOK = make_tokenizer("causal")


def varied_model(arch: str, seed: int = 0, std: float = 1.0):
    """The tiny models tie the LM head to the embeddings, so they repeat one token forever; a
    random untied head (std 1: neither flat nor one-hot distributions) makes outputs vary, so
    beam search has real choices to make."""
    model = make_model(arch, len(TOK), seed)
    g = torch.Generator().manual_seed(seed + 100)
    model.get_output_embeddings().weight = nn.Parameter(
        torch.randn(len(TOK), model.config.hidden_size, generator=g) * std)
    return model


def build(method: str, arch: str, slots: int = 1, seed: int = 0, model=None, std: float = 0.01,
          table_std: float | None = None):
    """Method attached and perturbed: zero-init deltas (LoRA B, adapters, ...) would be the identity,
    and each slot gets its own weights. Soft prompts / prefixes get noise of table_std (default: half
    their own scale)."""
    model = varied_model(arch, seed) if model is None else model
    a = lmadapt.attach(model, method, tokenizer=TOK, slots=slots, **SMALL.get(method, {})).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in a.named_parameters():
            if p.requires_grad:
                table = name.endswith(".table")
                scale = (0.5 * p.std() if table_std is None else table_std) if table else std
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return a


def batch(texts):
    x = TOK(texts, return_tensors="pt", padding=True)
    return x["input_ids"], x["attention_mask"]


@torch.no_grad()
def token_logprobs(a, ids, mask, new, slot_ids=None):
    """(B, n) log p(new[:, j] | prompt, new[:, :j]) from one full forward pass without a cache:
    an independent check of the loop's own bookkeeping."""
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    logits = a(full, full_mask, slot_ids=slot_ids).logits[:, ids.shape[1] - 1:-1].float()   # (B, n, V)
    return torch.log_softmax(logits, -1).gather(2, new.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def greedy_without_cache(a, ids, mask, n, eos):
    """Greedy decoding by full forward passes (no cache): -> tokens (B, <= n), logits (B, <= n, V),
    with generate()'s conventions (finished rows are fed and padded with pad id 0)."""
    toks, logits = [], []
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(n):
        lg = a(ids, mask).logits[:, -1].float()
        nxt = torch.where(done, 0, lg.argmax(-1))
        toks.append(nxt)
        logits.append(lg)
        done |= torch.isin(nxt, eos)
        if done.all():
            break
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(toks, 1), torch.stack(logits, 1)


def repeated_ngrams(row: list[int], n: int) -> list[tuple]:
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return [g for i, g in enumerate(grams) if g in grams[:i]]


# --- num_beams = 1 is greedy ------------------------------------------------------------------
@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("method", GEN_METHODS)
def test_one_beam_is_greedy_for_every_method(method, arch):
    """num_beams=1 gives the same tokens AND per-step logits as greedy decoding by full forward
    passes, with an EOS that ends one row early (finished rows padded, as before)."""
    a = build(method, arch)
    ids, mask = batch(TEXTS[:3])
    free = a.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 2])                                   # a token the model really emits
    tokens, scores = a.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, num_beams=1,
                                output_scores=True)
    want_tokens, want_logits = greedy_without_cache(a, ids, mask, 6, torch.tensor([eos]))
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(scores, want_logits, atol=1e-4, rtol=1e-4)
    assert scores.shape[-1] == len(TOK)                      # (B, n, V) logits, not beam log-probs
    assert (tokens == 0).any() and len(set(free.flatten().tolist())) > 3   # a row ended; outputs vary


# --- mixed slots, left padding: batch == each row alone ------------------------------------------
def eos_that_ends_a_row(a, ids, mask, **kw) -> int:
    """A token id that, used as EOS, ends some row's best hypothesis before max_new_tokens (so
    finished hypotheses and padding are exercised); tried among the tokens the model emits, which
    must vary (the test would prove little on one repeated token)."""
    free = a.generate(ids, mask, eos_token_id=[], **kw)
    assert all(len(set(r)) > 2 for r in free.tolist()), free.tolist()
    for eos in dict.fromkeys(free[:, 1:-2].flatten().tolist()):
        if (a.generate(ids, mask, eos_token_id=eos, **kw)[:, :kw["max_new_tokens"] - 1] == eos).any():
            return eos
    raise AssertionError(f"no emitted token ends a row early: {free.tolist()}")


def beam_score(tokens: list[int], logps: torch.Tensor, eos: int, length_penalty: float) -> float:
    """sum log p / length ** length_penalty, length up to and including EOS."""
    n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
    return float(logps[:n].sum()) / n ** length_penalty


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_beam_batch_with_slots_equals_rows_alone(method, arch):
    a = build(method, arch, slots=3, seed=3, std=0.3, table_std=1.0)
    ids, mask = batch(TEXTS[:3])
    assert (mask[:, 0] == 0).any()                           # really left-padded
    slot_ids = torch.tensor([2, 0, 1])
    kw = dict(max_new_tokens=8, num_beams=3, length_penalty=1.0, slot_ids=slot_ids)
    eos = eos_that_ends_a_row(a, ids, mask, **kw)
    new, logps = a.generate(ids, mask, eos_token_id=eos, output_scores=True, **kw)
    assert a.slots.ids is None                               # the beams' B*N ids did not leak out
    for i in range(3):
        one, one_lp = a.generate(*batch([TEXTS[i]]), eos_token_id=eos, output_scores=True,
                                 **(kw | {"slot_ids": slot_ids[i:i + 1]}))
        n = one.shape[1]
        assert new[i, :n].tolist() == one[0].tolist() and (new[i, n:] == 0).all()
        torch.testing.assert_close(logps[i, :n], one_lp[0], atol=1e-4, rtol=0)
        assert beam_score(new[i].tolist(), logps[i], eos, 1.0) == \
            pytest.approx(beam_score(one[0].tolist(), one_lp[0], eos, 1.0), abs=1e-4)
    # the slots really differ: every row on slot 0 decodes something else
    all_slot_0 = kw | {"slot_ids": torch.zeros(3, dtype=torch.long)}
    assert not torch.equal(new, a.generate(ids, mask, eos_token_id=eos, **all_slot_0))


# --- quality: the loop's own scores, beam >= greedy, exhaustive search ---------------------------
@pytest.mark.parametrize("arch", CAUSAL)
def test_beam_scores_match_a_full_forward_and_beat_greedy(arch):
    """With sum log-probs (length_penalty=0), fixed length (no EOS) and equal max_new_tokens, the
    beam's sequence is never less likely than greedy's, scored by a separate full forward pass.
    (Not a theorem - greedy's prefix can drop out of the beam - but it holds here, and it fails at
    once when beams read the wrong cache rows or scores are not accumulated.)"""
    a = build("lora", arch, seed=1)
    ids, mask = batch(TEXTS)
    greedy = a.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    g_total = token_logprobs(a, ids, mask, greedy).sum(1)
    strictly_better = 0
    for N in (2, 4):
        beam, logps = a.generate(ids, mask, max_new_tokens=8, eos_token_id=[], num_beams=N,
                                 length_penalty=0.0, output_scores=True)
        assert beam.shape == greedy.shape
        ref = token_logprobs(a, ids, mask, beam)
        torch.testing.assert_close(logps, ref, atol=1e-4, rtol=0)        # the loop's bookkeeping
        assert (ref.sum(1) >= g_total - 1e-4).all(), (N, ref.sum(1), g_total)
        strictly_better += int((ref.sum(1) > g_total + 1e-3).sum())
    assert strictly_better > 0                                          # beams changed something


@torch.no_grad()
def test_beam_as_wide_as_the_vocabulary_finds_the_best_two_tokens():
    """With N >= V, two steps of beam search keep every first token, so each row's result is the
    exact argmax over all V^2 two-token continuations (brute force, each prompt alone)."""
    a = lmadapt.attach(varied_model("llama", std=0.5), "full", tokenizer=TOK).eval()
    V = len(TOK)
    ids, mask = batch(TEXTS)
    got = a.generate(ids, mask, max_new_tokens=2, eos_token_id=[], num_beams=V, length_penalty=0.0)
    for i, text in enumerate(TEXTS):
        one, _ = batch([text])
        first = torch.log_softmax(a(one).logits[0, -1].float(), -1)                          # (V,)
        two = torch.cat([one.expand(V, -1), torch.arange(V)[:, None]], 1)                    # (V, T + 1)
        second = torch.log_softmax(a(two, torch.ones_like(two)).logits[:, -1].float(), -1)   # (V, V)
        best = int((first[:, None] + second).flatten().argmax())
        assert got[i].tolist() == [best // V, best % V], i
    assert not torch.equal(got, a.generate(ids, mask, max_new_tokens=2, eos_token_id=[]))  # greedy misses


def hf_padded_like_ours(seqs: torch.Tensor, eos: int) -> torch.Tensor:
    """transformers pads finished rows with EOS when pad_token_id is 0 (`pad or eos`); use 0."""
    seqs = seqs.clone()
    for row in seqs:
        hit = (row == eos).nonzero()
        if len(hit):
            row[int(hit[0]) + 1:] = 0
    return seqs


@pytest.mark.parametrize("arch", CAUSAL)
def test_matches_transformers_beam_search(arch):
    """The same hypotheses as transformers' own beam search on the plain model (`full` adds
    nothing until trained), on a left-padded batch, over EOS, length_penalty and the three
    early_stopping modes."""
    model = varied_model(arch)
    a = lmadapt.attach(model, "full", tokenizer=TOK).eval()
    ids, mask = batch(TEXTS)
    eos = int(a.generate(ids, mask, max_new_tokens=4, eos_token_id=[])[0, 2])
    ended = 0
    for lp, stop, N in itertools.product((0.0, 1.0, 2.0), (True, False, "never"), (2, 3)):
        ours = a.generate(ids, mask, max_new_tokens=8, num_beams=N, eos_token_id=eos,
                          length_penalty=lp, early_stopping=stop)
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=N, do_sample=False,
                            eos_token_id=eos, pad_token_id=0, length_penalty=lp, early_stopping=stop)
        hf = hf_padded_like_ours(hf[:, ids.shape[1]:], eos)
        assert ours.tolist() == hf[:, :ours.shape[1]].tolist() and not hf[:, ours.shape[1]:].any(), \
            (lp, stop, N, ours.tolist(), hf.tolist())
        ended += int((ours == eos).any())
    assert ended > 0                                      # some hypotheses really ended in EOS


def test_early_stopping_never_searches_past_a_good_enough_hypothesis():
    """length_penalty > 0: early_stopping=False stops a row once its best running beam, scored at
    the current length, cannot beat the kept hypotheses; 'never' bounds it at max_new_tokens, goes
    on and finds a better one. Both as transformers decides."""
    model = varied_model("llama")
    a = lmadapt.attach(model, "full", tokenizer=TOK).eval()
    ids, mask = batch(TEXTS)
    eos = int(a.generate(ids, mask, max_new_tokens=4, eos_token_id=[])[3, 2])   # ends row 3 early
    kw = dict(max_new_tokens=8, num_beams=2, eos_token_id=eos, length_penalty=2.0)
    out = {}
    for stop in (False, "never"):
        new, logps = a.generate(ids, mask, early_stopping=stop, output_scores=True, **kw)
        hf = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, early_stopping=stop,
                            **kw)
        hf = hf_padded_like_ours(hf[:, ids.shape[1]:], eos)
        assert new.tolist() == hf[:, :new.shape[1]].tolist(), (stop, new.tolist(), hf.tolist())
        out[stop] = (new[3].tolist(), logps[3])
    assert out[False][0] != out["never"][0]
    assert beam_score(*out["never"], eos, 2.0) > beam_score(*out[False], eos, 2.0)


def test_length_penalty_changes_the_ranking():
    """A short hypothesis ending in EOS against a longer one: length_penalty -2 picks the short one,
    +2 the long one, and each pick outscores the other under its own penalty (the ranking flips)."""
    a = build("full", "gpt2", seed=0)
    ids, mask = batch(["bad"])
    eos = eos_that_ends_a_row(a, ids, mask, max_new_tokens=10, num_beams=3, length_penalty=-2.0)
    picks = {}
    for lp in (-2.0, 0.0, 2.0):
        new, logps = a.generate(ids, mask, max_new_tokens=10, num_beams=3, eos_token_id=eos,
                                length_penalty=lp, early_stopping="never", output_scores=True)
        picks[lp] = (new[0].tolist(), logps[0])
    short, long = picks[-2.0], picks[2.0]
    assert len(short[0]) < len(long[0]) and len(picks[-2.0][0]) <= len(picks[0.0][0]) <= len(long[0])
    assert beam_score(*short, eos, -2.0) > beam_score(*long, eos, -2.0)
    assert beam_score(*long, eos, 2.0) > beam_score(*short, eos, 2.0)


# --- no_repeat_ngram_size -------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_bans_repeats(n, num_beams):
    """On the plain tiny model (which repeats one token forever) no n-gram may occur twice in the
    generated part, which changes the output; the prompt does not count."""
    a = lmadapt.attach(make_model("llama", len(TOK)), "full", tokenizer=TOK).eval()
    ids, mask = batch(TEXTS[:2])
    kw = dict(max_new_tokens=10, eos_token_id=[], num_beams=num_beams)
    plain = a.generate(ids, mask, **kw)
    banned = a.generate(ids, mask, no_repeat_ngram_size=n, **kw)
    assert all(repeated_ngrams(r, n) for r in plain.tolist())              # the model does repeat
    assert all(not repeated_ngrams(r, n) for r in banned.tolist()), banned.tolist()
    # The prompt does not count: this model's favourite next token is the prompt's last one, and
    # even with n = 1 the output may still use it once.
    prompt_tokens = [set(p) - {0} for p in ids.tolist()]
    if num_beams == 1:
        assert all(r[0] in p for r, p in zip(plain.tolist(), prompt_tokens))
    assert any(set(r) & p for r, p in zip(banned.tolist(), prompt_tokens)), banned.tolist()


# --- the cache contract -----------------------------------------------------------------------------
class ThreeMethodCache:
    """A method's own cache wrapper, exposing only what beam search may use."""

    def __init__(self, inner):
        self._inner = inner

    def get_seq_length(self):
        return self._inner.get_seq_length()

    def reorder_cache(self, beam_idx):
        self._inner.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, n):
        self._inner.batch_repeat_interleave(n)


@pytest.mark.parametrize("method", ["prefix", "ladder"])
def test_beam_search_uses_only_three_cache_methods(method, monkeypatch):
    a = build(method, "llama", seed=4)
    ids, mask = batch(TEXTS[:3])
    kw = dict(max_new_tokens=6, eos_token_id=[], num_beams=3)
    want = a.generate(ids, mask, **kw)
    encode = a.encode

    def wrapped(input_ids, attention_mask=None, position_ids=None, cache=None, **k):
        hidden, inner = encode(input_ids, attention_mask, position_ids,
                               None if cache is None else cache._inner, **k)
        return hidden, ThreeMethodCache(inner)
    monkeypatch.setattr(a, "encode", wrapped)
    assert a.generate(ids, mask, **kw).tolist() == want.tolist()


# --- errors -----------------------------------------------------------------------------------------
def test_bad_settings_are_refused():
    a = build("lora", "llama")
    ids, mask = batch(TEXTS[:1])
    with pytest.raises(ValueError, match="beam sampling.*num_beams=1 to sample"):
        a.generate(ids, mask, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        a.generate(ids, mask, num_beams=0)
    with pytest.raises(ValueError, match="early_stopping must be one of: True, False, 'never'"):
        a.generate(ids, mask, num_beams=2, early_stopping="soon")
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an int >= 0"):
        a.generate(ids, mask, no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="task 'toygen': num_beams must be an int >= 1"):
        dataclasses.replace(TOY_GEN, num_beams=0)


# --- tasks and evaluation -------------------------------------------------------------------------
def test_e2e_and_webnlg_decode_with_five_beams():
    assert get_task("e2e_nlg").num_beams == 5 and get_task("webnlg").num_beams == 5
    assert get_task("xsum").num_beams == 1 and TOY_GEN.num_beams == 1


def test_evaluation_decodes_with_the_tasks_beams(monkeypatch):
    a = build("lora", "llama", model=varied_model("llama", std=0.5))
    enc = Encoder(TOK, True)
    examples = TOY_GEN.load("dev")[:4]
    task = dataclasses.replace(TOY_GEN, num_beams=2)
    feats = enc.collate([enc.generation(task, ex, with_target=False) for ex in examples])
    beams = a.generate(feats["input_ids"], feats["attention_mask"], max_new_tokens=6, num_beams=2)
    greedy = a.generate(feats["input_ids"], feats["attention_mask"], max_new_tokens=6)
    assert not torch.equal(beams, greedy)                  # so the comparison below can tell them apart
    want = [s.strip() for s in TOK.batch_decode(beams, skip_special_tokens=True)]
    assert predict_examples(a, task, examples, enc, max_new_tokens=6) == want
    override = predict_examples(a, task, examples, enc, max_new_tokens=6, num_beams=1)
    assert override == [s.strip() for s in TOK.batch_decode(greedy, skip_special_tokens=True)]
    # the real E2E task hands its settings to generate(); evaluate_examples passes the override on
    seen = []
    real = a.generate
    monkeypatch.setattr(a, "generate", lambda *x, **kw: seen.append(kw) or real(*x, **kw))
    predict_examples(a, get_task("e2e_nlg"), examples, enc, max_new_tokens=3)
    evaluate_examples(a, get_task("webnlg"), examples, enc, max_new_tokens=3, num_beams=3)
    assert [(kw["num_beams"], kw["length_penalty"], kw["no_repeat_ngram_size"]) for kw in seen] == \
        [(5, 1.0, 0), (3, 1.0, 0)]
