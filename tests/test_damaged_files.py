"""Damaged files: a truncated or corrupt artifact, checkpoint, model folder or model cache gives
one line naming the file and what is wrong, exit 2 (never a traceback); a damaged model cache is
rebuilt."""
import json
import os
import shutil
import warnings

import pytest

import lmadapt
from lmadapt import LmadaptWarning, models
from lmadapt.atomic import DamagedFile, check_safetensors
from lmadapt.cli import main
from conftest import TOY_CLS, _toy_examples, make_model, make_tokenizer



@pytest.fixture
def toy_tsv(tmp_path):
    p = tmp_path / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in _toy_examples(24)))
    return p


def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmadapt: error: "), err
    return err


def _train(tiny_dir, toy_tsv, out, *extra):
    return main(["train", "--model", str(tiny_dir), "--train", str(toy_tsv), "--dev", str(toy_tsv),
                 "--text-col", "sentence", "--label-col", "label", "--method", "lora", "--max-steps", "4",
                 "--batch-size", "8", "--out", str(out), "--no-progress", *extra])


def test_check_safetensors(tmp_path):
    from safetensors.torch import save_file
    import torch
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(1000)}, str(p))
    check_safetensors(p)  # intact
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(DamagedFile, match="truncated or damaged"):
        check_safetensors(p)
    p.write_bytes(data[:5])
    with pytest.raises(DamagedFile, match="truncated"):
        check_safetensors(p)
    p.write_bytes(b"\xff" * 64)
    with pytest.raises(DamagedFile):
        check_safetensors(p)


def test_truncated_artifact_eval(tiny_dir, toy_tsv, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_dir, toy_tsv, out) == 0
    capsys.readouterr()
    weights = out / "best" / "adapter.safetensors"
    os.truncate(weights, 1000)                    # as `truncate -s 1000` does
    code = main(["eval", "--run", str(out), "--train", str(toy_tsv), "--dev", str(toy_tsv), "--text-col",
                 "sentence", "--label-col", "label", "--no-progress"])
    err = _one_line_error(capsys)
    assert code == 2 and str(weights) in err and "truncated" in err and "re-save the artifact" in err
    with pytest.raises(DamagedFile, match="adapter.safetensors"):
        lmadapt.load_adapted(out / "best")


def test_corrupt_method_json(tiny_dir, toy_tsv, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_dir, toy_tsv, out) == 0
    capsys.readouterr()
    meta = out / "best" / "method.json"
    meta.write_text(meta.read_text()[:40])
    inp = tmp_path / "in.txt"
    inp.write_text("the movie was good\n")
    code = main(["predict", "--run", str(out), "--input", str(inp), "--no-progress"])
    err = _one_line_error(capsys)
    assert code == 2 and "method.json line" in err and "damaged or truncated JSON" in err


def test_truncated_checkpoint_resume(tiny_dir, toy_tsv, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_dir, toy_tsv, out) == 0
    capsys.readouterr()
    state = out / "checkpoint" / "state.safetensors"
    os.truncate(state, state.stat().st_size // 2)
    code = _train(tiny_dir, toy_tsv, out, "--resume")
    err = _one_line_error(capsys)
    assert code == 2 and str(state) in err and "truncated" in err and "delete it to start over" in err
    (out / "checkpoint" / "state.json").write_text("{\"loop\": ")
    code = _train(tiny_dir, toy_tsv, out, "--resume")
    err = _one_line_error(capsys)
    assert code == 2 and "state.json line 1: damaged or truncated JSON" in err


def test_damaged_model_folder(tiny_dir, toy_tsv, tmp_path, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    w = broken / "model.safetensors"
    os.truncate(w, w.stat().st_size - 100)
    code = _train(broken, toy_tsv, tmp_path / "o")
    err = _one_line_error(capsys)
    assert code == 2 and str(w) in err and "the model folder is damaged" in err


def test_damaged_model_cache_is_rebuilt(tmp_path, monkeypatch, tiny_dir):
    """The de-quantized SmolLM2 cache: intact -> reused; truncated or missing a file -> rebuilt
    (with one warning saying why). The 40 s de-quantization is replaced by a copy of a tiny model."""
    import shutil
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_gguf_file", lambda name: gguf)
    monkeypatch.setenv("LMADAPT_CACHE", str(tmp_path / "cache"))
    builds = []

    def fake_build(src, out):
        builds.append(out)
        for f in tiny_dir.iterdir():
            shutil.copy(f, out / f.name)
    monkeypatch.setattr(models, "_dequantize", fake_build)
    d = models._smollm2_dir()
    assert len(builds) == 1 and (d / "model.safetensors").exists()
    assert models._smollm2_dir() == d and len(builds) == 1          # intact: reused
    os.truncate(d / "model.safetensors", 1000)
    with pytest.warns(LmadaptWarning, match="model.safetensors.*rebuilding the model cache"):
        assert models._smollm2_dir() == d
    assert len(builds) == 2
    check_safetensors(d / "model.safetensors")                       # a whole file again
    (d / "tokenizer.json").unlink()
    with pytest.warns(LmadaptWarning, match="lacks tokenizer.json"):
        models._smollm2_dir()
    assert len(builds) == 3
    (d / "config.json").write_text("{")
    with pytest.warns(LmadaptWarning, match="config.json"):
        models._smollm2_dir()
    assert len(builds) == 4 and json.loads((d / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models._smollm2_dir()                                          # intact: silent


def test_atomic_writes_get_the_mode_a_plain_write_would_have(tmp_path):
    """The temp file / folder is private (0600 / 0700); what lands under the final name has the
    umask's mode, like a file written with open() (a result.json a server or teammate can read)."""
    from lmadapt.atomic import write_dir, write_json
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        write_dir(tmp_path / "art", lambda d: (d / "w.bin").write_bytes(b"x"))
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "art").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "art" / "w.bin").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_json(tmp_path / "private.json", {"a": 1})
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_complete_write_dir_clears_the_versions_a_kill_left_aside(tmp_path):
    """A kill between write_dir's two renames leaves only `.NAME.old-PID`, which existing_dir then
    finds; once NAME is written again, such leftovers are out of date and are removed, so deleting
    NAME (to start over) does not bring an old checkpoint back."""
    from lmadapt.atomic import existing_dir, write_dir
    ck = tmp_path / "checkpoint"
    stale = tmp_path / ".checkpoint.old-12345"
    stale.mkdir()
    (stale / "state.json").write_text("{}")
    assert existing_dir(ck) == stale                                     # the kill's leftover is what resumes
    write_dir(ck, lambda d: (d / "state.json").write_text('{"step": 2}'))
    write_dir(ck, lambda d: (d / "state.json").write_text('{"step": 4}'))   # and its own previous version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    shutil.rmtree(ck)
    assert existing_dir(ck) is None
