"""DPO (Rafailov et al. 2023): the policy's and the reference's log-probs of the chosen and the
rejected response, objectives.dpo_loss, through trainer.fit. The reference is the policy with its
delta turned off (`Adapted.disabled()`: no second copy of the model), a frozen copy only for
`full`; with precompute_ref=True each pair's reference log-probs are computed once, on its first
visit, and kept. Dev: implicit-reward accuracy (beta * log-ratio of chosen above rejected's) and
margin."""
from __future__ import annotations

import torch

from ..objectives import dpo_loss
from ..precision import autocast
from .common import ChatFormat, in_batches, Reference, response_logprobs, run


class DPO:
    """trainer.Objective: the DPO loss per pair; one pair weighs one."""

    def __init__(self, adapted, task, *, beta: float = 0.1, label_smoothing: float = 0.0,
                 precompute_ref: bool = False, chat: bool | None = None, max_length: int = 256,
                 max_response_length: int = 128, eval_batch_size: int = 16):
        if not adapted.causal or adapted.head is not None:
            raise ValueError("DPO trains a causal LM policy: attach without a classification or reward head")
        if task.kind != "preference":
            raise ValueError(f"task '{task.name}' is a {task.kind} task; DPO trains on preference pairs "
                             "(hh_rlhf, ultrafeedback)")
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, label_smoothing)  # checks
        self.adapted, self.task = adapted, task
        self.beta, self.label_smoothing, self.precompute_ref = beta, label_smoothing, precompute_ref
        self.fmt = ChatFormat(adapted.tokenizer, task, chat, max_length, max_response_length)
        self.reference = Reference(adapted)
        self.eval_batch_size = eval_batch_size

    def encode(self, example) -> dict:
        return {"chosen": self.fmt.sequence(example, example.target),
                "rejected": self.fmt.sequence(example, example.rejected)}

    def weight(self, feat) -> float:
        return 1

    def _batch(self, feats, device):
        return self.fmt.collate([f["chosen"] for f in feats] + [f["rejected"] for f in feats], device)  # (2B, T)

    @torch.no_grad()
    def _reference(self, feats, batch) -> torch.Tensor:
        """Reference log-probs (2B,): chosen rows then rejected rows."""
        if self.precompute_ref and all("ref" in f for f in feats):
            return torch.tensor([f["ref"][0] for f in feats] + [f["ref"][1] for f in feats], device=batch["input_ids"].device)
        with self.reference.model() as ref:
            lp = response_logprobs(ref, batch)
        if self.precompute_ref:  # kept on the encoded pair itself: fit encodes each example once
            c, r = lp.chunk(2)
            for f, a, b in zip(feats, c.tolist(), r.tolist()):
                f["ref"] = (a, b)
        return lp

    def _terms(self, feats, device):
        batch = self._batch(feats, device)
        ref = self._reference(feats, batch)
        pol = response_logprobs(self.adapted, batch)
        (pc, pr), (rc, rr) = pol.chunk(2), ref.chunk(2)
        loss, cr, rj = dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)
        return loss, cr, rj, pc.detach(), pr.detach()

    def loss(self, model, feats, device):
        loss, cr, rj, pc, pr = self._terms(feats, device)
        return loss, {"reward_accuracy": float((cr > rj).float().mean()), "margin": float((cr - rj).mean()),
                      "reward_chosen": float(cr.mean()), "reward_rejected": float(rj.mean()),
                      "logp_chosen": float(pc.mean()), "logp_rejected": float(pr.mean())}

    @torch.no_grad()
    def evaluate(self, adapted, examples, precision, progress) -> dict:
        adapted.eval()
        with autocast(precision, adapted.device):
            def run_batch(fs):
                loss, cr, rj, _, _ = self._terms(fs, adapted.device)
                return [(float(a), float(b)) for a, b in zip(cr, rj)]
            rewards = in_batches([self.encode(ex) for ex in examples], self.eval_batch_size, run_batch,
                                   "dev pairs", progress)
        margins = [c - r for c, r in rewards]
        return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
                "margin": sum(margins) / len(margins),
                "reward_chosen": sum(c for c, _ in rewards) / len(rewards),
                "reward_rejected": sum(r for _, r in rewards) / len(rewards)}


def dpo(adapted, task, *, beta: float = 0.1, label_smoothing: float = 0.0, precompute_ref: bool = False,
        chat: bool | None = None, max_response_length: int = 128, out=None, resume=False, seed=0, data_root=None,
        max_train=None, train_examples=None, dev_examples=None, **config) -> dict:
    """DPO-train `adapted` (an LM with any method attached) on a preference task; writes
    out/result.json (history: per-step loss, reward accuracy, margin, ...) and out/best/."""
    from ..api import _task
    task = _task(task)
    config.setdefault("max_length", 256)
    objective = DPO(adapted, task, beta=beta, label_smoothing=label_smoothing, precompute_ref=precompute_ref,
                    chat=chat, max_length=config["max_length"], max_response_length=max_response_length,
                    eval_batch_size=config.get("eval_batch_size", 16))
    return run(adapted, task, objective, out=out, resume=resume, seed=seed, data_root=data_root,
               max_train=max_train, train_examples=train_examples, dev_examples=dev_examples,
               extra={"stage": "dpo", "beta": beta, "label_smoothing": label_smoothing,
                      "precompute_ref": precompute_ref, "reference": "copy" if objective.reference.copy is not None
                      else "disabled adapter", "chat_template": objective.fmt.chat,
                      "max_response_length": max_response_length}, **config)
