"""Training checkpoints: trainable tensors, AdamW state, RNG state and loop position, as
safetensors + JSON (no pickle), written to a temp folder and renamed into place."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import DamagedFile, read_json_file, read_safetensors, write_dir


def settings_diff(saved: dict, now: dict) -> list[str]:
    """'name (old -> new)' for every setting that differs: what a refused resume names."""
    return [f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def save_checkpoint(directory: Path, named_params: dict[str, torch.Tensor], optimizer, loop_state: dict) -> None:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in named_params.items()}
    # AdamW state keyed by the parameter's position in the (single) param group.
    names = list(named_params)
    group = optimizer.param_groups[0]
    for i, p in enumerate(group["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{names[i]}.{key}"] = t.detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    meta = {"loop": loop_state, "param_groups": groups}

    def write(tmp: Path):
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=float))
    write_dir(directory, write)


def load_checkpoint(directory: Path, named_params: dict[str, torch.nn.Parameter], optimizer) -> dict:
    directory = Path(directory)
    fix = "delete it to start over, or train into a new --out"
    meta = read_json_file(directory / "state.json", fix)
    tensors = read_safetensors(directory / "state.safetensors", fix)
    if not isinstance(meta, dict) or "loop" not in meta or "param_groups" not in meta:
        raise DamagedFile(f"{directory / 'state.json'}: not an lmadapt checkpoint (no 'loop'/'param_groups'); {fix}")
    if "rng.cpu" not in tensors:
        raise DamagedFile(f"{directory / 'state.safetensors'}: incomplete checkpoint (no RNG state); {fix}")
    names = list(named_params)
    with torch.no_grad():
        for k, p in named_params.items():
            key = f"param.{k}"
            if key not in tensors:
                raise ValueError(f"{directory}: checkpoint has no tensor for '{k}': it was written by "
                                 "another method or model; start without --resume or use another --out")
            p.copy_(tensors[key].to(p.device, p.dtype))
    group = optimizer.param_groups[0]
    for i, p in enumerate(group["params"]):
        prefix = f"optim.{names[i]}."
        st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        # AdamW keeps `step` on the CPU unless capturable; moments live with the parameter.
        st = {k: (v if k == "step" else v.to(p.device)) for k, v in st.items()}
        if st:
            optimizer.state[p] = st
    for g, saved in zip(optimizer.param_groups, meta["param_groups"]):
        g.update(saved)
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    return meta["loop"]
