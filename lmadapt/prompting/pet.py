"""PET and iPET (Schick & Schuetze 2021): few labeled examples, many unlabeled ones, several PVPs.

PET (generations = 1):
1. one model per PVP, each trained on the k-shot labeled set with its own verbalizer head (any
   method: LoRA is the cheap path, `full` works);
2. the ensemble labels an unlabeled set, drawn from the task's train split (labels removed, the
   labeled examples excluded): the members' scores averaged, weighted by each member's dev
   accuracy (`ensemble='weighted'`; PET's paper weighs by training-set accuracy before training)
   or not (`'mean'`) -> teacher scores (N, C);
3. a final classifier (a configurable method + linear head, as in the paper) is distilled on the
   soft labels: objectives.distillation_kl(student, teacher, T), T = 2.

iPET (generations = G > 1): generation g >= 1 trains one model per PVP again, from the base model,
on the labeled set plus |T| (d^g - 1) examples labeled by a random share (`share`, PET's 25%) of
the OTHER models of generation g - 1: per label in proportion to the labeled set's labels, drawn
without replacement with probability proportional to the ensemble's confidence (candidates are
repeated when a label has too few, as PET does). The training set grows by d = `scale` per
generation: |T_g| = d^g |T| (less, with a warning, when the labeling models predict some label for
no unlabeled example at all, where PET's own code would loop forever). The final classifier distills the last generation's ensemble.

Layout and resuming: OUT/g{g}/p{i}/ is one member's run (result.json, best/ artifact, and
scores.safetensors: its scores on the unlabeled and dev sets); OUT/final/ the distilled
classifier; OUT/result.json every member's, each ensemble's and the final accuracy. A rerun with
the same OUT skips every finished member and resumes an interrupted one from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import sample_kshot, subsample
from ..objectives import distillation_kl
from .ensemble import accuracy_of, average_scores, member_scores


@dataclass(frozen=True)
class PetConfig:
    shots: int = 16                       # labeled examples per class
    patterns: tuple = ()                  # (template, verbalizer) pairs; () = the task's PVPs
    method: str = "lora"
    method_args: dict = field(default_factory=dict)
    final_method: str = "lora"            # the distilled classifier (linear head)
    final_method_args: dict = field(default_factory=dict)
    unlabeled: int = 2000
    generations: int = 1                  # > 1: iPET
    scale: float = 5.0                    # iPET: training set x scale per generation (PET's d)
    share: float = 0.25                   # iPET: share of the other models that label for a model
    temperature: float = 2.0              # distillation
    ensemble: str = "weighted"            # 'weighted' (by dev accuracy) | 'mean'
    dev_limit: int | None = None          # dev examples (a fixed random subset) for selection and reports
    seed: int = 0
    train: dict = field(default_factory=dict)        # TrainConfig keywords for the PVP models
    final_train: dict = field(default_factory=dict)  # ... and for the final classifier

    def __post_init__(self):
        def check(ok, name, why):
            if not ok:
                raise ValueError(f"pet: {name} {why}")
        check(self.shots >= 1, "shots", f"must be >= 1, got {self.shots}")
        check(self.unlabeled >= 1, "unlabeled", f"must be >= 1, got {self.unlabeled}")
        check(self.generations >= 1, "generations", f"must be >= 1, got {self.generations}")
        check(self.scale > 1, "scale", f"must be > 1 (the training set grows), got {self.scale}")
        check(0 < self.share <= 1, "share", f"must be in (0, 1], got {self.share}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.ensemble in ("weighted", "mean"), "ensemble", f"must be weighted or mean, got '{self.ensemble}'")


def split_data(task, cfg: PetConfig, data_root=None):
    """-> (labeled k-shot set, unlabeled set without labels, dev set), fixed by cfg.seed."""
    train = task.load("train", data_root)
    labeled = sample_kshot(train, cfg.shots, cfg.seed)
    taken = {id(ex) for ex in labeled}
    rest = [ex for ex in train if id(ex) not in taken]
    unlabeled = [dataclasses.replace(ex, label=None) for ex in subsample(rest, cfg.unlabeled, seed=cfg.seed)]
    dev = subsample(task.load("dev", data_root), cfg.dev_limit)
    return labeled, unlabeled, dev


def ipet_train_set(labeled, unlabeled, scores, weights, generation: int, member: int, cfg: PetConfig):
    """Member `member`'s training set in generation `generation` >= 1, from the previous
    generation's scores [(N, C)] on `unlabeled` and their weights (see the module docstring)."""
    others = [j for j in range(len(scores)) if j != member]
    if not others:
        raise ValueError("iPET needs at least 2 PVPs: a model's new labels come from the other models")
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + generation * 1_009 + member)
    k = max(1, round(len(others) * cfg.share))
    chosen = [others[int(i)] for i in torch.randperm(len(others), generator=g)[:k]]
    probs = average_scores([scores[j] for j in chosen], [weights[j] for j in chosen]).softmax(-1)   # (N, C)
    conf, pred = probs.max(-1)
    n = len(labeled)
    n_new = int(n * cfg.scale ** generation - n)
    C = probs.shape[1]
    counts = [sum(1 for ex in labeled if ex.label == c) for c in range(C)]
    new = []
    for c in range(C):
        want = int(counts[c] * n_new / n)
        cand = (pred == c).nonzero().flatten()
        if want and not len(cand):
            import warnings
            from .. import LmadaptWarning
            warnings.warn(f"iPET generation {generation}, model {member}: no unlabeled example is labeled "
                          f"{c} by the other models, so none of the {want} wanted is added (the set grows "
                          "less than scale^g; more unlabeled examples or PVPs help)", LmadaptWarning, stacklevel=2)
        if want == 0 or len(cand) == 0:
            continue
        pool = cand.repeat(math.ceil(want / len(cand)))
        pick = pool[torch.multinomial(conf[pool], want, replacement=False, generator=g)]
        new += [dataclasses.replace(unlabeled[int(i)], label=c) for i in pick]
    return list(labeled) + new


