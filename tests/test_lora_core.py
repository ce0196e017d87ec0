"""LoRA and the Adapted/Slots core on tiny LLaMA, GPT-2 (Conv1D) and BERT."""
import copy

import pytest
import torch

import lmadapt
from lmadapt.adapted import pool


def _batch(tok, texts=("the movie was good", "bad plot", "it was a very fun film and the actor was great")):
    return tok(list(texts), return_tensors="pt", padding=True)


def _base_hidden(model, batch):
    # lmadapt numbers positions from the first real token (left padding is harmless); do the same
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model.base_model(**batch, position_ids=pos).last_hidden_state


def test_identity_at_init_and_disabled(tiny):
    model, tok = tiny
    base = copy.deepcopy(model)
    a = lmadapt.attach(model, "lora", num_labels=2, tokenizer=tok)
    b = _batch(tok)
    with torch.no_grad():
        h, _ = a.encode(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(h, _base_hidden(base, b), atol=1e-6, rtol=0)
    # make the delta non-zero: outputs move, and disabled() gives the base back
    for m in a.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B)
    with torch.no_grad():
        h2, _ = a.encode(b["input_ids"], b["attention_mask"])
        with a.disabled():
            h3, _ = a.encode(b["input_ids"], b["attention_mask"])
    assert (h2 - h).abs().max() > 1e-4
    torch.testing.assert_close(h3, _base_hidden(base, b), atol=1e-6, rtol=0)


def test_one_step_changes_only_lora_and_head(tiny):
    model, tok = tiny
    a = lmadapt.attach(model, "lora", num_labels=2, tokenizer=tok)
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    opt = torch.optim.AdamW(a.trainable_parameters(), lr=1e-2)
    b = _batch(tok)
    a(**b, labels=torch.tensor([1, 0, 1])).loss.backward()
    opt.step()
    after = a.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), changed
    assert all(k.endswith("lora_B") or k.endswith("lora_A") for k in changed)


def test_save_load_equal_outputs(tiny, tmp_path):
    model, tok = tiny
    fresh = copy.deepcopy(model)
    a = lmadapt.attach(model, "lora", num_labels=2, tokenizer=tok, r=4, alpha=8)
    for m in a.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B)
    size = a.save(tmp_path / "art")
    assert size == sum(f.stat().st_size for f in (tmp_path / "art").iterdir())
    b = lmadapt.load_adapted(tmp_path / "art", model=fresh, tokenizer=tok)
    x = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(a(**x).logits, b(**x).logits, atol=0, rtol=0)
    assert b.method == a.method


