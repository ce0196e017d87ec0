"""Shared by the commands: option parsing helpers, option groups, the task from the options, tables."""
from __future__ import annotations

from pathlib import Path

from ..models import DEFAULT_MODEL
from ..precision import PRECISIONS


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


def task_from_args(a):
    from ..tasks import get_task, task_from_files
    if getattr(a, "train", None):
        if not a.dev:
            raise ValueError("--train needs --dev too (a file to evaluate on and pick the best checkpoint)")
        if not a.text_col or not a.label_col:
            raise ValueError("--train needs --text-col and --label-col (and --text-pair-col for pairs)")
        return task_from_files(a.train, a.dev, a.text_col, a.label_col, text_pair_col=a.text_pair_col)
    if not a.task:
        raise ValueError("give --task NAME (see `lmadapt tasks`) or --train FILE with --text-col/--label-col")
    return get_task(a.task)


def load_run(run: str):
    import lmadapt
    art = Path(run) / "best" if (Path(run) / "best" / "method.json").exists() else Path(run)
    return lmadapt.load_adapted(art)


def unescape(text: str) -> str:
    """Templates typed in a shell: '\\n' and '\\t' become a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def head_args(a) -> dict:
    """--head/--template/--verbalizer/... -> attach() keywords (one template and verbalizer)."""
    templates, verbalizers = getattr(a, "template", None) or [], getattr(a, "verbalizer", None) or []
    if len(templates) > 1 or len(verbalizers) > 1:
        raise ValueError("several --template/--verbalizer make an ensemble, which only `lmadapt eval` and "
                         "`lmadapt pet` take; give one of each")
    return {"head": a.head, "template": unescape(templates[0]) if templates else None,
            "verbalizer": verbalizers[0] if verbalizers else None,
            "token_score": a.token_score, "word_combine": a.word_combine,
            "head_options": parse_method_args(getattr(a, "head_args", None)) or None}


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
    sp.add_argument("--head", choices=["linear", "mlp", "verbalizer", "knowledgeable", "soft", "prototypical"],
                    help="classification head; default: verbalizer for a causal LM on a task with default "
                         "patterns (not with probe), else linear. knowledgeable (KPT), soft (WARP), "
                         "prototypical (ProtoVerb): learned verbalizers, see docs/methods.md")
    sp.add_argument("--head-args", help="k=v,... more arguments of the head, e.g. neighbours=8,synonyms=true "
                                        "(knowledgeable), dim=64,temperature=0.1 (prototypical)")
    more = " (repeat it: an ensemble over every template x verbalizer)" if many else ""
    sp.add_argument("--template", action="append", help="verbalizer head's pattern, e.g. "
                    "'{text} It was {mask}.' (fields {text} {text_pair} {mask} {soft:N}; \\n = newline)" + more)
    sp.add_argument("--verbalizer", action="append", help="label words, e.g. "
                    "'negative=terrible|bad,positive=great|good' (default: the task's); a kind in front "
                    "picks a learned verbalizer ('soft:negative=terrible,positive=great', kpt:, proto:), "
                    "a .json file is a head spec written by `lmadapt prompt-search`" + more)
    sp.add_argument("--token-score", choices=["sum", "mean"], default="sum",
                    help="multi-token word: sum (its log-prob) or mean of its token log-probs (sum)")
    sp.add_argument("--word-combine", choices=["mean", "logsumexp"], default="mean",
                    help="several words per label: mean log-prob or logsumexp (mean)")

def common_args(sp):
    sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")



def table(rows, header) -> str:
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
    return table(rows, ["method", "task", "trainable", "stored", "train", "peak mem", "metrics"])




def align_args(sp, default_task: str):
    """The options sft, reward, dpo and ppo share (train's, plus where the stage starts from)."""
    sp.add_argument("--model", default=DEFAULT_MODEL, help=f"packaged name or local HF dir (default {DEFAULT_MODEL})")
    sp.add_argument("--task", default=default_task, help=f"a task name (default {default_task})")
    sp.add_argument("--data-root", help="datasets folder (default: $LMADAPT_DATA or ../shared/data)")
    sp.add_argument("--init", help="an earlier stage's run (e.g. the SFT run): its delta is merged into the base "
                                   "first, so the reference (the disabled adapter) is that model")
    sp.add_argument("--method", default="lora", help="the trainable part, see `lmadapt methods` (default lora)")
    sp.add_argument("--method-args", help="k=v,... e.g. r=8,alpha=16")
    sp.add_argument("--max-train", type=int, help="random subset of the training set of this size")
    sp.add_argument("--max-steps", type=int, help="optimizer steps (ppo: rollout batches)")
    sp.add_argument("--batch-size", type=int, help="examples (pairs, prompts) per step (8)")
    sp.add_argument("--max-eval", type=int, help="dev examples used by every evaluation (a fixed random subset)")
    sp.add_argument("--lr", type=float, help="peak learning rate of AdamW (default: the method's)")
    sp.add_argument("--eval-every", type=int, help="steps between dev evaluations")
    sp.add_argument("--save-every", type=int, help="steps between resumable checkpoints")
    sp.add_argument("--max-length", type=int, default=256, help="prompt + response tokens (256)")
    sp.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                    help="format prompts with the model's chat template (auto: when it has one)")
    sp.add_argument("--seed", type=int, default=0, help="seeds the data order, sampling and initial weights (0)")
    sp.add_argument("--out", required=True, help="run folder")
    sp.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint after a crash")
    common_args(sp)


def chat_flag(a) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[a.chat]


def align_start(a, reward_head: bool = False):
    """-> (task, Adapted) for an alignment command: bad arguments fail before the model loads;
    with --init, the method is attached to the earlier stage's merged model."""
    import lmadapt
    from ..align.common import start_from
    from ..tasks import get_task
    task = get_task(a.task)
    for split in ("train", "dev"):
        task.load(split, a.data_root)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    method_args = parse_method_args(a.method_args)
    lmadapt.get_method(a.method, **method_args)
    init = None
    if a.init:
        model, tok, init = start_from(a.init)
    else:
        model, tok = lmadapt.load(a.model)
    if reward_head:
        from ..align.reward import attach_reward_model
        import torch
        torch.manual_seed(a.seed)
        adapted = attach_reward_model(model, a.method, tok, **method_args)
    else:
        adapted = lmadapt.attach(model, a.method, tokenizer=tok, init_seed=a.seed, **method_args)
    adapted.init = init
    return task, adapted


def fit_options(a) -> dict:
    """train's optimization options that were given, as TrainConfig keywords."""
    keys = ("max_steps", "batch_size", "max_eval", "lr", "eval_every", "save_every", "max_length")
    return {k: getattr(a, k) for k in keys if getattr(a, k) is not None} | {
        "precision": a.precision, "progress": not a.no_progress}
