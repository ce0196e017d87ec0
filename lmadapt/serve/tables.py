"""Slot tables: several methods attached to ONE base model at once, each with its own `Slots`.

Every method injects exactly as it does into an `Adapted` (its own `inject`), but into a small host
that carries this table's own Slots, so a LoRA wrapper, an adapter and a bias delta on the same
layer each read their own slot ids. Slot 0 of every table is the identity and is never given to a
user: zero LoRA B, zero adapter up-projection and up-bias, zero bias delta (their init), and for
virtual-token / key-value-prefix tables, rows on slot 0 have those positions masked out.

Wrappers nest (an adapter wraps o_proj, LoRA then wraps the Linear inside it, a bias delta the
Linear inside that), so a parameter's path in the bank differs from its path in a one-method
model: `...o_proj.base.base.bias_delta` here, `...o_proj.bias_delta` in the artifact. Removing the
`.base` segments gives the artifact's name back (`canonical`), which is how artifacts load.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..adapted import Slots
from ..methods import Method

# Injection order: the adapter needs the bare Linear at its path, LoRA finds its targets through
# an adapter (arch.leaf_name), bias deltas wrap the innermost Linear. Prompt/prefix tables add no
# module wrappers, so their place does not matter.
SUPPORTED = ("adapter", "lora", "bitfit", "prompt", "ptuning", "prefix", "ptuning2")
# Methods that inject nothing: a user of these is the base model plus the user's own head.
HEAD_ONLY = ("none", "probe")
# Arguments that only shape training (an encoder, a reparameterization, an init): the stored,
# folded form, and so the table an artifact loads into, does not depend on them.
TRAINING_ONLY = {
    "prompt": {"init", "seed"},
    "ptuning": {"encoder", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"},
    "prefix": {"reparam", "prefix_hidden", "init", "init_text", "seed"},
    "ptuning2": {"reparam", "prefix_hidden", "init", "init_text", "seed"},
    "lora": {"dropout"},
}


def serving_args(method_name: str, args: dict) -> dict:
    """The arguments that decide a table's shape and behaviour (lists made tuples, as in Method)."""
    skip = TRAINING_ONLY.get(method_name, set())
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k not in skip}


class _Host:
    """What Method.inject reads from an Adapted: the bank's model, with this table's Slots."""

    causal = True
    head = None

    def __init__(self, model, tokenizer, slots: Slots, method: Method):
        self.model, self.tokenizer, self.slots, self.method = model, tokenizer, slots, method
        self.delta = nn.Module()
        self.label_names: list[str] = []
        self.num_labels = None
        self.layer = -1

    @property
    def device(self):
        return self.model.device


class Table(nn.Module):
    """One method's slot table: `slots.n` = capacity + 1 (slot 0 = identity)."""

    def __init__(self, model, tokenizer, method: Method, capacity: int):
        super().__init__()
        if method.name not in SUPPORTED:
            raise ValueError(f"method '{method.name}' cannot be served from a bank; choose among: "
                             f"{', '.join(SUPPORTED)} (and {', '.join(HEAD_ONLY)}, which need no table)")
        self.method = method
        self.slots = Slots(capacity + 1)
        host = _Host(model, tokenizer, self.slots, method)
        with torch.no_grad():
            method.inject(host)
        self.delta = host.delta
        self.kind = ("virtual" if hasattr(self.delta, "virtual_tokens") else
                     "kv" if hasattr(self.delta, "kv_prefix") else "module")
        self.params: dict[str, nn.Parameter] = {}   # canonical artifact name -> (S, ...) parameter

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def soft(self) -> torch.Tensor:
        """(S, k, H) virtual tokens or (S, k, F) key/value prefixes."""
        return (self.delta.prompt if self.kind == "virtual" else self.delta.prefix).table

    @property
    def k(self) -> int:
        return self.soft.shape[1] if self.kind != "module" else 0

    def args(self) -> dict:
        return serving_args(self.name, self.method.to_dict())

    def check_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Every tensor the table needs, with one slot's shape; nothing else. Changes nothing."""
        missing, extra = sorted(set(self.params) - set(state)), sorted(set(state) - set(self.params))
        if missing or extra:
            raise ValueError(f"{where}: artifact does not match method '{self.name}' as this bank holds it: "
                             f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        for key, value in state.items():
            want = tuple(self.params[key].shape[1:])
            if tuple(value.shape) != want:
                raise ValueError(f"{where}: tensor '{key}' has shape {tuple(value.shape)}, this bank's "
                                 f"'{self.name}' table expects {want}")

    @torch.no_grad()
    def write(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            p = self.params[key]
            p[slot].copy_(value.to(p.device, p.dtype))


def canonical(path: str) -> str:
    """'model.model.layers.0.self_attn.o_proj.base.lora_A' -> '...o_proj.lora_A'."""
    return ".".join(p for p in path.split(".") if p != "base")


def index_tables(model: nn.Module, tables: list[Table]) -> None:
    """After every table is injected, name each table's parameters as its artifacts name them."""
    by_slots = {id(t.slots): t for t in tables}
    for path, mod in model.named_modules():
        t = by_slots.get(id(getattr(mod, "slots", None)))
        if t is None:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if getattr(p, "lmadapt_slotted", False):
                t.params[canonical(f"model.{path}.{pname}")] = p
    for t in tables:
        for pname, p in t.delta.named_parameters():
            t.params[f"delta.{pname}"] = p
        if not t.params:
            raise ValueError(f"method '{t.name}' injected no slotted tensors into "
                             f"{model.config.model_type}; it cannot be served from a bank")
