"""Losses as pure functions of tensors: no model, no state.

- `cross_entropy`: classification against class indices; every classification head (linear, MLP,
  verbalizer) uses it by default, over whatever scores the head produces (for the verbalizer: the
  label words' log-probs, so this is PET's cross-entropy over label words).
- `distillation_kl`: a student's logits against a teacher's (PET's final classifier against the
  ensemble's soft labels), temperature-scaled.
- `linear_cross_entropy`: the LM loss, LM head projection fused with the cross-entropy so the
  (N, V) logits are never held at once.
- `prototype_contrastive`, `instance_contrastive`: ProtoVerb's losses (Cui et al. 2022) over the
  prototypical verbalizer's similarities and mask embeddings (prompting/learned.py).
- `prompt_reconstruction`: intrinsic prompt tuning's auto-encoder reconstruction term (IPT).

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


def prototype_contrastive(sim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ProtoVerb's instance-prototype loss in both directions, sim (B, C) = cos(v_i, p_c) / tau:

        instance -> prototype: mean_i  -log softmax_c(sim[i])[y_i]         (a cross-entropy)
        prototype -> instance: mean over the classes c in the batch of
                               mean_{i: y_i = c} -log softmax_i(sim[:, c])[i]

    The second term pulls each prototype towards its own instances against the batch's others.
    By hand: sim = [[1, 0], [0, 1]], labels [0, 1]: every softmax is e / (e + 1), so each term is
    log(1 + 1/e) = 0.313262 and the loss 0.626523; sim = 0 (B = C = 2): log 2 + log 2 = 1.386294."""
    sim = sim.float()
    to_proto = F.cross_entropy(sim, labels)
    col = sim.log_softmax(0)                                           # (B, C) softmax over instances
    own = F.one_hot(labels, sim.shape[1]).to(sim.dtype)                 # (B, C)
    count = own.sum(0)                                                 # (C,) instances per class
    present = count > 0
    per_class = -(col * own).sum(0)[present] / count[present]
    return to_proto + per_class.mean()


def instance_contrastive(emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss between instances (ProtoVerb's instance-instance term):
    z = emb / |emb|, s_ij = z_i . z_j / T; for an anchor i with positives P(i) (same label, j != i)

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )

    averaged over the anchors that have a positive (0 when none has). By hand, T = 1:
    emb = [[1, 0], [1, 0], [0, 1]], labels [0, 0, 1]: anchors 0 and 1 each see s = 1 (positive) and
    0, so l = log(1 + 1/e) = 0.313262; anchor 2 has no positive: the loss is 0.313262.
    emb = [[1, 0], [1, 0], [0, 1], [0, 1]], labels [0, 0, 1, 1]: l_i = log(1 + 2/e) = 0.551445."""
    if temperature <= 0:
        raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
    z = F.normalize(emb.float(), dim=-1)
    s = z @ z.T / temperature                                           # (B, B)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_p = s.masked_fill(eye, float("-inf")).log_softmax(-1)           # over a != i
    pos = (labels[:, None] == labels[None, :]) & ~eye                   # (B, B)
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return emb.sum() * 0.0
    per_anchor = -(log_p.masked_fill(~pos, 0.0)).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


def prompt_reconstruction(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between decoded and original soft prompts, (.., k, H) each: IPT's
    reconstruction term. By hand: decoded [[1, 2]], target [[0, 0]]: (1 + 4) / 2 = 2.5."""
    return F.mse_loss(decoded.float(), target.float())


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
