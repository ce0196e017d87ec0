"""Evaluation: classification by head argmax, generation by the task's decoding (greedy, or beam
search where the task sets num_beams: E2E, WebNLG) against all references, preference by comparing
the log-likelihood of the chosen and rejected responses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import Encoder, is_classification
from .metrics import compute

MAIN_KEY = {"squad": "f1"}


def metric_value(task, metrics: dict) -> float:
    """The one number the best checkpoint is chosen by."""
    key = MAIN_KEY.get(task.metric, task.metric)
    if key not in metrics:
        key = next(iter(metrics))
    return float(metrics[key])


@torch.no_grad()
def predict_examples(adapted, task, examples, enc: Encoder, batch_size: int = 32, max_new_tokens: int = 48,
                     num_beams: int | None = None):
    """-> list of predictions: class indices, generated strings, or chosen>rejected booleans.
    num_beams: None decodes as the task says (task.num_beams, length_penalty, no_repeat_ngram_size)."""
    adapted.eval()
    if is_classification(task):
        preds = []
        for i in range(0, len(examples), batch_size):
            feats = [enc.classification(ex) for ex in examples[i:i + batch_size]]
            for f in feats:
                f.pop("labels", None)
            batch = enc.collate(feats, adapted.device)
            preds += adapted(**batch).logits.argmax(-1).tolist()
        return preds
    if task.kind == "preference":
        return [c > r for c, r in zip(sequence_logprobs(adapted, task, examples, enc, "target", batch_size),
                                      sequence_logprobs(adapted, task, examples, enc, "rejected", batch_size))]
    tok = adapted.tokenizer
    outs = []
    for i in range(0, len(examples), batch_size):
        feats = [enc.generation(task, ex, with_target=False) for ex in examples[i:i + batch_size]]
        batch = enc.collate(feats, adapted.device)
        new = adapted.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                               num_beams=task.num_beams if num_beams is None else num_beams,
                               length_penalty=task.length_penalty,
                               no_repeat_ngram_size=task.no_repeat_ngram_size)
        outs += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    return outs


@torch.no_grad()
def sequence_logprobs(adapted, task, examples, enc: Encoder, field: str = "target", batch_size: int = 16):
    """Sum of log p(response tokens | prompt) per example, response = example.<field>."""
    scores = []
    for i in range(0, len(examples), batch_size):
        feats = [enc.generation(task, ex, target=getattr(ex, field)) for ex in examples[i:i + batch_size]]
        batch = enc.collate(feats, adapted.device)
        labels = batch.pop("labels")
        logits = adapted(**batch).logits[:, :-1].float()               # (B, T-1, V)
        target = labels[:, 1:]
        logp = torch.gather(F.log_softmax(logits, -1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores += (logp * (target != -100)).sum(1).tolist()
    return scores


def references_of(task, examples):
    if is_classification(task):
        return [ex.label for ex in examples]
    if task.kind == "preference":
        return [True] * len(examples)
    return [ex.references or [ex.target] for ex in examples]


def evaluate_examples(adapted, task, examples, enc: Encoder, batch_size: int = 32, max_new_tokens: int = 48,
                      num_beams: int | None = None) -> dict:
    preds = predict_examples(adapted, task, examples, enc, batch_size, max_new_tokens, num_beams=num_beams)
    return compute(task.metric, preds, references_of(task, examples))
