"""The Store interface: what the runtime needs from a database (commit batching is in `commit`).

A store keeps, per governor instance, its state row; and for the whole runtime the audit
ledger with its checkpoints, processed event ids, idempotency records, armed timers, the
outbox and snapshots. The runtime never trusts what a store returns: it verifies the ledger
head before chaining on it and compares snapshots with the entries they name.

Writing happens only inside `Store.run`, which applies a batch of units of work in one
transaction: each unit either applies all its writes or none (a savepoint per unit in SQL
stores), and nothing is visible or acknowledged before the batch commits. A server database
(PostgreSQL is the planned one) implements `Store` and `Transaction` with the same statements
the SQLite store uses: `SELECT ... FOR UPDATE` on the state row or a conditional `UPDATE ...
WHERE version = ?`, `INSERT` for the rest, `SERIALIZABLE` or an advisory lock around the
ledger head so appends stay a single chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Literal, Protocol, TypeVar

from ..ledger import Checkpoint, LedgerEntry, LedgerMode
from ..timers import ArmedTimer

__all__ = [
    "FLOW_FINISHED",
    "BreakerRecord",
    "ClaimKey",
    "DeadlineRecord",
    "FlowRecord",
    "FlowStatus",
    "InstanceRecord",
    "OutboxKind",
    "OutboxMessage",
    "OutboxRow",
    "OutboxStatus",
    "Snapshot",
    "Store",
    "Transaction",
    "WorkOutcome",
    "idempotency_event_id",
    "new_flow_record",
    "outbox_row",
    "processed_then_instance",
    "with_retry",
]

T = TypeVar("T")

OutboxKind = Literal["event", "notification"]
# What a dispatch claims while it calls the outside world (`Store.claim_outside`):
# (machine, "event" or "key", the event id or idempotency key).
ClaimKey = tuple[str, str, str]
# "held": a refusal notice waiting on the fate of the message it is the notice of (it is
# released as "pending" if that delivery fails, and "dropped" if it is delivered).
OutboxStatus = Literal["pending", "delivered", "failed", "held", "dropped"]


def idempotency_event_id(machine: str, key: str) -> str:
    """The event id the ledger entry of a dispatch with idempotency key `key` and no event id
    records: a digest of the key (the key itself stays out of the ledger), so a key whose
    idempotency_keys row is missing is checked against the ledger (row_seals.DedupAnchor)."""
    digest = hashlib.sha256(b"autonomic/idempotency-key/v1\x00")
    for text in (machine, key):
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(4, "big") + data)
    return "key_" + digest.hexdigest()[:32]


@dataclass(slots=True)
class InstanceRecord:
    """One governor instance: its current state and version (the count of its changes)."""

    machine: str
    instance: str
    state: str
    version: int


# An outbox row's columns after its id (kind ... error, as OutboxMessage has them): what a
# change writes (`Transaction.add_outbox_rows`), its id the store's.
OutboxRow = tuple[OutboxKind, str, str, int, str, str, str, str, str, int, OutboxStatus, None]


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """An emitted event or an escalation notification, written with the change that caused it.

    `event_id` is derived from the cause (see results.derive_event_id), so delivering a
    message twice is deduplicated by the receiving governor. `body` is JSON text: the payload
    of an event, or the notification (recipient, message, deadline). `attempts` and
    `retry_at_ms`: a pending event whose deliveries got no answer from the receiver's outside
    call (runtime/outbox.py), how many, and when it is tried again; 0 and None otherwise.
    They are kept beside the row (table outbox_retries), not under its seal: like a fleet's
    lease, they only say when to try, and the delivery's give-up time is counted from the
    sealed `created_ms`.
    """

    id: int | None
    kind: OutboxKind
    machine: str
    instance: str
    version: int
    target_machine: str
    target_instance: str
    event: str
    event_id: str
    body: str
    created_ms: int
    status: OutboxStatus = "pending"
    error: str | None = None
    attempts: int = 0
    retry_at_ms: int | None = None


def outbox_row(m: OutboxMessage) -> OutboxRow:
    """The row `add_outbox` writes of a message: its columns after the id, without an error."""
    return (
        m.kind,
        m.machine,
        m.instance,
        m.version,
        m.target_machine,
        m.target_instance,
        m.event,
        m.event_id,
        m.body,
        m.created_ms,
        m.status,
        None,
    )


def with_retry(message: OutboxMessage, row: Sequence[Any]) -> OutboxMessage:
    """`message` with the retry a read joined beside it (the row's last two columns: attempts,
    retry_at_ms), if it has one. Not sealed, so only whole numbers are taken."""
    attempts, retry_at_ms = row[-2], row[-1]
    if type(attempts) is not int or type(retry_at_ms) is not int or attempts < 1:
        return message
    return replace(message, attempts=attempts, retry_at_ms=retry_at_ms)


FlowStatus = Literal["running", "waiting", "compensating", "completed", "compensated", "failed"]
# Flows in these states are done: nothing resumes them.
FLOW_FINISHED: frozenset[str] = frozenset({"completed", "compensated", "failed"})


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One flow run's progress (see runtime/flows/engine.py). `data` is JSON text: inputs,
    computed values, each step's outcome, the failure and the gathered result. `wake_ms` is
    when a waiting flow's `await` step times out (None unless waiting). `version` counts the
    record's writes, as for instances: a write names the version it read."""

    flow_id: str
    flow: str
    instance: str
    status: FlowStatus
    version: int
    data: str
    updated_ms: int
    wake_ms: int | None = None


