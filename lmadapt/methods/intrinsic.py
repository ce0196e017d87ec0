"""Intrinsic-subspace tuning (Li et al. 2018; Aghajanyan et al. 2020): theta = theta0 + scale * P z
for the target weights, with z (d,) the only trainable tensor (zero init: identity at init) and
P (D, d) a FIXED random projection rebuilt from `seed`. The artifact holds z and the seed only.

The projection. A dense D x d matrix is out of the question (SmolLM2: D = 106M, d = 500 -> 200 GB),
and Fastfood needs D-sized Hadamard transforms per step. We use a count-sketch projection: every
weight coordinate reads ONE entry of z with a random sign, so each row of P has a single +-1 (unit
norm). The index is a two-table tabulation hash per target tensor W (out, in):

    delta[i, j] = row_sign[i] * col_sign[j] * z[(row_off[i] + col_off[j]) mod d]

with row_off (out,), col_off (in,) uniform in [0, d) and signs uniform in {-1, +1}, all drawn from
`seed` in module order. Cost:
- memory: O(out + in) buffers per tensor (non-persistent, never saved): 305K offsets + 305K signs
  for SmolLM2's 106M target weights (3.7 MB next to 425 MB), instead of an O(D) index. Autograd
  keeps no O(D) tensor (the weight is rebuilt from z in backward), so training memory is the frozen
  model plus the inputs every linear layer keeps anyway, plus one layer's (out, in) weight at a time.
- time: O(D) per forward (a gather of z into each weight: ~ two elementwise passes over the
  weights) and again in backward, plus the weight-gradient matmul g^T x per target (z's gradient
  is P^T of it) - so a step costs about what a full fine-tuning step costs, minus the optimizer.

Scale: Adam moves z by ~lr per step, so each target weight moves by ~scale * lr per step; with
the defaults (scale 1, lr 3e-3, the SST-2 sweep's winner; 1e-2 diverged) that is a sizeable step
for weights of typical magnitude 0.02-0.05, which is what 375 steps need to move the model at all.
merge() folds scale * P z into the weights (no per-step rebuild at inference).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapted import Slots
from ..arch import blocks, is_linear_like, linear_shape
from .base import Method, fold_layers, register


def sketch_weight(z, row_off, col_off, row_sign, col_sign) -> torch.Tensor:
    """z (d,) -> (out, in) with [i, j] = row_sign[i] col_sign[j] z[(row_off[i] + col_off[j]) % d]."""
    d = z.shape[0]
    # Window k of cat(z, z) is z rolled by k, so row i of `rolled` is z[(row_off[i] + m) % d], m < d,
    # built without an (out, d) index tensor.
    rolled = torch.cat([z, z]).unfold(0, d, 1)[row_off] * row_sign[:, None]   # (out, d)
    return rolled.index_select(1, col_off) * col_sign                            # (out, in)


class _SubspaceLinear(torch.autograd.Function):
    """y = F.linear(x, W0 + scale * sketch(z), b), rebuilding the (out, in) weight in backward
    instead of saving it: autograd keeps x and O(d + in + out), never an O(out * in) tensor."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w0, bias, z, row_off, col_off, row_sign, col_sign, scale, fan_in_fan_out):
        ctx.scale, ctx.fan_in_fan_out = scale, fan_in_fan_out
        ctx.save_for_backward(x, w0, bias, z, row_off, col_off, row_sign, col_sign)
        return F.linear(x, _weight(w0, z, row_off, col_off, row_sign, col_sign, scale, fan_in_fan_out), bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):                                                # g (.., out)
        x, w0, bias, z, row_off, col_off, row_sign, col_sign = ctx.saved_tensors
        need_x, need_w0, need_b, need_z = ctx.needs_input_grad[:4]
        grad_x = grad_w0 = grad_b = grad_z = None
        if need_x:
            w = _weight(w0, z, row_off, col_off, row_sign, col_sign, ctx.scale, ctx.fan_in_fan_out)
            grad_x = (g @ w.to(g.dtype)).to(x.dtype)                    # (.., out) @ (out, in)
        if need_w0 or need_z:
            gw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(g.dtype)   # (out, in)
            if need_w0:
                grad_w0 = (gw.T if ctx.fan_in_fan_out else gw).to(w0.dtype)
            if need_z:  # chain rule through the (cheap) sketch: autograd on the small graph
                with torch.enable_grad():
                    zz = z.detach().requires_grad_(True)
                    sk = sketch_weight(zz * ctx.scale, row_off, col_off, row_sign, col_sign)
                    grad_z, = torch.autograd.grad(sk, zz, gw.to(sk.dtype))
        if need_b and bias is not None:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(bias.dtype)
        return grad_x, grad_w0, grad_b, grad_z, None, None, None, None, None, None


