"""Continuous batching: who runs each step (the runner, runner.py, decides how a batch runs).

One thread owns the model (routes are shared state, and one thread keeps the GPU busy without
locks). Each iteration, as Orca / vLLM schedule:

  1. admit waiting generation requests into the running batch, up to `max_batch` rows: a request
     joins at whatever decode step the batch is at (one prefill pass for all who join);
  2. run classification requests, batched: when `max_batch` wait or the oldest has waited
     `max_wait` seconds;
  3. one decode step for every running row; finished or cancelled rows leave (their slot pins are
     released), and their clients get their last event.

An idle batch waits up to `max_wait` for more requests before its first prefill, so a burst
starts together. A failing request fails alone (bad route, artifact gone); an error inside a
step fails the rows of that step and the loop goes on: nothing stays stuck.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from ..precision import autocast
from .bank import BankBusy
from .runner import DecodeBatch, Sequence


@dataclass(eq=False)
class GenRequest:
    user: str | None                  # None: the base model
    prompt: list[int]
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    on_token: object = None           # callback(token | None, finish_reason) in the model thread
    on_error: object = None           # callback(exception) in the model thread
    arrived: float = field(default_factory=time.monotonic)
    seq: Sequence | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """From any thread (a client went away): the row leaves at the next step."""
        self.cancelled = True
        if self.seq is not None:
            self.seq.cancelled = True


@dataclass(eq=False)
class ClassifyRequest:
    users: list[str | None]
    texts: list[str]
    text_pairs: list | None
    on_done: object                   # callback(results | None, exception | None)
    arrived: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, bank, *, max_batch: int = 32, max_wait: float = 0.01, precision: str = "fp32",
                 metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.bank, self.max_batch, self.max_wait, self.precision = bank, max_batch, max_wait, precision
        self.metrics = metrics
        self.cond = threading.Condition()
        self.waiting: list[GenRequest] = []
        self.cls_waiting: list[ClassifyRequest] = []
        self.batch = DecodeBatch(bank)
        self.owner: dict[Sequence, GenRequest] = {}
        self.stopped = False
        self.thread: threading.Thread | None = None

    # --- from any thread ---------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self.thread = threading.Thread(target=self._run, name="lmadapt-scheduler", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def submit(self, req: GenRequest) -> GenRequest:
        with self.cond:
            self.waiting.append(req)
            self.cond.notify_all()
        return req

    def submit_classify(self, req: ClassifyRequest) -> ClassifyRequest:
        with self.cond:
            self.cls_waiting.append(req)
            self.cond.notify_all()
        return req

    def queue_depth(self) -> int:
        return len(self.waiting) + sum(len(r.texts) for r in self.cls_waiting)

    def running(self) -> int:
        return len(self.batch)

    # --- the model thread ----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad(), autocast(self.precision, self.bank.device):
            while True:
                admit, classify = self._next_work()
                if admit is None:
                    return
                self._admit(admit)
                if classify:
                    self._classify(classify)
                if len(self.batch):
                    self._step()

    def _next_work(self):
        """Block until there is work; -> (generation requests to admit, classification requests)."""
        with self.cond:
            while True:
                if self.stopped:
                    self.batch.cancel_all()
                    for r in self.waiting:
                        self._fail(r, RuntimeError("the server is shutting down"))
                    return None, None
                now = time.monotonic()
                busy = len(self.batch) > 0
                room = self.max_batch - len(self.batch)
                gen_due = bool(self.waiting) and room > 0 and (
                    busy or len(self.waiting) >= room or now - self.waiting[0].arrived >= self.max_wait)
                n_cls = sum(len(r.texts) for r in self.cls_waiting)
                cls_due = bool(self.cls_waiting) and (
                    n_cls >= self.max_batch or now - self.cls_waiting[0].arrived >= self.max_wait)
                if gen_due or cls_due or busy:
                    admit = self.waiting[:room] if gen_due else []
                    del self.waiting[:len(admit)]
                    cls = []
                    if cls_due:
                        rows = 0
                        while self.cls_waiting and (not cls or rows + len(self.cls_waiting[0].texts) <= self.max_batch):
                            rows += len(self.cls_waiting[0].texts)
                            cls.append(self.cls_waiting.pop(0))
                    return admit, cls
                deadlines = [r.arrived + self.max_wait for r in self.waiting[:1] + self.cls_waiting[:1]]
                self.cond.wait(timeout=max(0.0, min(deadlines) - now) if deadlines else None)

    def _admit(self, reqs: list[GenRequest]) -> None:
        bank, seqs, retry = self.bank, [], []
        for req in reqs:
            if req.cancelled:
                self._fail(req, None)
                continue
            try:
                route = bank.acquire(req.user)
            except BankBusy as e:
                if len(self.batch):          # slots free up as running rows finish
                    retry.append(req)
                else:
                    self._fail(req, e)
                continue
            except Exception as e:          # unknown or removed user, damaged artifact on reload
                self._fail(req, e)
                continue
            gen = torch.Generator(device=bank.device).manual_seed(req.seed) if req.seed is not None else None
            req.seq = Sequence(req.prompt, route, req.max_new_tokens, req.do_sample, req.temperature, req.top_p,
                               gen, req.stop_ids, on_token=self._on_token(req), cancelled=req.cancelled)
            seqs.append(req.seq)
            self.owner[req.seq] = req
        if retry:
            with self.cond:
                self.waiting[:0] = retry
        if not seqs:
            return
        try:
            self.batch.add(seqs)
        except Exception as e:
            for s in seqs:
                bank.release(s.route)
                self._fail(self.owner.pop(s), e)
            return
        if self.metrics is not None:
            self.metrics.prompt_tokens += sum(len(s.prompt) for s in seqs)

    def _on_token(self, req: GenRequest):
        def on_token(seq: Sequence, token):
            if token is None:
                self.bank.release(seq.route)
                self.owner.pop(seq, None)
                if self.metrics is not None:
                    self.metrics.finish(seq.finish_reason or "stop")
            if req.on_token is not None:
                req.on_token(token, seq.finish_reason)
        return on_token

    def _step(self) -> None:
        n = len(self.batch)
        before = sum(len(s.tokens) for s in self.batch.seqs)
        seqs = list(self.batch.seqs)
        try:
            self.batch.step()
        except Exception as e:            # fail this step's rows, keep serving the others
            self.batch = DecodeBatch(self.bank)
            for s in seqs:
                req = self.owner.pop(s, None)
                if req is not None:              # not finished before the error
                    s.finish_reason = "error"
                    self.bank.release(s.route)
                    self._fail(req, e)
            return
        if self.metrics is not None:
            self.metrics.step(n, sum(len(s.tokens) for s in seqs) - before)

    def _classify(self, reqs: list[ClassifyRequest]) -> None:
        bank = self.bank
        rows, spans, ok = [], [], []
        for req in reqs:
            try:
                got = bank.routes(req.users)
            except Exception as e:
                req.on_done(None, e)
                continue
            spans.append((len(rows), len(rows) + len(got)))
            rows += got
            ok.append(req)
        if not ok:
            return
        try:
            texts = [t for r in ok for t in r.texts]
            pairs = [p for r in ok for p in (r.text_pairs or [None] * len(r.texts))]
            results = bank.classify_rows(rows, texts, pairs)
            for req, (a, b) in zip(ok, spans):
                req.on_done(results[a:b], None)
        except Exception as e:
            for req in ok:
                req.on_done(None, e)
        finally:
            for r in rows:
                bank.release(r)

    @staticmethod
    def _fail(req: GenRequest, exc) -> None:
        if exc is None:
            if req.on_token is not None:
                req.on_token(None, "cancelled")
        elif req.on_error is not None:
            req.on_error(exc)
