"""The verbalizer head (lmadapt/prompting/head.py) on tiny models: its scores are the label words'
log-probs computed by hand from a plain forward of input + word (single- and multi-token words,
sum / mean, mean / logsumexp, left padding, every inputs-side method), the MLM path, soft tokens
in place, per-row slots, calibration, save/load, the default head, and the refusals."""
import copy

import pytest
import torch

import lmadapt
from lmadapt.data import Example
from lmadapt.prompting import calibrate
from toy_prompts import MULTI, TEXTS, TOY_PVP, causal, ids, make_model, make_tokenizer, mlm_model, mlm_tokenizer, \
    word_logprob

TEMPLATE = "{text} it was {mask} ."
WORDS = [["bad", "very bad"], ["good", "really very good"]]   # MULTI, by label


def _batch(a, texts=TEXTS):
    enc = a.input_encoder()
    return enc.collate([enc.classification(Example(t)) for t in texts])


def _scores(a, texts=TEXTS, **kw):
    with torch.no_grad():
        return a(**_batch(a, texts), **kw).logits


def _randomize(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _by_hand(tok, logits_of, token_score="sum", word_combine="mean", texts=TEXTS):
    """(len(texts), 2): each label's words scored from one plain forward of prefix + word each."""
    out = []
    for text in texts:
        prefix = ids(tok, text + " it was")
        row = []
        for words in WORDS:
            s = torch.tensor([word_logprob(logits_of, prefix, ids(tok, " " + w)) /
                              (len(ids(tok, w)) if token_score == "mean" else 1) for w in words])
            row.append(float(s.mean() if word_combine == "mean" else s.logsumexp(0)))
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("token_score, word_combine", [("sum", "mean"), ("mean", "logsumexp")])
def test_scores_are_hand_computed_log_probs(arch, token_score, word_combine):
    model, tok = causal(arch)
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer=MULTI,
                       token_score=token_score, word_combine=word_combine)
    assert a.head.needs_cache   # two- and three-token words continue from the KV cache
    expected = _by_hand(tok, lambda x: model(x).logits, token_score, word_combine)
    torch.testing.assert_close(_scores(a), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "ptuning2", "lora", "adapter", "ladder"])
def test_multi_token_words_from_the_cache_match_a_full_forward(method):
    """The cached continuation must put word tokens at the right positions after virtual tokens and
    key/value prefixes: compare with the method's own forward over prefix + word, no cache."""
    model, tok = causal()
    a = lmadapt.attach(model, method, task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer=MULTI)
    _randomize(a)
    lm = model.get_output_embeddings()
    with torch.no_grad():
        expected = _by_hand(tok, lambda x: lm(a.encode(x)[0]))
    torch.testing.assert_close(_scores(a), expected, atol=1e-5, rtol=0)


def test_single_token_words_project_one_position_per_row():
    """No (B, T, V) logits: the LM head sees (B, H), once; multi-token words add (B, M, L, H)."""
    model, tok = causal()
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer="negative=bad,positive=good")
    assert not a.head.needs_cache
    _scores(a)
    assert seen == [(3, 32)]
    seen.clear()
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer=MULTI)
    _scores(a)
    assert seen == [(3, 32), (3, 2, 2, 32)]   # M = 2 multi-token words, L = 3 - 1 continuation tokens


