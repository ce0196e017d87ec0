"""A prefix every prompt shares (ICL's demonstrations, CoT's exemplars) is encoded once and reused
(kv_loop.SharedPrefix): the verbalizer scores and the decoded logits equal those of the whole
prompts, left-padded rows of different lengths included, for the bare model and for methods that
add virtual tokens, a key/value prefix or weight deltas."""
import pytest
import torch

import lmadapt
from lmadapt.kv_loop import SharedPrefix, common_prefix
from lmadapt.prompting.icl import MIN_SHARED, decode_prompts, score_prompts, shared_split
from toy_prompts import MULTI, TOY_PVP, causal, ids

METHODS = ("none", "lora", "prompt", "prefix", "adapter", "bitfit", "ladder")


def randomize(adapted, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def prompts_of(tok):
    demos = ids(tok, "the movie was fun it was good bad plot it was bad the film was awful it was bad "
                     "the cafe was cheap it was good")
    queries = ["the food", "a very boring film and the actor was awful it was", "fun"]
    return demos, [demos + ids(tok, q + " it was") for q in queries]


def test_common_prefix_leaves_each_row_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2        # the shorter row keeps its last token
    assert common_prefix([[7, 2], [1, 2]]) == 0
    assert common_prefix([]) == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_scores_with_a_shared_prefix_equal_whole_prompts(arch, method):
    model, tok = causal(arch)
    adapted = lmadapt.attach(model, method, task=TOY_PVP, tokenizer=tok, head="verbalizer", verbalizer=MULTI)
    randomize(adapted)
    adapted.eval()
    demos, prompts = prompts_of(tok)
    shared, own = shared_split(adapted, prompts)
    assert shared is not None and shared.tokens >= len(demos) >= MIN_SHARED
    assert len({len(o) for o in own}) == 3                    # rows of different lengths: padding is exercised
    whole = score_prompts(adapted, prompts, batch_size=3, share=False)
    torch.testing.assert_close(score_prompts(adapted, prompts, batch_size=3), whole, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ("none", "lora", "prompt", "prefix", "ladder"))
def test_decoding_with_a_shared_prefix_gives_the_same_logits(method):
    model, tok = causal("llama")
    adapted = lmadapt.attach(model, method, tokenizer=tok)
    randomize(adapted)
    adapted.eval()
    demos, prompts = prompts_of(tok)
    enc = adapted.input_encoder()
    whole = enc.collate([{"input_ids": p} for p in prompts])
    tokens, scores = adapted.generate(whole["input_ids"], whole["attention_mask"], max_new_tokens=6,
                                      output_scores=True, eos_token_id=[])
    n = common_prefix(prompts)
    shared = SharedPrefix(adapted, prompts[0][:n])
    own = enc.collate([{"input_ids": p[n:]} for p in prompts])
    t2, s2 = adapted.generate(own["input_ids"], own["attention_mask"], max_new_tokens=6, output_scores=True,
                              eos_token_id=[], shared_prefix=shared)
    torch.testing.assert_close(s2, scores, atol=2e-5, rtol=1e-5)
    assert torch.equal(t2, tokens)
    # decode_prompts shares on its own and gives the same text as whole prompts
    assert decode_prompts(adapted, prompts, max_new_tokens=4, stops=()) == \
        decode_prompts(adapted, prompts, max_new_tokens=4, stops=(), share=False)


def test_a_short_common_prefix_is_not_shared_and_beams_or_routes_are_refused():
    model, tok = causal("llama")
    adapted = lmadapt.attach(model, "lora", tokenizer=tok)
    short = [ids(tok, "the food was good"), ids(tok, "the cafe was bad")]
    assert shared_split(adapted, short)[0] is None
    demos, prompts = prompts_of(tok)
    shared = SharedPrefix(adapted, demos)
    x = torch.tensor([ids(tok, "the food")])
    with pytest.raises(ValueError, match="shared_prefix"):
        adapted.generate(x, num_beams=2, shared_prefix=shared)
    with pytest.raises(ValueError, match="shared_prefix"):
        adapted.generate(x, slot_ids=torch.tensor([0]), shared_prefix=shared)


def test_the_growing_cache_appends_in_place_and_a_fork_never_overwrites_the_newest():
    from lmadapt.kv_loop import _append
    a = torch.randn(2, 3, 5, 4)
    k1 = _append(a, torch.randn(2, 3, 1, 4))                  # a plain tensor: copied once into a buffer
    assert torch.equal(k1[:, :, :5], a) and k1._base is not None
    x = torch.randn(2, 3, 1, 4)
    k2 = _append(k1, x)
    assert k2.data_ptr() == k1.data_ptr() and torch.equal(k2[:, :, 6:], x)    # in place: no copy
    snapshot = k2.clone()
    fork = _append(k1, torch.zeros(2, 3, 1, 4))                # k1 is no longer the newest view
    assert fork.data_ptr() != k2.data_ptr() and torch.equal(k2, snapshot)
    assert torch.equal(fork[:, :, :6], k1) and not fork[:, :, 6:].any()
    cropped = k2[:, :, :-1]
    c2 = _append(cropped, torch.ones(2, 3, 1, 4))              # a cropped view copies as well
    assert torch.equal(k2, snapshot) and torch.equal(c2[:, :, 6], torch.ones(2, 3, 4))
    big = k2
    for _ in range(100):                                       # past the spare capacity: it grows
        big = _append(big, torch.randn(2, 3, 1, 4))
    assert big.shape == (2, 3, 107, 4) and torch.equal(big[:, :, :7], snapshot)


def test_next_logits_equal_the_lm_head_in_fp32_and_under_autocast():
    from lmadapt.kv_loop import next_logits
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(next_logits(head, h), head(h), atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = next_logits(head, h), head(h)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
    g = next_logits(head, h.requires_grad_())          # with autograd on, the module itself runs
    assert g.grad_fn is not None and torch.allclose(g, head(h))


@pytest.mark.parametrize("method", ("none", "lora", "prefix", "ladder"))
def test_finished_rows_leave_the_batch_and_the_rest_decode_the_same(method):
    """Rows that stop early are dropped from the batch (cache rows, slots too); the others must
    decode exactly what they decode when every row stays (output_scores keeps every row)."""
    model, tok = causal("llama")
    one = method == "ladder"                       # one set of weights: no slots
    adapted = lmadapt.attach(model, method, tokenizer=tok, slots=1 if one else 2)
    randomize(adapted)
    adapted.eval()
    texts = ["the food", "a very boring film and the actor was awful", "fun", "the cafe was cheap", "bad plot"]
    x = adapted.input_encoder().collate([{"input_ids": ids(tok, t)} for t in texts])
    slots = None if one else torch.tensor([0, 1, 1, 0, 1])
    free, _ = adapted.generate(x["input_ids"], x["attention_mask"], slot_ids=slots, max_new_tokens=10,
                               eos_token_id=[], output_scores=True)
    # stop tokens that end rows 0 and 2 early (their 2nd and 3rd tokens), not the others
    stop = [int(free[0, 1]), int(free[2, 2])]
    keep_going = [r for r in range(5) if not any(int(t) in stop for t in free[r, :9])]
    assert keep_going, "the random model hit a stop token in every row; pick other rows"
    whole, _ = adapted.generate(x["input_ids"], x["attention_mask"], slot_ids=slots, max_new_tokens=10,
                                eos_token_id=stop, output_scores=True)
    compacted = adapted.generate(x["input_ids"], x["attention_mask"], slot_ids=slots, max_new_tokens=10,
                                 eos_token_id=stop)
    assert torch.equal(compacted, whole)


def test_min_new_tokens_holds_back_the_stop_tokens():
    model, tok = causal("llama")
    adapted = lmadapt.attach(model, "none", tokenizer=tok)
    x = torch.tensor([ids(tok, "the movie was fun it was")])
    first = int(adapted.generate(x, max_new_tokens=1, eos_token_id=[])[0, 0])
    assert adapted.generate(x, max_new_tokens=4, eos_token_id=[first]).tolist() == [[first]]   # it stops at once
    held, scores = adapted.generate(x, max_new_tokens=4, eos_token_id=[first], min_new_tokens=1, output_scores=True)
    assert int(held[0, 0]) != first and scores[0, 0, first] == float("-inf")


def test_min_new_tokens_holds_back_the_stop_tokens_in_beam_search():
    model, tok = causal("llama")
    adapted = lmadapt.attach(model, "none", tokenizer=tok)
    x = torch.tensor([ids(tok, "the movie was fun it was")])
    _, scores = adapted.generate(x, max_new_tokens=1, eos_token_id=[], output_scores=True)
    likely = scores[0, 0].topk(50).indices.tolist()          # every token a beam would start with
    held = adapted.generate(x, max_new_tokens=3, eos_token_id=likely, num_beams=2, min_new_tokens=1)
    assert held.shape[1] >= 1 and int(held[0, 0]) not in likely
    with pytest.raises(ValueError, match="min_new_tokens"):
        adapted.generate(x, max_new_tokens=2, min_new_tokens=-1)
