"""PET / iPET (lmadapt/prompting/pet.py): iPET's training sets grow as specified and take their
labels from the other models only; distillation lowers the KL to the teacher's soft labels; the
whole loop on a tiny model writes every member's and the ensemble's accuracy and resumes without
training again; `lmadapt pet` is a thin command over it."""
import json
import math

import pytest
import torch

import lmadapt
from lmadapt.cli import main
from lmadapt.data import Example
from lmadapt.objectives import distillation_kl
from lmadapt.prompting.ensemble import member_scores
from lmadapt.prompting.pet import PetConfig, distill, ipet_train_set, run_pet
from toy_prompts import TOY_PVP, causal, make_model, make_tokenizer

LABELED = [Example(f"l{i}", label=i % 2) for i in range(8)]        # 4 per class
UNLABELED = [Example(f"u{i}") for i in range(40)]


def _scores(labels, confidence=3.0):
    """(40, 2) scores whose argmax is labels[i]."""
    s = torch.zeros(len(labels), 2)
    s[torch.arange(len(labels)), torch.tensor(labels)] = confidence
    return s


def test_ipet_training_set_grows_by_the_scale_and_keeps_the_label_ratio():
    parity = [i % 2 for i in range(40)]
    # member 0 says the opposite of what members 1 and 2 agree on: its new labels must not be its own
    scores = [_scores([1 - p for p in parity]), _scores(parity), _scores(parity)]
    cfg = PetConfig(scale=3.0, share=0.25)
    for generation, size in ((1, 24), (2, 72)):   # |T| d^g = 8 * 3^g; g = 2 repeats candidates (20 per label)
        got = ipet_train_set(LABELED, UNLABELED, scores, [1, 1, 1], generation, 0, cfg)
        assert len(got) == size and got[:8] == LABELED
        new = got[8:]
        assert sum(ex.label for ex in new) == len(new) // 2            # balanced, as the labeled set
        assert all(ex.label == int(ex.text[1:]) % 2 for ex in new)      # the other models' labels
    assert len(ipet_train_set(LABELED, UNLABELED, scores, [1, 1, 1], 1, 0, PetConfig(scale=5.0))) == 40
    with pytest.raises(ValueError, match="at least 2 PVPs"):
        ipet_train_set(LABELED, UNLABELED, scores[:1], [1], 1, 0, cfg)


def test_ipet_draws_in_proportion_to_confidence():
    """PET draws new examples with probability proportional to the ensemble's confidence (max
    probability): examples at p ~ 1 are picked ~2x as often as examples at p ~ 0.5."""
    labels = [0] * 20 + [1] * 20
    logit = torch.tensor([12.0 if i % 20 < 4 else 0.01 for i in range(40)])   # 4 sure, 16 unsure per label
    s = _scores(labels) * logit[:, None]
    picks = torch.zeros(40)
    for seed in range(300):
        got = ipet_train_set(LABELED, UNLABELED, [s, s], [1, 1], 1, 0, PetConfig(scale=1.5, share=1.0, seed=seed))
        for ex in got[8:]:                                                  # 2 new per label
            picks[int(ex.text[1:])] += 1
    sure, unsure = picks[logit > 1].mean(), picks[logit < 1].mean()
    assert 1.6 < sure / unsure < 2.5, (sure, unsure)


def test_distillation_lowers_the_kl_to_the_soft_labels(tmp_path):
    examples = TOY_PVP.load("train")[:32]
    teacher = torch.randn(len(examples), 2, generator=torch.Generator().manual_seed(0)) * 2
    soft = [Example(ex.text, label=tuple(row)) for ex, row in zip(examples, teacher.tolist())]
    a = lmadapt.attach(causal()[0], "lora", task=TOY_PVP, tokenizer=make_tokenizer(), head="linear", init_seed=0)
    before = float(distillation_kl(member_scores(a, examples), teacher, 2.0))
    model, tok = causal()
    b, res = distill(lambda: (model, tok), lambda m, t: lmadapt.attach(m, "lora", task=TOY_PVP, tokenizer=t,
                                                                       head="linear", init_seed=0),
                     TOY_PVP, soft, [], tmp_path / "d", 2.0, {"max_steps": 40, "lr": 1e-2, "batch_size": 8,
                                                              "progress": False})
    after = float(distillation_kl(member_scores(b, examples), teacher, 2.0))
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    assert after < 0.7 * before, (before, after)


