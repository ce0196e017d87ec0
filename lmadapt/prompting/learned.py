"""Learned verbalizers that replace the label words' log-probs by trained tensors at the mask.

- `soft` (WARP, Hambardzumyan et al. 2021): one embedding per label in the LM head's output space,
  initialized from the label words' output embeddings (their mean, and the output bias where the
  LM head has one):

      scores[b, c] = f(h_b) . e_c + beta_c                                          (B, C)

  with h_b the mask's hidden state and f what the LM head applies before its output embedding
  (identity for a causal LM, BERT's dense + LayerNorm transform for an MLM). At init the scores
  differ from the manual verbalizer's single-token log-probs by log Z(h_b) only, a constant per
  row: the same predictions. Trained: e (S, C, H) and beta (S, C), with a slot dim (per-user).
- `prototypical` (ProtoVerb, Cui et al. 2022): v_b = W f(h_b) (B, D), a linear map of the mask's
  hidden state, and one prototype p_c (D,) per label; scores are cosine similarities / tau:

      scores[b, c] = cos(v_b, p_c) / tau                                            (B, C)

  trained with objectives.prototype_contrastive (instance <-> prototype) plus `instance_weight`
  x objectives.instance_contrastive (instance <-> instance, same label as positives). W starts as
  a random projection (D x H, N(0, 1/D)), which keeps cosines about as they were, and p_c = W e_c
  with e_c the label words' mean output embedding: the label words seed the prototypes.
  Trained: W (S, D, H) and p (S, C, D).

Both are heads in lmadapt.heads.HEADS (`--head soft`, `--verbalizer soft:negative=terrible,...`),
read the mask like the verbalizer head (its template, any method but probe), and their tensors are
head parameters: they train with the method's and are saved in the artifact (method.json records
the template and the init words). Words may be multi-token (their tokens' mean embedding).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import HEADS, HeadInputs, slotted
from ..objectives import instance_contrastive, prototype_contrastive
from .head import VerbalizerHead, lm_head_of
from .verbalizer import word_token_ids


def lm_features(model, h: torch.Tensor) -> torch.Tensor:
    """(.., H) mask hidden -> (.., H) what the LM head multiplies with its output embedding."""
    lm, out = lm_head_of(model), model.get_output_embeddings()
    if out is None or lm is out:
        return h
    transform = getattr(getattr(lm, "predictions", None), "transform", None)
    if transform is None:
        raise ValueError(f"{model.config.model_type}: cannot find what its MLM head applies before the output "
                         "embedding (expected cls.predictions.transform); use a causal LM or a BERT-style MLM")
    return transform(h)


def label_embeddings(adapted, verbalizer, space: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H) mean output embedding of each label's words (a word: its tokens' mean), (C,) bias."""
    out = adapted.model.get_output_embeddings()
    E = out.weight.detach().float()                                     # (V, H)
    bias = getattr(out, "bias", None)
    ids = word_token_ids(adapted.tokenizer, verbalizer, space)
    flat = verbalizer.flat()
    C = len(verbalizer.words)
    emb, b = torch.zeros(C, E.shape[1], device=E.device), torch.zeros(C, device=E.device)
    for c in range(C):
        rows = [torch.tensor(i, device=E.device) for (label, _), i in zip(flat, ids) if label == c]
        emb[c] = torch.stack([E[r].mean(0) for r in rows]).mean(0)
        if bias is not None:
            b[c] = torch.stack([bias.detach().float()[r].mean() for r in rows]).mean()
    return emb, b


class _MaskHead(VerbalizerHead):
    """A verbalizer-family head whose scores come from trained tensors: no word continuation."""

    def __init__(self, adapted, template, verbalizer, token_score="sum", word_combine="mean", calibration=None):
        super().__init__(adapted, template, verbalizer, token_score, word_combine, calibration)
        self.needs_cache = False      # only the mask position is read
        object.__setattr__(self, "_model", adapted.model)
        self._init_emb, self._init_bias = label_embeddings(adapted, self.verbalizer,
                                                           self.template.space_before_mask(self.causal))

    def features(self, x: HeadInputs) -> torch.Tensor:
        """(B, H) float32: the LM head's input at the mask."""
        h = self.mask_hidden(x)
        with torch.autocast(h.device.type, enabled=False):
            w = next(self._lm.parameters())
            return lm_features(self._model, h.to(w.dtype)).float()


