"""The `lmadapt` command. One module per command, each with a `register(sub)`; this file only
assembles them (add a command: a module + one line in COMMANDS).

Every user error (bad data, unknown name, bad argument) prints one line `lmadapt: error: ...`
and exits 2; nothing half-written is left behind (artifacts are written atomically).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .common import parse_method_args, summary_table, table

__all__ = ["main", "build_parser", "quiet_third_party", "parse_method_args", "summary_table", "table"]

EXIT_USAGE = 2

COMMANDS = [
    "train", "evaluate", "pet", "icl", "cot", "instruct", "predict",
    "sft", "reward", "dpo", "ppo",
    "prompt_search", "ppt", "ipt",
    "serve", "user",
    "compare", "report",
    "listing",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmadapt", description="Adapt a pretrained language model to a task.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return p


def quiet_third_party() -> None:
    """A user's command prints lmadapt's own output only: third-party Python warnings and
    transformers' info logging and weight-loading bars are filtered here, at the edge, not in the
    library (a library user keeps them). lmadapt's own warnings still show."""
    import warnings

    from .. import LmadaptWarning
    # By category, not module: a deprecation warning is attributed to its caller's frame. A user
    # who asks for warnings (python -W ..., PYTHONWARNINGS) gets them.
    if not sys.warnoptions:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", category=LmadaptWarning)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    quiet_third_party()
    from ..data import DataError
    from ..models import ModelError
    try:
        return a.func(a)
    except (DataError, ModelError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lmadapt: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
