"""Issue 9's benchmark, SmolLM2-135M, every row measured by this script on fixed examples:

1. ICL on SST-2 and RTE dev: k = 0, 4, 8 demonstrations; select random | balanced | knn (MiniLM
   embeddings), order random; 5 seeds (mean ± std, min/max). k = 0 is one row (zero-shot: no
   demonstrations, so nothing depends on the seed).
2. GSM8K, the first 200 test problems: 8 exemplars from train (seed 0), answer-only (direct) vs
   chain-of-thought (greedy) vs self-consistency (5 sampled chains, T = 0.7, majority vote).
3. Instruction tuning: LoRA on the FLAN-style mixture (sst2, squad, xsum, scitldr, e2e_nlg,
   webnlg, alpaca; the NLI cluster held out), zero-shot RTE (held out) and SST-2 (seen) through
   yes/no-style instruction templates, before and after.

    PYTHONPATH=. .venv/bin/python bench/icl_cot.py --json docs/bench_icl_cot.json
    PYTHONPATH=. .venv/bin/python bench/icl_cot.py --parts icl --icl-tasks rte --json rows.json   # one part
    PYTHONPATH=. .venv/bin/python bench/icl_cot.py --tiny --smoke        # a random tiny LLaMA, < 2 min

--json keeps finished rows: a rerun with the same file skips them (one part per call fits a time
limit). The tables print from every row in the file.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import lmadapt
from lmadapt.cli import table

SMOKE = {"icl_limit": 8, "seeds": 2, "pool": 32, "ks": "0,2", "gsm8k_limit": 2, "sc": 2, "max_new_tokens": 16,
         "instruct_total": 16, "instruct_steps": 2, "instruct_limit": 8, "instruct_tasks": "xsum,alpaca"}


def tiny_model_dir() -> str:
    """A random 2-layer LLaMA under SmolLM2's own tokenizer (real BPE, real data), for smoke runs."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from lmadapt.models import resolve
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m")[0])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    d = tempfile.mkdtemp(prefix="tiny-smollm2-")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def load_rows(path):
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else []


def save_rows(path, rows):
    if path:
        from lmadapt.atomic import write_json
        write_json(path, rows)


def icl_rows(a, model, tok, done):
    from lmadapt.prompting.embed import SentenceEmbedder
    from lmadapt.prompting.icl import IclConfig, run_icl
    embedder = SentenceEmbedder(a.embed_model)
    for name in a.icl_tasks.split(","):
        task = lmadapt.TASKS[name]
        adapted = lmadapt.attach(model, "none", task=task, tokenizer=tok, head="verbalizer")
        for k in (int(x) for x in a.ks.split(",")):
            for select in (a.selects.split(",") if k else ["-"]):
                key = f"icl/{name}/k{k}/{select}/{a.order}"
                if key in done:
                    continue
                cfg = IclConfig(k=k, select=select if k else "random", order=a.order, pool=a.pool,
                                seeds=tuple(range(a.seeds)) if k else (0,), batch_size=a.batch_size)
                t = time.perf_counter()
                res = run_icl(adapted, task, cfg, limit=a.icl_limit, embedder=embedder, precision=a.precision,
                              progress=a.progress)
                s = res["summary"]["accuracy"]
                yield {"key": key, "part": "icl", "task": name, "k": k, "select": select, "order": a.order,
                       "mean": s["mean"], "std": s["std"], "min": s["min"], "max": s["max"], "seeds": s["n_seeds"],
                       "n": res["n"], "pool": a.pool,
                       "per_seed": [r["metrics"]["accuracy"] for r in res["per_seed"]],
                       "demos_used": [r["demonstrations_used"]["mean"] for r in res["per_seed"]],
                       "max_prompt_tokens": max(r["prompt_tokens"]["max"] for r in res["per_seed"]),
                       "seconds": time.perf_counter() - t}


def cot_rows(a, model, tok, done):
    from lmadapt.prompting.cot import CotConfig, run_cot
    key = f"cot/gsm8k/k{a.cot_k}/sc{a.sc}"
    if key in done:
        return
    adapted = lmadapt.attach(model, "none", tokenizer=tok)
    t = time.perf_counter()
    res = run_cot(adapted, "gsm8k", CotConfig(k=a.cot_k, self_consistency=a.sc, max_new_tokens=a.max_new_tokens,
                                              batch_size=a.batch_size),
                  limit=a.gsm8k_limit, precision=a.precision, progress=a.progress)
    m = res["metrics"]
    yield {"key": key, "part": "cot", "task": "gsm8k", "k": a.cot_k, "n": res["n"], "chains": a.sc,
           **{f"{p}_accuracy": v["numeric_accuracy"] for p, v in m.items()},
           **{f"{p}_no_answer": v["no_answer"] for p, v in m.items()},
           "cot_prompt_tokens": m["cot"]["prompt_tokens"]["max"], "seconds": time.perf_counter() - t,
           "samples": [{k: r[k] for k in ("gold", "direct_answer", "cot_answer", "cot")} for r in res["records"][:3]]}


