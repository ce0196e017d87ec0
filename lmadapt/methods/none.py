"""No delta: the base model as it is. With the verbalizer head this is zero-shot prompting (the
pretrained LM head classifies; nothing trains); with a linear head only the head trains (like
`probe`, without its feature cache)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register


@register
@dataclass(frozen=True)
class NoDelta(Method):
    name = "none"
    summary = "nothing injected: zero-shot prompting with the verbalizer head; with a linear head, the head alone"

    def inject(self, adapted) -> None:
        pass
