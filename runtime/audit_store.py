"""Auditing a PostgreSQL store offline: every ledger partition verified in parallel processes,
then every signed root; one partition exported; one instance's history.

Nothing read is trusted: each partition goes through the same streaming verification as a
single-chain ledger (`ledger.verify_entries`) plus the check that each entry belongs to the
partition it is stored in, and each root is checked against the verified chains
(`partitions.check_roots`); then every instance's row and kept data is held to the verified
ledger (runtime/instance_audit.py). The store is opened with `create=False`, so auditing never
initialises a database.
"""

from __future__ import annotations

from collections.abc import Iterator

from .instance_audit import InstanceAudit, audit_postgres_instances
from .keychain import RootOfTrust
from .ledger import Checkpoint, LedgerEntry, LedgerMode, RootLike, VerifyReport
from .partitions import check_roots, combine, verify_partition
from .processes import available_cpus, map_in_processes
from .store.postgres import PostgresStore

__all__ = ["history", "open_audited", "partition_ledger", "verify_store_url", "verify_url"]


def open_audited(url: str) -> PostgresStore:
    """The store at `url` for reading; StoreConfigError if there is none (nothing is made)."""
    return PostgresStore(url, create=False, pool_size=2)


def _verify_one(task: tuple[str, int, RootOfTrust, LedgerMode | None]) -> VerifyReport:
    url, partition, root, mode = task
    with open_audited(url) as store:
        return verify_partition(store, partition, root, mode)


def verify_url(url: str, root: RootLike, *, workers: int | None = None) -> VerifyReport:
    """Verify every partition of the store at `url` (in up to `workers` processes, default one
    per CPU) and every signed root, from the pinned `root`; one report for the whole ledger."""
    return verify_store_url(url, root, workers=workers, instances=False)[0]


def verify_store_url(
    url: str, root: RootLike, *, workers: int | None = None, instances: bool = True
) -> tuple[VerifyReport, InstanceAudit | None]:
    """`verify_url`, then (if the ledger verified and `instances`) every instance's row and
    kept data against it (runtime/instance_audit.py)."""
    pinned = RootOfTrust.of(root)
    with open_audited(url) as store:
        mode = store.ledger_mode()
        partitions = store.partitions
        processes = min(partitions, workers or available_cpus())
        if processes <= 1:
            reports = [verify_partition(store, p, pinned, mode) for p in range(partitions)]
            return _finish(store, reports, pinned, instances)
    # Each process opens its own connection; this one holds no pool while they fork.
    tasks = [(url, p, pinned, mode) for p in range(partitions)]
    reports = map_in_processes(_verify_one, tasks, processes)
    with open_audited(url) as store:
        return _finish(store, reports, pinned, instances)


def _finish(
    store: PostgresStore, reports: list[VerifyReport], root: RootOfTrust, instances: bool
) -> tuple[VerifyReport, InstanceAudit | None]:
    report = combine(reports, *check_roots(store, reports, root))
    if not report.ok or not instances:
        return report, None
    return report, audit_postgres_instances(store, [r.count for r in reports])


def partition_ledger(
    store: PostgresStore, partition: int
) -> tuple[Iterator[LedgerEntry], list[Checkpoint]]:
    """One partition's entries and checkpoints: a single-chain ledger, exportable as one."""
    return store.ledger_entries(partition=partition), store.checkpoints(partition=partition)


def history(store: PostgresStore, instance: str) -> list[LedgerEntry]:
    """Every entry of one instance (of any machine), in its partition's order."""
    return list(store.ledger_entries(instance=instance))
