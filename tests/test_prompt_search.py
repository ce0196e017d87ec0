"""Label-word and template search (lmadapt/prompting/search.py) and `lmadapt prompt-search`.

The word search is checked against an independent brute force: plain HF forwards of the rendered
inputs, every whole-word token's summed log-prob per label, and every assignment's accuracy. On
top, a crafted case plants a known best word: the output-embedding row of 'cafe' is set so that
the model puts it after positive inputs and 'pub' after negative ones."""
import json

import torch

from lmadapt.cli import main
from lmadapt.prompting.search import few_shot_split, search_templates, search_words
from lmadapt.prompting.template import Template
from lmadapt.prompting.verbalizer import vocab_words
from toy_prompts import TOY_PVP, causal, ids

TEMPLATE = "{text} it was {mask}"


@torch.no_grad()
def _brute_force(model, tok, examples):
    """(N, V') log p(word | rendered input) by plain forwards, one example at a time; the words."""
    words = vocab_words(tok, True)
    rows = []
    for ex in examples:
        x = torch.tensor([ids(tok, f"{ex.text} it was")])
        rows.append(model(input_ids=x).logits[0, -1].log_softmax(-1)[[i for i, _ in words]])
    return torch.stack(rows), [w for _, w in words]


def test_word_search_matches_brute_force():
    model, tok = causal()
    train, dev = few_shot_split(TOY_PVP, 4)
    got = search_words(model, tok, TOY_PVP, TEMPLATE, train, dev, candidates=5, top=200)
    lp, words = _brute_force(model, tok, train)
    y = torch.tensor([ex.label for ex in train])
    top5 = [[words[i] for i in lp[y == c].sum(0).topk(5).indices.tolist()] for c in (0, 1)]
    pairs = {r["verbalizer"] for r in got}
    assert pairs == {f"negative={a},positive={b}" for a in top5[0] for b in top5[1] if a != b}
    lp_dev, _ = _brute_force(model, tok, dev)
    y_dev = torch.tensor([ex.label for ex in dev])
    for r in got:   # each assignment's dev accuracy, by hand
        a, b = (kv.split("=")[1] for kv in r["verbalizer"].split(","))
        acc = float((lp_dev[:, [words.index(a), words.index(b)]].argmax(-1) == y_dev).float().mean())
        assert r["dev_accuracy"] == acc
    assert [r["dev_accuracy"] for r in got] == sorted((r["dev_accuracy"] for r in got), reverse=True)


@torch.no_grad()
def test_word_search_finds_a_planted_best_word():
    import lmadapt
    from lmadapt.prompting.head import read_head
    model, tok = causal("gpt2")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # untie from the input
    pool = TOY_PVP.load("train")
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=TEMPLATE, verbalizer="negative=bad,positive=good")
    h = read_head(a, pool, lambda hd, x: hd.mask_hidden(x))                    # (N, H) the mask's hidden states
    y = torch.tensor([ex.label for ex in pool])
    centre = (h[y == 1].mean(0) + h[y == 0].mean(0)) / 2
    d = h[y == 1].mean(0) - h[y == 0].mean(0)
    d = d - (d @ centre) / (centre @ centre) * centre         # orthogonal to the centre: h . d = (h - centre) . d
    proj = h @ d
    keep = (proj > 0) == (y == 1)                             # the examples on their label's side
    examples = [ex for ex, k in zip(pool, keep.tolist()) if k]
    s = 3.0 / float(proj[keep].abs().min())                   # logit(cafe) = s h.d >= 3 on positives, pub the reverse
    cafe, pub = ids(tok, " cafe")[0], ids(tok, " pub")[0]
    model.lm_head.weight[cafe], model.lm_head.weight[pub] = s * d, -s * d
    train, dev = examples[::2], examples[1::2]
    got = search_words(model, tok, TOY_PVP, TEMPLATE, train, dev, candidates=10, top=50)
    assert got[0]["verbalizer"] == "negative=pub,positive=cafe" and got[0]["dev_accuracy"] == 1.0


