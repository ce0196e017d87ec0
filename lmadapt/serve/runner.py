"""The model runner: how one running decode batch advances (the scheduler decides who is in it).

A DecodeBatch holds, for its B rows, the KV cache, the mask over every cached position (B, L), each
row's last position (B,) and its next-token logits (B, V). Rows join at any step (`add`: their
prompts are encoded in one prefill pass, then cache and mask are left-padded to a common length
and stacked under the running ones; padded positions are masked, so nothing changes for either)
and leave when they finish or are cancelled (`step` drops them and trims cache columns no
remaining row uses). Positions are explicit, so a row decodes exactly as it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..generation import _pick
from ..kv_loop import growing_cache


def left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (T - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    route: object                    # bank.Resident
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    stop_ids: frozenset = frozenset()
    on_token: object = None          # callback(seq, token | None) from the runner's thread; None = finished
    record_scores: bool = False
    tokens: list[int] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False           # set from any thread: the row leaves at the next step


class DecodeBatch:
    def __init__(self, bank):
        self.bank = bank
        self.seqs: list[Sequence] = []
        self.cache = self.mask = self.pos = self.logits = None

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill new rows and stack them under the running ones. Rows are prefilled in groups
        by the virtual positions their table adds (0 for most methods): a dense pass costs every
        row the longest row's length, so bare and LoRA rows do not pay for a prompt user's k
        virtual tokens."""
        groups: dict[int, list[Sequence]] = {}
        for s in seqs:
            t = s.route.table
            k = self.bank.tables[t].k if t >= 0 and self.bank.tables[t].kind == "virtual" else 0
            groups.setdefault(k, []).append(s)
        for group in groups.values():
            self._add(group)

    def _add(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        bank = self.bank
        ids, mask = left_pad([s.prompt for s in seqs], bank.pad_id, bank.device)
        rows = [s.route for s in seqs]
        with bank.route(rows):
            enc = bank.encode(ids, mask, use_cache=True)
        logits = bank.lm_head(enc.hidden[:, -1]).float()                    # (b, V)
        kv = [(layer.keys, layer.values) for layer in enc.cache.layers]
        if not self.seqs:
            self.seqs, self.mask, self.pos, self.logits = list(seqs), enc.mask, enc.pos[:, -1], logits
            self.cache = kv
            return
        L = max(self.mask.shape[1], enc.mask.shape[1])
        self.cache = [(torch.cat([_lpad(k0, L), _lpad(k1, L)]), torch.cat([_lpad(v0, L), _lpad(v1, L)]))
                      for (k0, v0), (k1, v1) in zip(self.cache, kv)]
        self.mask = torch.cat([_lpad_mask(self.mask, L), _lpad_mask(enc.mask, L)])
        self.pos = torch.cat([self.pos, enc.pos[:, -1]])
        self.logits = torch.cat([self.logits, logits])
        self.seqs += seqs

    def step(self) -> None:
        """Pick every row's next token from its logits; drop the rows that finished; feed the
        others their token (one forward pass) for the next step's logits."""
        nxt = self._pick()
        for s, t in zip(self.seqs, nxt.tolist()):
            if s.cancelled:
                s.finish_reason = "cancelled"
                continue
            if t in s.stop_ids:
                s.finish_reason = "stop"
            else:
                s.tokens.append(t)
                if s.on_token is not None:
                    s.on_token(s, t)
                if len(s.tokens) >= s.max_new_tokens:
                    s.finish_reason = "length"
        keep = [i for i, s in enumerate(self.seqs) if s.finish_reason is None]
        for s in self.seqs:
            if s.finish_reason is not None and s.on_token is not None:
                s.on_token(s, None)
        if len(keep) < len(self.seqs):
            self._keep(keep)
            nxt = nxt[torch.tensor(keep, dtype=torch.long, device=nxt.device)]
        if not self.seqs:
            return
        bank = self.bank
        self.pos = self.pos + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], 1)
        cache = growing_cache(self.cache, bank.model.config)   # appends in place, no copy per step
        with bank.route([s.route for s in self.seqs]):
            enc = bank.encode(nxt.unsqueeze(1), self.mask, position_ids=self.pos.unsqueeze(1),
                              cache=cache, use_cache=True)
        self.cache = [(layer.keys, layer.values) for layer in enc.cache.layers]
        self.logits = bank.lm_head(enc.hidden[:, -1]).float()

    def cancel_all(self) -> None:
        for s in self.seqs:
            s.cancelled = True

    def _pick(self) -> torch.Tensor:
        logits = self.logits
        nxt = logits.argmax(-1)                                               # greedy rows: one op
        for i, s in enumerate(self.seqs):
            if s.record_scores:
                s.scores.append(logits[i].detach().cpu())
            if s.do_sample:  # each sampled row draws from its own generator: batched == alone
                nxt[i] = _pick(logits[i:i + 1], True, s.temperature, s.top_p, s.generator)[0]
        return nxt

    def _keep(self, keep: list[int]) -> None:
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.pos = self.logits = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        first = int(mask.any(0).int().argmax())       # leading columns no remaining row uses
        self.mask = mask[:, first:]
        self.cache = [(k[idx][:, :, first:], v[idx][:, :, first:]) for k, v in self.cache]
        self.pos, self.logits = self.pos[idx], self.logits[idx]


def _lpad(x: torch.Tensor, L: int) -> torch.Tensor:
    """(b, h, l, d) -> (b, h, L, d) with zeros on the left (masked positions)."""
    if x.shape[2] == L:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], L - x.shape[2], x.shape[3]), x], 2)


def _lpad_mask(m: torch.Tensor, L: int) -> torch.Tensor:
    return m if m.shape[1] == L else torch.cat([m.new_zeros(m.shape[0], L - m.shape[1]), m], 1)
