"""Instruction tuning with a held-out task cluster (FLAN: Wei et al. 2022; instruction schema of
Super-NaturalInstructions: Wang et al. 2022).

The mixture: the tasks here rendered as instructions, each task with several phrasings built from
a title, a definition, things to avoid and an example (each phrasing shows some of them):

    Task: Sentiment of a movie review
    Definition: Read the sentence from a movie review and say whether ...
    Things to avoid: Do not explain the answer ...
    Example input: a gorgeous, witty, seductive movie .
    Example output: positive

    Input: <the example's input>
    Output:                                  -> " <response>"  (the SFT loss sees only this)

Clusters (FLAN holds out whole clusters, so no task of the evaluated kind is ever trained on):
sentiment, nli, qa, summarization, table_to_text, instructions, math. The whole NLI cluster (RTE,
MNLI, SNLI) is held out by default; `build_mixture` refuses a held-out task and `check_held_out`
verifies the finished mixture.

Mixing (Raffel et al. 2020, FLAN): examples-proportional with a per-task cap K: task i is drawn
at a rate proportional to min(n_i, K), for `total` examples (default sum_i min(n_i, K)).

Training is the ordinary `lmadapt.train` on a task whose prompt is the rendered instruction: the
generation encoder already puts the loss on the response tokens only (labels -100 on the prompt).
LoRA or full, or any method. Evaluation: zero-shot accuracy before and after, with the verbalizer
head on an instruction template (the input fields and a {mask} after "Output:"), on the held-out
RTE (every RTE phrasing, label words yes/no) and on one seen task (SST-2, positive/negative).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path

from .ensemble import accuracy_of, member_scores
from .head import VerbalizerHead

CLUSTERS = {
    "sentiment": ("sst2", "imdb", "amazon_books", "amazon_dvd", "amazon_electronics", "amazon_kitchen",
                  "amazon_airline"),
    "nli": ("rte", "mnli", "snli"),
    "qa": ("squad",),
    "summarization": ("xsum", "scitldr"),
    "table_to_text": ("e2e_nlg", "webnlg"),
    "instructions": ("alpaca",),
    "math": ("gsm8k",),
}
MIXTURE_TASKS = ("sst2", "squad", "xsum", "scitldr", "e2e_nlg", "webnlg", "alpaca")
HELD_OUT = ("nli",)


def cluster_of(task_name: str) -> str | None:
    return next((c for c, names in CLUSTERS.items() if task_name in names), None)


@dataclass(frozen=True)
class Phrasing:
    """One way to state a task. Empty parts are not shown."""
    title: str = ""
    definition: str = ""
    avoid: str = ""                        # things to avoid
    example: tuple[str, str] | None = None  # (input, output)


def render(p: Phrasing, input_text: str | None) -> str:
    """The instruction prompt; it ends with 'Output:' (the response follows after a space)."""
    lines = [f"Task: {p.title}"] if p.title else []
    lines += [f"Definition: {p.definition}"] if p.definition else []
    lines += [f"Things to avoid: {p.avoid}"] if p.avoid else []
    if p.example is not None:
        lines += [f"Example input: {p.example[0]}", f"Example output: {p.example[1]}"]
    head = "\n".join(lines)
    body = f"Input: {input_text}\nOutput:" if input_text is not None else "Output:"
    return f"{head}\n\n{body}" if head else body


def _three(title: str, definition: str, short: str, avoid: str, example: tuple[str, str]) -> tuple[Phrasing, ...]:
    """A task's phrasings: title + definition; a short definition + things to avoid; all four."""
    return (Phrasing(title, definition), Phrasing("", short, avoid),
            Phrasing(title, definition, avoid, example))


