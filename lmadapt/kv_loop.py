"""The KV-cache step that greedy/sampled decoding (generation.py) and beam search (beam.py)
share: encode the prompts once, then feed one token per row at explicit positions, so left-padded
rows and rows with virtual tokens or a key/value prefix decode exactly like each row alone."""
from __future__ import annotations

import functools

import torch


def start(adapted, input_ids, mask, shared: "SharedPrefix | None" = None):
    """Encode the prompts once (virtual tokens / key-value prefix added here) -> (hidden (B, T, H),
    cache, full_mask (B, extra + T) over every cached position, pos (B,) of each row's last token).
    With `shared`, input_ids are what follows that prefix in every row (its cache is reused)."""
    B, T = input_ids.shape
    if shared is not None:
        kw = shared.inputs(mask, adapted.model.config)
        hidden, cache = adapted.encode(input_ids, use_cache=True, **kw)
        return hidden, growing(cache), kw["attention_mask"], shared.length + mask.long().sum(1) - 1
    hidden, cache = adapted.encode(input_ids, mask, use_cache=True)
    cache = growing(cache)
    extra = cache.get_seq_length() - T          # prefix or virtual-token positions in the cache
    full_mask = torch.cat([mask.new_ones(B, extra), mask], 1)
    pos = extra + mask.long().sum(1) - 1         # position of each row's last real token
    return hidden, cache, full_mask, pos


def step(adapted, nxt, cache, full_mask, pos):
    """Feed one token per row (B,) at the next position -> (hidden (B, 1, H), cache, mask, pos)."""
    pos = pos + 1
    full_mask = torch.cat([full_mask, full_mask.new_ones(len(nxt), 1)], 1)
    hidden, cache = adapted.encode(nxt.unsqueeze(1), full_mask, position_ids=pos.unsqueeze(1),
                                   cache=cache, use_cache=True)
    return hidden, cache, full_mask, pos


def next_logits(lm_head, h: torch.Tensor) -> torch.Tensor:
    """lm_head(h) for a decode step's rows h (B, H), without autograd. On CPU the product is taken
    as (W @ h.T).T: at a few to a few dozen rows, BLAS splits that shape over threads far better
    than h @ W.T over a 49k-word vocabulary (bench: 24 vs 42 ms at 32 rows on 2 cores); the sum per
    logit is the same dot product."""
    w = getattr(lm_head, "weight", None)
    if (type(lm_head) is not torch.nn.Linear or lm_head.bias is not None or h.dim() != 2 or h.device.type != "cpu"
            or torch.is_grad_enabled() or not 1 < h.shape[0] <= 256):
        return lm_head(h)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return (w.to(dt) @ h.to(dt).t()).t()
    return (w @ h.to(w.dtype).t()).t()


def ban_repeated_ngrams(scores: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """scores (R, V), generated (R, t) -> scores with -inf at every token that would complete an
    n-gram already in `generated` (HF's no_repeat_ngram_size, over the generated tokens only)."""
    R, t = generated.shape
    if t < n:       # fewer than n tokens: no complete n-gram yet, so none can repeat
        return scores
    grams = generated.unfold(1, n, 1)                                    # (R, t - n + 1, n)
    if n == 1:
        hit = torch.ones(grams.shape[:2], dtype=torch.bool, device=scores.device)
    else:  # earlier n-grams whose first n - 1 tokens equal the last n - 1 generated
        hit = (grams[:, :, :-1] == generated[:, t - n + 1:].unsqueeze(1)).all(-1)   # (R, t - n + 1)
    banned = torch.zeros_like(scores).scatter_add_(1, grams[:, :, -1], hit.to(scores.dtype))
    return scores.masked_fill(banned > 0, float("-inf"))


def repeated_cache(cache, n: int, config):
    """A new cache with every row repeated n times (row b -> rows b*n .. b*n+n-1), leaving `cache`
    as it was (batch_repeat_interleave works in place, and deepcopy refuses tensors that carry a
    graph). A method's own cache type provides `repeated(n, config)` (ladder's LadderCache)."""
    from transformers import DynamicCache
    if hasattr(cache, "repeated"):
        return cache.repeated(n, config)
    return DynamicCache([(layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0))
                         for layer in cache.layers], config=config)


