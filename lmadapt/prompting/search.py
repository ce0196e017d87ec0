"""Automatic label words and templates, ranked on the labeled few (Gao et al. 2021, LM-BFF; Schick
et al. 2020, PETAL).

Label-word search (`search_words`), for one template:
1. log p(v | T(x)) at the mask for every whole-word vocabulary token v (verbalizer.vocab_words)
   and every labeled example x: ONE forward per example, (N, V);
2. per label c, the `candidates` words with the highest sum over the examples of class c of
   log p(v | T(x)) (LM-BFF; `score='ratio'` subtracts the mean over all examples, PETAL's
   likelihood ratio, which demotes words that are likely whatever the label);
3. every assignment (one word per label, no word twice) of those candidates scored on the
   labeled few (accuracy, then the mean log-likelihood margin of the true label) - free, from
   the (N, V) table; the `top` best are scored on the dev few and ranked by dev accuracy: the
   first is the best assignment.

Template search (`search_templates`), LM-BFF's generation for a model that cannot infill: the model
itself fills the gap between the input and the mask, one token at a time. A template is
`{text} <lead-in> {mask}` (pairs: `{text}\\n{text_pair} <lead-in> {mask}`); from a lead-in, the
next-token candidates are the `per_step` whole words the model finds most likely right after it
(mean log-prob over the labeled inputs, read at a {mask} placed there), each extended template is
scored on the labeled few with the label words (accuracy, then the mean log-prob of the true
label's word normalized over the labels), and a beam of `beam` lead-ins goes on for up to
`lead_tokens` words. Every template met is ranked; the `top` are scored on the dev few and ranked
by dev accuracy. Templates are rendered and encoded exactly as training will (template.py), so
the ranking is the pattern the model will read.

Trigger search (`search_triggers`, AutoPrompt, Shin et al. 2020): `{text} t_1 .. t_n {mask}` with
n trigger words found by HotFlip - the gradient with respect to the triggers' embeddings (placed
as a {soft:n} table holding them) proposes replacements, the labeled-few score decides.
"""
from __future__ import annotations

import itertools

import torch

from .head import read_head
from .verbalizer import vocab_words

PUNCTUATION = (".", ",", ":", "?", "!", "-")


def _attach(model, tok, task, template: str, verbalizer):
    from ..api import attach
    return attach(model, "none", task=task, tokenizer=tok, head="verbalizer", template=template,
                  verbalizer=verbalizer)


def _vocab_table(adapted, examples, opts) -> torch.Tensor:
    return read_head(adapted, examples, lambda h, x: h.vocab_log_probs(x), **opts)      # (N, V)


