"""Verifying an SQLite ledger in seq ranges, in parallel processes, joined at the boundaries.

Each range is verified in a process of its own by the same code that verifies a whole ledger
(`ledger.verify_batches` with a `Span`), reading its own rows in its own read transaction
(through apsw, a faster binding: see `_verify_range` for why that is safe in a worker), and
tallying its instances for the instance audit (instance_tally.py: the merge of the ranges'
tallies checks each instance's continuity across the boundaries).
What crosses a boundary is checked by the join, in seq order:

- the hash chain: range k+1's first prev_hash is the hash of range k's last entry;
- the key chain: the join reads the control entries (genesis, rotations, retirements) first.
  Every range replays those before its start into its key chain, checking each one's hash
  and signature against the chain as it stands, and fails unless the control entries within
  it are exactly the ones it was given, so every range's keys are the keys the entries before
  it establish. An entry signed by a key an earlier range retired fails in its own range;
- the Merkle tree: ranges start at multiples of a power of two P and are at most P long, so
  the tree of a prefix ending inside range k is the frontier of the ranges before it followed
  by range k's own subtrees. Each range reports, per checkpoint, the root of its own leaves
  up to that size; the join folds the frontier before the range into it and compares the
  signed root;
- the checkpoint chain: range k's first checkpoint links to the digest of the last checkpoint
  before it; and coverage: unsigned entries after the last checkpoint of a range must be
  covered by a checkpoint of a later range.

Every stored row is read by exactly one range (the first also reads seq < 0 and sizes <= 0,
the last everything above its start), so nothing is skipped. The file is not trusted to be
consistent with itself: ranges are used only on tables keyed by their rowid as the runtime
creates them, every read goes through the table and never an index (which may leave rows out),
and the ranges must have verified as many entries and checkpoints as a count over every page
of each table finds (a page linked twice, or a forged page the seeks pass by, shows there).
Whenever the ranges do not accept
the ledger (any range fails, a boundary does not join, the store is laid out unexpectedly),
the sequential verifier verifies it from the start and its report is the answer: the verdict
and the diagnostic of a failure are the sequential ones by construction, and a ledger the
ranges accept is one every check of the sequential verifier passes. The workers read
snapshots of their own, so their answer is taken only when they verified what the caller's
snapshot holds (the same counts, last entry and last checkpoint): what the caller reads from
it afterwards is then what was verified. Small ledgers are verified in this process: starting
workers would cost more than it saves.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import apsw

from .instance_tally import InstanceTallies
from .keychain import CONTROL_KINDS, RootOfTrust
from .ledger import GENESIS_HASH, LEDGER_COLUMNS, Checkpoint, LedgerMode, RootLike
from .ledger_io import (
    TABLE_ONLY,
    LedgerSource,
    checkpoint_from_row,
    checkpoint_query,
    entry_query,
    read_ledger,
)
from .processes import available_cpus, map_in_processes
from .store.sqlite_schema import schema_problem
from .verify import MalformedRecord, Span, VerifyReport, verify_batches

__all__ = ["PARALLEL_MIN_ENTRIES", "verify_in_ranges", "verify_ledger", "verify_source"]

# Below this many entries one process verifies: forking workers and joining them costs tens
# of milliseconds, about what 30,000 entries take.
PARALLEL_MIN_ENTRIES = 1 << 16
# Ranges per process: more than one, so a process slowed by the neighbours does less of it.
_RANGES_PER_PROCESS = 4
# Control entries every range is given; a ledger holds a handful (one per key rotation). A
# store that claims more goes to the sequential verifier, whose memory does not grow with them.
_MAX_CONTROL_ENTRIES = 1 << 12
# The tables the ranges read, each with the key they seek by.
_TABLES = (("ledger", "seq"), ("ledger_checkpoints", "size"))


@dataclass(frozen=True, slots=True)
class _Task:
    path: str
    root: RootOfTrust
    mode: LedgerMode | None
    control: dict[int, tuple[Any, ...]]
    start: int
    end: int | None
    external: Checkpoint | None
    label: str
    tally_limit: int | None  # tally per instance, up to this many (None: no tallies)


def verify_ledger(
    path: str | os.PathLike[str],
    root: RootLike,
    *,
    external_checkpoint: Checkpoint | None = None,
    external_label: str = "external checkpoint",
    processes: int | None = None,
    range_size: int | None = None,
    min_entries: int = PARALLEL_MIN_ENTRIES,
    meanwhile: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Verify a stored ledger file (SQLite store or JSON Lines export) from its pinned root:
    a large SQLite ledger in seq ranges in parallel processes when they accept it (see
    verify_in_ranges), anything else in this process; the report is the sequential
    verifier's either way. `meanwhile(count)`, when the ledger is verified in ranges, runs in
    this process while the workers verify its `count` entries: work that needs the ledger's
    size but not yet its verdict."""
    with read_ledger(path) as source:
        return verify_source(
            source,
            root,
            external_checkpoint=external_checkpoint,
            external_label=external_label,
            processes=processes,
            range_size=range_size,
            min_entries=min_entries,
            meanwhile=meanwhile,
        )


