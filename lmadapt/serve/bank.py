"""The Bank: one frozen base model, several methods attached at once (tables.py), many users'
artifacts resident in their slots, and ONE batched forward pass where row i runs user i's prompt,
prefix, LoRA, adapter or bias deltas, or the bare model.

A row's route is (table, slot); in every other table it takes slot 0, the identity. A table no
row uses this pass is switched off (`Slots.disabled`: exact, since slot 0 adds nothing), so a
batch pays only for the methods it holds. LoRA, adapter and BitFit rows run as gathered batched
matmuls over the segment of rows that use the table (`Slots.rows` / `Slots.add_delta`: the rows'
(r, in) weights gathered by `Slots.pick`, then `bmm`, added back by `index_add`): no Python loop
over users, and no work for rows of other methods.

Layout of one row's sequence when some rows use virtual tokens / key-value prefixes (a row uses
one table, so the tables of a kind share positions: K = the largest k among them):

    cache:  [key/value prefix of the row's prefix table, k of K unmasked]
    input:  [virtual tokens of the row's prompt table, k of K unmasked | real tokens, left-padded]

A row unmasks only its own table's positions; positions are the running count of unmasked
positions, so a row with k virtual positions numbers them 0..k-1 and its tokens from k, exactly as
the same artifact alone in `Adapted` does, and the bare rows number their tokens from 0.

Registry: register / replace / remove users at runtime (thread-safe); at most `capacity` artifacts
per table are resident (LRU; an evicted one reloads from disk on its next request; rows in flight
pin theirs). An artifact is checked completely (base model, method, arguments, every tensor's
shape, its head) before anything changes. One thread runs the model (routes are shared state);
the scheduler is that thread when serving.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from ..adapted import check_base, read_artifact
from ..methods import Method, get_method
from ..models import fingerprint, is_causal
from ..precision import autocast
from .runner import DecodeBatch, Sequence, left_pad
from .tables import HEAD_ONLY, SUPPORTED, Table, index_tables, serving_args


class BankBusy(RuntimeError):
    """Every slot of a table is pinned by rows in flight: retry when some finish."""


@dataclass
class Artifact:
    """What the bank keeps for each registered user (small: 1,000 users cost nothing)."""
    name: str
    path: Path
    method: str
    table: int                       # index into Bank.tables; -1: none/probe (base + head)
    kind: str                        # "lm" (generation) | "classify"
    label_names: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Resident:
    """A route into the bank: an artifact loaded in its slot (or the base model: art None)."""
    art: Artifact | None
    table: int = -1
    slot: int = 0
    head: object = None              # classification head (its own weights), or None
    encoder: object = None           # batching.Encoder that makes this head's inputs
    layer: int = -1
    pins: int = 0
    retired: bool = False            # replaced or removed while pinned: freed at the last release


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
        self.lock = threading.RLock()
        self.registry: dict[str, Artifact] = {}
        self.resident: OrderedDict[str, Resident] = OrderedDict()     # LRU order, oldest first
        self.free = [list(range(capacity, 0, -1)) for _ in self.tables]  # pop() -> slot 1 first
        self.base = Resident(None)
        self._last_route: tuple = (None, None)

    @property
    def device(self):
        return self.model.device

    def max_virtual(self) -> int:
        """The most positions a row's virtual tokens or prefix can take (0 without such tables)."""
        return max((t.k for t in self.tables), default=0)

    def methods(self) -> list[str]:
        return [t.name for t in self.tables]

    # --- registry --------------------------------------------------------------------------------
    def _read(self, directory) -> tuple[Artifact, dict, dict]:
        """Read and check an artifact against this bank; -> (artifact, table state, head state)."""
        where = str(directory)
        meta, state = read_artifact(directory)
        check_base(meta, self.model, where, self.fingerprint)
        method = meta["method"]
        if method in HEAD_ONLY:
            table = -1
        elif method not in self.by_name:
            raise ValueError(f"{where}: method '{method}' is not in this bank, built for: "
                             f"{', '.join(self.methods() + list(HEAD_ONLY))}; start the server with "
                             f"--methods including {method}")
        else:
            table = self.by_name[method]
            want, got = self.tables[table].args(), serving_args(method, meta["args"])
            diff = [f"{k}={got.get(k)!r} (bank: {want.get(k)!r})" for k in sorted(set(want) | set(got))
                    if want.get(k) != got.get(k)]
            if diff:
                raise ValueError(f"{where}: this '{method}' artifact differs from the bank's '{method}' table "
                                 f"in {', '.join(diff)}; start the server with --method-args "
                                 f"{method}:{','.join(f'{k}={v}' for k, v in got.items())}")
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        rest = {k: v for k, v in state.items() if not k.startswith("head.")}
        if table >= 0:
            self.tables[table].check_state(rest, where)
        elif rest:
            raise ValueError(f"{where}: a '{method}' artifact holds tensors besides its head: {sorted(rest)[:3]}")
        kind = "classify" if meta["head"].get("num_labels") else "lm"
        art = Artifact("", Path(directory), method, table, kind, list(meta["head"].get("label_names") or []))
        return art, rest, {"meta": meta, "state": head_state}

    def _build_head(self, head: dict, where: str):
        from ..batching import Encoder
        from ..heads import SlotHead
        from ..adapted import Slots
        h, state = head["meta"]["head"], head["state"]
        if not h.get("num_labels"):
            return None, None
        kind = h.get("kind", "linear")
        extra = {k: v for k, v in h.items() if k not in ("num_labels", "label_names", "pooling", "layer", "kind")}
        if kind in ("linear", "mlp"):
            mod = SlotHead(self.model.config.hidden_size, h["num_labels"], Slots(1), kind, pooling=h["pooling"])
            params = dict(mod.named_parameters())
            if set(params) != set(state):
                raise ValueError(f"{where}: head tensors {sorted(state)} do not match a '{kind}' head "
                                 f"({sorted(params)})")
            with torch.no_grad():
                for k, v in state.items():
                    if tuple(v.shape) != tuple(params[k].shape[1:]):
                        raise ValueError(f"{where}: head tensor '{k}' has shape {tuple(v.shape)}, "
                                         f"expected {tuple(params[k].shape[1:])}")
                    params[k][0].copy_(v)
        elif kind == "verbalizer":
            from ..prompting.head import VerbalizerHead
            from .tables import _Host
            shim = _Host(self.model, self.tokenizer, Slots(1), get_method(head["meta"]["method"]))
            shim.label_names, shim.layer = list(h["label_names"]), h["layer"]
            mod = VerbalizerHead(shim, **extra)
        else:
            raise ValueError(f"{where}: unknown head kind '{kind}'")
        mod.to(self.device).eval().requires_grad_(False)
        return mod, Encoder(self.tokenizer, True, self.max_length, template=getattr(mod, "template", None))

    def check(self, directory) -> Artifact:
        """Check an artifact completely (head included) without registering it."""
        art, _, head = self._read(directory)
        self._build_head(head, str(directory))
        return art

    def register(self, name: str, directory, replace: bool = False) -> Artifact:
        """Add (or with replace=True, swap) a user's artifact. Raises ValueError, changing nothing,
        for a foreign base model, a method the bank was not built for, or any mismatch."""
        art = self.check(directory)
        art.name = name
        with self.lock:
            if name in self.registry and not replace:
                raise ValueError(f"user '{name}' is already registered; replace it (PUT) or remove it first")
            if name not in self.registry and replace:
                raise ValueError(f"user '{name}' is not registered; add it first")
            self._evict(name)
            self.registry[name] = art
        return art

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.registry:
                raise ValueError(f"user '{name}' is not registered")
            self._evict(name)
            del self.registry[name]

    def _evict(self, name: str) -> None:
        r = self.resident.pop(name, None)
        if r is None:
            return
        if r.pins:
            r.retired = True             # rows in flight keep its slot until they finish
        elif r.table >= 0:
            self.free[r.table].append(r.slot)

    def _free_slot(self, table: int) -> int:
        if not self.free[table]:
            victim = next((n for n, r in self.resident.items() if r.table == table and not r.pins), None)
            if victim is None:
                raise BankBusy(f"all {self.capacity} '{self.tables[table].name}' slots are in use by "
                               "requests in flight; retry shortly (or raise --capacity)")
            self._evict(victim)
        return self.free[table].pop()

    def acquire(self, name: str | None) -> Resident:
        """The user's route, loading the artifact into a slot if it is not resident; pinned
        until `release`. None: the bare base model."""
        if name is None:
            return self.base
        with self.lock:
            r = self.resident.get(name)
            if r is None:
                art = self.registry.get(name)
                if art is None:
                    raise ValueError(f"unknown user '{name}'")
                fresh, state, head = self._read(art.path)      # from disk: an evicted artifact comes back
                mod, enc = self._build_head(head, str(art.path))
                slot = self._free_slot(fresh.table) if fresh.table >= 0 else 0
                if fresh.table >= 0:
                    self.tables[fresh.table].write(slot, state)
                r = Resident(art, fresh.table, slot, mod, enc, head["meta"]["head"].get("layer", -1))
                self.resident[name] = r
                self._bound_head_only()
            self.resident.move_to_end(name)
            r.pins += 1
            return r

    def _bound_head_only(self) -> None:
        """Head-only users (none/probe) hold no slot; their heads are bounded by `capacity` too."""
        heads = [n for n, r in self.resident.items() if r.table < 0 and not r.pins]
        for n in heads[: max(0, len([1 for r in self.resident.values() if r.table < 0]) - self.capacity)]:
            self.resident.pop(n)

    def release(self, r: Resident) -> None:
        if r.art is None:
            return
        with self.lock:
            r.pins -= 1
            if r.retired and not r.pins and r.table >= 0:
                self.free[r.table].append(r.slot)
                r.retired = False

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
                rows = use.nonzero().squeeze(1).to(self.device) if 0 < n < len(key) else None
                routes.append((ids, rows))
            self._last_route = (key, routes)
        saved = [(t.slots.ids, t.slots.rows, t.slots.disabled) for t in self.tables]
        try:
            for t, (ids, rows) in zip(self.tables, self._last_route[1]):
                t.slots.disabled = ids is None
                t.slots.ids, t.slots.rows = ids, rows
            yield
        finally:
            for t, (ids, rows, off) in zip(self.tables, saved):
                t.slots.ids, t.slots.rows, t.slots.disabled = ids, rows, off

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
        return self.model.get_output_embeddings()(hidden)

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
    def routes(self, names: list[str | None]) -> list[Resident]:
        out = []
        try:
            for n in names:
                out.append(self.acquire(n))
        except BaseException:
            for r in out:
                self.release(r)
            raise
        return out

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
