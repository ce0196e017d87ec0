"""The knowledgeable verbalizer (KPT, Hu et al. 2022): many words per label, refined and weighted.

1. Expansion (`expand`, at head construction with `neighbours` / `synonyms`): each label keeps its
   own words, then gains the shipped synonyms (prompting/synonyms.py, by label name) that the
   tokenizer knows, then its `neighbours` nearest whole-word tokens by cosine similarity of the
   model's input embeddings to the mean embedding of the label's own words. A word that lands in
   two labels is removed from both (unless it is one of a label's own words).
2. Refinement (`refine`, on unlabeled text): the prior of every word, p(w) = mean over the
   unlabeled inputs of p(w | input), through the template with the current model.
   - frequency refinement: a word whose prior is below `min_ratio` x the highest prior among its
     label's words is dropped ("rarely predicted"; the label's first word always stays);
   - contextualized calibration: scores use log p(w | x) - log p(w) (stored: `word_prior`).
3. Weighting: each word has a trained logit (S, W), softmaxed within its label (KPT's learnable
   refinement for few-shot; zero at init, i.e. the plain mean):

       scores[b, c] = sum_{w in c} alpha_{c,w} (log p(w | x_b) - log p(w)),  alpha_c = softmax(theta_c)

   (`word_combine='logsumexp'`: log sum_w alpha_{c,w} p(w | x_b) / p(w)).

Refinement returns a head spec; `refine_head` installs it. `lmadapt prompt-search --kpt` writes it to
DIR/knowledgeable.json, usable as `--verbalizer DIR/knowledgeable.json` with every method and PET.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import HEADS, HeadInputs, build_head, slotted
from .head import VerbalizerHead, read_head
from .synonyms import synonyms_for
from .template import Template
from .verbalizer import Verbalizer, vocab_words


def expand(model, tokenizer, verbalizer: Verbalizer, *, space: bool, neighbours: int = 8,
           synonyms: dict | None = None, single_token: bool = False) -> Verbalizer:
    """The KPT expansion described above; -> a Verbalizer with each label's own words first."""
    E = F.normalize(model.get_input_embeddings().weight.detach().float(), dim=-1)    # (V, H)
    cands = vocab_words(tokenizer, space)
    cand_ids = torch.tensor([i for i, _ in cands], dtype=torch.long, device=E.device)
    unk = getattr(tokenizer, "unk_token_id", None)

    def ids_of(w):
        return tokenizer((" " if space else "") + w, add_special_tokens=False)["input_ids"]

    def usable(w):
        ids = ids_of(w)
        return bool(ids) and (unk is None or unk not in ids) and (len(ids) == 1 or not single_token)

    own = {label: list(words) for label, words in verbalizer.words}
    added: dict[str, list[str]] = {}
    for label, words in verbalizer.words:
        extra = [w for w in (synonyms or {}).get(label, ()) if usable(w)]
        if neighbours and len(cand_ids):
            centre = torch.stack([E[ids_of(w)].mean(0) for w in words]).mean(0)           # (H,)
            sims = E[cand_ids] @ F.normalize(centre, dim=0)                                # (N,)
            order = sims.argsort(descending=True).tolist()
            near = []
            for j in order:
                w = cands[j][1]
                if w not in words and w not in extra and w not in near:
                    near.append(w)
                if len(near) == neighbours:
                    break
            extra += near
        added[label] = [w for w in dict.fromkeys(extra) if w not in words]
    # A word in two labels says nothing about either: drop it where it was added.
    seen: dict[str, int] = {}
    for label in own:
        for w in set(own[label] + added[label]):
            seen[w] = seen.get(w, 0) + 1
    mapping = {label: tuple(own[label] + [w for w in added[label] if seen[w] == 1]) for label in own}
    return Verbalizer.parse(mapping, [label for label, _ in verbalizer.words])


