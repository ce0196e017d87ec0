"""One training configuration in a fresh process: load SmolLM2, attach a method (lmadapt or
PEFT), run warmup + N optimizer steps of the LM loss on fixed random batches, print JSON with the
median step time, the peak memory the steps added above the loaded model, and the FLOPs of one
step (torch's FlopCounterMode, forward + backward, counted on a warmup step).

`--precision bf16` runs forward (and so backward) under bf16 autocast, for either implementation:
PEFT has no precision switch of its own, so the same context is used for both.

A fresh process per configuration keeps peak-memory readings independent (RSS never shrinks back
reliably within one process). The benchmark scripts call this and print ratios.

    .venv/bin/python bench/harness.py --impl ours --method lora --steps 10
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import lmadapt
from lmadapt.memory import PeakMemory
from lmadapt.precision import autocast, resolve

PEFT_ARGS = {  # matched to lmadapt's defaults for the same method
    "lora": dict(r=8, lora_alpha=16, lora_dropout=0.0,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "prefix": dict(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=512),
    "prompt": dict(num_virtual_tokens=20),
}
OURS_ARGS = {"lora": dict(r=8, alpha=16), "prefix": dict(k=10, prefix_hidden=512, reparam=True),
             "prompt": dict(k=20, init="random")}


def build(impl: str, method: str, model, tok, method_args: dict | None = None):
    if impl == "ours":
        args = OURS_ARGS.get(method, {}) | (method_args or {})
        return lmadapt.attach(model, method, tokenizer=tok, **args)
    import peft
    cfg_cls = {"lora": peft.LoraConfig, "prefix": peft.PrefixTuningConfig, "prompt": peft.PromptTuningConfig}[method]
    return peft.get_peft_model(model, cfg_cls(task_type="CAUSAL_LM", **PEFT_ARGS[method]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["ours", "peft"], required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--method-args", help="k=v,... for ours, over OURS_ARGS (e.g. recompute=false)")
    a = ap.parse_args()
    precision = resolve(a.precision, "cpu")
    if a.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step is the one whose FLOPs are counted)")
    torch.manual_seed(0)
    model, tok = lmadapt.load(a.model)
    from lmadapt.cli import parse_method_args
    net = build(a.impl, a.method, model, tok, parse_method_args(a.method_args))
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(100, model.config.vocab_size, (a.batch, a.seq), generator=g) for _ in range(3)]
    def step(ids):
        with autocast(precision, "cpu"):
            loss = net(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, flops = [], None
    with PeakMemory() as mem:
        for i in range(a.warmup + a.steps):
            ids = batches[i % len(batches)]
            if i == 0:  # counted, not timed (the counter slows the step down)
                with FlopCounterMode(display=False) as counter:
                    loss = step(ids)
                flops = counter.get_total_flops()
                continue
            t = time.perf_counter()
            loss = step(ids)
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in params)
    print(json.dumps({"impl": a.impl, "method": a.method, "method_args": a.method_args, "precision": precision,
                      "flops": flops, "step_seconds": statistics.median(times),
                      "step_times": times, "added_mb": mem.added_mb, "peak_mb": mem.peak_mb,
                      "trainable": trainable, "loss": float(loss)}))


if __name__ == "__main__":
    main()
