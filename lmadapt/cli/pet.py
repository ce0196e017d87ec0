"""lmadapt pet: PET / iPET."""
from __future__ import annotations

from pathlib import Path

from .common import DEFAULT_MODEL, parse_method_args, task_from_args, unescape, data_args, common_args


def cmd_pet(a) -> int:
    import lmadapt
    from ..prompting.ensemble import pvps_of
    from ..prompting.pet import PetConfig, run_pet
    task = task_from_args(a)
    pvps = pvps_of(task, a.patterns, [unescape(t) for t in a.template or []], a.verbalizer or [])
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


def register(sub) -> None:
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
    common_args(pt)
    pt.set_defaults(func=cmd_pet)
