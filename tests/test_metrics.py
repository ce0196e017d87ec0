"""Metric values checked by hand (derivations in the comments). All scores are percentages."""

import pytest
import sacrebleu

from lmadapt.metrics import (METRICS, accuracy, bleu, compute, macro_f1, normalize_answer,
                             preference_accuracy, rouge_l, squad_em_f1)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0


def test_macro_f1_hand_computed():
    preds = [0, 0, 1, 1, 2, 2]
    labels = [0, 1, 1, 1, 2, 0]
    # F1 = 2TP / (2TP + FP + FN) per class:
    #   class 0: TP 1 (i=0), FP 1 (i=1), FN 1 (i=5) -> 2/4 = 0.5
    #   class 1: TP 2 (i=2,3), FP 0, FN 1 (i=1)     -> 4/5 = 0.8
    #   class 2: TP 1 (i=4), FP 1 (i=5), FN 0        -> 2/3
    assert macro_f1(preds, labels) == pytest.approx(100 * (0.5 + 0.8 + 2 / 3) / 3)


def test_macro_f1_counts_a_predicted_class_absent_from_labels():
    # Class 1 never occurs but is predicted once: its F1 is 0 and pulls the mean down.
    # class 0: TP 2, FP 0, FN 1 -> 4/5
    assert macro_f1([0, 0, 1], [0, 0, 0]) == pytest.approx(100 * (0.8 + 0.0) / 2)


def test_squad_normalization():
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  an  apple,\tA pie ") == "apple pie"
    assert squad_em_f1(["The Cat!"], [["cat"]]) == {"em": 100.0, "f1": 100.0}


def test_squad_max_over_references_and_partial_f1():
    # "the big cat" -> [big, cat]; "a cat sat" -> [cat, sat]: overlap 1, P = R = 1/2, F1 = 1/2.
    scores = squad_em_f1(["the big cat", "Denver"], [["a cat sat"], ["Broncos", "denver."]])
    assert scores["em"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (0.5 + 1.0) / 2)


def test_bleu_identical_is_100_and_matches_sacrebleu():
    hyps = ["the cat sat on the mat", "a dog barked loudly at night"]
    assert bleu(hyps, [[h] for h in hyps]) == pytest.approx(100.0)
    refs = ["the cat is on the mat", "a dog barked at night"]
    assert bleu(hyps, [[r] for r in refs]) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert bleu(hyps, [[r] for r in refs]) < 100


def test_bleu_variable_number_of_references():
    # Example 1 has three references, example 2 one; each hypothesis equals one of its references.
    hyps = ["there is a pub near the river", "the food is cheap and tasty here"]
    refs = [["a pub by the river", "there is a pub near the river", "pub, river"],
            ["the food is cheap and tasty here"]]
    assert bleu(hyps, refs) == pytest.approx(100.0)


def test_rouge_l_known_pair():
    # LCS("the cat sat on the mat", "the cat was on the mat") = "the cat on the mat" = 5 tokens;
    # P = R = 5/6, so F = 5/6.
    assert rouge_l(["the cat sat on the mat"], [["the cat was on the mat"]]) == \
        pytest.approx(100 * 5 / 6)
    # Max over references: the second reference matches exactly.
    assert rouge_l(["the cat sat on the mat"], [["dogs run", "The cat sat on the mat."]]) == \
        pytest.approx(100.0)


def test_preference_accuracy():
    assert preference_accuracy([True, False, True, True]) == 75.0


def test_compute_dispatches_every_task_metric():
    out = {
        "accuracy": compute("accuracy", [1, 0], [1, 1]),
        "macro_f1": compute("macro_f1", [1, 0], [1, 0]),
        "squad": compute("squad", ["cat"], [["the cat"]]),
        "bleu": compute("bleu", ["a b c d"], [["a b c d"]]),
        "rouge_l": compute("rouge_l", ["a b"], [["a b"]]),
        "preference_accuracy": compute("preference_accuracy", [True, False], None),
        "numeric_accuracy": compute("numeric_accuracy", ["so $1,080.", "7"], [["The answer is 1080."], ["8"]]),
    }
    assert set(out) == set(METRICS)
    assert out["accuracy"] == {"accuracy": 50.0}
    assert out["macro_f1"] == {"macro_f1": 100.0}
    assert out["squad"] == {"em": 100.0, "f1": 100.0}
    assert out["bleu"] == {"bleu": pytest.approx(100.0)}
    assert out["rouge_l"] == {"rouge_l": pytest.approx(100.0)}
    assert out["preference_accuracy"] == {"preference_accuracy": 50.0}
    assert out["numeric_accuracy"] == {"numeric_accuracy": 50.0}


def test_errors():
    with pytest.raises(ValueError, match="unknown metric 'bleurt'; choose one of: accuracy, "):
        compute("bleurt", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute("accuracy", [1, 0], [1])
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        rouge_l(["a", "b", "c"], [["a"], ["b"]])
    with pytest.raises(TypeError, match="pass a list of reference strings"):
        bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="example 1 has no reference"):
        squad_em_f1(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])
