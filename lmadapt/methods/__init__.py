"""Every adaptation method, one file each, registered by name in METHODS.

Every module in this package is imported here, so adding a method is adding a file.
"""
import importlib
import pkgutil

from .base import METHODS, Method, get_method, register  # noqa: F401

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["METHODS", "Method", "get_method", "register"]
