"""Prompt tuning, P-tuning, prefix tuning and P-tuning v2 on tiny LLaMA / GPT-2 / BERT: identity
when disabled, mixed-slot batches == each row alone, left-padded generation == each row alone,
save/load equality, folding (P-tuning encoder, prefix MLP) and the trainable share on SmolLM2."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import lmadapt
from lmadapt.api import load_adapted
from lmadapt.methods.prefix import ids_prefix, text_prefix
from lmadapt.methods.prompt import SoftTable
from lmadapt.arch import kv_shape

from conftest import make_model, make_tokenizer

METHODS = ("prompt", "ptuning", "prefix", "ptuning2")
SMALL = {"prompt": {"k": 4}, "ptuning": {"k": 4, "encoder_hidden_size": 16},
         "prefix": {"k": 3, "prefix_hidden": 16}, "ptuning2": {"k": 3}}
TEXTS = ["the movie was very good", "bad", "it is a fun film with a great plot"]


def build(arch, method, slots=1, **args):
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    model = make_model(arch, len(tok))
    head = {"num_labels": 2} if arch == "bert" else {}
    adapted = lmadapt.attach(model, method, tokenizer=tok, slots=slots, **head, **(SMALL[method] | args))
    return adapted.eval(), tok


def table(adapted) -> SoftTable:
    return next(m for m in adapted.modules() if isinstance(m, SoftTable))


def randomize(adapted, seed=0):
    """Different, clearly non-zero tables in every slot (plain-table form only)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t = table(adapted).table
        t.copy_(torch.randn(t.shape, generator=g))


def encode(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def outputs(adapted, ids, mask, slot_ids=None):
    """(B, T, *) per-token outputs: LM logits, or the encoder's hidden states for BERT."""
    out = adapted(ids, mask, slot_ids=slot_ids)
    return out.hidden if adapted.head is not None else out.logits


def real(x, mask, i):
    """Row i's real-token positions (left padding for causal, right for BERT)."""
    return x[i][mask[i].bool()]


@pytest.mark.parametrize("method", METHODS)
def test_identity_when_disabled_and_change_when_enabled(arch, method):
    adapted, tok = build(arch, method)
    ids, mask = encode(tok, ["the movie was very good"])           # no padding: the base needs no positions
    with torch.no_grad():
        base = adapted.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        with adapted.disabled():
            off = adapted(ids, mask).hidden
        on = adapted(ids, mask).hidden
    torch.testing.assert_close(off, base, atol=1e-6, rtol=0)
    assert (on - base).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_only_method_and_head_train(arch, method):
    adapted, tok = build(arch, method)
    adapted.train()
    ids, mask = encode(tok, TEXTS)
    labels = torch.tensor([1, 0, 1]) if arch == "bert" else ids.masked_fill(mask == 0, -100)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    loss = adapted(ids, mask, labels=labels).loss
    loss.backward()
    opt = torch.optim.SGD(adapted.trainable_parameters(), lr=0.1)
    opt.step()
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("delta.", "head.")) for n in changed), changed
    assert any(n.startswith("delta.") for n in changed)
    assert all(p.grad is None for p in adapted.model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_mixed_slot_batch_equals_rows_alone(arch, method):
    adapted, tok = build(arch, method, slots=3)
    assert table(adapted).encoder is None                          # slots > 1: plain tables
    randomize(adapted)
    ids, mask = encode(tok, TEXTS)
    slot_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        batch = outputs(adapted, ids, mask, slot_ids)
        for i in range(len(TEXTS)):
            one_ids, one_mask = encode(tok, [TEXTS[i]])
            alone = outputs(adapted, one_ids, one_mask, slot_ids[i:i + 1])
            torch.testing.assert_close(real(batch, mask, i), alone[0], atol=1e-5, rtol=0)
        if adapted.head is not None:                                # BERT: pooled head logits too
            logits = adapted(ids, mask, slot_ids=slot_ids).logits
            for i in range(len(TEXTS)):
                one = adapted(*encode(tok, [TEXTS[i]]), slot_ids=slot_ids[i:i + 1]).logits
                torch.testing.assert_close(logits[i], one[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("slots", [1, 3])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_generation_equals_rows_alone(arch, method, slots):
    adapted, tok = build(arch, method, slots=slots)
    if slots > 1:
        randomize(adapted)
    slot_ids = torch.tensor([2, 0, 1]) if slots > 1 else None
    ids, mask = encode(tok, TEXTS)
    assert (mask[:, 0] == 0).any()                                  # really left-padded
    out, scores = adapted.generate(ids, mask, slot_ids=slot_ids, max_new_tokens=6, eos_token_id=[], output_scores=True)
    for i in range(len(TEXTS)):
        one, one_scores = adapted.generate(*encode(tok, [TEXTS[i]]), max_new_tokens=6, eos_token_id=[],
                                           slot_ids=None if slot_ids is None else slot_ids[i:i + 1], output_scores=True)
        assert out[i].tolist() == one[0].tolist()
        torch.testing.assert_close(scores[i], one_scores[0], atol=1e-5, rtol=1e-5)  # ids alone hide position errors


@pytest.mark.parametrize("method", METHODS)
def test_save_load_equal_outputs(arch, method, tmp_path):
    adapted, tok = build(arch, method)
    ids, mask = encode(tok, TEXTS)
    with torch.no_grad():
        want = outputs(adapted, ids, mask)
    adapted.save(tmp_path / "a")
    fresh_tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    loaded = load_adapted(tmp_path / "a", model=make_model(arch, len(fresh_tok)), tokenizer=fresh_tok)
    assert table(loaded).encoder is None                            # a loaded artifact is a plain table
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded, ids, mask), want, atol=1e-5, rtol=0)
    # and into slot 1 of a 2-slot serving model
    serving = load_adapted(tmp_path / "a", model=make_model(arch, len(fresh_tok)), tokenizer=fresh_tok, slots=2)
    serving.load_state(adapted.state_for_slot(0), 1)
    with torch.no_grad():
        got = outputs(serving, ids, mask, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,args", [("ptuning", {"encoder": "mlp"}), ("ptuning", {"encoder": "lstm"}),
                                         ("prefix", {}), ("prefix", {"init_text": "the movie"})])
