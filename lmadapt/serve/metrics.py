"""Server metrics in Prometheus' text format (no client library needed for a few counters)."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()          # (endpoint, status) -> n
        self.finished: Counter = Counter()          # finish reason (stop, length, cancelled, error) -> n
        self.batch_counts = [0] * len(BATCH_BUCKETS)
        self.batch_sum = self.batch_n = 0
        self.tokens = self.prompt_tokens = 0
        self.recent: deque = deque()                # (time, tokens) of the last WINDOW seconds
        self.queue_depth = lambda: 0
        self.gauges = lambda: {}

    WINDOW = 10.0

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] += 1

    def step(self, batch_size: int, new_tokens: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.batch_sum += batch_size
            self.batch_n += 1
            for i, b in enumerate(BATCH_BUCKETS):
                if batch_size <= b:
                    self.batch_counts[i] += 1
            self.tokens += new_tokens
            self.recent.append((now, new_tokens))
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            return sum(n for t, n in self.recent if t >= now - self.WINDOW) / self.WINDOW

    def render(self) -> str:
        lines = ["# HELP lmadapt_requests_total Requests by endpoint and HTTP status.",
                 "# TYPE lmadapt_requests_total counter"]
        with self.lock:
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'lmadapt_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            lines += ["# HELP lmadapt_sequences_finished_total Generations by how they ended.",
                      "# TYPE lmadapt_sequences_finished_total counter"]
            for reason, n in sorted(self.finished.items()):
                lines.append(f'lmadapt_sequences_finished_total{{reason="{reason}"}} {n}')
            lines += ["# HELP lmadapt_batch_size Rows in each decode step.", "# TYPE lmadapt_batch_size histogram"]
            for b, c in zip(BATCH_BUCKETS, self.batch_counts):
                lines.append(f'lmadapt_batch_size_bucket{{le="{b}"}} {c}')
            lines += [f'lmadapt_batch_size_bucket{{le="+Inf"}} {self.batch_n}',
                      f"lmadapt_batch_size_sum {self.batch_sum}", f"lmadapt_batch_size_count {self.batch_n}",
                      "# TYPE lmadapt_generated_tokens_total counter", f"lmadapt_generated_tokens_total {self.tokens}",
                      "# TYPE lmadapt_prompt_tokens_total counter", f"lmadapt_prompt_tokens_total {self.prompt_tokens}"]
        lines += ["# HELP lmadapt_tokens_per_second Generated tokens per second over the last 10 s.",
                  "# TYPE lmadapt_tokens_per_second gauge", f"lmadapt_tokens_per_second {self.tokens_per_second():.3f}",
                  "# HELP lmadapt_queue_depth Requests waiting to join a batch.", "# TYPE lmadapt_queue_depth gauge",
                  f"lmadapt_queue_depth {self.queue_depth()}"]
        for name, value in self.gauges().items():
            lines += [f"# TYPE lmadapt_{name} gauge", f"lmadapt_{name} {value}"]
        return "\n".join(lines) + "\n"
