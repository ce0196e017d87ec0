"""`lmadapt serve` on loopback with a tiny random LLaMA: a real uvicorn server in a thread, the
official `openai` client and httpx. Concurrent clients get their own user's answer, equal to the
bank's offline answer (fp32 greedy: the same batched with others or alone); tenancy; every bad
request a 4xx in OpenAI's error shape; admin uploads (tar/zip, path traversal refused); a client
that disconnects frees its row; users survive a restart."""
import io
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import lmadapt
from lmadapt.serve import Bank
from lmadapt.serve.metrics import Metrics
from lmadapt.serve.scheduler import Scheduler
from lmadapt.serve.server import ServerConfig, create_app
from lmadapt.serve.users import UserStore
from conftest import make_model, make_tokenizer

ADMIN = "admin-secret"
LM_USERS = {"pam": ("prompt", {"k": 3}), "pia": ("prefix", {"k": 4}), "lou": ("lora", {}),
            "ada": ("adapter", {}), "bit": ("bitfit", {})}
PROMPTS = ["the movie was", "bad plot and", "a cat near the", "name cafe price", "it was very"]


def _artifact(tok, method, args, path, seed, **kw):
    a = lmadapt.attach(make_model("llama", len(tok)), method, tokenizer=tok, **args, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    a.save(path)
    return path


def _tar(folder, arcname="art") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(folder, arcname=arcname)
    return buf.getvalue()


class Served:
    """A running server and what the tests compare against."""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import uvicorn
    from lmadapt.methods import get_method
    tok = make_tokenizer()
    d = tmp_path_factory.mktemp("serve")
    arts = {u: _artifact(tok, m, a, d / "arts" / u, i) for i, (u, (m, a)) in enumerate(LM_USERS.items())}
    arts["cls"] = _artifact(tok, "lora", {}, d / "arts" / "cls", 9, num_labels=2, label_names=["neg", "pos"])
    arts["newbie"] = _artifact(tok, "lora", {}, d / "arts" / "newbie", 10)
    tables = [get_method("prompt", k=3), get_method("prefix", k=4), get_method("lora"), get_method("adapter"),
              get_method("bitfit")]
    bank = Bank(make_model("llama", len(tok)), tok, tables, capacity=3)
    store = UserStore(d / "state")
    store.set_base(bank.fingerprint)
    tokens = {}
    for u in list(LM_USERS) + ["cls"]:
        bank.check(arts[u])
        tokens[u] = store.add(u, arts[u])
        bank.register(u, store.artifact(u))
    s = Served()
    s.tok, s.bank, s.store, s.tokens, s.arts, s.dir = tok, bank, store, tokens, arts, d
    # the bank's offline answers, before the scheduler thread owns the model
    # (one batched call: test_serve_bank shows a batched row == the row alone)
    pairs = [(u, p) for u in list(LM_USERS) + [None] for p in PROMPTS[:3]]
    new = bank.generate([u for u, _ in pairs], [p for _, p in pairs], max_new_tokens=6)
    s.expected = {pair: tok.decode(n, skip_special_tokens=True) for pair, n in zip(pairs, new)}
    s.expected_n = {pair: len(n) for pair, n in zip(pairs, new)}
    s.expected_cls = bank.classify(["cls", "cls"], ["good film", "bad plot"])
    sched = Scheduler(bank, max_batch=4, max_wait=0.02, precision="fp32", metrics=Metrics())
    app = create_app(bank, store, sched, ServerConfig(admin_token=ADMIN, max_prompt_tokens=40, max_tokens=64,
                                                      max_upload_bytes=1 << 20))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    s.url, s.sched = f"http://127.0.0.1:{port}", sched
    s.http = httpx.Client(base_url=s.url, timeout=30)
    yield s
    server.should_exit = True
    th.join(timeout=10)


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def _complete(s, user, prompt, model=None, **kw):
    r = s.http.post("/v1/completions", headers=_auth(s.tokens[user] if user else ADMIN),
                    json={"model": model or user or s.bank.base_name, "prompt": prompt, "max_tokens": 6,
                          "temperature": 0, **kw})
    return r


def test_concurrent_clients_each_get_their_own_users_answer(served):
    s = served
    jobs = [(u, p) for u in LM_USERS for p in PROMPTS[:3]] + [(None, p) for p in PROMPTS[:2]]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: _complete(s, *j), jobs))
    for (u, p), r in zip(jobs, got):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == s.expected[(u, p)], (u, p)
    # alone (nothing else in flight): the same greedy answer as inside the concurrent burst
    for u, p in jobs[:3]:
        assert _complete(s, u, p).json()["choices"][0]["text"] == s.expected[(u, p)]
    # the answers depend on the user: distinct artifacts give distinct answers somewhere
    assert len({s.expected[(u, PROMPTS[0])] for u in list(LM_USERS) + [None]}) > 1
    m = s.http.get("/metrics").text
    assert 'lmadapt_requests_total{endpoint="/v1/completions",status="200"}' in m
    assert "lmadapt_batch_size_bucket" in m and "lmadapt_queue_depth" in m
    count = float(next(l for l in m.splitlines() if l.startswith("lmadapt_batch_size_count")).split()[1])
    total = float(next(l for l in m.splitlines() if l.startswith("lmadapt_batch_size_sum")).split()[1])
    assert total / count > 1.0, "requests were never batched together"


