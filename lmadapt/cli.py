"""lmadapt train | eval | pet | predict | tasks | methods.

Every user error (bad data, unknown name, bad argument) prints one line `lmadapt: error: ...`
and exits 2; nothing half-written is left behind (artifacts are written atomically).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


def _value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if "+" in v:  # targets=q_proj+v_proj
        return tuple(p for p in v.split("+") if p)
    return v


def parse_method_args(s: str | None) -> dict:
    """'r=8,alpha=16,targets=q_proj+v_proj' -> {'r': 8, 'alpha': 16, 'targets': ('q_proj', 'v_proj')}"""
    out = {}
    for part in filter(None, (s or "").split(",")):
        if "=" not in part:
            raise ValueError(f"--method-args: '{part}' is not key=value (example: r=8,alpha=16)")
        k, v = part.split("=", 1)
        out[k.strip()] = _value(v.strip())
    return out


def _task_from_args(a):
    from .tasks import get_task, task_from_files
    if getattr(a, "train", None):
        if not a.dev:
            raise ValueError("--train needs --dev too (a file to evaluate on and pick the best checkpoint)")
        if not a.text_col or not a.label_col:
            raise ValueError("--train needs --text-col and --label-col (and --text-pair-col for pairs)")
        return task_from_files(a.train, a.dev, a.text_col, a.label_col, text_pair_col=a.text_pair_col)
    if not a.task:
        raise ValueError("give --task NAME (see `lmadapt tasks`) or --train FILE with --text-col/--label-col")
    return get_task(a.task)


def cmd_train(a) -> int:
    import lmadapt
    from .data import parse_cap, parse_shots
    from .trainer import TrainConfig
    task = _task_from_args(a)
    shots = parse_shots(a.shots)
    for split in ("train", "dev"):  # bad data fails here, before minutes of model loading
        task.load(split, a.data_root)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    method_args = parse_method_args(a.method_args)
    lmadapt.get_method(a.method, **method_args)  # bad method arguments fail before the model loads
    model, tok = lmadapt.load(a.model)
    adapted = lmadapt.attach(model, a.method, task=task, tokenizer=tok, pooling=a.pooling, layer=a.layer,
                             init_seed=a.seed, **_head_args(a), **method_args)
    cfg_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = {k: v for k, v in vars(a).items() if k in cfg_fields and v is not None and k not in ("seed", "max_ood")}
    cfg["progress"] = not a.no_progress
    cfg["max_ood"] = parse_cap(a.max_ood, "--max-ood")
    ood = None if a.ood is None else [t for t in a.ood.split(",") if t]
    result = lmadapt.train(adapted, task, shots=shots, seed=a.seed, data_root=a.data_root, out=a.out,
                           resume=a.resume, max_train=a.max_train, ood=ood, **cfg)
    from .api import is_main_process
    if not is_main_process():
        return 0
    print(summary_table([result]))
    print(f"wrote {Path(a.out) / 'result.json'} and the artifact {Path(a.out) / 'best'}")
    return 0


def _load_run(run: str):
    import lmadapt
    art = Path(run) / "best" if (Path(run) / "best" / "method.json").exists() else Path(run)
    return lmadapt.load_adapted(art)


def _unescape(text: str) -> str:
    """Templates typed in a shell: '\\n' and '\\t' become a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _head_args(a) -> dict:
    """--head/--template/--verbalizer/... -> attach() keywords (one template and verbalizer)."""
    templates, verbalizers = getattr(a, "template", None) or [], getattr(a, "verbalizer", None) or []
    if len(templates) > 1 or len(verbalizers) > 1:
        raise ValueError("several --template/--verbalizer make an ensemble, which only `lmadapt eval` and "
                         "`lmadapt pet` take; give one of each")
    return {"head": a.head, "template": _unescape(templates[0]) if templates else None,
            "verbalizer": verbalizers[0] if verbalizers else None,
            "token_score": a.token_score, "word_combine": a.word_combine}


