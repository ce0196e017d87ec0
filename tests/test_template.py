"""Templates (lmadapt/prompting/template.py): rendering, where the mask is read for a causal LM and
for an MLM, the causal rewrite of text after {mask}, truncation, soft-token slots, errors, and
the built-in tasks' default PVPs."""
import pytest

from lmadapt.data import Example
from lmadapt.prompting import SOFT_TOKEN, Template
from lmadapt.tasks import CLASSIFICATION_KINDS, TASKS
from toy_prompts import ids, make_tokenizer, mlm_tokenizer


def test_causal_input_ends_right_before_the_mask():
    tok = make_tokenizer()
    t = Template("{text} it was {mask} .")
    ex = Example("the movie was fun")
    # the trailing " ." cannot be seen by a causal LM: dropped; the space moves to the label word
    assert t.render(ex, causal=True) == "the movie was fun it was"
    assert t.space_before_mask(causal=True)
    assert t.encode(tok, ex, causal=True, max_length=64)["input_ids"] == ids(tok, "the movie was fun it was")


def test_causal_moves_a_field_after_the_mask_before_its_lead_in():
    """PET's `{text} ? {mask}, {text_pair}`: the hypothesis after the mask would be invisible to a
    causal LM, so ', {text_pair}' goes before the lead-in ' ?': `{text}, {text_pair} ? {mask}`."""
    t = Template("{text} ? {mask}, {text_pair}")
    ex = Example("a cat", "a dog")
    assert t.render(ex, causal=True) == "a cat, a dog ?"
    assert t.render(ex, causal=False) == "a cat ? [MASK], a dog"   # an MLM reads it as written


def test_mlm_mask_position():
    tok = mlm_tokenizer()
    t = Template("{text} it was {mask} .")
    got = t.encode(tok, Example("the movie was fun"), causal=False, max_length=64)["input_ids"]
    # [CLS] the movie was fun it was [MASK] . [SEP]: the mask is token 7, counted by hand
    assert got == [tok.cls_token_id, *ids(tok, "the movie was fun it was"), tok.mask_token_id,
                   *ids(tok, "."), tok.sep_token_id]
    assert got.index(tok.mask_token_id) == 7 and got.count(tok.mask_token_id) == 1


def test_a_literal_mask_in_the_data_is_not_the_slot():
    tok = mlm_tokenizer()
    got = Template("{text} {mask}").encode(tok, Example("[MASK] movie"), causal=False, max_length=64)["input_ids"]
    assert got.count(tok.mask_token_id) == 1 and got[-2] == tok.mask_token_id and got[1] == tok.unk_token_id


def test_truncation_cuts_the_longest_field_never_the_template():
    tok = make_tokenizer()
    t = Template("{text} ? {mask}, {text_pair}")
    ex = Example("the movie was very good and fun", "a plot")          # 7 + 2 field tokens
    # causal: text "," pair "?" -> 7 + 1 + 2 + 1 = 11 tokens; max_length 8 takes 3 off the text's end
    got = t.encode(tok, ex, causal=True, max_length=8)["input_ids"]
    assert got == ids(tok, "the movie was very , a plot ?")
    # MLM: [CLS] [SEP] and [MASK] count too: 7 + 1 + 1 + 1 + 2 + 2 = 14 -> 10: the text loses 4
    tok = mlm_tokenizer()
    got = t.encode(tok, ex, causal=False, max_length=10)["input_ids"]
    assert got == [tok.cls_token_id, *ids(tok, "the movie was ?"), tok.mask_token_id, *ids(tok, ", a plot"),
                   tok.sep_token_id]


def test_truncation_of_the_fixed_text_is_an_error():
    with pytest.raises(ValueError, match="fixed text alone is longer than max_length=3"):
        Template("{text} it was a very good movie {mask}").encode(make_tokenizer(), Example("fun"), True, 3)


def test_soft_token_slots():
    tok = make_tokenizer()
    t = Template("{soft:2} {text} it was {soft} {mask}")
    assert t.n_soft == 3
    got = t.encode(tok, Example("fun"), causal=True, max_length=64)["input_ids"]
    assert got == [SOFT_TOKEN, SOFT_TOKEN, *ids(tok, "fun it was"), SOFT_TOKEN]


def test_spaces_move_to_the_field_and_the_word():
    """'Question: {text_pair}' must not tokenize 'Question:' + a lone ' ' + 'word' under BPE: the
    space travels with what follows (checked on the parts, tokenizer-independent)."""
    t = Template("Review: {text}\nAnswer: {mask}")
    parts = t.parts(causal=True)
    assert [(p.kind, p.value, p.lead) for p in parts] == [
        ("fixed", "Review:", ""), ("text", "", " "), ("fixed", "\nAnswer:", ""), ("mask", "", " ")]
    assert not Template("{text}\n{mask}").space_before_mask(causal=True)  # a newline stays in the input


@pytest.mark.parametrize("text, match", [
    ("{text} it was", "exactly one {mask}"),
    ("{text} {mask} {mask}", "exactly one {mask}"),
    ("it was {mask}", "must hold {text}"),
    ("{text} {label} {mask}", r"unknown field \{label\}"),
    ("{text} {mask} }", "unmatched brace"),
    ("{soft:0} {text} {mask}", "N >= 1"),
])
def test_template_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Template(text)


def test_missing_text_pair_names_the_field():
    with pytest.raises(ValueError, match=r"uses \{text_pair\} but the example has none"):
        Template("{text} ? {mask}, {text_pair}").render(Example("a cat"), causal=True)


def test_every_classification_task_has_three_pvps():
    """The defaults the verbalizer head and PET start from (they are parsed when the task is built)."""
    for name, task in TASKS.items():
        if task.kind in CLASSIFICATION_KINDS:
            assert len(task.pvps) >= 3, name
            assert all(Template(t).uses_pair == (task.kind == "pair_classification") for t, _ in task.pvps), name
