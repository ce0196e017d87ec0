"""Evaluation metrics, all reported in percent (0-100) so every result table shares one scale.

Classification metrics are computed directly (they are a few lines); BLEU and ROUGE-L use the
reference implementations (sacrebleu, rouge-score) because their tokenization details move
scores by points and papers report those implementations. SQuAD EM/F1 follows the official
v1.1 evaluation script.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

# The names a Task may use as its `metric`; `compute` dispatches on them.
METRICS = ("accuracy", "macro_f1", "squad", "bleu", "rouge_l", "preference_accuracy", "numeric_accuracy")


def _check_lengths(predictions: Sequence, references: Sequence, what: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} "
                         "references; they must be aligned one to one")
    if not predictions:
        raise ValueError(f"{what}: no predictions to score")


def _check_references(references_list: Sequence[Sequence[str]], what: str) -> None:
    for i, refs in enumerate(references_list):
        if isinstance(refs, str):
            raise TypeError(f"{what}: references for example {i} is a string; pass a list of "
                            "reference strings per example")
        if not refs:
            raise ValueError(f"{what}: example {i} has no reference")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    _check_lengths(preds, labels, "accuracy")
    return 100.0 * sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over every class that occurs in labels or predictions
    (as sklearn's default), so predicting a class that never occurs is penalised."""
    _check_lengths(preds, labels, "macro_f1")
    classes = set(labels) | set(preds)
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        # F1 = 2TP / (2TP + FP + FN); the denominator is > 0 for every class in the union.
        scores.append(2 * tp / (2 * tp + fp + fn))
    return 100.0 * sum(scores) / len(scores)


def preference_accuracy(chosen_wins: Sequence[bool]) -> float:
    """Share of pairs where the model scores the chosen response above the rejected one."""
    if not chosen_wins:
        raise ValueError("preference_accuracy: no predictions to score")
    return 100.0 * sum(bool(w) for w in chosen_wins) / len(chosen_wins)


# --- SQuAD v1.1 (official evaluate-v1.1.py normalization) ------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (the official order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _token_f1(prediction: str, reference: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: Sequence[str], references_list: Sequence[Sequence[str]]
                ) -> dict[str, float]:
    """Exact match and token F1, each the max over an example's references, averaged, in %."""
    _check_lengths(predictions, references_list, "squad")
    _check_references(references_list, "squad")
    em = f1 = 0.0
    for pred, refs in zip(predictions, references_list):
        norm_pred = normalize_answer(pred)
        em += max(float(norm_pred == normalize_answer(r)) for r in refs)
        f1 += max(_token_f1(pred, r) for r in refs)
    n = len(predictions)
    return {"em": 100.0 * em / n, "f1": 100.0 * f1 / n}


# --- final numeric answers (GSM8K, chain-of-thought) ---------------------------------------