def cmd_eval(a) -> int:
    import lmadapt
    from .api import eval_record
    from .atomic import write_json
    from .data import subsample
    task = _task_from_args(a) if (a.task or a.train) else None
    if task is None:
        raise ValueError("give --task NAME to evaluate on")
    if a.limit is not None and a.max_eval is not None:
        raise ValueError("give --limit N (the first N examples) or --max-eval N (a random subset), not both")
    templates = [_unescape(t) for t in a.template or []]
    verbalizers = list(a.verbalizer or [])
    ensemble = a.patterns is not None or len(templates) > 1 or len(verbalizers) > 1
    if a.run:
        if templates or verbalizers or a.patterns is not None or a.head:
            raise ValueError("--run evaluates the run's own head (its method.json); --head, --template, "
                             "--verbalizer and --patterns are for zero-shot evaluation without --run")
        adapted = _load_run(a.run)
    else:  # zero-shot: the base model as it is, the LM head classifies
        if (a.head or "verbalizer") != "verbalizer":
            raise ValueError("without --run nothing is trained: zero-shot evaluation needs --head verbalizer")
        model, tok = lmadapt.load(a.model)
        # the head to start from; an ensemble swaps in each member's (prompting.ensemble.use_pvp)
        one = {"template": templates[0] if templates else None,
               "verbalizer": verbalizers[0] if verbalizers else None}
        adapted = lmadapt.attach(model, "none", task=task, tokenizer=tok, head="verbalizer",
                                 token_score=a.token_score, word_combine=a.word_combine, **one)
    examples = task.load(a.split, a.data_root)
    opts = dict(batch_size=a.batch_size, precision=a.precision, progress=not a.no_progress)
    extra = {"calibrated": bool(a.calibrate)}
    if ensemble:
        from .prompting.ensemble import evaluate_pvps, pvps_of
        pvps = pvps_of(task, a.patterns, templates, verbalizers)
        used = examples[:a.limit] if a.limit is not None else subsample(examples, a.max_eval)
        weigh = subsample(task.load(a.weight_split, a.data_root), a.weight_limit) if a.ensemble == "weighted" else None
        res = evaluate_pvps(adapted, task, pvps, used, mode=a.ensemble, weight_examples=weigh,
                            calibrate=a.calibrate, **opts)
        metrics = {"accuracy": res["ensemble"]["accuracy"], "n": len(used), "n_available": len(examples)}
        extra |= res
    else:
        if a.calibrate:
            from .prompting import calibrate
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


def cmd_pet(a) -> int:
    import lmadapt
    from .prompting.ensemble import pvps_of
    from .prompting.pet import PetConfig, run_pet
    task = _task_from_args(a)
    pvps = pvps_of(task, a.patterns, [_unescape(t) for t in a.template or []], a.verbalizer or [])
    method_args, final_args = parse_method_args(a.method_args), parse_method_args(a.final_method_args)
    lmadapt.get_method(a.method, **method_args)  # bad arguments fail before any model loads
    lmadapt.get_method(a.final_method, **final_args)
    opts = {"precision": a.precision, "max_length": a.max_length, "batch_size": a.batch_size}
    member = {k: v for k, v in (("lr", a.lr), ("epochs", a.epochs), ("max_steps", a.max_steps)) if v is not None}
    final = {k: v for k, v in (("lr", a.final_lr), ("epochs", a.final_epochs), ("max_steps", a.final_max_steps))
             if v is not None}
    cfg = PetConfig(shots=a.shots, patterns=tuple(pvps), method=a.method, method_args=method_args,
                    final_method=a.final_method, final_method_args=final_args, unlabeled=a.unlabeled,
                    generations=a.generations, scale=a.scale, temperature=a.temperature, ensemble=a.ensemble,
                    dev_limit=a.max_eval, seed=a.seed, train=opts | member, final_train=opts | final)
    res = run_pet(lambda: lmadapt.load(a.model), task, cfg, a.out, data_root=a.data_root, progress=not a.no_progress)
    for g in res["generations"]:
        for i, m in enumerate(g["members"]):
            print(f"g{g['generation']} p{i}: dev accuracy {m['dev_accuracy']:.2f} ({m['n_train']} train)  {m['template']!r}")
        print(f"g{g['generation']} ensemble: dev accuracy {g['ensemble_dev_accuracy']:.2f}")
    print(f"final ({res['final']['method']}, distilled): dev accuracy {res['final']['dev_accuracy']:.2f}")
    print(f"wrote {Path(a.out) / 'result.json'}")
    return 0


