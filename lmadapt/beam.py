"""Beam search in lmadapt's own KV-cache loop (the greedy loop's `start` / `step` in generation.py),
so prompt / prefix methods and per-row slots behave exactly as in greedy decoding.

The B prompts are encoded once; then every row becomes N beams (rows b*N .. b*N+N-1), the cache
through `batch_repeat_interleave(N)` and the slot ids through `Slots.repeat_interleave(N)`, so each
user's prompt, prefix, LoRA or adapter follows its beams. Each step scores the N*V continuations of
a row by summed float32 log-probs, keeps the N best that do not end in EOS and reorders the cache
with `reorder_cache(beam_idx)`. Only those two cache methods and `get_seq_length()` are used, so
a method may return its own cache object.

Conventions are HF `model.generate`'s, so settings carry over:
- A finished hypothesis scores sum(log p) / length ** length_penalty, length = generated tokens
  including the EOS (the prompt does not count, as in HF since `decoder_prompt_len`). A beam still
  running at max_new_tokens is a hypothesis of length max_new_tokens. length_penalty > 0 favours
  longer outputs, < 0 shorter ones, 0 ranks by the plain sum.
- An EOS continuation becomes a finished hypothesis only if it ranks among the row's top N
  candidates; each row keeps its N best finished hypotheses.
- early_stopping: a row needs N finished hypotheses to stop, and then
  True    stops at once;
  False   (HF's default) stops once the best running beam, scored at its current length, cannot beat
          the worst kept hypothesis - exact for length_penalty <= 0, a heuristic for > 0 (a longer
          continuation divides by a larger length);
  "never" stops only when no continuation can beat it: for length_penalty > 0 the best running
          sum is scored at max_new_tokens (sums only fall, lengths only grow).
- no_repeat_ngram_size counts the generated tokens only, not the prompt (HF's decoder-only models
  count the prompt too): data-to-text outputs must copy names and values from the table.
"""
from __future__ import annotations

import torch

from .kv_loop import ban_repeated_ngrams, start, step