PHRASINGS: dict[str, tuple[Phrasing, ...]] = {
    "sst2": _three("Sentiment of a movie review",
                   "Read the sentence from a movie review and say whether its sentiment is positive or negative.",
                   "Is this movie review positive or negative?",
                   "Do not explain the answer; write one word, positive or negative.",
                   ("a gorgeous , witty , seductive movie .", "positive")),
    "squad": _three("Reading comprehension",
                    "Answer the question with a short span copied from the context.",
                    "Answer the question from the context.",
                    "Do not write a full sentence or add facts that are not in the context.",
                    ("Context: The Eiffel Tower is in Paris and was finished in 1889.\nQuestion: When was the "
                     "Eiffel Tower finished?", "1889")),
    "xsum": _three("One-sentence news summary",
                   "Summarize the news article in a single sentence.",
                   "Write a one-sentence summary of this article.",
                   "Do not copy long passages or add details the article does not give.",
                   ("The city council voted on Tuesday to close the old bridge after engineers found cracks "
                    "in two of its supports. Repairs are expected to take a year.",
                    "An old bridge has been closed for a year of repairs after cracks were found.")),
    "scitldr": _three("TL;DR of a paper",
                      "Write a one-sentence TL;DR of the paper's abstract: its main contribution.",
                      "Summarize this abstract in one sentence.",
                      "Do not list every result; do not start with 'This paper'.",
                      ("We propose a pruning method that removes 90% of a network's weights before training "
                       "with no loss of accuracy on image benchmarks.",
                       "Pruning 90% of the weights before training keeps accuracy.")),
    "e2e_nlg": _three("Restaurant description from data",
                      "Write a fluent description of the restaurant that states every attribute given.",
                      "Turn these restaurant attributes into a sentence.",
                      "Do not leave out an attribute or invent one that is not listed.",
                      ("name[The Mill], eatType[pub], area[riverside]", "The Mill is a pub by the riverside.")),
    "webnlg": _three("Text from knowledge-graph triples",
                     "Write text that expresses every triple (subject | property | object).",
                     "Describe these facts in a sentence.",
                     "Do not add facts that are not in the triples.",
                     ("Aarhus Airport | cityServed | Aarhus, Denmark", "Aarhus Airport serves the city of Aarhus, Denmark.")),
    "rte": (Phrasing("Textual entailment",
                     'Read the premise and the hypothesis. Answer "yes" if the premise entails the hypothesis, '
                     'otherwise answer "no".'),
            Phrasing("", "Does the premise mean that the hypothesis is true? Answer yes or no.",
                     "Do not explain the answer."),
            Phrasing("Textual entailment",
                     'Answer "yes" if the hypothesis must be true when the premise is true, otherwise "no".',
                     "Do not explain the answer; write one word, yes or no.",
                     ("Premise: The cat sat on the mat all day.\nHypothesis: A cat was on the mat.", "yes"))),
}
for _name in ("mnli", "snli"):  # the rest of the NLI cluster: defined, but held out like RTE
    PHRASINGS[_name] = PHRASINGS["rte"]


def instance(task, ex, max_input_words: int) -> tuple[str | None, str, tuple[Phrasing, ...] | None]:
    """(input text, response, the example's own phrasings or None) of one example of a task; an
    input longer than max_input_words words is cut there (so the instruction is never cut)."""
    def short(s: str) -> str:
        words = s.split()
        return s if len(words) <= max_input_words else " ".join(words[:max_input_words]) + " ..."
    name = task.name
    if name == "alpaca":   # already an instruction: its own text is the definition
        return (short(ex.text_pair) if ex.text_pair else None), ex.target, \
            (Phrasing("Follow the instruction", ex.text), Phrasing("", ex.text, "Do not repeat the instruction."))
    if task.label_names:   # classification: the response is the label name
        inp = ex.text if ex.text_pair is None else f"Premise: {ex.text}\nHypothesis: {ex.text_pair}"
        return short(inp), task.label_names[ex.label].replace("_", " "), None
    if name == "squad":
        return f"Context: {short(ex.text_pair)}\nQuestion: {ex.text}", ex.target, None
    return short(ex.text), ex.target, None


def mixing_counts(sizes: dict[str, int], cap: int, total: int | None = None) -> dict[str, int]:
    """Examples-proportional mixing with a per-task cap: task i gets a share min(n_i, cap) /
    sum_j min(n_j, cap) of `total` (default sum_j min(n_j, cap)), rounded by largest remainder so
    the counts sum to `total`."""
    if cap < 1:
        raise ValueError(f"instruct: the per-task cap must be >= 1, got {cap}")
    capped = {k: min(n, cap) for k, n in sizes.items()}
    mass = sum(capped.values())
    if mass == 0:
        raise ValueError("instruct: every task of the mixture is empty")
    total = mass if total is None else total
    exact = {k: total * c / mass for k, c in capped.items()}
    counts = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(exact).index(k)))
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def check_held_out(examples, held_out=HELD_OUT) -> None:
    """Raise if any mixture example comes from a task of a held-out cluster."""
    bad = sorted({ex.meta.get("task") for ex in examples if cluster_of(ex.meta.get("task", "")) in held_out})
    if bad:
        raise ValueError(f"instruct: the mixture holds examples of {', '.join(bad)}, in held-out cluster(s) "
                         f"{', '.join(held_out)}")


