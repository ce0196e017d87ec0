"""PVP ensembles (lmadapt/prompting/ensemble.py): the combination rules on hand-derived numbers,
members on a tiny model equal the single-pattern evaluations, and `lmadapt eval` zero-shot with
--limit / --out / several patterns."""
import json

import pytest
import torch

import lmadapt
from lmadapt.cli import main
from lmadapt.prompting.ensemble import average_scores, combine, evaluate_pvps, member_scores, pvps_of, use_pvp
from toy_prompts import TOY_PVP, causal, make_model, make_tokenizer

P1 = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
P2 = torch.tensor([[0.2, 0.8], [0.3, 0.7]])
P3 = torch.tensor([[0.6, 0.4], [0.45, 0.55]])


def test_combine_by_hand():
    s = [p.log() for p in (P1, P2, P3)]   # scores whose softmax is exactly P
    torch.testing.assert_close(combine(s, "mean"), torch.tensor([[1.7 / 3, 1.3 / 3], [1.15 / 3, 1.85 / 3]]))
    torch.testing.assert_close(combine(s, "weighted", [1, 0, 1]), torch.tensor([[0.75, 0.25], [0.425, 0.575]]))
    votes = combine(s, "vote")          # argmaxes: row 0 -> 0, 1, 0; row 1 -> 1, 1, 1
    torch.testing.assert_close(votes, torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0]]), atol=1e-5, rtol=0)
    tie = combine([P1.log()[:1], torch.tensor([[0.3, 0.7]]).log()], "vote")
    assert tie.argmax(-1).item() == 0   # 1 vote each; mean probability 0.6 vs 0.4 breaks the tie
    torch.testing.assert_close(average_scores([torch.ones(1, 2), 3 * torch.ones(1, 2)], [3, 1]),
                               torch.full((1, 2), 1.5))   # (3 * 1 + 1 * 3) / 4
    with pytest.raises(ValueError, match="choose one of: mean, weighted, vote"):
        combine(s, "max")
    with pytest.raises(ValueError, match="3 non-negative numbers"):
        combine(s, "weighted", [1, 1])


def test_pvps_of():
    assert pvps_of(TOY_PVP) == list(TOY_PVP.pvps)
    assert pvps_of(TOY_PVP, "2,0") == [TOY_PVP.pvps[2], TOY_PVP.pvps[0]]
    t1, t2 = "{text} {mask}", "{text} it was {mask}"
    assert pvps_of(TOY_PVP, templates=[t1, t2]) == [(t1, TOY_PVP.pvps[0][1]), (t2, TOY_PVP.pvps[0][1])]
    assert pvps_of(TOY_PVP, templates=[t1], verbalizers=["a", "b"]) == [(t1, "a"), (t1, "b")]
    with pytest.raises(ValueError, match="has PVPs 0..2"):
        pvps_of(TOY_PVP, "3")


def test_members_equal_single_pattern_runs_and_the_ensemble_combines_them():
    model, tok = causal()
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok)
    head = a.head
    dev = TOY_PVP.load("dev")
    res = evaluate_pvps(a, TOY_PVP, TOY_PVP.pvps, dev, mode="weighted", weight_examples=TOY_PVP.load("train"))
    assert a.head is head   # use_pvp put the original head back
    scores = []
    for (template, verbalizer), member in zip(TOY_PVP.pvps, res["members"]):
        alone = lmadapt.attach(causal()[0], "none", task=TOY_PVP, tokenizer=tok, template=template, verbalizer=verbalizer)
        assert member["accuracy"] == lmadapt.evaluate(alone, TOY_PVP)["accuracy"]
        scores.append(member_scores(alone, dev))
    weights = [m["weight"] for m in res["members"]]
    expected = (combine(scores, "weighted", weights).argmax(-1) == torch.tensor([e.label for e in dev])).float().mean()
    assert res["ensemble"]["accuracy"] == pytest.approx(100 * float(expected))   # accuracy is in %
    with use_pvp(a, *TOY_PVP.pvps[1], calibrate=True):
        assert a.head.calibrated and a.head.template.text == TOY_PVP.pvps[1][0]
    assert not a.head.calibrated



def _file(tmp_path):
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{'pos' if e.label else 'neg'}\n" for e in TOY_PVP.load("dev")))
    return ["--train", str(p), "--dev", str(p), "--text-col", "sentence", "--label-col", "label"]


def test_cli_zero_shot_eval_limit_out_and_patterns(tmp_path, tiny_dir, capsys):
    data = _file(tmp_path)
    common = ["eval", "--model", str(tiny_dir), *data, "--no-progress", "--verbalizer", "neg=bad,pos=good"]
    assert main([*common, "--template", "{text} it was {mask}", "--limit", "10", "--calibrate",
                 "--out", str(tmp_path / "z")]) == 0
    res = json.loads((tmp_path / "z" / "result.json").read_text())
    assert res["method"] == "none" and res["metrics"]["dev"]["n"] == 10 and res["calibrated"]
    assert res["head"]["template"] == "{text} it was {mask}" and res["head"]["calibration"] is not None
    capsys.readouterr()
    assert main([*common, "--template", "{text} it was {mask}", "--template", "{text}\\n{mask}",
                 "--out", str(tmp_path / "e")]) == 0
    printed = json.loads(capsys.readouterr().out.split("wrote")[0])
    assert [m["template"] for m in printed["members"]] == ["{text} it was {mask}", "{text}\n{mask}"]
    assert printed["accuracy"] == printed["ensemble"]["accuracy"] and printed["n"] == 32
    assert main(["eval", "--run", str(tmp_path), *data, "--template", "{text} {mask}"]) == 2
    assert "are for zero-shot evaluation without --run" in capsys.readouterr().err
