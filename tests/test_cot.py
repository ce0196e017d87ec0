"""Chain-of-thought (lmadapt/prompting/cot.py): the final number of realistic model outputs ($,
commas, units, "The answer is", "####", decimals, negatives, a continuation that runs on); GSM8K
solutions lose their <<...>> notes and end "The answer is N."; self-consistency votes the majority
of each problem's OWN chains; direct and CoT exemplars; `lmadapt cot` writes result.json and one
prediction per problem."""
import json

import pytest

import lmadapt
import lmadapt.prompting.cot as cot_mod
from lmadapt.cli import main
from lmadapt.data import Example
from lmadapt.metrics import compute, final_number
from lmadapt.prompting.cot import CotConfig, exemplar, majority_vote, run_cot
from lmadapt.tasks import TASKS, Task, gsm8k_solution
from toy_prompts import causal

OUTPUTS = [  # (a model's continuation, the number it answers)
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\nThe answer is 18.", "18"),
    ("The answer is $1,250.", "1250"),
    ("He pays 3 * $4.50 = $13.50 in total. The answer is 13.50 dollars.", "13.5"),
    ("She has 12 - 5 = 7 apples left.", "7"),
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72", "72"),
    ("The answer is: 1,000,000", "1000000"),
    ("The temperature drops to -3 degrees. The answer is -3.", "-3"),
    ("So 25% of 80 is 20 students. The answer is 20 students.", "20"),
    ("The answer is 5. Question: Tom has 3 cars and buys 2 more.", "5"),
    ("It takes 2 hours, so 2 * 60 = 120 minutes.", "120"),
    ("The answer is \\boxed{42}.", "42"),
    ("The answer is forty. In total she walked 6 km.", "6"),             # no number after the marker: the last one
    ("Each box holds 1,200 pencils, so 3 boxes hold 3,600", "3600"),
    ("I am not sure how to solve this.", None),
    ("The answer is 7.0", "7"),
    ("The answer is 2 * 0.75 = 1.75 bolts of blue fiber.", "1.75"),                 # real SmolLM2 output
    ("The answer is 3 + 4 = 7. She has 9 left over.", "7"),
    ("The answer is 18\n\nQuestion: A farmer has 12 cows. The answer is 3", "3"),   # an uncut run-on: the last marker
]


@pytest.mark.parametrize("text,number", OUTPUTS, ids=[f"out{i}" for i in range(len(OUTPUTS))])
def test_final_number_of_realistic_outputs(text, number):
    assert final_number(text) == number


def test_numeric_accuracy_compares_final_numbers():
    refs = [["Natalia sold 72 clips.\nThe answer is 72."], ["The answer is 1,080."], ["The answer is 5."]]
    assert compute("numeric_accuracy", ["#### 72", "That is $1080 in all.", "no idea"], refs) == \
        {"numeric_accuracy": pytest.approx(200 / 3)}


def test_gsm8k_solutions_lose_calculator_notes():
    answer = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day "
              "at the farmer's market.\n#### 18")
    solution, n = gsm8k_solution(answer)
    assert n == "18" and "<<" not in solution and solution == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer's market.\n"
        "The answer is 18.")
    ex = TASKS["gsm8k"].load("train")[0]
    assert ex.target.endswith(f"The answer is {ex.meta['answer']}.") and "<<" not in ex.target
    assert exemplar(TASKS["gsm8k"], ex, rationale=False) == f"Question: {ex.text}\nAnswer: The answer is {ex.meta['answer']}."
    assert exemplar(TASKS["gsm8k"], ex, rationale=True) == f"Question: {ex.text}\nAnswer: {ex.target}"


def test_majority_vote():
    assert majority_vote(["18", "20", "18", None, "20", "18"]) == "18"
    assert majority_vote([None, "7", None]) == "7"
    assert majority_vote(["5", "7", "7", "5"]) == "5"          # a tie: the earliest chain's answer
    assert majority_vote([None, None]) is None


