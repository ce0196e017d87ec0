"""Examples -> token ids -> padded batches.

Classification: encoders get the tokenizer's pair encoding; causal LMs get `text\\ntext_pair`;
with a verbalizer head, its template decides the input (prompting/template.py). A label is a
class index, or a tuple of C teacher scores (distillation: PET's soft labels) -> labels (B, C).
Generation: `task.prompt` formatted with the example, then " target<eos>"; the loss sees the
target tokens only (labels = -100 elsewhere). Causal LMs pad left, encoders right.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tasks import CLASSIFICATION_KINDS


def is_classification(task) -> bool:
    return task.kind in CLASSIFICATION_KINDS


def prompt_text(task, ex) -> str:
    return task.format(ex)


@dataclass
class Encoder:
    """Turns examples into id lists once (tokenizing is the slow part), then pads on demand."""
    tokenizer: object
    causal: bool
    max_length: int = 128
    max_target_length: int = 64
    template: object = None          # prompting.Template of a verbalizer head, or None

    def classification(self, ex) -> dict:
        tok = self.tokenizer
        if self.template is not None:
            out = self.template.encode(tok, ex, self.causal, self.max_length)
        elif not self.causal:
            enc = tok(ex.text, ex.text_pair, truncation=True, max_length=self.max_length)
            out = {"input_ids": enc["input_ids"]}
            if "token_type_ids" in enc:
                out["token_type_ids"] = enc["token_type_ids"]
        else:
            text = ex.text if ex.text_pair is None else f"{ex.text}\n{ex.text_pair}"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            out = {"input_ids": ids[-self.max_length:]}  # keep the end: last-token pooling reads it
        if isinstance(ex.label, (tuple, list)):  # soft label: C teacher scores
            out["labels"] = tuple(float(v) for v in ex.label)
        elif ex.label is not None:
            out["labels"] = int(ex.label)
        return out

    def prompt_ids(self, task, ex) -> list[int]:
        ids = self.tokenizer(prompt_text(task, ex), add_special_tokens=False)["input_ids"]
        # Truncate the source from the left side of the budget, keeping the prompt's tail
        # (the instruction words just before the answer).
        budget = self.max_length - self.max_target_length if ex.target is not None else self.max_length
        return ids[-budget:] if len(ids) > budget else ids

    def target_ids(self, target: str) -> list[int]:
        ids = self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        ids = ids[: self.max_target_length - 1]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def generation(self, task, ex, with_target: bool = True, target: str | None = None) -> dict:
        src = self.prompt_ids(task, ex)
        tgt_text = target if target is not None else ex.target
        if not with_target or tgt_text is None:
            return {"input_ids": src}
        tgt = self.target_ids(tgt_text)
        return {"input_ids": src + tgt, "labels": [-100] * len(src) + tgt}

    def encode(self, task, ex, with_target: bool = True) -> dict:
        if is_classification(task):
            return self.classification(ex)
        if not self.causal:
            raise ValueError(f"task '{task.name}' is a {task.kind} task and needs a causal LM; "
                             "this model is an encoder")
        return self.generation(task, ex, with_target)

    def collate(self, feats: list[dict], device=None) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        T = max(len(f["input_ids"]) for f in feats)
        left = self.causal

        def padded(seq, value):
            fill = [value] * (T - len(seq))
            return fill + list(seq) if left else list(seq) + fill

        batch = {
            "input_ids": torch.tensor([padded(f["input_ids"], pad) for f in feats]),
            "attention_mask": torch.tensor([padded([1] * len(f["input_ids"]), 0) for f in feats]),
        }
        if "token_type_ids" in feats[0]:
            batch["token_type_ids"] = torch.tensor([padded(f["token_type_ids"], 0) for f in feats])
        if "labels" in feats[0]:
            lab = [f["labels"] for f in feats]
            if isinstance(lab[0], list):      # token labels (generation), padded like the input
                batch["labels"] = torch.tensor([padded(x, -100) for x in lab])
            elif isinstance(lab[0], tuple):   # soft labels (B, C)
                batch["labels"] = torch.tensor(lab, dtype=torch.float32)
            else:
                batch["labels"] = torch.tensor(lab)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch
