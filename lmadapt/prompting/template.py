"""Templates: a classification example phrased as a fill-in-the-blank for the LM itself.

    {text} It was {mask}.            {text} ? {mask}, {text_pair}            {soft:4} {text} {mask}

Fixed text, the example's fields ({text}, {text_pair}), trainable soft tokens ({soft:N}) and
exactly one {mask}: where a label word goes.

Where the mask is read:
- encoder with an MLM head: {mask} is the tokenizer's [MASK] token; the text on both sides stays.
- causal LM: the mask is the next token after the rendered prefix, so the input ENDS right before
  {mask}. What follows {mask} cannot be seen, so it is rewritten: plain text after {mask} (the
  final '.' of `{text} It was {mask}.`) is dropped; a part holding a field or soft tokens (PET's
  `{text} ? {mask}, {text_pair}`) is moved before the mask's lead-in, the fixed text between the
  last field and {mask}: `{text} ? {mask}, {text_pair}` reads `{text}, {text_pair} ? {mask}`.
  With left padding the prediction is read at each row's last real token.

Tokenization: each part is tokenized on its own (so truncation can cut the fields and never the
template), and spaces at the end of fixed text move to the start of what follows. BPE
tokenizers then see " word" tokens as in running text: in `It was {mask}` the label word is
tokenized as " great" (`space_before_mask`), never a lone " " token followed by "great".
Over `max_length`, the longest field loses its last token until the input fits (PET's rule).

{soft:N}: N slots filled by the prompt method's k = N virtual tokens in place (method 'prompt' or
'ptuning'; Adapted checks k == N). Without {soft:N} a prompt method prepends its tokens as usual.
In input ids a slot is SOFT_TOKEN (-1); Adapted.encode swaps in the embeddings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SOFT_TOKEN = -1  # input id of a {soft:N} slot; never a vocabulary id

_FIELD = re.compile(r"\{([^{}]*)\}")
FIELDS = ("text", "text_pair", "mask", "soft:N")


@dataclass(frozen=True)
class Part:
    kind: str          # "fixed" | "text" | "text_pair" | "soft" | "mask"
    value: str = ""    # the fixed text
    n: int = 0         # soft tokens
    lead: str = ""     # a space carried over from the fixed text before (fields and the mask)


def _parse(text: str) -> list[Part]:
    parts, pos = [], 0
    for m in _FIELD.finditer(text):
        if m.start() > pos:
            parts.append(Part("fixed", text[pos:m.start()]))
        name = m.group(1).strip()
        if name in ("text", "text_pair", "mask"):
            parts.append(Part(name))
        elif re.fullmatch(r"soft(:\d+)?", name):
            n = int(name.split(":")[1]) if ":" in name else 1
            if n < 1:
                raise ValueError(f"template {text!r}: {{soft:{n}}} needs N >= 1")
            parts.append(Part("soft", n=n))
        else:
            raise ValueError(f"template {text!r}: unknown field {{{name}}}; the fields are "
                             f"{', '.join('{' + f + '}' for f in FIELDS)}")
        pos = m.end()
    if pos < len(text):
        parts.append(Part("fixed", text[pos:]))
    if "{" in "".join(p.value for p in parts) or "}" in "".join(p.value for p in parts):
        raise ValueError(f"template {text!r}: unmatched brace; braces only mark fields "
                         f"({', '.join('{' + f + '}' for f in FIELDS)})")
    return parts


def _causal(parts: list[Part]) -> list[Part]:
    """The causal reading: everything up to {mask}, with a field part after it moved in front of
    the mask's lead-in (see the module docstring); plain text after it dropped."""
    i = next(j for j, p in enumerate(parts) if p.kind == "mask")
    before, after = parts[:i], parts[i + 1:]
    if not any(p.kind != "fixed" for p in after):
        return before + [parts[i]]
    lead_at = len(before)
    while lead_at > 0 and before[lead_at - 1].kind == "fixed":
        lead_at -= 1
    return before[:lead_at] + after + before[lead_at:] + [parts[i]]


def _carry_spaces(parts: list[Part]) -> list[Part]:
    """Move trailing spaces of fixed text onto the field or mask that follows it; drop them
    before soft tokens (which are not text)."""
    out = []
    for j, p in enumerate(parts):
        nxt = parts[j + 1] if j + 1 < len(parts) else None
        if p.kind == "fixed" and nxt is not None and nxt.kind != "fixed" and p.value.endswith(" "):
            stripped = p.value.rstrip(" ")
            if stripped:
                out.append(Part("fixed", stripped))
            if nxt.kind != "soft":
                parts[j + 1] = Part(nxt.kind, nxt.value, nxt.n, " ")
            continue
        out.append(p)
    return out