def _toy_math(n):
    return [Example(text=" ".join(["cat"] * (i + 1)), target=f"the answer is {i + 1}.", references=["x"],
                    meta={"answer": str(i + 1)}) for i in range(n)]


TOY_MATH = Task(name="toymath", kind="generation", metric="numeric_accuracy", prompt="question : {text} answer :",
                splits={"train": lambda root: _toy_math(6), "test": lambda root: _toy_math(4)}, uses_data_root=False)


def test_self_consistency_votes_each_problems_own_chains(monkeypatch):
    """A fake decoder answers len(prompt) in 2 of every 3 chains of a prompt and 999 in the third:
    each problem's vote must be its own prompt's length (chains grouped per problem, majority)."""
    seen, calls = {}, []

    def fake(adapted, prompts, *, max_new_tokens, stops, batch_size, progress, desc, **sampling):
        calls.append((desc, sampling.get("do_sample", False)))
        out = []
        for p in prompts:
            seen[tuple(p)] = seen.get(tuple(p), 0) + 1
            wrong = sampling.get("do_sample") and seen[tuple(p)] % 3 == 0
            out.append(f"so the answer is {999 if wrong else len(p)}")
        return out
    monkeypatch.setattr(cot_mod, "decode_prompts", fake)
    model, tok = causal()
    res = run_cot(lmadapt.attach(model, "none", tokenizer=tok), TOY_MATH, CotConfig(k=2, self_consistency=3, max_new_tokens=8))
    assert [c[0] for c in calls] == ["direct", "cot", "self-consistency x3"] and calls[2][1]
    for rec in res["records"]:
        chains = rec["self_consistency"]["chains"]
        assert len(chains) == 3 and sum("999" in c for c in chains) == 1
        assert rec["self_consistency_answer"] == rec["cot_answer"] != "999"
    assert len({r["cot_answer"] for r in res["records"]}) == 4            # four problems, four prompt lengths


def test_run_cot_on_a_tiny_model_decodes_direct_cot_and_sampled_chains():
    model, tok = causal()
    adapted = lmadapt.attach(model, "none", tokenizer=tok)
    cfg = CotConfig(k=2, self_consistency=2, max_new_tokens=5, direct_max_new_tokens=3)
    a = run_cot(adapted, TOY_MATH, cfg, limit=3)
    assert set(a["metrics"]) == {"direct", "cot", "self_consistency"} and a["n"] == 3 and a["n_available"] == 4
    assert all(m["n"] == 3 and 0 <= m["numeric_accuracy"] <= 100 for m in a["metrics"].values())
    assert a["metrics"]["cot"]["exemplars"]["mean"] == 2 and len(a["exemplars"]) == 2
    b = run_cot(adapted, TOY_MATH, cfg, limit=3)
    assert [r["self_consistency"]["chains"] for r in a["records"]] == [r["self_consistency"]["chains"] for r in b["records"]]
    with pytest.raises(ValueError, match="over the window"):
        run_cot(adapted, TOY_MATH, CotConfig(k=2, max_length=20, max_new_tokens=4, overflow="error"), limit=1)


def test_cli_cot_writes_result_and_predictions(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cot"
    assert main(["cot", "--model", str(tiny_dir), "--limit", "2", "--k", "1", "--self-consistency", "2",
                 "--max-new-tokens", "4", "--out", str(out), "--no-progress"]) == 0
    assert "self_consistency" in capsys.readouterr().out
    rec = json.loads((out / "result.json").read_text())
    assert rec["task"] == "gsm8k" and rec["split"] == "test" and rec["metrics"]["test"]["n"] == 2
    assert set(rec["cot"]["metrics"]) == {"direct", "cot", "self_consistency"}
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len(json.loads(lines[0])["self_consistency"]["chains"]) == 2
    assert main(["cot", "--model", str(tiny_dir), "--task", "sst2", "--out", str(out)]) == 2
    assert "use --task gsm8k" in capsys.readouterr().err