class KnowledgeableHead(VerbalizerHead):
    kind = "knowledgeable"

    def __init__(self, adapted, template, verbalizer, token_score: str = "sum", word_combine: str = "mean",
                 calibration=None, word_prior: list[float] | None = None, neighbours: int = 0,
                 synonyms: bool = False):
        t = template if isinstance(template, Template) else Template(template)
        words = Verbalizer.parse(verbalizer, adapted.label_names)
        if neighbours or synonyms:
            words = expand(adapted.model, adapted.tokenizer, words, space=t.space_before_mask(adapted.causal),
                           neighbours=int(neighbours), synonyms=synonyms_for(adapted.label_names) if synonyms else None,
                           single_token=not adapted.causal)
        super().__init__(adapted, t, words, token_score, word_combine, calibration)
        W = len(self.verbalizer.flat())
        self.word_weights = slotted(nn.Parameter(torch.zeros(adapted.slots.n, W, device=adapted.model.device)))
        if word_prior is not None and len(word_prior) != W:
            raise ValueError(f"knowledgeable head: word_prior has {len(word_prior)} values for {W} words "
                             f"({self.verbalizer.spec()}); refine again (prompting.knowledgeable.refine)")
        prior = torch.tensor(word_prior if word_prior is not None else [0.0] * W, dtype=torch.float32)
        self.register_buffer("word_prior", prior.to(adapted.model.device), persistent=False)       # (W,) log p(w)
        self.has_prior = word_prior is not None

    def forward(self, x: HeadInputs) -> torch.Tensor:
        words = self.word_scores(x)                                          # (B, W) log p(w | x)
        if self.has_prior:
            words = words - self.word_prior                                  # contextualized calibration
        g = words[:, self.label_words]                                       # (B, C, Wc)
        theta = self.slots.pick(self.word_weights)[..., self.label_words]    # (C, Wc) or (B, C, Wc)
        log_alpha = theta.masked_fill(~self.label_valid, float("-inf")).log_softmax(-1)
        if self.word_combine == "logsumexp":
            scores = (g + log_alpha).masked_fill(~self.label_valid, float("-inf")).logsumexp(-1)
        else:
            scores = (log_alpha.exp() * g.masked_fill(~self.label_valid, 0.0)).sum(-1)
        return self.calibrate_scores(scores)                                 # (B, C)

    def config(self, slot: int = 0) -> dict:
        return super().config(slot) | {"word_prior": self.word_prior.tolist() if self.has_prior else None,
                                       "neighbours": 0, "synonyms": False}   # stored already expanded


def refine(adapted, unlabeled, *, min_ratio: float = 0.1, batch_size: int = 32, max_length: int = 128,
           precision: str = "auto") -> tuple[dict, dict]:
    """Priors on `unlabeled` with the current head's words, frequency refinement, calibration.
    -> (head spec {'kind': 'knowledgeable', template, verbalizer, word_prior, ...}, report)."""
    head = adapted.head
    if not isinstance(head, VerbalizerHead):
        raise ValueError("refine needs a verbalizer-family head (attach with head='knowledgeable')")
    if not unlabeled:
        raise ValueError("refine needs unlabeled examples to estimate the words' priors")
    if not 0 <= min_ratio < 1:
        raise ValueError(f"min_ratio must be in [0, 1), got {min_ratio}")
    logp = read_head(adapted, unlabeled, lambda h, x: h.word_scores(x), batch_size=batch_size,
                     max_length=max_length, precision=precision)              # (N, W)
    prior = logp.exp().mean(0).clamp(min=1e-30)                              # (W,) p(w)
    flat = head.verbalizer.flat()
    keep, dropped = {}, {}
    for c, (label, words) in enumerate(head.verbalizer.words):
        idx = [j for j, (lc, _) in enumerate(flat) if lc == c]
        top = max(float(prior[j]) for j in idx)
        kept = [j for n, j in enumerate(idx) if n == 0 or float(prior[j]) >= min_ratio * top]
        keep[label] = kept
        dropped[label] = [flat[j][1] for j in idx if j not in kept]
    order = [j for label, _ in head.verbalizer.words for j in keep[label]]
    spec = {"kind": "knowledgeable", "template": head.template.text,
            "verbalizer": {label: [flat[j][1] for j in keep[label]] for label, _ in head.verbalizer.words},
            "word_prior": [float(prior[j].log()) for j in order],
            "token_score": head.token_score, "word_combine": head.word_combine}
    report = {"n_unlabeled": len(unlabeled), "dropped": dropped,
              "prior": {flat[j][1]: float(prior[j]) for j in range(len(flat))}}
    return spec, report


def refine_head(adapted, unlabeled, **kw) -> dict:
    """refine(), then install the refined knowledgeable head on `adapted`; -> the report."""
    spec, report = refine(adapted, unlabeled, **kw)
    args = {k: v for k, v in spec.items() if k != "kind"}
    adapted.head = build_head(adapted, "knowledgeable", **args)
    return report


def _build(adapted, kind: str, **args) -> KnowledgeableHead:
    if "template" not in args or "verbalizer" not in args:
        raise ValueError("the knowledgeable head needs a template and a verbalizer (its seed words)")
    import inspect
    known = set(inspect.signature(KnowledgeableHead.__init__).parameters) - {"self", "adapted"}
    bad = sorted(set(args) - known)
    if bad:
        raise ValueError(f"the knowledgeable head has no argument {', '.join(bad)}; its arguments: "
                         f"{', '.join(sorted(known))}")
    return KnowledgeableHead(adapted, **args)


HEADS["knowledgeable"] = _build
