"""Tiny random LLaMA / GPT-2 / BERT models built from configs, a word-level tokenizer over a small
vocabulary, and toy tasks: the whole suite runs on them in seconds; the real packaged models are
used only by tests marked `integration`."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--precision auto` is bf16 on a CPU with native bf16: the suite's hand-computed values and
# cross-process comparisons are float32, whatever CPU runs them (bf16 is tested explicitly).
os.environ["LMADAPT_CPU_BF16"] = "0"

import pytest
import torch

# Tiny models: thread start-up costs more than the work, and on a loaded 2-core machine two
# threads make a 4 ms forward take 0.4 s. The real-model tests raise this again for their module.
torch.set_num_threads(1)

from lmadapt.data import Example
from lmadapt.tasks import Task

REPO = Path(__file__).resolve().parent.parent


def load_bench(name: str):
    """bench/NAME.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def subprocess_env(**extra) -> dict:
    """Environment for CLI / `accelerate launch` subprocesses: PYTHONPATH puts THIS checkout's
    lmadapt first, where the installed `lmadapt` script alone would import whichever checkout was
    pip-installed (-e) into the environment."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""), **extra}

WORDS = ("the a movie film was is it this that and but very not really good great fine bad awful "
         "boring fun plot actor story with of to in for on at by an as be are so too much more "
         "yes no maybe cat dog table name food price area near pub cafe cheap high low rated "
         "question answer context summary text premise hypothesis true false entail").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]


def make_tokenizer(kind: str = "causal"):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)) + list(".,!?:;'\"-|[]()0123456789"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if kind == "encoder":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                  eos_token="<eos>", cls_token="[CLS]", sep_token="[SEP]")
    tok.padding_side = "left" if kind == "causal" else "right"
    return tok


def make_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=None, eos_token_id=4, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=4,
                         pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, pad_token_id=0)
        model = BertModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(arch)
    model.config.lmadapt_name = f"tiny-{arch}"
    return model.eval()


ARCHS = ("llama", "gpt2", "bert")
CAUSAL = ("llama", "gpt2")


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tiny(arch):
    """(model, tokenizer) for the parametrized architecture."""
    tok = make_tokenizer("encoder" if arch == "bert" else "causal")
    return make_model(arch, len(tok)), tok


def _toy_examples(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pos, neg, filler = ["good", "great", "fun"], ["bad", "awful", "boring"], ["the", "movie", "was", "very", "plot", "it"]
    out = []
    for i in range(n):
        label = int(torch.randint(2, (1,), generator=g))
        words = [filler[int(j)] for j in torch.randint(len(filler), (4,), generator=g)]
        words.insert(int(torch.randint(5, (1,), generator=g)), (pos if label else neg)[i % 3])
        out.append(Example(text=" ".join(words), label=label))
    return out


TOY_CLS = Task(name="toy", kind="classification", label_names=("negative", "positive"), metric="accuracy",
               splits={"train": lambda root: _toy_examples(64, 0), "dev": lambda root: _toy_examples(32, 1)},
               uses_data_root=False, description="toy sentiment")


def _toy_gen(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    foods = ["cheap", "high", "low"]
    out = []
    for i in range(n):
        f = foods[int(torch.randint(3, (1,), generator=g))]
        out.append(Example(text=f"name cafe price {f}", target=f"the cafe is {f}", references=[f"the cafe is {f}"]))
    return out


TOY_GEN = Task(name="toygen", kind="generation", metric="bleu", prompt="{text} text :",
               splits={"train": lambda root: _toy_gen(48, 0), "dev": lambda root: _toy_gen(8, 1)},
               uses_data_root=False, description="toy table-to-text")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA + tokenizer saved as a local Hugging Face folder (for the CLI)."""
    d = tmp_path_factory.mktemp("tinyllama")
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def toy_cls():
    return TOY_CLS


@pytest.fixture
def toy_gen():
    return TOY_GEN


def plain_hidden(model, batch):
    """Last hidden states of a plain HF model, positions counted from each row's first real token
    (lmadapt's convention, which makes left padding harmless)."""
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model.base_model(**batch, position_ids=pos).last_hidden_state


def load_merged(adapted, plain):
    """Copy a merged Adapted model's base weights into `plain`, an untouched copy of its base model
    with no method modules: the merged model on its own, as a user would ship it. Strict: every
    base tensor must be there under its original name."""
    sd = {k.replace(".base.", "."): v for k, v in adapted.model.state_dict().items()
          if "lora_" not in k and "bias_delta" not in k}
    plain.load_state_dict(sd, strict=True)
    return plain
