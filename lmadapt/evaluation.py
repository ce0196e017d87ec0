"""Evaluation: classification by head argmax, generation by decoding (the task's beam width)
against all references, preference by comparing the log-likelihood of the chosen and rejected
responses.

Batches are formed in order of input length (then put back in the caller's order), so short
inputs are not padded to the length of long ones: the same predictions, less compute. Every pass
runs under the requested precision (see precision.py) and can show a progress bar in examples/s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import Encoder, is_classification
from .metrics import compute
from .precision import autocast

MAIN_KEY = {"squad": "f1"}


def metric_value(task, metrics: dict) -> float:
    """The one number the best checkpoint is chosen by."""
    key = MAIN_KEY.get(task.metric, task.metric)
    if key not in metrics:
        key = next(iter(metrics))
    return float(metrics[key])


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, dynamic_ncols=True, leave=False)


def by_length(feats: list[dict], batch_size: int):
    """Index batches of similar input length, longest first (a memory peak shows up at once)."""
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _run_batches(feats: list[dict], batch_size: int, run, desc: str, progress: bool) -> list:
    """run(list of feats) -> one result per feat; results come back in the order of `feats`."""
    out = [None] * len(feats)
    with progress_bar(len(feats), desc, progress) as bar:
        for idx in by_length(feats, batch_size):
            for i, r in zip(idx, run([feats[i] for i in idx])):
                out[i] = r
            bar.update(len(idx))
    return out


@torch.no_grad()
def predict_examples(adapted, task, examples, enc: Encoder, batch_size: int = 32, max_new_tokens: int = 48,
                     *, precision: str = "auto", progress: bool = False, num_beams: int | None = None):
    """-> list of predictions: class indices, generated strings, or chosen>rejected booleans.
    num_beams: None = the task's own beam width (Task.num_beams: 5 for E2E and WebNLG, else 1)."""
    adapted.eval()
    desc = f"eval {task.name}"
    with autocast(precision, adapted.device):
        if is_classification(task):
            feats = [enc.classification(ex) for ex in examples]
            for f in feats:
                f.pop("labels", None)
            return _run_batches(feats, batch_size, lambda fs: adapted(**enc.collate(fs, adapted.device))
                                .logits.argmax(-1).tolist(), desc, progress)
        if task.kind == "preference":
            chosen = sequence_logprobs(adapted, task, examples, enc, "target", batch_size, progress=progress)
            rejected = sequence_logprobs(adapted, task, examples, enc, "rejected", batch_size, progress=progress)
            return [c > r for c, r in zip(chosen, rejected)]
        tok = adapted.tokenizer
        beams = num_beams if num_beams is not None else task.num_beams
        extra = {"num_beams": beams, "length_penalty": task.length_penalty,
                 "no_repeat_ngram_size": task.no_repeat_ngram_size}

        def decode(fs):
            batch = enc.collate(fs, adapted.device)
            new = adapted.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens, **extra)
            return [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
        feats = [enc.generation(task, ex, with_target=False) for ex in examples]
        return _run_batches(feats, batch_size, decode, desc, progress)


@torch.no_grad()
def sequence_logprobs(adapted, task, examples, enc: Encoder, field: str = "target", batch_size: int = 16,
                      *, progress: bool = False):
    """Sum of log p(response tokens | prompt) per example, response = example.<field>."""
    def score(fs):
        batch = enc.collate(fs, adapted.device)
        labels = batch.pop("labels")
        logits = adapted(**batch).logits[:, :-1].float()               # (B, T-1, V)
        target = labels[:, 1:]
        logp = torch.gather(F.log_softmax(logits, -1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (target != -100)).sum(1).tolist()
    feats = [enc.generation(task, ex, target=getattr(ex, field)) for ex in examples]
    return _run_batches(feats, batch_size, score, f"score {task.name} ({field})", progress)


def references_of(task, examples):
    if is_classification(task):
        return [ex.label for ex in examples]
    if task.kind == "preference":
        return [True] * len(examples)
    return [ex.references or [ex.target] for ex in examples]


def evaluate_examples(adapted, task, examples, enc: Encoder, batch_size: int = 32, max_new_tokens: int = 48,
                      **kw) -> dict:
    """Metrics of predict_examples (same keyword options: precision, progress, num_beams)."""
    preds = predict_examples(adapted, task, examples, enc, batch_size, max_new_tokens, **kw)
    refs = references_of(task, examples)
    out = compute(task.metric, preds, refs)
    for extra in getattr(task, "extra_metrics", ()):
        out |= compute(extra, preds, refs)
    return out
