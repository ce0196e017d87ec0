"""The bank's registry: which users are registered (1,000 cost a few hundred KB), which are
resident in a slot (at most `capacity` per table, least recently used evicted; rows in flight pin
theirs), and the complete check of an artifact against the bank before anything changes."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapted import check_base, read_artifact
from ..methods import get_method
from .tables import HEAD_ONLY, serving_args


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


class Registry:
    def __init__(self, bank):
        self.bank = bank
        self.lock = threading.RLock()
        self.registry: dict[str, Artifact] = {}
        self.resident: OrderedDict[str, Resident] = OrderedDict()     # LRU order, oldest first
        self.free = [list(range(bank.capacity, 0, -1)) for _ in bank.tables]  # pop() -> slot 1 first
        self.base = Resident(None)

    def read(self, directory) -> tuple[Artifact, dict, dict]:
        """Read and check an artifact against this bank; -> (artifact, table state, head state)."""
        where = str(directory)
        meta, state = read_artifact(directory)
        check_base(meta, self.bank.model, where, self.bank.fingerprint)
        method = meta["method"]
        if method in HEAD_ONLY:
            table = -1
        elif method not in self.bank.by_name:
            raise ValueError(f"{where}: method '{method}' is not in this bank, built for: "
                             f"{', '.join(self.bank.methods() + list(HEAD_ONLY))}; start the server with "
                             f"--methods including {method}")
        else:
            table = self.bank.by_name[method]
            want, got = self.bank.tables[table].args(), serving_args(method, meta["args"])
            diff = [f"{k}={got.get(k)!r} (bank: {want.get(k)!r})" for k in sorted(set(want) | set(got))
                    if want.get(k) != got.get(k)]
            if diff:
                raise ValueError(f"{where}: this '{method}' artifact differs from the bank's '{method}' table "
                                 f"in {', '.join(diff)}; start the server with --method-args "
                                 f"{method}:{','.join(f'{k}={v}' for k, v in got.items())}")
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        rest = {k: v for k, v in state.items() if not k.startswith("head.")}
        if table >= 0:
            self.bank.tables[table].check_state(rest, where)
        elif rest:
            raise ValueError(f"{where}: a '{method}' artifact holds tensors besides its head: {sorted(rest)[:3]}")
        kind = "classify" if meta["head"].get("num_labels") else "lm"
        art = Artifact("", Path(directory), method, table, kind, list(meta["head"].get("label_names") or []))
        return art, rest, {"meta": meta, "state": head_state}

    def build_head(self, head: dict, where: str):
        from ..batching import Encoder
        from ..heads import SlotHead
        from ..adapted import Slots
        h, state = head["meta"]["head"], head["state"]
        if not h.get("num_labels"):
            return None, None
        kind = h.get("kind", "linear")
        extra = {k: v for k, v in h.items() if k not in ("num_labels", "label_names", "pooling", "layer", "kind")}
        if kind in ("linear", "mlp"):
            mod = SlotHead(self.bank.model.config.hidden_size, h["num_labels"], Slots(1), kind, pooling=h["pooling"])
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
            shim = _Host(self.bank.model, self.bank.tokenizer, Slots(1), get_method(head["meta"]["method"]))
            shim.label_names, shim.layer = list(h["label_names"]), h["layer"]
            mod = VerbalizerHead(shim, **extra)
        else:
            raise ValueError(f"{where}: unknown head kind '{kind}'")
        mod.to(self.bank.device).eval().requires_grad_(False)
        return mod, Encoder(self.bank.tokenizer, True, self.bank.max_length, template=getattr(mod, "template", None))

    def check(self, directory) -> Artifact:
        """Check an artifact completely (head included) without registering it."""
        art, _, head = self.read(directory)
        self.build_head(head, str(directory))
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
                raise BankBusy(f"all {self.bank.capacity} '{self.bank.tables[table].name}' slots are in use by "
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
                fresh, state, head = self.read(art.path)      # from disk: an evicted artifact comes back
                mod, enc = self.build_head(head, str(art.path))
                slot = self._free_slot(fresh.table) if fresh.table >= 0 else 0
                if fresh.table >= 0:
                    self.bank.tables[fresh.table].write(slot, state)
                r = Resident(art, fresh.table, slot, mod, enc, head["meta"]["head"].get("layer", -1))
                self.resident[name] = r
                self._bound_head_only()
            self.resident.move_to_end(name)
            r.pins += 1
            return r

    def _bound_head_only(self) -> None:
        """Head-only users (none/probe) hold no slot; their heads are bounded by `capacity` too."""
        heads = [n for n, r in self.resident.items() if r.table < 0 and not r.pins]
        for n in heads[: max(0, len([1 for r in self.resident.values() if r.table < 0]) - self.bank.capacity)]:
            self.resident.pop(n)

    def release(self, r: Resident) -> None:
        if r.art is None:
            return
        with self.lock:
            r.pins -= 1
            if r.retired and not r.pins and r.table >= 0:
                self.free[r.table].append(r.slot)
                r.retired = False

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
