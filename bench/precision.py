"""bf16 autocast against float32 on this machine, side by side in one run (SmolLM2-135M):

1. the matmul peak of each precision (a 1024^3 matmul, and the 512 x 576 x 1536 shape of
   SmolLM2's MLP at batch 8 x 64), the physical limit the steps are measured against;
2. s/step of LoRA, prefix, prompt, full and ladder, batch 8 x 64, each configuration in its own
   process (bench/harness.py), fp32 and bf16 on the same batches; the bf16 / fp32 ratio (the
   issue's goal: <= 0.7), and each step's achieved GFLOP/s (FLOPs counted by torch's
   FlopCounterMode, forward + backward) as a share of that precision's matmul peak;
3. dev accuracy of the same short LoRA run on SST-2 in both precisions (goal: within 1 point):
   `--sst2-mode train` trains it twice, once per precision; on a CPU without native bf16, where a
   bf16 step takes minutes, `--sst2-mode eval` trains once in fp32 and evaluates that model in both
   precisions (what bf16 rounding does to the predictions, not to the training).

On a shared 2-core machine, `OMP_NUM_THREADS=1` keeps other jobs from turning two busy-waiting
threads into a 5-10x slowdown; peaks and steps are then both single-thread figures.

    [OMP_NUM_THREADS=1] .venv/bin/python bench/precision.py [--steps 4] [--methods lora,prefix,prompt,full,ladder]
        [--sst2-train 400 --sst2-steps 25 --sst2-dev 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from delta_vs_peft import run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(m: int, k: int, n: int, dtype, seconds: float = 2.0) -> float:
    """GFLOP/s of (m, k) @ (k, n), best of repeated timings over ~`seconds`."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def sst2_runs(mode: str, n_train: int, steps: int, n_dev: int) -> list[dict]:
    import lmadapt
    from sst2_split import sst2_split
    train, dev, _ = sst2_split(n_train, 0)
    out, adapted = [], None
    for precision in DTYPES:
        t = time.perf_counter()
        if mode == "train" or adapted is None:
            model, tok = lmadapt.load("smollm2-135m")
            adapted = lmadapt.attach(model, "lora", task="sst2", tokenizer=tok, head="linear", init_seed=0)
            r = lmadapt.train(adapted, "sst2", train_examples=train, dev_examples=dev, max_steps=steps,
                              batch_size=16, lr=2e-3, max_length=64, max_eval=n_dev, eval_every=steps, ood=[],
                              precision=precision if mode == "train" else "fp32", progress=False)
            m = r["metrics"]["dev"]
        if mode == "eval":
            m = lmadapt.evaluate(adapted, "sst2", examples=dev, limit=n_dev, max_length=64, precision=precision)
        out.append({"precision": precision, "trained_in": precision if mode == "train" else "fp32",
                    "accuracy": m["accuracy"], "n": m["n"], "seconds": time.perf_counter() - t})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,prefix,prompt,full,ladder")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sst2-train", type=int, default=400)
    ap.add_argument("--sst2-steps", type=int, default=25)
    ap.add_argument("--sst2-dev", type=int, default=300)
    ap.add_argument("--sst2-mode", choices=["train", "eval"], default="train")
    ap.add_argument("--json")
    a = ap.parse_args()
    from lmadapt.precision import cpu_flags, cpu_has_fast_bf16
    print(f"CPU bf16 flags: {sorted(cpu_flags() & {'avx512_bf16', 'amx_bf16'}) or 'none'}; "
          f"oneDNN bf16: {cpu_has_fast_bf16()}; threads: {torch.get_num_threads()}")
    peaks = {p: {"square": matmul_peak(1024, 1024, 1024, dt), "mlp": matmul_peak(512, 576, 1536, dt)}
             for p, dt in DTYPES.items()}
    for p, v in peaks.items():
        print(f"matmul peak {p}: 1024^3 {v['square']:.1f} GFLOP/s, 512x576x1536 {v['mlp']:.1f} GFLOP/s")
    rows = []
    for method in a.methods.split(","):
        r = {p: run("ours", method, a.steps, ("--warmup", "1", "--precision", p)) for p in DTYPES}
        rows.append((method, r))
        print(f"  {method:7s} fp32 {r['fp32']['step_seconds']:.2f} s  bf16 {r['bf16']['step_seconds']:.2f} s", flush=True)
    print("\nSmolLM2-135M, batch 8 x 64 tokens, LM loss on every position, AdamW")
    print(f"{'method':8s} {'fp32 s':>7s} {'bf16 s':>7s} {'bf16/fp32':>9s} {'GFLOP/step':>10s} "
          f"{'fp32 GFLOP/s':>12s} {'% peak':>6s} {'bf16 GFLOP/s':>12s} {'% peak':>6s}")
    # bf16's share is of the faster precision's peak: the machine's limit, whichever dtype reaches it
    best = max(DTYPES, key=lambda p: peaks[p]["square"])
    for method, r in rows:
        f32, b16 = r["fp32"], r["bf16"]
        g = f32["flops"] / 1e9
        a32, a16 = g / f32["step_seconds"], g / b16["step_seconds"]
        print(f"{method:8s} {f32['step_seconds']:7.2f} {b16['step_seconds']:7.2f} "
              f"{b16['step_seconds'] / f32['step_seconds']:9.2f} {g:10.1f} {a32:12.1f} "
              f"{100 * a32 / peaks['fp32']['square']:6.0f} {a16:12.1f} {100 * a16 / peaks[best]['square']:6.0f}")
    sst2 = sst2_runs(a.sst2_mode, a.sst2_train, a.sst2_steps, a.sst2_dev) if a.sst2_steps else []
    if sst2:
        print(f"\nSST-2, LoRA r=4, {a.sst2_train} sentences, {a.sst2_steps} steps of 16, lr 2e-3, "
              f"{a.sst2_dev} dev sentences, mode {a.sst2_mode}")
        for s in sst2:
            print(f"  trained in {s['trained_in']}, evaluated in {s['precision']}: dev accuracy "
                  f"{s['accuracy']:.1f} ({s['n']}), {s['seconds']:.0f} s")
        print(f"  difference bf16 - fp32: {sst2[1]['accuracy'] - sst2[0]['accuracy']:+.1f} points")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"peaks": peaks, "steps": {m: r for m, r in rows}, "sst2": sst2}, f, indent=1)


if __name__ == "__main__":
    main()
