"""The real packaged models: SmolLM2-135M (GGUF -> float cache) and all-MiniLM-L6-v2.
Few and small: the suite's behaviour tests run on tiny random models."""
import os
import time

import pytest
import torch

import lmadapt
from lmadapt.models import ModelError, resolve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def all_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def smol():
    return lmadapt.load("smollm2-135m")  # from the float cache: ~3 s; each test gets a clean model


def test_smollm2_loads_from_cache_and_generates(smol):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert next(model.parameters()).dtype == torch.float32
    t = time.perf_counter()
    path, kind = resolve("smollm2-135m")  # second resolve: the cache, no GGUF parsing
    assert kind == "causal" and (path / "model.safetensors").exists() and time.perf_counter() - t < 1.0
    a = lmadapt.attach(model, "lora", tokenizer=tok)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    x = tok([text], return_tensors="pt", add_special_tokens=False)
    out = tok.decode(a.generate(x["input_ids"], x["attention_mask"], max_new_tokens=8)[0], skip_special_tokens=True)
    assert "Paris" in out, out


def test_smollm2_lora_under_one_percent_and_trains(smol):
    model, tok = smol
    a = lmadapt.attach(model, "lora", num_labels=2, tokenizer=tok)
    assert a.num_trainable() / a.num_base() < 0.01
    x = tok(["a charming and often affecting journey", "a dull mess"], return_tensors="pt", padding=True)
    y = torch.tensor([1, 0])
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trained_before = {n: p.detach().clone() for n, p in a.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(a.trainable_parameters(), lr=1e-3, weight_decay=0.0)  # moves come from gradients
    losses = []
    for _ in range(2):  # B starts at 0, so A's gradient is 0 on step 1 (it moves on step 2)
        opt.zero_grad()
        loss = a(**x, labels=y).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    unmoved = [n for n, p in a.named_parameters() if p.requires_grad and torch.equal(p, trained_before[n])]
    assert not unmoved, unmoved[:5]                 # every LoRA A and B and the head trained
    assert losses[1] < losses[0] - 0.05, losses     # after one step, on the batch it trained on


def test_minilm_embeddings_are_real():
    model, tok = lmadapt.load("minilm-l6")
    assert model.config.model_type == "bert"
    a = lmadapt.attach(model, "probe", num_labels=2, tokenizer=tok, pooling="mean")
    x = tok(["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply."],
            return_tensors="pt", padding=True)
    with torch.no_grad():
        e = torch.nn.functional.normalize(a.features(**x), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_unknown_model_lists_choices():
    with pytest.raises(ModelError, match="unknown model 'nope'; choose one of: smollm2-135m, minilm-l6"):
        lmadapt.load("nope")