# FlowRecord's slots, in field order, set directly (`new_flow_record`).
_FLOW_RECORD_SETTERS = tuple(getattr(FlowRecord, name).__set__ for name in FlowRecord.__slots__)


def new_flow_record(
    flow_id: str,
    flow: str,
    instance: str,
    status: FlowStatus,
    version: int,
    data: str,
    updated_ms: int,
    wake_ms: int | None = None,
) -> FlowRecord:
    """FlowRecord(flow_id, ..., wake_ms), its slots set directly: a run builds one per write,
    and the frozen dataclass __init__ (eight object.__setattr__ calls) costs twice as much."""
    record = object.__new__(FlowRecord)
    set0, set1, set2, set3, set4, set5, set6, set7 = _FLOW_RECORD_SETTERS
    set0(record, flow_id)
    set1(record, flow)
    set2(record, instance)
    set3(record, status)
    set4(record, version)
    set5(record, data)
    set6(record, updated_ms)
    set7(record, wake_ms)
    return record


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """A circuit breaker's state after its last move (see runtime/resilience/breaker.py), so a
    restarted process reopens an open breaker instead of closing it. `name` is the breaker's
    (a policy's, or "<policy>[<tenant>]" for a tenant's bulkhead), `state` one of "closed",
    "open", "half_open"; `opened_ms` is when it last opened (its cool-down counts from there),
    `failures` the run of consecutive failures at the move. Written with the move's "breaker"
    ledger entry, in one unit of work. A server store: one row per (machine, name), upserted."""

    machine: str
    name: str
    state: str
    failures: int
    opened_ms: int
    updated_ms: int


