"""lmadapt vs PEFT, same model (SmolLM2-135M), same batches (8 x 64 tokens), same steps, in one
run: median time per optimizer step and the peak training memory above the loaded model, for
LoRA, prefix tuning and prompt tuning. Goal: ratios lmadapt / PEFT <= 1.0.

Each configuration runs in its own process (bench/harness.py); ours and PEFT alternate, `--repeats`
times, and the ratio uses the median over repeats.

    .venv/bin/python bench/delta_vs_peft.py [--steps 10] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(impl, method, steps, extra=()):
    out = subprocess.run([sys.executable, str(HERE / "harness.py"), "--impl", impl, "--method", method,
                          "--steps", str(steps), *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,prefix,prompt")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rows = []
    for method in a.methods.split(","):
        res = {"ours": [], "peft": []}
        for _ in range(a.repeats):
            for impl in ("ours", "peft"):
                r = run(impl, method, a.steps)
                res[impl].append(r)
                print(f"  {method:7s} {impl:5s} step {r['step_seconds']:.3f}s  added {r['added_mb']:.0f} MB  "
                      f"trainable {r['trainable']:,}", flush=True)
        t = {k: statistics.median(x["step_seconds"] for x in v) for k, v in res.items()}
        m = {k: statistics.median(x["added_mb"] for x in v) for k, v in res.items()}
        rows.append((method, t["ours"], t["peft"], m["ours"], m["peft"], res["ours"][0]["trainable"],
                     res["peft"][0]["trainable"]))
    print("\nSmolLM2-135M, batch 8 x 64 tokens, AdamW, CPU float32; median over repeats")
    print(f"{'method':8s} {'ours s/step':>11s} {'PEFT s/step':>11s} {'time ratio':>10s} "
          f"{'ours MB':>8s} {'PEFT MB':>8s} {'mem ratio':>9s} {'ours params':>12s} {'PEFT params':>12s}")
    for method, to, tp, mo, mp, po, pp in rows:
        print(f"{method:8s} {to:11.3f} {tp:11.3f} {to / tp:10.3f} {mo:8.0f} {mp:8.0f} {mo / mp:9.3f} {po:12,} {pp:12,}")


if __name__ == "__main__":
    main()
