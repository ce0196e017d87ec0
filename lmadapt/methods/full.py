"""Full fine-tuning: every weight trains, plus a new head for classification (generation tasks
train the LM loss on target tokens only). The optimizer starts fresh: pretraining optimizer
state is never loaded."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, register


@register
@dataclass(frozen=True)
class Full(Method):
    name = "full"
    summary = "all weights + new head; fresh AdamW (no pretraining optimizer state)"
    supports_slots = False
    default_lr = 3e-5

    def inject(self, adapted) -> None:
        for p in adapted.model.parameters():
            p.requires_grad_(True)

    def export_state(self, adapted, slot: int) -> dict[str, torch.Tensor]:
        # Tied weights (LM head = input embeddings) are stored once: safetensors refuses aliases.
        seen, out = set(), {}
        for name, p in adapted.named_parameters(remove_duplicate=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[name] = p
        return out
