"""Probe vs full fine-tuning on SST-2 under the same budget, side by side in one run.

Budget: the same N training sentences (default 1,000), one pass of the backbone over them each.
The probe's head then trains 30 epochs on the cached features (seconds); full fine-tuning trains
every weight for one epoch. Both are evaluated on SST-2 dev and on IMDB (out of domain).

    .venv/bin/python bench/probe_vs_finetune.py [--n-train 1000] [--n-ood 300]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import lmadapt
from lmadapt.cli import table as _table
from sst2_split import sst2_split


def run(method: str, a, train, dev, ood) -> dict:
    torch.manual_seed(a.seed)
    model, tok = lmadapt.load(a.model)
    adapted = lmadapt.attach(model, method, task="sst2", tokenizer=tok, head="linear")
    cfg = dict(batch_size=16, max_length=64, eval_batch_size=32, progress=True)
    if method == "full":
        cfg |= dict(epochs=1, lr=a.full_lr)
    t = time.perf_counter()
    r = lmadapt.train(adapted, "sst2", train_examples=train, dev_examples=dev, ood=[], seed=a.seed, **cfg)
    total = time.perf_counter() - t
    imdb = lmadapt.evaluate(adapted, "imdb", examples=ood, max_length=256, batch_size=16)
    return {"method": method, "sst2_dev": r["metrics"]["dev"]["accuracy"], "imdb": imdb["accuracy"],
            "train_seconds": r["train_seconds"], "wall_seconds": total, "peak_memory_mb": r["peak_memory_mb"],
            "trainable_percent": r["trainable_percent"], "trainable_params": r["trainable_params"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-ood", type=int, default=300)
    ap.add_argument("--full-lr", type=float, default=3e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    train, dev, ood = sst2_split(a.n_train, a.n_ood, a.seed)
    rows = [run(m, a, train, dev, ood) for m in ("probe", "full")]
    p, f = rows
    print(f"\nSST-2, {a.n_train} training sentences, model {a.model}, seed {a.seed}; "
          f"IMDB n={len(ood)}, SST-2 dev n={len(dev)}")
    print(_table([[r["method"], f"{r['sst2_dev']:.1f}", f"{r['imdb']:.1f}", f"{r['trainable_percent']:.4f}%",
                   f"{r['train_seconds']:.0f}s", f"{r['peak_memory_mb']:.0f} MB"] for r in rows],
                 ["method", "SST-2 dev acc", "IMDB acc", "trainable", "train time", "peak RSS"]))
    print(f"\nratios probe/full: train time {p['train_seconds'] / f['train_seconds']:.3f} "
          f"(wall, incl. evaluation: {p['wall_seconds'] / f['wall_seconds']:.3f}), "
          f"peak memory {p['peak_memory_mb'] / f['peak_memory_mb']:.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
