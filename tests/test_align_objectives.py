"""The alignment losses (objectives.py) against the values derived by hand in their docstrings,
the fused per-token log-probs against the unfused ones, and our DPO loss against TRL's own
DPOTrainer loss code on the same log-probs (no model built)."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmadapt.objectives import (bradley_terry, dpo_loss, entropy_from_logits, gae, linear_token_logprobs,
                                per_token_kl, ppo_policy_loss, ppo_value_loss, whiten)

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_bradley_terry_hand_values():
    assert close(bradley_terry(T([0.3]), T([0.3])), math.log(2))
    assert close(bradley_terry(T([1.0, 0.0]), T([0.0, 0.0])), 0.503204)
    assert close(bradley_terry(T([0.0, 0.0]), T([1.0, 0.0])), 1.003204)


def test_dpo_hand_values():
    loss, cr, rr = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5)
    assert close(loss, 0.313262) and close(cr, [0.5]) and close(rr, [-0.5])
    same = dpo_loss(T([-4.0, -1.0]), T([-2.0, -7.0]), T([-4.0, -1.0]), T([-2.0, -7.0]), beta=0.1)
    assert close(same[0], math.log(2)) and close(same[1], [0, 0]) and close(same[2], [0, 0])
    smooth = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, label_smoothing=0.1)[0]
    assert close(smooth, 0.413262)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0)


def test_per_token_kl_hand_values():
    p, q = T([math.log(0.5)]), T([math.log(0.25)])
    assert close(per_token_kl(p, q, "k1"), [0.693147]) and close(per_token_kl(p, q, "k3"), [0.193147])
    assert close(per_token_kl(p, p, "k3"), [0.0])
    with pytest.raises(ValueError, match="k1, k3"):
        per_token_kl(p, q, "k2")


def test_gae_hand_values():
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[1, 1, 1]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.5, 0.5]]) and close(ret, [[1.0, 1.0, 1.0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    assert close(adv, [[0.02875, 0.175, 0.5]]) and close(ret, [[0.52875, 0.675, 1.0]])
    # a padded last position: its value must not leak into the advantages
    adv, ret = gae(T([[0.0, 1.0, 0.0]]), T([[0.5, 0.5, 9.0]]), T([[1, 1, 0]]), gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.5, 0.0]]) and close(ret, [[1.0, 1.0, 0.0]])


def test_ppo_policy_loss_hand_values():
    ratio = T([[1.5, 0.5, 0.5, 1.0]])
    old = T([[0.0, 0.0, 0.0, 0.0]])
    loss, clip = ppo_policy_loss(ratio.log(), old, T([[1.0, 1.0, -1.0, 2.0]]), T([[1, 1, 1, 1]]), 0.2)
    assert close(loss, -0.725) and close(clip, 0.75)
    # a masked token does not count
    loss, clip = ppo_policy_loss(ratio.log(), old, T([[1.0, 1.0, -1.0, 2.0]]), T([[1, 1, 1, 0]]), 0.2)
    assert close(loss, (-1.2 - 0.5 + 0.8) / 3) and close(clip, 1.0)


def test_ppo_value_loss_hand_values():
    loss, clip = ppo_value_loss(T([[1.0, 0.5]]), T([[0.5, 0.5]]), T([[1.0, 1.5]]), T([[1, 1]]), 0.2)
    assert close(loss, 0.2725) and close(clip, 0.5)


def test_whiten_and_entropy():
    x, m = T([[1.0, 3.0, 100.0]]), T([[1, 1, 0]])
    assert close(whiten(x, m), [[-1.0, 1.0, 0.0]], tol=1e-4)
    assert close(entropy_from_logits(torch.zeros(2, 8)), [math.log(8)] * 2)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_token_logprobs_equal_unfused_values_and_gradients(bias):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias)
    h = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(50, (37,))
    w = torch.randn(37)                          # a different weight per row, as DPO / PPO give
    ours = linear_token_logprobs(head, h, t, chunk=8)
    (ours * w).sum().backward()
    g_ours = (h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone() if bias else None)
    h.grad = None
    head.zero_grad()
    ref = F.log_softmax(head(h), -1).gather(1, t[:, None]).squeeze(1)
    (ref * w).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(g_ours[0], h.grad, atol=1e-5) and torch.allclose(g_ours[1], head.weight.grad, atol=1e-5)
    if bias:
        assert torch.allclose(g_ours[2], head.bias.grad, atol=1e-5)


def trl_dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.0):
    """TRL 1.16's own DPOTrainer._compute_loss on given summed log-probs: a stand-in `self` and a
    model whose per-token log-probs put each sequence's sum on one token."""
    from trl import DPOTrainer
    B = len(pc)
    logps = torch.cat([pc, pr])                                           # (2B,) batch is [chosen, rejected]
    per_token = torch.stack([logps, torch.zeros_like(logps)], 1)          # (2B, 2): the sum, then 0
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, 2),
                              mean_logits=torch.zeros(2 * B, 2), is_top1=torch.zeros(2 * B, 2, dtype=torch.bool))
    model = lambda **kw: outputs  # noqa: E731
    model.training = True
    ident = lambda x: x  # noqa: E731
    stub = SimpleNamespace(model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=ident, gather=ident),
                           aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                           f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
                           label_smoothing=label_smoothing, use_weighting=False,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3, dtype=torch.long),
              "completion_mask": torch.ones(2 * B, 3, dtype=torch.long), "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, stub._metrics["train"]


def test_dpo_loss_equals_trls():
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6) * 5 - 20 for _ in range(4))
    for beta in (0.1, 0.5):
        ours, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
        theirs, logged = trl_dpo_loss(pc, pr, rc, rr, beta)
        assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)
        assert math.isclose(float((cr - rj).mean()), logged["rewards/margins"][0], abs_tol=1e-5)
        assert math.isclose(float((cr > rj).float().mean()), logged["rewards/accuracies"][0])
