"""Adapted: a pretrained model plus the parameters a method injected, with one forward path for
training (S = 1 slot) and serving (S users' artifacts, row i of a batch routed to slot_ids[i]).

The slot ids live in one shared `Slots` object that injected modules read at call time (not in
hooks), so gradient checkpointing and beam search see the same ids as the outer call.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from . import __version__
from .atomic import DamagedFile, existing_dir, read_json_file, read_safetensors, write_dir
from .models import fingerprint, is_causal

POOLINGS = ("cls", "mean", "last")


class Slots:
    """Routing state shared by every injected module of one Adapted model.

    `ids` is None (every row uses slot 0: the training fast path) or a LongTensor[B].
    `disabled` turns every injected delta off, for a reference pass without a model copy.
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"slots must be >= 1, got {n}")
        self.n = n
        self.ids: torch.Tensor | None = None
        self.disabled = False

    @contextlib.contextmanager
    def route(self, ids: torch.Tensor | None):
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long)
            if ids.dim() != 1:
                raise ValueError(f"slot_ids must be a 1-D LongTensor[B], got shape {tuple(ids.shape)}")
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.n):
                raise ValueError(f"slot_ids must lie in [0, {self.n}); got {ids.tolist()}")
        prev, self.ids = self.ids, ids
        try:
            yield
        finally:
            self.ids = prev

    def pick(self, table: torch.Tensor) -> torch.Tensor:
        """table (S, ...) -> (...) shared by all rows, or (B, ...) one slice per row."""
        if self.ids is None:
            return table[0]
        return table[self.ids.to(table.device)]

    def repeat_interleave(self, n: int) -> None:
        """For beam search / several samples per prompt: row i becomes rows i*n .. i*n+n-1."""
        if self.ids is not None:
            self.ids = self.ids.repeat_interleave(n)


def slotted(p: nn.Parameter) -> nn.Parameter:
    """Mark a parameter whose dim 0 is the slot dim: artifacts store one slice of it."""
    p.lmadapt_slotted = True
    return p


