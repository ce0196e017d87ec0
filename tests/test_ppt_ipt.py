"""Pre-trained prompts (PPT) and intrinsic prompt tuning (IPT), on tiny models.

PPT: the sentence pairs are what their labels say; a pre-trained prompt loads as prompt tuning's
initial table (exactly), mismatches are refused, and a run started from it reloads without it.
IPT: the auto-encoder reconstructs the training tasks' prompts; d-dim tuning trains exactly d
numbers, through the frozen decoder; its artifact (z + the decoder's path and hash) reloads to the
same outputs, and a changed decoder is refused; both stages resume after a kill to the bit, and
`lmadapt ipt` runs them and feeds `--method ipt`."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmadapt
from conftest import TOY_GEN
from lmadapt.prompting.ipt import fit_autoencoder, load_decoder, train_prompts
from lmadapt.prompting.ppt import pretrain_prompt, sentence_pairs, sentences_of
from toy_prompts import TOY_PVP, causal

DOCS = ["the movie was fun. the plot was good. the actor was great. it was a film.",
        "the cafe is cheap. the food is good. the pub is near. the price is low.",
        "a dog is near the table. the cat is on the table. it is a cat. this is a dog."]


def test_sentence_pairs_are_what_their_labels_say():
    sents = [sentences_of(d) for d in DOCS]
    assert sents[0] == ["the movie was fun.", "the plot was good.", "the actor was great.", "it was a film."]
    pairs = sentence_pairs(DOCS, 30, seed=1)
    assert [ex.label for ex in pairs] == [i % 3 for i in range(30)]
    where = {s: (d, i) for d, ss in enumerate(sents) for i, s in enumerate(ss)}
    for ex in pairs:
        (da, ia), (db, ib) = where[ex.text], where[ex.text_pair]
        if ex.label == 0:
            assert da == db and ib == ia + 1
        elif ex.label == 1:
            assert da == db and abs(ia - ib) > 1
        else:
            assert da != db
    with pytest.raises(ValueError, match="at least 2 documents"):
        sentence_pairs(["one short. doc here."], 3)


def test_pretrained_prompt_initializes_prompt_tuning(tmp_path):
    model, tok = causal()
    res = pretrain_prompt(model, tok, DOCS, tmp_path / "ppt", k=4, pairs=24, dev_pairs=6, max_steps=3,
                          verbalizer="next=yes,same_document=maybe,other_document=no",
                          batch_size=4, progress=False)
    assert res["method"] == "prompt" and res["metrics"]["dev"]["n"] == 6
    table = load_file(str(tmp_path / "ppt" / "best" / "adapter.safetensors"))["delta.prompt.table"]
    fresh, _ = causal()
    a = lmadapt.attach(fresh, "prompt", task=TOY_PVP, tokenizer=tok, k=4, init=f"pretrained:{tmp_path / 'ppt'}")
    assert torch.equal(a.delta.prompt.table[0], table)
    vocab = lmadapt.attach(causal()[0], "prompt", task=TOY_PVP, tokenizer=tok, k=4)
    assert not torch.equal(vocab.delta.prompt.table[0], table)
    with pytest.raises(ValueError, match=r"set k=4"):
        lmadapt.attach(causal()[0], "prompt", task=TOY_PVP, tokenizer=tok, k=5, init=f"pretrained:{tmp_path / 'ppt'}")
    with pytest.raises(ValueError, match="does not fit this model"):
        lmadapt.attach(causal("gpt2")[0], "prompt", task=TOY_PVP, tokenizer=tok, k=4, init=f"pretrained:{tmp_path / 'ppt'}")
    with pytest.raises(ValueError, match="pretrained:DIR"):
        lmadapt.attach(causal()[0], "prompt", task=TOY_PVP, tokenizer=tok, k=4, init="pretrain:x")
    # a few-shot run from the pre-trained prompt reloads without the PPT folder
    lmadapt.train(a, TOY_PVP, out=tmp_path / "run", max_steps=2, batch_size=4, progress=False, ood=[])
    shutil.rmtree(tmp_path / "ppt")
    b = lmadapt.load_adapted(tmp_path / "run" / "best", model=causal()[0], tokenizer=tok)
    assert b.method.init.startswith("pretrained:")
    assert torch.equal(b.delta.prompt.table, a.delta.prompt.table)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """An IPT decoder (d = 3) fit on the prompts of two toy tasks (classification + generation)."""
    out = tmp_path_factory.mktemp("ipt")
    model, tok = causal()
    prompts = train_prompts(model, tok, [TOY_PVP, TOY_GEN], out, k=4, max_train=16, max_steps=4, batch_size=4,
                            progress=False)
    mean = torch.stack(list(prompts.values())).mean(0)
    before = {n: float(((p - mean) ** 2).mean()) for n, p in prompts.items()}   # the best constant prompt
    res = fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, out, d=3, width=32, steps=100, lr=1e-2,
                          recon_weight=100.0, recon_warmup=0, batch_size=4, max_train=16)   # the joint loop alone
    return res, prompts, before


def test_autoencoder_reconstructs_the_prompts(decoder):
    res, prompts, before = decoder
    for name in prompts:
        # a decoder that ignored z could at best output the tasks' mean prompt
        assert res["recon_mse"][name] < 0.05 * before[name], (res["recon_mse"], before)
    ae, meta, codes = load_decoder(res["decoder"])
    assert meta["d"] == 3 and codes.shape == (2, 3) and meta["tasks"] == [TOY_PVP.name, TOY_GEN.name]
    assert all(not p.requires_grad for p in ae.parameters())
    for (name, P), z in zip(prompts.items(), codes):
        assert float(((ae.decode(z) - P) ** 2).mean()) == pytest.approx(res["recon_mse"][name], rel=1e-4)
    assert json.loads((Path(res["decoder"]).parent / "history.json").read_text()) == res["history"]
    first = [h for h in res["history"] if h["task"] == TOY_PVP.name]
    assert first[-1]["recon"] < first[0]["recon"]


def test_relative_reconstruction_holds_against_the_task_loss(decoder, tmp_path):
    """At recon_weight 1, the plain per-element MSE of small embeddings (~1e-4 here, ~1e-2 on
    SmolLM2) is nothing beside a task's loss, and the decoder drifts from the prompts; relative to
    the prompts' mean square (the default) it is kept within a fraction of their energy."""
    _, prompts, _ = decoder
    model, tok = causal()
    got = {}
    for kind in ("mse", "relative"):
        r = fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / kind, d=3, width=32, steps=60,
                            lr=1e-2, recon=kind, recon_warmup=0, batch_size=4, max_train=16)
        got[kind] = r["recon_relative"]
        assert load_decoder(r["decoder"])[1]["recon"] == kind
    for name in prompts:
        assert got["relative"][name] < 0.5 and got["relative"][name] < 0.5 * got["mse"][name], got
    with pytest.raises(ValueError, match="recon must be"):
        fit_autoencoder(model, tok, [TOY_PVP], prompts, tmp_path / "bad", recon="sum")


