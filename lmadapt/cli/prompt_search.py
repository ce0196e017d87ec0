"""lmadapt prompt-search: label words and templates searched on the labeled few; OUT/search.json,
OUT/verbalizers.txt and OUT/templates.txt (one per line, best first, ready for --verbalizer /
--template), and with --kpt OUT/knowledgeable.json (a --verbalizer file)."""
from __future__ import annotations

from pathlib import Path

from .common import DEFAULT_MODEL, common_args, data_args, task_from_args, unescape


def cmd_prompt_search(a) -> int:
    import lmadapt
    from ..prompting.search import run_search
    task = task_from_args(a)
    model, tok = lmadapt.load(a.model)
    res = run_search(model, tok, task, a.out, shots=a.shots, seed=a.seed, data_root=a.data_root,
                     template=unescape(a.template) if a.template else None, verbalizer=a.verbalizer,
                     candidates=a.candidates, top=a.top, score=a.word_score, lead_tokens=a.lead_tokens,
                     beam=a.beam, per_step=a.per_step, triggers=a.triggers, trigger_iters=a.trigger_iters, kpt=a.kpt, kpt_unlabeled=a.kpt_unlabeled,
                     max_length=a.max_length, batch_size=a.batch_size, precision=a.precision)
    for name, rows, key in (("label words", res["words"], "verbalizer"), ("templates", res["templates"], "template")):
        print(f"{name} (template {res['word_template']!r})" if key == "verbalizer" else
              f"{name} (verbalizer {res['template_verbalizer']})")
        for r in rows[:5]:
            print(f"  dev {r.get('dev_accuracy', float('nan')):.3f}  train {r['train_accuracy']:.3f}  {r[key]!r}")
    print(f"wrote {Path(a.out) / 'search.json'}, verbalizers.txt, templates.txt" +
          (", knowledgeable.json" if a.kpt else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("prompt-search", help="search label words and templates on the labeled few (LM-BFF style)",
                       description="Example: lmadapt prompt-search --task sst2 --shots 16 --out runs/search; then "
                                   "lmadapt train --task sst2 --shots 16 --template \"$(sed -n 1p runs/search/templates.txt)\" "
                                   "--verbalizer \"$(sed -n 1p runs/search/verbalizers.txt)\" ...")
    p.add_argument("--model", default=DEFAULT_MODEL)
    data_args(p)
    p.add_argument("--shots", type=int, default=16, help="labeled examples per class, and as many again as the dev few (16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--template", help="template for the word search (default: the task's first)")
    p.add_argument("--verbalizer", help="words for the template search (default: the best searched words)")
    p.add_argument("--candidates", type=int, default=10, help="candidate words per label (10)")
    p.add_argument("--top", type=int, default=20, help="assignments / templates scored on the dev few (20)")
    p.add_argument("--word-score", choices=["likelihood", "ratio"], default="likelihood",
                   help="rank candidate words by likelihood on their label's examples (LM-BFF) or the ratio to all (PETAL)")
    p.add_argument("--lead-tokens", type=int, default=3, help="template search: words between input and mask (3)")
    p.add_argument("--beam", type=int, default=3, help="template search: beam width (3)")
    p.add_argument("--per-step", type=int, default=8, help="template search: the model's next words tried per beam (8)")
    p.add_argument("--triggers", type=int, default=0, help="also AutoPrompt-style trigger search: this many "
                                                           "trigger words before the mask (0: off)")
    p.add_argument("--trigger-iters", type=int, default=6, help="HotFlip iterations of the trigger search (6)")
    p.add_argument("--kpt", action="store_true", help="also build a knowledgeable verbalizer (expand + refine): "
                                                      "OUT/knowledgeable.json")
    p.add_argument("--kpt-unlabeled", type=int, default=200, help="unlabeled examples for KPT's priors (200)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    common_args(p)
    p.set_defaults(func=cmd_prompt_search)
