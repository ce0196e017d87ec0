"""`make demo`: a small `lmadapt compare` on the embedded default model (SmolLM2-135M).

SST-2 with four methods: a linear probe, LoRA, prompt tuning and prefix tuning (the last three
through the verbalizer head: the task read as "... It was {great|terrible}" by the pretrained LM
head), 16 and 64 sentences per class, one seed, each method's default learning rate, 20 steps of
8, evaluated once at the end on 200 SST-2 dev sentences (in domain) and 100 IMDB reviews (out of
domain), inputs up to 64 tokens. Prints the table and the "which to use" summary, and writes
runs/demo/report.html (self-contained: open it in a browser) and results.csv. About 4 minutes
on 2 quiet CPU cores once installed (3.3 min measured). Rerunning resumes: finished cells are skipped.

`python -m lmadapt.demo --probes` (`make demo-probes`): the former demo, four probes (two layers x
two poolings) from one backbone pass over 1,000 SST-2 sentences, ~5 minutes.
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


# The grid: every cell is `lmadapt train` with these options (see `lmadapt compare --help`).
DEMO_GRID = ["--task", "sst2", "--methods", "probe,lora,prompt,prefix", "--shots", "16,64", "--seeds", "1",
             "--max-steps", "20", "--batch-size", "8", "--eval-every", "20", "--max-eval", "200",
             "--ood", "imdb", "--max-ood", "100", "--max-length", "64"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="runs/demo", help="the grid's folder (runs/demo)")
    ap.add_argument("--probes", action="store_true", help="the former demo: four probes of one backbone pass")
    ap.add_argument("--n-train", type=int, default=1000, help="--probes: training sentences")
    ap.add_argument("--n-ood", type=int, default=300, help="--probes: IMDB reviews evaluated (long: ~0.3 s each)")
    ap.add_argument("--data-root")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.probes:
        return probes(a)
    from lmadapt.cli import main as cli
    argv = ["compare", *DEMO_GRID, "--model", a.model, "--out", a.out] + (
        ["--data-root", a.data_root] if a.data_root else [])
    print("lmadapt " + " ".join(argv) + "\n")
    t0 = time.perf_counter()
    rc = cli(argv)
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min; the report: {a.out}/report.html "
          "(open it in a browser; it needs no network). More methods, shots, seeds: `lmadapt compare --help`.")
    return rc


def probes(a) -> int:
    """Four probes of SmolLM2 on SST-2 from one backbone pass (the demo before `lmadapt compare`)."""
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
