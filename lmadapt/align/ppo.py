"""PPO from a reward model (Ouyang et al. 2022 / Ziegler et al. 2019), with its own rollout loop:

    for each step: a batch of prompts
      1. sample responses with the KV-cache `generate` (the policy as it is now)
      2. score each whole response once, at its end (the reward model, or any reward function)
      3. per-token log-probs of the policy and of the reference; reward_t = -kl_coef * KL_t, plus
         the score at the last token (the per-token KL penalty of InstructGPT)
      4. values from the value head, GAE advantages (whitened) and returns
      5. ppo_epochs passes over the rollouts in minibatches: clipped policy loss + vf_coef *
         clipped value loss (objectives.py), gradient clipping, AdamW
      6. adaptive KL coefficient (Ziegler et al.: move kl_coef so the KL tracks kl_target), or fixed

The reference is the policy with its delta off (`Adapted.disabled()`, no copy), a frozen copy only
for `full`. The value head (heads.RewardHead read per token) shares the policy's backbone: its
loss trains the policy's delta too, as in InstructGPT's and TRL's value-head models. The policy
runs in eval mode throughout (no dropout), so the first minibatch's ratio is exactly 1.

Logged per step (result.json `history`): reward (mean score), kl (mean per-sequence KL to the
reference), entropy (per token, of the sampling policy), clip_fraction, value_loss, policy_loss,
kl_coef, response_length. Checkpoints every save_every steps (trainable tensors, value head,
AdamW, RNG, kl_coef, history); --resume continues the same trajectory (each step's sampling
generator is seeded by (seed, step)).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import existing_dir, write_json
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import subsample
from ..heads import RewardHead
from ..memory import PeakMemory
from ..objectives import (entropy_from_logits, gae, linear_token_logprobs, masked_mean, per_token_kl,
                          ppo_policy_loss, ppo_value_loss, whiten)
from ..precision import PRECISIONS, autocast, resolve
from .common import ChatFormat, Reference, in_batches

# (prompt_ids (B, Tp) left-padded, prompt_mask, response (B, L), response_mask) -> scores (B,)
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PPOConfig:
    lr: float | None = None           # None: the method's default
    max_steps: int = 20               # rollout batches
    batch_size: int = 8               # prompts per rollout batch
    minibatch_size: int | None = None  # rollouts per optimizer step (None: the whole batch)
    ppo_epochs: int = 4               # passes over each rollout batch
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.05             # initial coefficient of the per-token KL penalty
    adaptive_kl: bool = False
    kl_target: float = 6.0            # adaptive: the per-sequence KL to track (Ziegler et al.)
    kl_horizon: int = 10000
    kl_estimator: str = "k1"          # objectives.per_token_kl
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    max_length: int = 256             # prompt + response tokens
    max_eval: int | None = 64         # held-out prompts scored at the end (None: all)
    eval_every: int | None = None     # steps between held-out evaluations (None: at the end only)
    save_every: int | None = None     # steps between checkpoints (None: max(1, max_steps // 4))
    eval_batch_size: int = 16
    chat: bool | None = None          # the model's chat template (None: when it has one)
    precision: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPO {name} must be >= 1, got {getattr(self, name)}")
        if self.minibatch_size is not None and not 1 <= self.minibatch_size <= self.batch_size:
            raise ValueError(f"PPO minibatch_size must be in [1, batch_size={self.batch_size}], got {self.minibatch_size}")
        if self.kl_coef < 0 or self.clip_range <= 0 or self.value_clip <= 0:
            raise ValueError("PPO kl_coef must be >= 0 and clip_range, value_clip > 0")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"unknown kl_estimator '{self.kl_estimator}'; choose one of: k1, k3")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be below max_length ({self.max_length})")


# What must not change between a run and its --resume.
RESUME_KEYS = ("lr", "max_steps", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "temperature",
               "top_p", "kl_coef", "adaptive_kl", "kl_target", "kl_horizon", "kl_estimator", "clip_range",
               "value_clip", "vf_coef", "gamma", "lam", "whiten_advantages", "max_length", "seed")


class KLController:
    """Fixed, or adaptive (Ziegler et al. 2019): coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon
    after a batch of n rollouts with mean KL. Hand value: target 6, KL 12, n 8, horizon 80 ->
    error clipped to 0.2, coef 0.1 -> 0.1 * (1 + 0.2 * 0.1) = 0.102."""

    def __init__(self, coef: float, adaptive: bool, target: float, horizon: int):
        self.coef, self.adaptive, self.target, self.horizon = coef, adaptive, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            err = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + err * n / self.horizon


def response_mask(response: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B, L) sampled tokens -> (B, L) 1 up to and including each row's first EOS (generate pads
    after it, often with the EOS id itself)."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device)) if eos_ids else \
        torch.zeros_like(response, dtype=torch.bool)
    before = is_eos.long().cumsum(1) - is_eos.long()          # EOS seen strictly before t
    return (before == 0).long()


def reward_model_fn(reward_model) -> RewardFn:
    """A trained reward model (align.reward) as a reward function: its score of prompt + response."""
    from .reward import score

    def fn(prompt_ids, prompt_mask, response, resp_mask):
        return score(reward_model, torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, resp_mask], 1))
    return fn


class Rollouts:
    """Per-token quantities of the response positions of prompt + response sequences."""

    def __init__(self, policy, value_head):
        self.policy, self.value_head = policy, value_head

    def pass_(self, model, seq, seq_mask, n_prompt, resp_mask, values: bool = True, entropy: bool = False):
        """-> (log-probs (B, L), values (B, L) or None, entropy (B, L) or None) of the response
        tokens: response token j sits at n_prompt + j and is predicted from the hidden state one
        position earlier, which is also the state its value is read from."""
        hidden, _ = model.encode(seq, seq_mask)
        h = hidden[:, n_prompt - 1:-1]                                   # (B, L, H)
        resp = seq[:, n_prompt:]
        keep = resp_mask.bool()
        lm_head = model.model.get_output_embeddings()
        lp = h.new_zeros(resp.shape, dtype=torch.float32)
        lp[keep] = linear_token_logprobs(lm_head, h[keep], resp[keep])
        v = self.value_head.per_token(h).float() * resp_mask if values else None
        ent = None
        if entropy:
            with torch.no_grad():
                ent = torch.zeros_like(lp)
                flat = h[keep]
                ent[keep] = torch.cat([entropy_from_logits(lm_head(flat[i:i + 64]))
                                       for i in range(0, len(flat), 64)]) if len(flat) else ent[keep]
        return lp, v, ent


def _sample(policy, fmt, cfg, ids, mask, generator, do_sample=True):
    tok = policy.tokenizer
    eos = tok.eos_token_id
    resp = policy.generate(ids, mask, max_new_tokens=cfg.max_new_tokens, do_sample=do_sample,
                           temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
    return resp, response_mask(resp, [eos] if eos is not None else [])


@torch.no_grad()
def compare_to_reference(policy, reward_fn: RewardFn, examples, *, fmt: ChatFormat, max_new_tokens: int = 32,
                         batch_size: int = 16, precision: str = "auto", reference=None, progress: bool = False) -> dict:
    """Greedy responses of the policy and of its reference (the disabled adapter: the model the
    delta started from, e.g. the SFT model merged into the base) to the same prompts, both scored
    by `reward_fn`: -> {reward, reward_reference, win_rate (ties count 1/2), kl (per sequence)}."""
    policy.eval()
    reference = reference or Reference(policy)
    cfg = PPOConfig(max_new_tokens=max_new_tokens, max_length=fmt.max_length)
    device = policy.device

    def run(exs):
        batch = fmt.collate([{"input_ids": fmt.prompt_ids(ex)} for ex in exs], device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with autocast(precision, device):
            resp, rmask = _sample(policy, fmt, cfg, ids, mask, None, do_sample=False)
            with reference.model() as ref:
                ref_resp, ref_rmask = _sample(ref, fmt, cfg, ids, mask, None, do_sample=False)
            seq, seq_mask = torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1)
            roll = Rollouts(policy, None)
            lp, _, _ = roll.pass_(policy, seq, seq_mask, ids.shape[1], rmask, values=False)
            with reference.model() as ref:
                rlp, _, _ = roll.pass_(ref, seq, seq_mask, ids.shape[1], rmask, values=False)
            mine = reward_fn(ids, mask, resp, rmask).float()
            theirs = reward_fn(ids, mask, ref_resp, ref_rmask).float()
        kl = ((lp - rlp) * rmask).sum(1)
        return list(zip(mine.tolist(), theirs.tolist(), kl.tolist()))
    rows = in_batches(list(examples), batch_size, run, "compare", progress)
    n = len(rows)
    return {"reward": sum(r[0] for r in rows) / n, "reward_reference": sum(r[1] for r in rows) / n,
            "win_rate": sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b, _ in rows) / n,
            "kl": sum(r[2] for r in rows) / n, "n": n}


def ppo(policy, task, reward, cfg: PPOConfig | None = None, *, out=None, resume: bool = False, data_root=None,
        max_train: int | None = None, train_examples=None, dev_examples=None) -> dict:
    """PPO-train `policy` (an LM with any method attached) on the prompts of `task`; `reward` is
    a reward model (align.reward) or a RewardFn. Writes out/result.json (history per step),
    out/best/ (the policy artifact) and out/value_head.safetensors. -> the result dict."""
    from ..api import _task, build_result, is_main_process
    cfg = cfg or PPOConfig()
    task = _task(task)
    if not policy.causal or policy.head is not None:
        raise ValueError("PPO trains a causal LM policy: attach without a classification or reward head")
    reward_fn = reward if callable(reward) and not isinstance(reward, torch.nn.Module) else reward_model_fn(reward)
    if isinstance(reward, torch.nn.Module):
        if reward.model.config.vocab_size != policy.model.config.vocab_size:
            raise ValueError("the reward model's vocabulary differs from the policy's: PPO scores the policy's "
                             "tokens directly, so train the reward model on the same base model")
    examples = list(train_examples) if train_examples is not None else task.load("train", data_root)
    if max_train and len(examples) > max_train:
        g = torch.Generator().manual_seed(cfg.seed)
        examples = [examples[i] for i in torch.randperm(len(examples), generator=g)[:max_train]]
    dev = subsample(list(dev_examples) if dev_examples is not None else task.load("dev", data_root), cfg.max_eval)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    policy.to(device).eval()
    if isinstance(reward, torch.nn.Module):
        reward.to(device).eval()
    fmt = ChatFormat(policy.tokenizer, task, cfg.chat, cfg.max_length, cfg.max_new_tokens)
    prompts = [{"input_ids": fmt.prompt_ids(ex)} for ex in examples]
    reference = Reference(policy)
    if reference.copy is not None:
        reference.copy.to(device)
    value_head = RewardHead(policy.model.config.hidden_size, policy.slots).to(device)
    roll = Rollouts(policy, value_head)
    named = {f"policy.{k}": p for k, p in policy.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError(f"method '{policy.method.name}' left nothing trainable")
    named |= {f"value_head.{k}": p for k, p in value_head.named_parameters()}
    lr = cfg.lr or policy.method.default_lr
    optimizer = torch.optim.AdamW(list(named.values()), lr=lr)
    kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    save_every = cfg.save_every or max(1, cfg.max_steps // 4)
    eval_every = cfg.eval_every or cfg.max_steps
    ckpt_dir = Path(out) / "checkpoint" if out else None
    trainable_params = policy.num_trainable()
    state = {"step": 0, "history": [], "evals": [], "kl_coef": cfg.kl_coef, "train_seconds": 0.0,
             "config": asdict(cfg), "n_train": len(prompts)}
    if resume and ckpt_dir:
        found = existing_dir(ckpt_dir)
        if found is None or not (found / "state.json").exists():
            print(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            state = load_checkpoint(found, named, optimizer)
            diff = [f"{k} ({state['config'].get(k)} -> {getattr(cfg, k)})" for k in RESUME_KEYS
                    if state["config"].get(k) != getattr(cfg, k)]
            if state.get("n_train") != len(prompts):
                diff.append(f"training prompts ({state.get('n_train')} -> {len(prompts)})")
            if diff:
                raise ValueError(f"{found}: --resume with other settings than the interrupted run: {', '.join(diff)}; "
                                 "resume with the same settings, or train into a new --out")
            kl_ctl.coef = state["kl_coef"]
    mb = cfg.minibatch_size or cfg.batch_size
    from ..trainer import _batch_indices
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not cfg.progress, desc=f"ppo/{task.name}",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    with PeakMemory() as mem:
        for step in range(state["step"], cfg.max_steps):
            # 1-4: rollouts, no gradient
            idx = _batch_indices(step, len(prompts), cfg.batch_size, cfg.seed)
            batch = fmt.collate([prompts[i] for i in idx], device)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
            with torch.no_grad(), autocast(precision, device):
                resp, rmask = _sample(policy, fmt, cfg, ids, mask, gen)
                n_prompt = ids.shape[1]
                seq, seq_mask = torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1)
                old_lp, old_v, ent = roll.pass_(policy, seq, seq_mask, n_prompt, rmask, entropy=True)
                with reference.model() as ref:
                    ref_lp, _, _ = roll.pass_(ref, seq, seq_mask, n_prompt, rmask, values=False)
                scores = reward_fn(ids, mask, resp, rmask).float().to(device)
            kl = per_token_kl(old_lp, ref_lp, cfg.kl_estimator) * rmask               # (B, L)
            rewards = -kl_ctl.coef * kl
            last = (rmask.sum(1) - 1).clamp(min=0)
            rewards[torch.arange(len(idx), device=device), last] += scores
            adv, returns = gae(rewards, old_v, rmask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = whiten(adv, rmask)
            # 5: ppo_epochs passes in minibatches
            logs = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "value_clip_fraction": 0.0}
            n_updates = 0
            g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(len(idx), generator=g).tolist()
                for k in range(0, len(order), mb):
                    j = torch.tensor(order[k:k + mb], device=device)
                    with autocast(precision, device):
                        lp, v, _ = roll.pass_(policy, seq[j], seq_mask[j], n_prompt, rmask[j])
                    pl, cf = ppo_policy_loss(lp, old_lp[j], adv[j], rmask[j], cfg.clip_range)
                    vl, vcf = ppo_value_loss(v, old_v[j], returns[j], rmask[j], cfg.value_clip)
                    (pl + cfg.vf_coef * vl).backward()
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for key, val in (("policy_loss", pl), ("value_loss", vl), ("clip_fraction", cf),
                                     ("value_clip_fraction", vcf)):
                        logs[key] += float(val.detach())
                    n_updates += 1
            seq_kl = float(kl.sum(1).mean())
            row = {"step": step + 1, "reward": float(scores.mean()), "kl": seq_kl,
                   "entropy": float(masked_mean(ent, rmask)), "kl_coef": kl_ctl.coef,
                   "response_length": float(rmask.sum(1).float().mean()),
                   **{k: v / n_updates for k, v in logs.items()}}
            kl_ctl.update(seq_kl, len(idx))          # 6
            state["history"].append(row)
            state["step"], state["kl_coef"] = step + 1, kl_ctl.coef
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{seq_kl:.3f}")
            bar.update(1)
            last_step = state["step"] == cfg.max_steps
            if dev and (state["step"] % eval_every == 0 or last_step):
                m = compare_to_reference(policy, reward_fn, dev, fmt=fmt, max_new_tokens=cfg.max_new_tokens,
                                         batch_size=cfg.eval_batch_size, precision=precision, reference=reference)
                state["evals"].append({"step": state["step"], **m})
            if ckpt_dir and (state["step"] % save_every == 0 or last_step):
                state["train_seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                save_checkpoint(ckpt_dir, named, optimizer, state)
    bar.close()
    state["train_seconds"] += time.perf_counter() - t_start
    if out and is_main_process():
        policy.save(Path(out) / "best", extra={"align": {"stage": "ppo"}})
        from safetensors.torch import save_file
        from ..atomic import write_file
        vh = {k: t.detach().cpu().contiguous() for k, t in value_head.state_dict().items()}
        write_file(Path(out) / "value_head.safetensors", lambda p: save_file(vh, p))
    final = state["evals"][-1] if state["evals"] else None
    summary = {"trainable_params": trainable_params, "train_seconds": state["train_seconds"],
               "examples_per_second": len(state["history"]) * cfg.batch_size / max(state["train_seconds"], 1e-9),
               "peak_memory_mb": mem.peak_mb, "added_memory_mb": mem.added_mb, "best_dev": None, "best_step": None,
               "steps": cfg.max_steps, "processes": 1, "lr": lr, "config": asdict(cfg), "history": state["history"],
               "evals": state["evals"], "precision": precision}
    metrics = {"dev": {k: v for k, v in final.items() if k != "step"} | {"n_available": len(dev)}} if final else {}
    result = build_result(policy, task, metrics, summary, shots=None, seed=cfg.seed, n_train=len(prompts), out=out)
    result["align"] = {"stage": "ppo", "reward": "reward model" if isinstance(reward, torch.nn.Module) else "function",
                       "reference": "copy" if reference.copy is not None else "disabled adapter",
                       "seconds_per_step": state["train_seconds"] / max(1, len(state["history"])),
                       "chat_template": fmt.chat}
    if out and is_main_process():
        write_json(Path(out) / "result.json", result)
    return result
