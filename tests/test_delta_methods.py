"""adapter, bitfit, intrinsic, ladder on tiny LLaMA / GPT-2 / BERT: identity at init, only the
method's tensors change in a step, save -> load, disabled == base, mixed slots == rows alone,
left-padded generation == rows alone; intrinsic's artifact and gradient; ladder's memory claim;
trainable % on SmolLM2-135M's shape."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCHS, CAUSAL, load_merged, make_model, make_tokenizer, plain_hidden

import lmadapt
from lmadapt.methods.intrinsic import _SubspaceLinear, sketch_weight

METHODS = ("adapter", "bitfit", "intrinsic", "ladder")
SLOTTED = ("adapter", "bitfit")
TEXTS = ["the movie was very good", "bad plot", "it was not fun and the actor was awful"]


def build(arch, method, *, lm=False, slots=1, **args):
    """-> (adapted, untouched copy of the base, tokenizer). lm: keep the LM head (causal only)."""
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    model = make_model(arch, len(tok))
    base = copy.deepcopy(model)
    adapted = lmadapt.attach(model, method, tokenizer=tok, num_labels=None if lm else 2, slots=slots, **args)
    return adapted, base, tok


def batch(tok, texts=TEXTS):
    return tok(texts, padding=True, return_tensors="pt")


def unpadded(tok, n=3, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, len(tok), (n, T), generator=g)


def randomize(adapted, seed=1, std=0.1):
    """Non-zero method tensors (so the delta is not the identity), different in every slot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def base_hidden(base, ids):
    return base.base_model(input_ids=ids).last_hidden_state


def loss_of(adapted, tok, lm):
    b = batch(tok)
    if lm:
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        return adapted(b["input_ids"], b["attention_mask"], labels=labels).loss
    return adapted(**b, labels=torch.tensor([1, 0, 0])).loss


# --- identity, one step, save/load, disabled ------------------------------------------------------
@pytest.mark.parametrize("method,args", [("adapter", {}), ("adapter", {"placement": "pfeiffer", "activation": "gelu"}),
                                         ("bitfit", {}), ("intrinsic", {}), ("ladder", {})])