def test_openai_client_completions_chat_and_stream(served):
    import openai
    s = served
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.tokens["lou"], max_retries=0)
    r = client.completions.create(model="lou", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert r.choices[0].text == s.expected[("lou", PROMPTS[0])]
    assert r.usage.completion_tokens == s.expected_n[("lou", PROMPTS[0])]
    parts = [c.choices[0].text for c in client.completions.create(model="lou", prompt=PROMPTS[0], max_tokens=6,
                                                                  temperature=0, stream=True)]
    assert "".join(parts) == r.choices[0].text and len(parts) > 1
    chat = client.chat.completions.create(model="lou", messages=[{"role": "user", "content": "the movie"}],
                                          max_tokens=5, temperature=0)
    stream = client.chat.completions.create(model="lou", messages=[{"role": "user", "content": "the movie"}],
                                            max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["lou", s.bank.base_name]
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="pam", prompt="x", max_tokens=2)


def test_sampling_with_a_seed_is_reproducible(served):
    s = served
    a = _complete(s, "pia", PROMPTS[1], temperature=1.5, seed=7).json()["choices"][0]["text"]
    b = _complete(s, "pia", PROMPTS[1], temperature=1.5, seed=7).json()["choices"][0]["text"]
    assert a == b


def test_tenancy(served):
    s = served
    body = {"model": "lou", "prompt": "the", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        r = s.http.post("/v1/completions", headers=headers, json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = s.http.post("/v1/completions", headers=_auth(s.tokens["pam"]), json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    r = s.http.post("/v1/completions", headers=_auth(s.tokens["pam"]), json=body | {"model": s.bank.base_name})
    assert r.status_code == 200
    r = s.http.get("/v1/models", headers=_auth(s.tokens["pam"]))
    assert [m["id"] for m in r.json()["data"]] == ["pam", s.bank.base_name]
    for path in ("/v1/users/lou",):
        assert s.http.delete(path, headers=_auth(s.tokens["pam"])).status_code == 403
    assert s.http.get("/v1/models").status_code == 401


@pytest.mark.parametrize("case", [
    "malformed_json", "missing_prompt", "wrong_type", "long_prompt", "max_tokens", "unknown_model",
    "n2", "logprobs", "classify_lm", "complete_cls", "empty_prompt", "bad_token_ids", "many_prompts",
    "bad_temperature", "no_messages", "bad_role", "unknown_route", "classify_pairs"])
def test_bad_requests_get_4xx_openai_errors(served, case):
    s = served
    h = _auth(s.tokens["lou"])
    base = {"model": "lou", "prompt": "the movie", "max_tokens": 3}
    req = {
        "malformed_json": ("post", "/v1/completions", {"content": b'{"model": "lou", "prompt": '}),
        "missing_prompt": ("post", "/v1/completions", {"json": {"model": "lou"}}),
        "wrong_type": ("post", "/v1/completions", {"json": base | {"max_tokens": "lots"}}),
        "long_prompt": ("post", "/v1/completions", {"json": base | {"prompt": "the " * 41}}),
        "max_tokens": ("post", "/v1/completions", {"json": base | {"max_tokens": 65}}),
        "unknown_model": ("post", "/v1/completions", {"json": base | {"model": "ghost"}}),
        "n2": ("post", "/v1/completions", {"json": base | {"n": 2}}),
        "logprobs": ("post", "/v1/completions", {"json": base | {"logprobs": 2}}),
        "classify_lm": ("post", "/v1/classify", {"json": {"model": "lou", "input": "x"}}),
        "complete_cls": ("post", "/v1/completions", {"json": base | {"model": "cls"}, "token": "cls"}),
        "empty_prompt": ("post", "/v1/completions", {"json": base | {"prompt": ""}}),
        "bad_token_ids": ("post", "/v1/completions", {"json": base | {"prompt": [1, 99999]}}),
        "many_prompts": ("post", "/v1/completions", {"json": base | {"prompt": ["a", "b"]}}),
        "bad_temperature": ("post", "/v1/completions", {"json": base | {"temperature": -1}}),
        "no_messages": ("post", "/v1/chat/completions", {"json": {"model": "lou", "messages": []}}),
        "bad_role": ("post", "/v1/chat/completions", {"json": {"model": "lou", "messages": [{"role": "x", "content": "a"}]}}),
        "unknown_route": ("get", "/v1/nothing", {}),
        "classify_pairs": ("post", "/v1/classify", {"json": {"model": "cls", "input": ["a", "b"], "input_pair": ["a"]},
                                                    "token": "cls"}),
    }[case]
    method, path, kw = req
    token = kw.pop("token", None)
    headers = _auth(s.tokens[token]) if token else h
    if "content" in kw:
        headers = headers | {"Content-Type": "application/json"}
    r = getattr(s.http, method)(path, headers=headers, **kw)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"], case
    if case == "unknown_model":
        assert r.status_code == 404
    if case in ("malformed_json", "wrong_type", "missing_prompt", "long_prompt"):
        assert r.status_code == 400
    health = s.http.get("/health").json()
    assert health["running"] == 0 and health["waiting"] == 0      # nothing left stuck


def test_classify_endpoint_equals_bank(served):
    s = served
    r = s.http.post("/v1/classify", headers=_auth(s.tokens["cls"]), json={"model": "cls", "input": ["good film", "bad plot"]})
    assert r.status_code == 200, r.text
    for got, want in zip(r.json()["data"], s.expected_cls):
        assert got["label"] == want["label"]
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)


@pytest.fixture
def slow_steps(monkeypatch):
    """Each decode step takes 50 ms more, so 64 tokens take over 3 s: a client leaving early
    leaves long before its row would finish by itself."""
    from lmadapt.serve.runner import DecodeBatch
    step = DecodeBatch.step

    def slow(self):
        time.sleep(0.05)
        step(self)
    monkeypatch.setattr(DecodeBatch, "step", slow)


def test_client_disconnect_frees_its_row(served, slow_steps):
    s = served
    m = s.sched.metrics
    cancelled = m.finished["cancelled"]
    with s.http.stream("POST", "/v1/completions", headers=_auth(s.tokens["ada"]),
                       json={"model": "ada", "prompt": "the movie", "max_tokens": 64, "temperature": 0,
                             "stream": True, "stop": ["zzzz"]}) as r:
        next(r.iter_lines())
    t = time.monotonic()
    while s.sched.running() and time.monotonic() - t < 3.0:
        time.sleep(0.05)
    assert s.sched.running() == 0 and time.monotonic() - t < 2.5      # 64 steps would take 3.2 s
    assert m.finished["cancelled"] == cancelled + 1        # it left early, it did not run to the end
    assert s.bank.resident["ada"].pins == 0
    assert _complete(s, "ada", PROMPTS[0]).json()["choices"][0]["text"] == s.expected[("ada", PROMPTS[0])]


def test_non_streaming_client_that_leaves_frees_its_row(served, slow_steps):
    """A plain (non-stream) request whose client times out: the server notices the disconnect and
    drops the row long before its 64 tokens are done."""
    s = served
    cancelled = s.sched.metrics.finished["cancelled"]
    t = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        s.http.post("/v1/completions", headers=_auth(s.tokens["bit"]), timeout=0.3,
                    json={"model": "bit", "prompt": "the movie", "max_tokens": 64, "temperature": 0})
    while s.sched.running() and time.monotonic() - t < 3.0:
        time.sleep(0.05)
    assert s.sched.running() == 0 and time.monotonic() - t < 2.5      # 64 steps would take 3.2 s
    assert s.sched.metrics.finished["cancelled"] == cancelled + 1


def test_admin_upload_replace_delete_and_refusals(served, tmp_path):
    s = served
    admin = _auth(ADMIN)
    up = lambda data, name="newbie", method="post", path="/v1/users": getattr(s.http, method)(  # noqa: E731
        path, headers=admin, data={"name": name} if method == "post" else None,
        files={"file": ("art.tar.gz", data, "application/gzip")})
    r = up(_tar(s.arts["newbie"]))
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    assert token and r.json()["kind"] == "lm"
    r = s.http.post("/v1/completions", headers=_auth(token), json={"model": "newbie", "prompt": "the", "max_tokens": 3})
    assert r.status_code == 200
    assert up(_tar(s.arts["newbie"])).status_code == 409
    assert s.http.post("/v1/users", headers=_auth(s.tokens["lou"]), data={"name": "x"},
                       files={"file": ("a.tar", _tar(s.arts["newbie"]))}).status_code == 403
    # replace with another (zip) artifact: same token, new answers
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for f in s.arts["lou"].iterdir():
            z.write(f, f"art/{f.name}")
    r = up(zbuf.getvalue(), method="put", path="/v1/users/newbie")
    assert r.status_code == 200, r.text
    r = s.http.post("/v1/completions", headers=_auth(token), json={"model": "newbie", "prompt": PROMPTS[0],
                                                                   "max_tokens": 6, "temperature": 0})
    assert r.json()["choices"][0]["text"] == s.expected[("lou", PROMPTS[0])]
    before = (sorted(s.bank.registry), s.store.names())
    # path traversal, a link, a foreign artifact, a damaged one, not an archive, a bad name
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as t:
        info = tarfile.TarInfo("../../escape.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"bad"))
    r = up(evil.getvalue(), name="evil")
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"]
    import tempfile
    from pathlib import Path
    name = f"escape-{time.time_ns()}.txt"
    zevil = io.BytesIO()
    with zipfile.ZipFile(zevil, "w") as z:
        z.writestr(f"../{name}", "bad")
    r = up(zevil.getvalue(), name="evil")
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"]
    assert not (Path(tempfile.gettempdir()) / name).exists()
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as t:
        info = tarfile.TarInfo("art/method.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    assert up(link.getvalue(), name="evil").status_code == 400
    tok = make_tokenizer()
    foreign = lmadapt.attach(make_model("gpt2", len(tok)), "lora", tokenizer=tok)
    foreign.save(tmp_path / "foreign")
    r = up(_tar(tmp_path / "foreign"), name="evil")
    assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in s.arts["lou"].iterdir():
        (damaged / f.name).write_bytes(f.read_bytes()[:200])
    assert up(_tar(damaged), name="evil").status_code == 400
    assert up(b"not an archive at all", name="evil").status_code == 400
    assert up(_tar(s.arts["lou"]), name="../evil").status_code == 400
    assert (sorted(s.bank.registry), s.store.names()) == before
    # delete: the user and its token are gone
    assert s.http.delete("/v1/users/newbie", headers=admin).status_code == 200
    assert s.http.delete("/v1/users/newbie", headers=admin).status_code == 404
    r = s.http.post("/v1/completions", headers=_auth(token), json={"model": "newbie", "prompt": "the"})
    assert r.status_code == 401


def test_users_survive_a_restart(served):
    s = served
    again = UserStore(s.dir / "state")
    assert again.names() == s.store.names()
    assert again.by_token(s.tokens["lou"]) == "lou" and again.by_token("lma-wrong") is None
    raw = (s.dir / "state" / "users.json").read_text()
    assert s.tokens["lou"] not in raw      # only hashes on disk
    assert s.http.get("/health").json()["status"] == "ok"
    schema = s.http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/v1/users",
            "/v1/users/{name}", "/health", "/metrics"} <= set(schema["paths"])
    assert "403" in schema["paths"]["/v1/completions"]["post"]["responses"]
