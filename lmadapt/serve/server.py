"""The HTTP edge: OpenAI-compatible routes over the scheduler (the engine never sees HTTP).

Every error is OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}) with a 4xx
status for anything the client got wrong (401 no valid token, 403 someone else's model or not
admin, 404 unknown model or user, 409 user exists, 413 too large, 400 the rest); 503 when every
slot is busy. `build()` wires model, bank, users and scheduler for `lmadapt serve`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .archive import ArchiveError, extract
from .bank import BankBusy
from .metrics import Metrics
from .scheduler import ClassifyRequest, GenRequest
from .users import check_name

log = logging.getLogger("lmadapt.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 503: "server_busy",
         500: "server_error"}
ERRORS = {s: {"model": P.ErrorResponse, "description": TYPES[s]} for s in (400, 401, 403, 404, 409, 413, 503)}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=TYPES.get(status, "invalid_request_error"),
                                             param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


@dataclass
class ServerConfig:
    admin_token: str | None = None
    max_prompt_tokens: int = 1024
    max_tokens: int = 512             # per request, completions and chat
    default_max_tokens: int = 16      # completions without max_tokens (OpenAI's default)
    max_upload_bytes: int = 256 << 20
    max_body_bytes: int = 8 << 20     # JSON requests
    max_inputs: int = 256             # texts per /v1/classify request


@dataclass
class Caller:
    name: str | None                  # the user the token belongs to
    admin: bool = False


def create_app(bank, store, scheduler, config: ServerConfig | None = None, metrics: Metrics | None = None) -> FastAPI:
    cfg = config or ServerConfig()
    metrics = metrics or scheduler.metrics or Metrics()
    metrics.queue_depth = scheduler.queue_depth
    metrics.gauges = lambda: {"registered_users": len(bank.registry), "resident_artifacts": len(bank.resident),
                              "running_rows": scheduler.running()}
    tok = bank.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if scheduler.thread is None:
            scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lmadapt", version="1", lifespan=lifespan,
                  description="Many users' artifacts (prompt, prefix, LoRA, adapter, BitFit, heads) served "
                              "from one base model in shared batches; OpenAI-compatible.")

    # --- errors: OpenAI's shape, never a bare 422 or an HTML page ----------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({first.get('msg', '')})", code="json_invalid")
        field = ".".join(loc) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs[:3])
        return error_response(400, f"invalid request: {msg}", param=field, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("internal error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > (cfg.max_upload_bytes if request.url.path.startswith("/v1/users")
                                                    else cfg.max_body_bytes):
            response = error_response(413, f"the request body is {size} bytes, more than this server takes")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.request(getattr(route, "path", "other"), response.status_code)
        return response

    # --- who is calling, and may they use this model ----------------------------------------
    def caller(request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing bearer token: send 'Authorization: Bearer <your token>'", code="invalid_api_key")
        token = token.strip()
        if cfg.admin_token and hmac.compare_digest(token.encode(), cfg.admin_token.encode()):
            return Caller(None, admin=True)
        name = store.by_token(token)
        if name is None:
            raise APIError(401, "invalid token", code="invalid_api_key")
        return Caller(name)

    def target(who: Caller, model: str, kind: str) -> str | None:
        """The request's `model` -> the user whose artifact serves it (None: the base model)."""
        if model == bank.base_name:
            return None
        if model not in bank.registry:
            raise APIError(404, f"model '{model}' does not exist", param="model", code="model_not_found")
        if not who.admin and who.name != model:
            raise APIError(403, f"your token does not give access to model '{model}'", param="model",
                           code="permission_denied")
        have = bank.registry[model].kind
        if have != kind:
            use = "/v1/classify" if have == "classify" else "/v1/completions or /v1/chat/completions"
            raise APIError(400, f"model '{model}' is a {'classifier' if have == 'classify' else 'generation model'}: "
                                f"use {use}", param="model", code="wrong_endpoint")
        return model

    def admin(request: Request) -> None:
        who = caller(request)
        if not who.admin:
            raise APIError(403, "admin only" + ("" if cfg.admin_token else
                                                 ": the server was started without LMADAPT_ADMIN_TOKEN"),
                           code="permission_denied")

    # --- generation -------------------------------------------------------------------------
    def sampling(body: P.Sampling, prompt: list[int], max_tokens: int | None) -> dict:
        for field in ("logprobs", "best_of"):
            if getattr(body, field) is not None:
                raise APIError(400, f"'{field}' is not supported by this server", param=field, code="unsupported")
        if body.echo:
            raise APIError(400, "'echo' is not supported by this server", param="echo", code="unsupported")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported: send several requests", param="n", code="unsupported")
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if len(prompt) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server takes at most "
                                f"{cfg.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > cfg.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is more than this server's limit ({cfg.max_tokens})",
                           param="max_tokens", code="max_tokens_exceeded")
        context = getattr(bank.model.config, "max_position_embeddings", None)
        need = len(prompt) + (max_tokens or cfg.default_max_tokens) + bank.max_virtual()
        if context and need > context:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens plus the artifacts' virtual "
                                f"positions need {need} positions; the model has {context}", param="max_tokens",
                           code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        return {"stops": stops, "max_new": max_tokens}

    async def run(request: Request, user: str | None, prompt: list[int], body: P.Sampling, max_new: int, stops,
                  counted: list | None = None):
        """Submit to the scheduler -> async iterator of (text delta, finish_reason | None); the
        number of tokens generated lands in counted[0]."""
        counted = counted if counted is not None else [0]
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        eos = tok.eos_token_id
        req = GenRequest(user, prompt, max_new, do_sample=body.temperature > 0, temperature=body.temperature or 1.0,
                         top_p=body.top_p, seed=body.seed, stop_ids=frozenset({eos} - {None}),
                         on_token=lambda t, r: loop.call_soon_threadsafe(q.put_nowait, ("tok", t, r)),
                         on_error=lambda e: loop.call_soon_threadsafe(q.put_nowait, ("err", e, None)))
        scheduler.submit(req)
        tokens, sent, finished = [], "", False
        try:
            while True:
                try:
                    kind, value, reason = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "err":
                    raise _mapped(value)
                if value is None:
                    finished = True
                    text = tok.decode(tokens, skip_special_tokens=True)
                    counted[0] = len(tokens)
                    yield text[len(sent):], ("length" if reason == "length" else "stop")
                    return
                tokens.append(value)
                text = tok.decode(tokens, skip_special_tokens=True)
                hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    finished = True
                    counted[0] = len(tokens)
                    yield text[len(sent):hit], "stop"
                    return
                if text.endswith("\ufffd"):       # half of a multi-byte character: wait for the rest
                    continue
                held = max((len(s) - 1 for s in stops), default=0)   # a stop string may be starting
                ready = text[:len(text) - held] if held else text
                if len(ready) > len(sent):
                    yield ready[len(sent):], None
                    sent = ready
        finally:
            if not finished:
                req.cancel()            # the client left, or we stopped early: free the row

    def prompt_ids(prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            bad = [x for x in prompt if not 0 <= x < len(tok)]
            if bad:
                raise APIError(400, f"token ids {bad[:3]} are outside the vocabulary [0, {len(tok)})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (a list of several is not supported)", param="prompt")
            prompt = prompt[0]
        return tok(prompt, add_special_tokens=False)["input_ids"]

    def chat_ids(messages: list[P.ChatMessage]) -> list[int]:
        msgs = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in messages]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:  # a tokenizer without a chat template: a plain transcript
            text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"
        return tok(text, add_special_tokens=False)["input_ids"]

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=ERRORS)
    async def completions(body: P.CompletionRequest, request: Request):
        user = target(caller(request), body.model, "lm")
        ids = prompt_ids(body.prompt)
        s = sampling(body, ids, body.max_tokens)
        max_new = body.max_tokens or cfg.default_max_tokens
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            async def events():
                try:
                    async for delta, reason in run(request, user, ids, body, max_new, s["stops"]):
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                                   "choices": [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]})
                except APIError as e:
                    yield sse(P.ErrorResponse(error=P.ErrorBody(message=e.message, type=TYPES[e.status],
                                                                code=e.code)).model_dump())
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text, reason, n = await collect(request, user, ids, body, max_new, s["stops"])
        return P.CompletionResponse(id=rid, created=created, model=body.model,
                                    choices=[P.CompletionChoice(text=text, finish_reason=reason)],
                                    usage=P.Usage(prompt_tokens=len(ids), completion_tokens=n,
                                                  total_tokens=len(ids) + n))

    async def collect(request, user, ids, body, max_new, stops):
        parts, reason, counted = [], None, [0]
        async for delta, r in run(request, user, ids, body, max_new, stops, counted):
            parts.append(delta)
            reason = r or reason
        return "".join(parts), reason, counted[0]

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=ERRORS)
    async def chat(body: P.ChatCompletionRequest, request: Request):
        user = target(caller(request), body.model, "lm")
        ids = chat_ids(body.messages)
        want = body.max_completion_tokens or body.max_tokens
        s = sampling(body, ids, want)
        max_new = want or cfg.max_tokens
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage

            async def events():
                head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
                yield sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}]})
                counted = [0]
                try:
                    async for delta, reason in run(request, user, ids, body, max_new, s["stops"], counted):
                        yield sse(head | {"choices": [{"index": 0, "delta": {"content": delta} if delta else {},
                                                       "finish_reason": reason}]})
                except APIError as e:
                    yield sse(P.ErrorResponse(error=P.ErrorBody(message=e.message, type=TYPES[e.status],
                                                                code=e.code)).model_dump())
                if usage:
                    n = counted[0]
                    yield sse(head | {"choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                                               "total_tokens": len(ids) + n}})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text, reason, n = await collect(request, user, ids, body, max_new, s["stops"])
        return P.ChatCompletionResponse(id=rid, created=created, model=body.model,
                                        choices=[P.ChatChoice(message=P.AssistantMessage(content=text),
                                                              finish_reason=reason)],
                                        usage=P.Usage(prompt_tokens=len(ids), completion_tokens=n,
                                                      total_tokens=len(ids) + n))

    # --- classification ---------------------------------------------------------------------
    @app.post("/v1/classify", response_model=P.ClassifyResponse, responses=ERRORS)
    async def classify(body: P.ClassifyRequest, request: Request):
        user = target(caller(request), body.model, "classify")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        pairs = None if body.input_pair is None else (
            [body.input_pair] if isinstance(body.input_pair, str) else list(body.input_pair))
        if not texts:
            raise APIError(400, "input is empty", param="input")
        if len(texts) > cfg.max_inputs:
            raise APIError(400, f"{len(texts)} inputs; at most {cfg.max_inputs} per request", param="input")
        if pairs is not None and len(pairs) != len(texts):
            raise APIError(400, f"input_pair has {len(pairs)} texts for {len(texts)} inputs", param="input_pair")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        scheduler.submit_classify(ClassifyRequest([user] * len(texts), texts, pairs,
                                                  lambda res, exc: loop.call_soon_threadsafe(fut.set_result, (res, exc))))
        res, exc = await fut
        if exc is not None:
            raise _mapped(exc)
        return P.ClassifyResponse(model=body.model, data=[P.Classification(index=i, label=r["label"], probs=r["probs"])
                                                          for i, r in enumerate(res)])

    # --- models, users, health, metrics ------------------------------------------------------
    @app.get("/v1/models", response_model=P.ModelList, responses=ERRORS)
    async def models(request: Request):
        who = caller(request)
        names = sorted(bank.registry) if who.admin else [n for n in [who.name] if n in bank.registry]
        return P.ModelList(data=[P.ModelCard(id=n, owned_by=n) for n in names] +
                           [P.ModelCard(id=bank.base_name, owned_by="lmadapt")])

    async def upload(name: str, file: UploadFile, replace: bool) -> P.UserInfo:
        check_or_400(lambda: check_name(name))
        if name == bank.base_name:
            raise APIError(400, f"'{name}' is the base model's name; choose another user name", param="name")
        exists = name in store
        if exists and not replace:
            raise APIError(409, f"user '{name}' already exists: PUT /v1/users/{name} replaces its artifact")
        if replace and not exists:
            raise APIError(404, f"user '{name}' does not exist", code="user_not_found")
        data = await file.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise APIError(413, f"the archive is larger than {cfg.max_upload_bytes} bytes")

        def work():
            with tempfile.TemporaryDirectory(prefix="lmadapt-upload-") as tmp:
                root = extract(data, Path(tmp), cfg.max_upload_bytes)
                art = bank.check(root)                         # refuses foreign / unsupported / damaged
                token = store.add(name, root, replace=replace)
            try:
                bank.register(name, store.artifact(name), replace=name in bank.registry)
            except Exception:
                if not replace:
                    store.remove(name)
                raise
            return P.UserInfo(name=name, method=art.method, kind=art.kind, token=token)
        return await run_in_threadpool(lambda: check_or_400(work))

    @app.post("/v1/users", response_model=P.UserInfo, status_code=201, responses=ERRORS)
    async def add_user(request: Request, name: str = Form(...), file: UploadFile = File(...)):
        """Register a user: `name` and `file`, the artifact folder as a .tar, .tar.gz or .zip
        archive. Returns the user's token, once."""
        admin(request)
        return await upload(name, file, replace=False)

    @app.put("/v1/users/{name}", response_model=P.UserInfo, responses=ERRORS)
    async def replace_user(name: str, request: Request, file: UploadFile = File(...)):
        admin(request)
        return await upload(name, file, replace=True)

    @app.delete("/v1/users/{name}", response_model=P.Deleted, responses=ERRORS)
    async def delete_user(name: str, request: Request):
        admin(request)
        if name not in store:
            raise APIError(404, f"user '{name}' does not exist", code="user_not_found")
        store.remove(name)
        with contextlib.suppress(ValueError):
            bank.remove(name)
        return P.Deleted(name=name)

    @app.get("/health", response_model=P.Health)
    async def health():
        return P.Health(users=len(bank.registry), resident=len(bank.resident), running=scheduler.running(),
                        waiting=scheduler.queue_depth())

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def check_or_400(fn):
    from ..atomic import DamagedFile
    try:
        return fn()
    except APIError:
        raise
    except (ArchiveError, DamagedFile, ValueError, FileNotFoundError) as e:
        raise APIError(400, str(e), code="invalid_artifact") from None
    except FileExistsError as e:
        raise APIError(409, str(e)) from None


def _mapped(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, BankBusy):
        return APIError(503, str(e), code="busy")
    if isinstance(e, ValueError):
        msg = str(e)
        return APIError(404 if msg.startswith("unknown user") else 400, msg)
    log.error("generation failed: %r", e)
    return APIError(500 if not isinstance(e, RuntimeError) else 503, f"{type(e).__name__}: {e}")


def build(model: str, state, *, methods=None, capacity: int = 16, max_batch: int = 32, max_wait: float = 0.01,
          precision: str = "auto", config: ServerConfig | None = None, log_fn=print):
    """Load the model, build the bank, register the users kept in `state` -> (app, bank, scheduler)."""
    from ..models import load
    from ..precision import resolve
    from .bank import Bank
    from .scheduler import Scheduler
    from .users import UserStore
    store = UserStore(state)
    base, tokenizer = load(model)
    base.config.lmadapt_name = Path(model).name if Path(model).is_dir() else model
    bank = Bank(base, tokenizer, methods, capacity=capacity)
    store.set_base(bank.fingerprint)
    for name in store.names():
        try:
            bank.register(name, store.artifact(name))
        except (ValueError, FileNotFoundError) as e:   # kept on disk; fix or replace it
            log_fn(f"lmadapt serve: user '{name}' not served: {e}")
    metrics = Metrics()
    sched = Scheduler(bank, max_batch=max_batch, max_wait=max_wait, precision=resolve(precision, bank.device),
                      metrics=metrics)
    return create_app(bank, store, sched, config, metrics), bank, sched
