"""Alignment benchmark (issue 11): SmolLM2-135M with LoRA on a small budget, in one run.

    SFT (alpaca)  ->  RM (hh_rlhf, on the SFT model)  ->  PPO (alpaca prompts, the RM's reward)
                  ->  DPO (hh_rlhf)

Reports: RM pairwise accuracy on held-out pairs; DPO implicit-reward accuracy on held-out pairs;
PPO's reward and KL curves (per step, also plotted); the RM-judged win rate of the PPO and DPO
policies over the SFT model on the same held-out alpaca prompts (greedy responses, ties 1/2; the
SFT model is each policy's disabled adapter, since both start from SFT merged into the base);
and DPO's peak memory and s/step with our disabled-adapter reference against TRL's DPOTrainer
holding a reference copy (same model, LoRA r/alpha/targets, batch, pairs, precision; TRL's bf16
and gradient checkpointing set explicitly to what ours runs: bf16 autocast iff ours resolves to
bf16, no checkpointing). Each DPO timing runs in its own process (memory readings stay apart).

    .venv/bin/python bench/align.py --out runs/bench_align             # SmolLM2-135M, the defaults below
    .venv/bin/python bench/align.py --tiny --out /tmp/bench_align_tiny # a tiny random model, < 2 min

Writes OUT/bench_align.json (every figure + the commands' result.json paths), OUT/ppo_curves.png,
and each stage's run folder (OUT/sft, OUT/rm, OUT/dpo, OUT/ppo).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lmadapt  # noqa: E402
from lmadapt import align  # noqa: E402
from lmadapt.align.common import ChatFormat, messages_of, start_from  # noqa: E402
from lmadapt.data import subsample  # noqa: E402
from lmadapt.precision import resolve  # noqa: E402
from lmadapt.tasks import get_task  # noqa: E402

TINY_STEPS = dict(sft_steps=3, rm_steps=3, dpo_steps=3, ppo_steps=3, speed_steps=3, batch_size=4, max_eval=4, max_train=32,
                  max_length=96, max_response_length=32, max_new_tokens=8, win_prompts=4)


def tiny_model_dir(where: Path) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer (and chat template), saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = where / "tiny-model"
    if (d / "config.json").exists():
        return d
    _, tok = lmadapt.load("smollm2-135m")  # the tokenizer only; the weights are dropped at once
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def fitting_pairs(fmt: ChatFormat, examples, n: int, max_length: int):
    """The first n pairs whose prompt + chosen and prompt + rejected both fit in max_length
    tokens untruncated: ours and TRL's then see the same tokens."""
    out = []
    for ex in examples:
        p = len(fmt._ids(fmt.prompt_text(ex)))
        if all(p + len(fmt._ids(fmt.response_text(ex, r))) + 1 <= max_length
               and len(fmt._ids(fmt.response_text(ex, r))) < fmt.max_response_length for r in (ex.target, ex.rejected)):
            out.append(ex)
        if len(out) == n:
            break
    return out


# --- one DPO timing in its own process ------------------------------------------------------------

def median_gap(starts: list[float]) -> float:
    """Median time between consecutive step starts, the first step (set-up, warm-up) left out."""
    import statistics
    gaps = [b - a for a, b in zip(starts, starts[1:])][1:]
    return statistics.median(gaps) if gaps else float("nan")