def _weight(w0, z, row_off, col_off, row_sign, col_sign, scale, fan_in_fan_out):
    """Effective (out, in) weight; GPT-2's Conv1D stores W0 as (in, out)."""
    base = w0.T if fan_in_fan_out else w0
    # scale applied to z (d,), not to the (out, in) sketch: one full-size pass fewer
    return base + sketch_weight(z * scale, row_off, col_off, row_sign, col_sign).to(base.dtype)


class Subspace(nn.Module):
    """adapted.delta for this method: holds z (d,), the one trainable tensor, shared by every target."""

    def __init__(self, d: int):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(d))


class SubspaceLinear(nn.Module):
    """Wraps a Linear/Conv1D: forward uses W0 + scale * P_t z, P_t this tensor's slice of P."""

    def __init__(self, base: nn.Module, space: Subspace, slots: Slots, scale: float, gen: torch.Generator):
        super().__init__()
        self.base, self.slots, self.scale = base, slots, scale
        object.__setattr__(self, "space", space)  # not a submodule: z lives once, in adapted.delta
        in_f, out_f, self.fan_in_fan_out = linear_shape(base)
        d = space.z.shape[0]
        dev = base.weight.device
        # Drawn from the seed in a fixed order; non-persistent, so never saved and rebuilt on load.
        for name, t in (("row_off", torch.randint(d, (out_f,), generator=gen)),
                        ("col_off", torch.randint(d, (in_f,), generator=gen)),
                        ("row_sign", torch.randint(2, (out_f,), generator=gen).float() * 2 - 1),
                        ("col_sign", torch.randint(2, (in_f,), generator=gen).float() * 2 - 1)):
            self.register_buffer(name, t.to(dev), persistent=False)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.slots.disabled:
            return self.base(x)
        return _SubspaceLinear.apply(x, self.base.weight, self.base.bias, self.space.z, self.row_off,
                                     self.col_off, self.row_sign, self.col_sign, self.scale,
                                     self.fan_in_fan_out)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        d = sketch_weight(self.space.z * self.scale, self.row_off, self.col_off, self.row_sign, self.col_sign)
        self.base.weight += sign * (d.T if self.fan_in_fan_out else d).to(self.base.weight.dtype)


@register
@dataclass(frozen=True)
class Intrinsic(Method):
    name = "intrinsic"
    summary = "theta0 + P z in a d-dim random subspace (count-sketch P from a seed); artifact = z + seed"
    supports_slots = False
    default_lr = 3e-3      # SST-2 lr sweep winner; 1e-2 diverged (docs/methods.md)
    generation_lr = 9e-3   # E2E sweep winner (BLEU 57.7; 3e-3: 56.6, 9e-4: 54.6)
    d: int = 500
    seed: int = 0
    targets: tuple[str, ...] = field(default=())  # () = every Linear/Conv1D in the blocks
    scale: float = 1.0

    def __post_init__(self):
        self._check(self.d >= 1, "d", f"must be >= 1, got {self.d}")
        self._check(self.scale > 0, "scale", f"must be > 0, got {self.scale}")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.replace("+", ",").split(",") if t))
        object.__setattr__(self, "targets", tuple(self.targets))

    def target_modules(self, model) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of each target, in module order (the order P is drawn in)."""
        out = []
        for block in blocks(model):
            for parent in block.modules():
                for attr, child in parent.named_children():
                    if is_linear_like(child) and (not self.targets or attr in self.targets):
                        out.append((parent, attr))
        if not out:
            found = sorted({a for b in blocks(model) for p in b.modules()
                            for a, c in p.named_children() if is_linear_like(c)})
            raise ValueError(f"method 'intrinsic': no layer named {', '.join(self.targets)} in the blocks of "
                             f"{model.config.model_type}; linear layers present: {', '.join(found)}")
        return out

    def inject(self, adapted) -> None:
        space = Subspace(self.d)
        adapted.delta = space
        gen = torch.Generator().manual_seed(self.seed)
        for parent, attr in self.target_modules(adapted.model):
            setattr(parent, attr, SubspaceLinear(getattr(parent, attr), space, adapted.slots, self.scale, gen))

    def layers(self, adapted) -> list[SubspaceLinear]:
        return [m for m in adapted.model.modules() if isinstance(m, SubspaceLinear)]

    def merge(self, adapted) -> None:
        fold_layers(self.layers(adapted), True)

    def unmerge(self, adapted) -> None:
        fold_layers(self.layers(adapted), False)
