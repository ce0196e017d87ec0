"""The KV-cache step that greedy/sampled decoding (generation.py) and beam search (beam.py)
share: encode the prompts once, then feed one token per row at explicit positions, so left-padded
rows and rows with virtual tokens or a key/value prefix decode exactly like each row alone."""
from __future__ import annotations

import torch


def start(adapted, input_ids, mask):
    """Encode the prompts once (virtual tokens / key-value prefix added here) -> (hidden (B, T, H),
    cache, full_mask (B, extra + T) over every cached position, pos (B,) of each row's last token)."""
    B, T = input_ids.shape
    hidden, cache = adapted.encode(input_ids, mask, use_cache=True)
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