def speed(a) -> dict:
    from lmadapt.memory import PeakMemory
    model, tok = lmadapt.load(a.model)
    task = get_task("hh_rlhf")
    fmt = ChatFormat(tok, task, None, a.max_length, a.max_response_length)
    pairs = fitting_pairs(fmt, task.load("train"), a.speed_steps * a.batch_size, a.max_length)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve(a.precision, device)
    starts = []  # the time each optimizer step starts: s/step = the median gap (the first step's set-up left out)
    if a.speed == "ours":
        adapted = lmadapt.attach(model, "lora", tokenizer=tok, r=a.lora_r, alpha=a.lora_alpha)

        class Timed(align.DPO):
            def loss(self, model, feats, device):  # one chunk per step (no accumulation)
                starts.append(time.perf_counter())
                return super().loss(model, feats, device)
        objective = Timed(adapted, task, beta=0.1, max_length=a.max_length, max_response_length=a.max_response_length)
        r = align.common.run(adapted, task, objective, train_examples=pairs, dev_examples=[], max_steps=a.speed_steps,
                             batch_size=a.batch_size, lr=5e-4, warmup_ratio=0.0, max_length=a.max_length,
                             precision=a.precision, progress=False)
        starts.append(time.perf_counter())  # not exact for the last step: fit evaluates nothing (no dev), saves nothing
        return {"impl": "ours", "reference": "disabled adapter", "s_per_step": median_gap(starts),
                "s_per_step_mean": r["train_seconds"] / a.speed_steps,
                "peak_memory_mb": r["peak_memory_mb"], "added_memory_mb": r["added_memory_mb"],
                "precision": r["precision"], "steps": a.speed_steps, "pairs": len(pairs),
                "final_loss": r["history"][-1]["loss"]}
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer
    from lmadapt.arch import arch_of
    ref = copy.deepcopy(model)                                   # TRL's reference: a second copy
    targets = list(arch_of(model).lora_targets)
    policy = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                                              target_modules=targets, task_type="CAUSAL_LM"))
    if fmt.chat:  # conversational: TRL applies the same chat template
        rows = [{"prompt": messages_of(task, ex), "chosen": [{"role": "assistant", "content": ex.target.strip()}],
                 "rejected": [{"role": "assistant", "content": ex.rejected.strip()}]} for ex in pairs]
    else:
        rows = [{"prompt": fmt.prompt_text(ex), "chosen": " " + ex.target.strip(), "rejected": " " + ex.rejected.strip()}
                for ex in pairs]
    cfg = DPOConfig(output_dir=str(Path(a.out) / "trl_tmp"), per_device_train_batch_size=a.batch_size,
                    gradient_accumulation_steps=1, max_steps=a.speed_steps, learning_rate=5e-4, warmup_steps=0,
                    lr_scheduler_type="linear", beta=0.1, max_length=a.max_length, bf16=precision == "bf16",
                    fp16=False, gradient_checkpointing=False, logging_steps=1, report_to="none",
                    save_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0, seed=0,
                    disable_dropout=True, precompute_ref_log_probs=False, max_grad_norm=1.0)
    from transformers import TrainerCallback

    class Timed(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            starts.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            starts.append(time.perf_counter())
    trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Timed()])
    t = time.perf_counter()
    with PeakMemory() as mem:
        out = trainer.train()
    seconds = out.metrics.get("train_runtime", time.perf_counter() - t)
    return {"impl": "trl", "reference": "copy", "s_per_step": median_gap(starts),
            "s_per_step_mean": seconds / a.speed_steps, "peak_memory_mb": mem.peak_mb,
            "added_memory_mb": mem.added_mb, "precision": precision, "steps": a.speed_steps, "pairs": len(pairs),
            "final_loss": out.training_loss, "trl_bf16": cfg.bf16, "trl_gradient_checkpointing": cfg.gradient_checkpointing}