def test_mlm_reads_the_mask_position():
    tok = mlm_tokenizer()
    model = mlm_model(len(tok))
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE,
                       verbalizer="negative=bad|awful,positive=good")
    got = _scores(a)
    b = _batch(a)
    with torch.no_grad():
        logp = torch.log_softmax(model(**b).logits, -1)                       # (B, T, V)
    pos = (b["input_ids"] == tok.mask_token_id).int().argmax(1)
    rows = logp[torch.arange(3), pos]
    bad, awful, good = (tok.convert_tokens_to_ids(w) for w in ("bad", "awful", "good"))
    expected = torch.stack([(rows[:, bad] + rows[:, awful]) / 2, rows[:, good]], 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("token_score", ["sum", "mean"])
def test_mlm_multi_token_words_read_every_token_at_the_mask(token_score):
    """'very bad' on an MLM: log p(very) + log p(bad), both at the one [MASK] (mean: / 2)."""
    tok = mlm_tokenizer()
    model = mlm_model(len(tok))
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer=MULTI,
                       token_score=token_score)
    got = _scores(a)
    b = _batch(a)
    with torch.no_grad():
        logp = torch.log_softmax(model(**b).logits, -1)                       # (B, T, V)
    pos = (b["input_ids"] == tok.mask_token_id).int().argmax(1)
    rows = logp[torch.arange(3), pos]                                          # (B, V)

    def word(w):
        t = tok(w, add_special_tokens=False)["input_ids"]
        s = rows[:, t].sum(-1)
        return s / len(t) if token_score == "mean" else s
    words = {w: word(w) for w in ("bad", "very bad", "good", "really very good")}
    assert len(tok("really very good", add_special_tokens=False)["input_ids"]) == 3
    expected = torch.stack([(words["bad"] + words["very bad"]) / 2, (words["good"] + words["really very good"]) / 2], 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mlm_refuses_encoders_without_an_mlm_head():
    tok = mlm_tokenizer()
    bert = make_model("bert", len(tok))   # a bare encoder, as minilm-l6 loads
    with pytest.raises(ValueError, match="no LM head.*minilm-l6"):
        lmadapt.attach(bert, "lora", task=TOY_PVP, tokenizer=tok, head="verbalizer")


def test_soft_tokens_fill_their_slots_in_place():
    """{soft:2} with method 'prompt': k = 2 by default, and the prompt table sits at the slots."""
    model, tok = causal()
    a = lmadapt.attach(model, "prompt", task=TOY_PVP, tokenizer=tok, template="{text} {soft:2} it was {mask}",
                       verbalizer="negative=bad,positive=good")
    assert a.method.k == 2
    _randomize(a)
    table = a.delta.prompt.table[0]                                            # (2, H)
    got = _scores(a, ["bad plot"])
    x = ids(tok, "bad plot") + [0, 0] + ids(tok, "it was")
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([x])).clone()
        emb[0, 2:4] = table
        h = model.base_model(inputs_embeds=emb).last_hidden_state[0, -1]
        logp = torch.log_softmax(model.get_output_embeddings()(h), -1)
    expected = torch.stack([logp[ids(tok, "bad")[0]], logp[ids(tok, "good")[0]]])[None]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with a.disabled():   # no table to place: the slots read the pad token, nothing crashes
        _scores(a, ["bad plot"])


def test_soft_tokens_need_a_prompt_method_of_the_right_size():
    model, tok = causal()
    with pytest.raises(ValueError, match="soft tokens.*method 'lora' has none"):
        lmadapt.attach(model, "lora", task=TOY_PVP, tokenizer=tok, template="{soft:2} {text} {mask}")
    with pytest.raises(ValueError, match="has 2 soft tokens but method 'prompt' has k=3"):
        lmadapt.attach(model, "prompt", task=TOY_PVP, tokenizer=tok, template="{soft:2} {text} {mask}", k=3)


@pytest.mark.parametrize("method", ["prefix", "lora", "prompt"])
def test_mixed_slots_equal_rows_alone(method):
    """Per-row slots through the cached continuation too (slot ids repeated per word)."""
    model, tok = causal()
    a = lmadapt.attach(model, method, task=TOY_PVP, tokenizer=tok, slots=3, template=TEMPLATE, verbalizer=MULTI)
    _randomize(a, seed=1)
    slot_ids = torch.tensor([2, 0, 1])
    mixed = _scores(a, slot_ids=slot_ids)
    lm = model.get_output_embeddings()
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(mixed[i:i + 1], _scores(a, [text], slot_ids=slot_ids[i:i + 1]), atol=1e-5, rtol=0)
        with a.slots.route(slot_ids[i:i + 1]), torch.no_grad():   # its slot reaches the word tokens too
            alone = _by_hand(tok, lambda x: lm(a.encode(x)[0]), texts=[text])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed, _scores(a, slot_ids=torch.zeros(3, dtype=torch.long)), atol=1e-4)


