"""The public API: attach, train, evaluate, predict, load_adapted."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from . import __version__
from .adapted import Adapted, check_base, read_artifact
from .atomic import write_json
from .batching import is_classification
from .data import sample_kshot, subsample
from .evaluation import evaluate_examples, predict_examples
from .methods import METHODS, Method, get_method
from .trainer import TrainConfig, fit


def _task(task):
    from .tasks import get_task
    return get_task(task) if isinstance(task, str) else task


def attach(model, method: str | Method, *, task=None, tokenizer=None, slots: int = 1,
           num_labels: int | None = None, label_names=None, pooling: str | None = None, layer: int = -1,
           head: str | None = None, template: str | None = None, verbalizer=None, token_score: str = "sum",
           word_combine: str = "mean", head_options: dict | None = None, init_seed: int | None = None,
           **method_args) -> Adapted:
    """Attach a method to a loaded model. With a classification `task` (or `num_labels`) a head is
    added; otherwise the model keeps its LM head (generation tasks). `init_seed` fixes the initial
    weights of the head and the method (a method's own `seed` argument, if any, is separate).

    head: 'linear' | 'mlp' | 'verbalizer' (lmadapt.prompting: the LM head scores label words at
    the template's mask). None picks the verbalizer for a causal LM on a task with default patterns
    (Task.pvps) or when a `template` is given, unless the method is `probe`; else 'linear'. The
    verbalizer's template and verbalizer default to the task's first pattern-verbalizer pair.
    With a template holding {soft:N} and method 'prompt'/'ptuning', k defaults to N.

    Learned verbalizers (lmadapt.prompting): head 'knowledgeable' | 'soft' | 'prototypical', or a
    verbalizer spec with the kind in front ('soft:negative=terrible,positive=great') or a .json head
    spec (`lmadapt prompt-search` writes them). `head_options`: more arguments of that head."""
    if init_seed is not None:
        torch.manual_seed(init_seed)
    if isinstance(method, Method) and method_args:
        raise ValueError("pass method arguments either in the Method object or as keywords, not both")
    t = _task(task) if task is not None else None
    if t is not None and is_classification(t):
        num_labels, label_names = len(t.label_names), list(t.label_names)
    cls = type(method) if isinstance(method, Method) else METHODS.get(method)
    kind, head_args = _resolve_head(model, cls, t, head, template, verbalizer, token_score, word_combine,
                                    num_labels, label_names, head_options)
    from .prompting.verbalizer import VERBALIZER_KINDS
    import dataclasses
    if kind in VERBALIZER_KINDS and isinstance(method, str) and cls is not None and cls.virtual_tokens \
            and "k" not in method_args and "k" in {f.name for f in dataclasses.fields(cls)}:
        from .prompting import Template
        n_soft = Template(head_args["template"]).n_soft
        if n_soft:
            method_args["k"] = n_soft
    m = method if isinstance(method, Method) else get_method(method, **method_args)
    return Adapted(model, m, slots=slots, num_labels=num_labels, label_names=label_names,
                   pooling=pooling, layer=layer, head=kind, head_args=head_args, tokenizer=tokenizer)


def _resolve_head(model, method_cls, task, head, template, verbalizer, token_score, word_combine,
                  num_labels, label_names, head_options=None) -> tuple[str, dict]:
    """-> (head kind, its arguments), with the defaults described in attach()."""
    from .models import is_causal
    from .prompting.verbalizer import VERBALIZER_KINDS, split_kind
    pvps = getattr(task, "pvps", ()) if task is not None else ()
    frozen = method_cls is not None and method_cls.frozen_features
    extra = {}
    if verbalizer is not None:
        named, verbalizer, extra = split_kind(verbalizer)
        if named is not None:
            if head not in (None, "verbalizer", named):
                raise ValueError(f"--verbalizer names the kind '{named}' but --head is '{head}'; give one of them")
            head = named
    if head is None:
        prompted = template is not None or (bool(pvps) and is_causal(model))
        head = "verbalizer" if prompted and num_labels and not frozen else "linear"
    if head not in VERBALIZER_KINDS:
        if head_options:
            raise ValueError(f"head '{head}' takes no head options (got {', '.join(sorted(head_options))})")
        if template is not None or verbalizer is not None:
            raise ValueError(f"template/verbalizer belong to the verbalizer head, not head '{head}'; "
                             "pass head='verbalizer' (--head verbalizer)")
        return head, {}
    if not num_labels:
        raise ValueError(f"the {head} head classifies: attach with a classification task (task=...) or "
                         "label_names=[...]")
    if template is None:
        if not pvps:
            name = getattr(task, "name", None)
            raise ValueError(f"task '{name}' has no default pattern: pass a template, e.g. "
                             "template='{text} It was {mask}.' (--template), and a verbalizer")
        template = pvps[0][0]
    if verbalizer is None:
        from .prompting import Verbalizer
        verbalizer = pvps[0][1] if pvps else Verbalizer.from_label_names(label_names).spec()
    return head, {"template": template, "verbalizer": verbalizer, "token_score": token_score,
                  "word_combine": word_combine} | extra | dict(head_options or {})


def load_adapted(directory, model=None, tokenizer=None, slots: int = 1) -> Adapted:
    """Rebuild an Adapted model from an artifact folder (method.json + safetensors). The base
    model is loaded from the name recorded in the artifact unless `model` is given (or, for an
    artifact trained on an earlier stage's merged model, meta['init'], that stage rebuilt). The head is
    rebuilt from its record (a verbalizer's template, words and calibration included)."""
    from .models import load
    meta, state = read_artifact(directory)
    if model is None and meta.get("init"):
        # Trained on an earlier stage's model (alignment: DPO / PPO on the SFT model): rebuild it.
        earlier = load_adapted(meta["init"])
        model, tokenizer = earlier.merged_model(), earlier.tokenizer
    elif model is None:
        model, tokenizer = load(meta["base_model"]["name"])
    check_base(meta, model, str(directory))
    head = meta["head"]
    head_args = {k: v for k, v in head.items() if k not in ("num_labels", "label_names", "pooling", "layer", "kind")}
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["args"].items()}
    method = get_method(meta["method"], **args)
    build = method
    if str(args.get("init", "")).startswith("pretrained:"):
        # A pre-trained init (PPT) is not read again: the artifact's own table replaces it, so the
        # folder it came from need not exist any more. method.json keeps where it came from.
        import dataclasses
        build = dataclasses.replace(method, init="random")
    adapted = Adapted(model, build, slots=slots,
                      num_labels=head["num_labels"], label_names=head["label_names"],
                      pooling=head["pooling"], layer=head["layer"], head=head["kind"], head_args=head_args,
                      tokenizer=tokenizer)
    adapted.method = method
    adapted.load_state(state, 0)
    adapted.init = meta.get("init")
    adapted.eval()
    return adapted


def train(adapted: Adapted, task, *, train_examples=None, dev_examples=None, shots=None, seed: int = 0,
          data_root=None, out=None, resume: bool = False, max_train: int | None = None,
          ood: list[str] | None = None, features=None, objective=None, **config) -> dict:
    """Train on a task's train split (k-shot if `shots`), keep the best dev checkpoint, evaluate
    on dev and on the out-of-domain tasks, and write out/result.json. -> the result dict.
    `objective`: what a step optimizes (trainer.Objective; default the task's own loss)."""
    t = _task(task)
    cfg = TrainConfig(seed=seed, **config)
    if train_examples is None:
        train_examples = t.load("train", data_root)
    train_examples = sample_kshot(train_examples, shots, seed) if shots else list(train_examples)
    if max_train and len(train_examples) > max_train:
        g = torch.Generator().manual_seed(seed)
        train_examples = [train_examples[i] for i in torch.randperm(len(train_examples), generator=g)[:max_train]]
    if dev_examples is None:
        dev_examples = t.load("dev", data_root)
    summary = fit(adapted, t, train_examples, dev_examples, cfg, Path(out) if out else None, resume, features,
                  objective)
    # The restored best checkpoint was evaluated on the same (capped) dev set already.
    best = summary["best_eval"]
    metrics = {}
    if best is not None:
        metrics["dev"] = {k: v for k, v in best.items() if k != "step"} | {
            "n": summary["n_dev"], "n_available": len(dev_examples)}
    opts = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                precision=cfg.precision, progress=cfg.progress and is_main_process())
    for name in (ood if ood is not None else list(getattr(t, "ood", ()))):
        # An eval-only set with no dev split (webnlg_seen / webnlg_unseen) is scored on its test split.
        split = "dev" if "dev" in _task(name).splits else "test"
        metrics[name] = evaluate(adapted, name, split=split, data_root=data_root, limit=cfg.max_ood, **opts)
    result = build_result(adapted, t, metrics, summary, shots=shots, seed=seed,
                          n_train=len(train_examples), out=out)
    if out and is_main_process():
        write_json(Path(out) / "result.json", result)
    return result


def is_main_process() -> bool:
    from accelerate import PartialState
    return PartialState().is_main_process


def evaluate(adapted: Adapted, task, *, split: str = "dev", examples=None, data_root=None,
             batch_size: int = 32, max_new_tokens: int = 48, max_length: int = 128, limit: int | None = None,
             first: int | None = None, precision: str = "auto", progress: bool = False,
             num_beams: int | None = None) -> dict:
    """Metrics on a task's split (or on `examples`), on at most `limit` of them (a fixed-seed
    random subset, see data.subsample) or on the `first` N; -> metrics | {'n': used,
    'n_available': in the split}."""
    t = _task(task)
    if examples is None:
        examples = t.load(split, data_root)
    if is_classification(t) and adapted.num_labels is not None and len(t.label_names) != adapted.num_labels:
        raise ValueError(f"task '{t.name}' has {len(t.label_names)} labels but the model's head has "
                         f"{adapted.num_labels}")
    if first is not None and limit is not None:
        raise ValueError("evaluate on the first N examples or on a random subset of N (limit), not both")
    used = list(examples)[:first] if first is not None else subsample(examples, limit)
    enc = adapted.input_encoder(max_length)
    metrics = evaluate_examples(adapted, t, used, enc, batch_size, max_new_tokens, precision=precision,
                                progress=progress, num_beams=num_beams)
    return metrics | {"n": len(used), "n_available": len(examples)}


def predict(adapted: Adapted, task, examples, batch_size: int = 32, max_new_tokens: int = 48,
            max_length: int = 128, precision: str = "auto", progress: bool = False) -> list:
    """Label names for classification, generated text for generation tasks."""
    t = _task(task)
    enc = adapted.input_encoder(max_length)
    preds = predict_examples(adapted, t, examples, enc, batch_size, max_new_tokens, precision=precision,
                             progress=progress)
    if is_classification(t):
        return [adapted.label_names[p] for p in preds]
    return preds


def build_result(adapted: Adapted, task, metrics: dict, summary: dict, *, shots, seed, n_train, out) -> dict:
    import transformers
    trainable = summary.get("trainable_params") or adapted.num_trainable()
    # full: the base weights are among the trainable ones (plus the head): 100%
    total = trainable if adapted.method.name == "full" else adapted.num_base() + trainable
    artifact = Path(out) / "best" if out else None
    return {
        "model": adapted.model.config.lmadapt_name if hasattr(adapted.model.config, "lmadapt_name")
        else adapted.model.config.model_type,
        "task": task.name, "method": adapted.method.name, "method_args": adapted.method.to_dict(),
        "shots": shots if shots else "full", "seed": seed, "n_train": n_train,
        "metrics": metrics,
        "trainable_params": trainable, "trainable_percent": 100.0 * trainable / total,
        "bytes_on_disk": sum(f.stat().st_size for f in artifact.iterdir()) if artifact and artifact.exists() else None,
        "train_seconds": summary["train_seconds"], "examples_per_second": summary["examples_per_second"],
        "peak_memory_mb": summary["peak_memory_mb"], "added_memory_mb": summary["added_memory_mb"],
        "best_dev": summary["best_dev"], "best_step": summary["best_step"], "steps": summary["steps"],
        "processes": summary["processes"], "lr": summary["lr"], "train_config": summary["config"],
        "history": summary["history"], "evals": summary["evals"],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "precision": summary.get("precision"), "precision_requested": summary["config"].get("precision"),
        "versions": {"lmadapt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def eval_record(adapted: Adapted, task, split: str, metrics: dict, **extra) -> dict:
    """What `lmadapt eval --out DIR` writes to DIR/result.json: the model, method, head (a
    verbalizer's template and words), split and metrics, plus `extra` (ensemble members, ...)."""
    import transformers
    t = _task(task)
    return {
        "model": getattr(adapted.model.config, "lmadapt_name", adapted.model.config.model_type),
        "task": t.name, "split": split, "method": adapted.method.name, "method_args": adapted.method.to_dict(),
        "head": adapted.meta()["head"], "metrics": {split: metrics}, **extra,
        "versions": {"lmadapt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
