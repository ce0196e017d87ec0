"""One flat training loop on accelerate: fresh AdamW, warmup + linear decay, gradient
accumulation, clipping, eval every N steps with the best dev checkpoint kept, atomic checkpoints
and exact resume.

Determinism: the data order of step t is a pure function of (seed, t) — a per-epoch permutation —
so a resumed run replays the same batches, and the RNG state (dropout) is restored from the
checkpoint. `batch_size` is the global number of examples per optimizer step: with W processes
and A accumulation steps each process runs batch_size / (W * A) examples per micro-batch, so 1
and 2 processes follow the same trajectory.

What a step optimizes is an `Objective` (the one hook): how an example is encoded once, its
weight in a batch, the loss of a list of encoded examples, and the dev metrics. The default,
`Supervised`, is the task's own loss; alignment (lmadapt.align: SFT, reward model, DPO) passes its
own, so those run this same loop with its accumulation, checkpoints and resume.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .adapted import read_artifact
from .atomic import existing_dir
from .checkpoint import load_checkpoint, save_checkpoint
from .data import subsample
from .evaluation import evaluate_examples, metric_value
from .memory import PeakMemory
from .methods.probe import extract_features
from .precision import PRECISIONS, autocast, resolve


@dataclass
class TrainConfig:
    lr: float | None = None          # None: the method's default on the task (Method.lr_for)
    epochs: float | None = None     # None: the method's default (Method.default_epochs)
    max_steps: int | None = None     # overrides epochs
    min_steps: int | None = None     # a shorter run (few-shot) is stretched to this many steps
    batch_size: int = 8              # global examples per optimizer step
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int | None = None    # steps; None: at the end of each epoch
    save_every: int | None = None    # steps between resumable checkpoints; None: eval_every
    max_length: int = 128
    max_target_length: int = 64
    eval_batch_size: int = 32
    max_eval: int | None = None      # cap on dev examples, every evaluation (the final one too)
    max_ood: int | None = 500        # cap on each out-of-domain set's examples (None: all)
    max_new_tokens: int = 48
    precision: str = "auto"          # auto | fp32 | bf16 (autocast; weights stay float32)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}")
        for name in ("max_eval", "max_ood", "max_steps", "min_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                unset = "no stretch" if name == "min_steps" else "no limit"
                raise ValueError(f"{name} must be >= 1 (or None: {unset}), got {getattr(self, name)}")


def _schedule(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Always `batch_size` indices: an epoch's last, short batch is filled from the start of the
    same epoch's permutation, so every process gets an equal, non-empty share."""
    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    idx = perm[k * batch_size:(k + 1) * batch_size]
    while len(idx) < batch_size:
        idx += perm[: batch_size - len(idx)]
    return idx


# What must not change between a run and its --resume (the data order and schedule depend on it).
RESUME_KEYS = ("lr", "epochs", "max_steps", "min_steps", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
               "max_grad_norm", "seed", "max_length", "max_target_length")


class Objective(Protocol):
    """What fit optimizes. `loss` gets the (accelerate-wrapped) model and a list of encoded
    examples and returns the chunk's mean loss, or (loss, {name: float}) whose values go into the
    step's history row (weighted like the loss). `evaluate` returns metrics holding the task's
    metric, which picks the best checkpoint."""

    def encode(self, example) -> dict: ...
    def weight(self, feat: dict) -> float: ...
    def loss(self, model, feats: list[dict], device) -> torch.Tensor | tuple[torch.Tensor, dict]: ...
    def evaluate(self, adapted, examples, precision: str, progress: bool) -> dict: ...


class Supervised:
    """The default objective: the task's own loss (the head's, or the LM loss on the target
    tokens) and metric. A chunk's mean loss counts by its share of the global batch: examples for
    classification, target tokens for generation."""

    def __init__(self, adapted, task, cfg: TrainConfig):
        self.task, self.cfg = task, cfg
        self.enc = adapted.input_encoder(cfg.max_length, cfg.max_target_length)

    def encode(self, example) -> dict:
        return self.enc.encode(self.task, example)

    def weight(self, feat: dict) -> float:
        labels = feat.get("labels")
        return sum(1 for t in labels[1:] if t != -100) if isinstance(labels, list) else 1

    def loss(self, model, feats, device):
        return model(**self.enc.collate(feats, device)).loss

    def evaluate(self, adapted, examples, precision, progress) -> dict:
        return evaluate_examples(adapted, self.task, examples, self.enc, self.cfg.eval_batch_size,
                                 self.cfg.max_new_tokens, precision=precision, progress=progress)


