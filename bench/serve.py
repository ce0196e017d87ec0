"""Multi-tenant serving (issue 10), side by side in one run: N users of mixed types (prompt,
P-tuning, prefix, LoRA, adapter, BitFit; random artifacts of the default sizes) in one Bank.

1. generation throughput of the mixed bank / the bare base model (our KV-cache loop, no
   method attached), the same batch of prompts, the same number of new tokens (goal >= 0.8);
2. the mixed batch / each user's request run alone, one after another (goal >= 10x);
3. an all-LoRA batch: lmadapt's bank / PEFT's mixed-adapter batch (`generate(adapter_names=)`),
   the same LoRA weights (converted with lmadapt.peft_io.to_peft), same batch (goal >= 1.0);
   also how often both decode the same greedy tokens;
4. memory: bytes of one resident user per method (its slot in every table it has), and the
   process memory that 1,000 registered users add;
5. a bounded loopback load test through the real HTTP server (uvicorn thread, httpx clients):
   requests/s, p50 / p99 latency, lost and wrong answers (each answer is checked against the
   bank's offline answer; exact at fp32).

    .venv/bin/python bench/serve.py                       # SmolLM2-135M, 64 users, batch 32
    .venv/bin/python bench/serve.py --tiny                # a random tiny LLaMA: a smoke run (< 2 min)

Prints a table and writes --out (JSON). Runs on CUDA when present.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lmadapt, not an installed one
import lmadapt  # noqa: E402
from lmadapt.precision import autocast, resolve  # noqa: E402
from lmadapt.serve import Bank  # noqa: E402

MIX = ["prompt", "ptuning", "prefix", "lora", "adapter", "bitfit"]
WORDS = ("the a movie film was is it this that and but very not good great bad plot actor story with of to in "
         "for on at by an as be are so cat dog table name food price area near pub cafe cheap high low").split()


def tiny_model():
    """A random LLaMA of 4 layers, hidden 128, and a word-level tokenizer (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<eos>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")
    tok.padding_side = "left"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=None, eos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.config.lmadapt_name = "tiny-random-llama"
    return model.to(lmadapt.models.default_device()), tok


def make_artifacts(base, tok, n_users: int, root: Path) -> dict[str, tuple[str, Path]]:
    """n users cycling through MIX, each a random artifact of the method's default size."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for method in MIX:
        a = lmadapt.attach(copy.deepcopy(base), method, tokenizer=tok)
        for i in range(MIX.index(method), n_users, len(MIX)):
            with torch.no_grad():
                for p in a.trainable_parameters():
                    p.copy_(torch.randn(p.shape, generator=g).to(p.device) * (0.02 if method != "prompt" else 0.5))
            name = f"user{i:03d}-{method}"
            a.save(root / name)
            out[name] = (method, root / name)
        del a
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int):
    best = None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        r = fn()
        sync()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, r


def prompts_for(tok, n: int, length: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    vocab = [w for w in WORDS]
    return [" ".join(vocab[int(j)] for j in torch.randint(len(vocab), (length + i % 5,), generator=g)) for i in range(n)]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peft_all_lora(base, tok, lora_users, rows, prompts, new_tokens, precision):
    """PEFT with every LoRA user loaded as a named adapter; one mixed batch via adapter_names."""
    import peft
    from lmadapt.peft_io import to_peft
    tmp = Path(tempfile.mkdtemp(prefix="bench-peft-"))
    names = []
    for i, (name, path) in enumerate(lora_users):
        a = lmadapt.load_adapted(path, model=copy.deepcopy(base), tokenizer=tok)
        to_peft(a, tmp / name)
        names.append(name)
        del a
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(tmp / n), adapter_name=n)
    pm.eval()
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(base.device)
    adapter_names = [names[i % len(names)] for i in range(rows)]

    def run():
        with torch.no_grad(), autocast(precision, base.device):
            out = pm.generate(**enc, adapter_names=adapter_names, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[:, enc["input_ids"].shape[1]:].tolist()
    return run


def load_test(bank, users, prompts, n_requests, clients, new_tokens, precision, max_batch):
    """The real server on loopback; -> requests/s, latencies, lost and wrong answers."""
    import httpx
    import uvicorn
    from lmadapt.serve.metrics import Metrics
    from lmadapt.serve.scheduler import Scheduler
    from lmadapt.serve.server import ServerConfig, create_app
    from lmadapt.serve.users import UserStore
    names = list(users)
    jobs = [(names[i % len(names)], prompts[i % len(prompts)]) for i in range(n_requests)]
    # the offline answers, in batches, before the scheduler thread owns the model
    expected = []
    for i in range(0, len(jobs), max_batch):
        part = jobs[i:i + max_batch]
        new = bank.generate([u for u, _ in part], [p for _, p in part], max_new_tokens=new_tokens, precision=precision)
        expected += [bank.tokenizer.decode(t, skip_special_tokens=True) for t in new]
    store = UserStore(tempfile.mkdtemp(prefix="bench-state-"))
    tokens = {}
    for n in names:   # tokens only: the bank already holds the artifacts
        tokens[n] = store.add(n, users[n][1])
    sched = Scheduler(bank, max_batch=max_batch, max_wait=0.005, precision=precision, metrics=Metrics())
    app = create_app(bank, store, sched, ServerConfig(max_tokens=max(512, new_tokens)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    client = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients))

    def one(job):
        user, prompt = job
        t = time.perf_counter()
        r = client.post("/v1/completions", headers={"Authorization": f"Bearer {tokens[user]}"},
                        json={"model": user, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0})
        dt = time.perf_counter() - t
        return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else None), dt
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    server.should_exit = True
    th.join(timeout=30)
    lat = sorted(r[2] for r in results)
    return {"requests": n_requests, "clients": clients, "seconds": wall, "requests_per_s": n_requests / wall,
            "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "lost": sum(1 for r in results if r[0] != 200),
            "wrong": sum(1 for r, e in zip(results, expected) if r[0] == 200 and r[1] != e),
            "mean_batch": sched.metrics.batch_sum / max(1, sched.metrics.batch_n)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a random tiny LLaMA (smoke run; figures mean nothing)")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is kept)")
    ap.add_argument("--sequential-rows", type=int, default=8,
                    help="rows timed alone for the per-user baseline (their mean time is scaled to the batch)")
    ap.add_argument("--load-requests", type=int, default=128)
    ap.add_argument("--load-clients", type=int, default=16)
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default="bench_serve.json")
    a = ap.parse_args()
    if a.tiny:
        a.users, a.batch, a.new_tokens, a.repeats = min(a.users, 12), min(a.batch, 8), min(a.new_tokens, 8), 1
        a.load_requests, a.load_clients, a.sequential_rows = min(a.load_requests, 24), min(a.load_clients, 6), 4
    torch.manual_seed(0)
    base, tok = tiny_model() if a.tiny else lmadapt.load(a.model)
    precision = resolve(a.precision, base.device)
    pristine = copy.deepcopy(base)
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    users = make_artifacts(pristine, tok, a.users, root)
    print(f"{len(users)} users ({', '.join(MIX)}), batch {a.batch}, {a.new_tokens} new tokens, "
          f"{precision} on {base.device}", flush=True)
    res = {"model": "tiny-random-llama" if a.tiny else a.model, "users": len(users), "batch": a.batch,
           "new_tokens": a.new_tokens, "precision": precision, "device": str(base.device)}

    counts = {m: sum(1 for u in users.values() if u[0] == m) for m in MIX}
    rss0 = rss_mb()
    bank = Bank(base, tok, MIX, capacity=max(counts.values()))
    res["bank_tables_mb"] = rss_mb() - rss0
    for name, (_, path) in users.items():
        bank.register(name, path)
    names = list(users)
    rows = [names[i % len(names)] for i in range(a.batch)]
    prompts = prompts_for(tok, a.batch, a.prompt_words)
    gen = lambda us, ps: bank.generate(us, ps, max_new_tokens=a.new_tokens, stop_ids=[], precision=precision)  # noqa: E731
    gen(rows, prompts)                                            # warm up (and load every artifact)

    # 1. mixed bank / bare base at the same batch
    plain = lmadapt.attach(pristine, "none", tokenizer=tok)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(base.device)
    bare = lambda: plain.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=a.new_tokens,  # noqa: E731
                                  eos_token_id=[], precision=precision)
    bare()
    # 1 and 2 are timed in rounds, each round mixed, bare, then every sequential row alone, and the
    # best of each kept: this VM's speed drifts by tens of percent over minutes, and interleaving
    # keeps a drift from landing on one side of a ratio.
    k = min(a.sequential_rows, a.batch)
    best = {"mixed": None, "bare": None, "seq": None}
    for _ in range(a.repeats):
        for key, fn in (("mixed", lambda: gen(rows, prompts)), ("bare", bare),
                        ("seq", lambda: [gen([rows[i]], [prompts[i]]) for i in range(k)])):
            dt, _ = timed(fn, 1)
            best[key] = dt if best[key] is None else min(best[key], dt)
    t_mixed, t_bare, t_seq = best["mixed"], best["bare"], best["seq"]
    n_tok = a.batch * a.new_tokens
    res["mixed_tokens_per_s"], res["bare_tokens_per_s"] = n_tok / t_mixed, n_tok / t_bare
    res["mixed_over_bare"] = t_bare / t_mixed

    # 2. mixed batch / each user alone, one after another (k rows timed, scaled to the batch)
    t_seq_batch = t_seq / k * a.batch
    res["sequential_tokens_per_s"] = n_tok / t_seq_batch
    res["batched_over_sequential"] = t_seq_batch / t_mixed

    # 3. all-LoRA batch: ours / PEFT adapter_names
    lora = [(n, u[1]) for n, u in users.items() if u[0] == "lora"]
    lrows = [lora[i % len(lora)][0] for i in range(a.batch)]
    t_ours, ours = timed(lambda: gen(lrows, prompts), a.repeats)
    res["lora_users"] = len(lora)
    res["lora_ours_tokens_per_s"] = n_tok / t_ours
    if not a.no_peft:
        run = peft_all_lora(pristine, tok, lora, a.batch, prompts, a.new_tokens, precision)
        run()
        t_peft, theirs = timed(run, a.repeats)
        res["lora_peft_tokens_per_s"] = n_tok / t_peft
        res["lora_ours_over_peft"] = t_peft / t_ours
        res["lora_same_greedy_tokens"] = sum(x == y for o, t in zip(ours, theirs) for x, y in zip(o, t)) / n_tok

    # 4. memory: one resident user's slot per method; 1,000 registered users
    per = {}
    for t in bank.tables:
        per[t.name] = sum(p[0].numel() * p.element_size() for p in t.params.values())
    res["bytes_per_resident_user"] = per
    res["mean_bytes_per_resident_user"] = statistics.mean(per[u[0]] for u in users.values())
    rss1 = rss_mb()
    any_path = next(iter(users.values()))[1]
    for i in range(1000):
        bank.registry[f"reg{i}"] = bank.check(any_path) if i == 0 else copy.copy(bank.registry["reg0"])
    res["registry_mb_per_1000_users"] = rss_mb() - rss1
    for i in range(1000):
        del bank.registry[f"reg{i}"]

    # 5. loopback load test
    res["load"] = load_test(bank, users, prompts, a.load_requests, a.load_clients, a.new_tokens, precision, a.batch)

    L = res["load"]
    lines = [
        f"mixed bank / bare base (tokens/s)     {res['mixed_tokens_per_s']:9.1f} / {res['bare_tokens_per_s']:9.1f} = "
        f"{res['mixed_over_bare']:.3f}   (goal >= 0.8)",
        f"batched / per-user sequential         {res['mixed_tokens_per_s']:9.1f} / {res['sequential_tokens_per_s']:9.1f} = "
        f"{res['batched_over_sequential']:.1f}x   (goal >= 10x)",
    ]
    if "lora_ours_over_peft" in res:
        lines.append(f"all-LoRA: lmadapt / PEFT adapter_names {res['lora_ours_tokens_per_s']:9.1f} / "
                     f"{res['lora_peft_tokens_per_s']:9.1f} = {res['lora_ours_over_peft']:.3f}   (goal >= 1.0; "
                     f"same greedy tokens {res['lora_same_greedy_tokens']:.1%})")
    lines += ["bytes per resident user: " + ", ".join(f"{m} {b / 1e6:.2f} MB" for m, b in per.items()) +
              f"; mean over the mix {res['mean_bytes_per_resident_user'] / 1e6:.2f} MB",
              f"1,000 registered users add {res['registry_mb_per_1000_users']:.1f} MB of process memory",
              f"load test: {L['requests']} requests from {L['clients']} clients in {L['seconds']:.1f} s: "
              f"{L['requests_per_s']:.2f} req/s, p50 {L['p50_s']:.3f} s, p99 {L['p99_s']:.3f} s, "
              f"mean batch {L['mean_batch']:.1f}, lost {L['lost']}, wrong {L['wrong']}"]
    print("\n".join(lines))
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
