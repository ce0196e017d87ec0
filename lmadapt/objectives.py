"""Losses as pure functions of tensors: no model, no state.

- `cross_entropy`: classification against class indices; every classification head (linear, MLP,
  verbalizer) uses it by default, over whatever scores the head produces (for the verbalizer: the
  label words' log-probs, so this is PET's cross-entropy over label words).
- `distillation_kl`: a student's logits against a teacher's (PET's final classifier against the
  ensemble's soft labels), temperature-scaled.
- `linear_cross_entropy`: the LM loss, LM head projection fused with the cross-entropy so the
  (N, V) logits are never held at once.

Losses run in float32 whatever the autocast dtype: softmaxes are where bf16 rounding hurts most.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax(scores) (B, C) against class indices (B,)."""
    return F.cross_entropy(scores.float(), labels)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, mean over the batch.

    student, teacher: (B, C) logits. The T^2 factor keeps the gradient's scale independent of T
    (Hinton et al. 2015); PET (Schick & Schuetze 2021) distills its final classifier this way,
    with T = 2, from the ensemble's averaged scores. Zero when student == teacher."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(student.float() / temperature, -1)
    log_q = F.log_softmax(teacher.float() / temperature, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean() * temperature ** 2


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h W^T + b) against t without ever holding the (N, V) logits.

    The forward pass walks over chunks of rows: logits of one chunk, its loss, and at once its
    gradients (softmax - onehot) W and (softmax - onehot)^T h, so backward only scales them. Same
    FLOPs as the unfused path (no recomputation); at 8 x 64 tokens and a 49k vocabulary the
    unfused logits, log-softmax and their gradient would hold ~300 MB.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, t, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = len(t)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for i in range(0, n, chunk):
            hc, tc = h[i:i + chunk], t[i:i + chunk]
            logits = F.linear(hc, weight, bias).float()                 # (c, V)
            lse = logits.logsumexp(-1)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                p = logits.sub_(lse[:, None]).exp_()                     # softmax, in place
                p[torch.arange(len(tc), device=p.device), tc] -= 1       # d loss / d logits
                if need_h:
                    gh[i:i + chunk] = (p.to(weight.dtype) @ weight).to(h.dtype)
                if need_w:
                    gw += p.T @ hc.float()
                if need_b:
                    gb += p.sum(0)
        ctx.n, ctx.w_dtype = n, weight.dtype
        ctx.save_for_backward(gh, gw, gb)
        return loss / n

    @staticmethod
    def backward(ctx, grad):
        gh, gw, gb = ctx.saved_tensors
        scale = grad / ctx.n
        return (gh * scale.to(gh.dtype) if gh is not None else None,
                (gw * scale).to(ctx.w_dtype) if gw is not None else None,
                (gb * scale).to(ctx.w_dtype) if gb is not None else None, None, None)


def linear_cross_entropy(lm_head: nn.Module, h: torch.Tensor, t: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Mean cross-entropy of lm_head(h) against t: (N, H), (N,) -> scalar, chunked and fused.
    In the head's own dtype (float32 weights: float32) under bf16 autocast too: the 49k-way
    softmax is where bf16 rounding hurts most."""
    with torch.autocast(h.device.type, enabled=False):
        h = h.to(next(lm_head.parameters()).dtype)
        if not isinstance(lm_head, nn.Linear):  # any other head: the plain path
            return F.cross_entropy(lm_head(h).float(), t)
        return _LinearCrossEntropy.apply(h, lm_head.weight, lm_head.bias, t, chunk)