def _scores_file(mdir: Path, adapted, unlabeled, dev, opts) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file
    from ..atomic import write_dir
    path = mdir / "scores"
    if (path / "scores.safetensors").exists():
        return load_file(str(path / "scores.safetensors"))
    scores = {"unlabeled": member_scores(adapted, unlabeled, desc="score unlabeled", **opts),
              "dev": member_scores(adapted, dev, desc="score dev", **opts)}
    write_dir(path, lambda tmp: save_file({k: v.contiguous() for k, v in scores.items()},
                                          str(tmp / "scores.safetensors")))
    return scores


def _run(mdir: Path, load_base, attach_to, train_set, dev, task, cfg_train: dict, seed: int, loss=None):
    """Train one model in mdir, or reload it when a previous run finished it; -> (adapted, result).
    attach_to(model, tok) -> Adapted; `loss` replaces its head's loss (distillation)."""
    from ..api import load_adapted, train
    from ..atomic import read_json_file
    model, tok = load_base()
    if (mdir / "result.json").exists() and (mdir / "best" / "method.json").exists():
        return (load_adapted(mdir / "best", model=model, tokenizer=tok),
                read_json_file(mdir / "result.json", f"delete {mdir} to train it again"))
    adapted = attach_to(model, tok)
    if loss is not None:
        adapted.head.loss = loss
    res = train(adapted, task, train_examples=train_set, dev_examples=dev, seed=seed, out=mdir,
                resume=(mdir / "checkpoint").exists(), ood=[], **cfg_train)
    return adapted, res


def distill(load_base, attach_to, task, soft_examples, dev, out, temperature: float, cfg_train: dict,
            seed: int = 0):
    """Train a model (attach_to(model, tok), a linear head) on examples whose labels are teacher
    scores, with distillation_kl at `temperature`; -> (adapted, train result)."""
    return _run(Path(out), load_base, attach_to, soft_examples, dev, task, cfg_train, seed,
                loss=functools.partial(distillation_kl, temperature=temperature))