@dataclass(frozen=True, slots=True)
class DeadlineRecord:
    """One deadline of the deadline tracker (runtime/resilience/deadlines.py): due at `due_ms`,
    escalated `level` times so far. A server store: one row per id, with an index on due_ms."""

    id: str
    name: str
    governor: str
    due_ms: int
    level: int
    action: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An instance's state after `version` changes, and the ledger entry that produced it;
    `kept_seq` the seq of its newest "kept" entry then (-1: none), whose digest commits to its
    kept data (replay checks the stored data against it, runtime/replay.py)."""

    machine: str
    instance: str
    version: int
    state: str
    ledger_seq: int
    entry_hash: bytes
    kept_seq: int = -1


def processed_then_instance(
    processed: Callable[[str, str], str | None],
    instance: Callable[[str, str], InstanceRecord | None],
    machine: str,
    event_id: str,
    instance_id: str,
) -> tuple[str | None, InstanceRecord | None]:
    """`processed_and_instance` for a store that reads the two apart: the instance only when
    no result is stored."""
    stored = processed(machine, event_id)
    return (stored, None) if stored is not None else (None, instance(machine, instance_id))


class Transaction(Protocol):
    """The writes (and reads inside the write transaction) of one unit of work."""

    def instance(self, machine: str, instance: str) -> InstanceRecord | None:
        """The row as of this transaction; the caller must not modify the record."""

    def insert_instance(self, record: InstanceRecord) -> None:
        """Raise InstanceExists if (machine, instance) is taken."""

    def update_instance(
        self, machine: str, instance: str, state: str, version: int, expected_version: int
    ) -> None:
        """Write state and version only if the stored version is `expected_version`, else
        raise ConcurrentUpdateDetected(expected, actual)."""

    def ledger_head(self) -> LedgerEntry | None:
        """The entry with the highest seq, as stored (the caller verifies it)."""

    def last_checkpoint(self) -> Checkpoint | None: ...

    def append_ledger(self, entry: LedgerEntry) -> None: ...

    def add_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def processed(self, machine: str, event_id: str) -> str | None:
        """The stored result (JSON text) of an already processed event id, or None."""

    def processed_and_instance(
        self, machine: str, event_id: str, instance: str
    ) -> tuple[str | None, InstanceRecord | None]:
        """`processed(machine, event_id)` and, when that is None, `instance(machine,
        instance)`; beside a stored result the instance is None (its row is not read or
        checked): a dispatch's first reads, which a store may make one."""

    def record_processed(
        self, machine: str, event_id: str, instance: str, result: str, now_ms: int
    ) -> None: ...

    def idempotency(self, machine: str, key: str) -> tuple[bytes, str] | None:
        """(request digest, stored result JSON) recorded under an idempotency key, or None."""

    def record_idempotency(
        self, machine: str, key: str, request_digest: bytes, result: str, now_ms: int
    ) -> None: ...

    def cancel_timers(
        self, machine: str, instance: str, keep: Collection[str] = frozenset()
    ) -> None:
        """Cancel the instance's armed timers, except those whose ids are in `keep` (the
        group and creation timers that a move leaves running)."""

    def arm_timers(self, timers: Sequence[ArmedTimer]) -> None: ...

    def timer_armed(self, timer: ArmedTimer) -> bool:
        """Whether exactly this arming of the timer is still armed."""

    def take_timer(self, timer: ArmedTimer) -> bool:
        """Delete this armed timer; False if it is no longer armed (fired or cancelled)."""

    def timer_retry(self, timer: ArmedTimer) -> tuple[int, str] | None:
        """How many firings of this arming of the timer failed, and the last one's error
        (`retry_timer`), or None."""

    def retry_timer(self, timer: ArmedTimer, attempts: int, retry_at_ms: int, error: str) -> None:
        """Keep this arming armed after its firing's action failed: its count of failed
        firings, and when it is due again (`Store.due_timers` skips it until then). Kept beside
        the timer's row (table timer_retries), not under its seal: it only says when to try."""

    def forget_timer_retry(self, timer: ArmedTimer) -> None:
        """Drop what `retry_timer` kept of this arming (it fired or was taken)."""

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        """Insert each message with its `status` ("pending", or "held" for a refusal notice)
        and no error; the store assigns its id."""

    def add_outbox_rows(self, rows: Sequence[OutboxRow]) -> None:
        """`add_outbox` of the messages with these columns: a change's emitted events and
        notices, written without an OutboxMessage made for each."""

    def outbox_message(self, event_id: str) -> OutboxMessage | None:
        """The outbox message with this event id (unique) as of this transaction, or None."""

    def mark_outbox(self, message_id: int, status: OutboxStatus, error: str | None) -> None: ...

    def retry_outbox(self, message_id: int, attempts: int, retry_at_ms: int, error: str) -> None:
        """Leave a pending message pending after its delivery got no answer: `error` on the
        row (a fleet's lease let go), its count of such deliveries and when it is due again
        (`Store.outbox(due_ms=...)`, `claim_outbox`) beside it."""

    def forget_outbox_retry(self, message_id: int) -> None:
        """Drop what `retry_outbox` kept of a message (its delivery has ended)."""

    def holds_outside(self, keys: Sequence[ClaimKey], holder: str) -> bool:
        """Whether `holder` still holds every one of `keys` (`Store.claim_outside`), as of this
        transaction, with no other holder able to take one over before it ends: a lease that
        ran out still counts if nobody took it. False if a key was taken over (its lease ran
        out and another holder claimed it, whether or not that one has let go since)."""

    def release_outside(self, keys: Sequence[ClaimKey], holder: str) -> None:
        """Drop `holder`'s claims on `keys` (one another holder took over stays) as part of
        this transaction: they are gone when it commits and kept if it rolls back. The unit
        of work that records the result of the outside calls made under them lets go of them
        this way, so its commit is their release (runtime/resilience/claims.py)."""

    def set_outbox_body(self, message_id: int, body: str) -> None:
        """Replace a message's body: a refusal notice's, when it is released with the refusal
        its $refusal_code / $refusal_message arguments carry (runtime/outbox.py)."""

    def save_snapshot(self, snapshot: Snapshot) -> None: ...

    def purge_dedup(self, before_ms: int) -> tuple[int, int]:
        """Forget processed event ids and idempotency keys recorded before `before_ms`;
        returns how many of each were removed."""

    def flow(self, flow_id: str) -> FlowRecord | None:
        """The flow run's record as of this transaction."""

    def save_flow(self, record: FlowRecord, expected_version: int) -> None:
        """Insert the record (`expected_version` 0: raise ConcurrentUpdateDetected if the id is
        taken) or replace it only if its stored version is `expected_version`, else raise
        ConcurrentUpdateDetected(expected, actual). A server store: `INSERT` / conditional
        `UPDATE ... WHERE version = ?` on the `flows` table, like `instances`."""

    def save_breaker(self, record: BreakerRecord) -> None:
        """Insert or replace the breaker's row, keyed by (machine, name)."""

    def instance_data(self, machine: str, instance: str) -> str | None:
        """The instance's kept data (a JSON object as text, see runtime/instance_data.py) as
        of this transaction, or None if it never kept any."""

    def save_instance_data(self, machine: str, instance: str, data: str) -> None:
        """Insert or replace the instance's kept data, keyed by (machine, instance). Written
        in the unit of work of the move whose `keep` changed it."""

    def kept_entry(self, machine: str, instance: str) -> LedgerEntry | None:
        """The instance's newest "kept" ledger entry as of this transaction (the commitment its
        kept data must match, runtime/instance_data.py), as stored (the caller verifies it), or
        None. A server store: by its (machine, instance, seq) index on the ledger."""

    def deadline(self, id: str) -> DeadlineRecord | None:
        """The tracked deadline as of this transaction, held as `due_deadlines` holds the
        rows it returns (a server store locks it; a row at a level its ledger does not
        record is refused), so the caller may escalate it."""

    def save_deadline(self, record: DeadlineRecord) -> None:
        """Insert or replace the deadline, keyed by id."""

    def delete_deadline(self, id: str) -> bool:
        """Forget the deadline; False if it was not tracked."""

    def due_deadlines(self, now_ms: int, limit: int) -> list[DeadlineRecord]:
        """Deadlines with due_ms <= now_ms as of this transaction, earliest first (ties: by
        id). Read inside the write transaction, so two processes never escalate one miss."""

    def reseal_rows(self, key: bytes) -> None:
        """Check every sealed row under the store's row key, then seal it under `key`, the
        new one from now on (a key rotation's unit of work; see Store.seal_rows)."""