def read_inputs(path: str) -> list:
    """Plain text (one example per line), or .jsonl/.json/.tsv/.csv with a `text` (and optional
    `text_pair`) column."""
    from .data import DataError, Example, read_rows
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: does not exist")
    if p.suffix in (".jsonl", ".json", ".tsv", ".csv"):
        rows = read_rows(p, required=("text",))
        return [Example(text=str(r["text"]), text_pair=r.get("text_pair")) for _, r in rows]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # else the message would not say which file
        raise DataError(f"{path}: is not UTF-8 text (bad byte at offset {e.start})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty file")
    return [Example(text=ln) for ln in lines]


def cmd_predict(a) -> int:
    import lmadapt
    from .tasks import get_task
    inputs = read_inputs(a.input)  # a bad input file fails before seconds of model loading
    adapted = _load_run(a.run)
    task = get_task(a.task) if a.task else _task_of_run(a.run, adapted)
    for p in lmadapt.predict(adapted, task, inputs, batch_size=a.batch_size, precision=a.precision,
                             progress=not a.no_progress):
        print(p)
    return 0


def _task_of_run(run: str, adapted):
    from .tasks import get_task
    res = Path(run) / "result.json"
    if res.exists():
        from .atomic import read_json_file
        name = (read_json_file(res, "pass --task, or train the run again") or {}).get("task")
        try:
            return get_task(name)
        except ValueError:
            pass
    if adapted.num_labels:
        from .tasks import Task
        return Task(name="run", kind="classification", label_names=tuple(adapted.label_names),
                    metric="accuracy", splits={"none": lambda root: []}, uses_data_root=False)
    raise ValueError(f"{run}: cannot tell which task this run was trained on; pass --task")


def cmd_tasks(a) -> int:
    from .tasks import list_tasks
    rows = list_tasks()
    join = lambda v: (v if isinstance(v, str) else ",".join(v)) or "-"  # noqa: E731
    print(_table([[r["name"], r["kind"], join(r["labels"]), r["metric"], join(r["splits"])]
                  for r in rows], ["task", "kind", "labels", "metric", "splits"]))
    return 0


def cmd_methods(a) -> int:
    from .methods import METHODS
    rows = []
    for name, cls in sorted(METHODS.items()):
        args = ", ".join(f"{f.name}={f.default if f.default is not dataclasses.MISSING else '?'}"
                         for f in dataclasses.fields(cls))
        rows.append([name, cls.summary, args or "-", "yes" if cls.supports_slots else "no",
                     f"{cls.default_lr:g}", f"{cls.default_epochs:g}"])
    print(_table(rows, ["method", "what", "args (defaults)", "slots", "lr", "epochs"]))
    return 0


