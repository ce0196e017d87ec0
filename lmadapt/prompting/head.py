"""The verbalizer head: classification by the pretrained LM head, reading label words at the mask.

    scores[b, c] = combine over the words w of label c of  score(w | input b)        (B, C)

with score = the sum (or mean) of the word's token log-probs (see verbalizer.py). Trained with the
same cross-entropy as the linear head (objectives.cross_entropy), here over label-word scores:
PET's loss. The head owns no weights, so it works with every method that leaves the LM head in
place (all but `probe`, whose cached features are pooled hidden states) and its slots are the
method's: a row's scores come from its own slot's prompt, LoRA, prefix, ...

Cost. A single-token word costs a gather: the LM head is applied at ONE position per row, (B, H)
-> (B, V), never to all T positions. A causal LM's multi-token words (M of them, longest L + 1
tokens) continue each row from the input's KV cache: their first L tokens are fed after the
input, batched over words as B * M rows of L tokens (Adapted._extend), and the LM head is applied
to those B * M * L positions only. An MLM reads one [MASK]: a multi-token word's tokens are all
read there (the sum or mean of their log-probs at the mask, as OpenPrompt's multi-token handling
does), an approximation, since the MLM predicts one token per mask; PET's decoding over several
masks is not implemented.

Calibration (Zhao et al. 2021): `calibrate(adapted)` runs content-free inputs ('N/A', '',
'[MASK]') through the template and stores the mean of their label distributions, p_cf (C,) per
slot; scores then become log softmax(scores) - log p_cf, i.e. the label probabilities divided by
p_cf (Zhao's W = diag(p_cf)^-1), renormalized by the softmax that follows. Stored in method.json.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..heads import HEADS, HeadInputs, last_real
from ..objectives import cross_entropy
from .template import Template
from .verbalizer import TOKEN_SCORES, WORD_COMBINES, Verbalizer, word_token_ids

CONTENT_FREE = ("N/A", "", "[MASK]")


def lm_head_of(model) -> nn.Module | None:
    """hidden (.., H) -> vocabulary logits (.., V): a causal LM's output layer, or an MLM's whole
    prediction head (BERT's `cls`: dense + LayerNorm + decoder, not just the decoder)."""
    for attr in ("cls", "lm_head"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Module):
            return m
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


class VerbalizerHead(nn.Module):
    kind = "verbalizer"

    def __init__(self, adapted, template: str | Template, verbalizer, token_score: str = "sum",
                 word_combine: str = "mean", calibration: list[float] | None = None):
        super().__init__()
        model, tok = adapted.model, adapted.tokenizer
        if adapted.method.frozen_features:
            raise ValueError(f"method '{adapted.method.name}' trains on cached pooled features and cannot feed "
                             "the verbalizer head, which reads the LM head at the mask; use --head linear, "
                             "or another method (none for zero-shot, lora, prompt, full, ...)")
        if adapted.layer != -1:
            raise ValueError(f"the verbalizer head reads the LM head, which expects the last layer; got "
                             f"layer={adapted.layer}: attach with layer=-1")
        lm = lm_head_of(model)
        if lm is None:
            raise ValueError(f"{model.config.model_type} has no LM head (an encoder loaded without its MLM "
                             "head, e.g. minilm-l6, which ships none): the verbalizer head needs one; use "
                             "--head linear, a causal LM, or an encoder saved with its MLM head (BertForMaskedLM)")
        if tok is None:
            raise ValueError("the verbalizer head needs a tokenizer: attach(..., tokenizer=tok)")
        if token_score not in TOKEN_SCORES:
            raise ValueError(f"unknown token_score '{token_score}'; choose one of: {', '.join(TOKEN_SCORES)}")
        if word_combine not in WORD_COMBINES:
            raise ValueError(f"unknown word_combine '{word_combine}'; choose one of: {', '.join(WORD_COMBINES)}")
        object.__setattr__(self, "_lm", lm)   # the model's own module: not registered twice
        self.template = template if isinstance(template, Template) else Template(template)
        self.verbalizer = Verbalizer.parse(verbalizer, adapted.label_names)
        self.causal, self.slots = adapted.causal, adapted.slots
        self.token_score, self.word_combine = token_score, word_combine
        self.mask_id = None if self.causal else tok.mask_token_id
        if not self.causal and self.mask_id is None:
            raise ValueError("this encoder's tokenizer has no mask token; the verbalizer head needs an MLM")
        self.loss = cross_entropy
        ids = word_token_ids(tok, self.verbalizer, self.template.space_before_mask(self.causal))
        flat = self.verbalizer.flat()
        dev = model.device
        buf = lambda name, t: self.register_buffer(name, t.to(dev), persistent=False)  # noqa: E731
        buf("first", torch.tensor([i[0] for i in ids]))                                   # (W,)
        buf("word_len", torch.tensor([float(len(i)) for i in ids]))                       # (W,)
        multi = [j for j, i in enumerate(ids) if len(i) > 1]
        L = max((len(ids[j]) - 1 for j in multi), default=0)
        # Continuation m feeds word tokens 0..n-2 and reads tokens 1..n-1 (padded to L, masked out)
        buf("rest_word", torch.tensor(multi, dtype=torch.long))                           # (M,)
        buf("rest_in", torch.tensor([ids[j][:-1] + [0] * (L - len(ids[j]) + 1) for j in multi],
                                    dtype=torch.long).view(len(multi), L))                # (M, L)
        buf("rest_tgt", torch.tensor([ids[j][1:] + [0] * (L - len(ids[j]) + 1) for j in multi],
                                     dtype=torch.long).view(len(multi), L))               # (M, L)
        buf("rest_valid", torch.tensor([[1.0] * (len(ids[j]) - 1) + [0.0] * (L - len(ids[j]) + 1)
                                        for j in multi]).view(len(multi), L))             # (M, L)
        C = len(self.verbalizer.words)
        per_label = [[j for j, (c, _) in enumerate(flat) if c == label] for label in range(C)]
        width = max(len(p) for p in per_label)
        buf("label_words", torch.tensor([p + [0] * (width - len(p)) for p in per_label]))             # (C, Wc)
        buf("label_valid", torch.tensor([[True] * len(p) + [False] * (width - len(p)) for p in per_label]))
        self.needs_cache = self.causal and bool(multi)
        self.register_buffer("calibration", torch.zeros(adapted.slots.n, C, device=dev), persistent=False)
        self.calibrated = calibration is not None
        if calibration is not None:
            self.calibration[0] = torch.tensor(calibration, dtype=torch.float32)

    def _log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """(.., H) -> (.., V) log-probs, in the LM head's own dtype (float32) under autocast too."""
        with torch.autocast(h.device.type, enabled=False):
            w = next(self._lm.parameters())
            return torch.log_softmax(self._lm(h.to(w.dtype)).float(), -1)

    def mask_hidden(self, x: HeadInputs) -> torch.Tensor:
        """(B, H): the hidden state where the label word is predicted, one position per row."""
        B = x.hidden.shape[0]
        if self.causal:
            read = last_real(x.mask)                                   # (B,) the next-token position
        else:
            is_mask = x.input_ids == self.mask_id                      # (B, T)
            if not bool(is_mask.any(1).all()):
                raise ValueError("an input row holds no [MASK] token: encode inputs with the head's template "
                                 "(adapted.input_encoder())")
            read = is_mask.int().argmax(1)                             # (B,) first [MASK]
        return x.hidden[torch.arange(B, device=read.device), read]     # (B, H): one position per row

    def vocab_log_probs(self, x: HeadInputs) -> torch.Tensor:
        """(B, V) log p(token | input) at the mask: what label-word search ranks words by."""
        return self._log_probs(self.mask_hidden(x))

    def word_scores(self, x: HeadInputs) -> torch.Tensor:
        """(B, W) log p(word | input), summed (or averaged) over the word's tokens."""
        B = x.hidden.shape[0]
        at_mask = self._log_probs(self.mask_hidden(x))                # (B, V)
        words = at_mask[:, self.first]                                 # (B, W)
        if self.needs_cache:  # causal: the word's later tokens, each after the ones before it
            cont = self._log_probs(x.extend(self.rest_in))             # (B, M, L, V)
            tgt = self.rest_tgt.expand(B, -1, -1).unsqueeze(-1)        # (B, M, L, 1)
            rest = (cont.gather(-1, tgt).squeeze(-1) * self.rest_valid).sum(-1)   # (B, M)
            words = words.index_add(1, self.rest_word, rest)
        elif len(self.rest_word):  # MLM: every token of the word read at the one [MASK]
            rest = (at_mask[:, self.rest_tgt] * self.rest_valid).sum(-1)          # (B, M, L) -> (B, M)
            words = words.index_add(1, self.rest_word, rest)
        if self.token_score == "mean":
            words = words / self.word_len
        return words

    def forward(self, x: HeadInputs) -> torch.Tensor:
        words = self.word_scores(x)[:, self.label_words]               # (B, C, Wc)
        if self.word_combine == "mean":
            scores = (words * self.label_valid).sum(-1) / self.label_valid.sum(-1)
        else:
            scores = words.masked_fill(~self.label_valid, float("-inf")).logsumexp(-1)
        return self.calibrate_scores(scores)                           # (B, C)

    def calibrate_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Contextual calibration, when set: log softmax(scores) - log p_cf of the row's slot."""
        if self.calibrated:
            scores = scores.log_softmax(-1) - self.slots.pick(self.calibration)
        return scores

    def config(self, slot: int = 0) -> dict:
        return {"template": self.template.text, "verbalizer": self.verbalizer.to_dict(),
                "token_score": self.token_score, "word_combine": self.word_combine,
                "calibration": self.calibration[slot].tolist() if self.calibrated else None}


def _build(adapted, kind: str, **args) -> VerbalizerHead:
    if "template" not in args or "verbalizer" not in args:
        raise ValueError("the verbalizer head needs a template and a verbalizer (attach(..., template=..., "
                         "verbalizer=...), or a task with default patterns)")
    return VerbalizerHead(adapted, **args)


HEADS["verbalizer"] = _build


@torch.no_grad()
def calibrate(adapted, content_free=CONTENT_FREE, precision: str = "fp32") -> torch.Tensor:
    """Contextual calibration: set each slot's p_cf from the content-free inputs; -> (S, C) log p_cf."""
    from ..data import Example
    from ..precision import autocast
    head = adapted.head
    if not isinstance(head, VerbalizerHead):
        raise ValueError("calibration needs the verbalizer head (attach with head='verbalizer')")
    if not content_free:
        raise ValueError("calibrate() needs at least one content-free input, e.g. 'N/A'")
    pair = head.template.uses_pair
    enc = adapted.input_encoder()
    batch = enc.collate([enc.classification(Example(text=c, text_pair=c if pair else None))
                         for c in content_free], adapted.device)
    was_training = adapted.training
    adapted.eval()
    head.calibrated = False
    try:
        with autocast(precision, adapted.device):
            for s in range(adapted.slots.n):
                ids = None if adapted.slots.n == 1 else torch.full((len(content_free),), s, dtype=torch.long)
                scores = adapted(**batch, slot_ids=ids).logits.float()       # (n, C)
                head.calibration[s] = scores.softmax(-1).mean(0).log()       # mean label distribution
    finally:
        adapted.train(was_training)
    head.calibrated = True
    return head.calibration.clone()


@torch.no_grad()
def read_head(adapted, examples, read, *, batch_size: int = 32, max_length: int = 128,
              precision: str = "auto") -> torch.Tensor:
    """Run `examples` through the model and the head's template and stack read(head, HeadInputs)
    per batch: e.g. `VerbalizerHead.word_scores` (N, W) or `vocab_log_probs` (N, V). In order."""
    from ..precision import autocast
    head = adapted.head
    enc = adapted.input_encoder(max_length)
    feats = [enc.classification(ex) for ex in examples]
    for f in feats:
        f.pop("labels", None)
    was_training = adapted.training
    adapted.eval()
    out = []
    try:
        with autocast(precision, adapted.device):
            for i in range(0, len(feats), batch_size):
                b = enc.collate(feats[i:i + batch_size], adapted.device)
                hidden, cache = adapted.encode(b["input_ids"], b["attention_mask"], use_cache=head.needs_cache,
                                               token_type_ids=b.get("token_type_ids"))
                mask = b["attention_mask"][:, -hidden.shape[1]:]
                extend = (lambda ids, c=cache, m=mask: adapted._extend(c, m, ids)) if head.needs_cache else None
                out.append(read(head, HeadInputs(hidden, mask, b["input_ids"], extend)).float().cpu())
    finally:
        adapted.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
