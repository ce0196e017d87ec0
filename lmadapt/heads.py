"""Classification heads: what turns the backbone's hidden states into (B, C) class scores.

Every head has one interface, so Adapted.forward calls any head the same way:

    scores = head(HeadInputs(hidden, mask, input_ids, extend))     # (B, C)
    loss = head.loss(scores, labels)                                # a pure function, objectives.py

- `SlotHead` (linear | mlp) pools the hidden states (cls / mean / last real token) and applies a
  linear layer or a one-hidden-layer MLP, with a slot dim on its weights (per-user heads). It also
  takes already pooled features (B, H) directly: the probe's cached-feature path.
- `RewardHead` (reward): one scalar per sequence, read at the last real token, trained with the
  pairwise Bradley-Terry loss (a reward model); per token, the same head is PPO's value head.
- `VerbalizerHead` (lmadapt.prompting.head) reads the LM head at the mask position and scores
  the label words; it has no per-user weights.

A head declares `needs_cache = True` when it reads past the input: the verbalizer scoring
multi-token label words on a causal LM continues each row from the input's KV cache through
`extend`; other heads get `extend=None`. `config()` is what method.json stores to rebuild it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .objectives import bradley_terry, cross_entropy

POOLINGS = ("cls", "mean", "last")


@dataclass
class HeadInputs:
    hidden: torch.Tensor                 # (B, T, H) features of the input tokens (virtual tokens removed)
    mask: torch.Tensor                   # (B, T) 1 = real token, 0 = padding (left or right)
    input_ids: torch.Tensor              # (B, T) the ids read (the MLM verbalizer finds [MASK] here)
    # ids (M, L) -> hidden (B, M, L, H): the L tokens of continuation m fed after row b's input,
    # from its KV cache. Only for heads with needs_cache.
    extend: Callable[[torch.Tensor], torch.Tensor] | None = None


def slotted(p: nn.Parameter) -> nn.Parameter:
    """Mark a parameter whose dim 0 is the slot dim: artifacts store one slice of it."""
    p.lmadapt_slotted = True
    return p


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, H), real-token mask (B, T) -> (B, H). Works for left or right padding."""
    mask = mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    T = mask.shape[1]
    if mode == "cls":   # first real token
        idx = first_real(mask)
    elif mode == "last":  # last real token
        idx = last_real(mask)
    else:
        raise ValueError(f"unknown pooling '{mode}'; choose one of: {', '.join(POOLINGS)}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx.clamp(0, T - 1)]


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,) index of each row's last real token (T - 1 under left padding)."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask > 0, pos, -1).max(1).values


def first_real(mask: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask > 0, pos, mask.shape[1]).min(1).values


class SlotHead(nn.Module):
    """Classification head with a slot dim: pooling, then linear or a one-hidden-layer MLP."""

    needs_cache = False

    def __init__(self, hidden: int, num_labels: int, slots, kind: str = "linear", mlp_hidden: int = 256,
                 pooling: str = "last"):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown head '{kind}'; choose one of: {', '.join(HEADS)}")
        self.slots, self.kind, self.pooling = slots, kind, pooling
        self.loss = cross_entropy
        S = slots.n
        d_in = hidden
        if kind == "mlp":
            self.w1 = slotted(nn.Parameter(torch.randn(S, mlp_hidden, hidden) / hidden ** 0.5))
            self.b1 = slotted(nn.Parameter(torch.zeros(S, mlp_hidden)))
            d_in = mlp_hidden
        self.weight = slotted(nn.Parameter(torch.randn(S, num_labels, d_in) * 0.02))
        self.bias = slotted(nn.Parameter(torch.zeros(S, num_labels)))

    def _apply_linear(self, x, w, b):
        w, b = self.slots.pick(w), self.slots.pick(b)
        if w.dim() == 2:
            return F.linear(x, w, b)
        return torch.einsum("bi,boi->bo", x, w) + b  # per-row weights: (B,in) x (B,out,in)

    def forward(self, x: HeadInputs | torch.Tensor) -> torch.Tensor:
        """HeadInputs -> pool -> (B, C); or pooled features (B, H) (the probe's cache) -> (B, C)."""
        if isinstance(x, HeadInputs):
            x = pool(x.hidden, x.mask, self.pooling)
        if self.kind == "mlp":
            x = F.gelu(self._apply_linear(x, self.w1, self.b1))
        return self._apply_linear(x, self.weight, self.bias)

    def config(self, slot: int = 0) -> dict:
        return {}


def _slot_head(adapted, kind: str, **args) -> SlotHead:
    if args:
        raise ValueError(f"head '{kind}' takes no arguments, got {', '.join(sorted(args))} "
                         "(template/verbalizer belong to --head verbalizer)")
    return SlotHead(adapted.model.config.hidden_size, adapted.num_labels, adapted.slots, kind,
                    pooling=adapted.pooling)


class RewardHead(SlotHead):
    """A scalar score (B, 1) at the last real token (a reward model), or per token (B, T) via
    `per_token` (PPO's value head). A batch to train on holds chosen and rejected rows, labels (B,)
    1 = chosen, 0 = rejected, the i-th chosen row paired with the i-th rejected row."""

    def __init__(self, hidden: int, slots, pooling: str = "last"):
        super().__init__(hidden, 1, slots, "linear", pooling=pooling)
        self.loss = self.pair_loss
        with torch.no_grad():  # a zero score at init: the untrained RM / critic prefers nothing
            self.weight.zero_()

    def pair_loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        chosen, rejected = scores[labels == 1, 0], scores[labels == 0, 0]
        if len(chosen) != len(rejected) or not len(chosen):
            raise ValueError(f"a reward batch needs as many chosen (label 1) as rejected (label 0) rows, "
                             f"got {len(chosen)} and {len(rejected)}")
        return bradley_terry(chosen, rejected)

    def per_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T) a score at every position."""
        w, b = self.slots.pick(self.weight), self.slots.pick(self.bias)
        if w.dim() == 3:
            return torch.einsum("bth,bh->bt", hidden, w[:, 0]) + b[:, :1]
        return F.linear(hidden, w, b).squeeze(-1)


def _reward_head(adapted, kind: str, **args) -> RewardHead:
    if args:
        raise ValueError(f"head 'reward' takes no arguments, got {', '.join(sorted(args))}")
    if adapted.num_labels != 1:
        raise ValueError(f"the reward head gives one score: attach with num_labels=1, got {adapted.num_labels}")
    return RewardHead(adapted.model.config.hidden_size, adapted.slots, pooling=adapted.pooling)


# kind -> builder(adapted, kind, **args) -> head. lmadapt.prompting adds 'verbalizer' (imported by
# the package's __init__, so it is registered before any model is built).
HEADS: dict[str, Callable] = {"linear": _slot_head, "mlp": _slot_head, "reward": _reward_head}


def build_head(adapted, kind: str, **args) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"unknown head '{kind}'; choose one of: {', '.join(HEADS)}")
    return HEADS[kind](adapted, kind, **args)
