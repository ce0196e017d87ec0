"""Probing: a linear or MLP head on frozen representations (CLS, mean or last-token pooling, any
layer). The backbone never changes, so the trainer computes features once and trains the head on
them in seconds."""
from __future__ import annotations

from dataclasses import dataclass

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
