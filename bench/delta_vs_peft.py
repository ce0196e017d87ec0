"""lmadapt vs PEFT, same model (SmolLM2-135M), same batches (8 x 64 tokens), same steps, in one
run: median time per optimizer step and the peak training memory above the loaded model, for
LoRA, prefix tuning and prompt tuning.

Two comparisons:
- same precision (fp32, and bf16 autocast around both): goal lmadapt / PEFT <= 1.0;
- each library's default: lmadapt's `--precision auto` (bf16 where the CPU has native bf16, else
  fp32) against PEFT's (PEFT runs what the user runs: fp32 unless autocast is set up by hand).
  These rows reuse the same-precision measurements, nothing is run twice.

Each configuration runs in its own process (bench/harness.py); ours and PEFT alternate, `--repeats`
times, and the ratio uses the median over repeats.

    .venv/bin/python bench/delta_vs_peft.py [--steps 8] [--repeats 2] [--precisions fp32,bf16]
        [--bf16-steps 3]
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
                          "--steps", str(steps), *extra], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"harness {impl} {method} {' '.join(extra)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(method, precision, steps, repeats):
    res = {"ours": [], "peft": []}
    for _ in range(repeats):
        for impl in ("ours", "peft"):
            r = run(impl, method, steps, ("--precision", precision))
            res[impl].append(r)
            print(f"  {method:7s} {precision} {impl:5s} step {r['step_seconds']:.3f}s  added {r['added_mb']:.0f} MB  "
                  f"trainable {r['trainable']:,}", flush=True)
    t = {k: statistics.median(x["step_seconds"] for x in v) for k, v in res.items()}
    m = {k: statistics.median(x["added_mb"] for x in v) for k, v in res.items()}
    return {"time": t, "mb": m, "trainable": {k: v[0]["trainable"] for k, v in res.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,prefix,prompt")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--bf16-steps", type=int, help="steps for the bf16 runs (default: --steps)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    a = ap.parse_args()
    from lmadapt.precision import resolve
    precisions = a.precisions.split(",")
    rows = {}
    for p in precisions:
        steps = a.bf16_steps if p == "bf16" and a.bf16_steps else a.steps
        for method in a.methods.split(","):
            rows[(method, p)] = measure(method, p, steps, a.repeats if p == "fp32" else 1)
    head = (f"{'method':8s} {'ours':>5s} {'PEFT':>5s} {'ours s/step':>11s} {'PEFT s/step':>11s} {'time ratio':>10s} "
            f"{'ours MB':>8s} {'PEFT MB':>8s} {'mem ratio':>9s} {'ours params':>12s} {'PEFT params':>12s}")

    def line(method, po, pp):
        o, q = rows[(method, po)], rows[(method, pp)]
        to, tp, mo, mp = o["time"]["ours"], q["time"]["peft"], o["mb"]["ours"], q["mb"]["peft"]
        print(f"{method:8s} {po:>5s} {pp:>5s} {to:11.3f} {tp:11.3f} {to / tp:10.3f} {mo:8.0f} {mp:8.0f} "
              f"{mo / mp:9.3f} {o['trainable']['ours']:12,} {q['trainable']['peft']:12,}")
    print("\nSmolLM2-135M, batch 8 x 64 tokens, AdamW, CPU; median over repeats")
    print("same precision:")
    print(head)
    for (method, p) in rows:
        line(method, p, p)
    ours_default = resolve("auto", "cpu")
    if ours_default in precisions and "fp32" in precisions:
        print(f"each library's default (lmadapt auto -> {ours_default} on this machine; PEFT fp32):")
        print(head)
        for method in a.methods.split(","):
            line(method, ours_default, "fp32")


if __name__ == "__main__":
    main()