class SlotHead(nn.Module):
    """Classification head with a slot dim: linear, or a one-hidden-layer MLP."""

    def __init__(self, hidden: int, num_labels: int, slots: Slots, kind: str = "linear", mlp_hidden: int = 256):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown head '{kind}'; choose one of: linear, mlp")
        self.slots, self.kind = slots, kind
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, C)
        if self.kind == "mlp":
            x = F.gelu(self._apply_linear(x, self.w1, self.b1))
        return self._apply_linear(x, self.weight, self.bias)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, H), real-token mask (B, T) -> (B, H). Works for left or right padding."""
    mask = mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    T = mask.shape[1]
    pos = torch.arange(T, device=hidden.device)
    if mode == "cls":   # first real token
        idx = torch.where(mask > 0, pos, T).min(1).values
    elif mode == "last":  # last real token
        idx = torch.where(mask > 0, pos, -1).max(1).values
    else:
        raise ValueError(f"unknown pooling '{mode}'; choose one of: {', '.join(POOLINGS)}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx.clamp(0, T - 1)]


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


@dataclass
class AdaptedOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None        # (B, C) classification, (B, T, V) LM
    hidden: torch.Tensor | None = None        # (B, T, H) features of the real tokens
    cache: object | None = None              # transformers Cache after a use_cache=True pass


class Adapted(nn.Module):
    """A model with a method attached. Build it with `lmadapt.attach(model, name, **args)`."""

    def __init__(self, model: nn.Module, method, *, slots: int = 1, num_labels: int | None = None,
                 label_names: list[str] | None = None, pooling: str | None = None, layer: int = -1,
                 head: str = "linear", tokenizer=None):
        super().__init__()
        self.model, self.method, self.tokenizer = model, method, tokenizer
        self.causal = is_causal(model)
        if slots > 1 and not method.supports_slots:
            raise ValueError(f"method '{method.name}' holds one set of weights and cannot take slots={slots}")
        self.slots = Slots(slots)
        self.layer = int(layer)
        self.pooling = pooling or ("last" if self.causal else "mean")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{self.pooling}'; choose one of: {', '.join(POOLINGS)}")
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names else (
            [str(i) for i in range(num_labels)] if num_labels else [])
        self.head_kind = head
        if num_labels is None and not self.causal:
            raise ValueError(f"{model.config.model_type} is an encoder without an LM head: give num_labels "
                             "(a classification task); generation tasks need a causal LM")
        for p in model.parameters():
            p.requires_grad_(False)
        # Taken before any training: `full` changes the embeddings, yet its artifact still
        # belongs to this base model.
        self.base_fingerprint = fingerprint(model)
        self.head = SlotHead(model.config.hidden_size, num_labels, self.slots, head) if num_labels else None
        self.delta = nn.Module()  # method-owned tensors that live outside the model's modules
        self._num_base = sum(p.numel() for p in model.parameters())  # before inject adds the method's
        method.inject(self)
        self.to(model.device)

    # --- forward -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, input_ids, attention_mask=None, position_ids=None, cache=None,
               use_cache=False, token_type_ids=None, layer=None):
        """Run the backbone with the method's inputs-side deltas; -> (hidden of the real tokens
        (B, T, H), cache). Prompt methods add virtual tokens, prefix methods a key/value prefix."""
        layer = self.layer if layer is None else layer
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        first = cache is None
        active = not self.slots.disabled
        kw = {}
        n_virtual = 0
        if first and active and hasattr(self.delta, "virtual_tokens"):
            virt = self.delta.virtual_tokens(B)                      # (B, k, H)
            n_virtual = virt.shape[1]
            embeds = self.model.get_input_embeddings()(input_ids)
            kw["inputs_embeds"] = torch.cat([virt.to(embeds.dtype), embeds], 1)
            mask = torch.cat([mask.new_ones(B, n_virtual), mask], 1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids.new_zeros(B, n_virtual), token_type_ids], 1)
        else:
            kw["input_ids"] = input_ids
        offset = 0
        if first and active and hasattr(self.delta, "kv_prefix"):
            cache = self.delta.kv_prefix(B)                         # cache holding k positions
            offset = cache.get_seq_length()
            mask = torch.cat([mask.new_ones(B, offset), mask], 1)
        if position_ids is None:
            # Explicit positions make left padding harmless: real tokens count from 0 (or from
            # the prefix length, PEFT's convention), virtual tokens take the first positions.
            own = mask[:, offset:]
            position_ids = (own.long().cumsum(-1) - 1).clamp(min=0) + offset
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        run = getattr(self.delta, "run_backbone", None) if active else None
        if run is not None:
            hidden, cache = run(self, attention_mask=mask, position_ids=position_ids,
                                cache=cache, use_cache=use_cache, layer=layer, **kw)
        else:
            out = self.model.base_model(attention_mask=mask, position_ids=position_ids,
                                        cache=cache, use_cache=use_cache,
                                        output_hidden_states=layer != -1, **kw)
            hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            cache = getattr(out, "cache", None)
        return hidden[:, n_virtual:], cache

    def forward(self, input_ids, attention_mask=None, labels=None, slot_ids=None, position_ids=None,
                cache=None, use_cache=False, token_type_ids=None, return_logits=None):
        with self.slots.route(slot_ids):
            hidden, cache = self.encode(input_ids, attention_mask, position_ids, cache,
                                        use_cache, token_type_ids)
            if self.head is not None:
                mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
                logits = self.head(pool(hidden, mask[:, -hidden.shape[1]:], self.pooling))
                loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
                return AdaptedOutput(loss, logits, hidden, cache)
            return self._lm(hidden, labels, cache, return_logits)

    def _lm(self, hidden, labels, cache, return_logits):
        lm_head = self.model.get_output_embeddings()
        if labels is None or return_logits:
            logits = lm_head(hidden)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)
            return AdaptedOutput(loss, logits, hidden, cache)
        # Training: project only the positions that predict a target token (often < 1/3 of them),
        # which saves most of the vocabulary matmul, with a fused linear + cross-entropy that never
        # holds all the logits.
        target = labels[:, 1:]
        keep = target != -100
        h, t = hidden[:, :-1][keep], target[keep]                       # (N, H), (N,)
        if not len(t):
            return AdaptedOutput(hidden.sum() * 0, None, hidden, cache)
        return AdaptedOutput(linear_cross_entropy(lm_head, h, t), None, hidden, cache)

    def features(self, input_ids, attention_mask=None, token_type_ids=None, slot_ids=None):
        """Pooled representation (B, H) at `self.layer`: what the head sees."""
        with self.slots.route(slot_ids):
            hidden, _ = self.encode(input_ids, attention_mask, token_type_ids=token_type_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return pool(hidden, mask, self.pooling)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, slot_ids=None, **kw):
        from .generation import generate
        return generate(self, input_ids, attention_mask, slot_ids=slot_ids, **kw)

    # --- parameters ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        """Trainable parameters per slot (what one task/user costs)."""
        return sum(p[0].numel() if getattr(p, "lmadapt_slotted", False) else p.numel()
                   for p in self.trainable_parameters())

    def num_base(self) -> int:
        return self._num_base

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model (no delta) without a second copy: DPO/PPO reference passes."""
        prev, self.slots.disabled = self.slots.disabled, True
        try:
            yield self
        finally:
            self.slots.disabled = prev

    def merge(self) -> None:
        if not hasattr(self.method, "merge"):
            raise ValueError(f"method '{self.method.name}' cannot be merged into the base weights")
        self.method.merge(self)

    def unmerge(self) -> None:
        if not hasattr(self.method, "unmerge"):
            raise ValueError(f"method '{self.method.name}' cannot be merged into the base weights")
        self.method.unmerge(self)

    # --- artifacts -----------------------------------------------------------------------------
    def state_for_slot(self, slot: int = 0) -> dict[str, torch.Tensor]:
        return self.method.export_state(self, slot)

    def meta(self) -> dict:
        return {
            "lmadapt_version": __version__,
            "method": self.method.name,
            "args": self.method.to_dict(),
            "base_model": self.base_fingerprint,
            "head": {"num_labels": self.num_labels, "label_names": self.label_names,
                     "pooling": self.pooling, "layer": self.layer, "kind": self.head_kind},
        }

    def save(self, directory: str | os.PathLike, slot: int = 0, extra: dict | None = None) -> int:
        """Write safetensors + method.json atomically; -> bytes on disk."""
        if not 0 <= slot < self.slots.n:
            raise ValueError(f"slot {slot} out of range [0, {self.slots.n})")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_for_slot(slot).items()}
        meta = self.meta() | (extra or {})
        return write_artifact(Path(directory), state, meta)

    def load_state(self, state: dict[str, torch.Tensor], slot: int = 0) -> None:
        self.method.import_state(self, state, slot)


