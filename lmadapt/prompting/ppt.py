"""Pre-trained prompt tuning (PPT, Gu et al. 2022): soft prompts pre-trained on a self-supervised
task built from unlabeled text, then the initialization of prompt tuning on a few-shot task.

The self-supervised task is PPT's sentence-pair format (its "next sentence prediction" with three
classes), built from documents:

    (s_i, s_i+1)            next            -> "Yes"
    (s_i, s_j), |i - j| > 1 same document   -> "Maybe"
    (s_i from d, s from d') other document  -> "No"

read through PPT's pattern `{text} ? {mask}, {text_pair}` (a causal LM reads it as
`{text}, {text_pair} ? {mask}`, see template.py) by the verbalizer head. The prompt is the
`prompt` method's table (k soft tokens prepended, nothing else trains); `pretrain_prompt` trains it
with the ordinary trainer and leaves OUT/best, an ordinary prompt-tuning artifact. Then:

    lmadapt train --task sst2 --shots 16 --method prompt --init pretrained:OUT ...

loads that table as the initial prompt (methods/prompt.py; k and the base model must match).
Departures from PPT: one of its three formats (sentence-pair; not the single-sentence or the
multiple-choice ones), a 135M model instead of T5-XXL, and a few thousand pairs instead of 10 GB.
"""
from __future__ import annotations

import re

import torch

from ..data import Example

PPT_TEMPLATE = "{text} ? {mask}, {text_pair}"
PPT_LABELS = ("next", "same_document", "other_document")
PPT_VERBALIZER = "next=Yes,same_document=Maybe,other_document=No"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_of(document: str, min_words: int = 3) -> list[str]:
    """A document split after . ! ? followed by whitespace; sentences of >= min_words words."""
    return [s.strip() for s in _SENTENCE_END.split(document) if len(s.split()) >= min_words]


def sentence_pairs(documents, n: int, seed: int = 0) -> list[Example]:
    """n balanced pairs (label i % 3) of the three kinds above, drawn with `seed`."""
    docs = [s for s in (sentences_of(d) for d in documents) if len(s) >= 2]
    long = [s for s in docs if len(s) >= 3]
    if len(docs) < 2 or not long:
        raise ValueError("PPT's sentence pairs need at least 2 documents of 2+ sentences and one of 3+ "
                         f"(got {len(docs)} with 2+, {len(long)} with 3+); give longer documents")
    g = torch.Generator().manual_seed(seed)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]
    out = []
    for i in range(n):
        label = i % 3
        if label == 0:
            d = pick(docs)
            j = int(torch.randint(len(d) - 1, (1,), generator=g))
            a, b = d[j], d[j + 1]
        elif label == 1:
            d = pick(long)
            while True:
                j, k = (int(v) for v in torch.randint(len(d), (2,), generator=g))
                if abs(j - k) > 1:
                    break
            a, b = d[j], d[k]
        else:
            while True:
                d1, d2 = pick(docs), pick(docs)
                if d1 is not d2:
                    break
            a, b = pick(d1), pick(d2)
        out.append(Example(text=a, text_pair=b, label=label))
    return out


def ppt_task(train, dev, verbalizer: str = PPT_VERBALIZER):
    from ..tasks import Task
    return Task(name="ppt_sentence_pairs", kind="pair_classification", label_names=PPT_LABELS, metric="accuracy",
                splits={"train": lambda root: list(train), "dev": lambda root: list(dev)}, uses_data_root=False,
                description="PPT's self-supervised sentence-pair task", pvps=((PPT_TEMPLATE, verbalizer),))


def documents_of(task_names, data_root=None, limit: int | None = None) -> list[str]:
    """Unlabeled documents: the texts of the named tasks' first split (train, else dev/test)."""
    from ..data import subsample
    from ..tasks import get_task
    docs = []
    for name in task_names:
        t = get_task(name)
        split = next(s for s in ("train", "dev", "test") if s in t.splits) if t.splits else None
        docs += [ex.text for ex in t.load(split, data_root) if ex.text]
    return subsample(docs, limit) if limit else docs


def pretrain_prompt(model, tok, documents, out, *, k: int = 20, pairs: int = 2000, dev_pairs: int = 300,
                    seed: int = 0, init: str = "vocab", verbalizer: str = PPT_VERBALIZER, **train_config) -> dict:
    """Train a k-token prompt on sentence pairs from `documents`; OUT/best is the artifact that
    `--init pretrained:OUT` loads. -> the train result (dev accuracy on held-out pairs)."""
    from ..api import attach, train
    examples = sentence_pairs(documents, pairs + dev_pairs, seed)
    task = ppt_task(examples[:pairs], examples[pairs:], verbalizer)
    adapted = attach(model, "prompt", task=task, tokenizer=tok, k=k, init=init, seed=seed, init_seed=seed)
    return train(adapted, task, seed=seed, out=out, ood=[], **train_config)


def pretrained_table(spec: str, model) -> torch.Tensor:
    """'pretrained:DIR' -> the (k, H) prompt table of the artifact in DIR (or DIR/best), checked
    against `model` (the base model it was trained on)."""
    from pathlib import Path

    from ..adapted import check_base, read_artifact
    directory = Path(spec.split(":", 1)[1])
    if (directory / "best" / "method.json").exists():
        directory = directory / "best"
    meta, state = read_artifact(directory)
    if meta["method"] not in ("prompt", "ptuning") or "delta.prompt.table" not in state:
        raise ValueError(f"{directory}: init=pretrained needs a prompt-tuning artifact (method prompt or ptuning, "
                         f"as `lmadapt ppt` writes); this one is method '{meta['method']}'")
    check_base(meta, model, str(directory))
    return state["delta.prompt.table"].float()
