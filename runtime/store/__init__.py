"""Where governor state, the audit ledger, timers and the outbox are kept.

`SQLiteStore` is the default for real use, `MemoryStore` serves tests and benchmarks; both
implement the `Store` interface in `base`, which a server database can implement too.
"""

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