def build_mixture(tasks=MIXTURE_TASKS, *, held_out=HELD_OUT, cap: int = 3000, total: int | None = None,
                  seed: int = 0, split: str = "train", data_root=None, max_input_words: int = 250,
                  sizes_only: bool = False):
    """-> (examples, counts per task): each example's text is the rendered instruction, target the
    response, meta {'task', 'phrasing'}. A task of a held-out cluster is refused."""
    from ..data import Example
    from ..tasks import get_task
    unknown = [c for c in held_out if c not in CLUSTERS]
    if unknown:
        raise ValueError(f"instruct: unknown cluster(s) {', '.join(unknown)}; choose from: {', '.join(CLUSTERS)}")
    for name in tasks:
        if cluster_of(name) in held_out:
            raise ValueError(f"instruct: task '{name}' is in the held-out cluster '{cluster_of(name)}' "
                             f"({', '.join(CLUSTERS[cluster_of(name)])}); it is evaluated zero-shot, never "
                             "trained on: remove it from the mixture or the cluster from held_out")
        if name not in PHRASINGS and name != "alpaca":
            raise ValueError(f"instruct: task '{name}' has no instruction phrasings; choose from: "
                             f"{', '.join(sorted(set(PHRASINGS) | {'alpaca'}))}")
    loaded = {name: get_task(name) for name in tasks}
    data = {name: t.load(split, data_root) for name, t in loaded.items()}
    counts = mixing_counts({k: len(v) for k, v in data.items()}, cap, total)
    rng = random.Random(seed)
    out = []
    for name, n in counts.items():
        pool = data[name]
        order = rng.sample(range(len(pool)), len(pool))
        picked = [pool[order[i % len(pool)]] for i in range(n)]   # repeats only when n > the task's size
        for ex in picked:
            inp, response, own = instance(loaded[name], ex, max_input_words)
            phrasings = own if own is not None else PHRASINGS[name]
            j = rng.randrange(len(phrasings))
            out.append(Example(text=render(phrasings[j], inp), target=response, references=[response],
                               meta={"task": name, "phrasing": j}))
    rng.shuffle(out)
    check_held_out(out, held_out)
    return out, counts


def mixture_task(examples, name: str = "flan_mixture"):
    """A Task over the rendered examples: prompt '{text}' (the instruction itself), ROUGE-L."""
    from ..tasks import Task
    return Task(name=name, kind="instruction", metric="rouge_l", prompt="{text}", uses_data_root=False,
                description="instruction mixture (lmadapt.prompting.instruct)",
                splits={"train": functools.partial(_given, tuple(examples))})


def _given(examples, root):
    return list(examples)


# --- zero-shot evaluation through an instruction template ------------------------------------

EVAL_INPUTS = {"rte": "Premise: {text}\nHypothesis: {text_pair}", "sst2": "{text}"}
EVAL_WORDS = {"rte": "entailment=yes,not_entailment=no", "sst2": "negative=negative,positive=positive"}


def instruction_template(p: Phrasing, input_fields: str) -> str:
    """A verbalizer-head template: the rendered instruction with the example's fields as input and
    the label word's slot after 'Output:'."""
    return render(p, input_fields) + " {mask}"


@contextlib.contextmanager
def verbalized(adapted, label_names, template: str, verbalizer):
    """Score with a verbalizer head on an Adapted LM that has none (its method's deltas stay in
    place); the model is an LM again after."""
    saved = adapted.head, adapted.num_labels, adapted.label_names, adapted.head_kind
    adapted.num_labels, adapted.label_names = len(label_names), list(label_names)
    try:
        adapted.head = VerbalizerHead(adapted, template, verbalizer)
        adapted.head_kind = "verbalizer"
        yield adapted
    finally:
        adapted.head, adapted.num_labels, adapted.label_names, adapted.head_kind = saved


def zero_shot(adapted, task_names=("rte", "sst2"), *, split: str = "dev", limit: int | None = None,
              data_root=None, batch_size: int = 16, max_length: int = 512, precision: str = "auto",
              progress: bool = False) -> dict:
    """Zero-shot accuracy of `adapted` (an LM) on each task through each of its instruction
    phrasings -> {task: {'accuracy': mean over phrasings, 'phrasings': [...], 'majority': ...}}."""
    from ..tasks import get_task
    out = {}
    for name in task_names:
        t = get_task(name)
        examples = t.load(split, data_root)
        examples = examples[:limit] if limit is not None else examples
        labels = [ex.label for ex in examples]
        accs = []
        for p in PHRASINGS[name]:
            with verbalized(adapted, t.label_names, instruction_template(p, EVAL_INPUTS[name]), EVAL_WORDS[name]):
                scores = member_scores(adapted, examples, batch_size=batch_size, max_length=max_length,
                                       precision=precision, progress=progress, desc=f"zero-shot {name}")
            accs.append(accuracy_of(scores, labels))
        majority = 100.0 * max(labels.count(c) for c in set(labels)) / len(labels)
        out[name] = {"accuracy": sum(accs) / len(accs), "phrasings": accs, "majority": majority,
                     "n": len(examples), "held_out": cluster_of(name) in HELD_OUT}
    return out


