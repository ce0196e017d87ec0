"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): y + W_up act(W_down y + b_down) + b_up
on the output y of a block's attention and/or FFN output projection, i.e. after the sublayer and
before its residual add (and before BERT's post-LayerNorm).

placement "houlsby": after the attention AND the FFN output projection (two adapters per block).
placement "pfeiffer": after the FFN output projection only (one per block; the simplified form of
Pfeiffer's placement, without its extra LayerNorm and residual re-routing).

W_up and b_up start at zero, so the model is unchanged at init. Every tensor has a leading slot dim
S: rows of one batch can use different users' adapters (bmm on per-row weights), and S = 1 (or
slot_ids=None) takes the plain F.linear path. Not mergeable: the adapter is non-linear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapted import Slots, slotted
from ..arch import arch_of, blocks, get_path, is_linear_like, linear_shape, set_path
from .base import Method, register

PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class AdapterOutput(nn.Module):
    """Wraps an output projection: base(x) (.., H) -> base(x) + adapter(base(x))."""

    def __init__(self, base: nn.Module, bottleneck: int, activation: str, slots: Slots):
        super().__init__()
        self.base, self.slots = base, slots
        _, hidden, _ = linear_shape(base)
        self.act = ACTIVATIONS[activation]
        S = slots.n
        down = torch.empty(S, bottleneck, hidden)
        for s in range(S):  # nn.Linear's own init for the down projection
            nn.init.kaiming_uniform_(down[s], a=math.sqrt(5))
        bound = 1 / math.sqrt(hidden)
        self.down_weight = slotted(nn.Parameter(down))                                        # (S, m, H)
        self.down_bias = slotted(nn.Parameter(torch.empty(S, bottleneck).uniform_(-bound, bound)))  # (S, m)
        # Zero up projection: the adapter adds exactly 0 until it has trained.
        self.up_weight = slotted(nn.Parameter(torch.zeros(S, hidden, bottleneck)))              # (S, H, m)
        self.up_bias = slotted(nn.Parameter(torch.zeros(S, hidden)))                            # (S, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.slots.disabled:
            return y
        return self.slots.add_delta(y, y, self._delta)

    def _delta(self, y: torch.Tensor) -> torch.Tensor:
        pick = self.slots.pick
        wd, bd, wu, bu = pick(self.down_weight), pick(self.down_bias), pick(self.up_weight), pick(self.up_bias)
        if wd.dim() == 2:                                       # one slot for every row
            delta = F.linear(self.act(F.linear(y, wd, bd)), wu, bu)
        else:
            # per-row slots: y (B, T, H) @ wd^T (B, H, m) -> (B, T, m) @ wu^T (B, m, H) -> (B, T, H)
            h = self.act(torch.bmm(y, wd.transpose(1, 2)) + bd.unsqueeze(1))
            delta = torch.bmm(h, wu.transpose(1, 2)) + bu.unsqueeze(1)
        return delta.to(y.dtype)


@register
@dataclass(frozen=True)
class Adapter(Method):
    name = "adapter"
    summary = "bottleneck adapters after attention+FFN (houlsby) or FFN only (pfeiffer); identity at init"
    default_lr = 1e-3
    generation_lr = 3e-3   # E2E sweep winner (BLEU 65.9; 1e-3: 64.9, 3e-4: 64.7) (docs/methods.md)
    bottleneck: int = 16
    placement: str = "houlsby"
    activation: str = "relu"

    def __post_init__(self):
        self._check(self.bottleneck >= 1, "bottleneck", f"must be >= 1, got {self.bottleneck}")
        self._check(self.placement in PLACEMENTS, "placement",
                    f"'{self.placement}' is unknown; choose one of: {', '.join(PLACEMENTS)}")
        self._check(self.activation in ACTIVATIONS, "activation",
                    f"'{self.activation}' is unknown; choose one of: {', '.join(ACTIVATIONS)}")

    def inject(self, adapted) -> None:
        model = adapted.model
        arch = arch_of(model)
        paths = [arch.attn_out, arch.ffn_out] if self.placement == "houlsby" else [arch.ffn_out]
        for block in blocks(model):
            for path in paths:
                proj = get_path(block, path)
                if not is_linear_like(proj):
                    raise ValueError(f"method 'adapter': {model.config.model_type} block's '{path}' is a "
                                     f"{type(proj).__name__}, not a Linear/Conv1D output projection; "
                                     "fix its entry in lmadapt.arch.ARCHS")
                set_path(block, path, AdapterOutput(proj, self.bottleneck, self.activation, adapted.slots))
