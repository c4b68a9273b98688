"""Public names of a package loaded on first use (PEP 562).

A package whose ``__init__`` would otherwise import torch, OpenCV or albumentations at once declares
which module each public name comes from and gets the module-level ``__getattr__`` and ``__dir__``
from :func:`lazy_attributes`; the command line's ``--help`` then starts without those imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any


def lazy_attributes(
    package: str,
    exports: Mapping[str, str],
    *,
    namespace: MutableMapping[str, Any],
    public: Sequence[str],
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name in ``exports`` (name -> module) is imported
    from its module on first use and kept in ``namespace`` (the package's globals), so it is looked up
    once; any other name raises ``AttributeError`` naming the package."""

    def load_attribute(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        namespace[name] = value
        return value

    def public_names() -> list[str]:
        return sorted(set(namespace) | set(public))

    return load_attribute, public_names