def common_prefix(seqs: list[list[int]], keep: int = 1) -> int:
    """Length of the longest token prefix every sequence shares, leaving each at least `keep`
    tokens of its own (a row must end on a token it computes)."""
    if not seqs:
        return 0
    n = min(len(x) for x in seqs) - keep
    first = seqs[0]
    for i in range(max(n, 0)):
        t = first[i]
        if any(x[i] != t for x in seqs):
            return i
    return max(n, 0)


class SharedPrefix:
    """A token prefix every row of a batch starts with, encoded once (batch 1) and reused: ICL's
    demonstrations, CoT's exemplars. `inputs(mask)` gives what `Adapted.encode` / `forward` take
    for the rows' own tokens (their mask, left- or right-padded): a copy of the prefix cache per
    row, the attention mask over prefix + rows, and positions that go on after the prefix, so each
    row computes what it would have computed with the prefix in its own input (up to float
    rounding). Virtual tokens and key/value prefixes of the method are encoded with the prefix,
    as they would be at the front of a full input. The prefix runs under the slot route active
    when it is built: one route for every row."""

    def __init__(self, adapted, ids: list[int]):
        if not ids:
            raise ValueError("SharedPrefix needs at least one token")
        if min(ids) < 0:
            raise ValueError("SharedPrefix: the prefix holds template soft slots (negative ids); "
                             "encode those rows whole")
        x = torch.tensor([list(ids)], dtype=torch.long, device=adapted.device)
        _, self.cache = adapted.encode(x, torch.ones_like(x), use_cache=True)
        self.tokens = len(ids)
        self.length = self.cache.get_seq_length()     # prefix tokens + virtual / prefix positions

    def inputs(self, mask: torch.Tensor, config) -> dict:
        B = mask.shape[0]
        full = torch.cat([mask.new_ones(B, self.length), mask], 1)
        pos = self.length + (mask.long().cumsum(1) - 1).clamp(min=0)
        return {"attention_mask": full, "position_ids": pos, "cache": repeated_cache(self.cache, B, config)}


# --- a cache that appends in place ---------------------------------------------------------------
# transformers' DynamicLayer appends by torch.cat: every decode step copies the whole cache, which
# at batch 16 x 1,000 cached tokens (CoT's exemplars) is ~0.7 GB of copying per token. A growing
# layer appends into spare capacity of its buffer instead (capacity grows by a quarter, at least 64
# positions, when it runs out). A view extends in place only if it is the newest view of its
# buffer (the buffer records the length last written): a fork or a cropped view copies instead, so
# two caches can never write over each other.

def _append(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    L = old.shape[-2] if old.numel() else 0
    n = new.shape[-2]
    base = old._base if L else None
    if not (base is not None and getattr(base, "_lmadapt_len", None) == L and base.dim() == 4
            and old.data_ptr() == base.data_ptr() and old.stride() == base.stride()
            and base.shape[:2] == new.shape[:2] and base.shape[3] == new.shape[3]
            and base.dtype == new.dtype and L + n <= base.shape[2]):
        B, H, _, D = new.shape
        base = new.new_empty(B, H, L + n + max(64, (L + n) // 4), D)
        if L:
            base[:, :, :L] = old
    base[:, :, L:L + n] = new
    base._lmadapt_len = L + n
    return base[:, :, :L + n]


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys = _append(self.keys, key_states)
            self.values = _append(self.values, value_states)
            return self.keys, self.values

    return GrowingLayer


def growing(cache):
    """`cache` (a DynamicCache) with its plain layers switched to in-place appending; the same
    object. Other cache types (a method's own, sliding-window layers) are left as they are."""
    from transformers.cache_utils import DynamicLayer
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = _growing_layer_class()
    return cache


def growing_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], config):
    """A DynamicCache over per-layer (keys, values) that adopts the tensors as they are (no copy,
    unlike DynamicCache(kv)) and appends in place (growing)."""
    from transformers import DynamicCache
    cache = growing(DynamicCache(config=config))
    if len(cache.layers) != len(kv):
        raise ValueError(f"growing_cache: {len(kv)} layers of keys/values for a cache of {len(cache.layers)}")
    for layer, (k, v) in zip(cache.layers, kv):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache
