"""The serving logic behind the routes (server.py): who is calling and which model they may use,
request checks, submitting to the scheduler and turning its tokens into text, uploads. The engine
(bank, scheduler) never sees HTTP; the routes never see the engine's internals."""
from __future__ import annotations

import asyncio
import hmac
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request, UploadFile
from starlette.concurrency import run_in_threadpool

from . import protocol as P
from .archive import ArchiveError, extract
from .bank import BankBusy
from .scheduler import GenRequest
from .users import check_name

log = logging.getLogger("lmadapt.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 503: "server_busy",
         500: "server_error"}
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


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


class Serving:
    def __init__(self, bank, store, scheduler, cfg: ServerConfig):
        self.bank, self.store, self.scheduler, self.cfg = bank, store, scheduler, cfg
        self.tok = bank.tokenizer

    # --- who is calling, and may they use this model ----------------------------------------
    def caller(self, request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing bearer token: send 'Authorization: Bearer <your token>'", code="invalid_api_key")
        token = token.strip()
        if self.cfg.admin_token and hmac.compare_digest(token.encode(), self.cfg.admin_token.encode()):
            return Caller(None, admin=True)
        name = self.store.by_token(token)
        if name is None:
            raise APIError(401, "invalid token", code="invalid_api_key")
        return Caller(name)

    def target(self, who: Caller, model: str, kind: str) -> str | None:
        """The request's `model` -> the user whose artifact serves it (None: the base model)."""
        if model == self.bank.base_name:
            return None
        if model not in self.bank.registry:
            raise APIError(404, f"model '{model}' does not exist", param="model", code="model_not_found")
        if not who.admin and who.name != model:
            raise APIError(403, f"your token does not give access to model '{model}'", param="model",
                           code="permission_denied")
        have = self.bank.registry[model].kind
        if have != kind:
            use = "/v1/classify" if have == "classify" else "/v1/completions or /v1/chat/completions"
            raise APIError(400, f"model '{model}' is a {'classifier' if have == 'classify' else 'generation model'}: "
                                f"use {use}", param="model", code="wrong_endpoint")
        return model

    def admin(self, request: Request) -> None:
        who = self.caller(request)
        if not who.admin:
            raise APIError(403, "admin only" + ("" if self.cfg.admin_token else
                                                 ": the server was started without LMADAPT_ADMIN_TOKEN"),
                           code="permission_denied")

    # --- generation -------------------------------------------------------------------------
    def sampling(self, body: P.Sampling, prompt: list[int], max_tokens: int | None) -> dict:
        for field in ("logprobs", "best_of"):
            if getattr(body, field) is not None:
                raise APIError(400, f"'{field}' is not supported by this server", param=field, code="unsupported")
        if body.echo:
            raise APIError(400, "'echo' is not supported by this server", param="echo", code="unsupported")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported: send several requests", param="n", code="unsupported")
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if len(prompt) > self.cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server takes at most "
                                f"{self.cfg.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is more than this server's limit ({self.cfg.max_tokens})",
                           param="max_tokens", code="max_tokens_exceeded")
        context = getattr(self.bank.model.config, "max_position_embeddings", None)
        need = len(prompt) + (max_tokens or self.cfg.default_max_tokens) + self.bank.max_virtual()
        if context and need > context:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens plus the artifacts' virtual "
                                f"positions need {need} positions; the model has {context}", param="max_tokens",
                           code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        return {"stops": stops, "max_new": max_tokens}

    async def run(self, request: Request, user: str | None, prompt: list[int], body: P.Sampling, max_new: int, stops,
                  counted: list | None = None):
        """Submit to the scheduler -> async iterator of (text delta, finish_reason | None); the
        number of tokens generated lands in counted[0]."""
        counted = counted if counted is not None else [0]
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        eos = self.tok.eos_token_id
        req = GenRequest(user, prompt, max_new, do_sample=body.temperature > 0, temperature=body.temperature or 1.0,
                         top_p=body.top_p, seed=body.seed, stop_ids=frozenset({eos} - {None}),
                         on_token=lambda t, r: loop.call_soon_threadsafe(q.put_nowait, ("self.tok", t, r)),
                         on_error=lambda e: loop.call_soon_threadsafe(q.put_nowait, ("err", e, None)))
        self.scheduler.submit(req)
        tokens, sent, finished = [], "", False

        async def watch():  # the client going away ends the wait below (as StreamingResponse listens)
            while (await request.receive())["type"] != "http.disconnect":
                pass
            q.put_nowait(("gone", None, None))
        watcher = asyncio.create_task(watch())
        try:
            while True:
                kind, value, reason = await q.get()
                if kind == "gone":
                    return
                if kind == "err":
                    raise mapped(value)
                if value is None:
                    finished = True
                    text = self.tok.decode(tokens, skip_special_tokens=True)
                    counted[0] = len(tokens)
                    yield text[len(sent):], ("length" if reason == "length" else "stop")
                    return
                tokens.append(value)
                text = self.tok.decode(tokens, skip_special_tokens=True)
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
            watcher.cancel()
            if not finished:
                req.cancel()            # the client left, or we stopped early: free the row

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            bad = [x for x in prompt if not 0 <= x < len(self.tok)]
            if bad:
                raise APIError(400, f"token ids {bad[:3]} are outside the vocabulary [0, {len(self.tok)})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (a list of several is not supported)", param="prompt")
            prompt = prompt[0]
        return self.tok(prompt, add_special_tokens=False)["input_ids"]

    def chat_ids(self, messages: list[P.ChatMessage]) -> list[int]:
        msgs = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in messages]
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:  # a tokenizer without a chat template: a plain transcript
            text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"
        return self.tok(text, add_special_tokens=False)["input_ids"]

    async def collect(self, request, user, ids, body, max_new, stops):
        parts, reason, counted = [], None, [0]
        async for delta, r in self.run(request, user, ids, body, max_new, stops, counted):
            parts.append(delta)
            reason = r or reason
        return "".join(parts), reason, counted[0]

    async def upload(self, name: str, file: UploadFile, replace: bool) -> P.UserInfo:
        check_or_400(lambda: check_name(name))
        if name == self.bank.base_name:
            raise APIError(400, f"'{name}' is the base model's name; choose another user name", param="name")
        exists = name in self.store
        if exists and not replace:
            raise APIError(409, f"user '{name}' already exists: PUT /v1/users/{name} replaces its artifact")
        if replace and not exists:
            raise APIError(404, f"user '{name}' does not exist", code="user_not_found")
        data = await file.read(self.cfg.max_upload_bytes + 1)
        if len(data) > self.cfg.max_upload_bytes:
            raise APIError(413, f"the archive is larger than {self.cfg.max_upload_bytes} bytes")

        def work():
            with tempfile.TemporaryDirectory(prefix="lmadapt-upload-") as tmp:
                root = extract(data, Path(tmp), self.cfg.max_upload_bytes)
                art = self.bank.check(root)                         # refuses foreign / unsupported / damaged
                token = self.store.add(name, root, replace=replace)
            try:
                self.bank.register(name, self.store.artifact(name), replace=name in self.bank.registry)
            except Exception:
                if not replace:
                    self.store.remove(name)
                raise
            return P.UserInfo(name=name, method=art.method, kind=art.kind, token=token)
        return await run_in_threadpool(lambda: check_or_400(work))


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


def mapped(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, BankBusy):
        return APIError(503, str(e), code="busy")
    if isinstance(e, ValueError):
        msg = str(e)
        return APIError(404 if msg.startswith("unknown user") else 400, msg)
    log.error("generation failed: %r", e)
    return APIError(500 if not isinstance(e, RuntimeError) else 503, f"{type(e).__name__}: {e}")