def verify_source(
    source: LedgerSource,
    root: RootLike,
    *,
    external_checkpoint: Checkpoint | None = None,
    external_label: str = "external checkpoint",
    processes: int | None = None,
    range_size: int | None = None,
    min_entries: int = PARALLEL_MIN_ENTRIES,
    meanwhile: Callable[[int], object] | None = None,
    tallies: InstanceTallies | None = None,
) -> VerifyReport:
    """`verify_ledger` of an open ledger. Its read transaction stays open meanwhile, and what
    it holds is what was verified, so a caller may read from it afterwards (the newest
    checkpoint, say) what the report vouches for. `tallies`, when given, is filled with the
    per-instance tallies of a ledger that verifies (runtime/instance_tally.py)."""
    report = verify_in_ranges(
        source,
        root,
        external_checkpoint=external_checkpoint,
        external_label=external_label,
        processes=processes,
        range_size=range_size,
        min_entries=min_entries,
        meanwhile=meanwhile,
        tallies=tallies,
    )
    if report is not None:
        return report
    part = None if tallies is None else InstanceTallies(tallies.limit)
    report = source.verify(
        root, external_checkpoint=external_checkpoint, external_label=external_label, tallies=part
    )
    if report.ok and tallies is not None and part is not None:
        tallies.merge(part)
    return report


def verify_in_ranges(
    source: LedgerSource,
    root: RootLike,
    *,
    external_checkpoint: Checkpoint | None = None,
    external_label: str = "external checkpoint",
    processes: int | None = None,
    range_size: int | None = None,
    min_entries: int = PARALLEL_MIN_ENTRIES,
    meanwhile: Callable[[int], object] | None = None,
    tallies: InstanceTallies | None = None,
) -> VerifyReport | None:
    """The report of an open SQLite ledger of at least `min_entries` entries verified in
    ranges of `range_size` entries (a power of two; default: a few per process) in up to
    `processes` processes (default: one per CPU), if every range verifies, they join, and
    they verified what the source's own snapshot holds (as many entries and checkpoints,
    ending in its last entry and checkpoint); else None.

    Workers are forked, which is safe only while no other thread runs (one could hold a lock,
    SQLite's among them, that the child would then wait for forever): with other threads
    running, the ledger is verified in this process unless `processes` is given."""
    workers = processes or (available_cpus() if threading.active_count() == 1 else 1)
    if workers < 2 or source.connection is None or source.mode_problem is not None:
        return None
    plan = _plan(
        source,
        RootOfTrust.of(root),
        external_checkpoint,
        external_label,
        workers,
        range_size,
        min_entries,
        None if tallies is None else tallies.limit,
    )
    if plan is None:
        return None
    tasks, stored = plan
    try:
        during = None if meanwhile is None else partial(meanwhile, stored.entries)
        results = map_in_processes(_verify_range, tasks, workers, during)
        joined = _join(results)
    except (BrokenProcessPool, OSError):  # no worker could start, or one was killed
        return None
    # Every entry and checkpoint the file's tables hold was verified by a range: the ranges
    # reach their rows by seeking, a full scan by walking every page, and in a file whose pages
    # disagree with each other (a leaf linked twice, say) the two would read different rows.
    # The workers read snapshots of their own, so the source's last entry and checkpoint must
    # be the ones they verified.
    if joined is None or (joined.report.count, joined.report.checkpoints, joined.head) != (
        stored.entries,
        stored.checkpoints,
        stored.head,
    ):
        return None
    if joined.link != stored.link:
        return None
    if tallies is not None:
        # In seq order: the merge checks each instance's continuity across the boundaries.
        for span, _ in filter(None, results):
            tallies.merge(span.tallies)
    return joined.report


@dataclass(frozen=True, slots=True)
class _Stored:
    """What the source's snapshot holds: its numbers of entries and checkpoints (a count
    over every page of each table), the hash of its last entry and the digest of its last
    checkpoint (None when it has none)."""

    entries: int
    checkpoints: int
    head: bytes
    link: bytes | None


