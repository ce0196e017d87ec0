"""Chain-of-thought prompting (Wei et al. 2022) and self-consistency (Wang et al. 2023), on GSM8K.

Three prompts on the same test problems, each with the same k exemplars drawn from train (seeded):

    direct:  Question: <q>\\nAnswer: The answer is 18.                   (answer only)
    cot:     Question: <q>\\nAnswer: <worked solution>\\nThe answer is 18.  (rationale, <<...>> removed)
    query:   Question: <q>\\nAnswer:

`direct` and `cot` decode greedily; `self-consistency` samples n chains from the cot prompt
(temperature, top_p) and takes the majority of their final numbers (ties: the answer of the
earliest chain). A continuation is cut at the separator (or where it starts a new "Question:");
the answer is its final number (metrics.final_number: "The answer is N", "#### N", else the last
number; `$`, thousands commas and units are handled). A chain without a number counts as wrong
and does not vote. Exemplars + query must fit the window (prompting.icl.fit_prompts: fewer
exemplars with a warning, or an error).

Small models score low here: the literature finds that chain-of-thought helps only at large scale
(Wei et al. 2022, ~100B parameters); the point is the mechanism and an honest figure.
"""
from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass

import torch

from ..metrics import compute, final_number
from ..precision import autocast
from .icl import OVERFLOWS, cut, decode_prompts, fit_prompts, lengths, usage, window_budget


