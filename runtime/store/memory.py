"""The in-memory store: plain dicts and lists, for tests, simulations and benchmarks.

Nothing survives the process. A unit of work here cannot be rolled back, so the runtime does
all its checks (payload, version, table, guards, actions, sealing) before its first write, and
the writes themselves cannot fail. Dispatch reads `records(machine)` directly: the dict it
returns is the store's own.

Threads: the store is safe to share, and costs a single thread no lock. The first thread to
enter it owns it and enters without the lock; the first other thread to enter revokes that
(`mine` and `owner` cleared for good), waits until the owner is out, and from then on every
thread takes the lock. The owner is out when it is counted in no `enter` (`busy`) and runs no
code registered with `run_unlocked` (dispatch's short path, which asks `mine()` first, true
in the owner's thread only, and costs nothing more): none is on its stack, or code
registered with `leaves_unlocked` is above it (dispatch's ways to the lock: a former owner
waiting there, or for a claim held by the thread that revoked it, is out; waiting for it
would never end). Under the GIL the other thread sees the owner's stack as it stands between
two bytecodes, and each read and write of `mine`, `owner` and `busy` is atomic and in program
order: either the owner sees the revocation before it goes in, or the other thread sees it
inside and waits (the flag protocol of Dekker's algorithm).
"""

from __future__ import annotations

import _thread
import heapq
import sys
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import CodeType, MappingProxyType
from typing import TypeVar

from ..errors import ConcurrentUpdateDetected, InstanceExists
from ..ledger import KEPT, Checkpoint, LedgerEntry, LedgerMode
from ..resilience.backoff import RETRY_LATER_CAP_MS
from ..timers import ArmedTimer
from .base import (
    FLOW_FINISHED,
    BreakerRecord,
    ClaimKey,
    DeadlineRecord,
    FlowRecord,
    InstanceRecord,
    OutboxKind,
    OutboxMessage,
    OutboxRow,
    OutboxStatus,
    Snapshot,
    Transaction,
    WorkOutcome,
    outbox_row,
    processed_then_instance,
)

__all__ = ["MemoryStore"]

T = TypeVar("T")

_NO_RECORDS: Mapping[str, InstanceRecord] = MappingProxyType({})
# A due-order key: (due_ms, arming order); the arming order breaks ties like SQLite's rowid.
_TimerKey = tuple[int, int]


