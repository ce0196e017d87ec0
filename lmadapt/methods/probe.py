"""Probing: a linear or MLP head on frozen representations (CLS, mean or last-token pooling, any
layer). The backbone never changes, so the trainer computes features once and trains the head on
them in seconds."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
def extract_features(model, tokenizer, task, examples, specs, *, max_length: int = 128, batch_size: int = 32):
    """Pooled features for several (layer, pooling) specs from ONE forward pass per batch:
    -> {(layer, pooling): (X (N, H), y (N,))}. Probing sweeps over layers and poolings cost one
    pass over the data instead of one per configuration."""
    from ..adapted import pool
    from ..batching import Encoder
    from ..models import is_causal
    enc = Encoder(tokenizer, is_causal(model), max_length)
    feats = [enc.classification(ex) for ex in examples]
    out = {s: [] for s in specs}
    labels = []
    model.eval()
    for i in range(0, len(feats), batch_size):
        batch = enc.collate(feats[i:i + batch_size], model.device)
        labels.append(batch.pop("labels"))
        mask = batch["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        o = model.base_model(**batch, position_ids=pos, output_hidden_states=True)
        for layer, pooling in specs:
            h = o.last_hidden_state if layer == -1 else o.hidden_states[layer]
            out[(layer, pooling)].append(pool(h, mask, pooling).float().cpu())
    y = torch.cat(labels).cpu()
    return {s: (torch.cat(v), y) for s, v in out.items()}
