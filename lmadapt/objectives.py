"""Losses as pure functions of tensors: no model, no state.

- `cross_entropy`: classification against class indices; every classification head (linear, MLP,
  verbalizer) uses it by default, over whatever scores the head produces (for the verbalizer: the
  label words' log-probs, so this is PET's cross-entropy over label words).
- `distillation_kl`: a student's logits against a teacher's (PET's final classifier against the
  ensemble's soft labels), temperature-scaled.
- `linear_cross_entropy`: the LM loss, LM head projection fused with the cross-entropy so the
  (N, V) logits are never held at once; `linear_token_logprobs` the same fused and chunked, per
  token (what DPO and PPO sum or weight per sequence).
- alignment: `bradley_terry` (reward model), `dpo_loss`, `per_token_kl`, `gae`, `whiten`,
  `ppo_policy_loss`, `ppo_value_loss` (clipped), `entropy_from_logits`, `masked_mean`.
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


def prompt_reconstruction(decoded: torch.Tensor, target: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """Mean squared error between decoded and original soft prompts, (.., k, H) each: IPT's
    reconstruction term. By hand: decoded [[1, 2]], target [[0, 0]]: (1 + 4) / 2 = 2.5.
    `relative`: divided by the target's mean square, so 1.0 is what a zero prompt scores whatever
    the embeddings' scale (a per-element mean of ~1e4 entries of ~0.05 is otherwise too small to
    weigh against a task's loss). By hand: decoded [[1, 2]], target [[2, 0]]: 2.5 / 2 = 1.25."""
    mse = F.mse_loss(decoded.float(), target.float())
    return mse / target.float().pow(2).mean().clamp_min(1e-12) if relative else mse


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


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[t] per row without holding the (N, V) logits: (N,) log-probs.

    Unlike the mean cross-entropy above, each row's gradient has its own scale (DPO weights the
    chosen and rejected sums by different sigmoids, PPO each token by its advantage), so backward
    recomputes one chunk of logits at a time instead of storing them: one more (c, H) x (H, V)
    matmul per chunk, and memory for c rows of logits instead of N."""

    @staticmethod
    def forward(ctx, h, weight, bias, t, chunk):
        out = torch.empty(len(t), dtype=torch.float32, device=h.device)
        for i in range(0, len(t), chunk):
            logits = F.linear(h[i:i + chunk], weight, bias).float()       # (c, V)
            out[i:i + chunk] = logits.gather(1, t[i:i + chunk, None]).squeeze(1) - logits.logsumexp(-1)
        ctx.chunk, ctx.has_bias = chunk, bias is not None
        ctx.save_for_backward(h, weight, bias if bias is not None else h.new_zeros(0), t)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, t = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        for i in range(0, len(t), ctx.chunk):
            hc, tc, g = h[i:i + ctx.chunk], t[i:i + ctx.chunk], grad[i:i + ctx.chunk].float()
            p = F.linear(hc, weight, bias).float().softmax(-1)              # (c, V)
            p[torch.arange(len(tc), device=p.device), tc] -= 1
            d = p.mul_(-g[:, None])                                        # d out / d logits, times grad
            if need_h:
                gh[i:i + ctx.chunk] = (d.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                gw += d.T @ hc.float()
            if gb is not None:
                gb += d.sum(0)
        return (gh, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None)


def linear_token_logprobs(lm_head: nn.Module, h: torch.Tensor, t: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """log p(t_i | h_i) under lm_head: (N, H), (N,) -> (N,) float32, chunked (the logits of all N
    rows are never held, forward or backward). Equal to log_softmax(lm_head(h)).gather(t)."""
    with torch.autocast(h.device.type, enabled=False):
        h = h.to(next(lm_head.parameters()).dtype)
        if not isinstance(lm_head, nn.Linear):
            return F.log_softmax(lm_head(h).float(), -1).gather(1, t[:, None]).squeeze(1)
        return _LinearTokenLogprobs.apply(h, lm_head.weight, lm_head.bias, t, chunk)


# --- alignment: preference losses, KL, GAE and PPO ---------------------------------------------
# Shapes: (B,) per sequence; (B, T) per response token with a mask (B, T), 1 = a response token.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Pairwise reward-model loss: mean of -log sigmoid(r_chosen - r_rejected), (B,), (B,) -> scalar.

    Hand values: equal scores give -log sigmoid(0) = log 2 = 0.693147; a margin of 1 gives
    log(1 + e^-1) = 0.313262; so chosen [1, 0] against rejected [0, 0] gives their mean, 0.503204,
    and swapping the two sides gives (log(1 + e) + log 2) / 2 = (1.313262 + 0.693147) / 2 = 1.003204."""
    return F.softplus(rejected.float() - chosen.float()).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023) on summed response log-probs (B,) of policy and reference;
    -> (loss, chosen_rewards (B,), rejected_rewards (B,)), rewards = beta * (policy - reference)
    (the implicit reward, detached).

        loss = mean -log sigmoid(beta * ((pc - rc) - (pr - rr)))

    label_smoothing = e > 0 is conservative DPO (Mitchell 2023: each preference flipped with
    probability e): (1 - e) * the above + e * (-log sigmoid(-beta * ...)).

    Hand values: policy == reference gives log 2 = 0.693147 and zero rewards. pc = -1, pr = -3,
    rc = rr = -2, beta = 0.5: the log-ratio margin is 1 - (-1) = 2, times beta = 1, so the loss is
    log(1 + e^-1) = 0.313262, the rewards 0.5 and -0.5; with label_smoothing 0.1 it is
    0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262."""
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    logits = beta * (chosen_ratio - rejected_ratio)
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimates from the sampled tokens' log-probs (B, T).

    k1 = log p - log q: unbiased, can be negative per token; the penalty InstructGPT subtracts
    from the reward. k3 = (q/p) - 1 - log(q/p): unbiased and always >= 0 (Schulman 2020).
    Hand values: p = 0.5, q = 0.25: k1 = log 2 = 0.693147; k3 = 0.5 - 1 + log 2 = 0.193147.
    Both are 0 where p == q."""
    d = logp.float() - ref_logp.float()
    if estimator == "k1":
        return d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator '{estimator}'; choose one of: k1, k3")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over response tokens; (B, T) ->
    (advantages, returns), zero at masked positions. Responses are right-padded: the value after
    a response's last token is 0 (the episode ends), and padded positions never leak in.

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   R_t = A_t + V_t

    Hand values: r = [0, 0, 1], V = [0.5, 0.5, 0.5], gamma = lam = 1: delta = [0, 0, 0.5], A =
    [0.5, 0.5, 0.5], R = [1, 1, 1]. gamma = 0.9, lam = 0.5: delta = [-0.05, -0.05, 0.5], A_2 =
    0.5, A_1 = -0.05 + 0.45 * 0.5 = 0.175, A_0 = -0.05 + 0.45 * 0.175 = 0.02875; R = [0.52875,
    0.675, 1.0]. With the last position padded (mask [1, 1, 0], r = [0, 1, 0], V = [0.5, 0.5, 9]):
    A = [0.5, 0.5, 0], R = [1, 1, 0] — the pad's value 9 is ignored."""
    mask = mask.to(torch.float32)
    rewards, values = rewards.float() * mask, values.float() * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (the PPO advantage normalization); 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), (B, T) -> (loss, clip fraction):

        ratio = exp(logp - old_logp);  loss = mean max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e))

    Hand values, e = 0.2: (ratio 1.5, A = 1) -> max(-1.5, -1.2) = -1.2; (0.5, 1) -> max(-0.5,
    -0.8) = -0.5; (0.5, -1) -> max(0.5, 0.8) = 0.8; (1.0, 2) -> -2. Mean -0.725; three of the four
    ratios lie outside [0.8, 1.2], so the clip fraction is 0.75."""
    ratio = torch.exp(logp.float() - old_logp.float())
    a = advantages.float()
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
    clipped = ((ratio - 1).abs() > clip_range).float()
    return masked_mean(loss, mask), masked_mean(clipped, mask).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, (B, T) -> (loss, clip fraction): the new value may move at most e from
    the rollout's, and the worse of the two squared errors counts:

        loss = 0.5 * mean max((V - R)^2, (V_old + clip(V - V_old, -e, e) - R)^2)

    Hand values, e = 0.2: V = 1.0, V_old = 0.5, R = 1.0 -> clipped V = 0.7, max(0, 0.09) = 0.09;
    V = 0.5, V_old = 0.5, R = 1.5 -> max(1, 1) = 1. Loss 0.5 * (0.09 + 1) / 2 = 0.2725; clip
    fraction 0.5."""
    v, old = values.float(), old_values.float()
    clipped_v = old + (v - old).clamp(-clip_range, clip_range)
    loss = 0.5 * torch.maximum((v - returns) ** 2, (clipped_v - returns) ** 2)
    return masked_mean(loss, mask), masked_mean(((v - old).abs() > clip_range).float(), mask).detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: (..., V) -> (...). Uniform over V: log V."""
    logp = F.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)
