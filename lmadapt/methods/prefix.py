"""Key/value prefixes in every attention layer: k trainable positions that every real token can
attend to, on top of the frozen model.

- `prefix`   (prefix tuning, Li & Liang 2021): reparameterized while training, as in the paper and
  PEFT's PrefixEncoder: P' (k, d) -> Linear(d, prefix_hidden) -> tanh -> Linear(.., F) = P (k, F).
- `ptuning2` (P-tuning v2, Liu et al. 2022): the same deep prompts trained directly (no MLP),
  meant for NLU with the classification head (works for generation too).

One position's vector has F = L * 2 * n_kv * head_dim entries, laid out as PEFT lays them out:
index ((layer * 2 + {0: key, 1: value}) * n_kv + head) * head_dim + d, so PEFT's saved
`prompt_embeddings` load unchanged. With grouped-query attention n_kv is the number of key/value
heads (arch.kv_shape), not of query heads.

As with P-tuning (prompt.py), the MLP exists only while training with one slot; artifacts store
P (the MLP is dropped), and a loaded artifact, or any model with slots > 1, is a plain (S, k, F)
table. Positions: real tokens are numbered from k (PEFT's convention), see Adapted.encode().

Initialization (`init`): 'random' is N(0, 1), as PEFT's nn.Embedding and P-tuning v2's code
(attach's init_seed fixes it); 'vocab' is the frozen model's own keys/values of k tokens drawn
uniformly from the vocabulary (the method's `seed` picks them), run through the model as one
sequence; `init_text` (which overrides `init`) is the same for real words (Li & Liang's "init
with activations of real words"): the text is tokenized, repeated to k tokens if shorter, run
through the model, and the cache of its first k tokens taken. With reparam on, P' and the first
Linear stay random and, for 'vocab' and text, the output Linear (W2, b2) is solved by least
squares so that MLP(P') equals those keys/values: exact when prefix_hidden >= k (the system is
underdetermined; we take the minimum-norm solution), the best fit otherwise.

Why `ptuning2` defaults to 'vocab': N(0, 1) keys/values in every layer wreck a pre-LN LLaMA
model before training starts. SmolLM2's own values have std 0.04 in layer 0 and ~0.5 above; its
perplexity on 64 SST-2 dev sentences is 447 alone, 840,569 behind a random 20-position prefix,
332 / 355 behind a 'vocab' one (seeds 0 / 1) and 180 behind a text one (bench/prefix_init.py).
The SST-2 lr sweep found no learning rate at which the random init recovered (docs/methods.md).
`prefix` started from its MLP's small random outputs (perplexity 721) until `lmadapt compare`
showed what that costs: on SST-2 (SmolLM2, bf16, verbalizer head, default lr 3e-4) 'random'
reaches 66.1 +- 3.3 at 16 shots (3 seeds) and 80.6 at 1,000 sentences, 'vocab' 79.9 +- 1.8 and
87.4 (fine-tuning: 83.7, 87.4); on 50 E2E examples BLEU 21.8 against 58.0 (init_text
'table-to-text': 60.5). So `prefix` defaults to 'vocab' too; `init=random` keeps PEFT's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import DynamicCache

from ..arch import kv_shape
from .base import Method, register
from .prompt import SoftTable, export_folded, import_folded


class PrefixMLP(nn.Module):
    """Li & Liang's reparameterization, with PEFT PrefixEncoder's layer names:
    P' = embedding (k, d) -> transform: Linear(d, hidden) -> tanh -> Linear(hidden, F) -> (k, F)."""

    def __init__(self, k: int, dim: int, hidden: int, out: int):
        super().__init__()
        self.embedding = nn.Embedding(k, dim)              # N(0, 1), as in PEFT
        self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)       # (k, d) -> (k, F)

    @torch.no_grad()
    def fit_output(self, target: torch.Tensor) -> None:
        """Solve the last Linear so that forward() == target (k, F) (least squares, min-norm)."""
        h = torch.tanh(self.transform[0](self.embedding.weight)).double()     # (k, hidden)
        A = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)                      # (k, hidden + 1)
        X = torch.linalg.pinv(A) @ target.double()                            # (hidden + 1, F)
        last = self.transform[2]
        last.weight.copy_(X[:-1].T.to(last.weight.dtype))
        last.bias.copy_(X[-1].to(last.bias.dtype))


class KVPrefix(nn.Module):
    """The `adapted.delta` of prefix methods: Adapted.encode() calls kv_prefix(B)."""

    def __init__(self, prefix: SoftTable, shape: tuple[int, int, int], config):
        super().__init__()
        self.prefix = prefix
        self.shape = shape                                   # (L, n_kv, head_dim)
        self.config = config                                 # so the cache's layer types match the model

    def kv_prefix(self, batch_size: int) -> DynamicCache:
        P = self.prefix()                                    # (k, F) or (B, k, F)
        if P.dim() == 2:
            P = P.expand(batch_size, -1, -1)
        dev = P.device.type
        if torch.is_autocast_enabled(dev):  # the cache concatenates the model's bf16 keys onto ours
            P = P.to(torch.get_autocast_dtype(dev))
        L, n_kv, hd = self.shape
        B, k, _ = P.shape
        kv = P.reshape(B, k, L * 2, n_kv, hd).permute(2, 0, 3, 1, 4)     # (2L, B, n_kv, k, hd)
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(L)], config=self.config)


