"""Peak memory of a block of code: CUDA's allocator peak on GPU; on CPU the process RSS sampled
every few milliseconds by a thread (the OS keeps only a lifetime peak, which would include
model loading)."""
from __future__ import annotations

import threading
import time

import psutil
import torch


class PeakMemory:
    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_bytes = 0       # highest RSS (or CUDA allocated) seen inside the block
        self.start_bytes = 0      # at entry: the loaded model, data, etc.
        self._stop = threading.Event()
        self._cuda = torch.cuda.is_available()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def added_mb(self) -> float:
        """Peak above the level at entry: what the measured work itself needed."""
        return max(0, self.peak_bytes - self.start_bytes) / 2**20

    def _rss(self) -> int:
        return psutil.Process().memory_info().rss

    def _watch(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            self.start_bytes = self.peak_bytes = self._rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())
        return False