@dataclass(frozen=True, slots=True)
class _Joined:
    """The ranges joined: the report, the hash of the last entry and the digest of the last
    checkpoint they verified."""

    report: VerifyReport
    head: bytes
    link: bytes | None


def _plan(
    source: LedgerSource,
    root: RootOfTrust,
    external: Checkpoint | None,
    label: str,
    workers: int,
    range_size: int | None,
    min_entries: int,
    tally_limit: int | None,
) -> tuple[list[_Task], _Stored] | None:
    """The ranges to verify and how many entries and checkpoints the tables hold, or None when
    the ledger is small or not laid out as expected (then the sequential verifier reads it, and
    names what is wrong)."""
    connection = source.connection
    assert connection is not None
    try:
        if not all(_keyed_by_rowid(connection, *table) for table in _TABLES):
            return None
        # NULL sorts first and text and blobs last, so when the first and last keys are
        # integers every row's key is a number, and the ranges' bounds cover every row.
        first, last = (
            connection.execute(
                f"SELECT seq FROM ledger {TABLE_ONLY} ORDER BY seq {order} LIMIT 1"
            ).fetchone()
            for order in ("", "DESC")
        )
        if first is None or last is None or first[0] != 0 or type(last[0]) is not int:
            return None
        size = last[0] + 1
        if size < min_entries:
            return None
        sizes = [
            connection.execute(
                f"SELECT size FROM ledger_checkpoints {TABLE_ONLY} ORDER BY size {order} LIMIT 1"
            ).fetchone()
            for order in ("", "DESC")
        ]
        if any(row is not None and type(row[0]) is not int for row in sizes):
            return None
        if sizes[1] is not None and sizes[1][0] > size:
            return None  # a checkpoint beyond the end: the sequential verifier names it
        if external is not None and not 0 < external.size <= size:
            return None
        # The control entries, by the index the store keeps on (machine, instance, seq). The
        # ranges hold the stored entries to these, so a lying index only costs a second pass.
        rows = connection.execute(
            f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger "
            "WHERE machine = '' AND instance = '' ORDER BY seq"
        )
        control = {}
        for row in rows:
            if row[2] in CONTROL_KINDS:
                control[row[0]] = row
                if len(control) > _MAX_CONTROL_ENTRIES:
                    return None
        counts = [
            connection.execute(f"SELECT count(*) FROM {table} {TABLE_ONLY}").fetchone()[0]
            for table, _ in _TABLES
        ]
        head = connection.execute(
            f"SELECT entry_hash FROM ledger {TABLE_ONLY} WHERE seq = ?", (last[0],)
        ).fetchone()[0]
        newest = source.last_checkpoint()
    except sqlite3.Error:
        return None
    if type(head) is not bytes or isinstance(newest, MalformedRecord):
        return None
    link = None if newest is None else newest.digest()
    width = range_size or _range_width(size, workers)
    if width & (width - 1) or width >= size:
        return None
    starts = range(0, size, width)
    external_size = -1 if external is None else external.size
    tasks = [
        _Task(
            str(source.path),
            root,
            source.mode,
            control,
            start,
            start + width if start + width < size else None,
            external if start < external_size <= start + width else None,
            label,
            tally_limit,
        )
        for start in starts
    ]
    return tasks, _Stored(counts[0], counts[1], head, link)


def _keyed_by_rowid(connection: sqlite3.Connection, table: str, key: str) -> bool:
    """Whether `key` is the only primary key column of `table` and an alias of its rowid, as
    the runtime creates it: the ranges then seek the table's own b-tree by key."""
    columns = connection.execute(f"PRAGMA table_info({table})").fetchall()
    keys = [(name, kind) for _, name, kind, _, _, pk in columns if pk]
    # INTEGER PRIMARY KEY is a rowid alias unless the key is DESC or the table WITHOUT ROWID;
    # both of those give the key an index of its own, listed with origin 'pk'.
    own_index = any(row[3] == "pk" for row in connection.execute(f"PRAGMA index_list({table})"))
    return keys == [(key, "INTEGER")] and not own_index