def test_calibration_flips_a_crafted_decision():
    """Zhao et al.: an input whose label margin is smaller than a content-free input's is decided
    the other way once divided by the content-free probabilities. The pair is found by hand among
    one-word inputs; the calibrated scores are checked against the formula."""
    model, tok = causal()
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer="negative=bad,positive=good")
    words = ["movie", "film", "plot", "actor", "story", "cat", "dog", "table", "food", "pub", "cafe", "price"]
    raw = _scores(a, words).log_softmax(-1)                                   # (n, 2)
    margin = raw[:, 1] - raw[:, 0]
    sign = 1 if bool((margin > 0).sum() >= 2) else -1                         # the label most words prefer
    order = [int(i) for i in torch.argsort(sign * margin) if sign * margin[i] > 0]
    x, cf = words[order[0]], words[order[-1]]                                 # least and most sure of it
    preferred = 1 if sign > 0 else 0
    assert _scores(a, [x]).argmax(-1).item() == preferred
    calibrate(a, content_free=(cf,))
    got = _scores(a, [x])
    assert got.argmax(-1).item() == 1 - preferred                             # flipped
    expected = raw[words.index(x)] - raw[words.index(cf)]                     # log p(x) - log p_cf
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)
    # the default content-free inputs: log of the mean of their label distributions
    cal = calibrate(a)[0]
    a.head.calibrated = False
    p = _scores(a, ["N/A", "", "[MASK]"]).softmax(-1).mean(0)
    torch.testing.assert_close(cal, p.log(), atol=1e-6, rtol=0)


def test_save_load_keeps_template_verbalizer_and_calibration(tmp_path):
    model, tok = causal()
    pristine = copy.deepcopy(model)
    a = lmadapt.attach(model, "lora", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer=MULTI,
                       word_combine="logsumexp")
    _randomize(a)
    calibrate(a)
    a.save(tmp_path / "art")
    b = lmadapt.load_adapted(tmp_path / "art", model=pristine, tokenizer=tok)
    assert b.head.kind == "verbalizer" and b.head.template.text == TEMPLATE
    assert b.head.config() == a.head.config() and b.head.config()["verbalizer"] == {
        "negative": ["bad", "very bad"], "positive": ["good", "really very good"]}
    torch.testing.assert_close(_scores(a), _scores(b), atol=1e-6, rtol=0)


def test_default_head():
    """Causal LM + a task with PVPs -> the verbalizer with the first PVP; probe, encoders, tasks
    without PVPs and num_labels alone -> linear."""
    from conftest import TOY_CLS
    model, tok = causal()
    a = lmadapt.attach(copy.deepcopy(model), "lora", task=TOY_PVP, tokenizer=tok)
    assert a.head_kind == "verbalizer" and a.head.template.text == TOY_PVP.pvps[0][0]
    assert lmadapt.attach(copy.deepcopy(model), "probe", task=TOY_PVP, tokenizer=tok).head_kind == "linear"
    assert lmadapt.attach(copy.deepcopy(model), "lora", task=TOY_CLS, tokenizer=tok).head_kind == "linear"
    assert lmadapt.attach(copy.deepcopy(model), "lora", num_labels=2, tokenizer=tok).head_kind == "linear"
    assert lmadapt.attach(copy.deepcopy(model), "lora", task=TOY_PVP, tokenizer=tok, head="linear").head_kind == "linear"
    btok = make_tokenizer("encoder")
    assert lmadapt.attach(make_model("bert", len(btok)), "lora", task=TOY_PVP, tokenizer=btok).head_kind == "linear"
    # a template alone asks for the verbalizer; without PVPs its words are the label names
    from dataclasses import replace
    yes_no = replace(TOY_CLS, name="yesno", label_names=("no", "yes"))
    a = lmadapt.attach(copy.deepcopy(model), "none", task=yes_no, tokenizer=tok, template=TEMPLATE)
    assert a.head_kind == "verbalizer" and a.head.verbalizer.spec() == "no=no,yes=yes"


@pytest.mark.parametrize("kw, match", [
    (dict(method="probe", head="verbalizer"), "method 'probe' trains on cached pooled features"),
    (dict(method="none", head="linear", template=TEMPLATE), "belong to the verbalizer head"),
    (dict(method="none", verbalizer="negative=bad"), "no words for positive"),
    (dict(method="none", verbalizer="negative=bad,positive=good,neutral=fine"), "unknown label.*neutral"),
    (dict(method="none", verbalizer="negative=bad,positive=zebra"), "'zebra' is not in the tokenizer's vocabulary"),
    (dict(method="none", verbalizer="negative=bad,positive=good", word_combine="max"), "choose one of: mean, logsumexp"),
    (dict(method="lora", layer=1, head="verbalizer"), "expects the last layer"),
])
def test_refusals_name_the_fix(kw, match):
    model, tok = causal()
    method = kw.pop("method")
    with pytest.raises(ValueError, match=match):
        lmadapt.attach(model, method, task=TOY_PVP, tokenizer=tok, **kw)
