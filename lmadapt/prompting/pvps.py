"""Default pattern-verbalizer pairs (PVPs) of the built-in classification tasks (Task.pvps).

Written for causal LMs (the mask last), except PET's NLI pattern `{text} ? {mask}, {text_pair}`,
which a causal LM reads through the rewrite in template.py (`{text}, {text_pair} ? {mask}`) and an
MLM as written. The first pair of each list is the verbalizer head's default; all of them form
PET's ensemble. Every word is one SmolLM2 token with its leading space (checked in the smoke test).
"""
SENTIMENT_PVPS = (
    ("{text} It was {mask}.", "negative=terrible,positive=great"),          # LM-BFF's SST-2 pattern
    ("{text} All in all, it was {mask}.", "negative=bad,positive=good"),
    ("Review: {text}\nSentiment: {mask}", "negative=negative,positive=positive"),
)
RTE_PVPS = (
    ("{text}\nQuestion: {text_pair} True or False?\nAnswer: {mask}",     # GPT-3's RTE prompt
     "entailment=True,not_entailment=False"),
    ('{text}\nDoes this mean that "{text_pair}" is true? Yes or no? {mask}', "entailment=Yes,not_entailment=No"),
    ("{text} ? {mask}, {text_pair}", "entailment=Yes,not_entailment=No"),   # PET / LM-BFF
)
NLI_PVPS = (
    ("{text}\nQuestion: {text_pair} True, False or Neither?\nAnswer: {mask}",
     "entailment=True,neutral=Neither,contradiction=False"),
    ("{text} ? {mask}, {text_pair}", "entailment=Yes,neutral=Maybe,contradiction=No"),   # PET's MNLI
    ('{text}\nDoes this mean that "{text_pair}" is true? Yes, no, or maybe? {mask}',
     "entailment=Yes,neutral=Maybe,contradiction=No"),
)