def fit(adapted, task, train_examples, dev_examples, cfg: TrainConfig, out: Path | None = None,
        resume: bool = False, features=None, objective: Objective | None = None) -> dict:
    """Train `adapted` in place; -> summary dict (history, best metric, timings, memory).

    `features` = (train_x, train_y, dev_x, dev_y): precomputed frozen features for a probe (see
    methods.probe.extract_features), so a sweep over heads does not re-run the backbone.
    `objective`: what a step optimizes and how dev is scored (default: Supervised)."""
    from accelerate import Accelerator

    if not train_examples:
        raise ValueError(f"task '{task.name}': no training examples")
    cuda = torch.cuda.is_available()
    # Mixed precision is ours (precision.autocast around every forward), the same on CPU and CUDA.
    acc = Accelerator(cpu=not cuda, mixed_precision="no")
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                         f"({world} x {cfg.grad_accum})")
    torch.manual_seed(cfg.seed)
    device = acc.device
    adapted.to(device)
    precision = resolve(cfg.precision, device)
    frozen = adapted.method.frozen_features
    if frozen and objective is not None:
        raise ValueError(f"method '{adapted.method.name}' trains its head on cached features and takes no "
                         "other objective; use a method that runs the backbone (lora, full, ...)")
    objective = objective or Supervised(adapted, task, cfg)
    dev = subsample(dev_examples, cfg.max_eval)
    show = cfg.progress and acc.is_main_process

    t_features = time.perf_counter()  # a probe's backbone pass is part of its training cost
    if frozen:  # probe: features once, then the head trains alone
        if features is None:
            spec = (adapted.layer, adapted.pooling)
            extract = lambda exs, desc: extract_features(  # noqa: E731
                adapted.model, adapted.tokenizer, task, exs, [spec], max_length=cfg.max_length,
                batch_size=cfg.eval_batch_size, precision=precision, progress=show, desc=desc)[spec]
            features = (*extract(train_examples, "features train"),
                        *(extract(dev, "features dev") if dev else (None, None)))
        train_x, train_y, dev_x, dev_y = (t.to(device) if t is not None else None for t in features)
        module = adapted.head
    else:
        feats = [objective.encode(ex) for ex in train_examples]
        module = adapted
    named = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError(f"method '{adapted.method.name}' left nothing trainable")
    lr = cfg.lr or adapted.method.lr_for(task)
    optimizer = torch.optim.AdamW(list(named.values()), lr=lr, weight_decay=cfg.weight_decay)
    n = len(train_examples)
    epochs = cfg.epochs or adapted.method.default_epochs
    per_epoch = math.ceil(n / cfg.batch_size)
    by_epochs = max(1, math.ceil(epochs * per_epoch))
    total = cfg.max_steps or max(by_epochs, cfg.min_steps or 0)
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    wrapped, optimizer = acc.prepare(module, optimizer)
    # Once per epoch; a run stretched by min_steps keeps the evaluations its epochs would have
    # had, spread over its steps (not one per 4-step epoch of a 32-example set).
    stretched = not cfg.max_steps and total > by_epochs
    eval_every = cfg.eval_every or (math.ceil(total / max(1, math.ceil(epochs))) if stretched else per_epoch)
    save_every = cfg.save_every or eval_every
    ckpt_dir = Path(out) / "checkpoint" if out else None

    trainable_params = adapted.num_trainable()  # before a fold on restore (ptuning, prefix) shrinks it
    state = {"step": 0, "best": None, "best_step": None, "history": [], "evals": [],
             "train_seconds": time.perf_counter() - t_features if frozen else 0.0,
             "examples": 0, "config": asdict(cfg), "n_train": n}
    if resume and ckpt_dir:
        found = existing_dir(ckpt_dir)
        if found is None or not (found / "state.json").exists():
            acc.print(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            state = load_checkpoint(found, named, optimizer)
            _check_same_run(state, cfg, n, found)
            scheduler.last_epoch = state["step"]
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            acc.print(f"resumed from {found} at step {state['step']}/{total}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    # Loss weights: a chunk's mean loss counts by its share of the GLOBAL batch — examples for
    # classification, target tokens for generation — times `world`, since DDP averages gradients.
    # So 1 process, 2 processes and any grad_accum give the same gradient.
    weight_of = [1] * n if frozen else [objective.weight(f) for f in feats]

    def loss_of(idx: list[int]) -> tuple[torch.Tensor, dict]:
        with autocast(precision, device):
            if frozen:
                return F.cross_entropy(wrapped(train_x[idx]).float(), train_y[idx]), {}
            out = objective.loss(wrapped, [feats[i] for i in idx], device)
            return out if isinstance(out, tuple) else (out, {})
    best_in_memory = None

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=state["step"], disable=not show,
               desc=f"{adapted.method.name}/{task.name}", dynamic_ncols=True)
    t_start = time.perf_counter()
    start = state["step"]
    with PeakMemory() as mem:
        for step in range(state["step"], total):
            wrapped.train()
            idx = _batch_indices(step, n, cfg.batch_size, cfg.seed)
            mine = idx[rank::world]                      # this process's share of the global batch
            chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
            total_weight = max(1, sum(weight_of[i] for i in idx))
            step_loss = torch.zeros((), device=device)
            stats: dict[str, float] = {}    # the objective's own figures, weighted like the loss
            for j, chunk in enumerate(chunks):
                sync = j == len(chunks) - 1
                ctx = acc.no_sync(wrapped) if not sync and world > 1 else contextlib.nullcontext()
                share = sum(weight_of[i] for i in chunk) / total_weight
                with ctx:
                    loss, chunk_stats = loss_of(chunk)
                    loss = loss * (share * world)
                    acc.backward(loss)
                step_loss += loss.detach() / world
                for k, v in chunk_stats.items():
                    stats[k] = stats.get(k, 0.0) + share * float(v)
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["examples"] += len(idx)
            mean_loss = acc.reduce(step_loss, "sum").item()
            if stats and world > 1:
                summed = acc.reduce(torch.tensor(list(stats.values()), device=device), "sum").tolist()
                stats = dict(zip(stats, summed))
            state["history"].append({"step": step + 1, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                                     **stats})
            state["step"] = step + 1
            elapsed = time.perf_counter() - t_start
            bar.set_postfix(loss=f"{mean_loss:.4f}", ex_s=f"{len(idx) * (step + 1 - start) / max(elapsed, 1e-9):.1f}")
            bar.update(1)
            last = state["step"] == total
            if dev and (state["step"] % eval_every == 0 or last):
                m = _evaluate(adapted, objective, dev, precision, show, dev_x if frozen else None,
                              dev_y if frozen else None)
                value = metric_value(task, m)
                state["evals"].append({"step": state["step"], **m})
                if state["best"] is None or value > state["best"]:
                    state["best"], state["best_step"] = value, state["step"]
                    if out and acc.is_main_process:
                        adapted.save(Path(out) / "best")
                    elif not out:
                        best_in_memory = {k: p.detach().clone() for k, p in named.items()}
                if show:
                    bar.write(f"step {state['step']}: dev {task.metric} = {value:.4f} (best {state['best']:.4f}, "
                              f"{len(dev)} examples)")
            if ckpt_dir and acc.is_main_process and (state["step"] % save_every == 0 or last):
                state["train_seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                save_checkpoint(ckpt_dir, named, optimizer, state)
            acc.wait_for_everyone()
    bar.close()
    state["train_seconds"] += time.perf_counter() - t_start
    # Finish on the best dev checkpoint, on every process.
    if out and state["best_step"] is not None:
        acc.wait_for_everyone()
        _, best_state = read_artifact(Path(out) / "best")
        adapted.load_state(best_state)
    elif best_in_memory is not None:
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(best_in_memory[k])
    elif out and acc.is_main_process:  # no dev set: the last weights are the result
        adapted.save(Path(out) / "best")
    acc.wait_for_everyone()
    best_eval = next((e for e in state["evals"] if e["step"] == state["best_step"]), None)
    return {
        "steps": total, "lr": lr, "config": asdict(cfg), "history": state["history"], "evals": state["evals"],
        "best_dev": state["best"], "best_step": state["best_step"], "processes": world,
        "best_eval": best_eval, "n_dev": len(dev), "precision": precision,
        "trainable_params": trainable_params,
        "train_seconds": state["train_seconds"],
        "examples_per_second": state["examples"] / max(state["train_seconds"], 1e-9),
        "peak_memory_mb": mem.peak_mb, "added_memory_mb": mem.added_mb,
    }


def _check_same_run(state: dict, cfg: TrainConfig, n: int, where: Path) -> None:
    saved = state.get("config", {})
    now = asdict(cfg)
    diff = [f"{k} ({saved.get(k)} -> {now[k]})" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if state.get("n_train") != n:
        diff.append(f"training examples ({state.get('n_train')} -> {n})")
    if diff:
        raise ValueError(f"{where}: --resume with other settings than the interrupted run: {', '.join(diff)}; "
                         "resume with the same settings, or train into a new --out")


@torch.no_grad()
def _evaluate(adapted, objective, dev, precision, progress, dev_x, dev_y):
    if dev_x is not None:  # probe: the head on cached features
        adapted.head.eval()
        preds = adapted.head(dev_x).argmax(-1).tolist()
        from .metrics import compute
        return compute(objective.task.metric, preds, dev_y.tolist())
    return objective.evaluate(adapted, dev, precision, progress)
