"""`audit verify` of a SQLite store in parallel: seq ranges verified in worker processes and
joined at their boundaries, each process streaming its rows (memory stays flat).

Range k verifies the entries with seq in [a_k, a_k+1) by the same single pass as the whole
ledger (`ledger.verify_range`), starting on the stored hash of entry a_k - 1 (which range
k - 1 verifies), with the checkpoints whose size falls in (a_k, a_k+1]. The first range also
reads any seq below 0, the last any seq past the end. `ledger.finish_ranges` joins them: each
range must end where the next begins, on the hash the next one started from, and the tail
must be covered by a signed checkpoint. When anything fails, the ledger is verified again in
one pass, so a failure is reported exactly as that pass reports it (first bad seq, reason).
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor

from .keys import Keyring
from .ledger import (
    Checkpoint,
    LedgerMode,
    LedgerSource,
    RangeResult,
    VerifyReport,
    finish_ranges,
    verify_range,
)

__all__ = ["PARALLEL_FROM", "verify_source"]

PARALLEL_FROM = 200_000  # entries; below this one process is done before others start


def verify_source(
    source: LedgerSource,
    keyring: Keyring,
    *,
    external_checkpoint: Checkpoint | None = None,
    processes: int | None = None,
    parallel_from: int = PARALLEL_FROM,
) -> VerifyReport:
    """Verify an opened ledger: a SQLite one of `parallel_from` entries or more in ranges on
    every CPU (at most 8), others in one pass (also when an external checkpoint is given)."""
    workers = min(processes or len(os.sched_getaffinity(0)), 8)
    connection = source._connection
    forks = "fork" in multiprocessing.get_all_start_methods()
    if connection is None or external_checkpoint is not None or workers < 2 or not forks:
        return source.verify(keyring, external_checkpoint=external_checkpoint)
    try:
        count, last = connection.execute("SELECT count(*), max(seq) FROM ledger").fetchone()
    except sqlite3.Error:
        count, last = 0, None
    if source.mode_problem is not None or count < parallel_from or not isinstance(last, int):
        return source.verify(keyring)
    bounds = [(last + 1) * k // workers for k in range(workers)]
    ends: list[int | None] = [*bounds[1:], None]
    path = source.path.resolve().as_uri() + "?mode=ro"
    # Forked workers inherit the keyring (its keys cannot be pickled).
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_inherit, initargs=(keyring,)
    ) as pool:
        results = list(
            pool.map(_verify_range, [path] * workers, [source.mode] * workers, bounds, ends)
        )
    joined = finish_ranges(results)
    return joined if joined is not None else source.verify(keyring)


_inherited: list[Keyring] = []


def _inherit(keyring: Keyring) -> None:
    _inherited.append(keyring)


def _verify_range(uri: str, mode: LedgerMode | None, first: int, end: int | None) -> RangeResult:
    connection = sqlite3.connect(uri, uri=True)
    try:
        return verify_range(connection, _inherited[0], mode, first, end)
    finally:
        connection.close()
