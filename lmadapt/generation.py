"""Greedy / sampled decoding with a KV cache for any Adapted causal LM.

Our own loop rather than `model.generate`, because prompt and prefix methods change what the
cache holds (k extra positions) and every row may use its own slot: positions are explicit, so
left-padded batches decode exactly like each row alone.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(adapted, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             slot_ids=None, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, output_scores: bool = False):
    """-> new tokens (B, <= max_new_tokens); rows that finished early are padded with pad_token_id.
    With output_scores=True: (tokens, scores), scores (B, n, V) the float32 logits each step chose
    from (what tests compare: token ids alone hide small position errors)."""
    if adapted.head is not None:
        raise ValueError("generate() needs an LM (no classification head): attach without num_labels")
    if not adapted.causal:
        raise ValueError(f"{adapted.model.config.model_type} is not a causal LM; it cannot generate")
    tok = adapted.tokenizer
    if eos_token_id is None:
        eos_token_id = getattr(tok, "eos_token_id", None) if tok is not None else adapted.model.config.eos_token_id
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = getattr(tok, "pad_token_id", None) if tok is not None else None
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    lm_head = adapted.model.get_output_embeddings()
    with adapted.slots.route(slot_ids):
        hidden, cache = adapted.encode(input_ids, mask, use_cache=True)
        extra = cache.get_seq_length() - T          # prefix or virtual-token positions in the cache
        full_mask = torch.cat([mask.new_ones(B, extra), mask], 1)
        pos = extra + mask.long().sum(1) - 1         # position of each row's last real token
        out, scores = [], []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = lm_head(hidden[:, -1]).float()  # (B, V)
            if output_scores:
                scores.append(logits)
            nxt = _pick(logits, do_sample, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            out.append(nxt)
            if len(eos):
                done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            pos = pos + 1
            full_mask = torch.cat([full_mask, full_mask.new_ones(B, 1)], 1)
            hidden, cache = adapted.encode(nxt.unsqueeze(1), full_mask, position_ids=pos.unsqueeze(1),
                                           cache=cache, use_cache=True)
    tokens = torch.stack(out, 1) if out else input_ids.new_zeros(B, 0)
    if output_scores:
        return tokens, (torch.stack(scores, 1) if scores else torch.zeros(B, 0, lm_head.out_features))
    return tokens


def _pick(logits, do_sample, temperature, top_p, generator):
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p   # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(1)