class MemoryStore:
    """Everything in dicts; `run` holds the store for the whole batch (see the module
    docstring for how threads share it). `thread_safe=False` never takes the lock, for one
    thread at a time only; it saves nothing over the default for a single thread."""

    def __init__(self, *, thread_safe: bool = True) -> None:
        self.thread_safe = thread_safe
        self.lock = threading.RLock()
        self.owner: int | None = None  # the thread that enters without the lock, if any
        # True in the owner's thread, False in every other (and once revoked): the owner holds
        # a lock of its own for good, and `mine` is that lock's `_is_owned` (a C call that
        # allocates nothing, unlike comparing `get_ident()` with `owner`); `bool` when no
        # thread owns the store. Dispatch's short path asks it first.
        self.mine: Callable[[], bool] = bool
        self.busy = 0  # how deep the owner is inside (an action may enter it again)
        self._shared = False  # a second thread came: every thread locks from then on
        self._former: int | None = None  # the owner before that
        self._unlocked: set[CodeType] = set()
        self._leaving: set[CodeType] = set()
        self._records: dict[str, dict[str, InstanceRecord]] = {}
        # The ledger, live: dispatch's fast path appends to it under the lock.
        self.ledger_list: list[LedgerEntry] = []
        self._checkpoints: list[Checkpoint] = []
        self._mode: LedgerMode | None = None
        self._processed: dict[tuple[str, str], tuple[str, int]] = {}
        self._idempotency: dict[tuple[str, str], tuple[bytes, str, int]] = {}
        # Armed timers by (machine, instance) -> timer_id -> (order key, timer); `_due` is a
        # heap of the same with stale items (cancelled, fired) skipped and pruned lazily.
        self._timers: dict[tuple[str, str], dict[str, tuple[_TimerKey, ArmedTimer]]] = {}
        # By (machine, instance, timer id, armed version): attempts, retry time, error.
        self._timer_retries: dict[tuple[str, str, str, int], tuple[int, int, str]] = {}
        self._due: list[tuple[_TimerKey, ArmedTimer]] = []
        self._live_timers = 0
        self._arming = 0
        self._outbox: list[OutboxMessage] = []
        self._outbox_ids: set[str] = set()
        self._outbox_by_id: dict[str, int] = {}  # event id -> index in _outbox
        self._snapshots: dict[tuple[str, str], Snapshot] = {}
        self._flows: dict[str, FlowRecord] = {}
        self._breakers: dict[tuple[str, str], BreakerRecord] = {}
        self._data: dict[tuple[str, str], str] = {}
        self._deadlines: dict[str, DeadlineRecord] = {}
        # Outside-call claims: key -> (holder, lease end on the monotonic clock). A lock of
        # their own: claims are taken beside units of work, not inside them.
        self._claims: dict[ClaimKey, tuple[str, float]] = {}
        self._claims_lock = threading.Lock()

    # -- entering: see the module docstring ---------------------------------------------------

    def enter(self) -> bool:
        """Enter the store; True if entered as its owner (without the lock). Pair each call
        with `leave(its value)`."""
        me = threading.get_ident()
        while True:
            owner = self.owner
            if not self.thread_safe:
                if owner is None:
                    self._own(me)
                self.busy += 1
                return True
            if owner == me:
                self.busy += 1
                if self.owner == owner:  # not revoked meanwhile
                    return True
                self.busy -= 1
                continue
            if owner is None and not self._shared:
                with self.lock:
                    if self.owner is None and not self._shared:
                        self._own(me)
                continue
            if owner is not None:
                self.mine = bool  # first: the owner's short path is closed from here on
                self.owner = None
                self._former = owner
                self._shared = True
            former = self._former
            while me != former and (self.busy or self._runs_unlocked(former)):
                time.sleep(0)  # let the former owner finish what it is doing inside
            self.lock.acquire()
            return False

    def _own(self, me: int) -> None:
        """`me` (this thread) owns the store from now on, until another thread comes."""
        marker = _thread.RLock()
        marker.acquire()  # held for good: `_is_owned` is then true in this thread only
        self.owner = me
        self.mine = marker._is_owned  # type: ignore[attr-defined]  # C RLock's, as Condition uses

    def run_unlocked(self, code: CodeType) -> None:
        """Register code that the owner runs inside the store without `enter` (it must
        check `owner` against its thread first, and touch nothing when it is not the owner)."""
        self._unlocked.add(code)

    def leaves_unlocked(self, code: CodeType) -> None:
        """Register code that registered code calls to leave it: from there on the thread
        touches the store only through `enter` (it may wait there, or for a claim another
        thread holds while it enters: waiting for such a thread would never end)."""
        self._leaving.add(code)

    def _runs_unlocked(self, thread: int | None) -> bool:
        """Whether `thread` is inside code registered with `run_unlocked`: its most recent
        frame of registered code is not below one of code that left it."""
        frame = sys._current_frames().get(thread) if thread is not None else None
        while frame is not None:
            code = frame.f_code
            if code in self._leaving:
                return False
            if code in self._unlocked:
                return True
            frame = frame.f_back
        return False

    def leave(self, owned: bool) -> None:
        if owned:
            self.busy -= 1
        else:
            self.lock.release()

    @contextmanager
    def entered(self) -> Generator[None, None, None]:
        owned = self.enter()
        try:
            yield
        finally:
            self.leave(owned)

    # -- dispatch reads the records directly ---------------------------------------------------

    def records(self, machine: str) -> dict[str, InstanceRecord]:
        """The live dict of one machine's instances (the fast path mutates records in it)."""
        return self._records.setdefault(machine, {})

    # -- Store -------------------------------------------------------------------------------

    def run(
        self,
        works: Sequence[Callable[[Transaction], T]],
        before_commit: Callable[[Transaction], None] | None = None,
    ) -> list[WorkOutcome[T]]:
        outcomes: list[WorkOutcome[T]] = []
        with self.entered():
            for work in works:
                try:
                    outcomes.append(WorkOutcome(work(self), None))
                except Exception as exc:
                    outcomes.append(WorkOutcome(None, exc))
            if before_commit is not None:
                before_commit(self)
        return outcomes

    def seal_rows(self, key: bytes | None, *, adopt: bool = False) -> None:
        """Nothing: the rows live in this process, which nothing else writes."""

    def reseal_rows(self, key: bytes) -> None:
        """Nothing: see seal_rows."""

    def ledger_mode(self) -> LedgerMode | None:
        return self._mode

    def set_ledger_mode(self, mode: LedgerMode) -> None:
        self._mode = mode

    def get_instance(self, machine: str, instance: str) -> InstanceRecord | None:
        record = self._records.get(machine, {}).get(instance)
        if record is None:
            return None
        return InstanceRecord(record.machine, record.instance, record.state, record.version)

    def instances(self, machine: str) -> list[InstanceRecord]:
        with self.entered():
            return [
                InstanceRecord(r.machine, r.instance, r.state, r.version)
                for r in self._records.get(machine, {}).values()
            ]

    def ledger_entries(
        self, *, machine: str | None = None, instance: str | None = None, after_seq: int = -1
    ) -> Iterator[LedgerEntry]:
        with self.entered():
            entries = self.ledger_list[max(after_seq + 1, 0) :]
        for entry in entries:
            if machine is not None and entry.machine != machine:
                continue
            if instance is not None and entry.instance != instance:
                continue
            yield entry

    def ledger_entry(self, seq: int) -> LedgerEntry | None:
        if 0 <= seq < len(self.ledger_list):
            return self.ledger_list[seq]
        return None

    def checkpoints(self) -> list[Checkpoint]:
        return list(self._checkpoints)

    def latest_snapshot(self, machine: str, instance: str) -> Snapshot | None:
        return self._snapshots.get((machine, instance))

    def armed_timers(
        self, machine: str | None = None, instance: str | None = None
    ) -> list[ArmedTimer]:
        with self.entered():
            found = [
                item
                for (m, i), per_instance in self._timers.items()
                if (machine is None or m == machine) and (instance is None or i == instance)
                for item in per_instance.values()
            ]
        return [timer for _, timer in sorted(found, key=lambda item: item[0])]

    def due_timers(self, now_ms: int, machines: Sequence[str], limit: int) -> list[ArmedTimer]:
        wanted = set(machines)
        found: list[ArmedTimer] = []
        with self.entered():
            self._prune()
            for key, timer in heapq.nsmallest(len(self._due), self._due):
                if key[0] > now_ms or len(found) >= limit:
                    break
                if (
                    timer.machine in wanted
                    and self._is_live(key, timer)
                    and not self._retrying(timer, now_ms)
                ):
                    found.append(timer)
        return found

    def _retrying(self, timer: ArmedTimer, now_ms: int) -> bool:
        """Whether the timer's failed firing is tried again after `now_ms` (within the cap)."""
        retry = self._timer_retries.get(timer.arming())
        return retry is not None and now_ms < retry[1] <= now_ms + RETRY_LATER_CAP_MS

    def timer_retries(self) -> dict[tuple[str, str, str, int], int]:
        with self.entered():
            return {key: retry[1] for key, retry in self._timer_retries.items()}

    def timer_retry(self, timer: ArmedTimer) -> tuple[int, str] | None:
        retry = self._timer_retries.get(timer.arming())
        return None if retry is None else (retry[0], retry[2])

    def retry_timer(self, timer: ArmedTimer, attempts: int, retry_at_ms: int, error: str) -> None:
        self._timer_retries[timer.arming()] = (attempts, retry_at_ms, error)

    def forget_timer_retry(self, timer: ArmedTimer) -> None:
        self._timer_retries.pop(timer.arming(), None)

    def _is_live(self, key: _TimerKey, timer: ArmedTimer) -> bool:
        found = self._timers.get((timer.machine, timer.instance), {}).get(timer.timer_id)
        return found is not None and found[0] == key

    def _prune(self) -> None:
        due = self._due
        while due and not self._is_live(*due[0]):
            heapq.heappop(due)
        if len(due) > 2 * self._live_timers + 64:
            self._due = [item for item in due if self._is_live(*item)]
            heapq.heapify(self._due)

    def outbox(
        self,
        *,
        kind: OutboxKind | None = None,
        status: OutboxStatus | None = "pending",
        limit: int = 1000,
        due_ms: int | None = None,
    ) -> list[OutboxMessage]:
        with self.entered():
            chosen = [
                m
                for m in self._outbox
                if (kind is None or m.kind == kind) and (status is None or m.status == status)
            ]
            if due_ms is not None:
                # Held back: a message waiting for a retry after `due_ms`, and every later
                # pending one to the same target instance.
                waiting = [
                    m
                    for m in self._outbox
                    if m.status == "pending"
                    and m.retry_at_ms is not None
                    and due_ms < m.retry_at_ms <= due_ms + RETRY_LATER_CAP_MS
                ]
                first: dict[tuple[str, str], int] = {}
                for m in waiting:
                    first.setdefault((m.target_machine, m.target_instance), m.id or 0)
                chosen = [
                    m
                    for m in chosen
                    if (m.id or 0)
                    < first.get((m.target_machine, m.target_instance), (m.id or 0) + 1)
                ]
        return chosen[:limit]

    def get_flow(self, flow_id: str) -> FlowRecord | None:
        with self.lock:
            return self._flows.get(flow_id)

    def unfinished_flows(self, limit: int = 1000) -> list[FlowRecord]:
        with self.lock:
            open_ = [r for r in self._flows.values() if r.status not in FLOW_FINISHED]
        return sorted(open_, key=lambda r: (r.updated_ms, r.flow_id))[:limit]

    def get_breaker(self, machine: str, name: str) -> BreakerRecord | None:
        with self.lock:
            return self._breakers.get((machine, name))

    def get_instance_data(self, machine: str, instance: str) -> str | None:
        with self.lock:
            return self._data.get((machine, instance))

    def deadlines(self) -> list[DeadlineRecord]:
        with self.lock:
            return sorted(self._deadlines.values(), key=lambda d: (d.due_ms, d.id))

    def earliest_deadline(self, prefix: str, governors: Sequence[str]) -> int | None:
        with self.lock:
            return min(
                (
                    d.due_ms
                    for d in self._deadlines.values()
                    if d.id.startswith(prefix) and d.governor in governors
                ),
                default=None,
            )

    def claim_outside(self, keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        now = time.monotonic()
        with self._claims_lock:
            claims = self._claims
            for key in keys:
                held = claims.get(key)
                if held is not None and held[0] != holder and held[1] > now:
                    return False
            until = now + lease_ms / 1000
            for key in keys:
                claims[key] = (holder, until)
        return True

    def renew_outside(self, keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        until = time.monotonic() + lease_ms / 1000
        kept = True
        with self._claims_lock:
            claims = self._claims
            for key in keys:
                held = claims.get(key)
                if held is None or held[0] != holder:
                    kept = False
                else:
                    claims[key] = (holder, until)
        return kept

    def release_outside(self, keys: Sequence[ClaimKey], holder: str) -> None:
        with self._claims_lock:
            for key in keys:
                held = self._claims.get(key)
                if held is not None and held[0] == holder:
                    del self._claims[key]

    def close(self) -> None:
        """Nothing to release."""

    # -- Transaction (the store is its own transaction, under its lock) ----------------------

    def instance(self, machine: str, instance: str) -> InstanceRecord | None:
        # The live record (no copy): dispatch reads it and writes through
        # update_instance only.
        return self._records.get(machine, _NO_RECORDS).get(instance)

    def insert_instance(self, record: InstanceRecord) -> None:
        records = self.records(record.machine)
        if record.instance in records:
            raise InstanceExists(record.machine, record.instance)
        records[record.instance] = InstanceRecord(
            record.machine, record.instance, record.state, record.version
        )

    def update_instance(
        self, machine: str, instance: str, state: str, version: int, expected_version: int
    ) -> None:
        current = self._records.get(machine, _NO_RECORDS).get(instance)
        if current is None or current.version != expected_version:
            actual = -1 if current is None else current.version
            raise ConcurrentUpdateDetected(machine, instance, expected_version, actual)
        current.state = state
        current.version = version

    def ledger_head(self) -> LedgerEntry | None:
        return self.ledger_list[-1] if self.ledger_list else None

    def last_checkpoint(self) -> Checkpoint | None:
        return self._checkpoints[-1] if self._checkpoints else None

    def append_ledger(self, entry: LedgerEntry) -> None:
        if entry.seq != len(self.ledger_list):
            raise ValueError(
                f"ledger entry {entry.seq} does not extend a ledger of {len(self.ledger_list)}"
            )
        self.ledger_list.append(entry)

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        if self._checkpoints and self._checkpoints[-1].size >= checkpoint.size:
            raise ValueError(f"checkpoint at size {checkpoint.size} does not advance")
        self._checkpoints.append(checkpoint)

    def processed(self, machine: str, event_id: str) -> str | None:
        found = self._processed.get((machine, event_id))
        return None if found is None else found[0]

    def processed_and_instance(
        self, machine: str, event_id: str, instance: str
    ) -> tuple[str | None, InstanceRecord | None]:
        return processed_then_instance(self.processed, self.instance, machine, event_id, instance)

    def get_processed_and_instance(
        self, machine: str, event_id: str, instance: str
    ) -> tuple[str | None, InstanceRecord | None]:
        return processed_then_instance(
            self.processed, self.get_instance, machine, event_id, instance
        )

    def record_processed(
        self, machine: str, event_id: str, instance: str, result: str, now_ms: int
    ) -> None:
        self._processed[(machine, event_id)] = (result, now_ms)

    def idempotency(self, machine: str, key: str) -> tuple[bytes, str] | None:
        found = self._idempotency.get((machine, key))
        return None if found is None else (found[0], found[1])

    def record_idempotency(
        self, machine: str, key: str, request_digest: bytes, result: str, now_ms: int
    ) -> None:
        self._idempotency[(machine, key)] = (request_digest, result, now_ms)

    def cancel_timers(
        self, machine: str, instance: str, keep: Collection[str] = frozenset()
    ) -> None:
        if not keep:
            armed = self._timers.pop((machine, instance), None)
            if armed:
                self._live_timers -= len(armed)
            return
        per_instance = self._timers.get((machine, instance))
        if not per_instance:
            return
        for timer_id in [t for t in per_instance if t not in keep]:
            del per_instance[timer_id]
            self._live_timers -= 1
        if not per_instance:
            del self._timers[(machine, instance)]

    def arm_timers(self, timers: Sequence[ArmedTimer]) -> None:
        for timer in timers:
            self._arming += 1
            key = (timer.due_ms, self._arming)
            per_instance = self._timers.setdefault((timer.machine, timer.instance), {})
            if timer.timer_id not in per_instance:
                self._live_timers += 1
            per_instance[timer.timer_id] = (key, timer)
            heapq.heappush(self._due, (key, timer))

    def timer_armed(self, timer: ArmedTimer) -> bool:
        found = self._timers.get((timer.machine, timer.instance), {}).get(timer.timer_id)
        return found is not None and found[1] == timer

    def take_timer(self, timer: ArmedTimer) -> bool:
        per_instance = self._timers.get((timer.machine, timer.instance))
        if not per_instance:
            return False
        found = per_instance.get(timer.timer_id)
        if found is None or found[1] != timer:
            return False
        del per_instance[timer.timer_id]
        if not per_instance:
            del self._timers[(timer.machine, timer.instance)]
        self._live_timers -= 1
        return True

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        self.add_outbox_rows([outbox_row(m) for m in messages])

    def add_outbox_rows(self, rows: Sequence[OutboxRow]) -> None:
        for row in rows:
            event_id = row[7]
            if event_id in self._outbox_ids:
                raise ValueError(f"outbox already holds event id {event_id}")
            self._outbox_ids.add(event_id)
            self._outbox.append(OutboxMessage(len(self._outbox) + 1, *row))
            self._outbox_by_id[event_id] = len(self._outbox) - 1

    def outbox_message(self, event_id: str) -> OutboxMessage | None:
        index = self._outbox_by_id.get(event_id)
        return None if index is None else self._outbox[index]

    def mark_outbox(self, message_id: int, status: OutboxStatus, error: str | None) -> None:
        index = message_id - 1
        old = self._outbox[index]
        self._outbox[index] = OutboxMessage(
            old.id,
            old.kind,
            old.machine,
            old.instance,
            old.version,
            old.target_machine,
            old.target_instance,
            old.event,
            old.event_id,
            old.body,
            old.created_ms,
            status,
            error,
        )

    def holds_outside(self, keys: Sequence[ClaimKey], holder: str) -> bool:
        # Inside the store's lock: a claimer that took a key over would next look whether the
        # result is committed, which waits for this unit of work.
        with self._claims_lock:
            claims = self._claims
            return all(claims.get(key, ("",))[0] == holder for key in keys)

    def retry_outbox(self, message_id: int, attempts: int, retry_at_ms: int, error: str) -> None:
        index = message_id - 1
        self._outbox[index] = replace(
            self._outbox[index], error=error, attempts=attempts, retry_at_ms=retry_at_ms
        )

    def forget_outbox_retry(self, message_id: int) -> None:
        index = message_id - 1
        self._outbox[index] = replace(self._outbox[index], attempts=0, retry_at_ms=None)

    def set_outbox_body(self, message_id: int, body: str) -> None:
        index = message_id - 1
        self._outbox[index] = replace(self._outbox[index], body=body)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshots[(snapshot.machine, snapshot.instance)] = snapshot

    def purge_dedup(self, before_ms: int) -> tuple[int, int]:
        old_events = [k for k, (_, at) in self._processed.items() if at < before_ms]
        for key in old_events:
            del self._processed[key]
        old_keys = [k for k, (_, _, at) in self._idempotency.items() if at < before_ms]
        for key in old_keys:
            del self._idempotency[key]
        return len(old_events), len(old_keys)

    def flow(self, flow_id: str) -> FlowRecord | None:
        return self._flows.get(flow_id)

    def save_flow(self, record: FlowRecord, expected_version: int) -> None:
        stored = self._flows.get(record.flow_id)
        actual = 0 if stored is None else stored.version
        if actual != expected_version:
            raise ConcurrentUpdateDetected(record.flow, record.flow_id, expected_version, actual)
        self._flows[record.flow_id] = record

    def save_breaker(self, record: BreakerRecord) -> None:
        self._breakers[(record.machine, record.name)] = record

    def instance_data(self, machine: str, instance: str) -> str | None:
        return self._data.get((machine, instance))

    def save_instance_data(self, machine: str, instance: str, data: str) -> None:
        self._data[(machine, instance)] = data

    def kept_entry(self, machine: str, instance: str) -> LedgerEntry | None:
        # Newest first: a routed emit usually follows its keep closely. No index is kept for
        # it, so that appends (every dispatch) pay nothing.
        for entry in reversed(self.ledger_list):
            if entry.kind == KEPT and entry.instance == instance and entry.machine == machine:
                return entry
        return None

    def deadline(self, id: str) -> DeadlineRecord | None:
        return self._deadlines.get(id)

    def save_deadline(self, record: DeadlineRecord) -> None:
        self._deadlines[record.id] = record

    def delete_deadline(self, id: str) -> bool:
        return self._deadlines.pop(id, None) is not None

    def due_deadlines(self, now_ms: int, limit: int) -> list[DeadlineRecord]:
        due = [d for d in self._deadlines.values() if d.due_ms <= now_ms]
        return sorted(due, key=lambda d: (d.due_ms, d.id))[:limit]
