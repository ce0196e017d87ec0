"""Verbalizers: each label -> one or more label words, `negative=terrible|bad,positive=great|good`.

A word's score is the log-probability the LM gives its tokens at the mask:
- one token: log p(w | input), read at the mask position;
- several tokens (causal LMs): log p(w_1 | input) + log p(w_2 | input, w_1) + ..., summed
  (`token_score='sum'`, the word's log-probability) or averaged (`'mean'`, per-token, which does
  not penalize long words).
A label's score combines its words: `word_combine='mean'` (mean log-prob) or `'logsumexp'`
(log of the words' total probability: the label is "any of these words").
"""
from __future__ import annotations

from dataclasses import dataclass

TOKEN_SCORES = ("sum", "mean")
WORD_COMBINES = ("mean", "logsumexp")


@dataclass(frozen=True)
class Verbalizer:
    """label -> words, in the order of the task's label names."""
    words: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def parse(cls, spec, label_names) -> "Verbalizer":
        """From 'label=word|word,label=word' or a {label: word | [words]} dict; every label of
        `label_names` needs at least one word, and no other label may appear."""
        label_names = list(label_names)
        if isinstance(spec, Verbalizer):
            mapping = dict(spec.words)
        elif isinstance(spec, dict):
            mapping = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in spec.items()}
        elif isinstance(spec, str):
            mapping = {}
            for item in filter(None, (s.strip() for s in spec.split(","))):
                if "=" not in item:
                    raise ValueError(f"verbalizer {spec!r}: '{item}' is not label=word (example: "
                                     f"{_example(label_names)})")
                label, words = (s.strip() for s in item.split("=", 1))
                if label in mapping:
                    raise ValueError(f"verbalizer {spec!r}: label '{label}' appears twice; list its "
                                     "words once, separated by |")
                mapping[label] = tuple(w.strip() for w in words.split("|"))
        else:
            raise ValueError(f"verbalizer must be 'label=word|word,...' or a dict, got {type(spec).__name__}")
        unknown = [k for k in mapping if k not in label_names]
        missing = [k for k in label_names if k not in mapping]
        if unknown or missing:
            raise ValueError(f"verbalizer {spec!r} does not fit the labels {', '.join(label_names)}: "
                             + "; ".join(filter(None, [f"unknown label(s) {', '.join(unknown)}" if unknown else "",
                                                       f"no words for {', '.join(missing)}" if missing else ""]))
                             + f"; example: {_example(label_names)}")
        for label, words in mapping.items():
            if not words or any(not w for w in words):
                raise ValueError(f"verbalizer {spec!r}: label '{label}' has an empty word")
        return cls(tuple((label, tuple(mapping[label])) for label in label_names))

    @classmethod
    def from_label_names(cls, label_names) -> "Verbalizer":
        """Each label is its own word ('not_entailment' reads 'not entailment')."""
        return cls(tuple((n, (n.replace("_", " "),)) for n in label_names))

    def spec(self) -> str:
        return ",".join(f"{label}={'|'.join(words)}" for label, words in self.words)

    def to_dict(self) -> dict:
        return {label: list(words) for label, words in self.words}

    def flat(self) -> list[tuple[int, str]]:
        """(label index, word) for every word, labels in order."""
        return [(i, w) for i, (_, words) in enumerate(self.words) for w in words]


def _example(label_names) -> str:
    return ",".join(f"{n}=word" for n in label_names)


def word_token_ids(tokenizer, verbalizer: Verbalizer, space: bool) -> list[list[int]]:
    """Token ids of every word (in `flat()` order); `space`: tokenized as ' word' (see template)."""
    out = []
    for _, word in verbalizer.flat():
        ids = tokenizer((" " if space else "") + word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"verbalizer word {word!r} tokenizes to nothing; choose another word")
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and unk in ids:
            raise ValueError(f"verbalizer word {word!r} is not in the tokenizer's vocabulary (it "
                             "tokenizes to the unknown token); choose another word")
        out.append(list(ids))
    return out


# The verbalizer-family heads: they read the mask through a template and start from label words.
VERBALIZER_KINDS = ("verbalizer", "knowledgeable", "soft", "prototypical")

# `--verbalizer KIND:label=word,...` picks a learned verbalizer (a head kind, lmadapt.heads.HEADS)
KIND_ALIASES = {"manual": "verbalizer", "verbalizer": "verbalizer", "kpt": "knowledgeable",
                "knowledgeable": "knowledgeable", "soft": "soft", "warp": "soft", "proto": "prototypical",
                "protoverb": "prototypical", "prototypical": "prototypical"}


def split_kind(spec) -> tuple[str | None, object, dict]:
    """A verbalizer spec -> (head kind or None, the words' spec, more head arguments).

    - 'soft:negative=terrible,positive=great' -> ('soft', 'negative=terrible,positive=great', {})
      (kinds: manual, kpt | knowledgeable, soft | warp, proto | prototypical);
    - 'DIR/knowledgeable.json' (as `lmadapt prompt-search` writes): {"kind": ..., "verbalizer":
      ..., other head arguments} -> (kind, verbalizer, the others);
    - anything else -> (None, spec, {})."""
    if isinstance(spec, str) and spec.strip().endswith(".json"):
        from pathlib import Path
        from ..atomic import read_json_file
        path = Path(spec.strip())
        if not path.exists():
            raise ValueError(f"--verbalizer {spec}: no such file (a .json verbalizer is a head spec as "
                             "`lmadapt prompt-search` writes it)")
        data = read_json_file(path, "write it again with `lmadapt prompt-search`")
        if not isinstance(data, dict) or "verbalizer" not in data:
            raise ValueError(f"{path}: a verbalizer file is a JSON object with 'verbalizer' (label -> words) "
                             "and optionally 'kind' and the head's other arguments")
        data = dict(data)
        kind = KIND_ALIASES.get(str(data.pop("kind", "verbalizer")))
        if kind is None:
            raise ValueError(f"{path}: unknown verbalizer kind; choose one of: {', '.join(sorted(KIND_ALIASES))}")
        return kind, data.pop("verbalizer"), data
    if isinstance(spec, str) and ":" in spec:
        head, rest = spec.split(":", 1)
        if "=" not in head and head.strip().lower() in KIND_ALIASES:
            return KIND_ALIASES[head.strip().lower()], rest, {}
        if "=" not in head:
            raise ValueError(f"verbalizer {spec!r}: unknown kind '{head}'; choose one of: "
                             f"{', '.join(sorted(KIND_ALIASES))} (e.g. soft:negative=terrible,positive=great)")
    return None, spec, {}


_VOCAB_WORDS: dict = {}


def vocab_words(tokenizer, space: bool) -> list[tuple[int, str]]:
    """(token id, word) for every vocabulary token that is a whole alphabetic word on its own:
    `(' ' if space else '') + word` tokenizes to exactly that one token. The candidates of label-word
    search and of embedding-neighbour expansion (cached per tokenizer)."""
    key = (id(tokenizer), len(tokenizer), space)
    if key not in _VOCAB_WORDS:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids = [i for i in range(len(tokenizer)) if i not in special]
        texts = [t.strip() for t in tokenizer.batch_decode([[i] for i in ids])]
        keep = [(i, t) for i, t in zip(ids, texts) if t.isalpha()]
        enc = tokenizer([(" " if space else "") + t for _, t in keep], add_special_tokens=False)["input_ids"]
        _VOCAB_WORDS[key] = [(i, t) for (i, t), e in zip(keep, enc) if list(e) == [i]]
    return _VOCAB_WORDS[key]
