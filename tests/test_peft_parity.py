"""Parity with PEFT 0.21 (a test-only dependency; lmadapt never imports it): adapters trained in
PEFT load with `lmadapt.from_peft` and give PEFT's outputs, and `lmadapt.to_peft` writes folders
that `PeftModel.from_pretrained` loads back to lmadapt's outputs. Also: our P-tuning encoder and
prefix MLP are PEFT's architectures (PEFT's weights load into them and give the same table).

Conventions compared (inputs without padding, no position_ids, so both are defined the same way):
- LoRA: positions untouched by either.
- prompt / P-tuning: PEFT drops position_ids and the model numbers virtual + real tokens 0..k+T-1;
  lmadapt gives virtual tokens 0..k-1 and real tokens k.. explicitly. PEFT's logits include the
  k virtual positions, which we cut off before comparing.
- prefix: both number real tokens from k (the cache length).
BERT (a bare BertModel, PEFT task FEATURE_EXTRACTION) is compared on hidden states; lmadapt's
classification head has no PEFT counterpart, so to_peft is called with drop_head=True.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import (LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,  # noqa: E402
                  PromptTuningConfig, get_peft_model)

import lmadapt  # noqa: E402
from lmadapt.methods.prefix import PrefixMLP  # noqa: E402
from lmadapt.methods.prompt import PromptEncoder, SoftTable  # noqa: E402

from conftest import make_model, make_tokenizer  # noqa: E402

K = 4
CONFIGS = {
    "lora": lambda task: LoraConfig(task_type=task, r=4, lora_alpha=8),
    "lora-all": lambda task: LoraConfig(task_type=task, r=2, lora_alpha=6, target_modules="all-linear",
                                        use_rslora=True),
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=K),
    "ptuning-mlp": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=K, encoder_hidden_size=16),
    "ptuning-lstm": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=K, encoder_hidden_size=8,
                                                     encoder_reparameterization_type="LSTM"),
    "prefix-proj": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=K, prefix_projection=True,
                                                   encoder_hidden_size=16),
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=K),
}


def peft_model(arch, kind, seed=0):
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    base = make_model(arch, len(tok))
    task = "FEATURE_EXTRACTION" if arch == "bert" else "CAUSAL_LM"
    pm = get_peft_model(copy.deepcopy(base), CONFIGS[kind](task))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero: randomize every adapter tensor
        for name, p in pm.named_parameters():
            if "lora_" in name or "prompt_encoder" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_" in name else 1.0))
    return pm.eval(), base, tok


def peft_out(pm, arch, kind, ids):
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=torch.ones_like(ids))
    x = out.last_hidden_state if arch == "bert" else out.logits
    return x[:, K:] if kind.startswith(("prompt", "ptuning")) else x     # drop virtual positions


def ours_out(adapted, ids):
    with torch.no_grad():
        out = adapted(ids, torch.ones_like(ids))
    return out.hidden if adapted.head is not None else out.logits


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_from_peft_and_back(arch, kind, tmp_path):
    pm, base, tok = peft_model(arch, kind)
    ids = tok(["the movie was very good", "it is a fun film"], return_tensors="pt")["input_ids"]
    assert ids.shape[1] == (7 if arch == "bert" else 5)               # same length: no padding
    pm.save_pretrained(tmp_path / "peft")
    want = peft_out(pm, arch, kind, ids)
    with torch.no_grad():                                              # the adapter really acts
        plain = base(input_ids=ids)                                    # (PEFT wrapped a copy)
    assert (want - (plain.last_hidden_state if arch == "bert" else plain.logits)).abs().max() > 1e-3
    head = {"num_labels": 2} if arch == "bert" else {}
    adapted = lmadapt.from_peft(copy.deepcopy(base), tmp_path / "peft", tokenizer=tok, **head)
    torch.testing.assert_close(ours_out(adapted, ids), want, atol=1e-5, rtol=0)

    lmadapt.to_peft(adapted, tmp_path / "ours", drop_head=arch == "bert")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_out(back, arch, kind, ids), want, atol=1e-5, rtol=0)


def test_to_peft_from_lmadapt_slot_and_errors(tmp_path):
    """A table trained in lmadapt (slot 2 of a serving model) reaches PEFT unchanged."""
    tok = make_tokenizer("causal")
    base = make_model("llama", len(tok))
    adapted = lmadapt.attach(copy.deepcopy(base), "ptuning2", k=K, slots=3)
    with torch.no_grad():
        adapted.delta.prefix.table.normal_()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = adapted(ids, slot_ids=torch.tensor([2])).logits
    lmadapt.to_peft(adapted, tmp_path / "p", slot=2)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["prefix_projection"] is False
    assert cfg["num_attention_heads"] == 2 and cfg["token_dim"] == 16          # GQA: n_kv heads x head_dim
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="slot 3 out of range"):
        lmadapt.to_peft(adapted, tmp_path / "q", slot=3)
    with pytest.raises(ValueError, match="no PEFT format"):
        lmadapt.to_peft(lmadapt.attach(copy.deepcopy(base), "full"), tmp_path / "q")
    bert_tok = make_tokenizer("encoder")
    with pytest.raises(ValueError, match="drop_head=True"):
        lmadapt.to_peft(lmadapt.attach(make_model("bert", len(bert_tok)), "prompt", num_labels=2), tmp_path / "q")


def test_from_peft_refuses_what_it_cannot_represent(tmp_path):
    tok = make_tokenizer("causal")
    base = make_model("llama", len(tok))
    get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", r=2, use_dora=True)).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True"):
        lmadapt.from_peft(copy.deepcopy(base), tmp_path / "dora")
    get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"],
                                                   layers_to_transform=[0])).save_pretrained(tmp_path / "l0")
    with pytest.raises(ValueError, match="layers_to_transform"):
        lmadapt.from_peft(copy.deepcopy(base), tmp_path / "l0")
    get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K)
                   ).save_pretrained(tmp_path / "prefix")
    other = make_model("gpt2", len(tok))
    with pytest.raises(ValueError, match="does not fit this gpt2 model"):
        lmadapt.from_peft(other, tmp_path / "prefix")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lmadapt.from_peft(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_ptuning_encoder_is_peft_prompt_encoder(kind):
    from peft.tuners.p_tuning.model import PromptEncoder as PeftPromptEncoder
    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=12, num_layers=2,
                              num_attention_heads=2, num_transformer_submodules=1, encoder_hidden_size=7,
                              encoder_reparameterization_type=kind.upper())
    theirs = PeftPromptEncoder(cfg).eval()
    ours = PromptEncoder(5, 12, 7, kind).eval()
    ours.load_state_dict(theirs.state_dict())                         # same names and shapes
    with torch.no_grad():
        torch.testing.assert_close(ours(), theirs(torch.arange(5)[None])[0], atol=1e-6, rtol=0)


def test_prefix_mlp_is_peft_prefix_encoder():
    from peft.tuners.prefix_tuning.model import PrefixEncoder
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=12, num_layers=3,
                             num_attention_heads=2, prefix_projection=True, encoder_hidden_size=9)
    theirs = PrefixEncoder(cfg)
    ours = PrefixMLP(5, 12, 9, 3 * 2 * 12)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(), theirs(torch.arange(5)[None])[0], atol=1e-6, rtol=0)


def test_from_peft_ptuning_is_a_plain_table_with_slots(tmp_path):
    pm, base, tok = peft_model("llama", "ptuning-mlp")
    pm.save_pretrained(tmp_path / "peft")
    adapted = lmadapt.from_peft(copy.deepcopy(base), tmp_path / "peft", slots=2)
    soft = next(m for m in adapted.modules() if isinstance(m, SoftTable))
    assert soft.encoder is None and soft.table.shape == (2, K, 32)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        got = adapted(ids, slot_ids=torch.tensor([0, 1])).logits[0]   # row 0 uses the loaded slot 0
    torch.testing.assert_close(got, peft_out(pm, "llama", "ptuning", ids)[0], atol=1e-5, rtol=0)