# A number as written in a worked solution: an optional sign (only where it cannot be a binary
# minus: "16-3" is 16 and 3), an optional '$', thousands groups ("1,250") or plain digits, decimals.
_NUMBER = re.compile(r"(?:(?<![\w)])[-\u2212])?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# Explicit answer markers, strongest first: GSM8K's "#### N", LaTeX's \boxed{N}, "The answer is N".
_MARKERS = (re.compile(r"####"), re.compile(r"\\boxed\{"), re.compile(r"answer\s+is\b\s*:?", re.I))


_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def normalize_number(s: str) -> str:
    """'$1,250.00' -> '1250', '\u22123' -> '-3', '0.50' -> '0.5': one spelling per value."""
    s = s.replace("$", "").replace(",", "").replace("\u2212", "-").strip()
    value = float(s)
    if value.is_integer():
        return str(int(value))
    return repr(value)


def final_number(text: str) -> str | None:
    """The final numeric answer of a worked solution (normalized), or None when there is none.

    The last number of the sentence after the LAST answer marker ("#### N", "\\boxed{N}", "The
    answer is N"; the sentence ends at a full stop or the line's end, so "The answer is 2 * 0.75 =
    1.75 bolts" is 1.75); without a marker (or none followed by a number in its sentence), the last
    number of the text. Robust to '$', thousands commas, units and trailing punctuation
    ("The answer is $1,250.", "18 eggs.", "25%")."""
    for marker in _MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            # the marker's sentence: to the end of its line or a full stop ("13.50" is no stop)
            rest = _SENTENCE_END.split(text[hits[-1].end():].split("\n", 1)[0], 1)[0]
            nums = _NUMBER.findall(rest)
            if nums:   # its last number: "The answer is 2 * 0.75 = 1.75 bolts" -> 1.75
                return normalize_number(nums[-1])
    nums = _NUMBER.findall(text)
    return normalize_number(nums[-1]) if nums else None


def numeric_accuracy(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """% of predictions whose final number (final_number) equals a reference's final number; a
    prediction without a number is wrong. References are worked solutions or bare numbers."""
    _check_lengths(predictions, references_list, "numeric_accuracy")
    _check_references(references_list, "numeric_accuracy")
    hits = 0
    for pred, refs in zip(predictions, references_list):
        got = final_number(pred)
        hits += got is not None and any(got == final_number(r) for r in refs)
    return 100.0 * hits / len(predictions)


# --- BLEU / ROUGE-L ---------------------------------------------------------------------------


def bleu(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exp smoothing).

    Examples may have different numbers of references (E2E: 1 to ~40 per MR). sacrebleu wants
    one stream per reference position, so short lists are padded with None, which sacrebleu skips
    (an empty string would instead count as a zero-length reference for the brevity penalty).
    """
    import sacrebleu  # imported here so `import lmadapt` stays fast

    _check_lengths(predictions, references_list, "bleu")
    _check_references(references_list, "bleu")
    width = max(len(refs) for refs in references_list)
    streams = [[refs[k] if k < len(refs) else None for refs in references_list]
               for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


_ROUGE_SCORER = None


def rouge_l(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F-measure with Porter stemming (as in summarization papers), max over an example's
    references, averaged over examples, in %."""
    global _ROUGE_SCORER
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references_list, "rouge_l")
    _check_references(references_list, "rouge_l")
    if _ROUGE_SCORER is None:
        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for pred, refs in zip(predictions, references_list):
        total += max(_ROUGE_SCORER.score(r, pred)["rougeL"].fmeasure for r in refs)
    return 100.0 * total / len(predictions)


# --- dispatch ---------------------------------------------------------------------------------


def compute(metric_name: str, predictions: Sequence, references: Sequence | None = None
            ) -> dict[str, float]:
    """Score by a Task's metric name; returns {score name: value in %}.

    accuracy / macro_f1: predictions and references are class indices. squad / bleu / rouge_l:
    predictions are strings, references a list of reference strings per example.
    numeric_accuracy: the same, compared by their final numbers (final_number).
    preference_accuracy: predictions are booleans (chosen scored above rejected); references unused.
    """
    if metric_name not in METRICS:
        raise ValueError(f"unknown metric '{metric_name}'; choose one of: {', '.join(METRICS)}")
    if references is None and metric_name != "preference_accuracy":
        raise ValueError(f"{metric_name}: references are required")
    if metric_name == "accuracy":
        return {"accuracy": accuracy(predictions, references)}
    if metric_name == "macro_f1":
        return {"macro_f1": macro_f1(predictions, references)}
    if metric_name == "squad":
        return squad_em_f1(predictions, references)
    if metric_name == "bleu":
        return {"bleu": bleu(predictions, references)}
    if metric_name == "rouge_l":
        return {"rouge_l": rouge_l(predictions, references)}
    if metric_name == "numeric_accuracy":
        return {"numeric_accuracy": numeric_accuracy(predictions, references)}
    if metric_name == "preference_accuracy":
        if references is not None:
            _check_lengths(predictions, references, "preference_accuracy")
        return {"preference_accuracy": preference_accuracy(predictions)}
    raise AssertionError(f"metric '{metric_name}' is in METRICS but has no dispatch")
