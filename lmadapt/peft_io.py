"""Read and write PEFT's on-disk adapter format (adapter_config.json + adapter_model.safetensors)
for LoRA, prompt tuning, P-tuning and prefix tuning, without importing peft.

The format, as PEFT 0.21 writes it (peft/utils/save_and_load.py, get_peft_model_state_dict):
- LoRA: one tensor pair per wrapped module, `base_model.model.<module path in the model>.lora_A.weight`
  (r, in) and `...lora_B.weight` (out, r), scaling lora_alpha / r (lora_alpha / sqrt(r) with
  use_rslora). GPT-2's Conv1D keeps the same A/B orientation (fan_in_fan_out only concerns W).
- Prompt learning: a single tensor `prompt_embeddings`, always the *folded* table the model sees:
  PROMPT_TUNING and P_TUNING store (k, hidden) (P-tuning's encoder output, not its weights);
  PREFIX_TUNING stores (k, num_layers * 2 * token_dim), the projected prefix when
  prefix_projection is on, which PEFT then loads in inference mode as a plain table. For
  grouped-query attention token_dim = n_kv * head_dim and num_attention_heads = n_kv.
  The per-position layout is ours too (see methods/prefix.py), so tensors move unchanged.

Positions: for prefix tuning both PEFT and lmadapt number real tokens from k; for prompt tuning
PEFT drops position_ids and the model counts virtual + real tokens from 0, which is what
lmadapt does too (virtual tokens take positions 0..k-1). Without padding the two agree exactly;
with left padding lmadapt's explicit positions are the ones that stay correct.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .arch import is_linear_like, kv_shape
from .api import attach
from .atomic import read_json_file, read_safetensors, write_file
from .methods import get_method

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPES = {"lora": "LORA", "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING",
              "ptuning2": "PREFIX_TUNING"}
# LoRA features lmadapt's LoRA does not have: any value other than these means "refuse".
LORA_UNSUPPORTED = ("use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "modules_to_save",
                    "exclude_modules", "target_parameters", "trainable_token_indices", "rank_pattern",
                    "alpha_pattern", "use_qalora", "layer_replication", "alora_invocation_tokens", "use_bdlora")


def _backbone_prefix(model) -> str:
    """Path of the backbone inside the model: 'model.' (LLaMA), 'transformer.' (GPT-2), '' (BertModel)."""
    p = getattr(model, "base_model_prefix", "")
    return f"{p}." if p and hasattr(model, p) else ""


def _read(peft_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    d = Path(peft_dir)
    if not (d / CONFIG).exists():
        raise FileNotFoundError(f"{d}: not a PEFT adapter folder (no {CONFIG})")
    if not (d / WEIGHTS).exists():
        hint = " (found adapter_model.bin: pickle is not read; re-save with safe_serialization=True)" \
            if (d / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{d}: no {WEIGHTS}{hint}")
    fix = "re-save the PEFT adapter"
    return read_json_file(d / CONFIG, fix), read_safetensors(d / WEIGHTS, fix)


def _lora_targets(cfg: dict, model, where: str) -> tuple[str, ...]:
    targets = cfg.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear layer except the output head
        return tuple(sorted({n.rsplit(".", 1)[-1] for n, m in model.base_model.named_modules()
                             if is_linear_like(m)}))
    if isinstance(targets, str) or not targets:
        raise ValueError(f"{where}: target_modules {targets!r} is a regex or empty; lmadapt reads a list of "
                         "module names (e.g. [\"q_proj\", \"v_proj\"]) or \"all-linear\"")
    # 'self_attn.q_proj' -> 'q_proj'; the exact set of wrapped modules is checked against the tensors.
    return tuple(sorted({t.rsplit(".", 1)[-1] for t in targets}))


def _method_from_config(cfg: dict, model, where: str):
    kind = cfg.get("peft_type")
    if kind == "LORA":
        bad = [f"{f}={cfg[f]!r}" for f in LORA_UNSUPPORTED if cfg.get(f) not in (None, False, {}, [])]
        if cfg.get("bias", "none") != "none":
            bad.append(f"bias={cfg['bias']!r}")
        if bad:
            raise ValueError(f"{where}: LoRA options lmadapt does not support: {', '.join(bad)}")
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        if cfg.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r); ours by alpha / r
            alpha *= math.sqrt(r)
        return get_method("lora", r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
                          targets=_lora_targets(cfg, model, where))
    if kind not in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise ValueError(f"{where}: peft_type {kind!r} is not supported; lmadapt reads LORA, PROMPT_TUNING, "
                         "P_TUNING, PREFIX_TUNING")
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{where}: num_transformer_submodules={cfg['num_transformer_submodules']} "
                         "(encoder-decoder models) is not supported")
    k = int(cfg["num_virtual_tokens"])
    if kind == "PROMPT_TUNING":
        return get_method("prompt", k=k)
    if kind == "P_TUNING":
        return get_method("ptuning", k=k, encoder=str(cfg.get("encoder_reparameterization_type", "MLP")).lower(),
                          encoder_hidden_size=cfg.get("encoder_hidden_size"),
                          encoder_num_layers=int(cfg.get("encoder_num_layers") or 2),
                          encoder_dropout=float(cfg.get("encoder_dropout") or 0.0))
    L, n_kv, hd = kv_shape(model)
    want = {"num_layers": L, "num_attention_heads": n_kv, "token_dim": n_kv * hd}
    diff = [f"{key} {cfg.get(key)} != {v}" for key, v in want.items() if cfg.get(key) not in (None, v)]
    if diff:
        raise ValueError(f"{where}: prefix shape does not fit this {model.config.model_type} model: "
                         + ", ".join(diff) + " (was the adapter trained on another base model?)")
    return get_method("prefix", k=k, reparam=bool(cfg.get("prefix_projection")),
                      prefix_hidden=int(cfg.get("encoder_hidden_size") or 512))


def from_peft(model, peft_dir, tokenizer=None, **attach_kwargs):
    """Load a PEFT adapter folder into slot 0 of a new Adapted model. `attach_kwargs` go to
    lmadapt.attach (slots, task / num_labels, pooling, ...); a classification head, if any,
    keeps its fresh initialization (PEFT's modules_to_save are not read)."""
    where = str(peft_dir)
    cfg, tensors = _read(peft_dir)
    method = _method_from_config(cfg, model, where)
    adapted = attach(model, method, tokenizer=tokenizer, **attach_kwargs)
    ours = _lora_state(adapted, tensors, where) if method.name == "lora" else _prompt_state(adapted, tensors, where)
    current = adapted.state_for_slot(0)
    adapted.load_state({k: v for k, v in current.items() if k.startswith("head.")} | ours, 0)
    adapted.eval()
    return adapted


def _lora_state(adapted, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    model = adapted.model
    bmp, prefix = getattr(model, "base_model_prefix", ""), _backbone_prefix(model)
    out = {}
    for key, value in tensors.items():
        part = next((p for p in ("lora_A", "lora_B") if key.endswith(f".{p}.weight")), None)
        if not key.startswith("base_model.model.") or part is None:
            raise ValueError(f"{where}: unexpected tensor '{key}' (lmadapt reads lora_A/lora_B weights only; "
                             "modules_to_save, biases and embedding LoRA are not supported)")
        path = key[len("base_model.model."):-len(f".{part}.weight")]
        # Trained on another head class (e.g. BertForSequenceClassification: 'bert.encoder...')?
        rel = path[len(bmp) + 1:] if bmp and path.startswith(f"{bmp}.") else path
        out[f"model.{prefix}{rel}.{part}"] = value
    expected = {k for k in adapted.state_for_slot(0) if not k.startswith("head.")}
    missing, extra = sorted(expected - set(out)), sorted(set(out) - expected)
    if missing or extra:
        raise ValueError(f"{where}: the adapter wraps other modules than lmadapt's LoRA with targets "
                         f"{list(adapted.method.targets)} (every backbone layer with those names): "
                         f"not in the adapter {missing[:4]}, not in this model {extra[:4]}")
    return out


def _prompt_state(adapted, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"{where}: expected one tensor 'prompt_embeddings', found {sorted(tensors)[:5]}")
    key = next(k for k in adapted.state_for_slot(0) if k.startswith("delta."))  # delta.prompt|prefix.table
    table, want = tensors["prompt_embeddings"], adapted.state_for_slot(0)[key].shape
    if table.shape != want:
        raise ValueError(f"{where}: prompt_embeddings has shape {tuple(table.shape)}, this model needs "
                         f"{tuple(want)} (num_virtual_tokens x token dims)")
    return {key: table}


def to_peft(adapted, directory, slot: int = 0, drop_head: bool = False) -> int:
    """Write one slot as a PEFT adapter folder that `PeftModel.from_pretrained(base, directory)`
    loads for inference; -> bytes written. Prefix methods are written with prefix_projection
    false: the file holds the plain prefix, so PEFT can also continue training it."""
    name = adapted.method.name
    if name not in PEFT_TYPES:
        raise ValueError(f"method '{name}' has no PEFT format; to_peft supports: {', '.join(PEFT_TYPES)}")
    if adapted.head is not None and not drop_head:
        raise ValueError("PEFT's format has no place for lmadapt's classification head (head.* tensors); "
                         "pass drop_head=True to write only the method's tensors")
    if not 0 <= slot < adapted.slots.n:
        raise ValueError(f"slot {slot} out of range [0, {adapted.slots.n})")
    state = {k: v for k, v in adapted.state_for_slot(slot).items() if not k.startswith("head.")}
    model, cfg = adapted.model, adapted.model.config
    config = {"peft_type": PEFT_TYPES[name], "task_type": "CAUSAL_LM" if adapted.causal else "FEATURE_EXTRACTION",
              "base_model_name_or_path": None, "revision": None, "inference_mode": True}
    if name == "lora":
        m = adapted.method
        layers = m.layers(adapted)
        wrapped = {id(layer) for layer in layers}
        config |= {"r": m.r, "lora_alpha": m.alpha, "lora_dropout": m.dropout, "bias": "none",
                   "target_modules": sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if id(mod) in wrapped}),
                   "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers), "use_rslora": False,
                   "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
        tensors = {f"base_model.{k}.weight": v for k, v in state.items()}  # model.X.lora_A -> base_model.model.X.lora_A.weight
    else:
        (key, table), = state.items()
        L, n_kv, hd = kv_shape(model)
        config |= {"num_virtual_tokens": table.shape[0], "num_transformer_submodules": 1, "num_layers": L,
                   "token_dim": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads}
        if name == "prompt":
            config |= {"prompt_tuning_init": "RANDOM"}
        elif name == "ptuning":
            m = adapted.method
            config |= {"encoder_reparameterization_type": m.encoder.upper(),
                       "encoder_hidden_size": m.encoder_hidden_size or cfg.hidden_size,
                       "encoder_num_layers": m.encoder_num_layers, "encoder_dropout": m.encoder_dropout}
        else:
            config |= {"token_dim": n_kv * hd, "num_attention_heads": n_kv, "prefix_projection": False,
                       "encoder_hidden_size": n_kv * hd}
        tensors = {"prompt_embeddings": table}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    write_file(d / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_file(d / CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return (d / WEIGHTS).stat().st_size + (d / CONFIG).stat().st_size