@dataclass(frozen=True, slots=True)
class WorkOutcome(Generic[T]):
    """What one unit of work in a batch produced: a value, or the exception it raised."""

    value: T | None
    error: BaseException | None


class Store(Protocol):
    """A database the runtime can run on. See the module docstring for the contract."""

    def run(
        self,
        works: Sequence[Callable[[Transaction], T]],
        before_commit: Callable[[Transaction], None] | None = None,
    ) -> list[WorkOutcome[T]]:
        """Apply `works` in order in one transaction, each atomically (a failed unit leaves no
        writes and does not stop the others), call `before_commit`, then commit. If the
        commit or `before_commit` fails, every unit fails with that error."""

    def seal_rows(self, key: bytes | None, *, adopt: bool = False) -> None:
        """From now on seal every row written to the operational tables under `key` (the row
        key of the runtime's signer, runtime/store/row_seals.py), and refuse with
        StoreIntegrityError every row read without its seal; None: neither. A store that was
        never sealed is marked so that a missing seal is refused from then on; if its
        operational tables hold rows (written before rows were sealed, or stripped of their
        seals and mark by someone without the key), they are sealed as found only with
        `adopt`, and refused otherwise. One sealed under another key is refused. The memory
        store (one process, nothing on disk) seals nothing."""

    def ledger_mode(self) -> LedgerMode | None:
        """The ledger mode recorded in the store, or None if no entry was ever written."""

    def set_ledger_mode(self, mode: LedgerMode) -> None: ...

    def get_instance(self, machine: str, instance: str) -> InstanceRecord | None: ...

    def instances(self, machine: str) -> list[InstanceRecord]: ...

    def ledger_entries(
        self, *, machine: str | None = None, instance: str | None = None, after_seq: int = -1
    ) -> Iterator[LedgerEntry]:
        """Entries in seq order, optionally of one instance, with seq > after_seq."""

    def ledger_entry(self, seq: int) -> LedgerEntry | None: ...

    def checkpoints(self) -> list[Checkpoint]: ...

    def latest_snapshot(self, machine: str, instance: str) -> Snapshot | None: ...

    def armed_timers(
        self, machine: str | None = None, instance: str | None = None
    ) -> list[ArmedTimer]: ...

    def timer_retries(self) -> dict[tuple[str, str, str, int], int]:
        """When each retried timer (by `ArmedTimer.arming()`) is due again (`retry_timer`)."""

    def due_timers(self, now_ms: int, machines: Sequence[str], limit: int) -> list[ArmedTimer]:
        """Armed timers of `machines` due at `now_ms`, earliest first (ties: arming order),
        but those whose failed firing is tried again after `now_ms` (`retry_timer`; a retry
        time more than RETRY_LATER_CAP_MS ahead is no stored backoff's, and is ignored)."""

    def outbox(
        self,
        *,
        kind: OutboxKind | None = None,
        status: OutboxStatus | None = "pending",
        limit: int = 1000,
        due_ms: int | None = None,
    ) -> list[OutboxMessage]:
        """Messages in id order. With `due_ms`, only those to deliver at `due_ms`: not waiting
        for a retry after it, and with no earlier pending message to the same target instance
        that is (so a receiver's messages stay in order)."""

    def get_flow(self, flow_id: str) -> FlowRecord | None: ...

    def unfinished_flows(self, limit: int = 1000) -> list[FlowRecord]:
        """Flow runs not yet completed, compensated or failed, oldest update first: what a
        restarted process resumes (waiting ones included: their wait is checked again)."""

    def processed(self, machine: str, event_id: str) -> str | None:
        """`Transaction.processed` outside a write transaction (a read of what is committed):
        dispatch looks first, before it calls an outside service, then again inside."""

    def idempotency(self, machine: str, key: str) -> tuple[bytes, str] | None:
        """`Transaction.idempotency` outside a write transaction, as `processed`."""

    def get_processed_and_instance(
        self, machine: str, event_id: str, instance: str
    ) -> tuple[str | None, InstanceRecord | None]:
        """`Transaction.processed_and_instance` outside a write transaction, as `processed`
        and `get_instance`."""

    def get_breaker(self, machine: str, name: str) -> BreakerRecord | None:
        """The breaker's state after its last recorded move, or None (never moved: closed)."""

    def get_instance_data(self, machine: str, instance: str) -> str | None:
        """`Transaction.instance_data` outside a write transaction (what is committed)."""

    def deadlines(self) -> list[DeadlineRecord]:
        """Every tracked deadline, earliest first (ties: by id)."""

    def earliest_deadline(self, prefix: str, governors: Sequence[str]) -> int | None:
        """The earliest due time of a deadline whose id starts with `prefix` and whose
        governor is one of `governors` (None: none), committed, read outside a write
        transaction. A hint only (its row's seal is not checked): the due work reads the due
        rows again, checked, inside its transaction."""

    def claim_outside(self, keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        """Hold every one of `keys` for `holder` until `lease_ms` from now on the store's own
        clock (the database's for a server; the wall clock a file's processes share), all or
        none, in a short write of its own: False, changing nothing, if another holder's lease
        on one of them has not run out. The same holder claiming again renews its lease.
        Visible to every process on the store at once; it need not survive a crash of the
        machine (its holder does not either). See runtime/resilience/claims.py."""

    def renew_outside(self, keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        """Extend `holder`'s leases on `keys` to `lease_ms` from now, as `claim_outside` does,
        but only where `holder` still holds them: it never takes a key back. False if one of
        them was taken over (or let go) meanwhile; the others are renewed all the same."""

    def release_outside(self, keys: Sequence[ClaimKey], holder: str) -> None:
        """Drop `holder`'s claims on `keys` (one another holder took over stays)."""

    def close(self) -> None: ...
