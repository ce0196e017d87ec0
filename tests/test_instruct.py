"""Instruction tuning (lmadapt/prompting/instruct.py): an instruction renders its title, definition,
things to avoid and example exactly; examples-proportional mixing with a cap, by hand; the NLI
cluster (RTE, MNLI, SNLI) never enters the mixture (refused by name, caught in a finished
mixture); the SFT loss sees the response only; scoring an LM through an instruction template is
the zero-shot verbalizer head's, and the LM is an LM again after; the whole run and `lmadapt
instruct` on a tiny model."""
import json

import pytest
import torch

import lmadapt
from lmadapt.cli import main
from lmadapt.data import Example
from lmadapt.prompting.ensemble import member_scores
from lmadapt.prompting.instruct import (CLUSTERS, MIXTURE_TASKS, PHRASINGS, InstructConfig, Phrasing,
                                        build_mixture, check_held_out, instruction_template, mixing_counts,
                                        mixture_task, render, run_instruct, verbalized)
from lmadapt.tasks import TASKS
from conftest import SPECIALS, WORDS, make_model

EXTRA = "positive negative Task Definition Output Input Example".split()


def words_tokenizer():
    """The suite's word-level tokenizer plus the words the instruction prompts and SST-2's label
    words need (the shared vocabulary lacks 'positive' and 'negative')."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS + EXTRA)) + list(".,!?:;'\"-|[]()0123456789"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def test_render_shows_every_part_in_order():
    p = Phrasing("Sentiment", "Say positive or negative.", "Do not explain.", ("a fine film", "positive"))
    assert render(p, "bad plot") == ("Task: Sentiment\nDefinition: Say positive or negative.\nThings to avoid: "
                                     "Do not explain.\nExample input: a fine film\nExample output: positive\n\n"
                                     "Input: bad plot\nOutput:")
    assert render(Phrasing("", "Say it."), None) == "Definition: Say it.\n\nOutput:"
    assert instruction_template(PHRASINGS["rte"][0], "Premise: {text}\nHypothesis: {text_pair}").endswith(
        "\n\nInput: Premise: {text}\nHypothesis: {text_pair}\nOutput: {mask}")
    for name in MIXTURE_TASKS[:-1]:   # alpaca brings its own instruction
        parts = PHRASINGS[name]
        assert len(parts) >= 3 and any(p.avoid for p in parts) and any(p.example for p in parts) and \
            any(p.title for p in parts) and all(p.definition for p in parts)


def test_mixing_is_examples_proportional_with_a_cap():
    # capped sizes 50, 10, 50 (of 110): 40 examples -> 18.18, 3.64, 18.18 -> 18, 4, 18 (largest remainder)
    assert mixing_counts({"a": 100, "b": 10, "c": 1000}, cap=50, total=40) == {"a": 18, "b": 4, "c": 18}
    assert mixing_counts({"a": 100, "b": 10, "c": 1000}, cap=50) == {"a": 50, "b": 10, "c": 50}
    assert mixing_counts({"a": 3, "b": 1}, cap=10, total=8) == {"a": 6, "b": 2}
    with pytest.raises(ValueError, match="cap must be >= 1"):
        mixing_counts({"a": 3}, cap=0)


@pytest.fixture(scope="module")
def small_mixture():
    return build_mixture(("xsum", "alpaca"), cap=100, total=30, seed=0)


def test_mixture_examples_are_rendered_instructions(small_mixture):
    mix, counts = small_mixture
    assert counts == {"xsum": 15, "alpaca": 15} and len(mix) == 30
    assert {ex.meta["task"] for ex in mix} == {"xsum", "alpaca"}
    xsum = [ex for ex in mix if ex.meta["task"] == "xsum"]
    assert len({ex.meta["phrasing"] for ex in xsum}) > 1                  # several phrasings in use
    for ex in xsum:
        p = PHRASINGS["xsum"][ex.meta["phrasing"]]
        assert ex.text.startswith(render(p, "")[: len(render(p, "")) - len("\n\nInput: \nOutput:")])
        assert ex.text.endswith("\nOutput:") and ex.target and ex.references == [ex.target]
    again, _ = build_mixture(("xsum", "alpaca"), cap=100, total=30, seed=0)
    assert [e.text for e in again] == [e.text for e in mix]


def test_the_nli_cluster_is_never_in_the_mixture(small_mixture):
    assert CLUSTERS["nli"] == ("rte", "mnli", "snli") and not set(MIXTURE_TASKS) & set(CLUSTERS["nli"])
    for name in CLUSTERS["nli"]:
        with pytest.raises(ValueError, match=f"task '{name}' is in the held-out cluster 'nli'"):
            build_mixture(("xsum", name), total=4)
    check_held_out(small_mixture[0])
    leaked = small_mixture[0] + [Example("p", target="yes", meta={"task": "mnli"})]
    with pytest.raises(ValueError, match="holds examples of mnli, in held-out cluster"):
        check_held_out(leaked)
    with pytest.raises(ValueError, match="unknown cluster"):
        build_mixture(("xsum",), held_out=("nlu",))


def test_sft_loss_sees_the_response_only(small_mixture):
    tok = words_tokenizer()
    adapted = lmadapt.attach(make_model("llama", len(tok)), "none", tokenizer=tok)
    enc = adapted.input_encoder(512, 64)
    ex = small_mixture[0][0]
    feat = enc.encode(mixture_task(small_mixture[0]), ex)
    prompt = tok(ex.text, add_special_tokens=False)["input_ids"]
    n = len(feat["input_ids"]) - len(prompt)
    assert feat["input_ids"][:len(prompt)] == prompt and set(feat["labels"][:len(prompt)]) == {-100}
    assert feat["labels"][len(prompt):] == enc.target_ids(ex.target) and n == len(enc.target_ids(ex.target))


def test_scoring_through_an_instruction_is_the_zero_shot_head_and_the_lm_comes_back():
    tok = words_tokenizer()
    model = make_model("llama", len(tok))   # seed 0: the same weights as the fresh copy below
    rte = TASKS["rte"]
    examples = rte.load("dev")[:4]
    template = instruction_template(PHRASINGS["rte"][1], "Premise: {text}\nHypothesis: {text_pair}")
    lm = lmadapt.attach(model, "lora", tokenizer=tok, init_seed=0)
    with torch.no_grad():
        for p in lm.trainable_parameters():   # a trained-looking LoRA: its deltas must be in the scores
            p.normal_(0, 0.2)
    with verbalized(lm, rte.label_names, template, "entailment=yes,not_entailment=no"):
        got = member_scores(lm, examples, max_length=512)
        with lm.disabled():
            base = member_scores(lm, examples, max_length=512)
    assert lm.head is None and lm.num_labels is None
    assert lm(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, len(tok))   # an LM again
    plain = lmadapt.attach(make_model("llama", len(tok)), "none", task=rte, tokenizer=tok, head="verbalizer", template=template,
                           verbalizer="entailment=yes,not_entailment=no")
    torch.testing.assert_close(base, member_scores(plain, examples, max_length=512), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


def test_run_instruct_and_the_cli_on_a_tiny_model(tmp_path, capsys):
    tok = words_tokenizer()
    cfg = InstructConfig(tasks=("xsum", "alpaca"), total=16, eval_limit=6, method_args={"r": 4},
                         train={"max_steps": 3, "batch_size": 4, "lr": 1e-2, "max_length": 256})
    res = run_instruct(make_model("llama", len(tok)), tok, cfg, tmp_path / "run")
    assert set(res["metrics"]) == {"rte", "sst2"} and res["metrics"]["rte"]["held_out"]
    assert not res["metrics"]["sst2"]["held_out"] and res["mixture"]["held_out_tasks"] == ["mnli", "rte", "snli"]
    assert len(res["metrics"]["rte"]["phrasings_before"]) == 3 and res["train"]["steps"] == 3
    assert json.loads((tmp_path / "run" / "result.json").read_text())["mixture"]["n"] == 16
    d = tmp_path / "model"
    make_model("llama", len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "cli"
    assert main(["instruct", "--model", str(d), "--tasks", "xsum,alpaca", "--total", "8", "--max-steps", "2",
                 "--batch-size", "4", "--max-length", "256", "--limit", "4", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held out: mnli, rte, snli" in printed and "zero-shot before" in printed
    assert json.loads((out / "result.json").read_text())["metrics"]["rte"]["n"] == 4
    assert main(["instruct", "--model", str(d), "--tasks", "xsum,rte", "--out", str(out)]) == 2
    assert "held-out cluster 'nli'" in capsys.readouterr().err
