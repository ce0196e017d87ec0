"""Multi-tenant serving: many users' artifacts of mixed methods through one frozen model.

tables.py (one slot table per method), bank.py (the batched multi-method forward), registry.py
(users, residents, LRU, artifact checks), runner.py (one running decode batch),
scheduler.py (continuous batching: who runs each step), protocol.py + serving.py + server.py (the
OpenAI-compatible HTTP edge), users.py (tokens and state on disk). See docs/serving.md.
"""
from .bank import Bank, BankBusy  # noqa: F401

__all__ = ["Bank", "BankBusy"]
