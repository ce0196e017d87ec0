"""Probing: a linear or MLP head on frozen representations (CLS, mean or last-token pooling, any
layer). The backbone never changes, so the trainer computes features once and trains the head on
them in seconds."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapted import pool
from ..batching import Encoder
from ..evaluation import by_length, progress_bar
from ..models import is_causal
from ..precision import autocast
from .base import Method, register


@register
@dataclass(frozen=True)
class Probe(Method):
    name = "probe"
    summary = "linear/MLP head on frozen features (cached); pooling cls|mean|last; any layer"
    frozen_features = True
    default_lr = 1e-3
    default_epochs = 30.0

    def inject(self, adapted) -> None:
        if adapted.head is None:
            raise ValueError("method 'probe' needs a classification task (num_labels); "
                             "for generation tasks use a delta method or 'full'")


@torch.no_grad()
def extract_features(model, tokenizer, task, examples, specs, *, max_length: int = 128, batch_size: int = 32,
                     precision: str = "auto", progress: bool = False, desc: str = "features"):
    """Pooled features for several (layer, pooling) specs from ONE forward pass per batch:
    -> {(layer, pooling): (X (N, H), y (N,))} in the order of `examples`. Probing sweeps over
    layers and poolings cost one pass over the data instead of one per configuration. Batches are
    formed by input length (less padding), under the requested precision."""
    enc = Encoder(tokenizer, is_causal(model), max_length)
    feats = [enc.classification(ex) for ex in examples]
    out = {s: [None] * len(feats) for s in specs}
    model.eval()
    with autocast(precision, model.device), progress_bar(len(feats), desc, progress) as bar:
        for idx in by_length(feats, batch_size):
            batch = enc.collate([feats[i] for i in idx], model.device)
            batch.pop("labels", None)
            mask = batch["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            o = model.base_model(**batch, position_ids=pos, output_hidden_states=True)
            for layer, pooling in specs:
                h = o.last_hidden_state if layer == -1 else o.hidden_states[layer]
                for i, row in zip(idx, pool(h, mask, pooling).float().cpu()):
                    out[(layer, pooling)][i] = row
            bar.update(len(idx))
    y = torch.tensor([f.get("labels", -1) for f in feats], dtype=torch.long)
    return {s: (torch.stack(v) if v else torch.zeros(0, model.config.hidden_size), y) for s, v in out.items()}