def test_reconstruction_warmup_fits_the_prompts_before_any_task_step(decoder, tmp_path):
    """recon_warmup: reconstruction-only steps first; with no joint step at all the decoder already
    gives the prompts back, where an untrained one is at a zero prompt's error (~1)."""
    _, prompts, _ = decoder
    model, tok = causal()
    cold = fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "cold", d=3, width=32, steps=0,
                           recon_warmup=0, max_train=4)
    warm = fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "warm", d=3, width=32, steps=0,
                           lr=1e-2, recon_warmup=300, max_train=4)
    assert min(cold["recon_relative"].values()) > 0.5, cold["recon_relative"]
    assert max(warm["recon_relative"].values()) < 1e-2, warm["recon_relative"]
    assert warm["recon_relative_after_warmup"] < 1e-2 and load_decoder(warm["decoder"])[1]["recon_warmup"] == 300


def test_autoencoder_resumes_after_a_kill_to_the_same_decoder(decoder, tmp_path, monkeypatch):
    """A fit killed mid-way and rerun continues from OUT/checkpoint (no second warm-up) and ends on
    the decoder an uninterrupted fit gives, to the bit; a finished fit extends to more steps the same
    way; a rerun with other settings is refused, naming them."""
    import lmadapt.prompting.ipt as ipt
    _, prompts, _ = decoder
    model, tok = causal()
    kw = dict(d=3, width=32, lr=1e-2, recon_warmup=20, batch_size=4, max_train=16, checkpoint_every=3)
    whole = fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "whole", steps=10, **kw)
    real, calls = ipt.prompt_reconstruction, {"n": 0}

    def dies_at_joint_step_8(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20 + 1 + 8:                  # 20 warm-up steps, its check, then joint step 8
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(ipt, "prompt_reconstruction", dies_at_joint_step_8)
    with pytest.raises(KeyboardInterrupt):
        fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "killed", steps=10, **kw)
    monkeypatch.setattr(ipt, "prompt_reconstruction", real)
    assert not (tmp_path / "killed" / "decoder").exists()
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["loop"]["step"] == 6
    again = fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "killed", steps=10, **kw)
    assert again["resumed_from"] == 6 and whole["resumed_from"] == 0
    assert again["history"] == whole["history"] and again["sha256"] == whole["sha256"]
    assert again["recon_relative_after_warmup"] == whole["recon_relative_after_warmup"]
    # a finished fit extended to 14 steps = 14 steps at once
    longer = fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "longer", steps=14, **kw)
    more = fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "whole", steps=14, **kw)
    assert more["resumed_from"] == 10 and more["sha256"] == longer["sha256"]
    assert load_decoder(more["decoder"])[1]["steps"] == 14
    with pytest.raises(ValueError, match=r"other settings: lr \(0.01 -> 0.02\)"):
        fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "whole", steps=14, **(kw | {"lr": 2e-2}))
    moved = {n: P + 1 for n, P in prompts.items()}
    with pytest.raises(ValueError, match="prompts_sha256"):
        fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], moved, tmp_path / "whole", steps=14, **kw)
    with pytest.raises(ValueError, match="past steps=12"):
        fit_autoencoder(model, tok, [TOY_PVP, TOY_GEN], prompts, tmp_path / "whole", steps=12, **kw)


