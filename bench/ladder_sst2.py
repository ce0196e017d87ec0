"""Ladder side-tuning on SST-2 next to LoRA at the same small budget, SmolLM2-135M, classification
head: the side transformer at two learning rates, with the paper's replace merge, and LoRA r=4.
(The former per-token MLP side network, `ladder-mlp-3e-3`, ran here at commit 094cbcd with
--method-args form=mlp; it measured no better and was removed.)

Budget: the same 1,000 SST-2 training sentences (bench/sst2_split.py, seed 0), 60 steps of batch
16 (~1 epoch), max 64 tokens, one evaluation at the end on the first 300 SST-2 dev sentences.

    PYTHONPATH=. .venv/bin/python bench/ladder_sst2.py [--configs ladder-3e-3,lora-2e-3,...]
      [--threads 1] [--json rows.json]   # rows already in the file are kept (one config per call fits a time limit)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import lmadapt
from lmadapt.cli import table as _table
from sst2_split import sst2_split

CONFIGS = {  # name -> (method, method args, lr)
    "ladder-3e-3": ("ladder", {}, 3e-3),
    "ladder-1e-3": ("ladder", {}, 1e-3),
    "ladder-replace-3e-3": ("ladder", {"side_output": "replace"}, 3e-3),
    "lora-2e-3": ("lora", {"r": 4}, 2e-3),
}


def run(name, a, train, dev):
    method, args, lr = CONFIGS[name]
    model, tok = lmadapt.load(a.model)
    adapted = lmadapt.attach(model, method, task="sst2", tokenizer=tok, init_seed=a.seed, **args)
    t, cpu = time.perf_counter(), time.process_time()
    r = lmadapt.train(adapted, "sst2", train_examples=train, dev_examples=dev, ood=[], seed=a.seed,
                      batch_size=16, max_steps=a.steps, lr=lr, max_length=64, eval_batch_size=32, progress=False)
    row = {"config": name, "method": method, "args": args, "lr": lr, "steps": a.steps, "n_train": len(train),
           "n_dev": len(dev), "sst2_dev": r["metrics"]["dev"]["accuracy"], "trainable": r["trainable_params"],
           "trainable_percent": r["trainable_percent"], "train_seconds": r["train_seconds"],
           "s_per_step": r["train_seconds"] / a.steps, "wall_seconds": time.perf_counter() - t,
           "cpu_seconds": time.process_time() - cpu, "threads": torch.get_num_threads(),
           "final_loss": r["history"][-1]["loss"]}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-dev", type=int, default=300)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads (1 keeps a shared machine's contention "
                    "from multiplying the wall time; cpu s counts the work either way)")
    ap.add_argument("--json", help="keep the rows here (merged with the rows already in it)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    bad = sorted(set(a.configs.split(",")) - set(CONFIGS))
    if bad:
        raise SystemExit(f"unknown config {', '.join(bad)}; choose from: {', '.join(CONFIGS)}")
    train, dev, _ = sst2_split(a.n_train, 0, a.seed)
    dev = dev[:a.n_dev]
    rows = {}
    if a.json and os.path.exists(a.json):
        rows = {r["config"]: r for r in json.load(open(a.json))}
    for name in a.configs.split(","):
        rows[name] = run(name, a, train, dev)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(list(rows.values()), fh, indent=2)
    print(f"\nSST-2 with {a.model}, classification head: {a.n_train} training sentences, {a.steps} steps of 16, "
          f"max 64 tokens; SST-2 dev: first {len(dev)} sentences")
    print(_table([[r["config"], f"{r['lr']:g}", f"{r['sst2_dev']:.1f}", f"{r['trainable_percent']:.2f}%",
                   f"{r['s_per_step']:.2f}", f"{r['cpu_seconds']:.0f}" if "cpu_seconds" in r else "-",
                   f"{r['final_loss']:.3f}"] for r in rows.values()],
                 ["config", "lr", "SST-2 dev", "trainable", "wall s/step", "cpu s (train+eval)", "last loss"]))


if __name__ == "__main__":
    main()