def run_pet(load_base, task, cfg: PetConfig, out, data_root=None, progress: bool = False) -> dict:
    """PET / iPET on `task`; load_base() -> a fresh (model, tokenizer) for every model trained.
    Writes OUT/result.json; -> the result dict."""
    from ..api import _task, attach, is_main_process
    from ..atomic import write_json
    t, out = _task(task), Path(out)
    pvps = list(cfg.patterns) or list(getattr(t, "pvps", ()))
    if not pvps:
        raise ValueError(f"task '{t.name}' has no default PVPs: give patterns (template, verbalizer)")
    labeled, unlabeled, dev = split_data(t, cfg, data_root)
    dev_labels = [ex.label for ex in dev]
    opts = {"batch_size": cfg.train.get("eval_batch_size", 32), "max_length": cfg.train.get("max_length", 128),
            "precision": cfg.train.get("precision", "auto"), "progress": progress}
    train_cfg = {"progress": progress} | cfg.train
    generations, scores, weights = [], None, None
    for gen in range(cfg.generations):
        members, gen_scores = [], []
        for i, (template, verbalizer) in enumerate(pvps):
            train_set = labeled if gen == 0 else ipet_train_set(labeled, unlabeled, scores, weights, gen, i, cfg)

            def member(model, tok, template=template, verbalizer=verbalizer, i=i):
                return attach(model, cfg.method, task=t, tokenizer=tok, head="verbalizer", template=template,
                              verbalizer=verbalizer, init_seed=cfg.seed + i, **cfg.method_args)
            mdir = out / f"g{gen}" / f"p{i}"
            adapted, _ = _run(mdir, load_base, member, train_set, dev, t, train_cfg, cfg.seed + i)
            s = _scores_file(mdir, adapted, unlabeled, dev, opts)
            gen_scores.append(s)
            members.append({"template": template, "verbalizer": adapted.head.verbalizer.spec(),
                            "n_train": len(train_set), "dev_accuracy": accuracy_of(s["dev"], dev_labels)})
            del adapted
        scores = [s["unlabeled"] for s in gen_scores]
        weights = [m["dev_accuracy"] for m in members] if cfg.ensemble == "weighted" else [1.0] * len(members)
        ens_dev = average_scores([s["dev"] for s in gen_scores], weights)
        generations.append({"generation": gen, "members": members, "ensemble_dev_accuracy": accuracy_of(ens_dev, dev_labels)})
    teacher = average_scores(scores, weights)                                  # (N, C) PET's soft labels
    soft = [dataclasses.replace(ex, label=tuple(row)) for ex, row in zip(unlabeled, teacher.tolist())]

    def classifier(model, tok):
        return attach(model, cfg.final_method, task=t, tokenizer=tok, head="linear", init_seed=cfg.seed,
                      **cfg.final_method_args)
    final, final_res = distill(load_base, classifier, t, soft, dev, out / "final", cfg.temperature,
                               {"progress": progress} | cfg.final_train, cfg.seed)
    final_dev = member_scores(final, dev, desc="final dev", **opts)
    result = {
        "task": t.name, "kind": "ipet" if cfg.generations > 1 else "pet", "shots": cfg.shots,
        "n_labeled": len(labeled), "n_unlabeled": len(unlabeled), "n_dev": len(dev),
        "generations": generations,
        "ensemble": {"dev_accuracy": generations[-1]["ensemble_dev_accuracy"], "weights": cfg.ensemble},
        "final": {"method": cfg.final_method, "dev_accuracy": accuracy_of(final_dev, dev_labels),
                  "distillation_kl": float(distillation_kl(member_scores(final, unlabeled, **opts), teacher,
                                                           cfg.temperature)),
                  "artifact": str(out / "final" / "best"), "train_seconds": final_res.get("train_seconds")},
        "config": dataclasses.asdict(cfg) | {"patterns": [list(p) for p in pvps]},
    }
    if is_main_process():
        write_json(out / "result.json", result)
    return result
