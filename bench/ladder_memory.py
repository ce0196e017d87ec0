"""Peak training memory of ladder side-tuning vs full fine-tuning (and LoRA for reference) on
SmolLM2-135M, batch 8 x 64 tokens, same steps, each in its own process. Goal: ladder / full <= 0.4.
The side transformer runs with its default recompute=true (each side block rerun in backward)
and with recompute=false (its activations kept).

Reported: the peak RSS above the loaded model during the steps (activations, gradients, optimizer
state), and the total peak RSS (including the model's weights).

    .venv/bin/python bench/ladder_memory.py [--steps 4]
"""
from __future__ import annotations

import argparse

from delta_vs_peft import run

CONFIGS = {  # row name -> (method, method args for bench/harness.py)
    "full": ("full", None),
    "ladder": ("ladder", None),
    "ladder-keep": ("ladder", "recompute=false"),
    "lora": ("lora", None),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    res = {}
    for name, (method, args) in CONFIGS.items():
        res[name] = run("ours", method, a.steps, ("--warmup", "1") + (("--method-args", args) if args else ()))
        print(f"  {name:10s} added {res[name]['added_mb']:.0f} MB  step {res[name]['step_seconds']:.2f}s  "
              f"trainable {res[name]['trainable']:,}", flush=True)
    full = res["full"]
    print("\nSmolLM2-135M, batch 8 x 64 tokens, AdamW, CPU float32")
    print(f"{'method':10s} {'trainable':>10s} {'added MB':>9s} {'peak MB':>8s} {'s/step':>7s} {'added/full':>10s} "
          f"{'peak/full':>9s}")
    for m, r in res.items():
        print(f"{m:10s} {r['trainable']:10,} {r['added_mb']:9.0f} {r['peak_mb']:8.0f} {r['step_seconds']:7.2f} "
              f"{r['added_mb'] / full['added_mb']:10.3f} {r['peak_mb'] / full['peak_mb']:9.3f}")


if __name__ == "__main__":
    main()
