"""lmadapt ipt: find an intrinsic prompt subspace (IPT, Qin et al. 2021) - prompt tuning on each
training task, then the auto-encoder over their prompts (reconstruction + the tasks' own losses);
OUT/decoder is what `lmadapt train --method ipt --method-args decoder=OUT/decoder` tunes d numbers
in. Both stages resume: rerun the same command after a kill, or with more --steps to extend."""
from __future__ import annotations

from .common import DEFAULT_MODEL, common_args


def cmd_ipt(a) -> int:
    import lmadapt
    from ..api import _task
    from ..prompting.ipt import fit_autoencoder, train_prompts
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    tasks = [_task(t) for t in dict.fromkeys(names)]                 # an unknown name fails before any loading
    if len(tasks) < 2:
        raise ValueError(f"--tasks {a.tasks!r}: a shared subspace needs at least two different training tasks")
    model, tok = lmadapt.load(a.model)
    cfg = {k: v for k, v in (("lr", a.prompt_lr), ("max_eval", a.max_eval)) if v is not None}
    prompts = train_prompts(model, tok, tasks, a.out, k=a.k, max_train=a.max_train, seed=a.seed,
                            data_root=a.data_root, max_steps=a.prompt_steps, batch_size=a.batch_size,
                            max_length=a.max_length, precision=a.precision, progress=not a.no_progress,
                            eval_every=a.prompt_steps, save_every=a.checkpoint_every, **cfg)
    res = fit_autoencoder(model, tok, tasks, prompts, a.out, d=a.d, width=a.width, steps=a.steps, lr=a.lr,
                          recon=a.recon, recon_weight=a.recon_weight, recon_warmup=a.recon_warmup,
                          batch_size=a.batch_size, max_train=a.max_train, max_length=a.max_length, seed=a.seed,
                          data_root=a.data_root, precision=a.precision, progress=not a.no_progress,
                          checkpoint_every=a.checkpoint_every)
    if res["resumed_from"]:
        print(f"resumed the auto-encoder from joint step {res['resumed_from']}")
    errors = ", ".join(f"{n} {v:.3g}" for n, v in res["recon_relative"].items())
    print(f"reconstruction error relative to each prompt's mean square: {errors}")
    print(f"wrote {res['decoder']}: tune a held-out task with --method ipt --method-args decoder={res['decoder']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("ipt", help="find an intrinsic prompt subspace from several tasks' prompts (IPT)",
                       description="Qin et al. 2021. Example: lmadapt ipt --tasks rte,mnli,squad,xsum,e2e_nlg --d 5 "
                                   "--out runs/ipt; then lmadapt train --task sst2 --method ipt "
                                   "--method-args decoder=runs/ipt/decoder ...")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tasks", required=True, help="the training tasks, comma-separated (at least two)")
    p.add_argument("--data-root")
    p.add_argument("--out", required=True, help="OUT/prompts/TASK (one prompt run per task), OUT/decoder")
    p.add_argument("--k", type=int, default=20, help="soft tokens per prompt (20)")
    p.add_argument("--prompt-steps", type=int, default=500, help="prompt-tuning steps per task (500)")
    p.add_argument("--prompt-lr", type=float, help="prompt tuning's lr (default: the prompt method's)")
    p.add_argument("--max-train", type=int, default=1000, help="training examples per task, a seeded subset (1000)")
    p.add_argument("--max-eval", type=int, default=200,
                   help="dev examples, a fixed subset, for each prompt run's one evaluation at its end (200)")
    p.add_argument("--d", type=int, default=5, help="the subspace's dimension (5)")
    p.add_argument("--width", type=int, default=256, help="the back-projection's hidden width (256)")
    p.add_argument("--steps", type=int, default=2000, help="joint auto-encoder steps, one task per step (2000)")
    p.add_argument("--lr", type=float, default=1e-3, help="the auto-encoder's lr (1e-3)")
    p.add_argument("--recon", choices=["relative", "mse"], default="relative",
                   help="reconstruction loss: relative to the prompts' mean square, or plain MSE (relative)")
    p.add_argument("--recon-weight", type=float, default=1.0)
    p.add_argument("--recon-warmup", type=int, default=500, help="reconstruction-only steps first (500)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between resumable checkpoints, of the prompt runs and of the auto-encoder (100; "
                        "0: the auto-encoder keeps none, a prompt run one per evaluation)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    common_args(p)
    p.set_defaults(func=cmd_ipt)
