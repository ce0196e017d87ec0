"""BitFit (Ben Zaken et al. 2021): only bias terms train.

Implemented as zero-init bias DELTAS with a slot dim, (S, out), added to the output of every
Linear/Conv1D in the backbone's blocks and of every LayerNorm that has a bias (anywhere in the
backbone: BERT's embedding LayerNorm, GPT-2's ln_f too); the base biases stay frozen. Training
delta is training the bias itself (bias = b0 + delta, same gradient), and the artifact stores only
the deltas, so many users' BitFits share one base model and one batched pass.

LLaMA-style models have no biases at all: there this method ADDS zero-init biases to every
linear layer of the blocks (and RMSNorm, which has no bias, gets none). That is "BitFit" in the
sense of "train one vector per layer output", not the paper's "train the existing biases".

merge() folds the deltas into the base biases where every wrapped layer has one (BERT, GPT-2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..adapted import Slots, slotted
from ..arch import blocks, is_linear_like, linear_shape
from .base import Method, fold_layers, register


class BiasDelta(nn.Module):
    """Wraps a Linear/Conv1D/LayerNorm: base(x) (.., out) -> base(x) + delta[slot]."""

    def __init__(self, base: nn.Module, out_features: int, slots: Slots):
        super().__init__()
        self.base, self.slots = base, slots
        self.bias_delta = slotted(nn.Parameter(torch.zeros(slots.n, out_features)))   # (S, out)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.slots.disabled:
            return y
        # Every row, even in the bank's mixed batches: gathering B bias rows is one small op, fewer
        # than computing a segment (Slots.add_delta) would take.
        d = self.slots.pick(self.bias_delta)                   # (out,) or (B, out)
        if d.dim() == 2:                                        # per-row: broadcast over positions
            d = d.view(d.shape[0], *([1] * (y.dim() - 2)), d.shape[1])
        return y + d.to(y.dtype)

    def _fold(self, sign: float) -> None:
        if self.slots.n != 1:
            raise ValueError("merge() needs a single slot: with several users' biases in one model, "
                             "there is no single bias to fold them into")
        with torch.no_grad():
            self.base.bias += sign * self.bias_delta[0].to(self.base.bias.dtype)


def _bias_targets(model) -> list[tuple[nn.Module, str, int]]:
    """(parent module, attribute name, out features) of every layer that gets a bias delta."""
    out, seen = [], set()
    block_mods = {id(m) for b in blocks(model) for m in b.modules()}
    for parent in model.base_model.modules():
        for attr, child in parent.named_children():
            if id(child) in seen:
                continue
            if is_linear_like(child) and id(child) in block_mods:
                out.append((parent, attr, linear_shape(child)[1]))
            elif isinstance(child, nn.LayerNorm) and child.bias is not None:
                out.append((parent, attr, child.normalized_shape[-1]))
            else:
                continue
            seen.add(id(child))
    return out


@register
@dataclass(frozen=True)
class BitFit(Method):
    name = "bitfit"
    summary = ("bias deltas on every linear layer + LayerNorm bias; identity at init "
               "(LLaMA has no biases: adds zero-init ones)")
    default_lr = 1e-3
    generation_lr = 3e-3   # E2E sweep winner (BLEU 65.8; 1e-3: 63.7, 3e-4: 59.3) (docs/methods.md)

    def inject(self, adapted) -> None:
        targets = _bias_targets(adapted.model)
        if not targets:
            raise ValueError(f"method 'bitfit': found no Linear/Conv1D/LayerNorm layer in the blocks of "
                             f"{adapted.model.config.model_type}; check its entry in lmadapt.arch.ARCHS")
        for parent, attr, out_features in targets:
            setattr(parent, attr, BiasDelta(getattr(parent, attr), out_features, adapted.slots))

    def layers(self, adapted) -> list[BiasDelta]:
        return [m for m in adapted.model.modules() if isinstance(m, BiasDelta)]

    def merge(self, adapted) -> None:
        layers = self.layers(adapted)
        if any(m.base.bias is None for m in layers):
            raise ValueError(f"method 'bitfit' cannot merge into {adapted.model.config.model_type}: some of "
                             "its layers have no base bias to fold the deltas into (the deltas there are "
                             "added biases); keep the model unmerged")
        fold_layers(layers, True)

    def unmerge(self, adapted) -> None:
        fold_layers(self.layers(adapted), False)
