"""Soft prompts: k trainable vectors prepended to the input embeddings.

- `prompt`  (prompt tuning, Lester et al. 2021): the (k, H) table itself is trained.
- `ptuning` (P-tuning v1, Liu et al. 2021): a prompt encoder (PEFT's PromptEncoder: an MLP, or a
  bi-LSTM + MLP head, over trainable input embeddings) produces the (k, H) table while training.

Training form vs stored form. The encoder only shapes optimisation; what the model sees is its
(k, H) output. So artifacts store that output, *folded* (PEFT stores `prompt_embeddings` the same
way), and loading an artifact installs a plain table. The encoder exists only with one slot (the
training case); with slots > 1 a ptuning model is built in its serving form: plain (S, k, H)
tables, one per user, which is what loaded artifacts go into. `SoftTable` (shared with prefix.py)
holds either form.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..adapted import Slots, slotted
from .base import Method, register

INITS = ("vocab", "labels", "random")
ENCODERS = ("mlp", "lstm")


class SoftTable(nn.Module):
    """k trainable rows of width D per slot: `table` (S, k, D), read through `slots.pick`; or, while
    training a reparameterized method with one slot, an `encoder` whose forward() -> (k, D)."""

    def __init__(self, slots: Slots, init: torch.Tensor | None = None, encoder: nn.Module | None = None):
        super().__init__()
        if (init is None) == (encoder is None):
            raise ValueError("SoftTable takes either an initial table or an encoder")
        self.slots = slots
        self.encoder = encoder
        self.table = None
        if init is not None:  # (k, D) -> the same start in every slot: (S, k, D)
            self.table = slotted(nn.Parameter(init.detach().float().unsqueeze(0).repeat(slots.n, 1, 1).clone()))

    def forward(self) -> torch.Tensor:
        """-> (k, D) shared by all rows, or (B, k, D) one table per row when slot ids are set."""
        if self.encoder is not None:  # one slot only: every row uses it
            return self.encoder()
        return self.slots.pick(self.table)

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        """(k, D): the encoder's output in eval mode (no dropout), detached: what is stored."""
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            return self.encoder().detach().clone()
        finally:
            self.encoder.train(was_training)

    def fold(self) -> None:
        """Replace the encoder by its output: a plain (1, k, D) table. Outputs are unchanged; the
        encoder's weights are dropped, so training continues on the table itself."""
        if self.encoder is None:
            return
        table = self.folded()
        self.encoder = None
        self.table = slotted(nn.Parameter(table.unsqueeze(0)))


def export_folded(method: Method, adapted, slot: int) -> dict[str, torch.Tensor]:
    """Method.export_state with every SoftTable's encoder replaced by its folded `table`."""
    state = Method.export_state(method, adapted, slot)
    for name, mod in adapted.named_modules():
        if isinstance(mod, SoftTable) and mod.encoder is not None:
            state = {k: v for k, v in state.items() if not k.startswith(f"{name}.encoder.")}
            state[f"{name}.table"] = mod.folded()
    return state


def import_folded(method: Method, adapted, state: dict[str, torch.Tensor], slot: int) -> None:
    """Artifacts hold folded tables: fold every encoder first, then load as usual."""
    for mod in adapted.modules():
        if isinstance(mod, SoftTable):
            mod.fold()
    Method.import_state(method, adapted, state, slot)


class VirtualTokens(nn.Module):
    """The `adapted.delta` of prompt methods: Adapted.encode() calls virtual_tokens(B)."""

    def __init__(self, prompt: SoftTable):
        super().__init__()
        self.prompt = prompt

    def virtual_tokens(self, batch_size: int) -> torch.Tensor:
        t = self.prompt()                                  # (k, H) or (B, k, H)
        return t.expand(batch_size, -1, -1) if t.dim() == 2 else t


