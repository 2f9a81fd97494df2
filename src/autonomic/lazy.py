"""Module attributes loaded on first use (PEP 562): a package's or module's public names stay
importable from it without importing, up front, every module that defines them."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, MutableMapping
from typing import Any


def load_attribute(namespace: MutableMapping[str, Any], homes: Mapping[str, str], name: str) -> Any:
    """The attribute `name` of the module whose globals are `namespace`, imported from its
    sibling module `homes[name]` and kept in `namespace` so it is loaded once."""
    home = homes.get(name)
    if home is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", namespace["__package__"]), name)
    namespace[name] = value
    return value