def instruct_rows(a, done):
    from lmadapt.prompting.instruct import InstructConfig, run_instruct
    key = f"instruct/{a.instruct_method}/total{a.instruct_total}/steps{a.instruct_steps}"
    if key in done:
        return
    model, tok = lmadapt.load(a.model)
    train = {"batch_size": a.batch_size, "precision": a.precision, "max_length": a.instruct_max_length}
    if a.instruct_steps:
        train["max_steps"] = a.instruct_steps
    if a.instruct_lr:
        train["lr"] = a.instruct_lr
    cfg = InstructConfig(tasks=tuple(a.instruct_tasks.split(",")), cap=a.instruct_cap, total=a.instruct_total,
                         method=a.instruct_method, eval_limit=a.instruct_limit, train=train)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        res = run_instruct(model, tok, cfg, out, progress=a.progress)
    m = res["metrics"]
    yield {"key": key, "part": "instruct", "method": a.instruct_method, "mixture": res["mixture"]["counts"],
           "steps": res["train"]["steps"], "loss_first": res["train"]["loss_first"],
           "loss_last": res["train"]["loss_last"], "train_seconds": res["train"]["train_seconds"],
           **{f"{t_}_{w}": m[t_][w] for t_ in m for w in ("before", "after", "majority", "n")},
           "rte_phrasings_before": m["rte"]["phrasings_before"], "rte_phrasings_after": m["rte"]["phrasings_after"],
           "seconds": time.perf_counter() - t}


def report(rows):
    icl = [r for r in rows if r["part"] == "icl"]
    if icl:
        print(table([[r["task"], r["k"], r["select"], f"{r['mean']:.1f} ± {r['std']:.1f}", f"{r['min']:.1f}",
                      f"{r['max']:.1f}", r["seeds"], r["n"], f"{sum(r['demos_used']) / len(r['demos_used']):.1f}",
                      f"{r['seconds']:.0f}s"] for r in icl],
                    ["task", "k", "select", "accuracy", "min", "max", "seeds", "n", "demos", "time"]))
    for r in (r for r in rows if r["part"] == "cot"):
        print(table([[p, f"{r[f'{p}_accuracy']:.1f}", f"{r[f'{p}_no_answer']:.1f}", r["n"]]
                     for p in ("direct", "cot", "self_consistency") if f"{p}_accuracy" in r],
                    ["gsm8k prompt", "accuracy", "no answer %", "n"]))
    for r in (r for r in rows if r["part"] == "instruct"):
        print(table([[t, f"{r[f'{t}_before']:.1f}", f"{r[f'{t}_after']:.1f}", f"{r[f'{t}_majority']:.1f}", r[f"{t}_n"]]
                     for t in ("rte", "sst2")], ["instruct zero-shot", "before", "after", "majority", "n"]))
        print(f"mixture {r['mixture']}, {r['steps']} steps, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a random tiny LLaMA with SmolLM2's tokenizer (smoke)")
    ap.add_argument("--smoke", action="store_true", help=f"small sizes for a quick check: {SMOKE}")
    ap.add_argument("--parts", default="icl,cot,instruct")
    ap.add_argument("--icl-tasks", default="sst2,rte")
    ap.add_argument("--ks", default="0,4,8")
    ap.add_argument("--selects", default="random,balanced,knn")
    ap.add_argument("--order", default="random", choices=["random", "similar-last"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--icl-limit", type=int, help="first N dev examples (default: all: SST-2 872, RTE 277)")
    ap.add_argument("--embed-model", default="minilm-l6")
    ap.add_argument("--gsm8k-limit", type=int, default=200)
    ap.add_argument("--cot-k", type=int, default=8)
    ap.add_argument("--sc", type=int, default=5, help="self-consistency chains")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--instruct-method", default="lora")
    ap.add_argument("--instruct-tasks", default="sst2,squad,xsum,scitldr,e2e_nlg,webnlg,alpaca")
    ap.add_argument("--instruct-total", type=int, default=4000)
    ap.add_argument("--instruct-cap", type=int, default=1000)
    ap.add_argument("--instruct-steps", type=int, help="default: one epoch of the mixture")
    ap.add_argument("--instruct-lr", type=float)
    ap.add_argument("--instruct-max-length", type=int, default=512)
    ap.add_argument("--instruct-limit", type=int, help="zero-shot eval on the first N dev examples (default: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", help="rows file: finished rows are kept and skipped on a rerun")
    a = ap.parse_args()
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tiny:
        a.model = tiny_model_dir()
    rows = load_rows(a.json)
    done = {r["key"] for r in rows}
    parts = a.parts.split(",")
    print(f"model {a.model} | device {'cuda' if torch.cuda.is_available() else 'cpu'} | threads "
          f"{torch.get_num_threads()} | cpus {os.cpu_count()}", flush=True)
    gens = []
    if "icl" in parts or "cot" in parts:
        model, tok = lmadapt.load(a.model)
        if "icl" in parts:
            gens.append(icl_rows(a, model, tok, done))
        if "cot" in parts:
            gens.append(cot_rows(a, model, tok, done))
    if "instruct" in parts:
        gens.append(instruct_rows(a, done))
    for gen in gens:
        for row in gen:
            print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
            rows.append(row)
            save_rows(a.json, rows)
    report(rows)


if __name__ == "__main__":
    main()
