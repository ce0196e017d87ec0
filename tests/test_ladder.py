"""Ladder side-tuning's side transformer on tiny LLaMA / GPT-2 / BERT: it mixes tokens (the
per-token form cannot), it is causal on causal LMs, a left-padded batch equals each row alone,
cached decoding equals a full forward at every step, the backbone gets no gradient and keeps no
activation, and LadderCache's beam-search methods move the side's keys/values with the backbone's.
"""
from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, CAUSAL, make_model, make_tokenizer

import lmadapt
from lmadapt.methods.ladder import LadderCache

TEXTS = ["the movie was very good", "bad plot", "it was not fun and the actor was awful"]


def build(arch, lm=True, seed=1, **args):
    """Ladder with non-zero side weights (up != 0, so the side really shows in the output)."""
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    a = lmadapt.attach(make_model(arch, len(tok)), "ladder", tokenizer=tok,
                       num_labels=None if lm and arch in CAUSAL else 2, **args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return a.eval(), tok


def side_inputs(a, T=6, seed=0):
    """Random backbone hidden states: L + 1 tensors (1, T, H), an all-real mask, positions."""
    g = torch.Generator().manual_seed(seed)
    cfg = a.model.config
    hs = [torch.randn(1, T, cfg.hidden_size, generator=g) for _ in range(cfg.num_hidden_layers + 1)]
    return hs, torch.ones(1, T, dtype=torch.long), torch.arange(T)[None]


# --- token mixing, causality ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_side_network_mixes_tokens(arch):
    """Only token 0's hidden states change: the side output moves at every later position (the
    former per-token MLP side network left them exactly as they were)."""
    a, _ = build(arch)
    hs, mask, pos = side_inputs(a)
    other = [h.clone() for h in hs]
    for h in other:
        h[:, 0] += 1.0
    with torch.no_grad():
        s, s2 = a.delta.side(hs, mask, pos), a.delta.side(other, mask, pos)          # (1, T, w)
    moved = (s - s2)[0, 1:].abs().amax(-1)                                           # (T - 1,)
    assert bool((moved > 1e-4).all()), moved


@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_later_token_leaves_earlier_positions(arch):
    a, tok = build(arch)
    ids = tok(["the movie was very good and fun"], return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, -1] = tok.convert_tokens_to_ids("awful")
    with torch.no_grad():
        x, y = a(ids).logits, a(changed).logits                                      # (1, T, V)
        torch.testing.assert_close(x[:, :-1], y[:, :-1], atol=1e-6, rtol=0)
        assert (x[:, -1] - y[:, -1]).abs().max() > 1e-3
        # the side network itself, fed hidden states that differ only at the last position
        hs, mask, pos = side_inputs(a)
        other = [h.clone() for h in hs]
        for h in other:
            h[:, -1] += 1.0
        s, s2 = a.delta.side(hs, mask, pos), a.delta.side(other, mask, pos)
        torch.testing.assert_close(s[:, :-1], s2[:, :-1], atol=1e-6, rtol=0)


# --- padding, cached decoding -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_rows_alone(arch):
    """Causal LMs pad left (LM logits at every real position), BERT pads right (class logits)."""
    a, tok = build(arch)
    b = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        batch = a(**b).logits
        for i, text in enumerate(TEXTS):
            one = tok([text], return_tensors="pt")
            alone = a(**one).logits
            if arch in CAUSAL:   # (1, n, V) against the row's last n positions
                n = one["input_ids"].shape[1]
                torch.testing.assert_close(batch[i:i + 1, -n:], alone, atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)


def test_backbone_pad_states_cannot_reach_real_rows():
    """Two left pads whose backbone states are NaN: the real positions equal the row alone (a pad
    value reaches a real query with softmax weight 0, and 0 * NaN = NaN, unless pads are zeroed)."""
    a, _ = build("llama")
    hs, mask, pos = side_inputs(a)
    padded = [torch.cat([torch.full((1, 2, h.shape[-1]), float("nan")), h], 1) for h in hs]
    with torch.no_grad():
        s = a.delta.side(padded, torch.cat([torch.zeros(1, 2, dtype=torch.long), mask], 1),
                         torch.cat([torch.zeros(1, 2, dtype=torch.long), pos], 1))
        torch.testing.assert_close(s[:, 2:], a.delta.side(hs, mask, pos), atol=1e-5, rtol=0)
    assert bool(s.isfinite().all())


@pytest.mark.parametrize("arch", CAUSAL)
def test_cached_decode_equals_full_forward(arch):
    """generate() with the KV cache vs one forward over prompt + generated tokens without cache:
    the logits of every step, left-padded batch."""
    a, tok = build(arch)
    b = tok(TEXTS, return_tensors="pt", padding=True)
    n = 5
    new, scores = a.generate(b["input_ids"], b["attention_mask"], max_new_tokens=n, eos_token_id=[],
                             output_scores=True)                                     # (B, n), (B, n, V)
    ids = torch.cat([b["input_ids"], new], 1)
    mask = torch.cat([b["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        full = a(ids, mask).logits.float()                                          # (B, T + n, V)
    T = b["input_ids"].shape[1]
    torch.testing.assert_close(scores, full[:, T - 1:T - 1 + n], atol=1e-5, rtol=0)
    with torch.no_grad():
        cache = a(b["input_ids"], b["attention_mask"], use_cache=True).cache
    assert isinstance(cache, LadderCache) and cache.get_seq_length() == T
    assert len(cache.keys) == a.model.config.num_hidden_layers


# --- memory: no gradient into the backbone ------------------------------------------------------------
def test_backbone_gets_no_gradient_and_keeps_no_activation():
    """Even with every base weight set to requires_grad (as a careless caller might), a step
    leaves each base .grad None, and nothing of the backbone's width-64 FFN or its 4-head
    attention (B, 4, T, T) is saved for backward. (Classification head: a tied LM head would
    rightly get a gradient through the embedding matrix it shares.)"""
    a, tok = build("llama", lm=False)
    a.train()
    for p in a.model.parameters():
        p.requires_grad_(True)
    b = tok(TEXTS, return_tensors="pt", padding=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        loss = a(**b, labels=torch.tensor([1, 0, 0])).loss
    loss.backward()
    assert all(p.grad is None for p in a.model.parameters())
    assert all(p.grad is not None for p in a.delta.parameters())
    B, T = b["input_ids"].shape
    ffn, heads = a.model.config.intermediate_size, a.model.config.num_attention_heads
    assert not [s for s in shapes if s[-1:] == (ffn,) or s == (B, heads, T, T)], shapes


def test_recompute_gives_the_same_gradients_and_keeps_less():
    """recompute=True (default) reruns each side block in backward: the same gradients as keeping
    the activations, from under half the saved bytes."""
    grads, saved = {}, {}
    for recompute in (False, True):
        a, tok = build("llama", recompute=recompute)
        a.train()
        b = tok(TEXTS, return_tensors="pt", padding=True)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        sizes = {}
        pack = lambda t: sizes.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = a(**b, labels=labels).loss
        loss.backward()
        params = {p.untyped_storage().data_ptr() for p in a.parameters()}
        saved[recompute] = sum(n for ptr, n in sizes.items() if ptr not in params)
        grads[recompute] = {n: p.grad for n, p in a.delta.named_parameters()}
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, atol=1e-6, rtol=1e-5, msg=n)
    assert saved[True] < 0.5 * saved[False], saved


# --- LadderCache ------------------------------------------------------------------------------------
def _prefill_and_step(a, ids, mask, step_ids, fix=None):
    """One prefill with the cache, `fix(cache)` (a beam-search operation), one decode step of
    step_ids (B', 1): -> (step logits (B', V), cache)."""
    with torch.no_grad():
        cache = a(ids, mask, use_cache=True).cache
        if fix is not None:
            mask = fix(cache, mask)
        pos = mask.sum(1, keepdim=True)                  # next position: real tokens count from 0
        full = torch.cat([mask, torch.ones_like(step_ids)], 1)
        out = a(step_ids, full, position_ids=pos, cache=cache, use_cache=True)
    return out.logits[:, -1], out.cache


@pytest.mark.parametrize("arch", CAUSAL)
def test_cache_reorder_and_repeat_move_the_side_cache(arch):
    a, tok = build(arch)
    b = tok(TEXTS[:2], return_tensors="pt", padding=True)
    ids, mask = b["input_ids"], b["attention_mask"]
    idx = torch.tensor([1, 0, 0])
    step = torch.tensor([[7], [8], [9]])

    def reorder(cache, m):
        cache.reorder_cache(idx)
        return m[idx]
    got, cache = _prefill_and_step(a, ids, mask, step, reorder)
    want, ref = _prefill_and_step(a, ids[idx], mask[idx], step)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for k, k_ref in zip(cache.keys + cache.values, ref.keys + ref.values):
        torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=0)

    def repeat(cache, m):
        cache.batch_repeat_interleave(2)
        return m.repeat_interleave(2, 0)
    step = torch.tensor([[7], [8], [9], [10]])
    got, cache = _prefill_and_step(a, ids, mask, step, repeat)
    want, _ = _prefill_and_step(a, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), step)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ids.shape[1] + 1 and cache.keys[0].shape[0] == 4


# --- configuration -----------------------------------------------------------------------------------
def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="choose one of: add, replace"):
        build("llama", side_output="mix")
    with pytest.raises(ValueError, match="must divide the side width 4"):   # tiny: 32 / 8 = 4
        build("llama", heads=3)
    with pytest.raises(ValueError, match="odd head size"):
        build("llama", reduction=4, heads=8)                                  # 8 / 8 = 1
    a, _ = build("llama", reduction=2, heads=4)                               # w = 16, 4 heads of 4
    assert a.delta.blocks[0].attn.heads == 4 and a.delta.downs[0].out_features == 16


def test_replace_merge_feeds_the_head_from_the_side_only():
    """side_output=replace (the paper's): the hidden state the head reads is up(LN(s_L)), with no h_L."""
    a, tok = build("gpt2", side_output="replace")
    ids = tok(["the movie was good"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = a(ids).hidden
        out = a.model.base_model(input_ids=ids, output_hidden_states=True,
                                 position_ids=torch.arange(ids.shape[1])[None])
        s = a.delta.side(out.hidden_states, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(hidden, a.delta.up(a.delta.norm(s)), atol=1e-6, rtol=0)