# --- the whole run -----------------------------------------------------------------------------

@dataclass(frozen=True)
class InstructConfig:
    tasks: tuple[str, ...] = MIXTURE_TASKS
    held_out: tuple[str, ...] = HELD_OUT       # clusters
    cap: int = 3000                            # per-task cap of examples-proportional mixing
    total: int | None = 4000                   # mixture examples (None: sum of the capped sizes)
    method: str = "lora"
    method_args: dict = field(default_factory=dict)
    eval_tasks: tuple[str, ...] = ("rte", "sst2")   # held-out RTE and one seen task
    eval_limit: int | None = None              # first N dev examples of each eval task
    max_input_words: int = 250
    seed: int = 0
    train: dict = field(default_factory=dict)  # TrainConfig keywords (max_steps, lr, batch_size, ...)

    def __post_init__(self):
        for name in self.eval_tasks:
            if name not in EVAL_INPUTS:
                raise ValueError(f"instruct: no zero-shot template for '{name}'; choose from: {', '.join(EVAL_INPUTS)}")
        if self.total is not None and self.total < 1:
            raise ValueError(f"instruct: total must be >= 1 (or None), got {self.total}")


def run_instruct(model, tokenizer, cfg: InstructConfig, out, *, data_root=None, progress: bool = False) -> dict:
    """Build the mixture, measure zero-shot accuracy, instruction-tune `model` (cfg.method), measure
    again; writes OUT/result.json (the SFT run itself: OUT/sft/) -> the result dict."""
    from .. import __version__
    from ..api import attach, is_main_process, train
    from ..atomic import write_json
    out = Path(out)
    mixture, counts = build_mixture(cfg.tasks, held_out=cfg.held_out, cap=cfg.cap, total=cfg.total, seed=cfg.seed,
                                    data_root=data_root, max_input_words=cfg.max_input_words)
    train_cfg = {"max_length": 512, "max_target_length": 128, "progress": progress} | dict(cfg.train)
    opts = {"limit": cfg.eval_limit, "data_root": data_root, "precision": train_cfg.get("precision", "auto"),
            "max_length": train_cfg["max_length"], "batch_size": train_cfg.get("eval_batch_size", 16),
            "progress": progress}
    adapted = attach(model, cfg.method, tokenizer=tokenizer, init_seed=cfg.seed, **cfg.method_args)
    before = zero_shot(adapted, cfg.eval_tasks, **opts)
    res = train(adapted, mixture_task(mixture), train_examples=mixture, dev_examples=[], ood=[], seed=cfg.seed,
                out=out / "sft", **train_cfg)
    after = zero_shot(adapted, cfg.eval_tasks, **opts)
    history = res["history"]
    result = {
        "model": getattr(model.config, "lmadapt_name", model.config.model_type), "kind": "instruct",
        "method": adapted.method.name, "method_args": adapted.method.to_dict(),
        "mixture": {"counts": counts, "n": len(mixture), "cap": cfg.cap, "held_out_clusters": list(cfg.held_out),
                    "held_out_tasks": sorted(t for c in cfg.held_out for t in CLUSTERS[c])},
        "metrics": {name: {"before": before[name]["accuracy"], "after": after[name]["accuracy"],
                           "held_out": before[name]["held_out"], "majority": before[name]["majority"],
                           "n": before[name]["n"], "phrasings_before": before[name]["phrasings"],
                           "phrasings_after": after[name]["phrasings"]} for name in cfg.eval_tasks},
        "train": {"steps": res["steps"], "train_seconds": res["train_seconds"], "lr": res["lr"],
                  "trainable_params": res["trainable_params"], "trainable_percent": res["trainable_percent"],
                  "loss_first": history[0]["loss"] if history else None,
                  "loss_last": history[-1]["loss"] if history else None, "artifact": str(out / "sft" / "best")},
        "config": dataclasses.asdict(cfg), "precision": res.get("precision"),
        "versions": res["versions"] | {"lmadapt": __version__},
    }
    if is_main_process():
        write_json(out / "result.json", result)
    return result
