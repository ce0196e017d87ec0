"""Every registered method x every tiny architecture (LLaMA, GPT-2, BERT): the guarantees each
method owes, checked the same way for all of them.

- every method attaches to every architecture (classification mode), and what cannot apply
  refuses with a ValueError naming the problem (probe and encoders have no LM head to generate);
- after one optimizer step, every base weight is frozen and bitwise unchanged (except `full`),
  and the method's own tensors moved;
- save -> load onto a fresh copy of the base gives identical outputs;
- methods with slots: a batch with mixed slot_ids equals each row run alone with its slot;
- zero-init methods are the identity at init;
- causal LMs generate with the method in place.
"""
import copy

import pytest
import torch

import lmadapt
from lmadapt.methods import METHODS
from conftest import ARCHS, make_model, make_tokenizer

# ipt needs a fitted prompt decoder (decoder=DIR): its invariants are in test_ppt_ipt.py
BUILDABLE = sorted(set(METHODS) - {"ipt"})

IDENTITY_AT_INIT = {"lora", "adapter", "bitfit", "intrinsic", "ladder"}
TEXTS = ["the movie was good", "bad plot", "it was a very fun film and the actor was great"]


def _attach(method, arch, **kw):
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    base = make_model(arch, len(tok))
    pristine = copy.deepcopy(base)
    return lmadapt.attach(base, method, tokenizer=tok, **kw), pristine, tok


@pytest.mark.parametrize("method", BUILDABLE)
def test_what_cannot_apply_refuses(method):
    """No LM head, nothing to generate with: an encoder without num_labels, and probe (a head on
    frozen features) without a classification task."""
    tok = make_tokenizer("encoder")
    with pytest.raises(ValueError, match="bert is an encoder without an LM head: give num_labels"):
        lmadapt.attach(make_model("bert", len(tok)), method, tokenizer=tok)
    if method == "probe":
        for arch in ("llama", "gpt2"):
            with pytest.raises(ValueError, match="method 'probe' needs a classification task"):
                lmadapt.attach(make_model(arch, len(tok)), "probe", tokenizer=tok)


def _labels_kw(arch):
    return {"num_labels": 2}  # classification mode works on every architecture


def _randomize(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _out(a, x, **kw):
    with torch.no_grad():
        return a(**x, **kw).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", BUILDABLE)
def test_step_leaves_base_untouched(method, arch):
    """Every parameter the base model had before attach (not only those that are frozen now)."""
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    model = make_model(arch, len(tok))
    base_params = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    a = lmadapt.attach(model, method, tokenizer=tok, **_labels_kw(arch))
    trainable = a.trainable_parameters()
    trainable_before = [p.detach().clone() for p in trainable]
    x = tok(TEXTS, return_tensors="pt", padding=True)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    a(**x, labels=torch.tensor([1, 0, 1])).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    opt.step()
    assert any(not torch.equal(p, old) for p, old in zip(trainable, trainable_before))
    if method == "full":  # everything trains, the base included
        assert all(p.requires_grad for _, p, _ in base_params)
        assert any(not torch.equal(p, old) for _, p, old in base_params)
        return
    assert not [n for n, p, _ in base_params if p.requires_grad], "base weights left trainable"
    assert not {id(p) for _, p, _ in base_params} & {id(p) for p in trainable}
    assert all(p.grad is None for _, p, _ in base_params)
    changed = [n for n, p, old in base_params if not torch.equal(p, old)]
    assert not changed, changed


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", BUILDABLE)
def test_save_load_same_outputs(method, arch, tmp_path):
    a, pristine, tok = _attach(method, arch, **_labels_kw(arch))
    _randomize(a)
    a.save(tmp_path / "art")
    b = lmadapt.load_adapted(tmp_path / "art", model=pristine, tokenizer=tok)
    x = tok(TEXTS, return_tensors="pt", padding=True)
    torch.testing.assert_close(_out(a, x), _out(b, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(m for m in BUILDABLE if METHODS[m].supports_slots))
def test_mixed_slots_equal_rows_alone(method, arch):
    a, _, tok = _attach(method, arch, slots=3, **_labels_kw(arch))
    _randomize(a, seed=1)
    x = tok(TEXTS, return_tensors="pt", padding=True)
    ids = torch.tensor([2, 0, 1])
    mixed = _out(a, x, slot_ids=ids)
    for i in range(len(TEXTS)):
        row = tok([TEXTS[i]], return_tensors="pt")
        torch.testing.assert_close(mixed[i:i + 1], _out(a, row, slot_ids=ids[i:i + 1]), atol=1e-5, rtol=1e-5)
    # the slots really differ: routing every row to slot 0 changes something
    assert not torch.allclose(mixed, _out(a, x, slot_ids=torch.zeros(3, dtype=torch.long)), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(IDENTITY_AT_INIT))
def test_identity_at_init(method, arch):
    a, pristine, tok = _attach(method, arch, **_labels_kw(arch))
    x = tok(TEXTS, return_tensors="pt", padding=True)
    pos = (x["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours, _ = a.encode(x["input_ids"], x["attention_mask"], token_type_ids=x.get("token_type_ids"))
        ref = pristine.base_model(**x, position_ids=pos).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(m for m in BUILDABLE if m != "probe"))
def test_generate_left_padded_equals_rows_alone(method, arch):
    """KV-cache decoding with the method in place; explicit positions make a left-padded batch
    decode exactly like each row alone."""
    a, _, tok = _attach(method, arch)
    _randomize(a, seed=2)
    texts = ["name cafe price cheap", "the movie"]
    x = tok(texts, return_tensors="pt", padding=True)
    new, scores = a.generate(x["input_ids"], x["attention_mask"], max_new_tokens=5, eos_token_id=[], output_scores=True)
    assert new.shape == (2, 5)
    for i, t in enumerate(texts):
        one = tok([t], return_tensors="pt")
        alone, one_scores = a.generate(one["input_ids"], max_new_tokens=5, eos_token_id=[], output_scores=True)
        assert new[i].tolist() == alone[0].tolist()
        torch.testing.assert_close(scores[i], one_scores[0], atol=1e-5, rtol=1e-5)  # ids alone hide position errors


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit", "intrinsic"])
def test_unsupported_architecture_is_refused(method):
    """A model type missing from lmadapt.arch.ARCHS: methods that need its module names refuse,
    naming the architecture and the fix."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    tok = make_tokenizer()
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="gpt_neox"):
        lmadapt.attach(model, method, tokenizer=tok)
