"""Intrinsic prompt tuning (IPT, Qin et al. 2021): a shared low-dimensional task subspace for soft
prompts. (Different from the `intrinsic` method: that is a random projection of all weights,
SAID-style; here the subspace is LEARNED, from many tasks' prompts, and only prompts live in it.)

1. Prompts per training task (`train_prompts`): ordinary prompt tuning, k soft tokens, one run
   per task (classification through the verbalizer head, generation through the LM loss).
2. Multi-task subspace finding (`fit_autoencoder`): an auto-encoder over the flattened prompts,

       z = Proj(P) = W_down vec(P) + b           (k*H -> d, e.g. d = 5)
       P^ = Proj_b(z) = W_2 tanh(W_1 z + b_1) + b_2  (d -> k*H, IPT's two-layer back-projection)

   trained with the reconstruction loss (objectives.prompt_reconstruction, weight `recon_weight`)
   PLUS each task's own loss with the decoded prompt P^ in place of P - so the subspace keeps
   what the tasks need, not only what the prompts look like. `recon="relative"` (the default)
   divides the reconstruction by the prompts' mean square: the plain per-element MSE is ~1e-2 on
   SmolLM2's prompts, and with it the auto-encoder fit the task losses alone (decoded prompts of
   10-18x the prompts' energy, which a held-out task could not tune). `recon_warmup` steps of
   reconstruction alone (no LM pass: 500 take 15-25 s on SmolLM2's prompts) come first, so a short joint budget starts from a
   decoder that spans the prompts. Then one flat loop: step t takes task
   t mod n and a batch of it; the training tasks' prompts are fixed, only the AE trains.
   OUT/decoder/ holds the AE (decoder.safetensors), the training tasks' codes z_i and
   decoder.json (k, H, d, tasks, the base model's fingerprint, the final reconstruction error).
3. Intrinsic subspace tuning: the `ipt` method (methods/ipt.py) trains only z (d numbers) for an
   unseen task; the frozen Proj_b turns it into the soft prompt. Its artifact is z plus the
   decoder's path and sha256 (method.json), checked when it loads.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..objectives import prompt_reconstruction

DECODER_FILE, DECODER_META = "decoder.safetensors", "decoder.json"


class PromptAutoEncoder(nn.Module):
    def __init__(self, k: int, hidden_size: int, d: int, width: int = 256):
        super().__init__()
        self.k, self.hidden_size, self.d = k, hidden_size, d
        self.down = nn.Linear(k * hidden_size, d)                                  # Proj
        self.up = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, k * hidden_size))   # Proj_b

    def encode(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.down(prompt.flatten(-2))                                       # (.., k, H) -> (.., d)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(z).unflatten(-1, (self.k, self.hidden_size))                # (.., d) -> (.., k, H)


class DecodedPrompt(nn.Module):
    """adapted.delta while the AE trains: the virtual tokens are decode(encode(P)), P fixed."""

    def __init__(self, ae: PromptAutoEncoder, prompt: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "ae", ae)          # shared by every task: not a submodule of each
        self.register_buffer("prompt", prompt.detach().float(), persistent=False)   # (k, H)

    def virtual_tokens(self, batch_size: int) -> torch.Tensor:
        return self.ae.decode(self.ae.encode(self.prompt)).expand(batch_size, -1, -1)   # (B, k, H)


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prompt_dir(out, task) -> Path:
    """Where `train_prompts` trains `task`'s prompt (its best/ is the finished prompt)."""
    from ..api import _task
    return Path(out) / "prompts" / _task(task).name


def train_prompts(model, tok, tasks, out, *, k: int = 20, shots=None, max_train: int | None = 500, seed: int = 0,
                  data_root=None, **train_config) -> dict[str, torch.Tensor]:
    """Prompt tuning on each task (OUT/prompts/NAME, skipped when already there, resumed from its
    checkpoint when a run was interrupted: pass `save_every` for checkpoints between evaluations);
    -> name -> (k, H)."""
    from ..adapted import read_artifact
    from ..api import attach, train
    from ..api import _task
    from ..atomic import existing_dir, read_json_file, write_json
    from ..checkpoint import settings_diff
    # what a prompt depends on; progress and checkpointing do not change it
    settings = json.loads(json.dumps({"k": k, "shots": shots, "max_train": max_train, "seed": seed,
                                      **{n: v for n, v in train_config.items() if n not in ("progress", "save_every")}},
                                     default=str))
    prompts = {}
    for task in tasks:
        t = _task(task)
        run = prompt_dir(out, t)
        record = run / "ipt_prompt.json"
        if record.exists():
            saved = read_json_file(record, f"delete {run} to train this task's prompt again")
            if saved != settings:
                raise ValueError(f"{run}: its prompt was trained with other settings: "
                                 f"{', '.join(settings_diff(saved, settings))}; use "
                                 f"another folder, or delete {run} to train it again")
        if not (run / "best" / "method.json").exists():
            write_json(record, settings)
            a = attach(model, "prompt", task=t, tokenizer=tok, k=k, seed=seed, init_seed=seed)
            train(a, t, shots=shots, max_train=max_train, seed=seed, data_root=data_root, out=run, ood=[],
                  resume=existing_dir(run / "checkpoint") is not None, **train_config)
        prompts[t.name] = read_artifact(run / "best")[1]["delta.prompt.table"].float()
    return prompts