class PromptEncoder(nn.Module):
    """PEFT's P-tuning PromptEncoder, with the same layer names so weights transfer: trainable
    input embeddings (k, H) -> MLP (Linear-ReLU-Linear-ReLU-Linear), or bidirectional LSTM
    (k, 2h) + MLP head (Linear-ReLU-Linear) -> (k, H)."""

    def __init__(self, k: int, dim: int, hidden: int, kind: str, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(k, dim)             # N(0, 1), as in PEFT
        if kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight                          # (k, H)
        if self.kind == "lstm":
            x = self.lstm_head(x.unsqueeze(0))[0][0]       # (1, k, H) -> (1, k, 2h) -> (k, 2h)
        return self.mlp_head(x)                            # (k, H)


def initial_prompt(adapted, k: int, init: str, seed: int, method: str) -> torch.Tensor:
    """(k, H) starting table: embeddings of random vocabulary tokens, of the label words (cycled
    to fill k), normal noise with the embedding matrix's std, or a pre-trained prompt
    ('pretrained:DIR', PPT: lmadapt.prompting.ppt)."""
    emb = adapted.model.get_input_embeddings().weight       # (V, H), frozen
    if init.startswith("pretrained:"):
        from ..prompting.ppt import pretrained_table
        table = pretrained_table(init, adapted.model)
        if table.shape != (k, emb.shape[1]):
            raise ValueError(f"method '{method}': the pre-trained prompt in {init[len('pretrained:'):]} is "
                             f"{tuple(table.shape)} (k, H), this one is ({k}, {emb.shape[1]}); set k={table.shape[0]}")
        return table.to(emb.device).clone()
    g = torch.Generator().manual_seed(seed)
    if init == "vocab":   # uniform over the vocabulary, as PEFT's SAMPLE_VOCAB
        ids = torch.randint(emb.shape[0], (k,), generator=g)
    elif init == "labels":
        tok = adapted.tokenizer
        if tok is None:
            raise ValueError(f"method '{method}': init='labels' needs a tokenizer; pass attach(..., tokenizer=tok)")
        if not adapted.label_names:
            raise ValueError(f"method '{method}': init='labels' needs label names; attach with a classification "
                             "task (task=...) or label_names=[...], or use init='vocab'")
        words = [i for name in adapted.label_names for i in tok(name, add_special_tokens=False)["input_ids"]]
        if not words:
            raise ValueError(f"method '{method}': the label names {adapted.label_names} tokenize to nothing")
        ids = torch.tensor((words * (k // len(words) + 1))[:k])
    else:  # random
        return torch.randn(k, emb.shape[1], generator=g).to(emb.device) * emb.detach().float().std()
    return emb.detach()[ids.to(emb.device)].float().clone()


@register
@dataclass(frozen=True)
class Prompt(Method):
    name = "prompt"
    virtual_tokens = True
    summary = "prompt tuning: k soft tokens prepended to the input; init vocab|labels|random|pretrained:DIR"
    default_lr = 3e-2        # soft prompts need a high lr (Lester et al. used 0.3 with Adafactor)
    default_epochs = 3.0
    k: int = 20
    init: str = "vocab"
    seed: int = 0            # which vocabulary tokens / noise the table starts from

    def __post_init__(self):
        self._check(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        self._check(self.init in INITS or self.init.startswith("pretrained:"), "init",
                    f"must be one of: {', '.join(INITS)}, or pretrained:DIR (PPT); got '{self.init}'")

    def inject(self, adapted) -> None:
        table = initial_prompt(adapted, self.k, self.init, self.seed, self.name)
        adapted.delta = VirtualTokens(SoftTable(adapted.slots, init=table))


@register
@dataclass(frozen=True)
class PTuning(Method):
    name = "ptuning"
    virtual_tokens = True
    summary = ("P-tuning v1: prompt encoder (mlp|lstm, as PEFT) makes k soft tokens; stored folded "
               "as a plain table (slots > 1: plain tables)")
    default_lr = 3e-4        # SST-2 lr sweep winner; 1e-3 and above diverged (docs/methods.md)
    default_epochs = 3.0
    k: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None   # None: the model's hidden size (PEFT's default)
    encoder_num_layers: int = 2              # LSTM only (PEFT's MLP always has 3 Linear layers)
    encoder_dropout: float = 0.0             # LSTM only

    def __post_init__(self):
        self._check(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        self._check(self.encoder in ENCODERS, "encoder", f"must be one of: {', '.join(ENCODERS)}; got '{self.encoder}'")
        self._check(self.encoder_hidden_size is None or self.encoder_hidden_size >= 1, "encoder_hidden_size",
                    f"must be >= 1, got {self.encoder_hidden_size}")
        self._check(self.encoder_num_layers >= 1, "encoder_num_layers", f"must be >= 1, got {self.encoder_num_layers}")

    def inject(self, adapted) -> None:
        H = adapted.model.config.hidden_size
        if adapted.slots.n > 1:  # serving form: plain tables that artifacts (folded) load into
            emb = adapted.model.get_input_embeddings().weight
            table = SoftTable(adapted.slots, init=torch.zeros(self.k, H, device=emb.device))
        else:
            enc = PromptEncoder(self.k, H, self.encoder_hidden_size or H, self.encoder,
                                self.encoder_num_layers, self.encoder_dropout)
            table = SoftTable(adapted.slots, encoder=enc)
        adapted.delta = VirtualTokens(table)

    def export_state(self, adapted, slot: int) -> dict[str, torch.Tensor]:
        return export_folded(self, adapted, slot)

    def import_state(self, adapted, state: dict[str, torch.Tensor], slot: int) -> None:
        import_folded(self, adapted, state, slot)