def write_artifact(directory: Path, state: dict[str, torch.Tensor], meta: dict) -> int:
    def write(tmp: Path):
        save_file(state, str(tmp / "adapter.safetensors"))
        (tmp / "method.json").write_text(json.dumps(meta, indent=2))
    return write_dir(directory, write)


def read_artifact(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = existing_dir(directory) or Path(directory)
    meta_path = directory / "method.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory}: not an lmadapt artifact (no method.json)")
    fix = "re-save the artifact or train it again"
    meta = read_json_file(meta_path, fix)
    if not isinstance(meta, dict):
        raise DamagedFile(f"{meta_path}: expected a JSON object, got {type(meta).__name__}; {fix}")
    for key in ("method", "args", "base_model", "head"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing field '{key}'")
    weights = directory / "adapter.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{directory}: not a complete lmadapt artifact (no adapter.safetensors)")
    return meta, read_safetensors(weights, fix)


def check_base(meta: dict, model, where: str) -> None:
    want, have = meta["base_model"], fingerprint(model)
    diff = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "embedding_checksum")
            if want.get(k) != have.get(k)]
    if diff:
        raise ValueError(f"{where} was trained on base model '{want.get('name')}' and does not fit this "
                         f"model ('{have.get('name')}'): differs in " +
                         ", ".join(f"{k} ({want.get(k)} != {have.get(k)})" for k in diff))
