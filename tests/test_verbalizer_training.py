"""The verbalizer head trains with every method (probe excepted) on tiny LLaMA and GPT-2: the
cross-entropy over label-word scores falls, and only the method's tensors change. Then the
trainer end to end: the template is what the model reads, and the run's artifact keeps it."""
import json

import pytest
import torch

import lmadapt
from lmadapt.methods import METHODS
from toy_prompts import MULTI, TOY_PVP, causal, train_steps

TRAINS = sorted(set(METHODS) - {"probe", "none", "ipt"})   # ipt needs a decoder: test_ppt_ipt.py


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", TRAINS)
def test_verbalizer_head_trains_with_every_method(method, arch):
    model, tok = causal(arch)
    a = lmadapt.attach(model, method, task=TOY_PVP, tokenizer=tok, init_seed=0, verbalizer=MULTI,
                       template="{text} it was {mask} .")
    assert a.head_kind == "verbalizer"
    frozen = {n: p.detach().clone() for n, p in a.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in a.named_parameters() if p.requires_grad}
    assert trained, "the method has tensors to train"
    assert frozen or method == "full", "the base model is frozen"
    enc = a.input_encoder()
    batch = enc.collate([enc.classification(ex) for ex in TOY_PVP.load("train")[:16]])
    # intrinsic and ladder start at exactly the base model; a fixed, larger lr shows the fall in 8 steps
    opt = torch.optim.AdamW(a.trainable_parameters(), lr=max(METHODS[method].default_lr, 1e-3) * 3)
    losses = train_steps(a, batch, opt)
    assert losses[-1] < losses[0] - 1e-3, losses
    after = dict(a.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())          # the base did not move
    assert any(not torch.equal(after[n], v) for n, v in trained.items())     # the method did


def test_zero_shot_has_nothing_to_train():
    model, tok = causal()
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok)
    with pytest.raises(ValueError, match="method 'none' left nothing trainable"):
        lmadapt.train(a, TOY_PVP, max_steps=1, progress=False)


def test_train_reads_the_template_and_the_artifact_keeps_it(tmp_path):
    model, tok = causal()
    a = lmadapt.attach(model, "lora", task=TOY_PVP, tokenizer=tok, init_seed=0)   # default PVP 0
    seen = []
    model.base_model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("input_ids")), with_kwargs=True)
    res = lmadapt.train(a, TOY_PVP, out=tmp_path / "run", max_steps=2, batch_size=4, progress=False, ood=[])
    assert res["metrics"]["dev"]["n"] == 32
    meta = json.loads((tmp_path / "run" / "best" / "method.json").read_text())
    assert meta["head"]["kind"] == "verbalizer" and meta["head"]["template"] == TOY_PVP.pvps[0][0]
    assert meta["head"]["verbalizer"] == {"negative": ["bad"], "positive": ["good"]}
    # inputs end with the template's lead-in "it was" (causal: right before the mask)
    it_was = tok("it was", add_special_tokens=False)["input_ids"]
    assert seen and all(x[:, -2:].tolist() == [it_was] * len(x) for x in seen if x is not None)
    b = lmadapt.load_adapted(tmp_path / "run" / "best", model=causal()[0], tokenizer=tok)
    assert lmadapt.evaluate(b, TOY_PVP)["accuracy"] == res["metrics"]["dev"]["accuracy"]
