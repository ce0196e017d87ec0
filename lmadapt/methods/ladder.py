"""Ladder side-tuning (Sung et al. 2022): a small side network reads the frozen backbone's hidden
states through down-projections; the backbone runs under torch.no_grad, so backpropagation never
enters it and none of its activations are kept for backward - that is where training memory falls
(full fine-tuning keeps every block's attention and FFN activations; ladder keeps the L + 1 hidden
states its down-projections read, and side activations of width H / reduction).

    s_0 = down_0(h_0)                                          h_0: embeddings, h_i: block i output
    s_i = side_i(g_i * down_i(h_i) + (1 - g_i) * s_{i-1})      g_i = sigmoid(gate_i), gate_i = 0 -> 1/2
    out = h_L + up(LayerNorm(s_L))                             up = 0 at init -> out = h_L (identity)

side_i is a per-token residual MLP with a LayerNorm: s + W2 gelu(W1 LN(s)). Because every side
operation is per token, causal generation with the backbone's KV cache needs no side cache: the
side state of a new token depends only on that token's backbone hidden states. `out` feeds the
classification head or the (frozen) LM head. Reads the final layer only (layer = -1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Method, register


class SideBlock(nn.Module):
    """(B, T, w) -> (B, T, w): s + W2 gelu(W1 LN(s)), per token."""

    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s + self.fc2(F.gelu(self.fc1(self.norm(s))))


class LadderSide(nn.Module):
    """adapted.delta for this method: the side network, and the backbone call that feeds it."""

    def __init__(self, hidden: int, num_layers: int, width: int, expansion: int):
        super().__init__()
        self.downs = nn.ModuleList(nn.Linear(hidden, width) for _ in range(num_layers + 1))   # H -> w
        self.gates = nn.Parameter(torch.zeros(num_layers))     # sigmoid(0) = 1/2: a balanced mix at init
        self.blocks = nn.ModuleList(SideBlock(width, expansion) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)                                                  # w -> H
        nn.init.zeros_(self.up.weight)   # the side adds exactly 0 until it has trained
        nn.init.zeros_(self.up.bias)

    def run_backbone(self, adapted, *, layer: int, **kw):
        """Called by Adapted.encode with its backbone kwargs; -> (hidden (B, T, H), cache)."""
        if layer != -1:
            raise ValueError(f"method 'ladder' reads the final layer only, got layer={layer}; "
                             "attach with layer=-1")
        with torch.no_grad():  # no backprop through the backbone: its activations are freed at once
            out = adapted.model.base_model(output_hidden_states=True, **kw)
        hs = out.hidden_states                                   # L + 1 tensors (B, T, H), no grad
        if len(hs) != len(self.blocks) + 1:
            raise ValueError(f"method 'ladder': the backbone returned {len(hs)} hidden states, the side "
                             f"network expects {len(self.blocks) + 1}; attach it to the model it was built for")
        s = self.downs[0](hs[0])                                 # (B, T, w)
        for i, block in enumerate(self.blocks):
            g = torch.sigmoid(self.gates[i])
            s = block(g * self.downs[i + 1](hs[i + 1]) + (1 - g) * s)
        hidden = out.last_hidden_state + self.up(self.norm(s)).to(out.last_hidden_state.dtype)   # (B, T, H)
        return hidden, getattr(out, "cache", None)


@register
@dataclass(frozen=True)
class Ladder(Method):
    name = "ladder"
    summary = "side network on frozen hidden states (backbone under no_grad: low training memory)"
    supports_slots = False
    default_lr = 3e-3
    reduction: int = 8
    expansion: int = 4

    def __post_init__(self):
        self._check(self.reduction >= 1, "reduction", f"must be >= 1, got {self.reduction}")
        self._check(self.expansion >= 1, "expansion", f"must be >= 1, got {self.expansion}")

    def inject(self, adapted) -> None:
        if adapted.layer != -1:
            raise ValueError(f"method 'ladder' reads the final layer only, got layer={adapted.layer}; "
                             "attach with layer=-1")
        cfg = adapted.model.config
        width = max(1, cfg.hidden_size // self.reduction)
        adapted.delta = LadderSide(cfg.hidden_size, cfg.num_hidden_layers, width, self.expansion)