def fit_autoencoder(model, tok, tasks, prompts: dict[str, torch.Tensor], out, *, d: int = 5, width: int = 256,
                    steps: int = 500, lr: float = 1e-3, recon_weight: float = 1.0, recon: str = "relative",
                    recon_warmup: int = 500, batch_size: int = 8,
                    max_train: int = 500, max_length: int = 128, seed: int = 0, data_root=None,
                    precision: str = "auto", progress: bool = False, checkpoint_every: int = 100) -> dict:
    """Step 2 above for `tasks` (Task objects or names; prompts: task name -> (k, H)); writes
    OUT/decoder/ and OUT/history.json. -> {'decoder': path, 'sha256', 'recon_mse' and 'recon_relative':
    per task, 'history', 'resumed_from': the joint step it started at}.

    Resumable: every `checkpoint_every` joint steps (and at the end) OUT/checkpoint/ holds the AE, its
    AdamW state, the batch sampler's and torch's RNG state and the history, written atomically. A
    call whose settings match the checkpoint's (everything but `steps`; the prompts by hash)
    continues from it - after a kill, or past a finished run's `steps` to extend the joint phase -
    and gives the same decoder as one uninterrupted run; other settings are refused, naming them.
    (The full set-up is hours of joint steps on a CPU; 0 turns checkpoints off.)"""
    from ..api import _task, attach
    from ..atomic import write_dir, write_json
    from ..batching import is_classification
    from ..checkpoint import save_checkpoint
    from ..data import subsample
    from ..models import fingerprint
    from ..precision import autocast, resolve
    from safetensors.torch import save_file
    if recon not in ("relative", "mse"):
        raise ValueError(f"fit_autoencoder: recon must be 'relative' or 'mse', not {recon!r}")
    tasks = [_task(t) for t in tasks]
    missing = [t.name for t in tasks if t.name not in prompts]
    if not tasks or missing:
        raise ValueError(f"fit_autoencoder needs a prompt for every training task; none for {', '.join(missing) or '(no tasks)'}")
    prompts = {t.name: prompts[t.name] for t in tasks}
    shapes = {tuple(p.shape) for p in prompts.values()}
    if len(shapes) != 1:
        raise ValueError(f"the tasks' prompts differ in shape ({sorted(shapes)}): train them with the same k")
    (k, H), = shapes
    torch.manual_seed(seed)
    device = model.device
    ae = PromptAutoEncoder(k, H, d, width).to(device)
    members = []
    for t in tasks:
        name, P = t.name, prompts[t.name]
        a = attach(model, "prompt", task=t, tokenizer=tok, k=k)
        a.delta = DecodedPrompt(ae, P.to(device))
        enc = a.input_encoder(max_length)
        exs = subsample(t.load("train", data_root), max_train, seed=seed)
        feats = [enc.encode(t, ex) for ex in exs]
        members.append((name, a, enc, feats, P.to(device), is_classification(t)))
    opt = torch.optim.AdamW(ae.parameters(), lr=lr)
    precision = resolve(precision, device)
    settings = {"tasks": [m[0] for m in members], "prompts_sha256": _prompts_sha256(prompts), "k": k,
                "hidden_size": H, "d": d, "width": width, "lr": lr, "recon_weight": recon_weight, "recon": recon,
                "recon_warmup": recon_warmup, "batch_size": batch_size, "max_train": max_train,
                "max_length": max_length, "seed": seed, "precision": precision,
                "base_model": {key: value for key, value in fingerprint(model).items() if key != "name"}}   # not how it was spelled
    ckpt = Path(out) / "checkpoint"
    g = torch.Generator().manual_seed(seed)
    loop = _resume(ckpt, settings, steps, dict(ae.named_parameters()), opt) if checkpoint_every else None

    def recon_loss(P: torch.Tensor) -> torch.Tensor:
        return prompt_reconstruction(ae.decode(ae.encode(P)), P, relative=recon == "relative")
    # Warm-up: reconstruction alone, all prompts at once (no LM pass), so the joint
    # steps start from a decoder that already spans the prompts instead of a random one.
    stacked = torch.stack([m[4] for m in members])                                  # (n, k, H)
    if loop is None:
        for _ in range(recon_warmup):
            loss = recon_loss(stacked)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            warm = float(prompt_reconstruction(ae.decode(ae.encode(stacked)), stacked, relative=True)) if recon_warmup else None
        start, history = 0, []
    else:
        g.set_state(torch.tensor(loop["generator"], dtype=torch.uint8))
        start, history, warm = loop["step"], loop["history"], loop["warm"]

    def save(step: int):
        save_checkpoint(ckpt, dict(ae.named_parameters()), opt,
                        {"step": step, "history": history, "warm": warm, "settings": settings,
                         "generator": g.get_state().tolist()})
    from tqdm.auto import tqdm
    for step in tqdm(range(start, steps), disable=not progress, desc="ipt auto-encoder", initial=start, total=steps):
        name, a, enc, feats, P, _ = members[step % len(members)]
        a.train()
        idx = torch.randint(len(feats), (batch_size,), generator=g).tolist()
        batch = enc.collate([feats[i] for i in idx], device)
        with autocast(precision, device):
            task_loss = a(**batch).loss
        rec = recon_loss(P)
        loss = task_loss.float() + recon_weight * rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step + 1, "task": name, "task_loss": float(task_loss.detach()),
                        "recon": float(rec.detach())})
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    if checkpoint_every and (loop is None or start < steps):
        save(steps)
    ae.eval()
    with torch.no_grad():
        codes = torch.stack([ae.encode(P) for *_, P, _ in members])                   # (n, d)
        decoded = {m[0]: (ae.decode(c), m[4]) for m, c in zip(members, codes)}
        mse = {n: float(prompt_reconstruction(D, P)) for n, (D, P) in decoded.items()}
        relative = {n: float(prompt_reconstruction(D, P, relative=True)) for n, (D, P) in decoded.items()}
    meta = {"k": k, "hidden_size": H, "d": d, "width": width, "tasks": list(prompts), "recon_mse": mse,
            "recon_relative": relative, "recon": recon, "recon_weight": recon_weight, "steps": steps,
            "recon_warmup": recon_warmup, "recon_relative_after_warmup": warm,
            "base_model": fingerprint(model)}
    state = {f"ae.{n}": p.detach().contiguous().cpu() for n, p in ae.state_dict().items()}
    state["codes"] = codes.detach().contiguous().cpu()

    def write(tmp: Path):
        save_file(state, str(tmp / DECODER_FILE))
        (tmp / DECODER_META).write_text(json.dumps(meta, indent=2))
    directory = Path(out) / "decoder"
    write_dir(directory, write)
    write_json(Path(out) / "history.json", history)       # per joint step: task, task loss, reconstruction
    return {"decoder": str(directory), "sha256": sha256_of(directory / DECODER_FILE), "recon_mse": mse,
            "recon_relative": relative, "recon_relative_after_warmup": warm,
            "history": history, "resumed_from": start}


