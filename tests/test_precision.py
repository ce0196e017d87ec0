"""--precision: auto picks bf16 only where it is fast; bf16 autocast trains and evaluates every
method with float32 master weights, optimizer state and loss."""
import pytest
import torch

import lmadapt
from lmadapt import precision as prec
from lmadapt.adapted import linear_cross_entropy
from lmadapt.trainer import TrainConfig
from conftest import TOY_CLS, TOY_GEN, make_model, make_tokenizer

METHODS = ("full", "prompt", "ptuning", "prefix", "ptuning2", "adapter", "lora", "bitfit", "ladder", "intrinsic")


def test_resolve(monkeypatch):
    assert prec.resolve("fp32", "cpu") == "fp32" and prec.resolve("bf16", "cpu") == "bf16"
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: False)
    assert prec.resolve("auto", "cpu") == "fp32" and prec.resolve(None, "cpu") == "fp32"
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)
    assert prec.resolve("auto", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of: auto, fp32, bf16"):
        prec.resolve("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        TrainConfig(precision="half")


def test_cpu_flag_detection(monkeypatch):
    monkeypatch.delenv(prec.ENV)       # conftest pins it to 0
    prec.cpu_has_fast_bf16.cache_clear()
    try:
        monkeypatch.setattr(prec, "cpu_flags", lambda: {"avx2", "fma"})
        assert prec.cpu_has_fast_bf16() is False
        prec.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setattr(prec, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
        assert prec.cpu_has_fast_bf16() is True
    finally:
        prec.cpu_has_fast_bf16.cache_clear()


def test_env_overrides_the_cpu(monkeypatch):
    monkeypatch.setattr(prec, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    try:
        for value, want in (("0", "fp32"), ("1", "bf16"), ("", "bf16")):
            monkeypatch.setenv(prec.ENV, value)
            prec.cpu_has_fast_bf16.cache_clear()
            assert prec.resolve("auto", "cpu") == want, value
        monkeypatch.setattr(prec, "cpu_flags", lambda: {"avx2"})
        monkeypatch.setenv(prec.ENV, "1")
        prec.cpu_has_fast_bf16.cache_clear()
        assert prec.resolve("auto", "cpu") == "bf16"
        monkeypatch.setenv(prec.ENV, "yes")
        prec.cpu_has_fast_bf16.cache_clear()
        with pytest.raises(ValueError, match="LMADAPT_CPU_BF16='yes': set it to 0"):
            prec.resolve("auto", "cpu")
    finally:
        prec.cpu_has_fast_bf16.cache_clear()


def test_autocast_context():
    with prec.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with prec.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_fused_lm_loss_stays_float32_under_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 97, bias=False)
    h, t = torch.randn(40, 32), torch.randint(97, (40,))
    ref = torch.nn.functional.cross_entropy(head(h), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(head, h, t, chunk=16)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-6), (got, ref)  # bf16 logits would be off by ~1e-2


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_bf16(method):
    """One bf16 run per method: finite losses close to the fp32 run's, float32 weights and AdamW
    state afterwards, and result.json says which precision ran."""
    tok = make_tokenizer()
    runs = {}
    for p in ("fp32", "bf16"):
        a = lmadapt.attach(make_model("llama", len(tok)), method, task=TOY_CLS, tokenizer=tok, init_seed=0)
        r = lmadapt.train(a, TOY_CLS, max_steps=3, batch_size=8, lr=1e-3, progress=False, precision=p, ood=[])
        runs[p] = r
        assert r["precision"] == p and r["precision_requested"] == p
        assert all(q.dtype == torch.float32 for q in a.trainable_parameters())
    l32 = [h["loss"] for h in runs["fp32"]["history"]]
    l16 = [h["loss"] for h in runs["bf16"]["history"]]
    assert all(torch.isfinite(torch.tensor(l16)))
    assert abs(l16[0] - l32[0]) < 0.05 * abs(l32[0]) + 1e-3, (l32, l16)
    assert l16 != l32  # bf16 really ran: its rounding moves the losses a little


@pytest.mark.parametrize("method", ("prefix", "prompt", "lora"))
def test_generation_under_bf16(method):
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), method, tokenizer=tok, init_seed=0)
    seen, generate = [], a.generate

    def spy(*args, **kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return generate(*args, **kw)
    a.generate = spy
    m32 = lmadapt.evaluate(a, TOY_GEN, precision="fp32", max_new_tokens=4)
    assert seen and not any(seen)
    seen.clear()
    m16 = lmadapt.evaluate(a, TOY_GEN, precision="bf16", max_new_tokens=4)
    assert seen and all(seen)  # decoding ran under bf16 autocast (prefix: bf16 keys in the cache)
    assert set(m16) == set(m32) and m16["n"] == m32["n"] == 8


def test_eval_logits_close_under_bf16():
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok, init_seed=0).eval()
    batch = tok(["the movie was good", "awful plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        x = a(batch["input_ids"], batch["attention_mask"]).logits
        with prec.autocast("bf16", "cpu"):
            y = a(batch["input_ids"], batch["attention_mask"]).logits
    assert y.dtype == torch.bfloat16 or y.dtype == torch.float32
    assert torch.allclose(x, y.float(), atol=3e-2), (x, y)
    assert not torch.equal(x, y.float())  # it did run in bf16


def test_generate_takes_precision():
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "prefix", tokenizer=tok, init_seed=0)
    seen, encode = [], a.encode

    def spy(*args, **kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return encode(*args, **kw)
    a.encode = spy
    ids = tok(["name cafe price cheap"], return_tensors="pt")
    for beams in (1, 2):
        seen.clear()
        a.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=3, num_beams=beams, precision="bf16")
        assert seen and all(seen)
        seen.clear()
        a.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=3, num_beams=beams)
        assert seen and not any(seen)
