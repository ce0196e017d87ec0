"""Per-architecture facts the methods need: where the blocks are, what the attention and FFN
output projections are called, the default LoRA targets, and the key/value head shapes.

Adding an architecture means adding one entry to ARCHS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Arch:
    blocks: str              # attribute path from model.base_model to the ModuleList of blocks
    attn_out: str            # path inside a block to the attention output projection
    ffn_out: str             # path inside a block to the FFN output projection
    lora_targets: tuple[str, ...]
    causal: bool


ARCHS: dict[str, Arch] = {
    "llama": Arch("layers", "self_attn.o_proj", "mlp.down_proj",
                  ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
    "mistral": Arch("layers", "self_attn.o_proj", "mlp.down_proj",
                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
    "qwen2": Arch("layers", "self_attn.o_proj", "mlp.down_proj",
                  ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
    "gpt2": Arch("h", "attn.c_proj", "mlp.c_proj", ("c_attn",), True),
    "bert": Arch("encoder.layer", "attention.output.dense", "output.dense", ("query", "value"), False),
}


def arch_of(model) -> Arch:
    mt = model.config.model_type
    if mt not in ARCHS:
        raise ValueError(f"architecture '{mt}' is not supported yet; supported: {', '.join(sorted(ARCHS))} "
                         "(add an entry to lmadapt.arch.ARCHS)")
    return ARCHS[mt]


def get_path(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_path(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_path(module, parent) if parent else module, leaf, new)


def blocks(model) -> nn.ModuleList:
    return get_path(model.base_model, arch_of(model).blocks)


def kv_shape(model) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of the key/value cache."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) for nn.Linear and HF's Conv1D (GPT-2), whose
    weight is stored transposed as (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D":
        w = module.weight
        return w.shape[0], w.shape[1], True
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")


def leaf_name(path: str) -> str:
    """The layer name a module path ends in, through any wrappers: 'attn.o_proj.base' (a Linear
    that an adapter, LoRA or bias delta wraps as its `base`) -> 'o_proj'. Lets methods find
    their target layers when several methods are attached to one model (serve.Bank)."""
    parts = path.split(".")
    while len(parts) > 1 and parts[-1] == "base":
        parts.pop()
    return parts[-1]


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
