"""Where governor state, the audit ledger, timers and the outbox are kept.

`SQLiteStore` is the default for real use, `MemoryStore` serves tests and benchmarks; both
implement the `Store` interface in `base`, which a server database can implement too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autonomic.lazy import load_attribute

if TYPE_CHECKING:
    from .base import InstanceRecord, OutboxMessage, Snapshot, Store, Transaction
    from .memory import MemoryStore
    from .sqlite import SQLiteStore

__all__ = [
    "InstanceRecord",
    "MemoryStore",
    "OutboxMessage",
    "SQLiteStore",
    "Snapshot",
    "Store",
    "Transaction",
]

# Names load on first use: a command that only needs a store's location (`store.urls`,
# `store.locate`) does not load every store and the tables they import.
_HOMES = {
    "InstanceRecord": "base",
    "MemoryStore": "memory",
    "OutboxMessage": "base",
    "SQLiteStore": "sqlite",
    "Snapshot": "base",
    "Store": "base",
    "Transaction": "base",
}


def __getattr__(name: str) -> Any:
    return load_attribute(globals(), _HOMES, name)