def test_train_prompts_resumes_an_interrupted_task(tmp_path, monkeypatch, capsys):
    """A task's prompt run killed after a checkpoint resumes from it on the next call (not from step
    0) and ends on the prompt of an uninterrupted run."""
    import lmadapt.trainer as trainer
    model, tok = causal()
    kw = dict(k=4, max_train=16, max_steps=4, batch_size=4, progress=False, save_every=2, eval_every=4)
    whole = train_prompts(model, tok, [TOY_PVP], tmp_path / "whole", **kw)
    real = trainer.save_checkpoint

    def killed_after_saving(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "save_checkpoint", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        train_prompts(causal()[0], tok, [TOY_PVP], tmp_path / "killed", **kw)
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    capsys.readouterr()
    again = train_prompts(causal()[0], tok, [TOY_PVP], tmp_path / "killed", **kw)
    assert "at step 2/4" in capsys.readouterr().out
    torch.testing.assert_close(again[TOY_PVP.name], whole[TOY_PVP.name], atol=0, rtol=0)
    # a finished prompt is reused only for the settings it was trained with
    assert torch.equal(train_prompts(causal()[0], tok, [TOY_PVP], tmp_path / "whole", **kw)[TOY_PVP.name],
                       whole[TOY_PVP.name])
    with pytest.raises(ValueError, match=r"other settings: max_steps \(4 -> 6\)"):
        train_prompts(causal()[0], tok, [TOY_PVP], tmp_path / "whole", **(kw | {"max_steps": 6}))


def test_ipt_trains_exactly_d_numbers_and_reloads(decoder, tmp_path):
    res, _, _ = decoder
    model, tok = causal()
    a = lmadapt.attach(model, "ipt", task=TOY_PVP, tokenizer=tok, decoder=res["decoder"], init_seed=0)
    assert a.num_trainable() == 3
    assert [n for n, p in a.named_parameters() if p.requires_grad] == ["delta.z"]
    ae, _, codes = load_decoder(res["decoder"])
    torch.testing.assert_close(a.delta.z[0], codes.mean(0))                       # init: the subspace's centre
    torch.testing.assert_close(a.delta.virtual_tokens(1)[0], ae.decode(a.delta.z[0]))
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    enc = a.input_encoder()
    fixed = enc.collate([enc.classification(ex) for ex in TOY_PVP.load("train")[:16]])
    opt = torch.optim.AdamW(a.trainable_parameters(), lr=0.03)
    losses = []
    for _ in range(10):
        loss = a(**fixed).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        assert float(a.delta.z.grad.abs().sum()) > 0          # the gradient reaches z through the decoder
        opt.step()
    # a random tiny model at chance: 3 numbers move its loss a little, but they do move it
    assert losses[-1] < losses[0], losses
    changed = [n for n, p in a.named_parameters() if not torch.equal(before[n], p)]
    assert changed == ["delta.z"]
    r = lmadapt.train(a, TOY_PVP, out=tmp_path / "run", max_steps=2, batch_size=8, progress=False, ood=[])
    assert r["trainable_params"] == 3
    best = tmp_path / "run" / "best"
    stored = load_file(str(best / "adapter.safetensors"))
    assert list(stored) == ["delta.z"] and stored["delta.z"].numel() == 3            # d numbers
    args = json.loads((best / "method.json").read_text())["args"]
    assert args["decoder"] == res["decoder"] and args["decoder_sha256"] == res["sha256"]
    b = lmadapt.load_adapted(best, model=causal()[0], tokenizer=tok)
    batch = enc.collate([enc.classification(ex) for ex in TOY_PVP.load("dev")[:8]])
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(**batch).logits, a(**batch).logits)
    # a changed decoder would decode another prompt: refused
    from safetensors.torch import save_file
    from lmadapt.prompting.ipt import DECODER_FILE
    state = load_file(f"{res['decoder']}/{DECODER_FILE}")
    moved = tmp_path / "dec2"
    shutil.copytree(res["decoder"], moved)
    state["codes"] = state["codes"] + 1
    save_file(state, str(moved / DECODER_FILE))
    with pytest.raises(ValueError, match="weights changed"):
        lmadapt.get_method("ipt", decoder=str(moved), decoder_sha256=res["sha256"])
    with pytest.raises(ValueError, match="decoder is required"):
        lmadapt.get_method("ipt")


