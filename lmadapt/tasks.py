"""Tasks: how to read a dataset into `Example`s, how to format the model input, and the metric.

Every dataset in shared/data (see its README.md) has a task here. Where the source gives no train
or dev split, a fixed, documented split is carved out (SQuAD by article, XSum/HH/Alpaca by
position), so every run of every method sees the same examples.

Prompt convention for generation, preference and instruction kinds: the model input is
`task.format(example)`, which ends without trailing whitespace (e.g. "...\\nAnswer:"), and the
continuation to produce is " " + example.target. A BPE tokenizer then sees " word" tokens, as in
pretraining, instead of a dangling space token at the end of the prompt.
For classification kinds the prompt only matters to methods that need a single string (decoder
LMs, prompting); encoders take `text`/`text_pair` as a tokenizer pair.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from .data import (Example, data_error, label_index, label_key, read_json, read_rows,
                   resolve_data_root, sorted_labels, text_field)
from .metrics import METRICS, normalize_number
from .prompting.pvps import NLI_PVPS, RTE_PVPS, SENTIMENT_PVPS

KINDS = ("classification", "pair_classification", "generation", "preference", "instruction")
CLASSIFICATION_KINDS = ("classification", "pair_classification")

# A split loader reads one split from the data root. Loaders are module-level partials (hashable),
# so parsed splits can be cached per (loader, root).
Loader = Callable[[Path], list[Example]]

P = functools.partial


@dataclass(frozen=True, kw_only=True)
class Task:
    """A dataset plus how to present it to a model and how to score it.

    `prompt` is a str.format template over `{text}` and `{text_pair}`; `prompt_without_pair`, when
    set, is used for examples whose text_pair is None (Alpaca's no-input records). `ood` names other
    tasks with the same labels (or kind and metric) to evaluate on as out-of-domain.
    `uses_data_root` is False for tasks built from user files, which need no data root.
    `num_beams`, `length_penalty`, `no_repeat_ngram_size`: how evaluation decodes generation tasks
    (num_beams=1: greedy; see lmadapt.beam for the other two).
    `pvps`: pattern-verbalizer pairs (template, verbalizer) for prompt-based classification
    (lmadapt.prompting); the first is the verbalizer head's default, all of them PET's ensemble.
    `extra_metrics`: more metrics reported next to `metric` (E2E: ROUGE-L next to BLEU); the best
    checkpoint is still chosen by `metric`.
    """

    name: str
    kind: str
    label_names: tuple[str, ...] = ()
    metric: str
    prompt: str = "{text}"
    prompt_without_pair: str | None = None
    description: str = ""
    splits: Mapping[str, Loader] = field(compare=False, repr=False)
    ood: tuple[str, ...] = ()
    uses_data_root: bool = field(default=True, repr=False)
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    pvps: tuple[tuple[str, str], ...] = ()
    extra_metrics: tuple[str, ...] = ()

    def __post_init__(self):
        def fail(problem):
            raise ValueError(f"task '{self.name}': {problem}")
        if self.kind not in KINDS:
            fail(f"unknown kind '{self.kind}'; choose one of: {', '.join(KINDS)}")
        if self.metric not in METRICS:
            fail(f"unknown metric '{self.metric}'; choose one of: {', '.join(METRICS)}")
        for extra in self.extra_metrics:
            if extra not in METRICS:
                fail(f"unknown extra metric '{extra}'; choose from: {', '.join(METRICS)}")
        if self.kind in CLASSIFICATION_KINDS and len(self.label_names) < 2:
            fail(f"kind '{self.kind}' needs at least 2 label_names, got {list(self.label_names)}")
        if self.kind not in CLASSIFICATION_KINDS and self.label_names:
            fail(f"kind '{self.kind}' takes no label_names")
        if "{text}" not in self.prompt:
            fail(f"prompt must contain {{text}}: {self.prompt!r}")
        if not self.splits:
            fail("has no splits")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            fail(f"num_beams must be an int >= 1 (1: greedy), got {self.num_beams!r}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            fail(f"no_repeat_ngram_size must be an int >= 0 (0: off), got {self.no_repeat_ngram_size!r}")
        if self.pvps:
            if self.kind not in CLASSIFICATION_KINDS:
                fail(f"kind '{self.kind}' takes no pvps (they verbalize class labels)")
            from .prompting import Template, Verbalizer
            for template, verbalizer in self.pvps:  # a typo fails at import, not mid-run
                Template(template)
                Verbalizer.parse(verbalizer, self.label_names)
            object.__setattr__(self, "pvps", tuple((t, v) for t, v in self.pvps))
        # Tuples and a read-only view of splits: Task is frozen, and all of these define it.
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "ood", tuple(self.ood))
        object.__setattr__(self, "extra_metrics", tuple(self.extra_metrics))
        object.__setattr__(self, "splits", MappingProxyType(dict(self.splits)))

    def load(self, split: str, data_root: str | Path | None = None) -> list[Example]:
        """The examples of one split (fresh copies; the parsed file is cached in memory)."""
        if split not in self.splits:
            raise ValueError(f"task '{self.name}' has no split '{split}'; choose one of: "
                             f"{', '.join(self.splits)}")
        root = str(resolve_data_root(data_root)) if self.uses_data_root else ""
        return [_copy(e) for e in _load_cached(self.splits[split], root)]

    def format(self, example: Example) -> str:
        """The model input for one example (see the module docstring for the convention)."""
        template = self.prompt
        if example.text_pair is None and self.prompt_without_pair is not None:
            template = self.prompt_without_pair
        elif example.text_pair is None and "{text_pair}" in template:
            raise ValueError(f"task '{self.name}': prompt needs text_pair but the example has none")
        return template.format(text=example.text, text_pair=example.text_pair)


@functools.lru_cache(maxsize=64)
def _load_cached(loader: Loader, root: str) -> tuple[Example, ...]:
    return tuple(loader(Path(root)))


def _copy(e: Example) -> Example:
    # Cheaper than dataclasses.replace; copies the mutable fields so callers can't edit the cache.
    return Example(e.text, e.text_pair, e.label, e.target, e.rejected,
                   None if e.references is None else list(e.references),
                   dict(e.meta) if e.meta else {})


# --- loaders: each reads one split; `root` is the data root ----------------------------------

BINARY = {"0": 0, "1": 1}
IMDB_LABELS = {"0": 1, "1": 0}  # this IMDB copy has "0" = positive; flip so 1 = positive as SST-2
NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def _rows(root: Path, rel: str, required: list[str], quoting: int | None = None):
    """(rows, get) where get(row, line, col) is the row's stripped text field, erroring at line."""
    path = root / rel
    rows = read_rows(path, quoting=quoting, required=required, root=root)
    return rows, lambda r, line, col: text_field(r, col, path, line, root)


def _classification(root: Path, rel: str, text_col: str, labels: Mapping[str, int],
                    pair_col: str | None = None, quoting: int | None = None) -> list[Example]:
    path = root / rel
    required = [text_col, "label"] + ([pair_col] if pair_col else [])
    out = []
    for line, r in read_rows(path, quoting=quoting, required=required, root=root):
        # Inlined fast path (SST-2 train has 67k rows); the helpers raise the errors.
        text, label = r[text_col], r["label"]
        text = text.strip() if type(text) is str else text_field(r, text_col, path, line, root)
        label = labels.get(label) if type(label) is str else None
        out.append(Example(
            text, text_field(r, pair_col, path, line, root) if pair_col else None,
            label if label is not None else label_index(r, "label", labels, path, line, root)))
    return out


def _glue(rel: str, text_col: str, labels, pair_col: str | None = None) -> Loader:
    # GLUE TSVs have bare '"' inside sentences, so quote characters must not be interpreted.
    return P(_classification, rel=rel, text_col=text_col, labels=labels, pair_col=pair_col,
             quoting=csv.QUOTE_NONE)


def _e2e(root: Path, rel: str, one_per_reference: bool) -> list[Example]:
    """Train: one example per (MR, reference) row. Eval: one per MR with all its references."""
    rows, get = _rows(root, rel, ["mr", "ref"])
    by_mr: dict[str, list[str]] = {}  # dicts keep first-appearance order
    pairs = [(get(r, line, "mr"), get(r, line, "ref")) for line, r in rows]
    if one_per_reference:
        return [Example(text=mr, target=ref, references=[ref]) for mr, ref in pairs]
    for mr, ref in pairs:
        by_mr.setdefault(mr, []).append(ref)
    return [Example(text=mr, target=refs[0], references=refs) for mr, refs in by_mr.items()]


def _webnlg(root: Path, rel: str, one_per_reference: bool) -> list[Example]:
    out = []
    for line, r in _rows(root, rel, ["modifiedtripleset", "lex", "category"])[0]:
        # "s | p | o" triples joined by "; "; DBpedia's underscores become spaces, since the
        # references write "Aarhus Airport", not "Aarhus_Airport".
        text = "; ".join(t.replace("_", " ") for t in r["modifiedtripleset"])
        # Keep lexicalisations annotated "good" (87 in train/dev are "toFix"), unless none is.
        lex = [x["text"] for x in r["lex"] if x.get("comment") == "good"] or \
            [x["text"] for x in r["lex"]]
        if not lex:
            raise data_error(root / rel, line, "field 'lex' has no texts", root)
        meta = {"category": r["category"],
                "category_seen_in_train": r.get("category_seen_in_train", True)}
        groups = [[t] for t in lex] if one_per_reference else [lex]
        out.extend(Example(text=text, target=g[0], references=g, meta=dict(meta)) for g in groups)
    return out


def _webnlg_test(root: Path, seen: bool) -> list[Example]:
    """WebNLG 2017 test, only the categories seen (or unseen) in train: the extrapolation split."""
    return [e for e in _webnlg(root, "webnlg2017/test.jsonl", False)
            if bool(e.meta["category_seen_in_train"]) == seen]


SQUAD_TRAIN_ARTICLES = 40  # of the 48 in dev-v1.1.json; the last 8 articles are our dev split


def _squad(root: Path, part: str) -> list[Example]:
    path = root / "squad_v1.1" / "dev-v1.1.json"
    articles = read_json(path, root).get("data")
    if not isinstance(articles, list) or len(articles) <= SQUAD_TRAIN_ARTICLES:
        raise data_error(path, None, f"expected a 'data' list of more than "
                         f"{SQUAD_TRAIN_ARTICLES} articles", root)
    # Split by article, not by question: questions on one paragraph share answers and wording.
    chosen = articles[:SQUAD_TRAIN_ARTICLES] if part == "train" else articles[SQUAD_TRAIN_ARTICLES:]
    return [Example(text=qa["question"].strip(), text_pair=paragraph["context"],
                    target=qa["answers"][0]["text"], references=[a["text"] for a in qa["answers"]],
                    meta={"id": qa["id"], "title": article["title"]})
            for article in chosen for paragraph in article["paragraphs"] for qa in paragraph["qas"]]


def _tail(rows: list, part: str, n_dev: int) -> list:
    """Single-file sources: the last `n_dev` rows are dev, the rest train (fixed, by position)."""
    return rows[:-n_dev] if part == "train" else rows[-n_dev:]


def _xsum(root: Path, part: str) -> list[Example]:
    rows, get = _rows(root, "xsum/test_1000.jsonl", ["document", "summary", "id"])
    return [Example(text=get(r, line, "document"), target=get(r, line, "summary"),
                    references=[get(r, line, "summary")], meta={"id": r["id"]})
            for line, r in _tail(rows, part, 200)]


def _scitldr(root: Path, rel: str) -> list[Example]:
    out = []
    for line, r in _rows(root, rel, ["source", "target", "paper_id"])[0]:
        if not r["target"]:
            raise data_error(root / rel, line, "field 'target' is an empty list", root)
        refs = [t.strip() for t in r["target"]]  # author TLDR first, then reviewer-derived ones
        out.append(Example(text=" ".join(s.strip() for s in r["source"]), target=refs[0],
                           references=refs,
                           meta={"paper_id": r["paper_id"], "title": r.get("title", "")}))
    return out


def _alpaca(root: Path, part: str) -> list[Example]:
    rows, get = _rows(root, "alpaca/alpaca_data_first5000.json", ["instruction", "input", "output"])
    # Split first, then drop: the 4 records with an empty output (nothing to learn or score)
    # must not shift the train/dev boundary.
    return [Example(text=get(r, line, "instruction"), text_pair=get(r, line, "input") or None,
                    target=get(r, line, "output"), references=[get(r, line, "output")])
            for line, r in _tail(rows, part, 500) if get(r, line, "output")]


CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """GSM8K's answer field -> (worked solution ending "The answer is N.", N). The calculator
    notes `<<16-3-4=9>>` are removed, and the final line `#### N` becomes "The answer is N." (the
    chain-of-thought wording of Wei et al. 2022)."""
    body, sep, final = answer.rpartition("####")
    if not sep or not final.strip():
        raise ValueError("no final '#### N' line")
    lines = [ln.strip() for ln in CALCULATOR_NOTE.sub("", body).strip().split("\n") if ln.strip()]
    number = final.strip()
    return "\n".join(lines + [f"The answer is {number}."]), number


def _gsm8k(root: Path, rel: str) -> list[Example]:
    rows, get = _rows(root, rel, ["question", "answer"])
    out = []
    for line, r in rows:
        try:
            solution, number = gsm8k_solution(get(r, line, "answer"))
        except ValueError as e:
            raise data_error(root / rel, line, f"field 'answer': {e}", root) from None
        out.append(Example(text=get(r, line, "question"), target=solution, references=[solution],
                           meta={"answer": normalize_number(number)}))
    return out


ASSISTANT = "\n\nAssistant:"


def _hh(root: Path, part: str) -> list[Example]:
    rows, get = _rows(root, "hh_rlhf/harmless_base_test.jsonl", ["chosen", "rejected"])
    out = []
    for line, r in _tail(rows, part, 231):
        chosen, rejected = get(r, line, "chosen"), get(r, line, "rejected")
        # The prompt is the dialogue up to the last "Assistant:" the two texts share. Searching
        # only the common prefix matters: in 5 pairs a reply (4 chosen, 1 rejected) itself
        # contains "\n\nAssistant:", so rfind on the whole text would cut inside the reply.
        cut = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
        if cut < 0:
            raise data_error(root / "hh_rlhf/harmless_base_test.jsonl", line, "chosen and "
                             "rejected share no dialogue prefix ending in 'Assistant:'", root)
        cut += len(ASSISTANT)
        out.append(Example(text=chosen[:cut], target=chosen[cut:].strip(),
                           rejected=rejected[cut:].strip()))
    return out


def _ultrafeedback(root: Path, rel: str) -> list[Example]:
    out = []
    for line, r in _rows(root, rel, ["chosen", "rejected"])[0]:
        try:
            (user, good), (user2, bad) = r["chosen"], r["rejected"]
            roles = (user["role"], good["role"], user2["role"], bad["role"])
            prompt, chosen, rejected = (m["content"].strip() for m in (user, good, bad))
            same_prompt = user2["content"].strip() == prompt
        except (TypeError, ValueError, KeyError, AttributeError):
            raise data_error(root / rel, line, "fields 'chosen' and 'rejected' should each be a "
                             "[user, assistant] list of {role, content}", root) from None
        if roles != ("user", "assistant", "user", "assistant") or not same_prompt:
            raise data_error(root / rel, line, "chosen and rejected should share one user "
                             "message and end in an assistant message", root)
        if chosen != rejected:  # 1 train / 11 test pairs are identical: no preference in them
            out.append(Example(text=prompt, target=chosen, rejected=rejected))
    return out


# --- registry ---------------------------------------------------------------------------------

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task '{task.name}' is already registered; pick another name")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def list_tasks() -> list[dict]:
    """One row per task for `lmadapt tasks`."""
    return [{"name": t.name, "kind": t.kind, "labels": ", ".join(t.label_names), "metric": t.metric,
             "splits": ", ".join(t.splits), "description": t.description} for t in TASKS.values()]


SENTIMENT = ("negative", "positive")
AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen", "airline")
AMAZON_TASKS = tuple(f"amazon_{d}" for d in AMAZON_DOMAINS)

register_task(Task(
    name="sst2", kind="classification", label_names=SENTIMENT, metric="accuracy",
    description="GLUE SST-2 movie-review sentences. test = the AutoPrompt repo's labels for the "
                "GLUE test sentences (unverified provenance; secondary).",
    splits={s: _glue(f"sst2/{f}.tsv", "sentence", BINARY)
            for s, f in (("train", "train"), ("dev", "dev"), ("test", "test_labeled_autoprompt"))},
    ood=("imdb",) + AMAZON_TASKS, pvps=SENTIMENT_PVPS))
register_task(Task(
    name="imdb", kind="classification", label_names=SENTIMENT, metric="accuracy",
    description="IMDB reviews, eval only (1k dev + 1k test, balanced). The file's labels are "
                "inverted ('0' = positive); loaded so that 1 = positive as in SST-2.",
    splits={s: P(_classification, rel=f"imdb/{s}.jsonl", text_col="ori", labels=IMDB_LABELS)
            for s in ("dev", "test")}, pvps=SENTIMENT_PVPS))
for _domain in AMAZON_DOMAINS:
    register_task(Task(
        name=f"amazon_{_domain}", kind="classification", label_names=SENTIMENT, metric="accuracy",
        description=f"Amazon multi-domain sentiment (Blitzer et al. 2007), {_domain} reviews "
                    "(title + body).",
        # Quoted fields with embedded newlines and tabs: default csv quoting, unlike GLUE.
        splits={s: P(_classification, rel=f"amazon_multidomain/{_domain}/{s}.tsv",
                     text_col="sentence", labels=BINARY) for s in ("train", "dev")},
        ood=tuple(t for t in AMAZON_TASKS if t != f"amazon_{_domain}") + ("sst2", "imdb"), pvps=SENTIMENT_PVPS))
register_task(Task(
    name="rte", kind="pair_classification", label_names=tuple(RTE_LABELS), metric="accuracy",
    prompt="{text}\n{text_pair}", description="GLUE RTE textual entailment (premise, hypothesis).",
    splits={s: _glue(f"rte/{s}.tsv", "sentence1", RTE_LABELS, "sentence2")
            for s in ("train", "dev")}, pvps=RTE_PVPS))
for _name, _other in (("mnli", "snli"), ("snli", "mnli")):
    register_task(Task(
        name=_name, kind="pair_classification", label_names=tuple(NLI_LABELS), metric="accuracy",
        prompt="{text}\n{text_pair}",
        description=f"{_name.upper()} subset (9k train). dev is a held-out 1k part of the "
                    f"official TRAIN set, not the official dev set.",
        splits={s: P(_classification, rel=f"{_name}_subset/{f}.jsonl", text_col="text_a",
                     labels=NLI_LABELS, pair_col="text_b")
                for s, f in (("train", "train"), ("dev", "heldout"))},
        ood=(_other,), pvps=NLI_PVPS))
register_task(Task(
    name="e2e_nlg", kind="generation", metric="bleu", extra_metrics=("rouge_l",),
    prompt="Table: {text}\nText:",
    num_beams=5,  # Li & Liang (2021) decode E2E and WebNLG with beam search, beam size 5
    description="E2E NLG restaurant meaning representations to text. train: one example per "
                "reference; dev/test: one per MR with all references.",
    splits={s: P(_e2e, rel=f"e2e_nlg/{f}.csv", one_per_reference=s == "train")
            for s, f in (("train", "trainset"), ("dev", "devset"), ("test", "testset_w_refs"))}))
register_task(Task(
    name="webnlg", kind="generation", metric="bleu", prompt="Triples: {text}\nText:",
    num_beams=5,
    description="WebNLG 2017 DBpedia triples to text. train: one example per reference; test "
                "has 5 categories unseen in train (meta['category_seen_in_train']).",
    splits={s: P(_webnlg, rel=f"webnlg2017/{s}.jsonl", one_per_reference=s == "train")
            for s in ("train", "dev", "test")},
    extra_metrics=("rouge_l",), ood=("webnlg_seen", "webnlg_unseen")))
for _seen in (True, False):
    register_task(Task(
        name=f"webnlg_{'seen' if _seen else 'unseen'}", kind="generation", metric="bleu",
        extra_metrics=("rouge_l",), prompt="Triples: {text}\nText:", num_beams=5,
        description=f"eval only: the WebNLG 2017 test MRs whose category is {'' if _seen else 'NOT '}"
                    f"in train ({'10' if _seen else '5'} categories), all references; `webnlg`'s "
                    "out-of-domain sets (seen vs unseen, Li & Liang's extrapolation).",
        splits={"test": P(_webnlg_test, seen=_seen)}))
register_task(Task(
    name="squad", kind="generation", metric="squad",
    prompt="Context: {text_pair}\nQuestion: {text}\nAnswer:",
    description=f"SQuAD v1.1 extractive QA. Only the official dev set exists here: its first "
                f"{SQUAD_TRAIN_ARTICLES} articles are our train split, the last 8 our dev split.",
    splits={"train": P(_squad, part="train"), "dev": P(_squad, part="dev")}))
register_task(Task(
    name="xsum", kind="generation", metric="rouge_l", prompt="Article: {text}\nSummary:",
    description="XSum one-sentence news summaries. Only 1,000 official TEST documents exist "
                "here: the first 800 are our train split, the last 200 our dev split.",
    splits={"train": P(_xsum, part="train"), "dev": P(_xsum, part="dev")}, ood=("scitldr",)))
register_task(Task(
    name="scitldr", kind="generation", metric="rouge_l", prompt="Abstract: {text}\nTL;DR:",
    description="SciTLDR-A: paper abstract to one-sentence TLDR (dev/test have several).",
    splits={s: P(_scitldr, rel=f"scitldr/{s}.jsonl") for s in ("train", "dev", "test")},
    ood=("xsum",)))
register_task(Task(
    name="hh_rlhf", kind="preference", metric="preference_accuracy", prompt="{text}",
    description="Anthropic HH-RLHF harmless-base preference pairs. Only the official TEST split "
                "exists here: the first 2,081 pairs are our train split, the last 231 our dev.",
    splits={"train": P(_hh, part="train"), "dev": P(_hh, part="dev")}, ood=("ultrafeedback",)))
register_task(Task(
    name="ultrafeedback", kind="preference", metric="preference_accuracy",
    prompt="Human: {text}\n\nAssistant:",  # the HH format, so reward models transfer between them
    description="UltraFeedback-binarized sample (train_prefs / test_prefs); pairs with identical "
                "responses are dropped.",
    splits={"train": P(_ultrafeedback, rel="ultrafeedback_subset/train_prefs.jsonl"),
            "dev": P(_ultrafeedback, rel="ultrafeedback_subset/test_prefs.jsonl")},
    ood=("hh_rlhf",)))
register_task(Task(
    name="gsm8k", kind="generation", metric="numeric_accuracy", prompt="Question: {text}\nAnswer:",
    description="GSM8K grade-school math (train 7,473 / test 1,319; no dev split). target: the "
                "worked solution without the <<...>> calculator notes, ending 'The answer is N.'; "
                "scored by the final number (lmadapt cot: chain-of-thought, self-consistency).",
    splits={s: P(_gsm8k, rel=f"gsm8k/{s}.jsonl") for s in ("train", "test")}))
_ALPACA_HEAD = "Below is an instruction that describes a task"
register_task(Task(
    name="alpaca", kind="instruction", metric="rouge_l",
    prompt=f"{_ALPACA_HEAD}, paired with an input that provides further context. Write a response "
           "that appropriately completes the request.\n\n### Instruction:\n{text}\n\n### Input:\n"
           "{text_pair}\n\n### Response:",
    prompt_without_pair=f"{_ALPACA_HEAD}. Write a response that appropriately completes the "
                        "request.\n\n### Instruction:\n{text}\n\n### Response:",
    description="Stanford Alpaca, first 5,000 records: the last 500 are our dev split; records "
                "with an empty output are dropped.",
    splits={"train": P(_alpaca, part="train"), "dev": P(_alpaca, part="dev")}))


# A typo in an ood name would otherwise only surface at the end of a training run.
for _task in TASKS.values():
    for _name in _task.ood:
        _other = TASKS.get(_name)
        if _other is None or (_other.kind, _other.metric, _other.label_names) != \
                (_task.kind, _task.metric, _task.label_names):
            raise ValueError(f"task '{_task.name}': ood task '{_name}' is unknown or has "
                             "a different kind, metric or labels")


# --- user files -------------------------------------------------------------------------------


def task_from_files(train: str | Path, dev: str | Path | None, text_col: str, label_col: str,
                    text_pair_col: str | None = None, name: str = "custom", *,
                    quoting: int | None = None) -> Task:
    """A classification task from the user's own .tsv/.csv/.jsonl/.json files.

    Label names are the distinct labels of the train file, sorted (numerically when all are
    integers), so any strings work; a dev label not seen in train is a DataError at its line.
    Both files are read now, so bad data fails before any model is loaded.
    """
    required = [text_col, label_col] + ([text_pair_col] if text_pair_col else [])
    files = {"train": Path(train)} | ({"dev": Path(dev)} if dev is not None else {})
    rows = {split: read_rows(path, quoting=quoting, required=required)
            for split, path in files.items()}
    label_names = tuple(sorted_labels({label_key(r, label_col, files["train"], line)
                                       for line, r in rows["train"]}))
    if len(label_names) < 2:
        raise data_error(files["train"], None, f"column '{label_col}' has only one distinct "
                         f"label ({label_names[0]}); classification needs at least 2")
    labels = {label: i for i, label in enumerate(label_names)}
    splits = {}
    for split, path in files.items():
        examples = tuple(Example(
            text=text_field(r, text_col, path, line),
            text_pair=text_field(r, text_pair_col, path, line) if text_pair_col else None,
            label=label_index(r, label_col, labels, path, line,
                              hint=f" (the labels in {files['train'].name})"))
            for line, r in rows[split])
        splits[split] = P(_given, examples)
    return Task(name=name, kind="pair_classification" if text_pair_col else "classification",
                label_names=label_names, metric="accuracy",
                prompt="{text}\n{text_pair}" if text_pair_col else "{text}",
                description=f"user files: {', '.join(f'{s}={p}' for s, p in files.items())}",
                splits=splits, uses_data_root=False)


def _given(examples: tuple[Example, ...], root: Path) -> list[Example]:
    return list(examples)