def test_template_candidates_render_and_fit_the_window():
    model, tok = causal()
    train, dev = few_shot_split(TOY_PVP, 2)
    got = search_templates(model, tok, TOY_PVP, "negative=bad,positive=good", train, dev, lead_tokens=2, beam=2,
                           per_step=3, top=6)
    assert 1 <= len(got) <= 6
    assert [r["dev_accuracy"] for r in got] == sorted((r["dev_accuracy"] for r in got), reverse=True)
    long = train[0].__class__(text=" ".join(["movie"] * 40), label=0)
    for r in got:
        t = Template(r["template"])
        lead = r["template"][len("{text} "):-len(" {mask}")]
        assert 1 <= len(lead.split()) <= 2
        assert t.render(train[0], causal=True) == f"{train[0].text} {lead}"
        enc = t.encode(tok, long, causal=True, max_length=12)["input_ids"]
        assert len(enc) == 12 and enc[-len(ids(tok, lead)):] == ids(tok, lead)   # the field is cut, never the template
    # the labeled-few scores are what training reads: re-scored by hand for the best template
    best = got[0]
    import lmadapt
    a = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template=best["template"],
                       verbalizer="negative=bad,positive=good")
    enc = a.input_encoder()
    with torch.no_grad():
        s = a(**enc.collate([enc.classification(ex) for ex in train])).logits
    assert best["train_accuracy"] == float((s.argmax(-1) == torch.tensor([ex.label for ex in train])).float().mean())


def test_cli_prompt_search_writes_what_train_takes(tiny_dir, tmp_path):
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{'pos' if e.label else 'neg'}\n" for e in TOY_PVP.load("train")))
    files = ["--train", str(p), "--dev", str(p), "--text-col", "sentence", "--label-col", "label"]
    out = tmp_path / "search"
    assert main(["prompt-search", "--model", str(tiny_dir), *files, "--template", "{text} it was {mask}",
                 "--shots", "2", "--candidates", "3", "--top", "4", "--lead-tokens", "1", "--per-step", "2",
                 "--triggers", "1", "--trigger-iters", "1", "--kpt", "--kpt-unlabeled", "8", "--out", str(out)]) == 0
    res = json.loads((out / "search.json").read_text())
    assert len(res["words"]) <= 4 and res["templates"]
    assert {r["search"] for r in res["templates"]} <= {"generated", "triggers"}
    template = (out / "templates.txt").read_text().splitlines()[0]
    words = (out / "verbalizers.txt").read_text().splitlines()[0]
    assert template == res["templates"][0]["template"] and words == res["words"][0]["verbalizer"]
    for verbalizer in (words, str(out / "knowledgeable.json")):
        assert main(["train", "--model", str(tiny_dir), *files, "--method", "prompt", "--template", template,
                     "--verbalizer", verbalizer, "--max-steps", "1", "--max-eval", "4", "--out",
                     str(tmp_path / f"run{len(verbalizer)}"), "--no-progress", "--ood", ""]) == 0


def test_trigger_search_hotflips_real_words():
    import lmadapt
    from lmadapt.prompting.search import search_triggers
    model, tok = causal()
    train, dev = few_shot_split(TOY_PVP, 2)
    words = "negative=bad,positive=good"
    # the gradient is taken with the triggers as a {soft:3} table of their embeddings: the same input
    soft = lmadapt.attach(model, "prompt", task=TOY_PVP, tokenizer=tok, template="{text} {soft:3} {mask}", verbalizer=words)
    plain = lmadapt.attach(model, "none", task=TOY_PVP, tokenizer=tok, template="{text} the movie was {mask}", verbalizer=words)
    with torch.no_grad():
        soft.delta.prompt.table[0] = model.get_input_embeddings().weight[ids(tok, " the movie was")]
        enc_s, enc_p = soft.input_encoder(), plain.input_encoder()
        ls = soft(**enc_s.collate([enc_s.classification(ex) for ex in train])).logits
        lp = plain(**enc_p.collate([enc_p.classification(ex) for ex in train])).logits
    torch.testing.assert_close(ls, lp, atol=1e-5, rtol=1e-5)
    got = search_triggers(model, tok, TOY_PVP, words, train, dev, triggers=2, iters=3, candidates=3, init_word="the")
    assert got and all(len(r["template"][len("{text} "):-len(" {mask}")].split()) == 2 for r in got)
    start = next(r for r in got if r["template"] == "{text} the the {mask}")
    assert max(r["train_accuracy"] for r in got) >= start["train_accuracy"]
    assert [r["dev_accuracy"] for r in got] == sorted((r["dev_accuracy"] for r in got), reverse=True)
