"""Learned verbalizers (issue 13): knowledgeable (KPT) expansion and refinement against hand
computations; soft (WARP) and prototypical (ProtoVerb) heads train, only their tensors (and the
method's) change, slots route per row, and artifacts reload to the same scores; every kind reaches
PET through the verbalizer spec; the ProtoVerb losses by hand."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import lmadapt
from lmadapt.methods import METHODS
from lmadapt.objectives import instance_contrastive, prompt_reconstruction, prototype_contrastive
from lmadapt.prompting.knowledgeable import expand, refine, refine_head
from lmadapt.prompting.pet import PetConfig, run_pet
from lmadapt.prompting.verbalizer import Verbalizer, split_kind, vocab_words
from toy_prompts import TOY_PVP, causal, ids, mlm_model, mlm_tokenizer, train_steps, word_logprob

TEMPLATE = "{text} it was {mask} ."
HEAD_TENSORS = {"soft": {"head.label_emb", "head.label_bias"}, "prototypical": {"head.proj", "head.prototypes"},
                "knowledgeable": {"head.word_weights"}}


def _batch(a, n=16, split="train"):
    enc = a.input_encoder()
    return enc.collate([enc.classification(ex) for ex in TOY_PVP.load(split)[:n]])


def test_protoverb_losses_by_hand():
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(prototype_contrastive(sim, torch.tensor([0, 1]))) == pytest.approx(2 * 0.3132617, abs=1e-6)
    assert float(prototype_contrastive(torch.zeros(2, 2), torch.tensor([0, 1]))) == pytest.approx(1.3862944, abs=1e-6)
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(instance_contrastive(emb, torch.tensor([0, 0, 1]), 1.0)) == pytest.approx(0.3132617, abs=1e-6)
    emb4 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert float(instance_contrastive(emb4, torch.tensor([0, 0, 1, 1]), 1.0)) == pytest.approx(0.5514447, abs=1e-6)
    assert float(instance_contrastive(emb, torch.tensor([0, 1, 2]), 1.0)) == 0.0     # no positives
    assert float(prompt_reconstruction(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2))) == 2.5
    assert float(prompt_reconstruction(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 0.0]]), relative=True)) == 1.25


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_soft_starts_as_the_manual_verbalizer(arch):
    """Single-token words: soft scores = manual log-probs + log Z per row, so equal softmaxes."""
    if arch == "bert":
        tok = mlm_tokenizer()
        model = mlm_model(len(tok))
    else:
        model, tok = causal(arch)
    words = "negative=bad,positive=good"
    soft = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer="soft:" + words)
    manual = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer=words)
    assert soft.head_kind == "soft" and manual.head_kind == "verbalizer"
    b = _batch(soft)
    with torch.no_grad():
        s, m = soft(**b).logits, manual(**b).logits
    torch.testing.assert_close(s.softmax(-1), m.softmax(-1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(s, m)     # the soft scores are not log-probs (no log Z)


@pytest.mark.parametrize("kind", ["soft", "prototypical", "knowledgeable"])
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"probe", "ipt"}))   # ipt: test_ppt_ipt.py
def test_learned_verbalizers_train_only_their_tensors(kind, method):
    """Every method (probe reads pooled features, not the mask): the loss falls, the head's tensors
    change, the base model does not (except under full fine-tuning)."""
    model, tok = causal()
    a = lmadapt.attach(model, method, task=TOY_PVP, tokenizer=tok, template=TEMPLATE, init_seed=0, head=kind,
                       verbalizer="negative=bad|awful,positive=good|very good")
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert HEAD_TENSORS[kind] <= trainable
    assert method != "none" or trainable == HEAD_TENSORS[kind]
    b = _batch(a)
    head = [p for n, p in a.named_parameters() if n in HEAD_TENSORS[kind]]
    rest = [p for n, p in a.named_parameters() if p.requires_grad and n not in HEAD_TENSORS[kind]]
    # The method's own tensors at 3x its default lr, at most 1.5e-2: 8 steps on one batch of a tiny
    # random model diverge above that (ptuning2's default 1.5e-2 x 3 did, with the prototypes).
    opt = torch.optim.AdamW([{"params": head, "lr": 1e-2 if kind != "knowledgeable" else 0.3},
                             {"params": rest, "lr": min(max(METHODS[method].default_lr, 1e-3) * 3, 1.5e-2)}])
    a.train()
    losses = train_steps(a, b, opt)
    assert losses[-1] < losses[0] - 1e-3, losses
    after = dict(a.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable and HEAD_TENSORS[kind] <= changed, changed


@pytest.mark.parametrize("kind", ["soft", "prototypical", "knowledgeable"])
def test_trained_tensors_save_and_load(kind, tmp_path):
    model, tok = causal()
    a = lmadapt.attach(model, "lora", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, init_seed=0,
                       verbalizer=f"{kind}:negative=bad|awful,positive=good")
    res = lmadapt.train(a, TOY_PVP, out=tmp_path / "run", max_steps=3, batch_size=8, lr=1e-2, progress=False, ood=[])
    meta = json.loads((tmp_path / "run" / "best" / "method.json").read_text())
    assert meta["head"]["kind"] == kind
    b = lmadapt.load_adapted(tmp_path / "run" / "best", model=causal()[0], tokenizer=tok)
    assert b.head_kind == kind
    batch = _batch(a, split="dev")
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(**batch).logits, a(**batch).logits)
        for n in HEAD_TENSORS[kind]:   # the trained head tensors, not a fresh init
            fresh = lmadapt.attach(causal()[0], "lora", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, init_seed=1,
                                   verbalizer=f"{kind}:negative=bad|awful,positive=good")
            assert not torch.equal(dict(fresh.named_parameters())[n], dict(b.named_parameters())[n])
    assert lmadapt.evaluate(b, TOY_PVP)["accuracy"] == res["metrics"]["dev"]["accuracy"]


@pytest.mark.parametrize("kind", ["soft", "prototypical"])
def test_mixed_slots_equal_rows_alone(kind):
    model, tok = causal()
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, head=kind, slots=2,
                       verbalizer="negative=bad,positive=good")
    with torch.no_grad():
        for n, p in a.head.named_parameters():
            p[1] += torch.randn_like(p[1]) * 0.5
    b = _batch(a, 4)
    ids_ = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        mixed = a(**b, slot_ids=ids_).logits
        for s in (0, 1):
            alone = a(**b, slot_ids=torch.full((4,), s)).logits
            torch.testing.assert_close(mixed[ids_ == s], alone[ids_ == s])
        assert not torch.allclose(a(**b, slot_ids=torch.zeros(4, dtype=torch.long)).logits,
                                  a(**b, slot_ids=torch.ones(4, dtype=torch.long)).logits)


def test_knowledgeable_expansion_by_hand():
    model, tok = causal()
    seeds = Verbalizer.parse("negative=bad,positive=good", TOY_PVP.label_names)
    syn = {"negative": ("awful", "horrible", "boring"), "positive": ("great", "fun", "boring")}
    got = expand(model, tok, seeds, space=True, neighbours=2, synonyms=syn)
    E = F.normalize(model.get_input_embeddings().weight.detach().float(), dim=-1)
    cands = vocab_words(tok, True)
    for label, seed, own_syn in (("negative", "bad", ["awful"]), ("positive", "good", ["great", "fun"])):
        words = dict(got.words)[label]
        assert words[0] == seed
        assert "horrible" not in words                      # not in the vocabulary
        assert "boring" not in words                        # in both labels' lists: dropped from both
        sims = {w: float(E[i] @ E[ids(tok, " " + seed)[0]]) for i, w in cands
                if w not in (seed, "awful", "horrible", "boring", "great", "fun")}
        near = sorted(sims, key=sims.get, reverse=True)[:2]
        other = dict(got.words)["positive" if label == "negative" else "negative"]
        expect = [seed] + own_syn + [w for w in near if w not in other and w not in syn["positive" if label == "negative" else "negative"]]
        assert list(words) == expect, (words, expect)


def test_knowledgeable_refinement_drops_rare_words_and_calibrates():
    model, tok = causal()
    words = "negative=bad|awful|boring|cat|table,positive=good|great|fun|dog|pub"
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, head="knowledgeable",
                       verbalizer=words)
    unlabeled = TOY_PVP.load("train")[:12]
    logits = lambda x: model(input_ids=x).logits       # noqa: E731
    prefixes = [ids(tok, f"{ex.text} it was") for ex in unlabeled]
    flat = a.head.verbalizer.flat()
    prior = {w: sum(torch.tensor(word_logprob(logits, p, ids(tok, " " + w))).exp() for p in prefixes) / len(prefixes)
             for _, w in flat}
    r = sorted(float(prior[w]) / max(float(prior[v]) for c2, v in flat if c2 == c) for c, w in flat)
    ratio = (r[3] + r[4]) / 2          # between two words' ratios: no word sits on the threshold
    spec, report = refine(a, unlabeled, min_ratio=ratio)
    kept = {label: ws for label, ws in spec["verbalizer"].items()}
    for c, label in enumerate(TOY_PVP.label_names):
        own = [w for c2, w in flat if c2 == c]
        top = max(float(prior[w]) for w in own)
        want = [w for i, w in enumerate(own) if i == 0 or float(prior[w]) >= ratio * top]
        assert kept[label] == want
        assert report["dropped"][label] == [w for w in own if w not in want]
    assert sum(len(v) for v in report["dropped"].values()) >= 1
    for w, lp in zip([w for ws in kept.values() for w in ws], spec["word_prior"]):
        assert lp == pytest.approx(math.log(float(prior[w])), abs=1e-4)
    # the refined head: the mean of log p(w | x) - log p(w) over the label's kept words (uniform weights)
    refine_head(a, unlabeled, min_ratio=ratio)
    x = TOY_PVP.load("dev")[0]
    with torch.no_grad():
        got = a(**a.input_encoder().collate([a.input_encoder().classification(x)])).logits[0]
    p = ids(tok, f"{x.text} it was")
    for c, label in enumerate(TOY_PVP.label_names):
        want = sum(word_logprob(logits, p, ids(tok, " " + w)) - math.log(float(prior[w]))
                   for w in kept[label]) / len(kept[label])
        assert float(got[c]) == pytest.approx(want, abs=1e-4)


def test_spec_files_and_kinds_reach_pet(tmp_path):
    spec = {"kind": "kpt", "verbalizer": {"negative": ["bad"], "positive": ["good", "great"]}, "word_prior": [-3.0, -2.0, -4.0]}
    (tmp_path / "kpt.json").write_text(json.dumps(spec))
    assert split_kind(str(tmp_path / "kpt.json"))[0] == "knowledgeable"
    assert split_kind("proto:negative=bad,positive=good") == ("prototypical", "negative=bad,positive=good", {})
    with pytest.raises(ValueError, match="unknown kind 'sotf'"):
        split_kind("sotf:negative=bad,positive=good")
    model, tok = causal()
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, head="verbalizer", template=TEMPLATE,
                       verbalizer=str(tmp_path / "kpt.json"))
    assert a.head_kind == "knowledgeable" and a.head.word_prior.tolist() == [-3.0, -2.0, -4.0]
    with pytest.raises(ValueError, match="names the kind 'soft' but --head is 'linear'"):
        lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, head="linear", verbalizer="soft:negative=a,positive=b")
    cfg = PetConfig(shots=2, unlabeled=8, patterns=((TEMPLATE, "soft:negative=bad,positive=good"),
                                                    (TEMPLATE, "proto:negative=bad,positive=good")),
                    train={"max_steps": 1, "batch_size": 4}, final_train={"max_steps": 1, "batch_size": 4})
    res = run_pet(causal, TOY_PVP, cfg, tmp_path / "pet")
    kinds = [json.loads((tmp_path / "pet" / "g0" / f"p{i}" / "best" / "method.json").read_text())["head"]["kind"]
             for i in (0, 1)]
    assert kinds == ["soft", "prototypical"] and isinstance(res["final"]["dev_accuracy"], float)


def test_prototypical_loss_is_both_protoverb_terms():
    model, tok = causal()
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, head="prototypical",
                       verbalizer="negative=bad,positive=good", head_options={"instance_weight": 0.5, "temperature": 0.2})
    b = _batch(a, 8)
    a.train()
    out = a(**b)
    v = F.normalize(a.head.embed(a_inputs(a, b)), dim=-1)
    p = F.normalize(a.head.prototypes[0], dim=-1)
    sim = v @ p.T / 0.2
    torch.testing.assert_close(out.logits, sim)
    want = prototype_contrastive(sim, b["labels"]) + 0.5 * instance_contrastive(v, b["labels"], 0.2)
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert json.loads(json.dumps(a.meta()["head"]))["instance_weight"] == 0.5


def a_inputs(a, b):
    from lmadapt.heads import HeadInputs
    hidden, _ = a.encode(b["input_ids"], b["attention_mask"])
    return HeadInputs(hidden, b["attention_mask"], b["input_ids"])


@pytest.mark.integration
def test_smollm2_kpt_expansion_and_soft_init():
    """SmolLM2's BPE: whole words are ' word' tokens; KPT expands SST-2's words with real synonyms
    and neighbours; the soft head starts at the manual verbalizer's predictions."""
    model, tok = lmadapt.load("smollm2-135m")
    words = dict(vocab_words(tok, True))
    assert "great" in words.values() and "terrible" in words.values()
    a = lmadapt.attach(model, "none", task="sst2", tokenizer=tok, head="knowledgeable",
                       head_options={"neighbours": 4, "synonyms": True})
    got = a.head.verbalizer.to_dict()
    assert got["negative"][:3] == ["terrible", "bad", "awful"] and got["positive"][:2] == ["great", "good"]
    assert len(got["negative"]) > 10 and not set(got["negative"]) & set(got["positive"])
    soft = lmadapt.attach(model, "none", task="sst2", tokenizer=tok, head="soft")
    manual = lmadapt.attach(model, "none", task="sst2", tokenizer=tok)
    enc = soft.input_encoder()
    from lmadapt.data import Example
    b = enc.collate([enc.classification(Example(text=t)) for t in ("a charming film", "a dull , tedious mess")])
    with torch.no_grad():
        torch.testing.assert_close(soft(**b).logits.softmax(-1), manual(**b).logits.softmax(-1), atol=1e-4, rtol=1e-3)
