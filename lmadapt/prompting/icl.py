"""In-context learning (Brown et al. 2020): k demonstrations from the train split, rendered with
the task's own prompt before the query; nothing is trained.

    <demo 1><sep><demo 2><sep> ... <demo k><sep><query>                       sep = "\\n\\n"

Classification: a demonstration is the template's causal reading followed by its label's first
word (`{text} It was {mask}.` -> "a gorgeous film It was great"); the query is the same reading up
to the mask, encoded exactly as the verbalizer head encodes it, and the head scores the label
words after the whole prompt. So k = 0 IS zero-shot `lmadapt eval --head verbalizer`. Generation:
a demonstration is `task.format(demo) + " " + target`, the query `task.format(query)`; decoded
greedily, the output is cut at the separator.

Selection (`select`):
- random:   k pool examples, ONE set per seed shared by every query (Zhao et al. 2021): a seed is
            one prompt, so the spread over seeds is the spread over prompts;
- balanced: the same with k / C per label (the remainder to labels drawn at random);
- knn:      per query, the k pool examples nearest by sentence embeddings (MiniLM, mean pooling,
            cosine: Liu et al. 2022, KATE).
Order (`order`): random (seeded) | similar-last (ascending similarity to the query, so the nearest
demonstration sits next to it: KATE's better order). The pool is, per seed, a seeded random subset
of the train split (`pool` examples; None: all of it), so under knn the seed changes the candidates.

The window: demonstrations + query + what is read after them (the longest label word's
continuation, or max_new_tokens) must fit the model's window (config.max_position_embeddings) or
`max_length`. overflow='reduce' drops demonstrations from the front (the farthest from the query:
the least similar under similar-last) and warns once per seed how many queries lost how many;
overflow='error' refuses with the lengths and the fix.

Embeddings: prompting/embed.py (computed once per set of texts, cached on disk).
"""
from __future__ import annotations

import dataclasses
import random
import statistics
import warnings
from dataclasses import dataclass

import torch

from ..data import subsample
from ..evaluation import _run_batches
from ..metrics import compute
from ..precision import autocast
from .embed import SentenceEmbedder, default_cache_dir, embeddings, example_text
from .head import VerbalizerHead

SELECTS = ("random", "balanced", "knn")
ORDERS = ("random", "similar-last")
OVERFLOWS = ("reduce", "error")


