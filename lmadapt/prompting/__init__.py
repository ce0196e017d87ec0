"""Prompt-based classification: the task phrased as the LM's own fill-in-the-blank.

- template.py   `{text} It was {mask}.`: fields, fixed text, soft tokens, the mask slot
- verbalizer.py label -> label words, and how words and tokens are scored
- head.py       the verbalizer head (a classification head like the linear one) and calibration
- ensemble.py   ensembles over patterns, verbalizers and pattern-verbalizer pairs
- pet.py        PET and iPET (Schick & Schuetze 2021)
- icl.py        in-context learning: demonstrations (random, balanced, kNN), order, the window
- embed.py      sentence embeddings for kNN, cached on disk
- cot.py        chain-of-thought and self-consistency (GSM8K)
- instruct.py   instruction tuning: FLAN-style mixture, held-out clusters, zero-shot evaluation
- knowledgeable.py, learned.py  learned verbalizers: knowledgeable (KPT), soft (WARP), prototypical
                (ProtoVerb), each a head kind; synonyms.py the label synonyms KPT expands with
- search.py     label-word and template search on the labeled few (LM-BFF / PETAL style)
- ppt.py        pre-trained prompts (PPT) on a self-supervised sentence-pair task
- ipt.py        intrinsic prompt tuning (IPT): the multi-task prompt auto-encoder

Importing this package registers the 'verbalizer', 'knowledgeable', 'soft' and 'prototypical'
heads (lmadapt.heads.HEADS). ensemble and pet
use the public API (lmadapt.api) and are imported on their own.
"""
from .head import CONTENT_FREE, VerbalizerHead, calibrate, lm_head_of  # noqa: F401
from .template import SOFT_TOKEN, Template  # noqa: F401
from .verbalizer import Verbalizer  # noqa: F401
from . import knowledgeable, learned  # noqa: F401,E402  (register their heads)

__all__ = ["CONTENT_FREE", "SOFT_TOKEN", "Template", "Verbalizer", "VerbalizerHead", "calibrate", "lm_head_of"]
