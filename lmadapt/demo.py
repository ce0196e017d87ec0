"""`make demo`: probe the embedded default model (SmolLM2-135M) on SST-2.

Four probes — last-token and mean pooling, on a middle and on the last layer — trained on 1,000
SST-2 sentences, evaluated on SST-2 dev (in domain) and on IMDB reviews (out of domain). The
backbone is frozen, so one forward pass per example serves all four probes. ~5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time

import torch

import lmadapt
from lmadapt.cli import table as _table
from lmadapt.metrics import accuracy
from lmadapt.methods.probe import extract_features
from lmadapt.tasks import get_task


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-ood", type=int, default=300, help="IMDB reviews evaluated (long: ~0.3 s each)")
    ap.add_argument("--data-root")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)

    t0 = time.perf_counter()
    model, tok = lmadapt.load(a.model)
    print(f"loaded {a.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
          f"in {time.perf_counter() - t0:.1f}s on {model.device}")
    sst2, imdb = get_task("sst2"), get_task("imdb")
    g = torch.Generator().manual_seed(a.seed)
    full_train = sst2.load("train", a.data_root)
    train = [full_train[i] for i in torch.randperm(len(full_train), generator=g)[: a.n_train].tolist()]
    dev = sst2.load("dev", a.data_root)
    ood_all = imdb.load("dev", a.data_root)
    ood = [ood_all[i] for i in torch.randperm(len(ood_all), generator=g)[: a.n_ood].tolist()]

    mid = model.config.num_hidden_layers // 2
    specs = [(mid, "last"), (mid, "mean"), (-1, "last"), (-1, "mean")]
    t0 = time.perf_counter()
    feats = {}
    for name, exs, max_len in (("train", train, 128), ("dev", dev, 128), ("imdb", ood, 256)):
        t = time.perf_counter()
        feats[name] = extract_features(model, tok, sst2, exs, specs, max_length=max_len)
        print(f"features: {name:5s} {len(exs):5d} examples in {time.perf_counter() - t:5.1f}s")
    print(f"one backbone pass for all {len(specs)} probes: {time.perf_counter() - t0:.1f}s")

    rows = []
    for layer, pooling in specs:
        adapted = lmadapt.attach(model, "probe", task=sst2, tokenizer=tok, pooling=pooling, layer=layer)
        (tx, ty), (dx, dy), (ox, oy) = feats["train"][(layer, pooling)], feats["dev"][(layer, pooling)], \
            feats["imdb"][(layer, pooling)]
        r = lmadapt.train(adapted, sst2, train_examples=train, dev_examples=dev, features=(tx, ty, dx, dy),
                          ood=[], batch_size=32, progress=False, seed=a.seed)
        with torch.no_grad():
            imdb_acc = accuracy(adapted.head(ox.to(adapted.device)).argmax(-1).tolist(), oy.tolist())
        label = f"layer {layer if layer >= 0 else model.config.num_hidden_layers} ({'middle' if layer == mid else 'last'})"
        rows.append([label, pooling, f"{r['metrics']['dev']['accuracy']:.1f}", f"{imdb_acc:.1f}",
                     f"{r['train_seconds']:.1f}s", f"{r['trainable_params']:,}"])
    print()
    print(f"Probing {a.model} on SST-2 ({len(train)} train sentences); accuracy %, "
          f"SST-2 dev (n={len(dev)}) and IMDB out-of-domain (n={len(ood)})")
    print(_table(rows, ["representation", "pooling", "SST-2 dev", "IMDB (OOD)", "head train", "head params"]))
    print(f"\nmajority-class baseline: SST-2 dev {100 * max(sum(e.label for e in dev), len(dev) - sum(e.label for e in dev)) / len(dev):.1f}, "
          f"IMDB {100 * max(sum(e.label for e in ood), len(ood) - sum(e.label for e in ood)) / len(ood):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
