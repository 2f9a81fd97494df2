"""Replay and snapshots: an instance's state rebuilt from its verified ledger entries, and its
kept data checked against its newest "kept" entry (a snapshot names the one it had then)."""

from __future__ import annotations

from collections.abc import Callable

from .errors import StoreIntegrityError, UnknownInstance
from .ledger import (
    KEPT,
    LedgerEntry,
    LedgerMode,
    RootLike,
    VerifyReport,
    kept_digest,
    verify_entries,
)
from .partitions import PartitionedStore, verify_store
from .results import ReplayedState
from .sealing import _verify_stored_entry
from .store.base import Snapshot, Store, Transaction


def save_snapshot(
    txn: Transaction,
    machine: str,
    instance: str,
    version: int,
    state: str,
    entry: LedgerEntry,
    kept_seq: int = -1,
) -> None:
    txn.save_snapshot(
        Snapshot(machine, instance, version, state, entry.seq, entry.entry_hash, kept_seq)
    )


def replay(
    store: Store,
    machine: str,
    instance: str,
    *,
    use_snapshot: bool = True,
    newest_kept: Callable[[], LedgerEntry | None] | None = None,
) -> ReplayedState:
    """Rebuild an instance's state from its ledger entries, from its latest snapshot on
    (verified against the entry it names) or from the start. Every entry read is checked
    against its hash, and each must start where the previous one ended. The instance's kept
    data, as stored, must be what its newest kept entry commits to, else
    StoreIntegrityError; `data` of the result holds it.

    A snapshot's own claims are store data: `newest_kept` reads the instance's newest kept
    entry from the ledger (verified by the caller: hash and signature), after the snapshot is
    read. The snapshot's `kept_seq` must name it when it is not newer than the snapshot's
    entry (the kept entry of that very move comes right after it), and none when the ledger
    has none; a newer one must be among the entries replayed after the snapshot. Without a
    snapshot the replayed entries must show it too."""
    where = f"{machine} '{instance}'"
    state: str | None = None
    version = 0
    after = -1
    snapshot_version: int | None = None
    kept: LedgerEntry | None = None
    if use_snapshot:
        snapshot = store.latest_snapshot(machine, instance)
        if snapshot is not None:
            entry = _entry_at(store, instance, snapshot.ledger_seq)
            if (
                entry is None
                or entry.entry_hash != snapshot.entry_hash
                or entry.machine != machine
                or entry.instance != instance
                or entry.to_state != snapshot.state
            ):
                raise StoreIntegrityError(
                    f"the snapshot of {where} at version {snapshot.version} "
                    f"does not match ledger entry {snapshot.ledger_seq}",
                    hint="replay without the snapshot (use_snapshot=False)",
                )
            _verify_stored_entry(entry, "snapshot entry")
            if snapshot.kept_seq >= 0:
                kept = _entry_at(store, instance, snapshot.kept_seq)
                if (
                    kept is None
                    or kept.kind != KEPT
                    or kept.machine != machine
                    or kept.instance != instance
                ):
                    raise StoreIntegrityError(
                        f"the snapshot of {where} at version {snapshot.version} names ledger "
                        f"entry {snapshot.kept_seq} as its kept entry, which it is not",
                        hint="replay without the snapshot (use_snapshot=False)",
                    )
                _verify_stored_entry(kept, "snapshot's kept entry")
            state, version, after = snapshot.state, snapshot.version, snapshot.ledger_seq
            snapshot_version = snapshot.version
    newest = None if newest_kept is None else newest_kept()
    if snapshot_version is not None and newest_kept is not None:
        claimed = -1 if kept is None else kept.seq
        if (newest is None and claimed != -1) or (
            newest is not None and newest.seq <= after + 1 and newest.seq != claimed
        ):
            shown = "none" if newest is None else f"entry {newest.seq}"
            raise StoreIntegrityError(
                f"the snapshot of {where} at version {snapshot_version} names "
                f"{'no kept entry' if claimed == -1 else f'ledger entry {claimed}'} as its kept "
                f"entry, but the ledger's newest kept entry of {where} is {shown}",
                hint="the snapshot was changed; replay without it (use_snapshot=False) and "
                "verify the store with `autonomic audit verify`",
            )
    replayed = 0
    last_seq = after
    for entry in store.ledger_entries(machine=machine, instance=instance, after_seq=after):
        _verify_stored_entry(entry, "ledger entry")
        if entry.kind == KEPT:
            kept = entry
            continue
        if entry.kind == "rejection":
            continue
        if (state or "") != entry.from_state:
            raise StoreIntegrityError(
                f"ledger entry {entry.seq} of {where} starts in "
                f"'{entry.from_state}' but the history so far ends in '{state or ''}'"
            )
        state = entry.to_state
        version += 1
        replayed += 1
        last_seq = entry.seq
    if state is None:
        raise UnknownInstance(machine, instance)
    if newest is not None and (kept is None or kept.seq < newest.seq):
        raise StoreIntegrityError(
            f"the ledger's newest kept entry of {where} is entry {newest.seq}, which the "
            f"replayed entries do not show (they show {'none' if kept is None else kept.seq})",
            hint="the store answers two reads differently; verify it with `autonomic audit verify`",
        )
    data = store.get_instance_data(machine, instance)
    if kept is None and data is not None:
        raise StoreIntegrityError(
            f"the store holds kept data for {where} that no ledger entry commits to"
        )
    if kept is not None and (data is None or kept.payload_sha256 != kept_digest(data)):
        raise StoreIntegrityError(
            f"the kept data of {where} is not what ledger entry {kept.seq} commits to"
        )
    return ReplayedState(
        machine, instance, state, version, last_seq, snapshot_version, replayed, data
    )


def _entry_at(store: Store, instance: str, seq: int) -> LedgerEntry | None:
    """Entry `seq` of the ledger chain holding `instance`'s entries."""
    if isinstance(store, PartitionedStore):
        return store.ledger_entry(seq, partition=store.partition_of(instance))
    return store.ledger_entry(seq)


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