def test_ipt_slots_and_disabled(decoder):
    """The matrix invariants for ipt (test_matrix.py cannot build it without a decoder): mixed
    slots equal each row alone, and disabled() is the base model."""
    res, _, _ = decoder
    model, tok = causal()
    a = lmadapt.attach(model, "ipt", task=TOY_PVP, tokenizer=tok, decoder=res["decoder"], slots=3)
    with torch.no_grad():
        a.delta.z += torch.randn(a.delta.z.shape, generator=torch.Generator().manual_seed(0))
    enc = a.input_encoder()
    exs = TOY_PVP.load("dev")[:3]
    batch = enc.collate([enc.classification(ex) for ex in exs])
    ids_ = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mixed = a(**batch, slot_ids=ids_).logits
        for i, ex in enumerate(exs):
            one = enc.collate([enc.classification(ex)])
            torch.testing.assert_close(mixed[i:i + 1], a(**one, slot_ids=ids_[i:i + 1]).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mixed, a(**batch, slot_ids=torch.zeros(3, dtype=torch.long)).logits, atol=1e-5)
        none = lmadapt.attach(causal()[0], "none", task=TOY_PVP, tokenizer=tok)
        with a.disabled():
            torch.testing.assert_close(a(**batch).logits, none(**batch).logits)


def test_cli_ppt_then_train_from_it(tiny_dir, tmp_path):
    from lmadapt.cli import main
    out = tmp_path / "ppt"
    assert main(["ppt", "--model", str(tiny_dir), "--docs", "imdb", "--max-docs", "30", "--pairs", "12",
                 "--dev-pairs", "6", "--max-steps", "1", "--k", "4", "--verbalizer",
                 "next=yes,same_document=maybe,other_document=no", "--out", str(out), "--no-progress"]) == 0
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{'pos' if e.label else 'neg'}\n" for e in TOY_PVP.load("train")))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--train", str(p), "--dev", str(p), "--text-col", "sentence",
                 "--label-col", "label", "--method", "prompt", "--method-args", "k=4", "--init", f"pretrained:{out}",
                 "--template", "{text} it was {mask}", "--verbalizer", "neg=bad,pos=good", "--max-steps", "1",
                 "--max-eval", "4", "--ood", "", "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "best" / "method.json").read_text())["args"]["init"] == f"pretrained:{out}"


