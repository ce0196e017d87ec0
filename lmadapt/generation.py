"""Greedy / sampled decoding with a KV cache for any Adapted causal LM; beam search (beam.py) runs
in the same loop shape.

Our own loop rather than `model.generate`, because prompt and prefix methods change what the
cache holds (k extra positions) and every row may use its own slot: positions are explicit, so
left-padded batches decode exactly like each row alone.
"""
from __future__ import annotations

import functools

import torch

from .beam import beam_search
from .kv_loop import ban_repeated_ngrams, next_logits, start, step
from .precision import autocast


def with_precision(fn):
    """generate(..., precision='auto'|'fp32'|'bf16') runs `fn` under that precision; None (the
    default) leaves it to the caller's context."""
    @functools.wraps(fn)
    def run(adapted, input_ids, *args, precision: str | None = None, **kw):
        if precision is None:
            return fn(adapted, input_ids, *args, **kw)
        with autocast(precision, input_ids.device):
            return fn(adapted, input_ids, *args, **kw)
    return run


@with_precision
@torch.no_grad()
def generate(adapted, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             slot_ids=None, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, output_scores: bool = False,
             num_beams: int = 1, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             early_stopping: bool | str = False, shared_prefix=None, min_new_tokens: int = 0):
    """-> new tokens (B, <= max_new_tokens); rows that finished early are padded with pad_token_id.
    With output_scores=True: (tokens, scores), scores (B, n, V) the float32 logits each step chose
    from (what tests compare: token ids alone hide small position errors).

    num_beams > 1: beam search (see lmadapt.beam for length_penalty and early_stopping); with
    output_scores its scores are (B, n) log-probs of the tokens chosen, not (B, n, V) logits.
    no_repeat_ngram_size = n > 0 bans any n-gram that already occurs in the generated tokens (the
    prompt does not count), greedy or beam.
    precision: 'auto' | 'fp32' | 'bf16' runs the decode under that precision (precision.py); None
    (the default) leaves it to the caller's context, as evaluation does.
    shared_prefix: a kv_loop.SharedPrefix every row starts with (encoded once); input_ids are then
    only what follows it in each row. Greedy or sampled, one slot route for every row.
    min_new_tokens: the stop tokens (eos_token_id) cannot be chosen before this many new tokens
    (HF's min_new_tokens): a chat model that would end its turn at once must answer first."""
    if adapted.head is not None:
        raise ValueError("generate() needs an LM (no classification head): attach without num_labels")
    if not adapted.causal:
        raise ValueError(f"{adapted.model.config.model_type} is not a causal LM; it cannot generate")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0: off), got {no_repeat_ngram_size!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be one of: True, False, 'never'; got {early_stopping!r}")
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
    if num_beams > 1 and do_sample:
        raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not supported: "
                         "use num_beams=1 to sample, or do_sample=False for beam search")
    if shared_prefix is not None and (num_beams > 1 or slot_ids is not None):
        raise ValueError("shared_prefix works with greedy or sampled decoding and one route for every row "
                         "(num_beams=1, slot_ids=None)")
    tok = adapted.tokenizer
    if eos_token_id is None:
        eos_token_id = getattr(tok, "eos_token_id", None) if tok is not None else adapted.model.config.eos_token_id
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = getattr(tok, "pad_token_id", None) if tok is not None else None
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if num_beams > 1:
        with adapted.slots.route(slot_ids):
            return beam_search(adapted, input_ids, mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                               eos=eos, pad_token_id=pad_token_id, length_penalty=length_penalty,
                               no_repeat_ngram_size=no_repeat_ngram_size, early_stopping=early_stopping,
                               output_scores=output_scores, min_new_tokens=min_new_tokens)
    B, T = input_ids.shape
    dev = input_ids.device
    lm_head = adapted.model.get_output_embeddings()
    # Rows that finished leave the batch (their cache rows too) once they are a quarter of it:
    # a batch of chains that stop at different lengths then costs what its live rows cost. With
    # output_scores every row stays, so each row's scores cover every step.
    compact = not output_scores
    with adapted.slots.route(slot_ids):
        hidden, cache, full_mask, pos = start(adapted, input_ids, mask, shared_prefix)
        tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
        rows = torch.arange(B, device=dev)          # the input row of each row still in the batch
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        scores, n = [], 0
        for t in range(max_new_tokens):
            logits = next_logits(lm_head, hidden[:, -1]).float()  # (b, V)
            if no_repeat_ngram_size and t:
                logits = ban_repeated_ngrams(logits, tokens[rows, :t], no_repeat_ngram_size)
            if t < min_new_tokens and len(eos):
                logits[:, eos] = float("-inf")
            if output_scores:
                scores.append(logits)
            nxt = _pick(logits, do_sample, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            tokens[rows, t] = nxt
            n = t + 1
            if len(eos):
                done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            if compact and int(done.sum()) >= max(1, len(rows) // 4):
                keep = (~done).nonzero().squeeze(1)
                rows, done, nxt, full_mask, pos = rows[keep], done[keep], nxt[keep], full_mask[keep], pos[keep]
                cache.reorder_cache(keep)
                if adapted.slots.ids is not None:
                    adapted.slots.ids = adapted.slots.ids[keep]
            hidden, cache, full_mask, pos = step(adapted, nxt, cache, full_mask, pos)
    tokens = tokens[:, :n]
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
