"""Ladder side-tuning (LST, Sung et al. 2022): a small side transformer reads the frozen backbone's
hidden states through down-projections ("ladders"). The backbone runs under torch.no_grad, so
backpropagation never enters it and none of its activations are kept for backward - that is
where training memory falls (full fine-tuning keeps every block's attention and FFN activations;
ladder keeps the L + 1 hidden states its down-projections read, plus side activations of width
w = H / reduction).

    s_0 = down_0(h_0)                                          h_0: embeddings, h_i: block i output
    s_i = side_i(g_i * down_i(h_i) + (1 - g_i) * s_{i-1})      g_i = sigmoid(gate_i / 0.1), gate_i = 0 -> 1/2
    out = h_L + up(LN(s_L))     side_output="add" (default): up = 0 at init -> out = h_L exactly
    out = up(LN(s_L))           side_output="replace": the paper's form, the head reads the side network only

side_i is a pre-norm transformer block of width w, as in the paper: self-attention over the tokens
(causal for causal LMs, padding masked for all; rotary positions from the explicit position_ids,
so left padding is exact) and a GELU FFN. (An earlier per-token MLP side network could not mix
tokens; on SST-2 it measured no better, so it was removed - docs/benchmarks.md, "Ladder".) Side
weights start random; the paper's initialization by structural pruning of the backbone is not done.

Generation: the side attention keeps its own keys/values, so run_backbone returns a LadderCache
that wraps the backbone's transformers Cache and the side's per-block (k, v). `out` feeds the
classification head or the (frozen) LM head. Reads the final layer only (layer = -1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .base import Method, register

SIDE_OUTPUTS = ("add", "replace")
GATE_T = 0.1  # the paper's gate temperature: sigmoid(gate / T) moves 10x faster than sigmoid(gate)


class LadderCache:
    """What encode returns with use_cache=True: the backbone's Cache + the side attention's
    keys/values, per side block (B, heads, T_past, head_dim). Beam search uses only the three
    methods below; each acts on both halves, in place, as transformers' Cache does."""

    def __init__(self, backbone, keys: list | None = None, values: list | None = None):
        self.backbone = backbone
        self.keys = keys or []      # [] until the first pass stores them
        self.values = values or []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.backbone.get_seq_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.backbone.reorder_cache(beam_idx)
        self.keys = [k.index_select(0, beam_idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, beam_idx.to(v.device)) for v in self.values]

    def batch_repeat_interleave(self, n: int) -> None:
        self.backbone.batch_repeat_interleave(n)
        self.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(n, dim=0) for v in self.values]

    def repeated(self, n: int, config) -> "LadderCache":
        """An out-of-place batch_repeat_interleave (kv_loop.repeated_cache: verbalizer words)."""
        from ..kv_loop import repeated_cache
        return LadderCache(repeated_cache(self.backbone, n, config),
                           [k.repeat_interleave(n, dim=0) for k in self.keys],
                           [v.repeat_interleave(n, dim=0) for v in self.values])


def rotary(pos: torch.Tensor, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position ids (B, T) -> cos, sin (B, 1, T, head_dim / 2), shared by every side block."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    ang = pos.float()[:, None, :, None] * inv                           # (B, 1, T, hd/2)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hd): rotate-half RoPE; the (hd/2) pairs are (x[i], x[i + hd/2])."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class SideAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, rope, allowed, past):
        """x (B, T, w); allowed (B, 1, T, T_past + T) bool; past (k, v) or None -> (B, T, w), (k, v)."""
        B, T, w = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)                   # (B, nh, Tk, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)                      # (B, nh, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, w)), (k, v)


class SideTransformerBlock(nn.Module):
    """(B, T, w) -> (B, T, w): pre-norm s + Attn(LN(s)), then s + FFN(LN(s))."""

    def __init__(self, width: int, heads: int, expansion: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SideAttention(width, heads)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)

    def forward(self, s, rope, allowed, past):
        a, kv = self.attn(self.norm1(s), rope, allowed, past)
        s = s + a
        return s + self.fc2(F.gelu(self.fc1(self.norm2(s)))), kv