@dataclass(frozen=True)
class CotConfig:
    k: int = 8
    self_consistency: int = 0        # n sampled chains per problem (0: off)
    temperature: float = 0.7         # self-consistency sampling (Wang et al. use 0.5-0.7)
    top_p: float = 1.0
    max_new_tokens: int = 256        # a chain
    direct_max_new_tokens: int = 16  # an answer-only continuation
    min_new_tokens: int = 1          # no stop before the first token: a chat model ends its turn at once otherwise
    direct: bool = True              # the answer-only baseline
    seed: int = 0                    # which exemplars, and the sampling
    separator: str = "\n\n"
    overflow: str = "reduce"
    max_length: int | None = None    # window in tokens; None: the model's
    batch_size: int = 8

    def __post_init__(self):
        def check(ok, what):
            if not ok:
                raise ValueError(f"cot: {what}")
        check(isinstance(self.k, int) and self.k >= 0, f"k must be an int >= 0, got {self.k!r}")
        check(self.self_consistency >= 0, f"self_consistency must be >= 0 chains, got {self.self_consistency}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1 and self.direct_max_new_tokens >= 1, "max_new_tokens must be >= 1")
        check(self.overflow in OVERFLOWS, f"unknown overflow '{self.overflow}'; choose one of: {', '.join(OVERFLOWS)}")


def answer_of(ex) -> str:
    """The example's final number (GSM8K: meta['answer']; else its target's)."""
    got = ex.meta.get("answer") if ex.meta else None
    got = got if got is not None else final_number(ex.target or "")
    if got is None:
        raise ValueError(f"cot: the example {ex.text[:50]!r} has no numeric answer in its target")
    return got


def exemplar(task, ex, rationale: bool) -> str:
    """An exemplar: the task's prompt, then the worked solution (it ends 'The answer is N.') or
    only 'The answer is N.'."""
    body = ex.target.strip() if rationale else f"The answer is {answer_of(ex)}."
    return f"{task.format(ex)} {body}"


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent answer (None never votes); ties: the answer of the earliest chain."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def stops_of(task, separator: str) -> tuple[str, ...]:
    """Where a continuation ends: the separator, or a new line that starts the next problem."""
    head = task.prompt.split("{", 1)[0].strip()   # "Question:" of "Question: {text}\nAnswer:"
    return (separator,) + (("\n" + head,) if head else ())


def run_cot(adapted, task, cfg: CotConfig, *, queries=None, split: str = "test", limit: int | None = None,
            data_root=None, precision: str = "auto", progress: bool = False) -> dict:
    """direct vs chain-of-thought vs self-consistency on the same problems -> {'metrics': {...},
    'records': one dict per problem, ...}. `adapted`: a causal LM without a head."""
    from ..api import _task
    t = _task(task)
    if not adapted.causal or adapted.head is not None:
        raise ValueError("cot: needs a causal LM attached without a head (it decodes), e.g. "
                         "attach(model, 'none', tokenizer=tok)")
    if queries is None:
        queries = t.load(split, data_root)
    n_available = len(queries)
    queries = list(queries)[:limit] if limit is not None else list(queries)
    if not queries:
        raise ValueError("cot: no problems to evaluate")
    train = t.load("train", data_root) if cfg.k else []
    if cfg.k > len(train):
        raise ValueError(f"cot: k={cfg.k} exemplars but the train split has {len(train)}")
    shots = random.Random(cfg.seed).sample(train, cfg.k) if cfg.k else []
    tok = adapted.tokenizer
    stops = stops_of(t, cfg.separator)
    golds = [answer_of(q) for q in queries]
    query_ids = [tok(t.format(q), add_special_tokens=False)["input_ids"] for q in queries]

    def prompts_for(rationale: bool, reserve: int):
        pieces = [tok(exemplar(t, ex, rationale) + cfg.separator, add_special_tokens=False)["input_ids"]
                  for ex in shots]
        budget, where = window_budget(adapted, cfg.max_length, reserve, "cot")
        return fit_prompts([pieces] * len(queries), [q[-budget:] for q in query_ids], budget, where, cfg.k,
                           cfg.overflow, what="cot")

    def decode(prompts, max_new, desc, **sampling):
        return decode_prompts(adapted, prompts, max_new_tokens=max_new, stops=stops, batch_size=cfg.batch_size,
                              progress=progress, desc=desc, min_new_tokens=cfg.min_new_tokens, **sampling)

    adapted.eval()
    metrics, outputs, info = {}, {}, {}
    with autocast(precision, adapted.device):
        if cfg.direct:
            prompts, kept = prompts_for(False, cfg.direct_max_new_tokens)
            outputs["direct"] = decode(prompts, cfg.direct_max_new_tokens, "direct")
            info["direct"] = {"exemplars": usage(kept, cfg.k), "prompt_tokens": lengths(prompts)}
        prompts, kept = prompts_for(True, cfg.max_new_tokens)
        outputs["cot"] = decode(prompts, cfg.max_new_tokens, "cot")
        info["cot"] = {"exemplars": usage(kept, cfg.k), "prompt_tokens": lengths(prompts)}
        if cfg.self_consistency:
            n = cfg.self_consistency
            g = torch.Generator(device=adapted.device).manual_seed(cfg.seed)
            flat = decode([p for p in prompts for _ in range(n)], cfg.max_new_tokens, f"self-consistency x{n}",
                          do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, generator=g)
            chains = [flat[i * n:(i + 1) * n] for i in range(len(queries))]
            votes = [[final_number(c) for c in row] for row in chains]
            outputs["self_consistency"] = [majority_vote(v) or "" for v in votes]
            info["self_consistency"] = {"chains": n, "temperature": cfg.temperature, "top_p": cfg.top_p}
    refs = [[g] for g in golds]
    for name, preds in outputs.items():
        answers = [final_number(p) for p in preds]
        metrics[name] = compute("numeric_accuracy", preds, refs) | {
            "no_answer": 100.0 * sum(a is None for a in answers) / len(answers), "n": len(queries)}
        metrics[name] |= info[name]
    records = []
    for i, q in enumerate(queries):
        rec = {"question": q.text, "gold": golds[i]}
        for name, preds in outputs.items():
            rec[name] = preds[i] if name != "self_consistency" else {"vote": preds[i] or None, "chains": chains[i]}
            rec[f"{name}_answer"] = final_number(preds[i]) if name != "self_consistency" else (preds[i] or None)
        records.append(rec)
    return {"task": t.name, "kind": "cot", "split": split, "k": cfg.k, "n": len(queries),
            "n_available": n_available, "metrics": metrics,
            "exemplars": [exemplar(t, ex, True) for ex in shots],
            "config": dataclasses.asdict(cfg), "records": records}


__all__ = ["CotConfig", "answer_of", "cut", "exemplar", "final_number", "majority_vote", "run_cot"]