INITS = ("random", "vocab")


@torch.no_grad()
def text_prefix(adapted, text: str, k: int, method: str) -> torch.Tensor:
    """(k, F): the frozen model's keys/values of the first k tokens of `text` (repeated if short)."""
    tok = adapted.tokenizer
    if tok is None:
        raise ValueError(f"method '{method}': init_text needs a tokenizer; pass attach(..., tokenizer=tok)")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"method '{method}': init_text {text!r} tokenizes to nothing")
    return ids_prefix(adapted, torch.tensor((ids * (k // len(ids) + 1))[:k]))


@torch.no_grad()
def vocab_prefix(adapted, k: int, seed: int) -> torch.Tensor:
    """(k, F): the frozen model's keys/values of k tokens drawn uniformly from the vocabulary."""
    V = adapted.model.get_input_embeddings().weight.shape[0]
    return ids_prefix(adapted, torch.randint(V, (k,), generator=torch.Generator().manual_seed(seed)))


@torch.no_grad()
def ids_prefix(adapted, ids: torch.Tensor) -> torch.Tensor:
    """(k, F): the frozen model's keys/values of the k token ids `ids`, run as one sequence."""
    k = ids.shape[0]
    ids = ids.view(1, k).to(adapted.device)                                            # (1, k)
    model = adapted.model
    cache = DynamicCache(config=model.config)
    was_training = model.training
    model.eval()
    try:  # encoders ignore use_cache but still fill a cache they are given
        model.base_model(input_ids=ids, cache=cache, use_cache=True)
    finally:
        model.train(was_training)
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # (L, 2, n_kv, k, hd)
    return kv.permute(3, 0, 1, 2, 4).reshape(k, -1).float()                       # (k, F)


def inject_prefix(method, adapted) -> None:
    model = adapted.model
    L, n_kv, hd = kv_shape(model)
    F = L * 2 * n_kv * hd
    if method.init_text:
        target = text_prefix(adapted, method.init_text, method.k, method.name)
    elif method.init == "vocab":
        target = vocab_prefix(adapted, method.k, method.seed)
    else:
        target = None
    if method.reparam and adapted.slots.n == 1:
        # PEFT's choice for P' width: one position's key (or value) across heads, n_kv * head_dim.
        mlp = PrefixMLP(method.k, n_kv * hd, method.prefix_hidden, F).to(model.device)
        if target is not None:
            mlp.fit_output(target)
        table = SoftTable(adapted.slots, encoder=mlp)
    else:  # no reparam, or serving form (slots > 1): plain tables
        if target is None:  # N(0, 1), as PEFT's nn.Embedding and P-tuning v2's code
            target = torch.randn(method.k, F)
        table = SoftTable(adapted.slots, init=target.to(model.device))
    adapted.delta = KVPrefix(table, (L, n_kv, hd), model.config)


def _check_prefix(method) -> None:
    method._check(method.k >= 1, "k", f"must be >= 1, got {method.k}")
    method._check(method.prefix_hidden >= 1, "prefix_hidden", f"must be >= 1, got {method.prefix_hidden}")
    method._check(method.init_text is None or bool(method.init_text.strip()), "init_text",
                  "must be non-empty text or None")
    method._check(method.init in INITS, "init", f"must be one of: {', '.join(INITS)}; got '{method.init}'")


@register
@dataclass(frozen=True)
class Prefix(Method):
    name = "prefix"
    summary = ("prefix tuning: k key/value positions in every layer, MLP-reparameterized while "
               "training; stored as the plain prefix")
    default_lr = 3e-4      # SST-2 lr sweep: 1e-3 and above diverged (docs/methods.md)
    default_epochs = 3.0
    k: int = 10
    reparam: bool = True
    # 64 keeps what trains under 1% of SmolLM2 (Li & Liang used 512: ~4.5% while training;
    # either way only the folded prefix, 0.09%, is stored).
    prefix_hidden: int = 64
    # 'vocab' (the model's own keys/values of random tokens) beat 'random' (N(0, 1) through the MLP)
    # by 7-14 points on SST-2 and by 36 BLEU on 50 E2E examples (module doc)
    init: str = "vocab"
    init_text: str | None = None   # overrides init: the model's own keys/values of this text
    seed: int = 0            # which vocabulary tokens 'vocab' draws (attach's init_seed sets the rest)

    def __post_init__(self):
        _check_prefix(self)

    def inject(self, adapted) -> None:
        inject_prefix(self, adapted)

    def export_state(self, adapted, slot: int) -> dict[str, torch.Tensor]:
        return export_folded(self, adapted, slot)

    def import_state(self, adapted, state: dict[str, torch.Tensor], slot: int) -> None:
        import_folded(self, adapted, state, slot)


@register
@dataclass(frozen=True)
class PTuning2(Prefix):
    """The same key/value prefix mechanism with P-tuning v2's defaults: longer, trained directly."""
    name = "ptuning2"
    summary = "P-tuning v2: deep prompts (k key/value positions) in every layer, trained directly"
    default_lr = 1.5e-2      # SST-2 lr sweep winner from init vocab (P-tuning v2 used 5e-3 .. 1e-2)
    k: int = 20
    reparam: bool = False
    init: str = "vocab"      # N(0, 1) wrecks a pre-LN model before training starts (module doc)
