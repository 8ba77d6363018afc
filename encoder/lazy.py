"""A package's names imported on first use (PEP 562), so that importing one light module of the package (a config)
does not import the heavy ones (torch, transformers) its `__init__` names."""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["lazy_names"]


def lazy_names(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The package's `__getattr__` and `__dir__`: `exports` maps each name to the module that defines it; a name is
    imported from there when first asked for, then kept in `namespace` (the package's globals)."""

    def __getattr__(name: str):
        if name in exports:
            value = namespace[name] = getattr(importlib.import_module(exports[name]), name)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
