"""Ensembles over patterns, verbalizers and pattern-verbalizer pairs (PVPs).

A member is one (template, verbalizer); its scores are the verbalizer head's (N, C) outputs. Members
share one model: `use_pvp` swaps the head (it has no weights), so a zero-shot ensemble of P
patterns costs P passes over the data and one copy of the model.

Combining (N, C) member scores, `combine(mode=...)`:
- 'mean':     the average of the members' label probabilities;
- 'weighted': the same, each member weighted by its accuracy on held-out labeled examples (PET
              weights by accuracy, Schick & Schuetze 2021);
- 'vote':     majority vote of the members' argmax (ties: the higher mean probability).
PET's soft labels (pet.py) instead average the members' scores, weighted, and distill from those:
`average_scores`.
"""
from __future__ import annotations

import contextlib
import itertools

import torch

from ..evaluation import _run_batches
from ..metrics import compute
from ..precision import autocast
from .head import VerbalizerHead, calibrate as calibrate_head

MODES = ("mean", "weighted", "vote")


def pvps_of(task, patterns=None, templates=(), verbalizers=()) -> list[tuple[str, str]]:
    """The members: `patterns` indices into task.pvps ('0,2' or [0, 2]; 'all'), or every
    combination of `templates` x `verbalizers` (one template x several verbalizers ensembles over
    verbalizers, and the reverse over patterns). A lone verbalizer or template is completed from the
    task's first PVP. Nothing given: all of the task's PVPs."""
    pvps = list(getattr(task, "pvps", ()))
    if patterns is not None and (templates or verbalizers):
        raise ValueError("give --patterns (the task's PVPs by index) or --template/--verbalizer, not both")
    if templates or verbalizers:
        if not (templates and verbalizers) and not pvps:
            raise ValueError(f"task '{task.name}' has no default PVPs: give both --template and --verbalizer")
        ts = list(templates) or [pvps[0][0]]
        vs = list(verbalizers) or [pvps[0][1]]
        return list(itertools.product(ts, vs))
    if not pvps:
        raise ValueError(f"task '{task.name}' has no default PVPs (Task.pvps); give --template and --verbalizer")
    if patterns is None or patterns == "all":
        return pvps
    idx = [int(i) for i in str(patterns).split(",") if i.strip()] if isinstance(patterns, str) else list(patterns)
    bad = [i for i in idx if not 0 <= i < len(pvps)]
    if bad or not idx:
        raise ValueError(f"--patterns {patterns}: task '{task.name}' has PVPs 0..{len(pvps) - 1}:\n" +
                         "\n".join(f"  {i}: {t!r}  {v}" for i, (t, v) in enumerate(pvps)))
    return [pvps[i] for i in idx]


@contextlib.contextmanager
def use_pvp(adapted, template: str, verbalizer, calibrate: bool = False, precision: str = "auto"):
    """Run `adapted` with a verbalizer head for this PVP; the previous head comes back after."""
    old = adapted.head
    if not isinstance(old, VerbalizerHead):
        raise ValueError("PVP ensembles need the verbalizer head (attach with head='verbalizer')")
    from ..heads import build_head
    from .verbalizer import split_kind
    kind, words, extra = split_kind(verbalizer)    # 'kpt:...' or a .json spec: that kind of member
    adapted.head = build_head(adapted, kind or "verbalizer", template=template, verbalizer=words,
                              token_score=old.token_score, word_combine=old.word_combine, **extra)
    try:
        if calibrate:
            calibrate_head(adapted, precision=precision)
        yield adapted
    finally:
        adapted.head = old


@torch.no_grad()
def member_scores(adapted, examples, *, batch_size: int = 32, max_length: int = 128, precision: str = "auto",
                  progress: bool = False, desc: str = "scores") -> torch.Tensor:
    """(N, C) head scores of `examples`, in their order (batched by length)."""
    adapted.eval()
    enc = adapted.input_encoder(max_length)
    feats = [enc.classification(ex) for ex in examples]
    for f in feats:
        f.pop("labels", None)

    def run(fs):
        return list(adapted(**enc.collate(fs, adapted.device)).logits.float().cpu())
    with autocast(precision, adapted.device):
        rows = _run_batches(feats, batch_size, run, desc, progress)
    return torch.stack(rows) if rows else torch.zeros(0, adapted.num_labels)


def accuracy_of(scores: torch.Tensor, labels) -> float:
    return compute("accuracy", scores.argmax(-1).tolist(), list(labels))["accuracy"]


def combine(scores: list[torch.Tensor], mode: str = "mean", weights=None) -> torch.Tensor:
    """Member scores [(N, C)] -> (N, C) ensemble probabilities ('vote': vote shares)."""
    if mode not in MODES:
        raise ValueError(f"unknown ensemble mode '{mode}'; choose one of: {', '.join(MODES)}")
    if not scores:
        raise ValueError("an ensemble needs at least one member")
    probs = torch.stack([s.float().softmax(-1) for s in scores])           # (P, N, C)
    if mode == "vote":
        C = probs.shape[-1]
        votes = torch.nn.functional.one_hot(probs.argmax(-1), C).float().mean(0)   # (N, C)
        return votes + 1e-6 * probs.mean(0)   # ties go to the higher mean probability
    w = _weights(weights, len(scores)) if mode == "weighted" else torch.full((len(scores),), 1 / len(scores))
    return (probs * w[:, None, None]).sum(0)


def average_scores(scores: list[torch.Tensor], weights=None) -> torch.Tensor:
    """PET's merge: the (weighted) mean of the members' scores (N, C), not of probabilities."""
    w = _weights(weights, len(scores))
    return (torch.stack([s.float() for s in scores]) * w[:, None, None]).sum(0)


def _weights(weights, n: int) -> torch.Tensor:
    if weights is None:
        return torch.full((n,), 1 / n)
    w = torch.tensor([float(x) for x in weights])
    if len(w) != n or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"ensemble weights must be {n} non-negative numbers, not all 0; got {list(weights)}")
    return w / w.sum()


def evaluate_pvps(adapted, task, pvps, examples, *, mode: str = "mean", weight_examples=None,
                  calibrate: bool = False, batch_size: int = 32, max_length: int = 128,
                  precision: str = "auto", progress: bool = False) -> dict:
    """Each member's accuracy on `examples` and the ensemble's. mode='weighted' weighs members by
    their accuracy on `weight_examples` (labeled, held out from `examples`). -> {'members': [...],
    'ensemble': {...}}."""
    if mode == "weighted" and not weight_examples:
        raise ValueError("ensemble mode 'weighted' needs labeled weight_examples (held out) to weigh members by")
    labels = [ex.label for ex in examples]
    opts = dict(batch_size=batch_size, max_length=max_length, precision=precision, progress=progress)
    members, scores, weights = [], [], []
    for i, (template, verbalizer) in enumerate(pvps):
        with use_pvp(adapted, template, verbalizer, calibrate, precision):
            s = member_scores(adapted, examples, desc=f"pvp {i}", **opts)
            row = {"template": template, "verbalizer": adapted.head.verbalizer.spec(), "accuracy": accuracy_of(s, labels)}
            if mode == "weighted":
                row["weight"] = accuracy_of(member_scores(adapted, weight_examples, desc=f"weights {i}", **opts),
                                            [ex.label for ex in weight_examples])
                weights.append(row["weight"])
        members.append(row)
        scores.append(s)
    ens = combine(scores, mode, weights or None)
    return {"members": members,
            "ensemble": {"mode": mode, "accuracy": accuracy_of(ens, labels), "n": len(examples)}}
