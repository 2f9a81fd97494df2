"""Replay and snapshots: an instance's state rebuilt from its verified ledger entries."""

from __future__ import annotations

from .errors import StoreIntegrityError, UnknownInstance
from .ledger import KEPT, LedgerEntry, LedgerMode, RootLike, VerifyReport, verify_entries
from .partitions import PartitionedStore, verify_store
from .results import ReplayedState
from .sealing import _verify_stored_entry
from .store.base import Snapshot, Store, Transaction

# Entries of an instance that change neither its state nor its version: a recorded rejection,
# and the commitment to its kept data that follows a move (runtime/ledger.py).
_NO_CHANGE = frozenset(("rejection", KEPT))


def save_snapshot(
    txn: Transaction,
    machine: str,
    instance: str,
    version: int,
    state: str,
    entry: LedgerEntry,
) -> None:
    txn.save_snapshot(Snapshot(machine, instance, version, state, entry.seq, entry.entry_hash))


def replay(
    store: Store, machine: str, instance: str, *, use_snapshot: bool = True
) -> ReplayedState:
    """Rebuild an instance's state from its ledger entries, from its latest snapshot on
    (verified against the entry it names) or from the start. Every entry read is checked
    against its hash, and each must start where the previous one ended."""
    state: str | None = None
    version = 0
    after = -1
    snapshot_version: int | None = None
    if use_snapshot:
        snapshot = store.latest_snapshot(machine, instance)
        if snapshot is not None:
            if isinstance(store, PartitionedStore):
                partition = store.partition_of(instance)
                entry = store.ledger_entry(snapshot.ledger_seq, partition=partition)
            else:
                entry = store.ledger_entry(snapshot.ledger_seq)
            if (
                entry is None
                or entry.entry_hash != snapshot.entry_hash
                or entry.machine != machine
                or entry.instance != instance
                or entry.to_state != snapshot.state
            ):
                raise StoreIntegrityError(
                    f"the snapshot of {machine} '{instance}' at version {snapshot.version} "
                    f"does not match ledger entry {snapshot.ledger_seq}",
                    hint="replay without the snapshot (use_snapshot=False)",
                )
            _verify_stored_entry(entry, "snapshot entry")
            state, version, after = snapshot.state, snapshot.version, snapshot.ledger_seq
            snapshot_version = snapshot.version
    replayed = 0
    last_seq = after
    for entry in store.ledger_entries(machine=machine, instance=instance, after_seq=after):
        _verify_stored_entry(entry, "ledger entry")
        if entry.kind in _NO_CHANGE:
            continue
        if (state or "") != entry.from_state:
            raise StoreIntegrityError(
                f"ledger entry {entry.seq} of {machine} '{instance}' starts in "
                f"'{entry.from_state}' but the history so far ends in '{state or ''}'"
            )
        state = entry.to_state
        version += 1
        replayed += 1
        last_seq = entry.seq
    if state is None:
        raise UnknownInstance(machine, instance)
    return ReplayedState(machine, instance, state, version, last_seq, snapshot_version, replayed)


def verify(store: Store, root: RootLike, mode: LedgerMode | None) -> VerifyReport:
    """Verify the whole stored ledger (every entry, checkpoint and signature) from `root`; on
    a partitioned store every partition and every signed root."""
    if isinstance(store, PartitionedStore):
        return verify_store(store, root, mode)
    return verify_entries(
        store.ledger_entries(),
        root,
        checkpoints=store.checkpoints(),
        mode=mode,
    )