class Template:
    """A parsed template; `encode` turns an example into input ids for a causal LM or an MLM."""

    def __init__(self, text: str):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"template must be non-empty text, got {text!r}")
        self.text = text
        parts = _parse(text)
        kinds = [p.kind for p in parts]
        if kinds.count("mask") != 1:
            raise ValueError(f"template {text!r} must hold exactly one {{mask}} (where the label word "
                             f"goes), found {kinds.count('mask')}; example: '{{text}} It was {{mask}}.'")
        if "text" not in kinds:
            raise ValueError(f"template {text!r} must hold {{text}}")
        self.uses_pair = "text_pair" in kinds
        self.n_soft = sum(p.n for p in parts if p.kind == "soft")
        self._parts = {True: _carry_spaces(_causal(list(parts))), False: _carry_spaces(list(parts))}

    def __repr__(self) -> str:
        return f"Template({self.text!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Template) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def parts(self, causal: bool) -> list[Part]:
        return self._parts[causal]

    def space_before_mask(self, causal: bool) -> bool:
        """Whether label words are tokenized with a leading space (' great')."""
        return self._parts[causal][-1 if causal else self._mask_index(causal)].lead == " "

    def _mask_index(self, causal: bool) -> int:
        return next(j for j, p in enumerate(self._parts[causal]) if p.kind == "mask")

    def render(self, ex, causal: bool, mask_token: str = "[MASK]") -> str:
        """The input as text (what `encode` tokenizes, part by part): for reading and tests."""
        out = []
        for p in self._parts[causal]:
            if p.kind == "fixed":
                out.append(p.value)
            elif p.kind == "soft":
                out.append("<soft>" * p.n)
            elif p.kind == "mask":
                out.append("" if causal else p.lead + mask_token)
            else:
                out.append(p.lead + self._field(ex, p.kind))
        return "".join(out)

    def _field(self, ex, name: str) -> str:
        value = getattr(ex, name)
        if value is None:
            raise ValueError(f"template {self.text!r} uses {{{name}}} but the example has none "
                             f"(text={ex.text[:40]!r}); use a template without {{{name}}}")
        return value

    def encode(self, tokenizer, ex, causal: bool, max_length: int) -> dict:
        """-> {'input_ids': [...]} (+ 'token_type_ids' for encoders that take them). Causal: the
        ids end where the label word would start. MLM: [CLS] ... [MASK] ... [SEP]."""
        def ids_of(s: str) -> list[int]:
            return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

        mask_id = None
        if not causal:
            mask_id = tokenizer.mask_token_id
            if mask_id is None:
                raise ValueError("the tokenizer has no mask token: an encoder needs an MLM tokenizer "
                                 "for the verbalizer head")
        pieces: list[tuple[str, list[int]]] = []
        for p in self._parts[causal]:
            if p.kind == "fixed":
                pieces.append(("fixed", ids_of(p.value)))
            elif p.kind == "soft":
                pieces.append(("fixed", [SOFT_TOKEN] * p.n))
            elif p.kind == "mask":
                if not causal:
                    pieces.append(("fixed", [mask_id]))
            else:
                value = self._field(ex, p.kind)
                ids = ids_of(p.lead + value) if value else []
                if mask_id is not None:  # a literal "[MASK]" in the data must not become the slot
                    ids = [tokenizer.unk_token_id if t == mask_id else t for t in ids]
                pieces.append(("field", ids))
        # An MLM input is one sequence [CLS] ... [SEP] (<s> ... </s> for RoBERTa: the same roles).
        wrap = [] if causal else [tokenizer.cls_token_id, tokenizer.sep_token_id]
        specials = sum(t is not None for t in wrap)
        excess = sum(len(ids) for _, ids in pieces) + specials - max_length
        fields = [ids for kind, ids in pieces if kind == "field"]
        while excess > 0:
            longest = max(fields, key=len, default=None)
            if not longest:
                raise ValueError(f"template {self.text!r}: its fixed text alone is longer than "
                                 f"max_length={max_length} tokens; raise --max-length")
            longest.pop()
            excess -= 1
        ids = [t for _, piece in pieces for t in piece]
        if not causal:
            ids = [t for t in wrap[:1] if t is not None] + ids + [t for t in wrap[1:] if t is not None]
        out = {"input_ids": ids}
        if not causal and "token_type_ids" in tokenizer.model_input_names:
            out["token_type_ids"] = [0] * len(ids)
        return out
