"""lmadapt ppt: pre-train a soft prompt on sentence pairs from unlabeled text (PPT); OUT/best is
what `lmadapt train --method prompt --init pretrained:OUT` starts from."""
from __future__ import annotations

from pathlib import Path

from ..prompting.ppt import PPT_VERBALIZER
from .common import DEFAULT_MODEL, common_args


def cmd_ppt(a) -> int:
    import lmadapt
    from ..prompting.ppt import documents_of, pretrain_prompt
    docs = documents_of([t for t in a.docs.split(",") if t], a.data_root, a.max_docs)
    model, tok = lmadapt.load(a.model)
    cfg = {k: v for k, v in (("lr", a.lr), ("max_steps", a.max_steps), ("epochs", a.epochs),
                             ("batch_size", a.batch_size), ("max_eval", a.max_eval)) if v is not None}
    res = pretrain_prompt(model, tok, docs, a.out, k=a.k, pairs=a.pairs, dev_pairs=a.dev_pairs, seed=a.seed,
                          verbalizer=a.verbalizer,
                          precision=a.precision, progress=not a.no_progress, max_length=a.max_length, **cfg)
    print(f"sentence-pair dev accuracy {res['metrics']['dev']['accuracy']:.3f} ({res['metrics']['dev']['n']} pairs); "
          f"wrote {Path(a.out) / 'best'}: use --method prompt --init pretrained:{a.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("ppt", help="pre-train a soft prompt on sentence pairs from unlabeled text (PPT)",
                       description="Gu et al. 2022. Example: lmadapt ppt --docs imdb,xsum,scitldr --k 20 --out runs/ppt; "
                                   "then lmadapt train --task sst2 --shots 16 --method prompt --init pretrained:runs/ppt ...")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--docs", default="imdb,xsum,scitldr", help="tasks whose texts are the unlabeled documents")
    p.add_argument("--data-root")
    p.add_argument("--max-docs", type=int, help="a random subset of the documents")
    p.add_argument("--k", type=int, default=20, help="soft tokens (20; the few-shot run must use the same)")
    p.add_argument("--pairs", type=int, default=2000, help="training sentence pairs (2000)")
    p.add_argument("--dev-pairs", type=int, default=300, help="held-out pairs for the best checkpoint (300)")
    p.add_argument("--verbalizer", default=PPT_VERBALIZER, help=f"words of the three pair labels ({PPT_VERBALIZER})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    for name, typ in (("lr", float), ("max-steps", int), ("epochs", float), ("batch-size", int), ("max-eval", int)):
        p.add_argument(f"--{name}", type=typ, help="as in `lmadapt train`")
    p.add_argument("--max-length", type=int, default=128)
    common_args(p)
    p.set_defaults(func=cmd_ppt)
