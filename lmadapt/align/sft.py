"""Supervised fine-tuning on instruction data: the prompt in the model's chat template, the loss
on the response tokens only (the prompt's labels are -100), through trainer.fit.

Dev: greedy responses scored by the task's metric (ROUGE-L for alpaca) and the mean response-
token negative log-likelihood (`nll`)."""
from __future__ import annotations

import torch

from ..metrics import compute
from ..precision import autocast
from .common import ChatFormat, in_batches, run, token_logprobs


class SFT:
    """trainer.Objective: the LM loss on the response tokens, each token weighing the same."""

    def __init__(self, adapted, task, *, chat: bool | None = None, max_length: int = 256,
                 max_response_length: int = 128, max_new_tokens: int = 64, eval_batch_size: int = 16):
        if not adapted.causal or adapted.head is not None:
            raise ValueError("SFT trains a causal LM: attach without a classification or reward head")
        self.adapted, self.task = adapted, task
        self.fmt = ChatFormat(adapted.tokenizer, task, chat, max_length, max_response_length)
        self.max_new_tokens, self.eval_batch_size = max_new_tokens, eval_batch_size

    def encode(self, example) -> dict:
        if not example.target:
            raise ValueError(f"task '{self.task.name}': SFT needs a response (target) for every example")
        return self.fmt.sequence(example, example.target)

    def weight(self, feat) -> float:
        return sum(1 for t in feat["labels"] if t != -100)

    def loss(self, model, feats, device):
        return model(**self.fmt.collate(feats, device)).loss

    @torch.no_grad()
    def evaluate(self, adapted, examples, precision, progress) -> dict:
        adapted.eval()
        tok = adapted.tokenizer

        def nll(fs):  # each response's mean token NLL
            batch = self.fmt.collate(fs, adapted.device)
            lp = token_logprobs(adapted, batch["input_ids"], batch["attention_mask"], batch["labels"])
            n = (batch["labels"] != -100).sum(1).clamp(min=1)
            return (-lp.sum(1) / n).tolist()

        def decode(fs):
            batch = self.fmt.collate(fs, adapted.device)
            new = adapted.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=self.max_new_tokens)
            return [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
        with autocast(precision, adapted.device):
            losses = in_batches([self.encode(ex) for ex in examples], self.eval_batch_size, nll, "dev nll", progress)
            texts = in_batches([{"input_ids": self.fmt.prompt_ids(ex)} for ex in examples], self.eval_batch_size,
                               decode, "dev generate", progress)
        metrics = compute(self.task.metric, texts, [ex.references or [ex.target] for ex in examples])
        return metrics | {"nll": sum(losses) / len(losses)}


def sft(adapted, task, *, chat: bool | None = None, max_response_length: int = 128, out=None, resume=False,
        seed=0, data_root=None, max_train=None, train_examples=None, dev_examples=None, **config) -> dict:
    """Fine-tune `adapted` (an LM with any method attached) on an instruction task; writes
    out/result.json (history: per-step loss) and out/best/. -> the result dict."""
    from ..api import _task
    task = _task(task)
    max_length = config.get("max_length", 256)
    config["max_length"] = max_length
    objective = SFT(adapted, task, chat=chat, max_length=max_length, max_response_length=max_response_length,
                    max_new_tokens=config.get("max_new_tokens", 64), eval_batch_size=config.get("eval_batch_size", 16))
    return run(adapted, task, objective, out=out, resume=resume, seed=seed, data_root=data_root,
               max_train=max_train, train_examples=train_examples, dev_examples=dev_examples,
               extra={"stage": "sft", "chat_template": objective.fmt.chat,
                      "max_response_length": max_response_length}, **config)