def test_artifact_refuses_other_base(tmp_path):
    from conftest import make_model, make_tokenizer
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok), seed=0), "lora", num_labels=2, tokenizer=tok)
    a.save(tmp_path / "art")
    with pytest.raises(ValueError, match="does not fit this model"):
        lmadapt.load_adapted(tmp_path / "art", model=make_model("llama", len(tok), seed=1), tokenizer=tok)
    with pytest.raises(ValueError, match=r"model_type \(llama != gpt2\)"):
        lmadapt.load_adapted(tmp_path / "art", model=make_model("gpt2", len(tok)), tokenizer=tok)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_equals_unmerged(arch):
    """merge() folds scaling * B A into each base weight (GPT-2's Conv1D transposed), so the merged
    weights ALONE, in a plain copy of the model, give the adapted outputs; unmerge() restores the
    original weights and the live delta."""
    from conftest import load_merged, make_model, make_tokenizer, plain_hidden
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    model = make_model(arch, len(tok))
    pristine = copy.deepcopy(model)
    a = lmadapt.attach(model, "lora", tokenizer=tok, num_labels=2 if arch == "bert" else None)
    for m in a.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    layers = a.method.layers(a)
    w0 = [m.base.weight.detach().clone() for m in layers]
    x = _batch(tok)
    with torch.no_grad():
        ref = a(**x)
        assert (ref.hidden - plain_hidden(pristine, x)).abs().max() > 1e-3      # a real delta
        a.merge()
        a.merge()                                                               # idempotent
        for m, w in zip(layers, w0):
            d = m.delta_weight(0)
            torch.testing.assert_close(m.base.weight, w + (d.T if m.fan_in_fan_out else d), atol=1e-6, rtol=0)
        merged = a(**x)
        alone = plain_hidden(load_merged(a, copy.deepcopy(pristine)), x)
        a.unmerge()
        for m, w in zip(layers, w0):
            torch.testing.assert_close(m.base.weight, w, atol=1e-6, rtol=0)
        back = a(**x)
        with a.disabled():                                                      # the delta is live again
            torch.testing.assert_close(a(**x).hidden, plain_hidden(pristine, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(merged.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, ref.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_merge_refuses_several_slots():
    from conftest import make_model, make_tokenizer
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", tokenizer=tok, slots=2)
    for m in a.method.layers(a):
        torch.nn.init.normal_(m.lora_B, std=0.1)
    w0 = [m.base.weight.detach().clone() for m in a.method.layers(a)]
    with pytest.raises(ValueError, match=r"merge\(\) needs a single slot"):
        a.merge()
    assert not any(m.merged for m in a.method.layers(a))
    assert all(torch.equal(m.base.weight, w) for m, w in zip(a.method.layers(a), w0))


def test_slots_mixed_batch_equals_rows_alone(tiny):
    model, tok = tiny
    a = lmadapt.attach(model, "lora", num_labels=2, tokenizer=tok, slots=3)
    torch.manual_seed(1)
    for p in a.trainable_parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = _batch(tok)
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mixed = a(**x, slot_ids=ids).logits
        for i in range(3):
            row = {k: v[i:i + 1] for k, v in x.items()}
            alone = a(**row, slot_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    # and slot ids out of range are refused
    with pytest.raises(ValueError, match="slot_ids must lie in"):
        a(**x, slot_ids=torch.tensor([0, 3, 1]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_left_padded_equals_rows_alone(arch):
    from conftest import make_model, make_tokenizer
    tok = make_tokenizer()
    a = lmadapt.attach(make_model(arch, len(tok)), "lora", tokenizer=tok)
    for m in a.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    texts = ["name cafe price cheap", "the movie"]
    x = tok(texts, return_tensors="pt", padding=True)
    assert x["attention_mask"][1, 0] == 0  # really left-padded
    batch, scores = a.generate(x["input_ids"], x["attention_mask"], max_new_tokens=6, eos_token_id=[],
                               output_scores=True)
    for i, t in enumerate(texts):
        one = tok([t], return_tensors="pt")
        alone, one_scores = a.generate(one["input_ids"], one["attention_mask"], max_new_tokens=6, eos_token_id=[],
                                       output_scores=True)
        assert batch[i].tolist() == alone[0].tolist()
        torch.testing.assert_close(scores[i], one_scores[0], atol=1e-5, rtol=1e-5)  # ids alone hide position errors


def test_pooling_left_and_right_padding():
    h = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(h, right, "cls").flatten().tolist() == [0, 4]
    assert pool(h, right, "last").flatten().tolist() == [1, 7]
    assert pool(h, left, "cls").flatten().tolist() == [2, 4]
    assert pool(h, left, "mean").flatten().tolist() == [2.5, 5.5]


def test_unknown_method_and_bad_args():
    from conftest import make_model, make_tokenizer
    tok = make_tokenizer()
    m = make_model("llama", len(tok))
    with pytest.raises(ValueError, match="unknown method 'lora2'; choose one of: .*lora"):
        lmadapt.attach(m, "lora2")
    with pytest.raises(ValueError, match="has no argument 'rank'.*valid arguments: .*r"):
        lmadapt.attach(m, "lora", rank=4)
    with pytest.raises(ValueError, match="no layer named nope"):
        lmadapt.attach(m, "lora", targets=("nope",))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_cross_entropy_equals_plain(bias):
    """The chunked LM loss gives the same value and gradients (h, weight, bias) as logits + CE."""
    from lmadapt.adapted import linear_cross_entropy
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    h = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(50, (300,))
    fused = linear_cross_entropy(head, h, t, chunk=64)
    fused.backward()
    got = [h.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    h.grad = None
    head.zero_grad()
    plain = torch.nn.functional.cross_entropy(head(h), t)
    plain.backward()
    want = [h.grad] + [p.grad for p in head.parameters()]
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