def run_speed(a, impl: str) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--speed", impl, "--model", a.model, "--out", a.out,
            "--speed-steps", str(a.speed_steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
            "--max-response-length", str(a.max_response_length), "--precision", a.precision,
            "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha)]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"DPO timing ({impl}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- the pipeline ------------------------------------------------------------------------------

def stage_model(a, init=None):
    if init is None:
        model, tok = lmadapt.load(a.model)
        return model, tok, None
    return start_from(init)


def plot(history, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("reward", "kl")):
        ax.plot(steps, [h[key] for h in history])
        ax.set_xlabel("PPO step")
        ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and a few steps (a smoke run)")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--rm-steps", type=int, default=300)
    ap.add_argument("--dpo-steps", type=int, default=300)
    ap.add_argument("--ppo-steps", type=int, default=100)
    ap.add_argument("--speed-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sft-batch-size", type=int, help="SFT's batch (default: --batch-size)")
    ap.add_argument("--reuse-sft", action="store_true",
                    help="keep OUT/sft of an earlier run (same --sft-steps) instead of training it again")
    ap.add_argument("--max-train", type=int, help="random subset of each training set (default: all)")
    ap.add_argument("--max-eval", type=int, default=200, help="held-out pairs for RM and DPO accuracy")
    ap.add_argument("--win-prompts", type=int, default=100, help="held-out alpaca prompts for the win rates")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--max-response-length", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--speed", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-speed", action="store_true", help="no DPO ours-vs-TRL timing")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.speed:
        print(json.dumps(speed(a)))
        return
    if a.tiny:
        for k, v in TINY_STEPS.items():
            setattr(a, k, v)
        a.model = str(tiny_model_dir(out))
    t0 = time.perf_counter()
    lora = {"r": a.lora_r, "alpha": a.lora_alpha}
    common = dict(batch_size=a.batch_size, max_eval=a.max_eval, max_train=a.max_train, max_length=a.max_length, precision=a.precision,
                  progress=not a.tiny)
    report = {"model": a.model, "settings": vars(a).copy(), "stages": {}}

    def stage(name, fn):
        t = time.perf_counter()
        r = fn()
        report["stages"][name] = {"seconds": time.perf_counter() - t, "result": str(out / name / "result.json")}
        print(f"{name}: {time.perf_counter() - t:.0f}s", flush=True)
        return r

    # 1. SFT on alpaca
    def sft():
        done = out / "sft" / "result.json"
        if a.reuse_sft and done.exists():       # a finished SFT of an earlier run of this script
            r = json.loads(done.read_text())
            if r.get("steps") != a.sft_steps:
                raise SystemExit(f"--reuse-sft: {done} ran {r.get('steps')} steps, not --sft-steps {a.sft_steps}")
            print(f"sft: reusing {done}", flush=True)
            return r
        model, tok, _ = stage_model(a)
        ad = lmadapt.attach(model, "lora", tokenizer=tok, init_seed=0, **lora)
        return align.sft(ad, "alpaca", out=out / "sft", max_steps=a.sft_steps, eval_every=a.sft_steps,
                         max_response_length=a.max_response_length, max_new_tokens=a.max_new_tokens,
                         **(common | {"max_eval": min(a.max_eval, 50), "batch_size": a.sft_batch_size or a.batch_size}))
    r_sft = stage("sft", sft)

    # 2. reward model on the SFT model (InstructGPT initializes the RM from SFT)
    def rm():
        model, tok, init = stage_model(a, out / "sft")
        torch.manual_seed(0)
        ad = align.attach_reward_model(model, "lora", tok, **lora)
        ad.init = init
        res = align.train_reward(ad, "hh_rlhf", out=out / "rm", max_steps=a.rm_steps, eval_every=a.rm_steps,
                                 max_response_length=a.max_response_length, **common)
        return ad, res
    reward_model, r_rm = stage("rm", rm)

    # 3. DPO from SFT
    def dpo():
        model, tok, init = stage_model(a, out / "sft")
        ad = lmadapt.attach(model, "lora", tokenizer=tok, init_seed=0, **lora)
        ad.init = init
        res = align.dpo(ad, "hh_rlhf", beta=a.beta, out=out / "dpo", max_steps=a.dpo_steps, eval_every=a.dpo_steps,
                        max_response_length=a.max_response_length, **common)
        return ad, res
    dpo_policy, r_dpo = stage("dpo", dpo)

    # 4. PPO from SFT against the RM
    def ppo():
        model, tok, init = stage_model(a, out / "sft")
        ad = lmadapt.attach(model, "lora", tokenizer=tok, init_seed=0, **lora)
        ad.init = init
        cfg = align.PPOConfig(max_steps=a.ppo_steps, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                              kl_coef=a.kl_coef, max_length=a.max_length, max_eval=min(a.max_eval, a.win_prompts),
                              precision=a.precision, progress=not a.tiny)
        return ad, align.ppo(ad, "alpaca", reward_model, cfg, out=out / "ppo", max_train=a.max_train)
    ppo_policy, r_ppo = stage("ppo", ppo)
    plot(r_ppo["history"], out / "ppo_curves.png")

    # 5. RM-judged win rates over SFT on the same held-out prompts
    task = get_task("alpaca")
    prompts = subsample(task.load("dev"), a.win_prompts, seed=1)
    judge = align.reward_model_fn(reward_model)
    wins = {}
    for name, policy in (("ppo", ppo_policy), ("dpo", dpo_policy)):
        fmt = ChatFormat(policy.tokenizer, task, None, a.max_length, a.max_new_tokens)
        wins[name] = align.compare_to_reference(policy, judge, prompts, fmt=fmt, max_new_tokens=a.max_new_tokens,
                                                precision=a.precision)
        print(f"win rate {name} vs SFT: {wins[name]['win_rate']:.3f} (reward {wins[name]['reward']:.3f} vs "
              f"{wins[name]['reward_reference']:.3f}, KL {wins[name]['kl']:.2f})", flush=True)
    del ppo_policy, dpo_policy  # the speed runs below are separate processes

    # 6. DPO memory and speed: ours (disabled adapter) vs TRL (reference copy), base model + LoRA
    speed_rows = {} if a.skip_speed else {impl: run_speed(a, impl) for impl in ("ours", "trl")}

    h = r_ppo["history"]
    report |= {
        "sft": {"dev": r_sft["metrics"].get("dev"), "steps": r_sft["steps"]},
        "rm_pairwise_accuracy": r_rm["metrics"]["dev"]["preference_accuracy"], "rm_dev": r_rm["metrics"]["dev"],
        "dpo_implicit_reward_accuracy": r_dpo["metrics"]["dev"]["preference_accuracy"], "dpo_dev": r_dpo["metrics"]["dev"],
        "ppo_curves": {k: [row[k] for row in h] for k in ("reward", "kl", "entropy", "clip_fraction", "value_loss",
                                                           "kl_coef")},
        "ppo_seconds_per_step": r_ppo["align"]["seconds_per_step"],
        "win_rate_vs_sft": wins,
        "dpo_speed": speed_rows,
        "seconds": time.perf_counter() - t0,
    }
    if speed_rows:
        o, t = speed_rows["ours"], speed_rows["trl"]
        report["dpo_ours_over_trl"] = {"s_per_step": o["s_per_step"] / t["s_per_step"],
                                       "peak_memory": o["peak_memory_mb"] / t["peak_memory_mb"]}
    from lmadapt.atomic import write_json
    write_json(out / "bench_align.json", report)
    print(f"RM pairwise accuracy {report['rm_pairwise_accuracy']:.3f} ({r_rm['metrics']['dev']['n']} held-out pairs)")
    print(f"DPO implicit-reward accuracy {report['dpo_implicit_reward_accuracy']:.3f}")
    print(f"PPO reward {h[0]['reward']:.3f} -> {h[-1]['reward']:.3f}, KL {h[0]['kl']:.3f} -> {h[-1]['kl']:.3f} "
          f"over {len(h)} steps")
    for impl, r in speed_rows.items():
        print(f"DPO {impl:4s} ({r['reference']}): {r['s_per_step']:.3f} s/step, peak {r['peak_memory_mb']:.0f} MB, "
              f"{r['precision']}")
    if speed_rows:
        print(f"ours / TRL: s/step {report['dpo_ours_over_trl']['s_per_step']:.3f}, "
              f"peak memory {report['dpo_ours_over_trl']['peak_memory']:.3f}")
    print(f"wrote {out / 'bench_align.json'} and {out / 'ppo_curves.png'} in {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