def test_identity_at_init(arch, method, args):
    adapted, base, tok = build(arch, method, **args)
    ids = unpadded(tok)
    torch.testing.assert_close(adapted(ids).hidden, base_hidden(base, ids), atol=1e-6, rtol=0)
    if arch in CAUSAL:
        adapted, base, tok = build(arch, method, lm=True, **args)
        torch.testing.assert_close(adapted(ids).logits, base(input_ids=ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_only_the_method(arch, method):
    lm = arch in CAUSAL
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    model = make_model(arch, len(tok))
    snapshot = [(name, t, t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()]
    base_ids = {id(p) for p in model.parameters()}
    adapted = lmadapt.attach(model, method, tokenizer=tok, num_labels=None if lm else 2)
    trainable = dict((n, p) for n, p in adapted.named_parameters() if p.requires_grad)
    assert trainable and not base_ids & {id(p) for p in trainable.values()}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    loss0 = loss_of(adapted, tok, lm)
    assert loss0.item() > 0.1                                  # a loss with something to learn
    loss0.backward()
    opt.step()
    for name, t, old in snapshot:
        assert t.grad is None, f"base tensor {name} received a gradient"
        assert torch.equal(t, old), f"base tensor {name} changed"
    changed = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert changed, "no method tensor changed"
    with torch.no_grad():
        assert not torch.equal(loss_of(adapted, tok, lm), loss0.detach())


@pytest.mark.parametrize("method", METHODS)
def test_save_load_gives_equal_outputs(arch, method, tmp_path):
    lm = arch in CAUSAL
    adapted, base, tok = build(arch, method, lm=lm)
    randomize(adapted)
    adapted.save(tmp_path / "art")
    loaded = lmadapt.load_adapted(tmp_path / "art", model=copy.deepcopy(base), tokenizer=tok)
    b = batch(tok)
    with torch.no_grad():
        want, got = adapted.eval()(**b), loaded(**b)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)
    with torch.no_grad(), loaded.disabled():                   # the artifact carried a real delta
        assert not torch.allclose(loaded(**b).logits, got.logits, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_disabled_equals_base(arch, method):
    adapted, base, tok = build(arch, method)
    randomize(adapted)
    ids = unpadded(tok)
    with torch.no_grad():
        with adapted.disabled():
            torch.testing.assert_close(adapted(ids).hidden, base_hidden(base, ids), atol=1e-6, rtol=0)
        assert (adapted(ids).hidden - base_hidden(base, ids)).abs().max() > 1e-3   # the delta is on again


# --- slots -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", SLOTTED)
def test_mixed_slots_equal_rows_alone(arch, method):
    adapted, _, tok = build(arch, method, slots=3)
    randomize(adapted)
    b = batch(tok)
    slot_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mixed = adapted(**b, slot_ids=slot_ids).logits                       # (3, 2)
        for i, text in enumerate(TEXTS):
            alone = adapted(**batch(tok, [text]), slot_ids=slot_ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0)
        # slot_ids=None (the fast path) is slot 0 for every row
        torch.testing.assert_close(adapted(**b).logits, adapted(**b, slot_ids=torch.zeros(3, dtype=torch.long)).logits,
                                   atol=1e-6, rtol=0)
        assert not torch.allclose(mixed, adapted(**b).logits, atol=1e-4)


@pytest.mark.parametrize("method", ("intrinsic", "ladder"))
def test_single_set_methods_refuse_slots(method):
    with pytest.raises(ValueError, match="cannot take slots"):
        build("llama", method, slots=2)


# --- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch_c", CAUSAL)
@pytest.mark.parametrize("method", METHODS)
def test_generate_left_padded_equals_rows_alone(arch_c, method):
    adapted, _, tok = build(arch_c, method, lm=True)
    randomize(adapted, std=0.05)
    adapted.eval()
    b = batch(tok)
    out, scores = adapted.generate(b["input_ids"], b["attention_mask"], max_new_tokens=5, eos_token_id=-1,
                                   output_scores=True)
    assert out.shape == (3, 5)
    for i, text in enumerate(TEXTS):
        one = batch(tok, [text])
        alone, one_scores = adapted.generate(one["input_ids"], one["attention_mask"], max_new_tokens=5,
                                             eos_token_id=-1, output_scores=True)
        assert torch.equal(out[i:i + 1], alone), (i, out[i].tolist(), alone[0].tolist())
        torch.testing.assert_close(scores[i], one_scores[0], atol=1e-5, rtol=1e-5)  # ids alone hide position errors


# --- merge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,arch_m", [("bitfit", "gpt2"), ("bitfit", "bert"), ("intrinsic", "llama"),
                                           ("intrinsic", "gpt2")])
def test_merged_equals_unmerged(method, arch_m):
    """merge() really moves the delta into the base tensors: they change, the merged base weights
    alone (a plain copy of the model) give the adapted outputs, and unmerge() puts them back."""
    adapted, base, tok = build(arch_m, method)
    randomize(adapted, std=0.05)
    b = batch(tok)
    base_layers = [m.base for m in adapted.method.layers(adapted)]
    before = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in base_layers]
    with torch.no_grad():
        want = adapted(**b)
        assert (want.hidden - plain_hidden(base, b)).abs().max() > 1e-3          # a real delta
        adapted.merge()
        unchanged = [i for i, (m, old) in enumerate(zip(base_layers, before))
                     if all(torch.equal(v, old[k]) for k, v in m.state_dict().items())]
        assert not unchanged, f"merge() left base layers {unchanged} unchanged"
        torch.testing.assert_close(adapted(**b).logits, want.logits, atol=1e-5, rtol=0)
        alone = plain_hidden(load_merged(adapted, copy.deepcopy(base)), b)
        torch.testing.assert_close(alone, want.hidden, atol=1e-5, rtol=1e-5)
        adapted.merge()                                                           # idempotent
        torch.testing.assert_close(adapted(**b).logits, want.logits, atol=1e-5, rtol=0)
        adapted.unmerge()
        for m, old in zip(base_layers, before):
            for k, v in m.state_dict().items():
                torch.testing.assert_close(v, old[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(adapted(**b).logits, want.logits, atol=1e-5, rtol=0)
        with adapted.disabled():                                                  # the delta is live again
            torch.testing.assert_close(adapted(**b).hidden, plain_hidden(base, b), atol=1e-5, rtol=0)


def test_bitfit_merge_refuses_several_slots():
    adapted, _, _ = build("gpt2", "bitfit", slots=2)
    randomize(adapted)
    biases = [m.base.bias.detach().clone() for m in adapted.method.layers(adapted)]
    with pytest.raises(ValueError, match=r"merge\(\) needs a single slot"):
        adapted.merge()
    assert all(torch.equal(m.base.bias, b) for m, b in zip(adapted.method.layers(adapted), biases))


def test_mergeable_methods_are_lora_bitfit_intrinsic():
    from lmadapt.methods import METHODS as REGISTERED
    assert {n for n, c in REGISTERED.items() if hasattr(c, "merge")} == {"lora", "bitfit", "intrinsic"}


@pytest.mark.parametrize("method", ["adapter", "ladder", "full", "probe", "prompt", "ptuning", "prefix", "ptuning2"])
def test_methods_that_cannot_merge_refuse(method):
    adapted, _, _ = build("gpt2", method)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    for call in (adapted.merge, adapted.unmerge):
        with pytest.raises(ValueError, match=f"method '{method}' cannot be merged into the base weights"):
            call()
    assert all(torch.equal(v, before[k]) for k, v in adapted.state_dict().items())


def test_bitfit_on_llama_adds_biases_and_refuses_merge():
    adapted, base, _ = build("llama", "bitfit")
    per_layer = sum(m.out_features for m in base.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert adapted.num_trainable() - adapted.head.weight.numel() - adapted.head.bias.numel() == 2 * per_layer
    with pytest.raises(ValueError, match="no base bias"):
        adapted.merge()


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="choose one of: houlsby, pfeiffer"):
        build("llama", "adapter", placement="parallel")
    with pytest.raises(ValueError, match="choose one of: relu, gelu"):
        build("llama", "adapter", activation="tanh")
    with pytest.raises(ValueError, match="linear layers present"):
        build("gpt2", "intrinsic", targets=("q_proj",))
    with pytest.raises(ValueError, match="attach with layer=-1"):
        build("llama", "ladder", layer=1)


# --- intrinsic ---------------------------------------------------------------------------------------
def test_intrinsic_artifact_is_z_and_seed(tmp_path):
    adapted, base, tok = build("llama", "intrinsic", lm=True, d=64, seed=7)
    randomize(adapted, std=0.02)
    size = adapted.save(tmp_path / "art")
    meta, state = lmadapt.adapted.read_artifact(tmp_path / "art")
    assert list(state) == ["delta.z"] and state["delta.z"].shape == (64,)
    assert meta["args"]["seed"] == 7 and meta["args"]["d"] == 64
    assert size < 4096, size                                   # 256 bytes of z + headers + method.json
    assert not any("row_off" in k for k in adapted.state_dict())  # P is rebuilt, never stored
    # the seed matters: the same z under another seed's projection gives other outputs
    other, _, _ = build("llama", "intrinsic", lm=True, d=64, seed=8)
    other.load_state(state)
    ids = unpadded(tok)
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, adapted(ids).logits, atol=1e-4)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_intrinsic_gradient_matches_plain_autograd(fan_in_fan_out):
    torch.manual_seed(0)
    d, n_in, n_out = 11, 7, 5
    x = torch.randn(2, 3, n_in, dtype=torch.double, requires_grad=True)
    w0 = torch.randn((n_in, n_out) if fan_in_fan_out else (n_out, n_in), dtype=torch.double)
    bias = torch.randn(n_out, dtype=torch.double)
    z = torch.randn(d, dtype=torch.double, requires_grad=True)
    bufs = (torch.randint(d, (n_out,)), torch.randint(d, (n_in,)),
            torch.randint(2, (n_out,)).double() * 2 - 1, torch.randint(2, (n_in,)).double() * 2 - 1)
    sk = sketch_weight(z, *bufs)
    idx = (bufs[0][:, None] + bufs[1][None, :]) % d            # the definition, index by index
    torch.testing.assert_close(sk, z[idx] * bufs[2][:, None] * bufs[3][None, :])
    ref = torch.nn.functional.linear(x, (w0.T if fan_in_fan_out else w0) + 0.3 * sk, bias)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, z), g)
    out = _SubspaceLinear.apply(x, w0, bias, z, *bufs, 0.3, fan_in_fan_out)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (x, z), g), want):
        torch.testing.assert_close(a, b)


