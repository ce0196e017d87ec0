"""Shared by the prompting tests: a toy sentiment task with pattern-verbalizer pairs in the tiny
word-level vocabulary, an MLM tokenizer/model (BertForMaskedLM, which MiniLM is not), and the
hand computation every verbalizer score is checked against."""
from __future__ import annotations

import torch

from conftest import TOY_CLS, make_model, make_tokenizer
from lmadapt.tasks import Task

TOY_PVP = Task(name="toyp", kind="classification", label_names=("negative", "positive"), metric="accuracy",
               splits=TOY_CLS.splits, uses_data_root=False, description="toy sentiment with PVPs",
               pvps=(("{text} it was {mask} .", "negative=bad,positive=good"),
                     ("{text} ? {mask}", "negative=no,positive=yes"),
                     ("this {text} is {mask}", "negative=awful|very boring,positive=great|really fun")))
TEXTS = ["the movie was fun", "bad plot", "it was a very boring film and the actor was awful"]
MULTI = "negative=bad|very bad,positive=good|really very good"   # 1- and 2- and 3-token words


def mlm_tokenizer():
    tok = make_tokenizer("encoder")
    tok.add_special_tokens({"mask_token": "[MASK]"})
    return tok


def mlm_model(vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = BertForMaskedLM(cfg)
    model.config.lmadapt_name = "tiny-bert-mlm"
    return model.eval()


def causal(arch: str = "llama"):
    tok = make_tokenizer()
    return make_model(arch, len(tok)), tok


@torch.no_grad()
def word_logprob(logits_of, prefix: list[int], word: list[int]) -> float:
    """sum_j log p(word_j | prefix, word_<j) from ONE plain forward of prefix + word (no cache, no
    padding): logits_of(ids (1, T)) -> (1, T, V)."""
    logp = torch.log_softmax(logits_of(torch.tensor([prefix + word])).float()[0], -1)
    return sum(float(logp[len(prefix) - 1 + j, w]) for j, w in enumerate(word))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def train_steps(adapted, batch, opt, steps: int = 8) -> list[float]:
    """`steps` optimizer steps on one batch; -> the loss before each step."""
    losses = []
    for _ in range(steps):
        loss = adapted(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses
