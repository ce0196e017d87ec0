"""Multi-tenant serving: many users' artifacts of mixed methods through one frozen model.

bank.py (the batched multi-method forward + registry), runner.py (one running decode batch),
scheduler.py (continuous batching: who runs each step), protocol.py + server.py (the
OpenAI-compatible HTTP edge), users.py (tokens and state on disk). See docs/serving.md.
"""
from .bank import Bank, BankBusy  # noqa: F401

__all__ = ["Bank", "BankBusy"]