def test_distillation_kl_by_hand():
    # student uniform, teacher (log 3, 0): q = (3/4, 1/4) at T = 1; KL = 3/4 log(3/2) + 1/4 log(1/2)
    kl = distillation_kl(torch.zeros(1, 2), torch.tensor([[torch.log(torch.tensor(3.0)), 0.0]]), 1.0)
    assert float(kl) == pytest.approx(0.75 * torch.log(torch.tensor(1.5)).item() + 0.25 * torch.log(torch.tensor(0.5)).item())
    # T = 2 on both sides: student (2 log 2, 0) / 2 -> p = (2/3, 1/3), teacher (2 log 3, 0) / 2 ->
    # q = (3/4, 1/4); KL(q || p) = 3/4 log(9/8) + 1/4 log(3/4), times T^2 = 4
    kl2 = distillation_kl(torch.tensor([[2 * math.log(2), 0.0]]), torch.tensor([[2 * math.log(3), 0.0]]), 2.0)
    assert float(kl2) == pytest.approx(4 * (0.75 * math.log(9 / 8) + 0.25 * math.log(0.75)), rel=1e-5)
    assert float(distillation_kl(torch.ones(2, 3), torch.ones(2, 3), 2.0)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.filterwarnings("ignore::lmadapt.LmadaptWarning")
def test_ipet_end_to_end_and_resume(tmp_path, monkeypatch):
    cfg = PetConfig(shots=4, unlabeled=16, generations=2, scale=2.0, patterns=TOY_PVP.pvps[:2],
                    train={"max_steps": 2, "batch_size": 4}, final_train={"max_steps": 2, "batch_size": 4})
    res = run_pet(causal, TOY_PVP, cfg, tmp_path / "pet")
    sizes = [[m["n_train"] for m in g["members"]] for g in res["generations"]]
    # 8 + 8 new, or fewer when an untrained labeling model predicts one label only (warned)
    assert sizes[0] == [8, 8] and all(8 < n <= 16 for n in sizes[1])
    assert res["n_unlabeled"] == 16 and res["n_dev"] == 32 and res["kind"] == "ipet"
    for key in ("dev_accuracy", "distillation_kl"):
        assert isinstance(res["final"][key], float)
    assert json.loads((tmp_path / "pet" / "result.json").read_text())["generations"] == res["generations"]
    for g in (0, 1):
        for i in (0, 1):
            assert (tmp_path / "pet" / f"g{g}" / f"p{i}" / "best" / "method.json").exists()
    assert (tmp_path / "pet" / "final" / "best" / "method.json").exists()
    monkeypatch.setattr(lmadapt.api, "train", lambda *a, **k: pytest.fail("a finished model was trained again"))
    again = run_pet(causal, TOY_PVP, cfg, tmp_path / "pet")
    assert again["generations"] == res["generations"] and again["final"] == res["final"]


def test_cli_pet(tmp_path):
    d = tmp_path / "tiny"
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{'pos' if e.label else 'neg'}\n" for e in TOY_PVP.load("train")))
    code = main(["pet", "--model", str(d), "--train", str(p), "--dev", str(p), "--text-col", "sentence", "--label-col",
                 "label", "--template", "{text} it was {mask}", "--template", "{text} ? {mask}", "--verbalizer",
                 "neg=bad,pos=good", "--shots", "2", "--unlabeled", "8", "--max-steps", "1", "--final-max-steps", "1",
                 "--max-eval", "8", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(res["generations"][0]["members"]) == 2 and res["n_dev"] == 8 and res["kind"] == "pet"
