"""`lmadapt user add` (offline, prints the token once) and `lmadapt serve`'s wiring (serve.server.build:
the model from a folder, the users kept in --state, --precision, --methods / --method-args)."""
import asyncio

import httpx
import pytest
import torch

import lmadapt
from lmadapt.cli import build_parser, main


@pytest.fixture(scope="module")
def lora_artifact(tiny_dir, tmp_path_factory):
    model, tok = lmadapt.load(str(tiny_dir))
    a = lmadapt.attach(model, "lora", tokenizer=tok)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.3)
    out = tmp_path_factory.mktemp("cli") / "alice-lora"
    a.save(out)
    return out


def test_user_add_list_remove(lora_artifact, tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["user", "add", "alice", str(lora_artifact), "--state", str(state)]) == 0
    out = capsys.readouterr().out
    token = out.split("token ")[1].split()[0]
    assert token.startswith("lma-") and token not in (state / "users.json").read_text()
    assert main(["user", "add", "alice", str(lora_artifact), "--state", str(state)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["user", "add", "../x", str(lora_artifact), "--state", str(state)]) == 2
    assert "invalid user name" in capsys.readouterr().err
    assert main(["user", "add", "bob", str(tmp_path), "--state", str(state)]) == 2
    assert "no method.json" in capsys.readouterr().err
    assert main(["user", "list", "--state", str(state)]) == 0
    assert capsys.readouterr().out.split() == ["alice"]
    assert main(["user", "remove", "alice", "--state", str(state)]) == 0
    assert not (state / "artifacts" / "alice").exists()


def test_serve_options_parse():
    from lmadapt.cli.serve import methods_from_args
    a = build_parser().parse_args(["serve", "--state", "s", "--methods", "lora,prefix,none",
                                   "--method-args", "lora:r=8,alpha=16", "--precision", "fp32"])
    ms = methods_from_args(a)
    assert [m.name for m in ms] == ["lora", "prefix"] and ms[0].r == 8 and ms[0].alpha == 16.0
    a = build_parser().parse_args(["serve", "--state", "s", "--methods", "lora", "--method-args", "prefix:k=3"])
    with pytest.raises(ValueError, match="--methods does not include"):
        methods_from_args(a)


def test_build_serves_the_users_in_state(tiny_dir, lora_artifact, tmp_path, capsys):
    from lmadapt.serve.server import build
    state = tmp_path / "state"
    main(["user", "add", "alice", str(lora_artifact), "--state", str(state)])
    token = capsys.readouterr().out.split("token ")[1].split()[0]
    app, bank, sched = build(str(tiny_dir), state, methods=["lora"], capacity=2, precision="fp32", max_wait=0.0)
    assert sched.precision == "fp32" and list(bank.registry) == ["alice"]
    want = bank.tokenizer.decode(bank.generate(["alice"], ["the movie"], max_new_tokens=4)[0], skip_special_tokens=True)
    sched.start()

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/completions", headers={"Authorization": f"Bearer {token}"},
                                json={"model": "alice", "prompt": "the movie", "max_tokens": 4, "temperature": 0})
    try:
        r = asyncio.run(ask())
    finally:
        sched.stop()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
    # the state now records its base model: an artifact of another base is refused offline
    from conftest import make_model, make_tokenizer
    tok = make_tokenizer()
    other = lmadapt.attach(make_model("llama", len(tok), seed=3), "lora", tokenizer=tok)
    other.save(tmp_path / "other")
    assert main(["user", "add", "carol", str(tmp_path / "other"), "--state", str(state)]) == 2
    assert "does not fit" in capsys.readouterr().err