class LadderSide(nn.Module):
    """adapted.delta for this method: the side network, and the backbone call that feeds it."""

    def __init__(self, hidden: int, num_layers: int, width: int, *, heads: int, expansion: int,
                 side_output: str, rope: bool, causal: bool, recompute: bool):
        super().__init__()
        self.side_output, self.causal, self.rope, self.recompute = side_output, causal, rope, recompute
        self.head_dim = width // heads
        self.downs = nn.ModuleList(nn.Linear(hidden, width) for _ in range(num_layers + 1))   # H -> w
        self.gates = nn.Parameter(torch.zeros(num_layers))     # sigmoid(0) = 1/2: a balanced mix at init
        self.blocks = nn.ModuleList(SideTransformerBlock(width, heads, expansion) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)                                                  # w -> H
        if side_output == "add":  # the side adds exactly 0 until it has trained
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def run_backbone(self, adapted, *, layer: int, attention_mask, position_ids, cache=None,
                     use_cache=False, **kw):
        """Called by Adapted.encode with its backbone kwargs; -> (hidden (B, T, H), cache)."""
        if layer != -1:
            raise ValueError(f"method 'ladder' reads the final layer only, got layer={layer}; "
                             "attach with layer=-1")
        if cache is not None and not isinstance(cache, LadderCache):
            raise ValueError(f"method 'ladder' needs the LadderCache that its own encode returned, got "
                             f"{type(cache).__name__}; pass back the `cache` of the previous call")
        with torch.no_grad():  # no backprop through the backbone: its activations are freed at once
            out = adapted.model.base_model(output_hidden_states=True, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=use_cache,
                                           cache=cache.backbone if cache is not None else None, **kw)
        hs = out.hidden_states                                   # L + 1 tensors (B, T, H), no grad
        if len(hs) != len(self.blocks) + 1:
            raise ValueError(f"method 'ladder': the backbone returned {len(hs)} hidden states, the side "
                             f"network expects {len(self.blocks) + 1}; attach it to the model it was built for")
        if cache is None and use_cache:
            cache = LadderCache(getattr(out, "cache", None))
        s = self.side(hs, attention_mask, position_ids, cache)   # (B, T, w)
        side_out = self.up(self.norm(s)).to(out.last_hidden_state.dtype)                    # (B, T, H)
        hidden = out.last_hidden_state + side_out if self.side_output == "add" else side_out
        return hidden, cache

    def side(self, hs, attention_mask, position_ids, cache=None) -> torch.Tensor:
        """L + 1 backbone hidden states (B, T, H), the mask of cached + new tokens (B, T_past + T),
        positions (B, T) -> s_L (B, T, w). Appends this pass's keys/values to `cache` if given."""
        dtype = self.up.weight.dtype
        B, T = hs[0].shape[:2]
        past = cache is not None and len(cache.keys) > 0
        T_past = cache.keys[0].shape[2] if past else 0
        if attention_mask.shape != (B, T_past + T):
            raise ValueError(f"method 'ladder': attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"({B}, {T_past + T}): the mask of the {T_past} cached and the {T} new tokens")
        real = attention_mask[:, -T:].bool()[..., None]          # (B, T, 1)
        q = torch.arange(T, device=hs[0].device) + T_past        # absolute index of each query
        k = torch.arange(T_past + T, device=hs[0].device)
        allowed = attention_mask.bool()[:, None, None, :]        # (B, 1, 1, Tk): padding keys masked
        if self.causal:
            allowed = allowed & (k[None, :] <= q[:, None])       # (B, 1, T, Tk)
        # Every query also sees itself: a left-pad query would otherwise have no key at all, and
        # some SDPA backends give NaN for such a row (torch 2.13 on CPU gives 0).
        allowed = allowed | (k[None, :] == q[:, None])
        rope = rotary(position_ids, self.head_dim, dtype) if self.rope else None
        # Pad positions start from 0, not from the backbone's pad states: nothing there can be NaN.
        s = torch.where(real, self.downs[0](hs[0].to(dtype)), 0)
        for i, block in enumerate(self.blocks):
            g = torch.sigmoid(self.gates[i] / GATE_T)
            x = g * self.downs[i + 1](hs[i + 1].to(dtype)) + (1 - g) * s
            x = torch.where(real, x, 0)
            if self.recompute and cache is None and torch.is_grad_enabled():
                # Keep only the block's input (B, T, w) for backward and rerun the block there: a side
                # block costs ~2% of a backbone block's FLOPs, but would keep ~15 tensors of (B, T, w+).
                s, kv = checkpoint(block, x, rope, allowed, None, use_reentrant=False)
            else:
                s, kv = block(x, rope, allowed, (cache.keys[i], cache.values[i]) if past else None)
            if cache is not None:
                if past:
                    cache.keys[i], cache.values[i] = kv
                else:
                    cache.keys.append(kv[0])
                    cache.values.append(kv[1])
        return s


@register
@dataclass(frozen=True)
class Ladder(Method):
    name = "ladder"
    summary = "side transformer on frozen hidden states (backbone under no_grad: low training memory)"
    supports_slots = False
    default_lr = 3e-3
    generation_lr = 9e-3   # E2E sweep winner (BLEU 42.4; 3e-3: 38.3, 3e-2: 36.1) (docs/methods.md)
    reduction: int = 8            # side width w = hidden / reduction
    heads: int | None = None      # side attention heads; None: max(1, backbone heads // reduction), dividing w
    expansion: int = 4            # side FFN width = expansion * w
    side_output: str = "add"      # "add": h_L + up(side), identity at init; "replace": up(side) (the paper's)
    rope: bool = True             # rotary positions in the side attention (else: only what h_i carries)
    recompute: bool = True        # training: rerun each side block in backward instead of keeping its activations

    def __post_init__(self):
        self._check(self.reduction >= 1, "reduction", f"must be >= 1, got {self.reduction}")
        self._check(self.expansion >= 1, "expansion", f"must be >= 1, got {self.expansion}")
        self._check(self.heads is None or self.heads >= 1, "heads", f"must be >= 1, got {self.heads}")
        self._check(self.side_output in SIDE_OUTPUTS, "side_output", f"'{self.side_output}' is unknown; choose one of: {', '.join(SIDE_OUTPUTS)}")

    def side_shape(self, cfg) -> tuple[int, int]:
        """-> (width, heads) for a backbone config."""
        width = max(1, cfg.hidden_size // self.reduction)
        heads = self.heads
        if heads is None:
            heads = max(1, getattr(cfg, "num_attention_heads", 1) // self.reduction)
            while width % heads:
                heads -= 1
        self._check(width % heads == 0, "heads", f"must divide the side width {width} (hidden {cfg.hidden_size} / "
                    f"reduction {self.reduction}), got {heads}; choose one of: "
                    f"{', '.join(str(d) for d in range(1, width + 1) if width % d == 0)}")
        if self.rope:
            self._check((width // heads) % 2 == 0, "heads", f"gives an odd head size {width // heads}, which "
                        "rotary positions cannot pair up; choose other heads or rope=false")
        return width, heads

    def inject(self, adapted) -> None:
        if adapted.layer != -1:
            raise ValueError(f"method 'ladder' reads the final layer only, got layer={adapted.layer}; "
                             "attach with layer=-1")
        cfg = adapted.model.config
        width, heads = self.side_shape(cfg)
        adapted.delta = LadderSide(cfg.hidden_size, cfg.num_hidden_layers, width, heads=heads,
                                   expansion=self.expansion, side_output=self.side_output, rope=self.rope,
                                   causal=adapted.causal, recompute=self.recompute)