def beam_search(adapted, input_ids, mask, *, num_beams: int, max_new_tokens: int, eos: torch.Tensor,
                pad_token_id: int, length_penalty: float, no_repeat_ngram_size: int,
                early_stopping: bool | str, output_scores: bool, min_new_tokens: int = 0):
    """Called by generate() inside the slot route of the B prompts -> the best hypothesis per row,
    tokens (B, <= max_new_tokens) padded with pad_token_id; with output_scores also (B, n) float32
    log-probs of those tokens (0 after the end): its score is their sum / length ** length_penalty."""
    N, (B, _) = num_beams, input_ids.shape
    dev = input_ids.device
    lm_head = adapted.model.get_output_embeddings()
    hidden, cache, full_mask, pos = start(adapted, input_ids, mask)
    cache.batch_repeat_interleave(N)                       # in place: (B, ...) -> (B*N, ...)
    adapted.slots.repeat_interleave(N)                     # restored when generate() leaves the route
    full_mask, pos = full_mask.repeat_interleave(N, 0), pos.repeat_interleave(N)
    last = hidden[:, -1].repeat_interleave(N, 0)           # (B*N, H)
    # The N beams of a row start as copies: only beam 0 may expand at the first step.
    beam_scores = torch.full((B, N), float("-inf"), device=dev)
    beam_scores[:, 0] = 0.0
    beam_scores = beam_scores.view(-1)                     # (B*N,) summed log-probs
    seqs = input_ids.new_zeros(B * N, 0)                   # (B*N, t) generated tokens
    logps = torch.zeros(B * N, 0, device=dev)              # (B*N, t) their log-probs
    finished: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = [[] for _ in range(B)]
    done = [False] * B
    first_beam = torch.arange(B, device=dev).unsqueeze(1) * N          # (B, 1)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(lm_head(last).float(), -1)            # (B*N, V)
        if no_repeat_ngram_size:
            logp = ban_repeated_ngrams(logp, seqs, no_repeat_ngram_size)
        if t < min_new_tokens and len(eos):
            logp[:, eos] = float("-inf")                              # as HF's MinLengthLogitsProcessor
        V = logp.shape[-1]
        # Every EOS id of every beam may rank above the rest: K candidates always hold N others.
        K = min(max(2, 1 + len(eos)) * N, N * V)
        cand, idx = (beam_scores.unsqueeze(1) + logp).view(B, N * V).topk(K, 1)     # (B, K), sorted
        src, token = first_beam + idx // V, idx % V                   # (B, K) beam row, next token
        token_logp = logp.view(B, N * V).gather(1, idx)               # (B, K)
        is_eos = torch.isin(token, eos) if len(eos) else torch.zeros_like(token, dtype=torch.bool)
        ends = is_eos & (torch.arange(K, device=dev) < N) & (cand > float("-inf"))
        for b, k in ends.nonzero().tolist():
            if not done[b]:
                s = int(src[b, k])
                _keep(finished[b], N, float(cand[b, k]) / (t + 1) ** length_penalty,
                      torch.cat([seqs[s], token[b, k:k + 1]]), torch.cat([logps[s], token_logp[b, k:k + 1]]))
        # The N best non-EOS candidates, still sorted: a stable sort moves EOS ones behind.
        keep = (~is_eos).to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :N]   # (B, N)
        beam_idx = src.gather(1, keep).view(-1)                       # (B*N,) rows to continue from
        nxt = token.gather(1, keep).view(-1)
        beam_scores = cand.gather(1, keep).view(-1)
        seqs = torch.cat([seqs[beam_idx], nxt.unsqueeze(1)], 1)
        logps = torch.cat([logps[beam_idx], token_logp.gather(1, keep).view(-1, 1)], 1)
        if t == max_new_tokens - 1:
            # The running beams are full-length hypotheses now, also in a row that this step's EOS
            # candidates just filled. (HF takes only the top N candidates; the extra ones share
            # their length and have lower sums, so they never become the best.)
            for b in range(B):
                if not done[b]:
                    for r in range(b * N, b * N + N):
                        _keep(finished[b], N, float(beam_scores[r]) / (t + 1) ** length_penalty,
                              seqs[r], logps[r])
            break
        best_running = beam_scores.view(B, N)[:, 0].tolist()
        for b in range(B):
            done[b] = done[b] or _row_done(finished[b], N, best_running[b], t + 1, max_new_tokens,
                                           length_penalty, early_stopping)
        if all(done):
            break
        cache.reorder_cache(beam_idx)
        # Beams of one row share prompt and length, so this is the identity today; it keeps the
        # mask and positions tied to the cache rows if that ever changes.
        full_mask, pos = full_mask[beam_idx], pos[beam_idx]
        hidden, cache, full_mask, pos = step(adapted, nxt, cache, full_mask, pos)
        last = hidden[:, -1]
    # Each row's list is sorted, best first; it is empty only when max_new_tokens == 0.
    best = [f[0] if f else (0.0, seqs.new_zeros(0), logps.new_zeros(0)) for f in finished]
    L = max(len(h[1]) for h in best)
    tokens = input_ids.new_full((B, L), pad_token_id)
    scores = torch.zeros(B, L, device=dev)
    for b, (_, toks, lp) in enumerate(best):
        tokens[b, :len(toks)], scores[b, :len(lp)] = toks, lp
    return (tokens, scores) if output_scores else tokens


def _keep(hyps: list, n: int, score: float, tokens: torch.Tensor, logps: torch.Tensor) -> None:
    """Add a finished hypothesis to a row's list, keeping its n best (sorted, best first)."""
    hyps.append((score, tokens, logps))
    hyps.sort(key=lambda h: h[0], reverse=True)
    del hyps[n:]


def _row_done(hyps: list, n: int, best_running_sum: float, cur_len: int, max_len: int,
              length_penalty: float, early_stopping: bool | str) -> bool:
    if len(hyps) < n:
        return False
    if early_stopping is True:
        return True
    length = max_len if early_stopping == "never" and length_penalty > 0 else cur_len
    return best_running_sum / length ** length_penalty <= hyps[-1][0]