def _range_width(size: int, workers: int) -> int:
    """The smallest power of two that cuts `size` entries into at most RANGES_PER_PROCESS
    ranges per process."""
    ranges = workers * _RANGES_PER_PROCESS
    return 1 << max(0, (-(-size // ranges) - 1).bit_length())


def _verify_range(
    task: _Task, reader: Literal["apsw", "sqlite3"] = "apsw"
) -> tuple[Span, VerifyReport] | None:
    """One range, in a process of its own; None when it does not verify.

    It reads its rows through apsw, whose rows cost half of sqlite3's (0.85 us against 1.6).
    A second SQLite library is safe here, and only here: POSIX locks belong to a process, and
    closing any descriptor of a file drops all of them, so a process whose sqlite3 connection
    holds a file must never open it through another library. A worker is a forked process
    that uses none of its parent's connections: apsw is the only library holding the file in
    it. It reads what sqlite3 reads: the same statements (the tables themselves, sought by
    rowid), after the same schema check in its own read transaction, with text decoded as
    strictly (invalid UTF-8 raises); apsw's SQLite is another release than sqlite3's, so it
    checks every page's cells as it loads them (a damaged page is refused, not read). Any
    error refuses the range, and the sequential verifier, through sqlite3, answers. `reader`
    "sqlite3" reads the range as the sequential verifier does (tests hold the two to the same
    answers on crafted files)."""
    uri = Path(task.path).resolve().as_uri() + "?mode=ro"
    try:
        if reader == "apsw":
            flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
            connection: Any = apsw.Connection(uri, flags=flags)
        else:
            connection = sqlite3.connect(uri, uri=True, isolation_level=None)
    except (apsw.Error, sqlite3.Error):
        return None
    try:
        if reader == "apsw":
            connection.execute("PRAGMA cell_size_check = ON")
        connection.execute("BEGIN")
        if schema_problem(connection.execute) is not None:
            return None
        span = Span(task.start, task.end, task.control)
        if task.tally_limit is not None:
            span.tallies = InstanceTallies(task.tally_limit)
        low = task.start or None  # the first range also reads what sorts before seq 0
        report = verify_batches(
            (connection.execute(*entry_query(low, task.end)),),
            task.root,
            checkpoints=map(
                checkpoint_from_row, connection.execute(*checkpoint_query(low, task.end))
            ),
            external_checkpoint=task.external,
            mode=task.mode,
            external_label=task.label,
            span=span,
            tallies=span.tallies,
        )
    except Exception:
        return None
    finally:
        connection.close()
    if not report.ok:
        return None
    span.control = {}  # the join has them; no need to send them back
    return span, report


def _join(results: Sequence[tuple[Span, VerifyReport] | None]) -> _Joined | None:
    """One report for the whole ledger from its ranges in seq order, or None when a range
    failed or a boundary does not join."""
    head, link = GENESIS_HASH, GENESIS_HASH
    last_link: bytes | None = None
    nodes: list[bytes] = []  # the Merkle frontier of the ranges joined so far
    size = 0
    uncovered = False
    checkpoints = 0
    report: VerifyReport | None = None
    for result in results:
        if result is None:
            return None
        span, report = result
        if span.start != size or span.end is None:
            return None
        if span.start and span.first_prev != head:
            return None
        aligned = span.start & -span.start  # how far the frontier before the range reaches
        for at, signed, own in span.roots:
            if at - span.start > aligned or _fold(nodes, own) != signed:
                return None
        if span.first_link is not None and span.first_link != link:
            return None
        if span.last_link is not None:
            link = last_link = span.last_link
        uncovered = span.uncovered if span.settled else uncovered or span.uncovered
        checkpoints += report.checkpoints
        head = span.last_hash
        if span.start and span.end - span.start > aligned:
            return None
        if not _append(nodes, span.start, span.frontier, span.end - span.start):
            return None
        size = span.end
    if report is None or uncovered:
        return None
    report = VerifyReport(size, True, None, None, None, checkpoints, report.mode, report.keys)
    return _Joined(report, head, last_link)


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _fold(nodes: Sequence[bytes], node: bytes) -> bytes:
    """The root of the tree whose frontier is `nodes` followed by the subtree root `node`."""
    for left in reversed(nodes):
        node = _node(left, node)
    return node


def _append(nodes: list[bytes], size: int, subtrees: Sequence[bytes], count: int) -> bool:
    """Append a range's frontier (its perfect subtrees, `count` leaves in all, largest first)
    to the frontier `nodes` of `size` leaves, merging equal widths; False if it cannot be."""
    widths = [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]
    if len(widths) != len(subtrees):
        return False
    for width, node in zip(widths, subtrees, strict=True):
        size += width
        bits = size // width
        while not bits & 1:
            node = _node(nodes.pop(), node)
            bits >>= 1
        nodes.append(node)
    return True
