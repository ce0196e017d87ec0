"""Issue 13's benchmark: learned prompts on SmolLM2-135M, SST-2 and RTE, 16 shots, 3 seeds.

Protocol (LM-BFF's): per seed, `--shots` examples per label to train on and as many again, disjoint,
as the dev few (checkpoint selection, the searches' dev ranking), both from the train split; the
task's dev set is the test set (all of it, or a seeded `--max-test` subset). Every row is the mean
and standard deviation over the seeds of test accuracy. Parts (`--parts`):

- verbalizers: manual (the task's first PVP) vs knowledgeable (its words expanded by `--kpt-neighbours`
  embedding neighbours + the shipped synonyms, refined on `--kpt-unlabeled` other train examples)
  vs soft (WARP) vs prototypical (ProtoVerb), one template, method `--method` (lora);
- templates: the hand-written template vs the searched one (`lmadapt prompt-search`'s: words
  searched for the hand template, then templates for those words, generated lead-ins and
  `--triggers` AutoPrompt triggers ranked together), with the searched and the manual words;
- ppt: prompt tuning (k = `--k`) from vocabulary init vs from a prompt pre-trained on `--ppt-pairs`
  sentence pairs of `--ppt-docs` (PPT, one pre-training shared by every task and seed);
- ipt: prompts tuned on the `--ipt-train` tasks (`--ipt-max-train` examples each), an auto-encoder
  for every d in `--ipt-d` fit on them, then on each held-out task (`--ipt-heldout`, default sst2:
  the sentiment cluster is not among the training tasks) d-dim tuning vs full prompt tuning, and
  the share of prompt tuning's accuracy above chance that d numbers recover.

Runs are resumable: every finished run leaves OUT/runs/.../row.json and is not run again. Rows of an
earlier run's results.json (e.g. the committed docs/bench_learned_prompts.json) count as finished
too with `--reuse FILE`, when that run used the same settings (a differing one is named and refused).

    PYTHONPATH=. .venv/bin/python bench/learned_prompts.py --out runs/bench13     # everything
    PYTHONPATH=. .venv/bin/python bench/learned_prompts.py --parts verbalizers --tasks sst2 --seeds 0 --out runs/b
    PYTHONPATH=. .venv/bin/python bench/learned_prompts.py --table --out runs/bench13   # the summary, running nothing

Smoke (a tiny random LLaMA with SmolLM2's tokenizer; the figures mean nothing):
    PYTHONPATH=. .venv/bin/python bench/learned_prompts.py --tiny --max-test 16 --shots 2 --seeds 0 \\
        --max-steps 2 --ppt-pairs 12 --ppt-dev-pairs 6 --ppt-steps 2 --ppt-max-docs 50 --ipt-prompt-steps 2 \\
        --ipt-ae-steps 4 --ipt-max-train 8 --ipt-max-eval 4 --ipt-train rte,e2e_nlg --candidates 3 --top 4 \\
        --lead-tokens 1 --per-step 2 --triggers 2 --trigger-iters 2 --kpt-unlabeled 16 --out /tmp/b13
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import lmadapt
from lmadapt.atomic import write_json
from lmadapt.data import subsample


def few_shot(task, shots, seed):
    from lmadapt.prompting.search import few_shot_split
    return few_shot_split(lmadapt.api._task(task), shots, seed)


def tiny_model_dir(path: Path) -> str:
    """A tiny random LLaMA (hidden 64, 2 layers) with SmolLM2's tokenizer, saved once."""
    if not (path / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM
        _, tok = lmadapt.load("smollm2-135m")
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


# Settings a row's figure does not depend on: where it is written, what runs, what is reused.
NOT_SETTINGS = ("out", "parts", "tasks", "seeds", "reuse", "ipt_heldout", "table", "ipt_prompts_shard", "ipt_fit_only")


def key_of(row) -> tuple:
    return row["part"], row["task"], row["variant"], row["seed"]


# Settings only some parts' rows depend on; the rest (model, shots, batch size, ...) shape every row.
PART_SETTINGS = {
    "verbalizers": ("kpt_neighbours", "kpt_unlabeled", "kpt_min_ratio"),
    "templates": ("candidates", "top", "word_score", "lead_tokens", "beam", "per_step", "triggers", "trigger_iters"),
    "ppt": ("k", "epochs_prompt", "ppt_docs", "ppt_max_docs", "ppt_pairs", "ppt_dev_pairs", "ppt_steps"),
    "ipt": ("k", "epochs_prompt", "ipt_train", "ipt_d", "ipt_max_train", "ipt_max_eval", "ipt_prompt_steps",
            "ipt_ae_steps", "ipt_recon", "ipt_recon_warmup"),
}


def reusable_rows(path, args: dict) -> dict[tuple, dict]:
    """The rows of an earlier results.json, by (part, task, variant, seed), if it ran with `args`'
    settings (a part's own settings count only when the file has rows of that part); SystemExit
    naming the file and the first setting that differs otherwise."""
    try:
        earlier = json.loads(Path(path).read_text())
        old, rows = earlier["args"], earlier["rows"]
        parts = {r["part"] for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--reuse {path}: not a results.json of this benchmark ({e})")
    only_some = {n for names in PART_SETTINGS.values() for n in names}
    unused = only_some - {n for part in parts for n in PART_SETTINGS.get(part, ())}
    for name, value in args.items():
        if name not in NOT_SETTINGS and name not in unused and name in old and old[name] != value:
            raise SystemExit(f"--reuse {path}: its runs used --{name.replace('_', '-')} {old[name]!r}, "
                             f"this one {value!r}")
    return {key_of(r): r for r in rows}


class Bench:
    def __init__(self, a):
        self.a = a
        self.out = Path(a.out)
        self.rows = []
        self.reused = {}
        for path in a.reuse or []:
            self.reused |= reusable_rows(path, vars(a))

    def load(self):
        return lmadapt.load(self.a.model)

    def train_cfg(self, method: str) -> dict:
        a = self.a
        cfg = {"batch_size": a.batch_size, "max_length": a.max_length, "progress": False, "ood": [],
               "precision": a.precision}
        if a.max_steps:
            cfg["max_steps"] = a.max_steps
        else:
            cfg["epochs"] = a.epochs_prompt if method in ("prompt", "ipt") else a.epochs
        if a.eval_every:
            cfg["eval_every"] = a.eval_every
        return cfg

    def done(self, part, task, variants, seed) -> bool:
        """Whether every named variant's row exists (a run folder's or a reused one): then what
        only those runs need (a search, a pre-trained prompt, decoders) is not made again."""
        return all(self.saved(part, task, v, seed) is not None for v in variants)

    def where(self, part, task, variant, seed) -> Path:
        return self.out / "runs" / part / task / variant / f"s{seed}"

    def saved(self, part, task, variant, seed) -> dict | None:
        where = self.where(part, task, variant, seed)
        if (where / "row.json").exists():
            return json.loads((where / "row.json").read_text())
        return self.reused.get((part, task, variant, seed))

    def run(self, part, task, variant, seed, method, attach_kw, prepare=None, method_args=None, same_as=None):
        """One run (or its saved row): train on the few, select on the dev few, test on dev. `same_as`
        (part, variant) names a row of the very same configuration (method, template, words, init,
        seed) under another part: when it exists, its figures are this row's, marked `same_run_as`."""
        where = self.where(part, task, variant, seed)
        row = self.saved(part, task, variant, seed)
        twin = self.saved(same_as[0], task, same_as[1], seed) if row is None and same_as else None
        if row is None and twin is not None:
            row = {**twin, "part": part, "variant": variant, "same_run_as": "/".join(same_as)}
            write_json(where / "row.json", row)
        elif row is None:
            train, dev = few_shot(task, self.a.shots, seed)
            model, tok = self.load()
            adapted = lmadapt.attach(model, method, task=task, tokenizer=tok, init_seed=seed, **attach_kw,
                                     **(method_args or {}))
            if prepare is not None:
                prepare(adapted, seed)
            res = lmadapt.train(adapted, task, train_examples=train, dev_examples=dev, seed=seed, out=where,
                                **self.train_cfg(method))
            test = lmadapt.evaluate(adapted, task, split="dev", limit=self.a.max_test, batch_size=32,
                                    max_length=self.a.max_length, precision=self.a.precision)
            row = {"part": part, "task": task, "variant": variant, "seed": seed, "method": method,
                   "test_accuracy": test["accuracy"], "n_test": test["n"], "dev_few_accuracy": res["best_dev"],
                   "trainable_params": res["trainable_params"], "train_seconds": res["train_seconds"],
                   "head": adapted.meta()["head"].get("kind"), "precision": res.get("precision")}
            write_json(where / "row.json", row)
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        return row

    # --- parts -------------------------------------------------------------------------------------
    def verbalizers(self, task, seed):
        t = lmadapt.api._task(task)
        template, words = t.pvps[0]
        a = self.a
        kinds = {"manual": {"head": "verbalizer"}, "soft": {"head": "soft"}, "prototypical": {"head": "prototypical"},
                 "knowledgeable": {"head": "knowledgeable",
                                   "head_options": {"neighbours": a.kpt_neighbours, "synonyms": True}}}

        def refine(adapted, seed):
            from lmadapt.prompting.knowledgeable import refine_head
            train, dev = few_shot(task, a.shots, seed)
            taken = {(ex.text, ex.text_pair) for ex in train + dev}
            pool = [ex for ex in t.load("train") if (ex.text, ex.text_pair) not in taken]
            refine_head(adapted, subsample(pool, a.kpt_unlabeled, seed=seed), min_ratio=a.kpt_min_ratio,
                        max_length=a.max_length, precision=a.precision)
        for name, kw in kinds.items():
            self.run("verbalizers", task, name, seed, a.method, {"template": template, "verbalizer": words, **kw},
                     prepare=refine if name == "knowledgeable" else None)

    def templates(self, task, seed):
        from lmadapt.prompting.search import run_search
        t = lmadapt.api._task(task)
        hand_t, hand_w = t.pvps[0]
        variants = ("hand template, hand words", "hand template, searched words",
                    "searched template, searched words", "searched template, hand words")
        if self.done("templates", task, variants, seed):
            for name in variants:
                self.run("templates", task, name, seed, self.a.method, {})
            return
        where = self.out / "search" / task / f"s{seed}"
        if (where / "search.json").exists():
            found = json.loads((where / "search.json").read_text())
        else:
            model, tok = self.load()
            found = run_search(model, tok, t, where, shots=self.a.shots, seed=seed, candidates=self.a.candidates,
                               score=self.a.word_score, triggers=self.a.triggers, trigger_iters=self.a.trigger_iters,
                               top=self.a.top, lead_tokens=self.a.lead_tokens, beam=self.a.beam,
                               per_step=self.a.per_step, max_length=self.a.max_length, precision=self.a.precision)
        searched_w = found["words"][0]["verbalizer"]
        searched_t = next(r["template"] for r in found["templates"])
        for name, (tmpl, words) in {"hand template, hand words": (hand_t, hand_w),
                                    "hand template, searched words": (hand_t, searched_w),
                                    "searched template, searched words": (searched_t, searched_w),
                                    "searched template, hand words": (searched_t, hand_w)}.items():
            try:   # the hand template with the hand words is the verbalizers part's manual row
                self.run("templates", task, name, seed, self.a.method, {"template": tmpl, "verbalizer": words},
                         same_as=("verbalizers", "manual") if tmpl == hand_t and words == hand_w else None)
            except ValueError as e:   # hand words a searched template tokenizes differently, ...
                print(json.dumps({"part": "templates", "task": task, "variant": name, "seed": seed, "skipped": str(e)}))

    def ppt_dir(self):
        from lmadapt.prompting.ppt import documents_of, pretrain_prompt
        where = self.out / "ppt"
        if not (where / "best" / "method.json").exists():
            docs = documents_of(self.a.ppt_docs.split(","), limit=self.a.ppt_max_docs)
            model, tok = self.load()
            r = pretrain_prompt(model, tok, docs, where, k=self.a.k, pairs=self.a.ppt_pairs, dev_pairs=self.a.ppt_dev_pairs,
                                max_steps=self.a.ppt_steps, batch_size=self.a.batch_size, max_length=self.a.max_length,
                                progress=False, precision=self.a.precision, eval_every=max(1, self.a.ppt_steps // 4))
            print(json.dumps({"part": "ppt", "pretraining_dev_accuracy": r["metrics"]["dev"]["accuracy"]}), flush=True)
        return where

    def ppt(self, task, seed):
        d = None if self.done("ppt", task, ("PPT init",), seed) else self.ppt_dir()
        for name, init in (("vocab init", "vocab"), ("PPT init", f"pretrained:{d}")):
            self.run("ppt", task, name, seed, "prompt", {}, method_args={"k": self.a.k, "init": init})

    def ipt_decoders(self):
        from lmadapt.prompting.ipt import fit_autoencoder, prompt_dir, train_prompts
        a = self.a
        tasks = [t for t in a.ipt_train.split(",") if t]
        if a.ipt_fit_only:            # both fits at once must not train a missing prompt twice into one folder
            missing = [t for t in tasks if not (prompt_dir(self.out / "ipt", t) / "best" / "method.json").exists()]
            if missing:
                raise SystemExit(f"--ipt-fit-only: no finished prompt for {', '.join(missing)} in {self.out / 'ipt'}; "
                                 "train the prompts first (--ipt-prompts-shard I/N, or the command without either flag)")
        if a.ipt_prompts_shard:       # stage 1 only, every n-th training task: one process per core
            i, _, n = a.ipt_prompts_shard.partition("/")
            if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
                raise SystemExit(f"--ipt-prompts-shard {a.ipt_prompts_shard!r}: expected I/N with 1 <= I <= N, e.g. 1/2")
            tasks = tasks[int(i) - 1::int(n)]
        model, tok = self.load()
        prompts = train_prompts(model, tok, tasks, self.out / "ipt", k=a.k, max_train=a.ipt_max_train,
                                max_steps=a.ipt_prompt_steps, batch_size=a.batch_size, max_length=a.max_length,
                                progress=False, precision=a.precision, max_eval=a.ipt_max_eval,
                                eval_every=a.ipt_prompt_steps,   # one dev evaluation, at the end (generation is slow)
                                save_every=100)                  # a killed run resumes (a task is 25-50 min here)
        if a.ipt_prompts_shard:
            print(json.dumps({"part": "ipt", "prompts": sorted(prompts), "shard": a.ipt_prompts_shard}), flush=True)
            return None
        out = {}
        for d in (int(x) for x in a.ipt_d.split(",")):
            where = self.out / "ipt" / f"d{d}"
            meta = where / "decoder" / "decoder.json"
            # a decoder of other joint steps is refit: from its checkpoint when the rest matches
            if not meta.exists() or json.loads(meta.read_text()).get("steps") != a.ipt_ae_steps:
                r = fit_autoencoder(model, tok, tasks, prompts, where, d=d, steps=a.ipt_ae_steps, recon=a.ipt_recon,
                                    recon_warmup=a.ipt_recon_warmup,
                                    max_train=a.ipt_max_train, batch_size=a.batch_size, max_length=a.max_length,
                                    precision=a.precision)
                print(json.dumps({"part": "ipt", "d": d, "recon_mse": r["recon_mse"],
                                  "recon_relative": r["recon_relative"]}), flush=True)
            out[d] = where / "decoder"
        return out

    def ipt(self, task, seed, decoders):
        self.run("ipt", task, "prompt tuning (full)", seed, "prompt", {}, method_args={"k": self.a.k},
                 same_as=("ppt", "vocab init"))   # init "vocab" is prompt tuning's default
        for d, path in decoders.items():
            self.run("ipt", task, f"ipt d={d}", seed, "ipt", {}, method_args={"decoder": str(path)})

    def run_parts(self):
        parts = self.a.parts.split(",")
        if (self.a.ipt_prompts_shard or self.a.ipt_fit_only) and parts != ["ipt"]:
            raise SystemExit("--ipt-prompts-shard and --ipt-fit-only run stages of IPT alone: add --parts ipt "
                             "(the other parts' rows would be run by every process at once)")
        seeds = [int(s) for s in self.a.seeds.split(",")]
        tasks = self.a.tasks.split(",")
        for task in tasks:
            for seed in seeds:
                if "verbalizers" in parts:
                    self.verbalizers(task, seed)
                if "templates" in parts:
                    self.templates(task, seed)
                if "ppt" in parts:
                    self.ppt(task, seed)
        if "ipt" in parts and (self.a.ipt_prompts_shard or self.a.ipt_fit_only):
            self.ipt_decoders()
        elif "ipt" in parts:
            heldout = self.a.ipt_heldout.split(",")
            dims = [int(x) for x in self.a.ipt_d.split(",")]
            variants = ("prompt tuning (full)", *(f"ipt d={d}" for d in dims))
            decoders = ({d: None for d in dims} if all(self.done("ipt", t, variants, s) for t in heldout for s in seeds)
                        else self.ipt_decoders())
            for task in heldout:
                for seed in seeds:
                    self.ipt(task, seed, decoders)

    def finished(self) -> list[dict]:
        """Every row there is: OUT's run folders', then the reused rows they do not have."""
        rows = [json.loads(p.read_text()) for p in sorted((self.out / "runs").glob("*/*/*/s*/row.json"))]
        have = {key_of(r) for r in rows}
        return rows + [r for k, r in self.reused.items() if k not in have]

    # --- report ------------------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        groups = {}
        for r in self.rows:
            groups.setdefault((r["part"], r["task"], r["variant"]), []).append(r["test_accuracy"])
        out = []
        for (part, task, variant), accs in groups.items():
            out.append({"part": part, "task": task, "variant": variant, "n_seeds": len(accs),
                        "mean": statistics.mean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0})
        for task in {r["task"] for r in self.rows if r["part"] == "ipt"}:
            chance = 100.0 / len(lmadapt.api._task(task).label_names)     # accuracy is in percent
            full = next((s["mean"] for s in out if s["part"] == "ipt" and s["task"] == task
                         and s["variant"] == "prompt tuning (full)"), None)
            for s in out:
                if s["part"] == "ipt" and s["task"] == task and s["variant"].startswith("ipt") and full:
                    s["recovered"] = s["mean"] / full
                    s["recovered_above_chance"] = (s["mean"] - chance) / (full - chance) if full > chance else None
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="smoke: a tiny random LLaMA with SmolLM2's tokenizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="verbalizers,templates,ppt,ipt")
    ap.add_argument("--reuse", action="append", metavar="RESULTS_JSON",
                    help="count the rows of an earlier results.json with the same settings as finished")
    ap.add_argument("--table", action="store_true",
                    help="run nothing: the summary of the rows there are (OUT's run folders, --reuse files), "
                         "written to OUT/results.json")
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--method", default="lora", help="method of the verbalizer and template parts (lora)")
    ap.add_argument("--max-steps", type=int, help="steps per run (default: --epochs)")
    ap.add_argument("--epochs", type=float, default=10.0, help="epochs of the few (32 examples at 16 shots) (10)")
    ap.add_argument("--epochs-prompt", type=float, default=30.0, help="epochs for prompt tuning and ipt (30)")
    ap.add_argument("--eval-every", type=int, help="steps between dev-few evaluations (default: each epoch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-test", type=int, help="test on a seeded subset of the dev set (default: all)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--kpt-neighbours", type=int, default=8)
    ap.add_argument("--kpt-unlabeled", type=int, default=200)
    ap.add_argument("--kpt-min-ratio", type=float, default=0.1)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--word-score", choices=["likelihood", "ratio"], default="likelihood",
                    help="label-word candidates by likelihood (LM-BFF) or likelihood ratio (PETAL)")
    ap.add_argument("--lead-tokens", type=int, default=3)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--per-step", type=int, default=8)
    ap.add_argument("--triggers", type=int, default=3, help="AutoPrompt-style trigger candidates too (0: off)")
    ap.add_argument("--trigger-iters", type=int, default=6)
    ap.add_argument("--k", type=int, default=20, help="soft tokens for ppt and ipt (20)")
    ap.add_argument("--ppt-docs", default="imdb,xsum,scitldr")
    ap.add_argument("--ppt-max-docs", type=int, default=2000)
    ap.add_argument("--ppt-pairs", type=int, default=3000)
    ap.add_argument("--ppt-dev-pairs", type=int, default=300)
    ap.add_argument("--ppt-steps", type=int, default=1500)
    ap.add_argument("--ipt-train", default="rte,mnli,squad,xsum,scitldr,e2e_nlg,webnlg",
                    help="tasks whose prompts make the subspace (default: NLI, QA, summarization, table-to-text)")
    ap.add_argument("--ipt-heldout", default="sst2", help="held-out tasks tuned in the subspace (sst2: sentiment)")
    ap.add_argument("--ipt-d", default="5,20")
    ap.add_argument("--ipt-fit-only", action="store_true",
                    help="stop after the prompts and the decoders: e.g. --ipt-d 5 and --ipt-d 20 at once, one per core, "
                         "then the command with --ipt-d 5,20 finds both and tunes the held-out tasks")
    ap.add_argument("--ipt-prompts-shard", metavar="I/N",
                    help="only train the prompts of every N-th --ipt-train task from the I-th (1-based) and stop: "
                         "run I = 1..N at once, one per core, then the command without it fits and tunes")
    ap.add_argument("--ipt-max-train", type=int, default=1000)
    ap.add_argument("--ipt-max-eval", type=int, default=200)
    ap.add_argument("--ipt-prompt-steps", type=int, default=500)
    ap.add_argument("--ipt-ae-steps", type=int, default=2000)
    ap.add_argument("--ipt-recon-warmup", type=int, default=500,
                    help="reconstruction-only steps before the auto-encoder's joint steps (500)")
    ap.add_argument("--ipt-recon", choices=["relative", "mse"], default="relative",
                    help="the auto-encoder's reconstruction term: MSE / the prompts' mean square, or plain MSE")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.tiny:
        a.model = tiny_model_dir(Path(a.out) / "tiny-model")
    b = Bench(a)
    if a.table:
        b.rows = b.finished()
    else:
        b.run_parts()
    summary = b.summary()
    from lmadapt.cli import table
    print(table([[s["part"], s["task"], s["variant"], f"{s['mean']:.3f} ± {s['std']:.3f}", s["n_seeds"],
                  f"{s['recovered']:.2f}" if "recovered" in s else ""] for s in summary],
                ["part", "task", "variant", "test acc", "seeds", "ipt / prompt tuning"]))
    write_json(Path(a.out) / "results.json", {"args": vars(a), "rows": b.rows, "summary": summary})
    print(f"wrote {Path(a.out) / 'results.json'}")


if __name__ == "__main__":
    main()