def test_ipt_fills_a_templates_soft_slots(decoder):
    res, _, _ = decoder
    model, tok = causal()
    a = lmadapt.attach(model, "ipt", task=TOY_PVP, tokenizer=tok, decoder=res["decoder"],
                       template="{soft:4} {text} it was {mask}", verbalizer="negative=bad,positive=good")
    enc = a.input_encoder()
    b = enc.collate([enc.classification(ex) for ex in TOY_PVP.load("dev")[:2]])
    assert (b["input_ids"] == -1).sum() == 8                          # 4 slots per row, filled in place
    with torch.no_grad():
        assert a(**b).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="has 3 soft tokens but method 'ipt' has k=4"):
        lmadapt.attach(causal()[0], "ipt", task=TOY_PVP, tokenizer=tok, decoder=res["decoder"],
                       template="{soft:3} {text} it was {mask}", verbalizer="negative=bad,positive=good")


def test_ipt_command_finds_a_subspace_resumes_and_feeds_the_ipt_method(tmp_path, capsys):
    """`lmadapt ipt`: a prompt per training task, then the decoder; rerun with more --steps it
    extends the fit from its checkpoint; the decoder trains a held-out task through --method ipt
    with d parameters; bad input exits 2 with one line."""
    from conftest import make_model, make_tokenizer
    from lmadapt.cli import main
    tiny_dir = tmp_path / "model"                  # the toy vocabulary plus SST-2's label words
    tok = make_tokenizer()
    tok.add_tokens(["terrible", "great"])
    make_model("llama", len(tok)).save_pretrained(tiny_dir)
    tok.save_pretrained(tiny_dir)
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    (root / "e2e_nlg").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "sst2" / f"{split}.tsv").write_text(
            "sentence\tlabel\n" + "".join(f"a {w} film\t{y}\n" for w, y in (("good", 1), ("bad", 0)) * 6))
    for split in ("trainset", "devset"):
        (root / "e2e_nlg" / f"{split}.csv").write_text(
            "mr,ref\n" + "".join(f'"name[cafe], price[{p}]",the cafe is {p}\n' for p in ("cheap", "high") * 6))
    out = tmp_path / "ipt"
    args = ["ipt", "--model", str(tiny_dir), "--tasks", "sst2,e2e_nlg", "--data-root", str(root), "--out", str(out),
            "--k", "4", "--prompt-steps", "2", "--max-train", "8", "--max-eval", "4", "--d", "3", "--width", "16",
            "--recon-warmup", "5", "--batch-size", "4", "--no-progress", "--checkpoint-every", "2"]
    assert main([*args, "--steps", "4"]) == 0
    said = capsys.readouterr().out
    assert f"decoder={out / 'decoder'}" in said and "resumed" not in said
    assert sorted(p.name for p in (out / "prompts").iterdir()) == ["e2e_nlg", "sst2"]
    again = [f"{tiny_dir}/." if x == str(tiny_dir) else x for x in args]     # the same model, spelled otherwise
    assert main([*again, "--steps", "6"]) == 0
    assert "resumed the auto-encoder from joint step 4" in capsys.readouterr().out
    assert load_decoder(out / "decoder")[1]["steps"] == 6
    assert main(["train", "--model", str(tiny_dir), "--task", "sst2", "--data-root", str(root), "--method", "ipt",
                 "--method-args", f"decoder={out / 'decoder'}", "--max-steps", "1", "--max-train", "8",
                 "--max-eval", "4", "--batch-size", "4", "--ood", "", "--out", str(tmp_path / "heldout"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "heldout" / "result.json").read_text())["trainable_params"] == 3
    capsys.readouterr()
    assert main([*args, "--steps", "6", "--d", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings: d (3 -> 4)" in err, err
    assert main([*args, "--steps", "6", "--tasks", "sst2, sst2"]) == 2
    assert "at least two different training tasks" in capsys.readouterr().err
    assert main([*args, "--steps", "6", "--tasks", "sst2,rte9"]) == 2
    assert "rte9" in capsys.readouterr().err
