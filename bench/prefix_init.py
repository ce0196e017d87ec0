"""How much a key/value prefix's initialization disturbs the frozen model before any training:
perplexity of SmolLM2 on SST-2 dev sentences alone and behind a prefix of each init (the reason
`ptuning2` defaults to init='vocab'; lmadapt/methods/prefix.py).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/prefix_init.py [--n 64]
"""
from __future__ import annotations

import argparse

import torch

import lmadapt
from lmadapt.tasks import get_task

CASES = [("ptuning2", {"init": "random"}), ("ptuning2", {"init": "vocab"}), ("ptuning2", {"init": "vocab", "seed": 1}),
         ("ptuning2", {"init_text": "The sentiment of this movie review is"}), ("prefix", {}),
         ("prefix", {"init": "vocab"})]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64, help="SST-2 dev sentences")
    ap.add_argument("--data-root")
    a = ap.parse_args(argv)
    model, tok = lmadapt.load(a.model)
    task = get_task("sst2")
    texts = [e.text for e in task.load("dev", a.data_root)[:a.n]]
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)

    @torch.no_grad()
    def ppl(adapted) -> float:
        return adapted(ids, attention_mask=mask, labels=labels).loss.exp().item()
    base = None
    print(f"perplexity on {len(texts)} SST-2 dev sentences ({a.model})")
    for method, args in CASES:
        adapted = lmadapt.attach(model, method, tokenizer=tok, init_seed=0, **args)
        if base is None:
            with adapted.disabled():
                base = ppl(adapted)
            print(f"  {'no prefix':56s} {base:12,.1f}")
        label = f"{method} " + ", ".join(f"{k}={v!r}" for k, v in args.items())
        print(f"  {label:56s} {ppl(adapted):12,.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
