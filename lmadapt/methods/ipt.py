"""Intrinsic prompt tuning (IPT, Qin et al. 2021), the tuning step: only z (d numbers) trains, and
a frozen back-projection shared by many tasks turns it into the k soft tokens prepended to the
input (lmadapt/prompting/ipt.py finds that decoder from other tasks' prompts).

    prompt = Proj_b(z)            z (S, d) trainable, Proj_b frozen: (d,) -> (k, H)

The artifact is z (d numbers per slot) plus a reference to the decoder: its folder and the sha256
of its weights, both in method.json; loading checks the hash, so a changed decoder is refused
rather than silently giving another prompt. z starts at the mean of the training tasks' codes
(`init='mean'`, the centre of the subspace) or at 0 (`'zeros'`). Not the `intrinsic` method,
which projects ALL weights through a random (not learned) subspace.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..adapted import slotted
from .base import Method, register


class IntrinsicPrompt(nn.Module):
    """adapted.delta of `ipt`: virtual tokens decoded from the slot's z."""

    def __init__(self, decoder, slots, z0: torch.Tensor):
        super().__init__()
        self.decoder, self.slots = decoder, slots                                 # frozen, shared
        self.z = slotted(nn.Parameter(z0.float().unsqueeze(0).repeat(slots.n, 1).clone()))   # (S, d)

    def virtual_tokens(self, batch_size: int) -> torch.Tensor:
        p = self.decoder.decode(self.slots.pick(self.z))                          # (k, H) or (B, k, H)
        return p.expand(batch_size, -1, -1) if p.dim() == 2 else p


@register
@dataclass(frozen=True)
class IPT(Method):
    name = "ipt"
    virtual_tokens = True
    summary = ("intrinsic prompt tuning: d numbers through a frozen prompt decoder learned on other tasks "
               "(IPT); artifact = z + the decoder's path and sha256")
    default_lr = 3e-2
    default_epochs = 3.0
    decoder: str = ""           # the folder prompting.ipt.fit_autoencoder wrote (OUT/decoder)
    decoder_sha256: str = ""    # filled from the file; an artifact's value must match it
    init: str = "mean"          # mean (of the training tasks' codes) | zeros

    def __post_init__(self):
        from ..prompting.ipt import DECODER_FILE, sha256_of
        self._check(bool(self.decoder), "decoder", "is required: the folder of a prompt decoder "
                    "(lmadapt.prompting.ipt.fit_autoencoder writes OUT/decoder), e.g. --method-args decoder=DIR")
        self._check(self.init in ("mean", "zeros"), "init", f"must be mean or zeros; got '{self.init}'")
        path = Path(self.decoder) / DECODER_FILE
        self._check(path.exists(), "decoder", f"{self.decoder}: no {DECODER_FILE} there")
        sha = sha256_of(path)
        self._check(not self.decoder_sha256 or self.decoder_sha256 == sha, "decoder",
                    f"{self.decoder}: its weights changed since this artifact was trained (sha256 {sha[:12]}... "
                    f"!= {self.decoder_sha256[:12]}...): it would decode another prompt; use the decoder it was "
                    "trained with")
        object.__setattr__(self, "decoder_sha256", sha)

    def inject(self, adapted) -> None:
        from ..prompting.ipt import load_decoder
        dec, meta, codes = load_decoder(self.decoder)
        H = adapted.model.config.hidden_size
        want = meta.get("base_model", {})
        have = adapted.base_fingerprint
        diff = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "embedding_checksum")
                if want.get(k) != have.get(k)]
        if meta["hidden_size"] != H or diff:
            raise ValueError(f"method 'ipt': the decoder in {self.decoder} was fit on base model "
                             f"'{want.get('name')}', not this one ('{have.get('name')}'): differs in {', '.join(diff) or 'hidden_size'}")
        z0 = codes.float().mean(0) if self.init == "mean" else torch.zeros(meta["d"])
        adapted.delta = IntrinsicPrompt(dec.to(adapted.model.device), adapted.slots, z0.to(adapted.model.device))
