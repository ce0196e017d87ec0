"""The HTTP edge: the app, its error handlers and its routes (OpenAI-compatible); the request
models are in protocol.py, the logic behind the routes in serving.py (the engine never sees HTTP).

Every error is OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}) with a 4xx
status for anything the client got wrong (401 no valid token, 403 someone else's model or not
admin, 404 unknown model or user, 409 user exists, 413 too large, 400 the rest); 503 when every
slot is busy. `build()` wires model, bank, users and scheduler for `lmadapt serve`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .metrics import Metrics
from .scheduler import ClassifyRequest
from .serving import TYPES, APIError, ServerConfig, Serving, mapped

log = logging.getLogger("lmadapt.serve")

ERRORS = {s: {"model": P.ErrorResponse, "description": TYPES[s]} for s in (400, 401, 403, 404, 409, 413, 503)}


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=TYPES.get(status, "invalid_request_error"),
                                             param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def create_app(bank, store, scheduler, config: ServerConfig | None = None, metrics: Metrics | None = None) -> FastAPI:
    cfg = config or ServerConfig()
    metrics = metrics or scheduler.metrics or Metrics()
    metrics.queue_depth = scheduler.queue_depth
    metrics.gauges = lambda: {"registered_users": len(bank.registry), "resident_artifacts": len(bank.resident),
                              "running_rows": scheduler.running()}
    sv = Serving(bank, store, scheduler, cfg)

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

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=ERRORS)
    async def completions(body: P.CompletionRequest, request: Request):
        user = sv.target(sv.caller(request), body.model, "lm")
        ids = sv.prompt_ids(body.prompt)
        s = sv.sampling(body, ids, body.max_tokens)
        max_new = body.max_tokens or cfg.default_max_tokens
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            async def events():
                try:
                    async for delta, reason in sv.run(request, user, ids, body, max_new, s["stops"]):
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                                   "choices": [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]})
                except APIError as e:
                    yield sse(P.ErrorResponse(error=P.ErrorBody(message=e.message, type=TYPES[e.status],
                                                                code=e.code)).model_dump())
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text, reason, n = await sv.collect(request, user, ids, body, max_new, s["stops"])
        return P.CompletionResponse(id=rid, created=created, model=body.model,
                                    choices=[P.CompletionChoice(text=text, finish_reason=reason)],
                                    usage=P.Usage(prompt_tokens=len(ids), completion_tokens=n,
                                                  total_tokens=len(ids) + n))

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=ERRORS)
    async def chat(body: P.ChatCompletionRequest, request: Request):
        user = sv.target(sv.caller(request), body.model, "lm")
        ids = sv.chat_ids(body.messages)
        want = body.max_completion_tokens or body.max_tokens
        s = sv.sampling(body, ids, want)
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
                    async for delta, reason in sv.run(request, user, ids, body, max_new, s["stops"], counted):
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
        text, reason, n = await sv.collect(request, user, ids, body, max_new, s["stops"])
        return P.ChatCompletionResponse(id=rid, created=created, model=body.model,
                                        choices=[P.ChatChoice(message=P.AssistantMessage(content=text),
                                                              finish_reason=reason)],
                                        usage=P.Usage(prompt_tokens=len(ids), completion_tokens=n,
                                                      total_tokens=len(ids) + n))

    # --- classification ---------------------------------------------------------------------
    @app.post("/v1/classify", response_model=P.ClassifyResponse, responses=ERRORS)
    async def classify(body: P.ClassifyRequest, request: Request):
        user = sv.target(sv.caller(request), body.model, "classify")
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
            raise mapped(exc)
        return P.ClassifyResponse(model=body.model, data=[P.Classification(index=i, label=r["label"], probs=r["probs"])
                                                          for i, r in enumerate(res)])

    # --- models, users, health, metrics ------------------------------------------------------
    @app.get("/v1/models", response_model=P.ModelList, responses=ERRORS)
    async def models(request: Request):
        who = sv.caller(request)
        names = sorted(bank.registry) if who.admin else [n for n in [who.name] if n in bank.registry]
        return P.ModelList(data=[P.ModelCard(id=n, owned_by=n) for n in names] +
                           [P.ModelCard(id=bank.base_name, owned_by="lmadapt")])

    @app.post("/v1/users", response_model=P.UserInfo, status_code=201, responses=ERRORS)
    async def add_user(request: Request, name: str = Form(...), file: UploadFile = File(...)):
        """Register a user: `name` and `file`, the artifact folder as a .tar, .tar.gz or .zip
        archive. Returns the user's token, once."""
        sv.admin(request)
        return await sv.upload(name, file, replace=False)

    @app.put("/v1/users/{name}", response_model=P.UserInfo, responses=ERRORS)
    async def replace_user(name: str, request: Request, file: UploadFile = File(...)):
        sv.admin(request)
        return await sv.upload(name, file, replace=True)

    @app.delete("/v1/users/{name}", response_model=P.Deleted, responses=ERRORS)
    async def delete_user(name: str, request: Request):
        sv.admin(request)
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