def _rank_stats(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean log-softmax of the true label) of (N, C) scores."""
    acc = float((scores.argmax(-1) == labels).float().mean())
    return acc, float(scores.log_softmax(-1).gather(1, labels[:, None]).mean())


def search_words(model, tok, task, template: str, train, dev, *, candidates: int = 10, top: int = 20,
                 score: str = "likelihood", batch_size: int = 32, max_length: int = 128,
                 precision: str = "auto") -> list[dict]:
    """Ranked label-word assignments for `template` (see the module docstring):
    -> [{'verbalizer': 'neg=w,pos=w', 'train_accuracy', 'train_loglik', 'dev_accuracy'}, ...] best first."""
    if score not in ("likelihood", "ratio"):
        raise ValueError(f"unknown word score '{score}'; choose one of: likelihood, ratio")
    labels_of = list(task.label_names)
    if not train:
        raise ValueError("label-word search needs labeled examples")
    a = _attach(model, tok, task, template, _placeholder(model, tok, template, labels_of))
    opts = dict(batch_size=batch_size, max_length=max_length, precision=precision)
    cands = vocab_words(tok, a.head.template.space_before_mask(a.causal))
    cand_ids = torch.tensor([i for i, _ in cands])
    word_of = dict(cands)
    lp = _vocab_table(a, train, opts)[:, cand_ids]                          # (N, V') whole words only
    y = torch.tensor([ex.label for ex in train])
    base = lp.mean(0) if score == "ratio" else 0.0
    per_label = []
    for c in range(len(labels_of)):
        if not bool((y == c).any()):
            raise ValueError(f"label-word search: no labeled example of label '{labels_of[c]}'")
        s = (lp[y == c] - base).sum(0)                                       # (V',)
        per_label.append(s.topk(min(candidates, len(s))).indices.tolist())
    ranked = []
    for combo in itertools.product(*per_label):
        if len(set(combo)) < len(combo):
            continue
        acc, ll = _rank_stats(lp[:, list(combo)], y)
        ranked.append((acc, ll, combo))
    ranked.sort(key=lambda r: (-r[0], -r[1]))
    ranked = ranked[:top]
    if dev:
        lp_dev = _vocab_table(a, dev, opts)[:, cand_ids]
        y_dev = torch.tensor([ex.label for ex in dev])
    out = []
    for acc, ll, combo in ranked:
        spec = ",".join(f"{label}={word_of[int(cand_ids[j])]}" for label, j in zip(labels_of, combo))
        row = {"verbalizer": spec, "train_accuracy": acc, "train_loglik": ll}
        if dev:
            row["dev_accuracy"] = _rank_stats(lp_dev[:, list(combo)], y_dev)[0]
        out.append(row)
    if dev:   # stable: ties keep the labeled-few order
        out.sort(key=lambda r: -r["dev_accuracy"])
    return out


def _placeholder(model, tok, template: str, labels) -> str:
    """Any single-token words: the head is only there to read the whole vocabulary at the mask."""
    from ..models import is_causal
    from .template import Template
    words = vocab_words(tok, Template(template).space_before_mask(is_causal(model)))
    if len(words) < len(labels):
        raise ValueError("label-word search: the tokenizer has too few whole-word tokens")
    return ",".join(f"{n}={words[i][1]}" for i, n in enumerate(labels))


def _base(task) -> str:
    return "{text}\n{text_pair}" if task.kind == "pair_classification" else "{text}"


def template_of(base: str, lead: list[str]) -> str:
    return base + "".join(" " + w for w in lead) + " {mask}"


def search_templates(model, tok, task, verbalizer, train, dev, *, lead_tokens: int = 3, beam: int = 3,
                     per_step: int = 8, top: int = 10, base: str | None = None, batch_size: int = 32,
                     max_length: int = 128, precision: str = "auto") -> list[dict]:
    """Ranked templates for `verbalizer` (see the module docstring):
    -> [{'template', 'train_accuracy', 'train_loglik', 'dev_accuracy'}, ...] best first."""
    if lead_tokens < 1 or beam < 1 or per_step < 1:
        raise ValueError("template search needs lead_tokens, beam and per_step >= 1")
    base = base or _base(task)
    opts = dict(batch_size=batch_size, max_length=max_length, precision=precision)
    y = torch.tensor([ex.label for ex in train])
    seen: dict[str, tuple[float, float]] = {}

    def score(template: str) -> tuple[float, float]:
        if template not in seen:
            a = _attach(model, tok, task, template, verbalizer)
            s = read_head(a, train, lambda h, x: h(x), **opts)             # (N, C) label-word scores
            seen[template] = _rank_stats(s, y)
        return seen[template]

    beams: list[list[str]] = [[]]
    for _ in range(lead_tokens):
        grown = []
        for lead in beams:
            a = _attach(model, tok, task, template_of(base, lead), verbalizer)
            words = vocab_words(tok, a.head.template.space_before_mask(a.causal))
            nxt = _vocab_table(a, train, opts).mean(0)                      # (V,) what the model puts here
            ids = torch.tensor([i for i, _ in words])
            best = nxt[ids].topk(min(per_step, len(ids))).indices.tolist()
            options = [words[j][1] for j in best] + [p for p in PUNCTUATION if not lead or lead[-1] != p][:2]
            for w in options:
                t = template_of(base, lead + [w])
                grown.append((*score(t), lead + [w]))
        grown.sort(key=lambda r: (-r[0], -r[1]))
        beams = [g[2] for g in grown[:beam]]
    return _ranked(seen, model, tok, task, verbalizer, dev, opts, top)


def _ranked(seen: dict, model, tok, task, verbalizer, dev, opts, top: int | None = None) -> list[dict]:
    """Templates by their labeled-few score; the `top` scored on the dev few, ranked by it."""
    ranked = sorted(seen.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]
    y_dev = torch.tensor([ex.label for ex in dev]) if dev else None
    out = []
    for template, (acc, ll) in ranked:
        row = {"template": template, "train_accuracy": acc, "train_loglik": ll}
        if dev:
            a = _attach(model, tok, task, template, verbalizer)
            row["dev_accuracy"] = _rank_stats(read_head(a, dev, lambda h, x: h(x), **opts), y_dev)[0]
        out.append(row)
    if dev:   # stable: ties keep the labeled-few order
        out.sort(key=lambda r: -r["dev_accuracy"])
    return out


def search_triggers(model, tok, task, verbalizer, train, dev, *, triggers: int = 3, iters: int = 6,
                    candidates: int = 8, top: int = 10, base: str | None = None, init_word: str | None = None,
                    batch_size: int = 32, max_length: int = 128, precision: str = "auto") -> list[dict]:
    """AutoPrompt-style trigger search (Shin et al. 2020): `{text} t_1 .. t_n {mask}` with n
    `triggers` whole-word tokens, found by HotFlip. Each iteration takes position i (round robin),
    the gradient g_i of the labeled few's loss with respect to that trigger's embedding (the
    triggers are placed as a {soft:n} prompt table holding their embeddings, so one backward gives
    all g_i), the `candidates` words w minimizing the first-order change (E_w - E_cur) . g_i, and
    keeps the best of them by the labeled-few score (accuracy, then the true label's mean
    log-softmax) if it beats the current triggers. -> every template met, ranked as
    search_templates ranks (the dev few last)."""
    from ..api import attach
    if triggers < 1 or iters < 0 or candidates < 1:
        raise ValueError("trigger search needs triggers >= 1, iters >= 0 and candidates >= 1")
    base = base or _base(task)
    opts = dict(batch_size=batch_size, max_length=max_length, precision=precision)
    words = vocab_words(tok, True)
    ids = torch.tensor([i for i, _ in words])
    E = model.get_input_embeddings().weight.detach()
    y = torch.tensor([ex.label for ex in train])
    seen: dict[str, tuple[float, float]] = {}

    def score(lead):
        t = template_of(base, lead)
        if t not in seen:
            a = _attach(model, tok, task, t, verbalizer)
            seen[t] = _rank_stats(read_head(a, train, lambda h, x: h(x), **opts), y)
        return seen[t]

    current = [init_word or words[0][1]] * triggers
    best = score(current)
    soft = attach(model, "prompt", task=task, tokenizer=tok, head="verbalizer", verbalizer=verbalizer,
                  template=base + " {soft:%d} {mask}" % triggers)
    word_id = {w: i for i, w in words}
    enc = soft.input_encoder(max_length)
    batch = enc.collate([enc.classification(ex) for ex in train], soft.device)
    for it in range(iters):
        i = it % triggers
        with torch.no_grad():
            soft.delta.prompt.table[0] = E[[word_id[w] for w in current]].float()
        soft.eval()
        soft.zero_grad(set_to_none=True)
        soft(**batch).loss.backward()
        g = soft.delta.prompt.table.grad[0, i]                                   # (H,)
        order = (E[ids].float() @ g.float()).argsort()[:candidates].tolist()      # most negative first
        tried = [current[:i] + [words[j][1]] + current[i + 1:] for j in order]
        scored = sorted(((*score(lead), lead) for lead in tried), key=lambda r: (-r[0], -r[1]))
        if scored and (scored[0][0], scored[0][1]) > best:
            best, current = (scored[0][0], scored[0][1]), scored[0][2]
    return _ranked(seen, model, tok, task, verbalizer, dev, opts, top)


def few_shot_split(task, shots: int, seed: int = 0, data_root=None):
    """LM-BFF's protocol: `shots` per label to train on and another `shots` per label, disjoint,
    as the dev few, both from the train split. -> (train, dev)."""
    from ..data import sample_kshot
    pool = task.load("train", data_root)
    train = sample_kshot(pool, shots, seed)
    taken = {id(ex) for ex in train}
    dev = sample_kshot([ex for ex in pool if id(ex) not in taken], shots, seed + 1)
    return train, dev


def run_search(model, tok, task, out, *, shots: int = 16, seed: int = 0, data_root=None, template: str | None = None,
               verbalizer: str | None = None, candidates: int = 10, top: int = 20, score: str = "likelihood",
               lead_tokens: int = 3, beam: int = 3, per_step: int = 8, triggers: int = 0, trigger_iters: int = 6,
               kpt: bool = False, kpt_unlabeled: int = 200,
               kpt_neighbours: int = 8, kpt_min_ratio: float = 0.1, max_length: int = 128, batch_size: int = 32,
               precision: str = "auto") -> dict:
    """What `lmadapt prompt-search` does: words for `template` (default: the task's first PVP's),
    then templates for `verbalizer` (default: the best words found), on `shots` per label with as
    many again as the dev few; with `kpt`, a knowledgeable verbalizer from the task's first PVP's
    words, expanded and refined on `kpt_unlabeled` other train examples. Writes OUT/search.json,
    OUT/verbalizers.txt, OUT/templates.txt (newlines as \\n, as --template takes them) and
    OUT/knowledgeable.json. -> the search.json dict."""
    import dataclasses
    from pathlib import Path

    from ..api import _task, attach
    from ..atomic import write_file, write_json
    from ..data import subsample
    t = _task(task)
    if t.kind not in ("classification", "pair_classification"):
        raise ValueError(f"prompt-search needs a classification task; '{t.name}' is {t.kind}")
    train, dev = few_shot_split(t, shots, seed, data_root)
    pvps = list(getattr(t, "pvps", ()))
    template = template or (pvps[0][0] if pvps else template_of(_base(t), []))
    opts = dict(batch_size=batch_size, max_length=max_length, precision=precision)
    words = search_words(model, tok, t, template, train, dev, candidates=candidates, top=top, score=score, **opts)
    use_words = verbalizer or words[0]["verbalizer"]
    templates = search_templates(model, tok, t, use_words, train, dev, lead_tokens=lead_tokens, beam=beam,
                                 per_step=per_step, top=top, **opts)
    if triggers:   # AutoPrompt-style candidates join the generated ones, ranked together by dev accuracy
        found = search_triggers(model, tok, t, use_words, train, dev, triggers=triggers, iters=trigger_iters,
                                candidates=per_step, top=top, **opts)
        have = {r["template"] for r in templates}
        templates = [r | {"search": "generated"} for r in templates] + \
            [r | {"search": "triggers"} for r in found if r["template"] not in have]
        templates.sort(key=lambda r: (-r.get("dev_accuracy", 0.0), -r["train_accuracy"], -r["train_loglik"]))
    result = {"task": t.name, "shots": shots, "seed": seed, "n_train": len(train), "n_dev": len(dev),
              "word_template": template, "words": words, "template_verbalizer": use_words, "templates": templates}
    out = Path(out)
    if kpt:
        from .knowledgeable import refine
        seeds = pvps[0][1] if pvps else use_words
        a = attach(model, "none", task=t, tokenizer=tok, head="knowledgeable", template=template, verbalizer=seeds,
                   head_options={"neighbours": kpt_neighbours, "synonyms": True})
        taken = {(ex.text, ex.text_pair) for ex in train + dev}
        pool = [dataclasses.replace(ex, label=None) for ex in t.load("train", data_root)
                if (ex.text, ex.text_pair) not in taken]
        spec, report = refine(a, subsample(pool, kpt_unlabeled, seed=seed), min_ratio=kpt_min_ratio, **opts)
        write_json(out / "knowledgeable.json", spec)
        result["knowledgeable"] = {"file": str(out / "knowledgeable.json"), "seeds": seeds,
                                   "expanded": a.head.verbalizer.to_dict(), **report}
    write_json(out / "search.json", result)
    for name, rows, key in (("verbalizers.txt", words, "verbalizer"), ("templates.txt", templates, "template")):
        text = "".join(r[key].replace("\n", "\\n") + "\n" for r in rows)
        write_file(out / name, lambda tmp, text=text: Path(tmp).write_text(text))
    return result
