"""Small synonym lists for the built-in tasks' labels: what the knowledgeable verbalizer (KPT)
adds to a label's words before its embedding neighbours. Keyed by label name, so every task with
the same labels shares them (sst2, imdb, amazon_*: negative/positive; rte: entailment/
not_entailment; mnli/snli: entailment/neutral/contradiction). KPT (Hu et al. 2022) draws these from
external knowledge bases (related words, WordNet); a short hand-written list stands in for them.
Words missing from a tokenizer's vocabulary (they tokenize to the unknown token) are skipped."""
SYNONYMS = {
    "negative": ("bad", "awful", "terrible", "horrible", "boring", "poor", "dull", "worst", "disappointing",
                 "mediocre", "weak", "annoying"),
    "positive": ("good", "great", "excellent", "wonderful", "fun", "amazing", "fantastic", "brilliant", "best",
                 "enjoyable", "beautiful", "perfect"),
    "entailment": ("yes", "true", "right", "correct", "indeed", "certainly"),
    "not_entailment": ("no", "false", "wrong", "incorrect", "not", "never"),
    "neutral": ("maybe", "perhaps", "possibly", "unclear", "unknown"),
    "contradiction": ("no", "false", "wrong", "incorrect", "never"),
}


def synonyms_for(label_names) -> dict[str, tuple[str, ...]]:
    return {n: SYNONYMS.get(n, ()) for n in label_names}
