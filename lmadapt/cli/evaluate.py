"""lmadapt eval: a trained run, or a model zero-shot with the verbalizer head (ensembles too)."""
from __future__ import annotations

import json
from pathlib import Path

from .common import DEFAULT_MODEL, parse_method_args, task_from_args, load_run, unescape, data_args, prompt_args, common_args


def cmd_eval(a) -> int:
    import lmadapt
    from ..api import eval_record
    from ..atomic import write_json
    from ..data import subsample
    task = task_from_args(a) if (a.task or a.train) else None
    if task is None:
        raise ValueError("give --task NAME to evaluate on")
    if a.limit is not None and a.max_eval is not None:
        raise ValueError("give --limit N (the first N examples) or --max-eval N (a random subset), not both")
    templates = [unescape(t) for t in a.template or []]
    verbalizers = list(a.verbalizer or [])
    ensemble = a.patterns is not None or len(templates) > 1 or len(verbalizers) > 1
    if a.run:
        if templates or verbalizers or a.patterns is not None or a.head:
            raise ValueError("--run evaluates the run's own head (its method.json); --head, --template, "
                             "--verbalizer and --patterns are for zero-shot evaluation without --run")
        adapted = load_run(a.run)
    else:  # zero-shot: the base model as it is, the LM head classifies
        if (a.head or "verbalizer") not in ("verbalizer", "knowledgeable"):
            raise ValueError("without --run nothing is trained: zero-shot evaluation needs --head verbalizer "
                             "(or knowledgeable)")
        model, tok = lmadapt.load(a.model)
        # the head to start from; an ensemble swaps in each member's (prompting.ensemble.use_pvp)
        one = {"template": templates[0] if templates else None,
               "verbalizer": verbalizers[0] if verbalizers else None}
        adapted = lmadapt.attach(model, "none", task=task, tokenizer=tok, head=a.head or "verbalizer",
                                 token_score=a.token_score, word_combine=a.word_combine,
                                 head_options=parse_method_args(a.head_args) or None, **one)
    examples = task.load(a.split, a.data_root)
    opts = dict(batch_size=a.batch_size, precision=a.precision, progress=not a.no_progress)
    extra = {"calibrated": bool(a.calibrate)}
    if ensemble:
        from ..prompting.ensemble import evaluate_pvps, pvps_of
        pvps = pvps_of(task, a.patterns, templates, verbalizers)
        used = examples[:a.limit] if a.limit is not None else subsample(examples, a.max_eval)
        weigh = subsample(task.load(a.weight_split, a.data_root), a.weight_limit) if a.ensemble == "weighted" else None
        res = evaluate_pvps(adapted, task, pvps, used, mode=a.ensemble, weight_examples=weigh,
                            calibrate=a.calibrate, **opts)
        metrics = {"accuracy": res["ensemble"]["accuracy"], "n": len(used), "n_available": len(examples)}
        extra |= res
    else:
        if a.calibrate:
            from ..prompting import calibrate
            calibrate(adapted, precision=a.precision)
        metrics = lmadapt.evaluate(adapted, task, examples=examples, first=a.limit, limit=a.max_eval, **opts)
    report = {"task": task.name, "split": a.split, **metrics, **extra}
    print(json.dumps(report, indent=2))
    if a.run and Path(a.run).is_dir():
        write_json(Path(a.run) / f"eval-{task.name}-{a.split}.json", report)
    if a.out:
        write_json(Path(a.out) / "result.json", eval_record(adapted, task, a.split, metrics, **extra))
        print(f"wrote {Path(a.out) / 'result.json'}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a trained run, or a model zero-shot with the verbalizer head",
                       description="Examples: lmadapt eval --run runs/x --task imdb | lmadapt eval --model smollm2-135m "
                                   "--task sst2 --head verbalizer --calibrate --limit 200 | lmadapt eval --task sst2 "
                                   "--patterns all")
    e.add_argument("--run", help="run folder (or artifact folder); without it: zero-shot prompting of --model")
    e.add_argument("--model", default=DEFAULT_MODEL, help=f"zero-shot: packaged name or local HF dir ({DEFAULT_MODEL})")
    data_args(e, train_file=False)
    e.add_argument("--split", default="dev")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-eval", type=int, help="evaluate a fixed random subset of this size (default: all)")
    e.add_argument("--limit", type=int, help="evaluate the first N examples of the split")
    e.add_argument("--out", help="folder to write result.json into")
    prompt_args(e, many=True)
    e.add_argument("--calibrate", action="store_true",
                   help="contextual calibration (Zhao et al. 2021): divide by the label probabilities of 'N/A', '', '[MASK]'")
    e.add_argument("--patterns", help="ensemble of the task's PVPs by index ('0,2') or 'all'; reports each member")
    e.add_argument("--ensemble", choices=["mean", "weighted", "vote"], default="mean",
                   help="mean probabilities (default), weighted by each member's accuracy on --weight-split, or vote")
    e.add_argument("--weight-split", default="train", help="weighted ensembles: labeled split the weights come from")
    e.add_argument("--weight-limit", type=int, default=200, help="weighted ensembles: examples of --weight-split (200)")
    common_args(e)
    e.set_defaults(func=cmd_eval)
