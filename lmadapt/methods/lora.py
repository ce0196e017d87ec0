"""LoRA: y = W x + (alpha / r) * B A dropout(x), with A (r, in) and B (out, r) per slot.

B starts at zero, so the model is unchanged at init. Works on nn.Linear and on GPT-2's Conv1D
(weight stored as (in, out), i.e. fan_in_fan_out). `merge()` folds B A into W for S = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapted import Slots, slotted
from ..arch import arch_of, is_linear_like, leaf_name, linear_shape, set_path
from .base import Method, register


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, slots: Slots):
        super().__init__()
        self.base, self.slots = base, slots
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        self.r, self.scaling = r, alpha / r
        S = slots.n
        A = torch.empty(S, r, self.in_features)
        for s in range(S):  # PEFT's init: kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(A[s], a=math.sqrt(5))
        self.lora_A = slotted(nn.Parameter(A))
        self.lora_B = slotted(nn.Parameter(torch.zeros(S, self.out_features, r)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self, slot: int = 0) -> torch.Tensor:
        """(out, in) weight delta of one slot."""
        return (self.lora_B[slot] @ self.lora_A[slot]) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.slots.disabled:
            return y
        return self.slots.add_delta(y, x, self._delta)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.slots.pick(self.lora_A), self.slots.pick(self.lora_B)
        h = self.dropout(x)
        if A.dim() == 2:                                  # one slot for all rows
            return F.linear(F.linear(h, A), B) * self.scaling
        # per-row slots: h (B, T, in) @ A^T (B, in, r) -> (B, T, r) @ B^T (B, r, out)
        return torch.bmm(torch.bmm(h, A.transpose(1, 2)), B.transpose(1, 2)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.slots.n != 1:
            raise ValueError("merge() needs a single slot: with several users' LoRAs in one model, "
                             "there is no single weight to fold them into")
        if not self.merged:
            d = self.delta_weight(0)
            self.base.weight += d.T if self.fan_in_fan_out else d
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            d = self.delta_weight(0)
            self.base.weight -= d.T if self.fan_in_fan_out else d
            self.merged = False


def find_targets(model: nn.Module, targets: tuple[str, ...], method: str) -> list[str]:
    """Names of Linear/Conv1D modules in the backbone whose layer name is a target (through other
    methods' wrappers: the Linear inside an adapter on o_proj is still o_proj)."""
    names = [n for n, m in model.base_model.named_modules()
             if is_linear_like(m) and leaf_name(n) in targets]
    if not names:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in model.base_model.named_modules() if is_linear_like(m)})
        raise ValueError(f"method '{method}': no layer named {', '.join(targets)} in {model.config.model_type}; "
                         f"linear layers present: {', '.join(found)}")
    return names


@register
@dataclass(frozen=True)
class LoRA(Method):
    name = "lora"
    summary = "low-rank deltas B A on chosen linear layers; mergeable; identity at init"
    default_lr = 1.5e-3     # SST-2 lr sweep winner (docs/methods.md)
    generation_lr = 4.5e-3  # E2E sweep winner (BLEU 66.4; 1.5e-3: 66.0, 4.5e-4: 64.3)
    # r=4 on LLaMA's seven projections is 0.91% of SmolLM2-135M (r=8 would be 1.8%).
    r: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=())  # () = the architecture's defaults

    def __post_init__(self):
        self._check(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        self._check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.replace("+", ",").split(",") if t))
        object.__setattr__(self, "targets", tuple(self.targets))

    def target_names(self, model) -> tuple[str, ...]:
        return self.targets or arch_of(model).lora_targets

    def inject(self, adapted) -> None:
        model = adapted.model
        for name in find_targets(model, self.target_names(model), self.name):
            base = model.base_model.get_submodule(name)
            set_path(model.base_model, name, LoRALinear(base, self.r, self.alpha, self.dropout, adapted.slots))

    def layers(self, adapted):
        return [m for m in adapted.model.modules() if isinstance(m, LoRALinear)]

    def merge(self, adapted) -> None:
        for m in self.layers(adapted):
            m.merge()

    def unmerge(self, adapted) -> None:
        for m in self.layers(adapted):
            m.unmerge()
