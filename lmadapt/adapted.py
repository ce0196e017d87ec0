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
from .heads import POOLINGS, HeadInputs, SlotHead, build_head, pool, slotted  # noqa: F401 (re-exported)
from .models import fingerprint, is_causal
from .objectives import linear_cross_entropy  # noqa: F401 (re-exported)
from .prompting.template import SOFT_TOKEN


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
        # serve.Bank: the rows of a mixed batch that use this table (LongTensor), when not all do;
        # every other row is on slot 0, the identity, so its delta is not computed at all.
        self.rows: torch.Tensor | None = None
        self.row_ids: torch.Tensor | None = None   # ids[rows], computed once per batch by the bank

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

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, delta) -> torch.Tensor:
        """y + delta(x), where delta reads its per-row weights through pick(). With `rows` set,
        only those rows are computed (a segment of the batch: gather and matmul for n rows, not
        B) and added in place of the zeros slot 0 would add: the same values, less work."""
        rows = self.rows
        if rows is None or self.ids is None:
            return y + delta(x)
        prev, self.ids = self.ids, (self.row_ids if self.row_ids is not None else self.ids[rows])
        try:
            d = delta(x[rows])
        finally:
            self.ids = prev
        return y.index_add(0, rows, d.to(y.dtype).expand((len(rows),) + y.shape[1:]))

    def repeat_interleave(self, n: int) -> None:
        """For beam search / several samples per prompt: row i becomes rows i*n .. i*n+n-1."""
        if self.ids is not None:
            self.ids = self.ids.repeat_interleave(n)


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
                 head: str = "linear", head_args: dict | None = None, tokenizer=None):
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
        # The artifact of an earlier stage whose merged model this one was attached to (SFT for
        # DPO / PPO); recorded in method.json so load_adapted rebuilds that model first.
        self.init: str | None = None
        if num_labels is None and not self.causal:
            raise ValueError(f"{model.config.model_type} is an encoder without an LM head: give num_labels "
                             "(a classification task); generation tasks need a causal LM")
        for p in model.parameters():
            p.requires_grad_(False)
        # Taken before any training: `full` changes the embeddings, yet its artifact still
        # belongs to this base model.
        self.base_fingerprint = fingerprint(model)
        self.head = build_head(self, head, **(head_args or {})) if num_labels else None
        self.delta = nn.Module()  # method-owned tensors that live outside the model's modules
        self._num_base = sum(p.numel() for p in model.parameters())  # before inject adds the method's
        method.inject(self)
        self._check_soft_tokens()
        self.to(model.device)

    def _check_soft_tokens(self) -> None:
        """A template's {soft:N} slots are filled with the prompt method's k virtual tokens."""
        template = getattr(self.head, "template", None)
        n = template.n_soft if template is not None else 0
        if not n:
            return
        if not hasattr(self.delta, "virtual_tokens"):
            raise ValueError(f"template {template.text!r} has {n} soft tokens ({{soft:N}}): they are the "
                             f"prompt method's table, but method '{self.method.name}' has none; use "
                             f"method 'prompt' or 'ptuning' with k={n}, or remove {{soft:N}} from the template")
        with torch.no_grad():
            k = self.delta.virtual_tokens(1).shape[1]
        if k != n:
            raise ValueError(f"template {template.text!r} has {n} soft tokens but method '{self.method.name}' "
                             f"has k={k}; set its argument k={n} (--method-args k={n}) or change {{soft:N}}")

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
        has_virtual = first and hasattr(self.delta, "virtual_tokens")
        template = getattr(self.head, "template", None)
        inline = has_virtual and template is not None and template.n_soft > 0
        soft = (input_ids == SOFT_TOKEN) if inline else None       # (B, T) the template's {soft:N} slots
        if has_virtual and active:
            virt = self.delta.virtual_tokens(B)                      # (B, k, H)
            embeds = self.model.get_input_embeddings()(input_ids.clamp(min=0) if inline else input_ids)
            if inline:
                # In place: the j-th soft slot of a row takes virtual token j (each row has k slots,
                # checked at attach); they are ordinary positions, so nothing is prepended.
                j = (soft.long().cumsum(1) - 1).clamp(min=0)                      # (B, T)
                placed = virt.to(embeds.dtype).gather(1, j.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
                kw["inputs_embeds"] = torch.where(soft.unsqueeze(-1), placed, embeds)
            else:
                n_virtual = virt.shape[1]
                kw["inputs_embeds"] = torch.cat([virt.to(embeds.dtype), embeds], 1)
                mask = torch.cat([mask.new_ones(B, n_virtual), mask], 1)
                if token_type_ids is not None:
                    token_type_ids = torch.cat([token_type_ids.new_zeros(B, n_virtual), token_type_ids], 1)
        elif inline:  # disabled(): a soft slot reads the pad token (nothing to place)
            pad = getattr(self.tokenizer, "pad_token_id", None) or 0
            kw["input_ids"] = torch.where(soft, torch.full_like(input_ids, pad), input_ids)
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
        head = self.head
        with self.slots.route(slot_ids):
            extends = head is not None and head.needs_cache
            hidden, cache = self.encode(input_ids, attention_mask, position_ids, cache,
                                        use_cache or extends, token_type_ids)
            if head is None:
                return self._lm(hidden, labels, cache, return_logits)
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            mask = mask[:, -hidden.shape[1]:]
            extend = (lambda ids: self._extend(cache, mask, ids)) if extends else None
            logits = head(HeadInputs(hidden, mask, input_ids, extend))       # (B, C)
            loss = head.loss(logits, labels) if labels is not None else None
            return AdaptedOutput(loss, logits, hidden, cache if use_cache else None)

    def _extend(self, cache, mask, ids):
        """Continue every row from its cached input: ids (M, L), the same M continuations for each
        of the B rows -> hidden (B, M, L, H). Row b's continuation m runs as row b * M + m on a
        copy of the cache (the caller's cache is left as it was); positions go on from the input's
        last real token, after any virtual or prefix positions (as generation.step does)."""
        from .kv_loop import repeated_cache
        B, T = mask.shape
        M, L = ids.shape
        extra = cache.get_seq_length() - T                     # virtual-token / prefix positions
        full = torch.cat([mask.new_ones(B, extra), mask], 1).repeat_interleave(M, 0)   # (B*M, extra+T)
        full = torch.cat([full, full.new_ones(B * M, L)], 1)
        start = (extra + mask.long().sum(1)).repeat_interleave(M)                      # (B*M,)
        pos = start[:, None] + torch.arange(L, device=ids.device)                      # (B*M, L)
        rep = repeated_cache(cache, M, self.model.config)   # a copy: the caller's cache stays as it was
        ids_per_row = self.slots.ids.repeat_interleave(M) if self.slots.ids is not None else None
        with self.slots.route(ids_per_row):
            h, _ = self.encode(ids.repeat(B, 1), full, position_ids=pos, cache=rep, use_cache=True)
        return h.view(B, M, L, -1)

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

    def merged_model(self) -> nn.Module:
        """The base model with this delta folded into its weights, as a plain model (every
        wrapper module replaced by the base module it wraps): what a later stage attaches a
        fresh method to, so that its `disabled()` reference is this model (SFT -> DPO / PPO).
        `full` is its own model. This Adapted must not be used afterwards."""
        if self.method.name != "full":
            if self.method.name != "none":
                self.merge()
            for name, m in list(self.model.named_modules()):
                if name and getattr(m, "merged", False) and isinstance(getattr(m, "base", None), nn.Module):
                    parent, _, child = name.rpartition(".")
                    setattr(self.model.get_submodule(parent) if parent else self.model, child, m.base)
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def unmerge(self) -> None:
        if not hasattr(self.method, "unmerge"):
            raise ValueError(f"method '{self.method.name}' cannot be merged into the base weights")
        self.method.unmerge(self)

    # --- artifacts -----------------------------------------------------------------------------
    def state_for_slot(self, slot: int = 0) -> dict[str, torch.Tensor]:
        return self.method.export_state(self, slot)

    def meta(self, slot: int = 0) -> dict:
        head = {"num_labels": self.num_labels, "label_names": self.label_names,
                "pooling": self.pooling, "layer": self.layer, "kind": self.head_kind}
        if self.head is not None:  # e.g. the verbalizer's template and label words
            head |= self.head.config(slot)
        return {
            "lmadapt_version": __version__,
            "method": self.method.name,
            "args": self.method.to_dict(),
            "base_model": self.base_fingerprint,
            "head": head,
            **({"init": self.init} if self.init else {}),
        }

    def input_encoder(self, max_length: int = 128, max_target_length: int = 64):
        """The Encoder that turns examples into this model's inputs (a verbalizer head's
        template decides the classification input)."""
        from .batching import Encoder
        return Encoder(self.tokenizer, self.causal, max_length, max_target_length,
                       template=getattr(self.head, "template", None))

    def save(self, directory: str | os.PathLike, slot: int = 0, extra: dict | None = None) -> int:
        """Write safetensors + method.json atomically; -> bytes on disk."""
        if not 0 <= slot < self.slots.n:
            raise ValueError(f"slot {slot} out of range [0, {self.slots.n})")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_for_slot(slot).items()}
        meta = self.meta(slot) | (extra or {})
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


def check_base(meta: dict, model, where: str, have: dict | None = None) -> None:
    """`have`: the model's fingerprint taken before methods were injected (serve.Bank's tables add
    parameters that would change it), else taken now."""
    want, have = meta["base_model"], have or fingerprint(model)
    diff = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "embedding_checksum")
            if want.get(k) != have.get(k)]
    if diff:
        raise ValueError(f"{where} was trained on base model '{want.get('name')}' and does not fit this "
                         f"model ('{have.get('name')}'): differs in " +
                         ", ".join(f"{k} ({want.get(k)} != {have.get(k)})" for k in diff))