def _table(rows, header) -> str:
    cols = list(zip(*([header] + rows))) if rows else [[h] for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def summary_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        m = r["metrics"]
        evals = "  ".join(f"{k}: {', '.join(f'{mk}={mv:.2f}' for mk, mv in v.items() if mk not in ('n', 'n_available'))}"
                          for k, v in m.items())
        rows.append([r["method"], r["task"], f"{r['trainable_percent']:.3f}%",
                     f"{(r['bytes_on_disk'] or 0) / 1e6:.2f} MB", f"{r['train_seconds']:.0f}s",
                     f"{r['peak_memory_mb']:.0f} MB", evals])
    return _table(rows, ["method", "task", "trainable", "stored", "train", "peak mem", "metrics"])


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL
    from .precision import PRECISIONS
    p = argparse.ArgumentParser(prog="lmadapt", description="Adapt a pretrained language model to a task.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def data_args(sp, train_file=True):
        sp.add_argument("--task", help="a task name (see `lmadapt tasks`)")
        sp.add_argument("--data-root", help="datasets folder (default: $LMADAPT_DATA or ../shared/data)")
        if train_file:
            sp.add_argument("--train", help="your own training file (.tsv/.csv/.jsonl/.json) instead of --task")
        else:
            sp.add_argument("--train", help="the training file the run used (for its label set)")
        sp.add_argument("--dev", help="your own dev file")
        sp.add_argument("--text-col", help="column holding the text")
        sp.add_argument("--text-pair-col", help="column holding the second text of a pair")
        sp.add_argument("--label-col", help="column holding the label")

    def prompt_args(sp, many=False):
        sp.add_argument("--head", choices=["linear", "mlp", "verbalizer"],
                        help="classification head; default: verbalizer for a causal LM on a task with default "
                             "patterns (not with probe), else linear")
        more = " (repeat it: an ensemble over every template x verbalizer)" if many else ""
        sp.add_argument("--template", action="append", help="verbalizer head's pattern, e.g. "
                        "'{text} It was {mask}.' (fields {text} {text_pair} {mask} {soft:N}; \\n = newline)" + more)
        sp.add_argument("--verbalizer", action="append", help="label words, e.g. "
                        "'negative=terrible|bad,positive=great|good' (default: the task's)" + more)
        sp.add_argument("--token-score", choices=["sum", "mean"], default="sum",
                        help="multi-token word: sum (its log-prob) or mean of its token log-probs (sum)")
        sp.add_argument("--word-combine", choices=["mean", "logsumexp"], default="mean",
                        help="several words per label: mean log-prob or logsumexp (mean)")

    def common(sp):
        sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    t = sub.add_parser("train", help="train a method on a task; writes OUT/result.json and OUT/best/",
                       description="Train a method on a task, keep the best dev checkpoint, evaluate on dev and "
                                   "out-of-domain sets. Example: lmadapt train --task sst2 --method probe --out runs/x")
    t.add_argument("--model", default=DEFAULT_MODEL, help=f"packaged name or local HF dir (default {DEFAULT_MODEL})")
    data_args(t)
    t.add_argument("--method", default="probe", help="see `lmadapt methods` (default probe)")
    t.add_argument("--method-args", help="k=v,... e.g. r=8,alpha=16,targets=q_proj+v_proj")
    t.add_argument("--shots", default="full", help="examples per class (k-shot, class-balanced) or 'full'")
    t.add_argument("--max-train", type=int, help="random subset of the training set of this size")
    t.add_argument("--seed", type=int, default=0, help="seeds the data order, k-shot sample and initial weights (0)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint after a crash")
    t.add_argument("--pooling", choices=["cls", "mean", "last"], help="classification pooling (default last/mean)")
    t.add_argument("--layer", type=int, default=-1, help="hidden layer fed to the head (default -1: last)")
    prompt_args(t)
    g = t.add_argument_group("optimization (defaults: the method's own, see `lmadapt methods`)")
    for name, typ, text in [
            ("lr", float, "peak learning rate of AdamW (default: the method's)"),
            ("epochs", float, "passes over the training set (default: the method's, e.g. 1; probe 30)"),
            ("max-steps", int, "optimizer steps; overrides --epochs"),
            ("batch-size", int, "GLOBAL examples per optimizer step, across processes and accumulation (8)"),
            ("grad-accum", int, "micro-batches per optimizer step (1)"),
            ("warmup-ratio", float, "fraction of steps with linear warmup (0.06), then linear decay to 0"),
            ("weight-decay", float, "AdamW weight decay (0)"),
            ("eval-every", int, "steps between dev evaluations; the best is kept (default: once per epoch)"),
            ("save-every", int, "steps between resumable checkpoints (default: --eval-every)"),
            ("max-length", int, "tokens per input, longer ones truncated (128)"),
            ("max-eval", int, "dev examples used by every dev evaluation, the final one included: a fixed "
                              "random subset (default: all)")]:
        g.add_argument(f"--{name}", type=typ, help=text)
    t.add_argument("--ood", help="comma-separated out-of-domain tasks to evaluate (default: the task's own)")
    t.add_argument("--max-ood", default="500", help="examples per out-of-domain set, a fixed random subset, "
                                                    "or 'all' (default 500)")
    common(t)
    t.set_defaults(func=cmd_train)

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
    common(e)
    e.set_defaults(func=cmd_eval)

    pt = sub.add_parser("pet", help="PET / iPET: PVP models on k shots, ensemble soft labels, distilled classifier",
                        description="Schick & Schuetze 2021. Example: lmadapt pet --task sst2 --shots 16 --method lora "
                                    "--unlabeled 2000 --out runs/pet (add --generations 3 for iPET). Resumable: rerun "
                                    "with the same --out.")
    pt.add_argument("--model", default=DEFAULT_MODEL)
    data_args(pt)
    pt.add_argument("--shots", type=int, default=16, help="labeled examples per class (16)")
    pt.add_argument("--patterns", help="the task's PVPs by index ('0,1,2') or 'all' (default)")
    pt.add_argument("--template", action="append", help="instead of --patterns: templates (x --verbalizer)")
    pt.add_argument("--verbalizer", action="append", help="instead of --patterns: verbalizers (x --template)")
    pt.add_argument("--method", default="lora", help="method of the PVP models (lora)")
    pt.add_argument("--method-args", help="k=v,... for --method")
    pt.add_argument("--final-method", default="lora", help="method of the distilled classifier, linear head (lora)")
    pt.add_argument("--final-method-args", help="k=v,... for --final-method")
    pt.add_argument("--unlabeled", type=int, default=2000, help="unlabeled examples from the train split (2000)")
    pt.add_argument("--generations", type=int, default=1, help="1: PET; more: iPET generations")
    pt.add_argument("--scale", type=float, default=5.0, help="iPET: training set growth per generation (5)")
    pt.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (2)")
    pt.add_argument("--ensemble", choices=["weighted", "mean"], default="weighted",
                    help="soft labels: members weighted by dev accuracy (PET) or equal")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--out", required=True)
    for name, typ in (("lr", float), ("epochs", float), ("max-steps", int), ("final-lr", float),
                      ("final-epochs", float), ("final-max-steps", int)):
        pt.add_argument(f"--{name}", type=typ, help=f"{name.replace('final-', '')} of the "
                        f"{'final classifier' if name.startswith('final') else 'PVP models'} (default: the method's)")
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--max-length", type=int, default=128)
    pt.add_argument("--max-eval", type=int, help="dev examples (a fixed random subset) for selection and reports")
    common(pt)
    pt.set_defaults(func=cmd_pet)

    pr = sub.add_parser("predict", help="predict labels / generate text for an input file",
                        description="Input: a text file (one example per line) or .jsonl/.tsv/.csv with a "
                                    "'text' column. Example: lmadapt predict --run runs/x --input reviews.txt")
    pr.add_argument("--run", required=True)
    pr.add_argument("--input", required=True)
    pr.add_argument("--task", help="task (default: the run's)")
    pr.add_argument("--batch-size", type=int, default=32)
    common(pr)
    pr.set_defaults(func=cmd_predict)

    sub.add_parser("tasks", help="list the tasks").set_defaults(func=cmd_tasks)
    sub.add_parser("methods", help="list the methods and their arguments").set_defaults(func=cmd_methods)
    return p


def quiet_third_party() -> None:
    """A user's command prints lmadapt's own output only: third-party Python warnings and
    transformers' info logging and weight-loading bars are filtered here, at the edge, not in the
    library (a library user keeps them). lmadapt's own warnings still show."""
    import warnings

    from . import LmadaptWarning
    # By category, not module: a deprecation warning is attributed to its caller's frame. A user
    # who asks for warnings (python -W ..., PYTHONWARNINGS) gets them.
    if not sys.warnoptions:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", category=LmadaptWarning)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    quiet_third_party()
    from .data import DataError
    from .models import ModelError
    try:
        return a.func(a)
    except (DataError, ModelError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lmadapt: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