class SoftVerbalizerHead(_MaskHead):
    kind = "soft"

    def __init__(self, adapted, template, verbalizer, token_score="sum", word_combine="mean", calibration=None):
        super().__init__(adapted, template, verbalizer, token_score, word_combine, calibration)
        S = adapted.slots.n
        self.label_emb = slotted(nn.Parameter(self._init_emb.unsqueeze(0).repeat(S, 1, 1).clone()))   # (S, C, H)
        self.label_bias = slotted(nn.Parameter(self._init_bias.unsqueeze(0).repeat(S, 1).clone()))    # (S, C)

    def forward(self, x: HeadInputs) -> torch.Tensor:
        f = self.features(x)                                                  # (B, H)
        e, b = self.slots.pick(self.label_emb), self.slots.pick(self.label_bias)
        scores = f @ e.T + b if e.dim() == 2 else torch.einsum("bh,bch->bc", f, e) + b
        return self.calibrate_scores(scores)                                  # (B, C)


class PrototypicalHead(_MaskHead):
    kind = "prototypical"

    def __init__(self, adapted, template, verbalizer, token_score="sum", word_combine="mean", calibration=None,
                 dim: int = 128, temperature: float = 0.1, instance_weight: float = 1.0):
        super().__init__(adapted, template, verbalizer, token_score, word_combine, calibration)
        if int(dim) < 1 or float(temperature) <= 0 or float(instance_weight) < 0:
            raise ValueError(f"prototypical head: dim must be >= 1, temperature > 0, instance_weight >= 0; got "
                             f"dim={dim}, temperature={temperature}, instance_weight={instance_weight}")
        self.dim, self.temperature, self.instance_weight = int(dim), float(temperature), float(instance_weight)
        S, H = adapted.slots.n, self._init_emb.shape[1]
        W = torch.randn(self.dim, H, device=self._init_emb.device) / self.dim ** 0.5        # (D, H)
        protos = F.normalize(self._init_emb @ W.T, dim=-1)                                     # (C, D)
        self.proj = slotted(nn.Parameter(W.unsqueeze(0).repeat(S, 1, 1).clone()))            # (S, D, H)
        self.prototypes = slotted(nn.Parameter(protos.unsqueeze(0).repeat(S, 1, 1).clone()))  # (S, C, D)
        self.loss = self._loss
        self._emb = None

    def embed(self, x: HeadInputs) -> torch.Tensor:
        f, W = self.features(x), self.slots.pick(self.proj)
        return f @ W.T if W.dim() == 2 else torch.einsum("bh,bdh->bd", f, W)               # (B, D)

    def forward(self, x: HeadInputs) -> torch.Tensor:
        v = F.normalize(self.embed(x), dim=-1)                                # (B, D)
        p = F.normalize(self.slots.pick(self.prototypes), dim=-1)             # (C, D) or (B, C, D)
        sim = v @ p.T if p.dim() == 2 else torch.einsum("bd,bcd->bc", v, p)
        self._emb = v if self.training else None    # the instance-instance term reads the batch's embeddings
        return self.calibrate_scores(sim / self.temperature)                 # (B, C)

    def _loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = prototype_contrastive(scores, labels)
        if self.instance_weight and self._emb is not None and len(self._emb) == len(labels):
            loss = loss + self.instance_weight * instance_contrastive(self._emb, labels, self.temperature)
        return loss

    def config(self, slot: int = 0) -> dict:
        return super().config(slot) | {"dim": self.dim, "temperature": self.temperature,
                                       "instance_weight": self.instance_weight}


def _builder(cls):
    def build(adapted, kind: str, **args):
        if "template" not in args or "verbalizer" not in args:
            raise ValueError(f"the {kind} head needs a template and a verbalizer (its init words): attach(..., "
                             "template=..., verbalizer=...), or a task with default patterns")
        import inspect
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "adapted"}
        bad = sorted(set(args) - known)
        if bad:
            raise ValueError(f"the {kind} head has no argument {', '.join(bad)}; its arguments: {', '.join(sorted(known))}")
        return cls(adapted, **args)
    return build


HEADS["soft"] = _builder(SoftVerbalizerHead)
HEADS["prototypical"] = _builder(PrototypicalHead)