def _prompts_sha256(prompts: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, P in prompts.items():
        h.update(name.encode() + b"\0" + str(tuple(P.shape)).encode())
        h.update(P.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resume(ckpt: Path, settings: dict, steps: int, named: dict, opt) -> dict | None:
    """The loop state of OUT/checkpoint (AE and optimizer restored in place), or None if there is none."""
    from ..atomic import existing_dir, read_json_file
    from ..checkpoint import load_checkpoint, settings_diff
    found = existing_dir(ckpt)
    if found is None:
        return None
    fix = f"delete {ckpt} to start the auto-encoder over, or fit into another folder"
    meta = read_json_file(found / "state.json", fix)
    loop = meta.get("loop") if isinstance(meta, dict) else None
    saved = loop.get("settings") if isinstance(loop, dict) else None
    if saved != settings:
        if not isinstance(saved, dict):
            raise ValueError(f"{found}: not an IPT auto-encoder checkpoint; {fix}")
        raise ValueError(f"{found}: it was fit with other settings: {', '.join(settings_diff(saved, settings))}; {fix}")
    loop = load_checkpoint(found, named, opt)
    if loop["step"] > steps:
        raise ValueError(f"{found}: it is at joint step {loop['step']}, past steps={steps}; ask for at least "
                         f"{loop['step']} steps, or {fix}")
    return loop


def load_decoder(directory) -> tuple[PromptAutoEncoder, dict, torch.Tensor]:
    """-> (the auto-encoder, frozen; decoder.json; the training tasks' codes (n, d))."""
    from ..atomic import read_json_file, read_safetensors
    directory = Path(directory)
    if not (directory / DECODER_FILE).exists():
        raise FileNotFoundError(f"{directory}: no {DECODER_FILE}; an IPT decoder folder is what "
                                "lmadapt.prompting.ipt.fit_autoencoder writes (OUT/decoder)")
    meta = read_json_file(directory / DECODER_META, "fit the auto-encoder again")
    state = read_safetensors(directory / DECODER_FILE, "fit the auto-encoder again")
    ae = PromptAutoEncoder(meta["k"], meta["hidden_size"], meta["d"], meta["width"])
    ae.load_state_dict({n[len("ae."):]: v for n, v in state.items() if n.startswith("ae.")})
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae.eval(), meta, state["codes"]