# --- ladder ------------------------------------------------------------------------------------------
def saved_for_backward(adapted, ids) -> tuple[int, list[tuple], torch.Tensor]:
    """(bytes, shapes) of what autograd keeps for backward during one LM forward, parameters
    excluded, and the loss."""
    params = {p.untyped_storage().data_ptr() for p in adapted.parameters()}
    seen, shapes, total = set(), [], 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key[0] not in params and key not in seen:
            seen.add(key)
            shapes.append(tuple(t.shape))
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = adapted(ids, labels=ids).loss
    return total, shapes, loss


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_intrinsic_keeps_no_weight_sized_tensor_for_backward():
    adapted = lmadapt.attach(small_llama(), "intrinsic")
    weight_shapes = {tuple(m.base.weight.shape) for m in adapted.method.layers(adapted)}
    _, shapes, loss = saved_for_backward(adapted, torch.randint(256, (2, 16)))
    assert not weight_shapes & set(shapes), "an (out, in) weight was kept for backward"
    loss.backward()
    assert adapted.delta.z.grad.abs().sum() > 0


def test_ladder_keeps_the_backbone_out_of_backward():
    ids = torch.randint(256, (4, 64), generator=torch.Generator().manual_seed(0))
    saved = {}
    for method in ("full", "ladder"):
        model = small_llama()
        adapted = lmadapt.attach(model, method)
        saved[method], _, loss = saved_for_backward(adapted, ids)
        loss.backward()
        if method == "ladder":
            assert all(p.grad is None and not p.requires_grad for p in model.parameters())
            assert all(p.grad is not None for p in adapted.delta.parameters())
    print(f"saved for backward: full {saved['full'] / 2**20:.2f} MiB, ladder {saved['ladder'] / 2**20:.2f} MiB")
    assert saved["ladder"] < 0.2 * saved["full"], saved


# --- SmolLM2-135M's shape ----------------------------------------------------------------------------
def smollm2_shape():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):  # shapes only: no memory, no init time
        return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("method", METHODS)
def test_trainable_percent_on_smollm2_shape(method):
    adapted = lmadapt.attach(smollm2_shape(), method)
    pct = 100 * adapted.num_trainable() / adapted.num_base()
    print(f"{method}: {adapted.num_trainable():,} trainable of {adapted.num_base():,} = {pct:.4f}%")
    assert 134_000_000 < adapted.num_base() < 135_000_000
    if method != "ladder":  # ladder's side network is ~2% at reduction 8; it trades params for memory
        assert pct < 1.0
