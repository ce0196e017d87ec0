"""Method: a frozen dataclass that is its own config. `inject(adapted)` adds the method's tensors
to an Adapted model; `export_state` / `import_state` move one slot's tensors to and from an
artifact. Registered by name in METHODS, which refuses duplicate names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS:
        raise ValueError(f"method name '{cls.name}' is already registered by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **args) -> "Method":
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(args) - fields)
    if bad:
        raise ValueError(f"method '{name}' has no argument {', '.join(repr(b) for b in bad)}; "
                         f"valid arguments: {', '.join(sorted(fields)) or '(none)'}")
    return cls(**{k: _coerce(name, f, args[k]) for k, f in
                  ((f.name, f) for f in dataclasses.fields(cls)) if k in args})


def _coerce(method: str, field: dataclasses.Field, value):
    """Check a value against the field's declared type: `r=abc` is an error naming the field."""
    kind = str(field.type)
    default = field.default
    want = (bool if "bool" in kind else int if kind.startswith("int") else float if kind.startswith("float")
            else type(default) if default not in (None, dataclasses.MISSING) and not isinstance(default, tuple)
            else None)
    if value is None and "None" in kind:
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not None and not (isinstance(value, want) and not (want is int and isinstance(value, bool))):
        raise ValueError(f"method '{method}': {field.name} must be {want.__name__}, got {value!r}")
    if "tuple" in kind and isinstance(value, str):
        return tuple(v for v in value.replace("+", ",").split(",") if v)
    return value


@dataclass(frozen=True)
class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    supports_slots: ClassVar[bool] = True
    # Whether the head/loss path may use cached frozen features (probe only).
    frozen_features: ClassVar[bool] = False
    # Whether the method's k virtual tokens can fill a template's {soft:N} slots (prompt, ptuning).
    virtual_tokens: ClassVar[bool] = False
    default_lr: ClassVar[float] = 1e-3
    # The default lr on generation tasks where the E2E sweep's winner is another lr than the
    # SST-2-selected default_lr (docs/methods.md, "E2E"); None: default_lr everywhere.
    generation_lr: ClassVar[float | None] = None
    default_epochs: ClassVar[float] = 1.0

    @classmethod
    def lr_for(cls, task) -> float:
        """The default learning rate on `task`: generation_lr on a generation task when the method
        has one, default_lr otherwise."""
        if cls.generation_lr is not None and getattr(task, "kind", None) == "generation":
            return cls.generation_lr
        return cls.default_lr

    def inject(self, adapted) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _check(self, cond: bool, field: str, why: str) -> None:
        if not cond:
            raise ValueError(f"method '{self.name}': {field} {why}")

    # Artifacts: by default, every trainable tensor, one slot's slice of slotted ones.
    def export_state(self, adapted, slot: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                out[name] = p[slot] if getattr(p, "lmadapt_slotted", False) else p
        return out

    def import_state(self, adapted, state: dict[str, torch.Tensor], slot: int) -> None:
        params = dict(adapted.named_parameters())
        expected = set(self.export_state(adapted, slot))
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(f"artifact does not match method '{self.name}': "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
        with torch.no_grad():
            for name, value in state.items():
                p = params[name]
                dst = p[slot] if getattr(p, "lmadapt_slotted", False) else p
                if dst.shape != value.shape:
                    raise ValueError(f"artifact tensor '{name}' has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(dst.shape)}")
                dst.copy_(value.to(dst.dtype))


def fold_layers(layers, merged: bool) -> None:
    """Merge (merged=True) or unmerge every layer that can fold its delta into the base weight
    (`_fold(sign)` and a `merged` flag); layers already in that state are left alone."""
    for m in layers:
        if m.merged != merged:
            m._fold(+1.0 if merged else -1.0)
            m.merged = merged
