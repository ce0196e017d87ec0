"""KV-cache decoding positions, for every method that can generate, on LLaMA (rotary positions)
and GPT-2 (learned absolute positions): per-step logits, not only token ids.

The conftest models emit one token over and over, so comparing token ids hides position errors
that move the logits by 0.01-0.25. Here the backbone's matrices are re-drawn with std 0.3 so that
each step's argmax depends on the context (the greedy tokens vary), and `generate(...,
output_scores=True)` gives the float32 logits every step chose from. Three guarantees:

- a left-padded batch decodes exactly like each row alone (positions ignore the padding);
- step t's logits equal a cache-free forward over prompt + the t tokens generated so far
  (the decode positions continue the prompt pass's, prefix / virtual tokens included);
- with slots, each row decodes with its own slot as when run alone.

The models run in float64, so that the cached, batched and cache-free paths agree to float32
round-off of the returned scores (~1e-7 here) and a 1e-5 tolerance leaves no room for a position
error; in float32 the logits of these O(1) models differ by up to ~1.2e-5 between paths.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

import lmadapt
from lmadapt.methods import METHODS

SMALL = {"prompt": {"k": 4}, "ptuning": {"k": 4, "encoder_hidden_size": 16}, "prefix": {"k": 3, "prefix_hidden": 16},
         "ptuning2": {"k": 3}}
GENERATING = ("lora", "prompt", "ptuning", "prefix", "ptuning2", "adapter", "bitfit", "full", "intrinsic", "ladder")
TEXTS = ["name cafe price cheap", "the movie", "it was not fun and the actor was awful"]   # 4, 2, 9 tokens
STEPS = 6


def test_every_method_but_probe_is_covered():
    # `none` injects nothing (zero-shot prompting): it is the base model, whose decoding every test
    # here checks through the methods' disabled() passes.
    # ipt needs a fitted decoder (test_ppt_ipt.py covers it)
    assert set(GENERATING) == set(METHODS) - {"probe", "none", "ipt"}


def varied_model(arch, tok, seed=0):
    """A tiny model whose greedy continuation changes from step to step."""
    model = make_model(arch, len(tok))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def build(arch, method, slots=1):
    tok = make_tokenizer()
    a = lmadapt.attach(varied_model(arch, tok), method, tokenizer=tok, slots=slots, **SMALL.get(method, {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a clearly non-zero delta, different in every slot
        for p in a.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return a.double().eval(), tok   # float64: the paths compared differ by ~1e-7, not float32's ~1e-5


def decode(a, texts, tok, slot_ids=None):
    x = tok(texts, return_tensors="pt", padding=True)
    new, scores = a.generate(x["input_ids"], x["attention_mask"], slot_ids=slot_ids, max_new_tokens=STEPS,
                             eos_token_id=[], output_scores=True)
    return x, new, scores                                  # (B, T), (B, STEPS), (B, STEPS, V)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", GENERATING)
def test_left_padded_decoding_equals_rows_alone_and_a_full_forward(method, arch):
    a, tok = build(arch, method)
    x, new, scores = decode(a, TEXTS, tok)
    mask = x["attention_mask"]
    assert (mask == 0).sum(1).tolist() == [5, 7, 0]                        # really left-padded
    assert all(len(set(row)) >= 2 for row in new.tolist()), new            # the outputs vary
    torch.testing.assert_close(scores.argmax(-1), new, atol=0, rtol=0)
    if method != "full":  # the method's delta shapes the decoding (with it off, other logits)
        with a.disabled():
            _, _, off = decode(a, TEXTS, tok)
        assert (off - scores).abs().max() > 1e-2
    # each row alone, no padding: the same logits at every step
    for i, text in enumerate(TEXTS):
        _, one_new, one_scores = decode(a, [text], tok)
        assert one_new[0].tolist() == new[i].tolist(), i
        torch.testing.assert_close(scores[i], one_scores[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"row {i}: {m}")
    assert_equals_full_forward(a, x, new, scores)


def assert_equals_full_forward(a, x, new, scores, slot_ids=None):
    """The cache-free reference: one forward over prompt + generated tokens; its logits at the
    prompt's last position and at each generated token but the last are steps 0 .. STEPS-1."""
    ids = torch.cat([x["input_ids"], new], 1)
    mask = torch.cat([x["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        logits = a(ids, mask, slot_ids=slot_ids).logits.float()            # (B, T + STEPS, V)
    T = x["input_ids"].shape[1]
    torch.testing.assert_close(scores, logits[:, T - 1:T - 1 + STEPS], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(m for m in GENERATING if METHODS[m].supports_slots))
def test_mixed_slot_decoding_equals_rows_alone(method, arch):
    a, tok = build(arch, method, slots=3)
    slot_ids = torch.tensor([2, 0, 1])
    x, new, scores = decode(a, TEXTS, tok, slot_ids)
    assert_equals_full_forward(a, x, new, scores, slot_ids)
    for i, text in enumerate(TEXTS):
        _, one_new, one_scores = decode(a, [text], tok, slot_ids[i:i + 1])
        assert one_new[0].tolist() == new[i].tolist(), i
        torch.testing.assert_close(scores[i], one_scores[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"row {i}: {m}")
    # the slots really differ: all rows on slot 0 decode otherwise
    _, _, same = decode(a, TEXTS, tok, torch.zeros(3, dtype=torch.long))
    assert (same[0] - scores[0]).abs().max() > 1e-2
