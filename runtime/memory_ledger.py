"""An in-memory ledger for tests and benchmarks: sealed entries and checkpoints in lists,
verified by the streaming verifier."""

from __future__ import annotations

from collections.abc import Iterator

from .keychain import RETIREMENT, retirement_body
from .keys import Signer
from .ledger import Checkpoint, EntryData, LedgerEntry, LedgerMode, LedgerSealer, RootLike
from .merkle import TreeFrontier
from .verify import VerifyReport, verify_entries

__all__ = ["MemoryLedger"]


class MemoryLedger:
    """An in-memory ledger for tests and benchmarks; it starts with its genesis entry.

    `genesis_ts_ms` defaults to the start of the signer's window (or 0).
    """

    __slots__ = ("_checkpoints", "_entries", "_head", "_tree", "sealer")

    def __init__(self, sealer: LedgerSealer, *, genesis_ts_ms: int | None = None) -> None:
        self.sealer = sealer
        self._entries: list[LedgerEntry] = []
        self._checkpoints: list[Checkpoint] = []
        self._tree = TreeFrontier()  # over the entries up to the last checkpoint
        ts = genesis_ts_ms if genesis_ts_ms is not None else sealer.signer.valid_from_ms or 0
        genesis = sealer.genesis(ts)
        self._entries.append(genesis)
        self._head = genesis.entry_hash

    @property
    def mode(self) -> LedgerMode:
        return self.sealer.mode

    @property
    def size(self) -> int:
        return len(self._entries)

    @property
    def head_hash(self) -> bytes:
        return self._head

    def append(self, data: EntryData) -> LedgerEntry:
        entry = self.sealer.seal(len(self._entries), self._head, data)
        self._entries.append(entry)
        self._head = entry.entry_hash
        return entry

    def rotate(self, new_signer: Signer, ts_ms: int) -> LedgerEntry:
        """Append the rotation entry (signed by the current key) and sign with the new key."""
        entry, self.sealer = self.sealer.rotation(len(self._entries), self._head, ts_ms, new_signer)
        self._entries.append(entry)
        self._head = entry.entry_hash
        return entry

    def retire(self, key_ids: list[str], ts_ms: int) -> LedgerEntry:
        """Append a retirement entry signed by the current key."""
        body = retirement_body(key_ids)
        entry = self.sealer.seal_control(len(self._entries), self._head, ts_ms, RETIREMENT, body)
        self._entries.append(entry)
        self._head = entry.entry_hash
        return entry

    def tree(self) -> TreeFrontier:
        return self._tree.extend(e.entry_hash for e in self._entries[self._tree.size :])

    def checkpoint(self, ts_ms: int) -> Checkpoint:
        """Sign the current head (once per commit batch in checkpoint mode)."""
        size = len(self._entries)
        previous = self._checkpoints[-1] if self._checkpoints else None
        if previous is not None and previous.size == size:
            return previous
        self._tree = self.tree()
        checkpoint = self.sealer.checkpoint(size, self._head, ts_ms, self._tree, previous)
        self._checkpoints.append(checkpoint)
        return checkpoint

    def rollback(self, size: int) -> None:
        """Drop entries from `size` on (an aborted batch); never below a signed checkpoint."""
        signed = self._checkpoints[-1].size if self._checkpoints else 1
        if not signed <= size <= len(self._entries):
            raise ValueError(f"cannot roll back to {size}: signed up to {signed}")
        del self._entries[size:]
        self._head = self._entries[-1].entry_hash

    def entries(self) -> Iterator[LedgerEntry]:
        return iter(self._entries)

    def checkpoints(self) -> Iterator[Checkpoint]:
        return iter(self._checkpoints)

    def instance_history(self, instance: str) -> Iterator[LedgerEntry]:
        return (entry for entry in self._entries if entry.instance == instance)

    def verify(
        self, root: RootLike, *, external_checkpoint: Checkpoint | None = None
    ) -> VerifyReport:
        return verify_entries(
            self._entries,
            root,
            checkpoints=self._checkpoints,
            external_checkpoint=external_checkpoint,
            mode=self.mode,
        )
