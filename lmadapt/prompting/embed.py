"""Sentence embeddings for kNN demonstration selection (prompting/icl.py).

`SentenceEmbedder` is all-MiniLM-L6-v2's own recipe: the encoder's last hidden states mean-pooled
over the real tokens, L2-normalized, so a dot product is the cosine similarity. Any callable
texts -> (N, D) works in its place (tests inject a hand-made one); one with a `fingerprint` string
is cached on disk by `embeddings`: one safetensors file per set of texts under
LMADAPT_CACHE/icl-embeddings/, keyed by a hash of the texts and the fingerprint (the embedding
model's shape and weight checksum, models.fingerprint), so a pool is embedded once across runs,
selections, k and seeds that share it, and another model or pool never reads a stale file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..heads import pool as pool_hidden


# --- embeddings --------------------------------------------------------------------------------

def example_text(ex) -> str:
    """What an example is compared by: its input (both texts of a pair)."""
    return ex.text if ex.text_pair is None else f"{ex.text}\n{ex.text_pair}"


class SentenceEmbedder:
    """texts -> (N, D) unit vectors: an encoder's last hidden states mean-pooled over the real
    tokens, L2-normalized (all-MiniLM-L6-v2's own recipe). Loaded on first use."""

    def __init__(self, name: str = "minilm-l6", batch_size: int = 64, max_length: int = 256, device=None):
        self.name, self.batch_size, self.max_length, self.device = name, batch_size, max_length, device
        self._model = self._tok = None
        self._fingerprint = None

    def _load(self):
        if self._model is None:
            from ..models import fingerprint, load
            self._model, self._tok = load(self.name, device=self.device)
            self._fingerprint = json.dumps(fingerprint(self._model), sort_keys=True) + f":mean:{self.max_length}"

    @property
    def fingerprint(self) -> str:
        self._load()
        return self._fingerprint

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(self._model.device)
            hidden = self._model(**batch).last_hidden_state                      # (b, T, H)
            out.append(pool_hidden(hidden, batch["attention_mask"], "mean").float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)              # (N, H)


def default_cache_dir() -> Path:
    from ..models import cache_dir
    return cache_dir() / "icl-embeddings"


def embeddings(embedder, texts: list[str], cache_dir: str | Path | None = None) -> torch.Tensor:
    """(N, D) unit embeddings of `texts`, from the disk cache when the same texts were embedded by
    the same model before. An embedder without a `fingerprint` is never cached."""
    from ..atomic import read_safetensors, write_file
    fp = getattr(embedder, "fingerprint", None)
    if fp is None or cache_dir is None:
        return torch.nn.functional.normalize(embedder(texts).float(), dim=-1)
    key = hashlib.sha256((fp + "\0" + "\x1f".join(texts)).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        try:
            e = read_safetensors(path, "")["embeddings"]
            if e.shape[0] == len(texts):
                return e
        except ValueError:  # damaged: computed again below and rewritten
            pass
    from safetensors.torch import save_file
    e = torch.nn.functional.normalize(embedder(texts).float(), dim=-1).contiguous()
    write_file(path, lambda tmp: save_file({"embeddings": e}, tmp))
    return e