def test_folded_equals_unfolded_and_drops_encoder(arch, method, args):
    adapted, tok = build(arch, method, **args)
    soft = table(adapted)
    assert soft.encoder is not None                                  # training form: encoder/MLP
    ids, mask = encode(tok, TEXTS)
    with torch.no_grad():
        unfolded = outputs(adapted, ids, mask)
    state = adapted.state_for_slot(0)
    delta = {k: v for k, v in state.items() if k.startswith("delta.")}
    key = "delta.prompt.table" if method == "ptuning" else "delta.prefix.table"
    assert list(delta) == [key]                                      # only the folded table is stored
    torch.testing.assert_close(delta[key], soft.encoder(), atol=1e-6, rtol=0)
    adapted.load_state(state)                                        # folds in place
    assert soft.encoder is None and soft.table.shape[0] == 1
    assert not any(".encoder." in n for n, _ in adapted.named_parameters() if n.startswith("delta."))
    with torch.no_grad():
        torch.testing.assert_close(outputs(adapted, ids, mask), unfolded, atol=1e-6, rtol=0)


@pytest.mark.parametrize("reparam", [True, False])
def test_prefix_init_text_is_the_models_own_keys_values(arch, reparam):
    adapted, tok = build(arch, "prefix", k=4, reparam=reparam, init_text="good movie")
    want = text_prefix(adapted, "good movie", 4, "prefix")           # (k, L*2*n_kv*hd)
    L, n_kv, hd = kv_shape(adapted.model)
    assert want.shape == (4, L * 2 * n_kv * hd)
    with torch.no_grad():
        got = table(adapted)()
    # prefix_hidden (16) >= k (4): the least-squares fit of the MLP's output layer is exact
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Layer 0's key at position 0 depends only on the token and its position: it must be the
    # model's own key for "good" run alone.
    ids = torch.tensor([tok("good", add_special_tokens=False)["input_ids"]])
    cache = DynamicCache(config=adapted.model.config)
    adapted.model.base_model(input_ids=ids, cache=cache, use_cache=True)
    torch.testing.assert_close(got[0, :n_kv * hd], cache.layers[0].keys[0, :, 0].reshape(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reparam", [True, False])
def test_prefix_vocab_init_is_the_models_own_keys_values_of_seeded_tokens(arch, reparam):
    """init='vocab' (ptuning2's default): the model's own keys/values of k seeded random tokens;
    the seed picks the tokens, 'random' is N(0, 1) noise and differs from both."""
    adapted, _ = build(arch, "prefix", k=4, reparam=reparam, init="vocab", seed=3)
    V = adapted.model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(V, (4,), generator=torch.Generator().manual_seed(3))
    want = ids_prefix(adapted, ids)
    with torch.no_grad():
        got = table(adapted)()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # layer 0's key at position 0 is the model's own key of the first drawn token alone
    n_kv, hd = kv_shape(adapted.model)[1:]
    cache = DynamicCache(config=adapted.model.config)
    adapted.model.base_model(input_ids=ids[:1].view(1, 1), cache=cache, use_cache=True)
    torch.testing.assert_close(got[0, :n_kv * hd], cache.layers[0].keys[0, :, 0].reshape(-1), atol=1e-4, rtol=1e-4)
    other, _ = build(arch, "prefix", k=4, reparam=reparam, init="vocab", seed=4)
    with torch.no_grad():
        assert (table(other)() - got).abs().max() > 1e-3
    if not reparam:
        noise, _ = build(arch, "prefix", k=4, reparam=False, init="random")
        t = table(noise).table[0]
        assert abs(t.std().item() - 1) < 0.2 and (t - got).abs().max() > 1e-1


def test_ptuning2_defaults_to_vocab_init_and_init_is_checked():
    adapted, _ = build("llama", "ptuning2")
    assert adapted.method.init == "vocab" and lmadapt.get_method("prefix").init == "vocab"
    V = adapted.model.get_input_embeddings().weight.shape[0]
    want = ids_prefix(adapted, torch.randint(V, (3,), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(table(adapted).table[0], want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="init must be one of: random, vocab"):
        lmadapt.get_method("ptuning2", init="labels")


def test_prompt_label_init_and_errors():
    tok = make_tokenizer("causal")
    model = make_model("llama", len(tok))
    adapted = lmadapt.attach(model, "prompt", tokenizer=tok, k=5, init="labels", label_names=["good", "bad"],
                             num_labels=2)
    emb = model.get_input_embeddings().weight
    ids = [tok.convert_tokens_to_ids(w) for w in ["good", "bad", "good", "bad", "good"]]
    torch.testing.assert_close(table(adapted).table[0], emb[ids], atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        lmadapt.attach(make_model("llama", len(tok)), "prompt", init="labels", num_labels=2)
    with pytest.raises(ValueError, match="needs label names"):
        lmadapt.attach(make_model("llama", len(tok)), "prompt", tokenizer=tok, init="labels")
    with pytest.raises(ValueError, match="init must be one of: vocab, labels, random"):
        lmadapt.attach(make_model("llama", len(tok)), "prompt", init="words")
    with pytest.raises(ValueError, match="encoder must be one of: mlp, lstm"):
        lmadapt.attach(make_model("llama", len(tok)), "ptuning", encoder="gru")
    random = lmadapt.attach(make_model("llama", len(tok)), "prompt", init="random", k=50)
    assert abs(table(random).table.std().item() / emb.std().item() - 1) < 0.2


def test_bert_prefix_is_attended_and_padding_masked():
    adapted, tok = build("bert", "ptuning2")
    ids, mask = encode(tok, TEXTS)
    with torch.no_grad():
        a = adapted(ids, mask).hidden
        table(adapted).table.mul_(2.0)
        b = adapted(ids, mask).hidden
        assert (real(a, mask, 1) - real(b, mask, 1)).abs().max() > 1e-3   # the prefix is attended
        pad_changed = ids.masked_fill(mask == 0, 7)                         # other pad tokens
        torch.testing.assert_close(adapted(pad_changed, mask).hidden * mask[..., None], b * mask[..., None],
                                   atol=1e-6, rtol=0)


def test_trainable_share_on_smollm2_shape():
    """< 1% of SmolLM2-135M per method, built on the meta device (no memory, no time), both what
    trains and what is stored. Prefix tuning's MLP is a training-time cost: at Li & Liang's
    prefix_hidden=512 it is ~4.5% while training, and the stored prefix stays under 1%."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for method in METHODS:
        adapted = lmadapt.attach(model, method)
        share = adapted.num_trainable() / adapted.num_base()
        stored = sum(v.numel() for v in adapted.state_for_slot(0).values()) / adapted.num_base()
        assert stored < 0.01, (method, stored)
        assert share < 0.01, (method, share)
        if method == "prefix":
            wide = lmadapt.attach(model, "prefix", prefix_hidden=512)
            assert wide.num_trainable() / wide.num_base() > 0.01               # the MLP, dropped on save
            assert sum(v.numel() for v in wide.state_for_slot(0).values()) / wide.num_base() < 0.01
