"""The Bank: one frozen base model, several methods attached at once (tables.py), many users'
artifacts resident in their slots, and ONE batched forward pass where row i runs user i's prompt,
prefix, LoRA, adapter or bias deltas, or the bare model.

A row's route is (table, slot); in every other table it takes slot 0, the identity. A table no
row uses this pass is switched off (`Slots.disabled`: exact, since slot 0 adds nothing), so a
batch pays only for the methods it holds. LoRA and adapter rows run as gathered batched matmuls
over the segment of rows that use the table (`Slots.rows` / `Slots.add_delta`: the rows'
(r, in) weights gathered by `Slots.pick`, then `bmm`, added back by `index_add`): no Python loop
over users, and no work for rows of other methods. BitFit gathers one bias row per row of the
batch (one small op; slot 0's is zero).

Layout of one row's sequence when some rows use virtual tokens / key-value prefixes (a row uses
one table, so the tables of a kind share positions: K = the largest k among them):

    cache:  [key/value prefix of the row's prefix table, k of K unmasked]
    input:  [virtual tokens of the row's prompt table, k of K unmasked | real tokens, left-padded]

A row unmasks only its own table's positions; positions are the running count of unmasked
positions, so a row with k virtual positions numbers them 0..k-1 and its tokens from k, exactly as
the same artifact alone in `Adapted` does, and the bare rows number their tokens from 0.

Registry (registry.py): register / replace / remove users at runtime (thread-safe); at most
`capacity` artifacts per table are resident (LRU; an evicted one reloads from disk on its next
request; rows in flight pin theirs). An artifact is checked completely (base model, method,
arguments, every tensor's shape, its head) before anything changes. One thread runs the model (routes are shared state);
the scheduler is that thread when serving.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..kv_loop import next_logits
from ..methods import Method, get_method
from ..models import fingerprint, is_causal
from ..precision import autocast
from .runner import DecodeBatch, Sequence, left_pad
from .registry import Artifact, BankBusy, Registry, Resident  # noqa: F401 (re-exported)
from .tables import HEAD_ONLY, SUPPORTED, Table, index_tables


@dataclass
class Encoded:
    hidden: torch.Tensor             # (B, T, H) real tokens, last layer
    cache: object                    # KV cache over every position (prefixes, virtual, real)
    mask: torch.Tensor               # (B, L) over every cached position
    pos: torch.Tensor                # (B, T) position ids of the real tokens
    layers: tuple | None = None      # every layer's (B, T, H), when asked for


class Bank:
    def __init__(self, model, tokenizer, methods=None, *, capacity: int = 16, max_length: int = 512):
        if not is_causal(model):
            raise ValueError(f"{model.config.model_type} is not a causal LM: the bank serves causal LMs")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (resident artifacts per method), got {capacity}")
        methods = list(SUPPORTED) if methods is None else list(methods)
        methods = [get_method(m) if isinstance(m, str) else m for m in methods]
        names = [m.name for m in methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method {', '.join(dup)} given twice: a bank holds one table per method")
        bad = [n for n in names if n not in SUPPORTED and n not in HEAD_ONLY]
        if bad:
            raise ValueError(f"method {', '.join(bad)} cannot be served from a bank; choose among: "
                             f"{', '.join(SUPPORTED + HEAD_ONLY)}")
        self.model, self.tokenizer, self.capacity, self.max_length = model.eval(), tokenizer, capacity, max_length
        for p in model.parameters():
            p.requires_grad_(False)
        self.fingerprint = fingerprint(model)       # before the tables add their parameters
        order = sorted((m for m in methods if m.name in SUPPORTED), key=lambda m: SUPPORTED.index(m.name))
        self.tables = [Table(model, tokenizer, m, capacity) for m in order]
        index_tables(model, self.tables)
        for t in self.tables:
            t.to(model.device)
            for p in t.params.values():
                p.requires_grad_(False)
        model.to(model.device)  # the wrappers' tensors, created on the CPU
        self.by_name = {t.name: i for i, t in enumerate(self.tables)}
        self.base_name = getattr(model.config, "lmadapt_name", None) or model.config.model_type
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.users = Registry(self)
        self.registry, self.resident, self.base = self.users.registry, self.users.resident, self.users.base
        self._last_route: tuple = (None, None)

    @property
    def device(self):
        return self.model.device

    def max_virtual(self) -> int:
        """The most positions a row's virtual tokens or prefix can take (0 without such tables)."""
        return max((t.k for t in self.tables), default=0)

    def methods(self) -> list[str]:
        return [t.name for t in self.tables]

    # --- registry (registry.py) ----------------------------------------------------------------
    def check(self, directory) -> Artifact:
        """Check an artifact completely (base model, method, arguments, shapes, head)."""
        return self.users.check(directory)

    def register(self, name: str, directory, replace: bool = False) -> Artifact:
        """Add (or with replace=True, swap) a user's artifact. Raises ValueError, changing nothing,
        for a foreign base model, a method the bank was not built for, or any mismatch."""
        return self.users.register(name, directory, replace)

    def remove(self, name: str) -> None:
        self.users.remove(name)

    def acquire(self, name: str | None) -> Resident:
        """The user's route (None: the base model), loaded into a slot if needed; pinned until release."""
        return self.users.acquire(name)

    def release(self, r: Resident) -> None:
        self.users.release(r)

    def routes(self, names: list[str | None]) -> list[Resident]:
        return self.users.routes(names)

    # --- the forward pass ----------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, rows: list[Resident]):
        """Set every table's slot ids for these rows; tables no row uses are switched off."""
        key = tuple((r.table, r.slot) for r in rows)
        if self._last_route[0] != key:   # a decode batch keeps its rows for many steps: reuse
            table_of = torch.tensor([k[0] for k in key])
            slot_of = torch.tensor([k[1] for k in key])
            routes = []
            for i in range(len(self.tables)):
                use = table_of == i
                n = int(use.sum())
                ids = torch.where(use, slot_of, 0).to(self.device) if n else None
                # a segment of the batch when only some rows use the table (Slots.add_delta)
                rows = use.nonzero().squeeze(1) if 0 < n < len(key) else None
                sub = slot_of[rows].to(self.device) if rows is not None else None
                routes.append((ids, rows.to(self.device) if rows is not None else None, sub))
            self._last_route = (key, routes)
        saved = [(t.slots.ids, t.slots.rows, t.slots.row_ids, t.slots.disabled) for t in self.tables]
        try:
            for t, (ids, rows, sub) in zip(self.tables, self._last_route[1]):
                t.slots.disabled = ids is None
                t.slots.ids, t.slots.rows, t.slots.row_ids = ids, rows, sub
            yield
        finally:
            for t, (ids, rows, sub, off) in zip(self.tables, saved):
                t.slots.ids, t.slots.rows, t.slots.row_ids, t.slots.disabled = ids, rows, sub, off

    def encode(self, input_ids, mask, position_ids=None, cache=None, use_cache=False,
               all_layers=False) -> Encoded:
        """Inside `route`: input_ids (B, T) -> Encoded. First pass (cache None): `mask` (B, T) covers
        the real tokens and the tables' virtual/prefix positions are added; later passes: `mask`
        covers every cached position plus the new ones, and position_ids are given."""
        B, T = input_ids.shape
        embeds = self.model.get_input_embeddings()(input_ids)
        n_virtual = 0
        if cache is None:
            virt, v_mask = self._shared_positions("virtual", B, mask.dtype)
            kv, kv_mask = self._shared_positions("kv", B, mask.dtype)
            if virt is not None:
                n_virtual = virt.shape[1]
                embeds = torch.cat([virt.to(embeds.dtype), embeds], 1)
            if kv is not None:
                cache = self._prefix_cache(kv)
            mask = torch.cat([m for m in (kv_mask, v_mask) if m is not None] + [mask], 1)
        if position_ids is None:
            # positions count unmasked positions: each row's own prefix/virtual tokens, then its text
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - embeds.shape[1]:]
        out = self.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                    cache=cache, use_cache=use_cache, output_hidden_states=all_layers)
        layers = tuple(h[:, n_virtual:] for h in out.hidden_states) if all_layers else None
        return Encoded(out.last_hidden_state[:, n_virtual:], getattr(out, "cache", None), mask,
                       position_ids[:, n_virtual:], layers)

    def _shared_positions(self, kind: str, B: int, dtype):
        """A row uses one table, so the tables of one kind share positions: (B, K, D) holding each
        row's own table's k rows (K = the largest k in use), and its mask (B, K) with ones on the
        row's first k positions; (None, None) when no row uses a table of this kind."""
        tables = [t for t in self.tables if t.kind == kind and not t.slots.disabled]
        if not tables:
            return None, None
        K = max(t.k for t in tables)
        table = tables[0].soft
        out = table.new_zeros(B, K, table.shape[-1])
        own = torch.zeros(B, K, dtype=dtype, device=table.device)
        for t in tables:                                   # a loop over methods, not users
            member = (t.slots.ids != 0)                                           # (B,)
            part = t.slots.pick(t.soft)                                           # (B, k, D)
            out[:, :t.k] = torch.where(member[:, None, None], part, out[:, :t.k])
            own[:, :t.k] = torch.where(member[:, None], torch.ones_like(own[:, :t.k]), own[:, :t.k])
        return out, own

    def _prefix_cache(self, P: torch.Tensor) -> DynamicCache:
        """(B, k, F) key/value prefixes -> a cache holding k positions (as methods.prefix.KVPrefix)."""
        dev = P.device.type
        if torch.is_autocast_enabled(dev):
            P = P.to(torch.get_autocast_dtype(dev))
        L, n_kv, hd = next(t.delta.shape for t in self.tables if t.kind == "kv")
        B, k, _ = P.shape
        kv = P.reshape(B, k, L * 2, n_kv, hd).permute(2, 0, 3, 1, 4)     # (2L, B, n_kv, k, hd)
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(L)], config=self.model.config)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return next_logits(self.model.get_output_embeddings(), hidden)

    def extend(self, rows: list[Resident], enc: Encoded, idx: torch.Tensor, cont: torch.Tensor):
        """Continue rows `idx` of a first pass from its cache with the M continuations cont (M, L)
        -> hidden (b, M, L, H) (the verbalizer's multi-token words, as Adapted._extend)."""
        from ..kv_loop import repeated_cache
        M, L = cont.shape
        b = len(idx)
        sub = DynamicCache([(layer.keys[idx], layer.values[idx]) for layer in enc.cache.layers],
                           config=self.model.config)
        rep = repeated_cache(sub, M, self.model.config)
        m = enc.mask[idx].repeat_interleave(M, 0)
        m = torch.cat([m, m.new_ones(b * M, L)], 1)
        pos = (enc.pos[idx, -1] + 1).repeat_interleave(M)[:, None] + torch.arange(L, device=cont.device)
        sub_rows = [rows[int(i)] for i in idx for _ in range(M)]
        with self.route(sub_rows):
            h = self.encode(cont.repeat(b, 1), m, position_ids=pos, cache=rep, use_cache=True).hidden
        return h.view(b, M, L, -1)

    # --- offline entry points (the server goes through the scheduler) ---------------------------
    @torch.no_grad()
    def logits(self, names: list[str | None], texts: list[str], precision: str = "fp32") -> list[torch.Tensor]:
        """Every real token's next-token logits, per row: [(T_i, V)]. For tests and checks."""
        seqs = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        rows = self.routes(names)
        try:
            ids, mask = left_pad(seqs, self.pad_id, self.device)
            with autocast(precision, self.device), self.route(rows):
                logits = self.lm_head(self.encode(ids, mask).hidden).float()
            return [logits[i, ids.shape[1] - len(s):] for i, s in enumerate(seqs)]
        finally:
            for r in rows:
                self.release(r)

    @torch.no_grad()
    def classify(self, names: list[str], texts: list[str], text_pairs: list[str | None] | None = None,
                 precision: str = "fp32") -> list[dict]:
        """Each row through its user's artifact and head -> [{label, probs: {label: p}, scores}]."""
        rows = self.routes(names)
        try:
            with autocast(precision, self.device):
                return self.classify_rows(rows, texts, text_pairs)
        finally:
            for r in rows:
                self.release(r)

    def classify_rows(self, rows: list[Resident], texts, text_pairs=None) -> list[dict]:
        from ..data import Example
        from ..heads import HeadInputs
        for r in rows:
            if r.head is None:
                name = r.art.name if r.art else self.base_name
                raise ValueError(f"model '{name}' has no classification head (a generation artifact): "
                                 "use /v1/completions")
        pairs = text_pairs or [None] * len(texts)
        seqs = [r.encoder.classification(Example(text=t, text_pair=p))["input_ids"]
                for r, t, p in zip(rows, texts, pairs)]
        ids, mask = left_pad(seqs, self.pad_id, self.device)
        need_cache = any(getattr(r.head, "needs_cache", False) for r in rows)
        with self.route(rows):
            enc = self.encode(ids, mask, use_cache=need_cache, all_layers=any(r.layer != -1 for r in rows))
        out = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):                   # one head call per user in the batch
            groups.setdefault(id(r), []).append(i)
        for members in groups.values():
            r = rows[members[0]]
            idx = torch.tensor(members, device=self.device)
            h = (enc.hidden if r.layer == -1 else enc.layers[r.layer])[idx]
            ext = (lambda c, idx=idx: self.extend(rows, enc, idx, c)) if getattr(r.head, "needs_cache", False) else None
            scores = r.head(HeadInputs(h, mask[idx], ids[idx], ext)).float()      # (b, C)
            probs = scores.softmax(-1)
            for j, i in enumerate(members):
                labels = r.art.label_names
                out[i] = {"label": labels[int(probs[j].argmax())], "scores": scores[j].tolist(),
                          "probs": {lab: float(p) for lab, p in zip(labels, probs[j])}}
        return out

    @torch.no_grad()
    def generate(self, names: list[str | None], prompts: list, *, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seeds: list[int | None] | None = None, stop_ids=None, precision: str = "fp32",
                 output_scores: bool = False):
        """One decode batch over every row (each keeps its route to the end) -> new token lists
        (the stop token is not included); with output_scores, also each row's (n, V) logits."""
        stop = set(stop_ids) if stop_ids is not None else {self.tokenizer.eos_token_id} - {None}
        rows = self.routes(names)
        try:
            seqs = [Sequence(self.tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str)
                             else list(p), r, max_new_tokens, do_sample, temperature, top_p,
                             _generator(seeds[i] if seeds else None, self.device), frozenset(stop),
                             record_scores=output_scores)
                    for i, (p, r) in enumerate(zip(prompts, rows))]
            with autocast(precision, self.device):
                batch = DecodeBatch(self)
                batch.add(seqs)
                while len(batch):
                    batch.step()
        finally:
            for r in rows:
                self.release(r)
        tokens = [s.tokens for s in seqs]
        return (tokens, [torch.stack(s.scores) for s in seqs]) if output_scores else tokens


def _generator(seed, device):
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


__all__ = ["Bank", "BankBusy", "Artifact", "Resident", "Method"]