@dataclass(frozen=True)
class IclConfig:
    k: int = 8
    select: str = "random"
    order: str = "random"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    pool: int | None = 1000           # candidates per seed: a seeded subset of train (None: all)
    separator: str = "\n\n"
    overflow: str = "reduce"          # reduce k with a warning | error
    max_length: int | None = None     # prompt window in tokens; None: the model's
    max_new_tokens: int = 48          # generation tasks
    batch_size: int = 8

    def __post_init__(self):
        def check(ok, what):
            if not ok:
                raise ValueError(f"icl: {what}")
        check(isinstance(self.k, int) and self.k >= 0, f"k must be an int >= 0, got {self.k!r}")
        check(self.select in SELECTS, f"unknown select '{self.select}'; choose one of: {', '.join(SELECTS)}")
        check(self.order in ORDERS, f"unknown order '{self.order}'; choose one of: {', '.join(ORDERS)}")
        check(self.overflow in OVERFLOWS, f"unknown overflow '{self.overflow}'; choose one of: {', '.join(OVERFLOWS)}")
        check(len(self.seeds) >= 1, "give at least one seed")
        check(self.pool is None or self.pool >= 1, f"pool must be >= 1 (or None for all), got {self.pool}")
        check(self.max_length is None or self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @property
    def needs_similarity(self) -> bool:
        return self.k > 0 and (self.select == "knn" or self.order == "similar-last")


# --- selection and order ---------------------------------------------------------------------

def balanced_counts(k: int, num_labels: int, rng: random.Random) -> list[int]:
    """k / C demonstrations per label; the remainder goes to labels drawn at random."""
    counts = [k // num_labels] * num_labels
    for c in rng.sample(range(num_labels), k % num_labels):
        counts[c] += 1
    return counts


def _draw(pool, k: int, select: str, rng: random.Random, num_labels: int) -> list[int]:
    if select == "random":
        return rng.sample(range(len(pool)), k)
    by_label = [[i for i, ex in enumerate(pool) if ex.label == c] for c in range(num_labels)]
    out = []
    for c, n in enumerate(balanced_counts(k, num_labels, rng)):
        if len(by_label[c]) < n:
            raise ValueError(f"icl: balanced selection needs {n} demonstrations of label {c} but the pool "
                             f"has {len(by_label[c])}; raise --pool or lower --k")
        out += rng.sample(by_label[c], n)
    return out


def _ordered(idx: list[int], order: str, rng: random.Random, sims_row) -> list[int]:
    if order == "random":
        idx = list(idx)
        rng.shuffle(idx)
        return idx
    return sorted(idx, key=lambda i: (float(sims_row[i]), -i))   # least similar first, nearest last


def choose(pool, n_queries: int, cfg: IclConfig, seed: int, sims: torch.Tensor | None = None,
           num_labels: int = 0) -> list[list[int]]:
    """Per query, the indices into `pool` of its demonstrations, in prompt order. sims (N, P):
    query-pool cosine similarities, needed by knn and similar-last."""
    if cfg.k == 0:
        return [[] for _ in range(n_queries)]
    if cfg.k > len(pool):
        raise ValueError(f"icl: k={cfg.k} demonstrations but the pool has {len(pool)} examples; lower --k "
                         "or raise --pool")
    if cfg.needs_similarity and (sims is None or tuple(sims.shape) != (n_queries, len(pool))):
        raise ValueError(f"icl: select={cfg.select}, order={cfg.order} needs query-pool similarities "
                         f"({n_queries}, {len(pool)})")
    if cfg.select == "balanced" and num_labels < 2:
        raise ValueError("icl: balanced selection needs a classification task (labels to balance); use "
                         "random or knn")
    rng = random.Random(seed)
    if cfg.select == "knn":
        top = sims.topk(cfg.k, dim=1).indices.tolist()                    # (N, k) nearest first
        return [_ordered(row, cfg.order, rng, sims[q]) for q, row in enumerate(top)]
    shared = _draw(pool, cfg.k, cfg.select, rng, num_labels)             # one prompt per seed
    if cfg.order == "random":
        shared = _ordered(shared, "random", rng, None)
        return [list(shared) for _ in range(n_queries)]
    return [_ordered(shared, "similar-last", rng, sims[q]) for q in range(n_queries)]


# --- rendering and the window ----------------------------------------------------------------

def demonstration(task, ex, head: VerbalizerHead | None) -> str:
    """One demonstration as text: the template's causal reading + the label's first word
    (classification), or the task's prompt + " " + target (generation)."""
    if head is not None:
        if ex.label is None:
            raise ValueError("icl: a classification demonstration needs a label")
        word = head.verbalizer.words[ex.label][1][0]
        space = " " if head.template.space_before_mask(True) else ""
        return head.template.render(ex, causal=True) + space + word
    if ex.target is None:
        raise ValueError(f"icl: task '{task.name}': a demonstration needs a target")
    return task.format(ex) + " " + ex.target.strip()


def kept_demonstrations(demo_lens: list[int], query_len: int, budget: int) -> int:
    """How many of the LAST demonstrations fit with the query into `budget` tokens."""
    used, kept = query_len, 0
    for n in reversed(demo_lens):
        if used + n > budget:
            break
        used += n
        kept += 1
    return kept


def model_window(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return None


def window_budget(adapted, max_length: int | None, reserve: int, what: str = "icl") -> tuple[int, str]:
    """-> (tokens the prompt may take, how the window was found)."""
    window = model_window(adapted.model)
    if max_length is not None:
        limit, source = (max_length, "max_length") if window is None or max_length <= window \
            else (window, "max_position_embeddings")
    elif window is None:
        raise ValueError(f"{what}: the model's config states no window (max_position_embeddings); pass max_length")
    else:
        limit, source = window, "max_position_embeddings"
    if limit - reserve < 1:
        raise ValueError(f"{what}: a window of {limit} tokens leaves no room for the prompt ({reserve} are "
                         "read or generated after it); raise max_length or lower max_new_tokens")
    return limit - reserve, f"{source} {limit} minus {reserve} read after the prompt"


def fit_prompts(demo_ids: list[list[list[int]]], query_ids: list[list[int]], budget: int, where: str,
                k: int, overflow: str, what: str = "icl") -> tuple[list[list[int]], list[int]]:
    """Prompts = each query's demonstrations (token lists, in order) + its query, within `budget`:
    -> (prompts, demonstrations kept per query). overflow 'reduce' drops demonstrations from the
    front and warns once; 'error' raises ValueError naming the first prompt that is too long."""
    prompts, kept = [], []
    for i, (demos, q) in enumerate(zip(demo_ids, query_ids)):
        n = kept_demonstrations([len(d) for d in demos], len(q), budget)
        if n < len(demos) and overflow == "error":
            total = sum(map(len, demos)) + len(q)
            raise ValueError(f"{what}: query {i}'s prompt with {len(demos)} demonstrations is {total} tokens, "
                             f"over the window of {budget} ({where}); lower --k, or pass --overflow reduce "
                             "to drop demonstrations until it fits")
        prompts.append([t for d in demos[len(demos) - n:] for t in d] + list(q))
        kept.append(n)
    short = [n for n, demos in zip(kept, demo_ids) if n < len(demos)]
    if short:
        from .. import LmadaptWarning
        warnings.warn(f"{what}: k reduced from {k} to fit the window of {budget} tokens ({where}) for "
                      f"{len(short)} of {len(kept)} queries (down to {min(short)} demonstrations, mean "
                      f"{statistics.mean(kept):.2f}); lower --k or shorten the inputs to keep every "
                      "demonstration", LmadaptWarning, stacklevel=3)
    return prompts, kept


def stop_token_ids(tokenizer, separator: str) -> list[int]:
    """The eos token plus every vocabulary token whose text holds the separator (decoding stops at
    the end of the answer instead of writing the next demonstration)."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), separator)
    if key not in _STOPS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _STOPS[key] = [i for i, t in enumerate(texts) if separator and separator in t]
    eos = getattr(tokenizer, "eos_token_id", None)
    return ([eos] if eos is not None else []) + _STOPS[key]


_STOPS: dict = {}


# --- scoring -------------------------------------------------------------------------------------

MIN_SHARED = 16   # a common prefix of at least this many tokens is encoded once, not per row


def shared_split(adapted, prompts: list[list[int]], share: bool = True):
    """-> (SharedPrefix or None, each prompt's own tokens). Prompts that all start with the same
    MIN_SHARED+ tokens (one demonstration set per seed, CoT's exemplars) share one encoding of them:
    the cost of a query is then its own tokens, not the whole prompt's. Rows with template soft
    slots are kept whole."""
    from ..kv_loop import SharedPrefix, common_prefix
    n = common_prefix(prompts) if share and len(prompts) > 1 else 0
    if n < MIN_SHARED or min(prompts[0][:n]) < 0:
        return None, prompts
    return SharedPrefix(adapted, prompts[0][:n]), [p[n:] for p in prompts]


@torch.no_grad()
def score_prompts(adapted, prompts: list[list[int]], batch_size: int = 8, progress: bool = False,
                  desc: str = "icl", share: bool = True) -> torch.Tensor:
    """(N, C) verbalizer-head scores of prompts given as token ids (batched by length); a prefix
    all prompts share is encoded once (shared_split)."""
    enc = adapted.input_encoder()
    shared, own = shared_split(adapted, prompts, share)

    def run(fs):
        b = enc.collate(fs, adapted.device)
        if shared is not None:
            b |= shared.inputs(b["attention_mask"], adapted.model.config)
        return list(adapted(**b).logits.float().cpu())
    rows = _run_batches([{"input_ids": p} for p in own], batch_size, run, desc, progress)
    return torch.stack(rows) if rows else torch.zeros(0, adapted.num_labels)


@torch.no_grad()
def cut(text: str, stops) -> str:
    """`text` up to the first of the stop strings, stripped."""
    for s in stops:
        if s:
            text = text.split(s, 1)[0]
    return text.strip()


def decode_prompts(adapted, prompts: list[list[int]], *, max_new_tokens: int, stops=("\n\n",), batch_size: int = 8,
                   progress: bool = False, desc: str = "decode", share: bool = True, **sampling) -> list[str]:
    """Greedy (or `sampling`: do_sample, temperature, top_p, generator) continuations of
    token-id prompts, cut at the first stop string. Decoding ends early at tokens that hold the
    first stop string (stop_token_ids). A prefix all prompts share is encoded once (shared_split)."""
    tok = adapted.tokenizer
    enc = adapted.input_encoder()
    eos = stop_token_ids(tok, stops[0]) if stops else None
    shared, own = shared_split(adapted, prompts, share)

    def run(fs):
        batch = enc.collate(fs, adapted.device)
        new = adapted.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                               eos_token_id=eos, shared_prefix=shared, **sampling)
        return [cut(s, stops) for s in tok.batch_decode(new, skip_special_tokens=True)]
    return _run_batches([{"input_ids": p} for p in own], batch_size, run, desc, progress)


def spread(values: list[float]) -> dict:
    """mean, sample std (n - 1; 0 for one value), min, max over seeds."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n_seeds": len(values)}


def usage(kept: list[int], k: int) -> dict:
    """How many demonstrations the prompts kept (k unless the window reduced them)."""
    return {"k": k, "mean": statistics.mean(kept), "min": min(kept), "reduced": sum(n < k for n in kept)}


def lengths(prompts: list[list[int]]) -> dict:
    return {"mean": statistics.mean(map(len, prompts)), "max": max(map(len, prompts))}


def _query_ids(adapted, task, q, head, budget: int) -> list[int]:
    if head is not None:   # exactly what the verbalizer head reads zero-shot
        return head.template.encode(adapted.tokenizer, q, True, budget)["input_ids"]
    ids = adapted.tokenizer(task.format(q), add_special_tokens=False)["input_ids"]
    return ids[-budget:]   # keep the tail: the words just before the answer


def run_seed(adapted, task, train, queries, cfg: IclConfig, seed: int, *, embedder=None, cache_dir=None,
             precision: str = "auto", progress: bool = False) -> dict:
    """One seed: pool, selection, order, prompts, scores -> {'seed', 'metrics', 'demonstrations_used',
    'prompt_tokens', 'first_prompt', 'predictions' (generation), 'scores' (classification, (N, C))}."""
    head = adapted.head if isinstance(adapted.head, VerbalizerHead) else None
    classify = head is not None
    tok = adapted.tokenizer
    pool = subsample(train, cfg.pool, seed=seed) if cfg.k else []
    sims = None
    if cfg.needs_similarity:
        if embedder is None:
            embedder = SentenceEmbedder()
        P = embeddings(embedder, [example_text(ex) for ex in pool], cache_dir)            # (P, D)
        Q = embeddings(embedder, [example_text(ex) for ex in queries], cache_dir)         # (N, D)
        sims = Q @ P.T                                                                     # (N, P) cosine
    chosen = choose(pool, len(queries), cfg, seed, sims, len(getattr(task, "label_names", ())))
    reserve = int(head.word_len.max()) - 1 if classify else cfg.max_new_tokens
    budget, where = window_budget(adapted, cfg.max_length, reserve)
    piece = {}   # pool index -> ids of "demonstration + separator", tokenized once
    for i in {i for row in chosen for i in row}:
        piece[i] = tok(demonstration(task, pool[i], head) + cfg.separator, add_special_tokens=False)["input_ids"]
    query_ids = [_query_ids(adapted, task, q, head, budget) for q in queries]
    prompts, kept = fit_prompts([[piece[i] for i in row] for row in chosen], query_ids, budget, where,
                                cfg.k, cfg.overflow)
    adapted.eval()
    with autocast(precision, adapted.device):
        if classify:
            scores = score_prompts(adapted, prompts, cfg.batch_size, progress, f"icl seed {seed}")
            preds = scores.argmax(-1).tolist()
            metrics = compute(task.metric, preds, [q.label for q in queries])
        else:
            preds = decode_prompts(adapted, prompts, max_new_tokens=cfg.max_new_tokens, stops=(cfg.separator,),
                                   batch_size=cfg.batch_size, progress=progress, desc=f"icl seed {seed}")
            metrics = compute(task.metric, preds, [q.references or [q.target] for q in queries])
    return {"seed": seed, "metrics": metrics, "pool": len(pool),
            "demonstrations_used": usage(kept, cfg.k), "prompt_tokens": lengths(prompts),
            # the shared prompt of random/balanced (or query 0's under knn), for reading
            "first_prompt": tok.decode(prompts[0]) if prompts else "",
            "predictions": preds if not classify else None,
            "scores": scores if classify else None}


def run_icl(adapted, task, cfg: IclConfig, *, queries=None, split: str = "dev", limit: int | None = None,
            data_root=None, embedder=None, cache_dir="default", precision: str = "auto",
            progress: bool = False) -> dict:
    """ICL on `task` over cfg.seeds -> {'per_seed': [...], 'summary': {metric: mean/std/min/max}, ...}.

    `adapted`: a causal LM with a verbalizer head (classification; method 'none' for plain ICL) or
    with no head (generation). `queries` (default: the split's first `limit` examples)."""
    from ..api import _task
    from ..batching import is_classification
    t = _task(task)
    if not adapted.causal:
        raise ValueError("icl: in-context learning needs a causal LM (demonstrations go before the query); "
                         f"{adapted.model.config.model_type} is an encoder")
    if is_classification(t) and not isinstance(adapted.head, VerbalizerHead):
        raise ValueError(f"icl: task '{t.name}' is classification: attach the model with head='verbalizer' "
                         "(its template renders the demonstrations and its words score the answer)")
    if not is_classification(t) and adapted.head is not None:
        raise ValueError(f"icl: task '{t.name}' is {t.kind}: attach the model without a head (it decodes)")
    if queries is None:
        queries = t.load(split, data_root)
    n_available = len(queries)
    queries = list(queries)[:limit] if limit is not None else list(queries)
    if not queries:
        raise ValueError("icl: no queries to evaluate")
    train = t.load("train", data_root) if cfg.k else []
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    per_seed = []
    for seed in cfg.seeds:
        r = run_seed(adapted, t, train, queries, cfg, seed, embedder=embedder, cache_dir=cache,
                     precision=precision, progress=progress)
        r.pop("scores")
        per_seed.append(r)
    keys = list(per_seed[0]["metrics"])
    return {"task": t.name, "kind": "icl", "k": cfg.k, "select": cfg.select, "order": cfg.order,
            "seeds": list(cfg.seeds), "n": len(queries), "n_available": n_available,
            "summary": {key: spread([r["metrics"][key] for r in per_seed]) for key in keys},
            "per_seed": per_seed,
            "config": dataclasses.asdict(cfg)}
