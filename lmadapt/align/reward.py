"""Reward model: the LM with the scalar `reward` head (heads.RewardHead: a score at the last
token), any method as the trainable part (LoRA on a frozen backbone, or full), trained with the
pairwise Bradley-Terry loss on chosen/rejected responses through trainer.fit. Dev: pairwise
accuracy (the chosen response scored higher). The artifact loads like any other
(lmadapt.load_adapted); `score` rates responses."""
from __future__ import annotations

import torch

from ..precision import autocast
from .common import ChatFormat, in_batches, run


def attach_reward_model(model, method: str, tokenizer, **method_args):
    """`model` + `method` + the reward head: an Adapted reward model to train."""
    from ..api import attach
    return attach(model, method, tokenizer=tokenizer, num_labels=1, label_names=["reward"], head="reward",
                  **method_args)


def _check(adapted):
    if getattr(adapted, "head_kind", None) != "reward":
        raise ValueError("a reward model needs the reward head: attach with head='reward', num_labels=1 "
                         "(align.reward.attach_reward_model)")


class RewardObjective:
    """trainer.Objective: Bradley-Terry on each pair; one pair weighs one."""

    def __init__(self, adapted, task, *, chat: bool | None = None, max_length: int = 256,
                 max_response_length: int = 128, eval_batch_size: int = 16):
        _check(adapted)
        if task.kind != "preference":
            raise ValueError(f"task '{task.name}' is a {task.kind} task; a reward model trains on preference "
                             "pairs (hh_rlhf, ultrafeedback)")
        self.task = task
        self.fmt = ChatFormat(adapted.tokenizer, task, chat, max_length, max_response_length)
        self.eval_batch_size = eval_batch_size

    def encode(self, example) -> dict:
        return {"chosen": self.fmt.sequence(example, example.target)["input_ids"],
                "rejected": self.fmt.sequence(example, example.rejected)["input_ids"]}

    def weight(self, feat) -> float:
        return 1

    def _scores(self, model, feats, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [{"input_ids": f["chosen"]} for f in feats] + [{"input_ids": f["rejected"]} for f in feats]
        batch = self.fmt.collate(rows, device)
        labels = torch.tensor([1] * len(feats) + [0] * len(feats), device=device)
        out = model(**batch, labels=labels)
        chosen, rejected = out.logits[:, 0].float().chunk(2)
        return out.loss, chosen, rejected

    def loss(self, model, feats, device):
        loss, chosen, rejected = self._scores(model, feats, device)
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {"accuracy": float((chosen > rejected).float().mean()),
                      "margin": float((chosen - rejected).mean())}

    @torch.no_grad()
    def evaluate(self, adapted, examples, precision, progress) -> dict:
        adapted.eval()
        with autocast(precision, adapted.device):
            pairs = in_batches([self.encode(ex) for ex in examples], self.eval_batch_size,
                                 lambda fs: list(zip(*[t.tolist() for t in self._scores(adapted, fs, adapted.device)[1:]])),
                                 "dev pairs", progress)
        margins = [c - r for c, r in pairs]
        return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
                "margin": sum(margins) / len(margins)}


@torch.no_grad()
def score(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores (B,) of whole sequences (prompt + response, left-padded) under a reward model."""
    _check(reward_model)
    return reward_model(input_ids.to(reward_model.device), attention_mask.to(reward_model.device)).logits[:, 0].float()


def train_reward(adapted, task, *, chat: bool | None = None, max_response_length: int = 128, out=None,
                 resume=False, seed=0, data_root=None, max_train=None, train_examples=None, dev_examples=None,
                 **config) -> dict:
    """Train a reward model (attach_reward_model) on a preference task; writes out/result.json
    (history: per-step loss, accuracy, margin) and out/best/. -> the result dict."""
    from ..api import _task
    task = _task(task)
    config.setdefault("max_length", 256)
    objective = RewardObjective(adapted, task, chat=chat, max_length=config["max_length"],
                                max_response_length=max_response_length,
                                eval_batch_size=config.get("eval_batch_size", 16))
    return run(adapted, task, objective, out=out, resume=resume, seed=seed, data_root=data_root,
               max_train=max_train, train_examples=train_examples, dev_examples=dev_examples,
               extra={"stage": "reward", "chat_template": objective.fmt.chat,
                      "max_response_length": max_response_length}, **config)
