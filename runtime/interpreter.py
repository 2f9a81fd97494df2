"""Dispatch over generated tables: the Runtime (store, clock, ledger, timers) and its Governors.

A Governor runs one generated machine. `dispatch` validates the payload with the generated
model, looks up the rows of (state, event) in a dict built at load time, tries the guards in
order (first true wins, `else` last), runs the actions, and writes in one transaction: the
state row (conditional on its version), the ledger entry chained on the verified head, the
timers of the state left and entered, emitted events and notifications in the outbox, the
processed event id and the idempotency record. It returns only after that commit.

Semantics worth knowing:
- Version: 1 after `create`, +1 for every recorded change (transition, timer firing).
  A rejection recorded with `record_rejection=True` writes a ledger entry but changes nothing,
  so the version stays.
- Ignored events (`ignore E` in the machine) return a result with `ignored=True`, the state
  and version unchanged, and write nothing: no ledger entry, no processed event id.
- A transition into a state (also a self-transition) arms that state's timers measured from
  the entry; leaving a state cancels its armed timers. A timer that moves the instance enters
  the target at the timer's due time, so a ladder missed while the process was down replays
  in order with its original spacing; the ledger timestamp is the actual firing time.
- Emitted events go to the instance with the same id in the target machine when
  `Runtime.deliver_outbox` runs. Their payload is built when they are emitted, from the
  emit's arguments (`Emit.args`, which the compiler completed with the causing event's
  same-named fields), and stored with the change in the outbox; an Emit without `args` carries
  an empty payload. Their event ids derive from the change that
  emitted them, so delivering twice is deduplicated by the receiver.
- Event ids and idempotency keys are remembered per machine, with the first result (JSON),
  until `Runtime.purge_expired` forgets those older than the retention window. A rejected
  dispatch is not remembered: sending it again is evaluated again.
- Guards and actions run inside the write transaction: keep them fast and free of
  side effects that cannot be repeated (an action whose transaction fails to commit has run);
  they must not dispatch themselves (NestedDispatch): emit events instead.
- On the memory store, rows that arm, cancel or emit nothing and events without payload
  fields take a shorter path (no closures, no store calls) with the same results; the
  hypothesis test in tests/test_interpreter.py holds the two paths to the same answers.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar, cast, final

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from .bindings import Action, Guard, bind
from .errors import (
    ActionFailed,
    ConcurrentUpdateDetected,
    IdempotencyConflict,
    InstanceExists,
    InvalidTransition,
    NestedDispatch,
    NoGuardHeld,
    PayloadInvalid,
    StoreConfigError,
    StoreIntegrityError,
    UnknownEvent,
    UnknownInstance,
    UnknownMachine,
)
from .keys import Keyring
from .ledger import (
    EMPTY_PAYLOAD_DIGEST,
    GENESIS_HASH,
    Checkpoint,
    EntryData,
    LedgerEntry,
    LedgerSealer,
    VerifyReport,
    entry_hash,
    payload_digest,
    verify_entries,
)
from .store.base import (
    GroupCommit,
    InstanceRecord,
    OutboxMessage,
    OutboxStatus,
    Snapshot,
    Store,
    Transaction,
    WorkOutcome,
)
from .store.memory import MemoryStore
from .tables import ELSE, Emit, MachineSpec, Payload, TimerSpec, Transition
from .timers import ArmedTimer, Clock, SystemClock, arm_timers

__all__ = [
    "CREATE_EVENT",
    "Delivery",
    "DispatchResult",
    "EmittedEvent",
    "Governor",
    "Notification",
    "ReplayedState",
    "Runtime",
    "TimerFiring",
    "TransitionContext",
    "derive_event_id",
]

T = TypeVar("T")

CREATE_EVENT = "create"
DEFAULT_ACTOR = "system"
TIMER_ACTOR = "timer"
DAY_MS = 86_400_000

_EMPTY_RESULTS: Mapping[str, object] = MappingProxyType({})
_pack_length = struct.Struct(">I").pack


# ---------------------------------------------------------------------------------------------
# What guards and actions see, and what dispatch returns.


@dataclass(frozen=True, slots=True)
class TransitionContext:
    """The event as guards and actions see it. `target` is None while guards run, and the
    state being entered (None when a timer stays) while actions run. `version` is the
    instance's version before this change."""

    machine: str
    instance: str
    state: str
    event: str
    payload: Payload | None
    actor: str
    version: int
    now_ms: int
    target: str | None = None
    timer: str | None = None


class EmittedEvent(NamedTuple):
    """An event written to the outbox for another governor (delivered by deliver_outbox)."""

    machine: str
    instance: str
    event: str
    event_id: str


class Notification(NamedTuple):
    """An escalation step's notice: who must act, about what, and by when (absolute)."""

    machine: str
    instance: str
    state: str
    ladder: str | None
    step: int | None
    kind: str
    recipient: str
    message: str | None
    fired_ms: int
    deadline_ms: int | None
    event_id: str


class DispatchResult:
    """What a dispatch (or a timer firing) did. `duplicate` marks a stored result returned
    again for a repeated event id or idempotency key; `ignored` an event the state ignores.
    `seq` is the ledger sequence index (None without a ledger or when nothing was written).
    Results returned for duplicates hold action results as JSON values.

    Immutable, and it behaves like the named tuple of its `_fields` (equality, iteration,
    `_asdict`, `_replace`). It is not a tuple: a tuple subclass costs a dispatch more to build
    than the whole in-memory transition. Everything but the instance, version and seq is a
    property of the transition row, so the fast paths share one precomputed `_outcome` tuple
    per row.
    """

    __slots__ = ("_instance", "_outcome", "_seq", "_version")

    _fields = (
        "machine",
        "instance",
        "event",
        "from_state",
        "to_state",
        "version",
        "seq",
        "event_id",
        "emitted",
        "notifications",
        "action_results",
        "armed",
        "duplicate",
        "ignored",
    )

    def __init__(
        self,
        machine: str,
        instance: str,
        event: str,
        from_state: str,
        to_state: str,
        version: int,
        seq: int | None,
        event_id: str | None,
        emitted: tuple[EmittedEvent, ...],
        notifications: tuple[Notification, ...],
        action_results: Mapping[str, object],
        armed: tuple[ArmedTimer, ...],
        duplicate: bool = False,
        ignored: bool = False,
    ) -> None:
        self._instance = instance
        self._version = version
        self._seq = seq
        self._outcome: _Outcome = (
            machine,
            event,
            from_state,
            to_state,
            event_id,
            emitted,
            notifications,
            action_results,
            armed,
            duplicate,
            ignored,
        )

    @property
    def machine(self) -> str:
        return self._outcome[0]

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def event(self) -> str:
        return self._outcome[1]

    @property
    def from_state(self) -> str:
        return self._outcome[2]

    @property
    def to_state(self) -> str:
        return self._outcome[3]

    @property
    def version(self) -> int:
        return self._version

    @property
    def seq(self) -> int | None:
        return self._seq

    @property
    def event_id(self) -> str | None:
        return self._outcome[4]

    @property
    def emitted(self) -> tuple[EmittedEvent, ...]:
        return self._outcome[5]

    @property
    def notifications(self) -> tuple[Notification, ...]:
        return self._outcome[6]

    @property
    def action_results(self) -> Mapping[str, object]:
        return self._outcome[7]

    @property
    def armed(self) -> tuple[ArmedTimer, ...]:
        return self._outcome[8]

    @property
    def duplicate(self) -> bool:
        return self._outcome[9]

    @property
    def ignored(self) -> bool:
        return self._outcome[10]

    def _astuple(self) -> tuple[Any, ...]:
        machine, event, from_state, to_state, event_id, *rest = self._outcome
        return (
            machine,
            self._instance,
            event,
            from_state,
            to_state,
            self._version,
            self._seq,
            event_id,
            *rest,
        )

    def _asdict(self) -> dict[str, Any]:
        return dict(zip(self._fields, self._astuple(), strict=True))

    def _replace(self, **changes: Any) -> DispatchResult:
        fields = self._asdict()
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"got unexpected field names: {sorted(unknown)!r}")
        fields.update(changes)
        return DispatchResult(**fields)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._astuple())

    def __len__(self) -> int:
        return len(self._fields)

    def __getitem__(self, index: int) -> Any:
        return self._astuple()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DispatchResult):
            return self._astuple() == other._astuple()
        if isinstance(other, tuple):
            return self._astuple() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __reduce__(self) -> tuple[type[DispatchResult], tuple[Any, ...]]:
        return (DispatchResult, self._astuple())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, self._astuple(), strict=True))
        return f"DispatchResult({fields})"


class _RowResult(DispatchResult):
    """A DispatchResult that the fast paths fill in slot by slot: calling a Python __init__
    would cost a third of the transition."""

    __slots__ = ()
    __init__ = object.__init__


class _UnsealedResult(_RowResult):
    """A fast-path result without a ledger: `seq` is None for all of them, so it is a class
    attribute (shadowing the slot) rather than one more store per result."""

    __slots__ = ()
    _seq = None


# machine, event, from_state, to_state, event_id, emitted, notifications, action_results,
# armed, duplicate, ignored: the part of a result that a transition row fixes.
_Outcome = tuple[
    str,
    str,
    str,
    str,
    str | None,
    tuple[EmittedEvent, ...],
    tuple[Notification, ...],
    Mapping[str, object],
    tuple[ArmedTimer, ...],
    bool,
    bool,
]

# Building hot-path tuples with tuple.__new__ skips the NamedTuple's Python-level __new__.
_new_entry_data = cast(Callable[[type[EntryData], tuple[Any, ...]], EntryData], tuple.__new__)


class TimerFiring(NamedTuple):
    """One timer fired: the timer, its ledger kind ("timer" or "escalation"), what it did."""

    timer: ArmedTimer
    kind: str
    result: DispatchResult


class Delivery(NamedTuple):
    """The outcome of delivering one outbox event: delivered, failed (with why) or skipped."""

    message: OutboxMessage
    status: str
    result: DispatchResult | None
    error: str | None


class ReplayedState(NamedTuple):
    """An instance's state rebuilt from its ledger entries (and a snapshot, if one was used)."""

    machine: str
    instance: str
    state: str
    version: int
    last_seq: int
    snapshot_version: int | None
    replayed: int


def derive_event_id(*parts: str | int) -> str:
    """A deterministic event id for something caused by a change (an emitted event, a timer
    firing): the same cause always yields the same id, so its redelivery deduplicates."""
    digest = hashlib.sha256(b"autonomic/event-id/v1\x00")
    for part in parts:
        data = str(part).encode("utf-8")
        digest.update(_pack_length(len(data)) + data)
    return "evt_" + digest.hexdigest()[:32]


def _request_digest(instance: str, event: str, payload_sha256: bytes) -> bytes:
    digest = hashlib.sha256(b"autonomic/idempotency/v1\x00")
    for text in (instance, event):
        data = text.encode("utf-8")
        digest.update(_pack_length(len(data)) + data)
    digest.update(payload_sha256)
    return digest.digest()


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=to_jsonable_python)


def _result_to_json(result: DispatchResult) -> str:
    doc = result._asdict()
    doc["emitted"] = [list(e) for e in result.emitted]
    doc["notifications"] = [list(n) for n in result.notifications]
    doc["armed"] = [
        [t.machine, t.instance, t.timer_id, t.state, t.due_ms, t.armed_version]
        for t in result.armed
    ]
    doc["action_results"] = dict(result.action_results)
    del doc["duplicate"], doc["ignored"]
    return _dumps(doc)


def _result_from_json(text: str) -> DispatchResult:
    doc = json.loads(text)
    return DispatchResult(
        machine=doc["machine"],
        instance=doc["instance"],
        event=doc["event"],
        from_state=doc["from_state"],
        to_state=doc["to_state"],
        version=doc["version"],
        seq=doc["seq"],
        event_id=doc["event_id"],
        emitted=tuple(EmittedEvent(*e) for e in doc["emitted"]),
        notifications=tuple(Notification(*n) for n in doc["notifications"]),
        action_results=MappingProxyType(doc["action_results"]),
        armed=tuple(ArmedTimer(*t) for t in doc["armed"]),
        duplicate=True,
    )


# ---------------------------------------------------------------------------------------------
# The ledger chain as seen by one batch of work.


class _Chain:
    """Where the next ledger entry goes: the head is read inside the transaction and verified
    before anything is chained on it (a store could hand back a modified row)."""

    __slots__ = ("appended", "head", "loaded", "next_seq", "runtime")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.loaded = False
        self.next_seq = 0
        self.head = GENESIS_HASH
        self.appended = 0

    def load(self, txn: Transaction) -> None:
        runtime = self.runtime
        stored = txn.ledger_head()
        if stored is None:
            self.next_seq, self.head = 0, GENESIS_HASH
        else:
            known = runtime._verified_head
            if stored is not known and stored != known:
                _verify_stored_entry(stored, "ledger head")
                self._check_checkpoint(txn, stored)
                runtime._verified_head = stored
            self.next_seq, self.head = stored.seq + 1, stored.entry_hash
        if stored is None:
            last = txn.last_checkpoint()
            if last is not None and last.size > 0:
                raise StoreIntegrityError(
                    f"the ledger is empty but a checkpoint is signed at size {last.size}",
                    hint="the ledger table was truncated; restore it from a backup",
                )
        self.loaded = True

    def _check_checkpoint(self, txn: Transaction, head: LedgerEntry) -> None:
        last = txn.last_checkpoint()
        if last is None:
            return
        size = head.seq + 1
        if last.size > size:
            raise StoreIntegrityError(
                f"the ledger ends at seq {head.seq} but a checkpoint is signed at size "
                f"{last.size}: entries were removed",
                hint="restore the store from a backup; verify it with `autonomic audit verify`",
            )
        if last.size == size and last.head_hash != head.entry_hash:
            raise StoreIntegrityError(
                f"the checkpoint at size {last.size} does not match the ledger head",
                hint="restore the store from a backup; verify it with `autonomic audit verify`",
            )
        self.runtime._covered = max(self.runtime._covered, last.size)

    def seal(self, txn: Transaction, data: EntryData) -> LedgerEntry:
        if not self.loaded:
            self.load(txn)
        sealer = self.runtime._sealer
        assert sealer is not None
        return sealer.seal(self.next_seq, self.head, data)

    def advance(self, entry: LedgerEntry) -> None:
        self.next_seq = entry.seq + 1
        self.head = entry.entry_hash
        self.appended += 1
        self.runtime._verified_head = entry

    def finish(self, txn: Transaction) -> None:
        """Before commit: sign a checkpoint over this batch (checkpoint mode)."""
        runtime = self.runtime
        sealer = runtime._sealer
        if sealer is None or sealer.mode != "checkpoint" or not self.appended:
            return
        if self.next_seq - runtime._covered < runtime._checkpoint_every:
            return
        checkpoint = sealer.checkpoint(self.next_seq, self.head, runtime._clock.now_ms())
        txn.add_checkpoint(checkpoint)
        runtime._covered = self.next_seq
        self.appended = 0


def _verify_stored_entry(entry: LedgerEntry, what: str) -> None:
    try:
        computed = entry_hash(
            entry.seq,
            entry.ts_ms,
            (
                entry.kind,
                entry.machine,
                entry.instance,
                entry.from_state,
                entry.to_state,
                entry.event,
                entry.actor,
                entry.event_id,
            ),
            entry.payload_sha256,
            entry.prev_hash,
        )
    except (AttributeError, TypeError, ValueError, UnicodeEncodeError, struct.error) as exc:
        raise StoreIntegrityError(f"{what} (seq {entry.seq!r}) cannot be read: {exc}") from None
    if computed != entry.entry_hash:
        raise StoreIntegrityError(
            f"{what} (seq {entry.seq}) does not match its hash: the stored row was modified",
            hint="nothing was written; verify the store with `autonomic audit verify`",
        )


class _Rejected(NamedTuple):
    """A rejection recorded in the ledger: raised to the caller after the commit."""

    error: InvalidTransition


# ---------------------------------------------------------------------------------------------
# Load-time tables of one machine.


@final
class _Row:
    """One transition row, pre-bound: the guard and action callables, the timers to arm."""

    __slots__ = (
        "actions",
        "arms",
        "cancels",
        "emits",
        "event",
        "guard",
        "guard_fn",
        "machine",
        "outcome",
        "ref",
        "source",
        "target",
    )

    def __init__(
        self,
        machine: str,
        row: Transition,
        guards: Mapping[str, Guard],
        actions: Mapping[str, Action],
        timers: Mapping[str, tuple[TimerSpec, ...]],
    ) -> None:
        self.machine = machine
        # Interned, like the table keys and the initial state: a record's state is then the
        # very key object, and the lookups compare by identity.
        self.source = sys.intern(str(row.source))
        self.event = sys.intern(str(row.event))
        self.target = sys.intern(str(row.target))
        self.guard = row.guard
        self.guard_fn: Guard | None = (
            None if row.guard is None or row.guard == ELSE else guards[row.guard]
        )
        self.actions: tuple[tuple[str, Action], ...] = tuple((a, actions[a]) for a in row.actions)
        self.emits = tuple(_EmitPlan(emit) for emit in row.emits)
        # Leaving a state cancels its timers; entering one (also itself) arms the target's.
        self.cancels = bool(timers.get(self.source))
        self.arms = timers.get(self.target, ())
        self.ref = row.ref
        # What a result of this row holds besides instance, version and seq, when the row
        # runs no actions and arms, cancels and emits nothing (the fast paths' rows).
        self.outcome: _Outcome = (
            machine,
            self.event,
            self.source,
            self.target,
            None,
            (),
            (),
            _EMPTY_RESULTS,
            (),
            False,
            False,
        )


@final
class _EmitPlan:
    """One emit of a row or timer, pre-built at load time: its target, and its payload as a
    constant JSON body or as the pieces to fill in from the causing event."""

    __slots__ = ("constant", "context", "event", "fields", "fixed", "machine")

    def __init__(self, emit: Emit) -> None:
        self.machine = emit.machine
        self.event = emit.event
        self.constant: dict[str, object] = {}
        self.fields: tuple[tuple[str, str], ...] = ()  # (target field, causing field)
        self.context: tuple[tuple[str, str], ...] = ()  # (target field, instance|actor|event)
        for arg in emit.args:
            if arg.source == "literal":
                self.constant[arg.field] = arg.value
            elif arg.source == "field":
                self.fields += ((arg.field, str(arg.value)),)
            else:
                self.context += ((arg.field, arg.source),)
        # Literals only (or no arguments): the body is the same for every emission. The
        # compiler lists every target field an emit supplies, implicit same-name ones too.
        self.fixed: str | None = None if self.fields or self.context else _dumps(self.constant)

    def body(self, payload: Payload | None, instance: str, actor: str, event: str) -> str:
        """The emitted payload as JSON text: values from the causing payload keep their model
        types until `_dumps` (a Decimal becomes its exact string, a datetime ISO 8601)."""
        if self.fixed is not None:
            return self.fixed
        values = dict(self.constant)
        for target, source in self.fields:
            values[target] = getattr(payload, source, None)
        for target, ref in self.context:
            values[target] = instance if ref == "instance" else actor if ref == "actor" else event
        return _dumps(values)


def _validation_problems(error: ValidationError) -> tuple[tuple[str, str], ...]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(payload)"
        problems.append((where, str(item["msg"])))
    return tuple(problems)


class Governor:
    """One loaded machine: dispatch, create and read its instances. Built by Runtime.load."""

    def __init__(
        self,
        runtime: Runtime,
        spec: MachineSpec,
        guards: Mapping[str, Guard],
        actions: Mapping[str, Action],
    ) -> None:
        self.runtime = runtime
        self.spec = spec
        self.name = spec.name
        timers = {str(state): specs for state, specs in spec.timers.items()}
        self._rows: dict[tuple[str, str], tuple[_Row, ...]] = {
            (sys.intern(str(state)), sys.intern(str(event))): tuple(
                _Row(spec.name, r, guards, actions, timers) for r in rows
            )
            for (state, event), rows in spec.transitions.items()
        }
        self._events = frozenset(str(e) for e in spec.event_type)
        self._ignored = {str(s): frozenset(str(e) for e in es) for s, es in spec.ignored.items()}
        # Events with payload fields validate through the generated model; others take none.
        self._models: dict[str, type[Payload]] = {
            str(event): model for event, model in spec.payloads.items() if model.model_fields
        }
        self._timers = timers
        self._timer_specs = {t.id: t for specs in spec.timers.values() for t in specs}
        self._timer_emits = {
            t.id: tuple(_EmitPlan(e) for e in t.emits) for t in self._timer_specs.values()
        }
        self._timer_actions = {
            t.id: tuple((a, actions[a]) for a in t.actions) for t in self._timer_specs.values()
        }
        self._initial = sys.intern(str(spec.initial))
        self._accepts: dict[str, tuple[str, ...]] = {}
        for state, event in self._rows:
            self._accepts.setdefault(state, ())
            self._accepts[state] += (event,)
        # The short paths of the in-memory store, for rows that touch no timers, emit nothing
        # and whose event has no payload: same semantics, fewer steps. `_fast[state][event]`
        # holds the row when it is the key's only row, unguarded and without actions, and
        # otherwise the rows to try (those only without a ledger: `_sealed`).
        self._fast: dict[str, dict[str, _Row | tuple[_Row, ...]]] = {}
        self._records: dict[str, InstanceRecord] = {}
        self._fast_lock: threading.RLock | None = None
        self._sealed = runtime._sealer is not None
        memory = runtime._memory
        if memory is not None:
            self._records = memory.records(self.name)
            self._fast_lock = memory.lock if memory.thread_safe else None
            for (state, event), rows in self._rows.items():
                if event in self._models or any(r.cancels or r.arms or r.emits for r in rows):
                    continue
                if len(rows) == 1 and rows[0].guard_fn is None and not rows[0].actions:
                    self._fast.setdefault(state, {})[event] = rows[0]
                elif not self._sealed:
                    self._fast.setdefault(state, {})[event] = rows
            # Per instance, shadowing the method: a closure over its tables skips a dozen
            # attribute reads per event.
            self.dispatch = self._memory_dispatch()  # type: ignore[method-assign]

    # -- reading -------------------------------------------------------------------------------

    def get(self, instance_id: str) -> InstanceRecord | None:
        """The instance's current state and version, or None."""
        return self.runtime._store.get_instance(self.name, instance_id)

    def timers(self, instance_id: str) -> list[ArmedTimer]:
        """The instance's armed timers, earliest first."""
        return self.runtime._store.armed_timers(self.name, instance_id)

    def history(self, instance_id: str) -> list[LedgerEntry]:
        """The instance's ledger entries in order."""
        return list(self.runtime._store.ledger_entries(machine=self.name, instance=instance_id))

    def accepts(self, state: str) -> tuple[str, ...]:
        """The events with a transition from `state`."""
        return self._accepts.get(state, ())

    # -- creating ------------------------------------------------------------------------------

    def create(
        self, instance_id: str, actor: str = DEFAULT_ACTOR, *, event_id: str | None = None
    ) -> DispatchResult:
        """A new instance in the initial state (version 1), its timers armed, a ledger entry.

        Raises InstanceExists; with an `event_id` seen before, returns the first result.
        """
        name = self.name
        initial = self._initial
        runtime = self.runtime

        def work(txn: Transaction, chain: _Chain) -> DispatchResult:
            if event_id is not None:
                stored = txn.processed(name, event_id)
                if stored is not None:
                    return _result_from_json(stored)
            if txn.instance(name, instance_id) is not None:
                raise InstanceExists(name, instance_id)
            now = runtime._clock.now_ms()
            armed = arm_timers(name, instance_id, self._timers.get(initial, ()), now, 1)
            entry = None
            if runtime._sealer is not None:
                data = EntryData(
                    now,
                    "transition",
                    name,
                    instance_id,
                    "",
                    initial,
                    CREATE_EVENT,
                    actor,
                    event_id or "",
                    EMPTY_PAYLOAD_DIGEST,
                )
                entry = chain.seal(txn, data)
            result = DispatchResult(
                name,
                instance_id,
                CREATE_EVENT,
                "",
                initial,
                1,
                None if entry is None else entry.seq,
                event_id,
                (),
                (),
                _EMPTY_RESULTS,
                armed,
            )
            txn.insert_instance(InstanceRecord(name, instance_id, initial, 1))
            if armed:
                txn.arm_timers(armed)
            if entry is not None:
                txn.append_ledger(entry)
                if runtime._snapshot_every == 1:
                    runtime._snapshot(txn, name, instance_id, 1, initial, entry)
            if event_id is not None:
                txn.record_processed(name, event_id, instance_id, _result_to_json(result), now)
            if entry is not None:
                chain.advance(entry)
            return result

        return runtime._submit(work)

    # -- dispatching ---------------------------------------------------------------------------

    def dispatch(
        self,
        instance_id: str,
        event: str,
        payload: Mapping[str, Any] | Payload | None = None,
        actor: str = DEFAULT_ACTOR,
        event_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
        record_rejection: bool = False,
    ) -> DispatchResult:
        """Apply `event` to the instance; see the module docstring for what is written.

        Raises UnknownInstance, UnknownEvent, PayloadInvalid (nothing stored),
        InvalidTransition / NoGuardHeld (nothing stored unless `record_rejection`, then a
        "rejection" ledger entry), ActionFailed, IdempotencyConflict, ConcurrentUpdateDetected.
        On the memory store, each governor replaces this method with `_memory_dispatch`'s
        closure: same signature, same results.
        """
        return self._dispatch(
            instance_id,
            event,
            payload,
            actor,
            event_id,
            idempotency_key,
            expected_version,
            record_rejection,
        )

    def _memory_dispatch(self) -> Callable[..., DispatchResult]:
        """`dispatch` for the memory store. Events without payload, event id, idempotency key
        or expected version on rows in `_fast` take a short path (no closures, no store
        calls); everything else goes through `_dispatch`. The lock is taken only when the
        store is thread-safe, with acquire and release (a `with` block costs twice as much)."""
        general = self._dispatch
        records = self._records
        fast_rows = self._fast
        memory_guarded = self._dispatch_memory_guarded
        sealed = self._fast_sealed
        new_result = _UnsealedResult

        def dispatch_sealed(
            instance_id: str,
            event: str,
            payload: Mapping[str, Any] | Payload | None = None,
            actor: str = DEFAULT_ACTOR,
            event_id: str | None = None,
            idempotency_key: str | None = None,
            expected_version: int | None = None,
            record_rejection: bool = False,
        ) -> DispatchResult:
            if (
                payload is None
                and event_id is None
                and idempotency_key is None
                and expected_version is None
            ):
                done = sealed(instance_id, event, actor)
                if done is not None:
                    return done
            return general(
                instance_id,
                event,
                payload,
                actor,
                event_id,
                idempotency_key,
                expected_version,
                record_rejection,
            )

        def dispatch(
            instance_id: str,
            event: str,
            payload: Mapping[str, Any] | Payload | None = None,
            actor: str = DEFAULT_ACTOR,
            event_id: str | None = None,
            idempotency_key: str | None = None,
            expected_version: int | None = None,
            record_rejection: bool = False,
        ) -> DispatchResult:
            if (
                payload is None
                and event_id is None
                and idempotency_key is None
                and expected_version is None
            ):
                try:
                    record = records[instance_id]
                    found = fast_rows[record.state][event]
                except KeyError:
                    pass  # an unknown instance, or a row for the general path
                else:
                    if type(found) is not _Row:
                        return memory_guarded(record, found, actor)
                    version = record.version + 1
                    record.state = found.target
                    record.version = version
                    result: DispatchResult = new_result()
                    result._instance = instance_id
                    result._version = version
                    result._outcome = found.outcome
                    return result
            return general(
                instance_id,
                event,
                payload,
                actor,
                event_id,
                idempotency_key,
                expected_version,
                record_rejection,
            )

        sealed_mode = self._sealed
        lock = self._fast_lock
        if lock is None:
            return dispatch_sealed if sealed_mode else dispatch
        acquire, release = lock.acquire, lock.release

        def dispatch_locked(
            instance_id: str,
            event: str,
            payload: Mapping[str, Any] | Payload | None = None,
            actor: str = DEFAULT_ACTOR,
            event_id: str | None = None,
            idempotency_key: str | None = None,
            expected_version: int | None = None,
            record_rejection: bool = False,
        ) -> DispatchResult:
            if (
                payload is None
                and event_id is None
                and idempotency_key is None
                and expected_version is None
            ):
                acquire()
                try:
                    if sealed_mode:
                        done = sealed(instance_id, event, actor)
                        if done is not None:
                            return done
                    else:
                        # `dispatch`'s short path again, under the lock: a call would cost
                        # a sixth of it.
                        try:
                            record = records[instance_id]
                            found = fast_rows[record.state][event]
                        except KeyError:
                            pass
                        else:
                            if type(found) is not _Row:
                                return memory_guarded(record, found, actor)
                            version = record.version + 1
                            record.state = found.target
                            record.version = version
                            result: DispatchResult = new_result()
                            result._instance = instance_id
                            result._version = version
                            result._outcome = found.outcome
                            return result
                finally:
                    release()
            return general(
                instance_id,
                event,
                payload,
                actor,
                event_id,
                idempotency_key,
                expected_version,
                record_rejection,
            )

        return dispatch_locked

    def _fast_sealed(self, instance_id: str, event: str, actor: str) -> DispatchResult | None:
        """The memory store's short path with a ledger: seal on the head this runtime wrote
        last (anything else goes through the general path, which verifies the head)."""
        record = self._records.get(instance_id)
        if record is None:
            return None
        source = record.state
        row = self._fast.get(source, {}).get(event)
        if type(row) is not _Row:
            return None
        runtime = self.runtime
        memory = runtime._memory
        assert memory is not None
        ledger = memory.ledger_list
        head = runtime._verified_head
        if not ledger or ledger[-1] is not head or head is None:
            return None
        now = runtime._clock.now_ms()
        target = row.target
        version = record.version + 1
        data = _new_entry_data(
            EntryData,
            (
                now,
                "transition",
                row.machine,
                instance_id,
                source,
                target,
                row.event,
                actor,
                "",
                EMPTY_PAYLOAD_DIGEST,
            ),
        )
        sealer = runtime._sealer
        assert sealer is not None
        entry = sealer.seal(head.seq + 1, head.entry_hash, data)
        record.state = target
        record.version = version
        ledger.append(entry)
        runtime._verified_head = entry
        if version % runtime._snapshot_every == 0:
            runtime._snapshot(memory, row.machine, instance_id, version, target, entry)
        if sealer.mode == "checkpoint" and entry.seq + 1 - runtime._covered >= (
            runtime._checkpoint_every
        ):
            memory.add_checkpoint(sealer.checkpoint(entry.seq + 1, entry.entry_hash, now))
            runtime._covered = entry.seq + 1
        result: DispatchResult = _RowResult()
        result._instance = instance_id
        result._version = version
        result._seq = entry.seq
        result._outcome = row.outcome
        return result

    def _dispatch_memory_guarded(
        self, record: InstanceRecord, rows: tuple[_Row, ...], actor: str
    ) -> DispatchResult:
        """The fast path for rows with guards or actions (memory store, no ledger, lock held)."""
        runtime = self.runtime
        me = threading.get_ident()
        if runtime._working_thread == me:
            raise NestedDispatch()
        now = runtime._clock.now_ms()
        runtime._working_thread = me
        try:
            row = self._choose(rows, record, None, actor, now)
            if row is None:
                raise self._no_guard(record, rows)
            results = self._run_actions(
                row.actions, row.event, row.target, record, None, actor, now
            )
        finally:
            runtime._working_thread = None
        version = record.version + 1
        result = DispatchResult(
            self.name,
            record.instance,
            row.event,
            record.state,
            row.target,
            version,
            None,
            None,
            (),
            (),
            results,
            (),
        )
        record.state = row.target
        record.version = version
        return result

    def _validate(
        self, event: str, payload: Mapping[str, Any] | Payload | None
    ) -> tuple[Payload | None, bytes]:
        model = self._models.get(event)
        if model is None:
            if payload is None:
                return None, EMPTY_PAYLOAD_DIGEST
            if isinstance(payload, Payload):
                fields = tuple(type(payload).model_fields)
            elif isinstance(payload, Mapping):
                fields = tuple(str(k) for k in payload)
            else:
                raise PayloadInvalid(
                    self.name, event, (("(payload)", f"expected a mapping, not {type(payload)}"),)
                )
            if not fields:
                return None, EMPTY_PAYLOAD_DIGEST
            raise PayloadInvalid(
                self.name,
                event,
                tuple((f, "unexpected field: the event takes no payload") for f in fields),
            )
        if type(payload) is model:
            validated = payload
        else:
            try:
                validated = model.model_validate({} if payload is None else payload)
            except ValidationError as exc:
                raise PayloadInvalid(self.name, event, _validation_problems(exc)) from None
        return validated, payload_digest(validated.model_dump(mode="json"))

    def _check_event(self, event: str) -> None:
        if event not in self._events:
            close = difflib.get_close_matches(str(event), sorted(self._events), n=1, cutoff=0.6)
            hint = (
                f"did you mean '{close[0]}'?"
                if close
                else (f"{self.name} declares: {', '.join(sorted(self._events))}")
            )
            raise UnknownEvent(self.name, str(event), hint)

    def _choose(
        self,
        rows: tuple[_Row, ...],
        record: InstanceRecord,
        payload: Payload | None,
        actor: str,
        now: int,
    ) -> _Row | None:
        context: TransitionContext | None = None
        for row in rows:
            check = row.guard_fn
            if check is None:
                return row
            if context is None:
                context = TransitionContext(
                    self.name,
                    record.instance,
                    record.state,
                    row.event,
                    payload,
                    actor,
                    record.version,
                    now,
                )
            try:
                held = check(context)
            except Exception as exc:
                raise ActionFailed(self.name, str(row.guard), exc, role="guard") from exc
            if held:
                return row
        return None

    def _run_actions(
        self,
        actions: tuple[tuple[str, Action], ...],
        event: str,
        target: str | None,
        record: InstanceRecord,
        payload: Payload | None,
        actor: str,
        now: int,
        timer: str | None = None,
    ) -> Mapping[str, object]:
        if not actions:
            return _EMPTY_RESULTS
        context = TransitionContext(
            self.name,
            record.instance,
            record.state,
            event,
            payload,
            actor,
            record.version,
            now,
            target,
            timer,
        )
        results: dict[str, object] = {}
        for name, function in actions:
            try:
                results[name] = function(context)
            except Exception as exc:
                raise ActionFailed(self.name, name, exc) from exc
        return results

    def _no_guard(self, record: InstanceRecord, rows: tuple[_Row, ...]) -> NoGuardHeld:
        guards = tuple(str(r.guard) for r in rows if r.guard is not None)
        return NoGuardHeld(self.name, record.instance, record.state, rows[0].event, guards)

    def _dispatch(
        self,
        instance_id: str,
        event: str,
        payload: Mapping[str, Any] | Payload | None,
        actor: str,
        event_id: str | None,
        idempotency_key: str | None,
        expected_version: int | None,
        record_rejection: bool,
    ) -> DispatchResult:
        self._check_event(event)
        event = str(event)
        validated, payload_sha256 = self._validate(event, payload)
        request = (
            None if idempotency_key is None else _request_digest(instance_id, event, payload_sha256)
        )
        name = self.name
        runtime = self.runtime
        sealer = runtime._sealer

        def work(txn: Transaction, chain: _Chain) -> DispatchResult | _Rejected:
            if event_id is not None:
                stored = txn.processed(name, event_id)
                if stored is not None:
                    return _result_from_json(stored)
            if idempotency_key is not None:
                known = txn.idempotency(name, idempotency_key)
                if known is not None:
                    if known[0] != request:
                        raise IdempotencyConflict(name, idempotency_key)
                    return _result_from_json(known[1])
            record = txn.instance(name, instance_id)
            if record is None:
                raise UnknownInstance(name, instance_id)
            if expected_version is not None and record.version != expected_version:
                raise ConcurrentUpdateDetected(name, instance_id, expected_version, record.version)
            now = runtime._clock.now_ms()
            state = record.state
            rows = self._rows.get((state, event))
            rejection: InvalidTransition
            if rows is None:
                if event in self._ignored.get(state, ()):
                    return DispatchResult(
                        name,
                        instance_id,
                        event,
                        state,
                        state,
                        record.version,
                        None,
                        event_id,
                        (),
                        (),
                        _EMPTY_RESULTS,
                        (),
                        ignored=True,
                    )
                rejection = InvalidTransition(
                    name, instance_id, state, event, accepted=self.accepts(state)
                )
            else:
                row = self._choose(rows, record, validated, actor, now)
                if row is not None:
                    return self._apply(
                        txn,
                        chain,
                        record,
                        row,
                        validated,
                        payload_sha256,
                        actor,
                        now,
                        event_id,
                        idempotency_key,
                        request,
                    )
                rejection = self._no_guard(record, rows)
            if not record_rejection or sealer is None:
                raise rejection
            data = EntryData(
                now,
                "rejection",
                name,
                instance_id,
                state,
                state,
                event,
                actor,
                event_id or "",
                payload_sha256,
            )
            entry = chain.seal(txn, data)
            txn.append_ledger(entry)
            chain.advance(entry)
            rejection.ledger_seq = entry.seq
            return _Rejected(rejection)

        outcome = runtime._submit(work)
        if type(outcome) is _Rejected:
            raise outcome.error
        return cast(DispatchResult, outcome)

    def _apply(
        self,
        txn: Transaction,
        chain: _Chain,
        record: InstanceRecord,
        row: _Row,
        payload: Payload | None,
        payload_sha256: bytes,
        actor: str,
        now: int,
        event_id: str | None,
        idempotency_key: str | None,
        request: bytes | None,
    ) -> DispatchResult:
        """Run the chosen row's actions, then write everything of the transition."""
        name = self.name
        instance_id = record.instance
        runtime = self.runtime
        results = (
            self._run_actions(row.actions, row.event, row.target, record, payload, actor, now)
            if row.actions
            else _EMPTY_RESULTS
        )
        version = record.version + 1
        armed = arm_timers(name, instance_id, row.arms, now, version) if row.arms else ()
        emitted: tuple[EmittedEvent, ...] = ()
        bodies: list[str] = []
        if row.emits:
            emitted = tuple(
                EmittedEvent(
                    emit.machine,
                    instance_id,
                    emit.event,
                    derive_event_id("emit", name, instance_id, version, index),
                )
                for index, emit in enumerate(row.emits)
            )
            bodies = [emit.body(payload, instance_id, actor, row.event) for emit in row.emits]
        entry = None
        if runtime._sealer is not None:
            data = _new_entry_data(
                EntryData,
                (
                    now,
                    "transition",
                    name,
                    instance_id,
                    record.state,
                    row.target,
                    row.event,
                    actor,
                    event_id or "",
                    payload_sha256,
                ),
            )
            entry = chain.seal(txn, data)
        result = DispatchResult(
            name,
            instance_id,
            row.event,
            record.state,
            row.target,
            version,
            None if entry is None else entry.seq,
            event_id,
            emitted,
            (),
            results,
            armed,
        )
        stored = ""
        if event_id is not None or idempotency_key is not None:
            try:
                stored = _result_to_json(result)
            except (TypeError, ValueError, PydanticSerializationError) as exc:
                # The result is stored for repeats, so it must be JSON: fail before writing.
                raise ActionFailed(name, ", ".join(results), exc, role="result of") from exc
        # Writes: nothing above this line has touched the store.
        txn.update_instance(name, instance_id, row.target, version, record.version)
        if row.cancels:
            txn.cancel_timers(name, instance_id)
        if armed:
            txn.arm_timers(armed)
        if emitted:
            txn.add_outbox(
                [
                    _event_message(name, instance_id, version, e, now, body)
                    for e, body in zip(emitted, bodies, strict=True)
                ]
            )
        if entry is not None:
            txn.append_ledger(entry)
            if version % runtime._snapshot_every == 0:
                runtime._snapshot(txn, name, instance_id, version, row.target, entry)
        if event_id is not None:
            txn.record_processed(name, event_id, instance_id, stored, now)
        if idempotency_key is not None and request is not None:
            txn.record_idempotency(name, idempotency_key, request, stored, now)
        if entry is not None:
            chain.advance(entry)
        return result

    # -- timers --------------------------------------------------------------------------------

    def _fire_work(
        self, timer: ArmedTimer, now: int
    ) -> Callable[[Transaction, _Chain], TimerFiring | None]:
        name = self.name
        runtime = self.runtime

        def work(txn: Transaction, chain: _Chain) -> TimerFiring | None:
            if not txn.timer_armed(timer):
                return None  # fired by someone else, or cancelled since it was listed
            record = txn.instance(name, timer.instance)
            spec = self._timer_specs.get(timer.timer_id)
            if record is None or spec is None or record.state != timer.state:
                txn.take_timer(timer)  # a timer of a state already left (or an older machine)
                return None
            target = spec.target
            to_state = record.state if target is None else str(target)
            kind = "escalation" if spec.kind.startswith("escalation") else "timer"
            results = self._run_actions(
                self._timer_actions[spec.id],
                spec.id,
                None if target is None else to_state,
                record,
                None,
                runtime._timer_actor,
                now,
                spec.id,
            )
            version = record.version + 1
            armed: tuple[ArmedTimer, ...] = ()
            if target is not None:
                # Entered at the due time: a ladder missed while down keeps its spacing.
                armed = arm_timers(
                    name, timer.instance, self._timers.get(to_state, ()), timer.due_ms, version
                )
            notifications: tuple[Notification, ...] = ()
            if spec.notify is not None:
                notify = spec.notify
                deadline = None if notify.within_ms is None else now + notify.within_ms
                notifications = (
                    Notification(
                        name,
                        timer.instance,
                        record.state,
                        spec.ladder,
                        spec.step,
                        notify.kind,
                        notify.recipient,
                        notify.message,
                        now,
                        deadline,
                        derive_event_id("notify", name, timer.instance, version),
                    ),
                )
            emits = self._timer_emits[spec.id]
            emitted = tuple(
                EmittedEvent(
                    emit.machine,
                    timer.instance,
                    emit.event,
                    derive_event_id("emit", name, timer.instance, version, index),
                )
                for index, emit in enumerate(emits)
            )
            # A timer has no causing payload: its emits' arguments are literals and context.
            actor = runtime._timer_actor
            bodies = [emit.body(None, timer.instance, actor, spec.id) for emit in emits]
            firing_id = derive_event_id(
                "timer", name, timer.instance, timer.timer_id, timer.armed_version
            )
            entry = None
            if runtime._sealer is not None:
                body = {
                    "timer": spec.id,
                    "due_ms": timer.due_ms,
                    "notify": [n._asdict() for n in notifications],
                }
                data = EntryData(
                    now,
                    kind,
                    name,
                    timer.instance,
                    record.state,
                    to_state,
                    spec.id,
                    runtime._timer_actor,
                    firing_id,
                    payload_digest(body),
                )
                entry = chain.seal(txn, data)
            result = DispatchResult(
                name,
                timer.instance,
                spec.id,
                record.state,
                to_state,
                version,
                None if entry is None else entry.seq,
                firing_id,
                emitted,
                notifications,
                results,
                armed,
            )
            if not txn.take_timer(timer):
                raise StoreIntegrityError(f"timer {timer.timer_id} vanished inside a transaction")
            txn.update_instance(name, timer.instance, to_state, version, version - 1)
            if target is not None:
                txn.cancel_timers(name, timer.instance)
                if armed:
                    txn.arm_timers(armed)
            messages = [_notification_message(n, version) for n in notifications]
            messages += [
                _event_message(name, timer.instance, version, e, now, body)
                for e, body in zip(emitted, bodies, strict=True)
            ]
            if messages:
                txn.add_outbox(messages)
            if entry is not None:
                txn.append_ledger(entry)
                if version % runtime._snapshot_every == 0:
                    runtime._snapshot(txn, name, timer.instance, version, to_state, entry)
                chain.advance(entry)
            return TimerFiring(timer, kind, result)

        return work


def _event_message(
    machine: str, instance: str, version: int, emitted: EmittedEvent, now: int, body: str
) -> OutboxMessage:
    return OutboxMessage(
        None,
        "event",
        machine,
        instance,
        version,
        emitted.machine,
        emitted.instance,
        emitted.event,
        emitted.event_id,
        body,
        now,
    )


def _notification_message(notification: Notification, version: int) -> OutboxMessage:
    return OutboxMessage(
        None,
        "notification",
        notification.machine,
        notification.instance,
        version,
        notification.kind,
        notification.recipient,
        notification.ladder or "",
        notification.event_id,
        _dumps(notification._asdict()),
        notification.fired_ms,
    )


# ---------------------------------------------------------------------------------------------
# The runtime.


class Runtime:
    """Owns the store, the clock, the ledger sealer and the loaded governors.

    `store` defaults to a MemoryStore. `sealer` None runs without an audit ledger (no entries,
    no replay). `checkpoint_every`: in checkpoint mode, sign a checkpoint when at least this
    many entries are not yet covered at the end of a commit batch. The SQLite store commits
    each batch of concurrent dispatches together, so 1 means one checkpoint per commit; the
    memory store commits every dispatch on its own, so benchmarks raise it. `close()` signs
    the rest. `snapshot_every`: store a snapshot of an instance every N versions.
    `dedup_retention_ms`: processed event ids and idempotency keys older than this are
    forgotten by `purge_expired`.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        clock: Clock | None = None,
        sealer: LedgerSealer | None = None,
        checkpoint_every: int = 1,
        snapshot_every: int = 100,
        dedup_retention_ms: int = 7 * DAY_MS,
        timer_actor: str = TIMER_ACTOR,
        max_batch: int = 512,
    ) -> None:
        if checkpoint_every < 1 or snapshot_every < 1 or dedup_retention_ms < 0:
            raise ValueError("checkpoint_every and snapshot_every must be >= 1, retention >= 0")
        self._store: Store = MemoryStore() if store is None else store
        self._memory = self._store if isinstance(self._store, MemoryStore) else None
        self._clock: Clock = SystemClock() if clock is None else clock
        self._sealer = sealer
        self._checkpoint_every = checkpoint_every
        self._snapshot_every = snapshot_every
        self._retention_ms = dedup_retention_ms
        self._timer_actor = timer_actor
        self._governors: dict[str, Governor] = {}
        self._verified_head: LedgerEntry | None = None
        # The thread running units of work right now: a guard or action that dispatches
        # from inside one would wait for itself.
        self._working_thread: int | None = None
        self._covered = 0
        self._chain = _Chain(self)  # the memory store's chain, kept across its commits
        self._committer: GroupCommit[Callable[[Transaction, _Chain], Any]] = GroupCommit(
            self._run_batch, max_batch=max_batch
        )
        recorded = self._store.ledger_mode()
        if sealer is None and recorded is not None:
            raise StoreConfigError(
                f"the store keeps an audit ledger ({recorded} mode): changes without a ledger "
                "entry would go unrecorded",
                hint="pass sealer=LedgerSealer(load_signer(KEYS), mode) to the Runtime",
            )
        if sealer is not None:
            if recorded is None:
                self._store.set_ledger_mode(sealer.mode)
            elif recorded != sealer.mode:
                raise StoreConfigError(
                    f"the store's ledger is in {recorded} mode; this runtime signs in "
                    f"{sealer.mode} mode",
                    hint="one ledger keeps one mode: open it with the mode it was written in",
                )
            last = self._store.checkpoints()[-1:] if self._memory is not None else []
            self._covered = last[0].size if last else 0

    # -- governors -----------------------------------------------------------------------------

    def load(
        self,
        spec: MachineSpec,
        guards: Mapping[str, Callable[..., Any]] | None = None,
        actions: Mapping[str, Callable[..., Any]] | None = None,
    ) -> Governor:
        """Bind guards and actions (BindingError lists every problem) and build the tables."""
        if spec.name in self._governors:
            raise ValueError(f"a governor named {spec.name!r} is already loaded")
        bound_guards, bound_actions = bind(spec, guards or {}, actions or {})
        governor = Governor(self, spec, bound_guards, bound_actions)
        self._governors[spec.name] = governor
        return governor

    def governor(self, machine: str) -> Governor:
        found = self._governors.get(machine)
        if found is None:
            raise UnknownMachine(machine, tuple(sorted(self._governors)))
        return found

    @property
    def governors(self) -> Mapping[str, Governor]:
        return MappingProxyType(self._governors)

    @property
    def store(self) -> Store:
        return self._store

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def sealer(self) -> LedgerSealer | None:
        return self._sealer

    @property
    def commit_batches(self) -> int:
        """How many commit batches the group committer ran (memory store: 0)."""
        return self._committer.batches

    # -- running work --------------------------------------------------------------------------

    def _submit(self, work: Callable[[Transaction, _Chain], T]) -> T:
        me = threading.get_ident()
        if self._working_thread == me:
            raise NestedDispatch()
        memory = self._memory
        if memory is not None:
            with memory.lock:
                self._working_thread = me
                try:
                    chain = self._chain
                    chain.loaded = False
                    value = work(memory, chain)
                    chain.finish(memory)
                finally:
                    self._working_thread = None
            return value
        return cast(T, self._committer.submit(work))

    def _submit_many(
        self, works: Sequence[Callable[[Transaction, _Chain], T]]
    ) -> list[WorkOutcome[T]]:
        """Run units in order; with a transactional store, in one commit batch if possible."""
        if self._memory is None:
            return self._committer.submit_many(works)
        outcomes: list[WorkOutcome[T]] = []
        for work in works:
            try:
                outcomes.append(WorkOutcome(self._submit(work), None))
            except Exception as exc:
                outcomes.append(WorkOutcome(None, exc))
        return outcomes

    def _run_batch(
        self, works: list[Callable[[Transaction, _Chain], object]]
    ) -> list[WorkOutcome[object]]:
        chain = _Chain(self)

        def unit(work: Callable[[Transaction, _Chain], object]) -> Callable[[Transaction], object]:
            def run(txn: Transaction) -> object:
                saved = (chain.next_seq, chain.head, chain.appended, chain.loaded)
                try:
                    return work(txn, chain)
                except BaseException:
                    # The store rolls this unit back; so does the chain.
                    chain.next_seq, chain.head, chain.appended, chain.loaded = saved
                    raise

            return run

        self._working_thread = threading.get_ident()
        try:
            return self._store.run([unit(w) for w in works], before_commit=chain.finish)
        finally:
            self._working_thread = None

    def _snapshot(
        self,
        txn: Transaction,
        machine: str,
        instance: str,
        version: int,
        state: str,
        entry: LedgerEntry,
    ) -> None:
        txn.save_snapshot(Snapshot(machine, instance, version, state, entry.seq, entry.entry_hash))

    # -- timers --------------------------------------------------------------------------------

    def fire_due(self, now: int | None = None, *, limit: int = 1000) -> list[TimerFiring]:
        """Fire every timer due at `now` (default: the clock), earliest first, each exactly
        once; timers armed by these firings that are already due fire too."""
        instant = self._clock.now_ms() if now is None else now
        machines = sorted(self._governors)
        fired: list[TimerFiring] = []
        failed: list[BaseException] = []
        skip: set[ArmedTimer] = set()
        for _ in range(10_000):
            due = [t for t in self._store.due_timers(instant, machines, limit + len(skip))]
            due = [t for t in due if t not in skip][:limit]
            if not due:
                break
            works = [self._governors[t.machine]._fire_work(t, instant) for t in due]
            for timer, outcome in zip(due, self._submit_many(works), strict=True):
                if outcome.error is not None:
                    # The timer stays armed and due: the next call tries it again.
                    failed.append(outcome.error)
                    skip.add(timer)
                elif outcome.value is not None:
                    fired.append(outcome.value)
        if failed:
            raise failed[0]
        return fired

    def next_deadline(self) -> int | None:
        """The earliest armed deadline of a loaded governor, or None."""
        timers = [t for t in self._store.armed_timers() if t.machine in self._governors]
        return min((t.due_ms for t in timers), default=None)

    # -- outbox --------------------------------------------------------------------------------

    def deliver_outbox(self, *, limit: int = 1000) -> list[Delivery]:
        """Deliver pending emitted events to their governors in order, each with its derived
        event id (a repeated delivery is deduplicated by the receiver) and the payload built
        when it was emitted from the emit's arguments. An event its receiver rejects (also for
        its payload) is marked failed with the reason; one for a governor not loaded here stays
        pending."""
        deliveries: list[Delivery] = []
        for message in self._store.outbox(kind="event", status="pending", limit=limit):
            governor = self._governors.get(message.target_machine)
            if governor is None:
                deliveries.append(Delivery(message, "skipped", None, "governor not loaded"))
                continue
            try:
                payload = json.loads(message.body) if message.body else {}
            except ValueError:
                payload = message.body  # not JSON: the receiver refuses it as PayloadInvalid
            try:
                result = governor.dispatch(
                    message.target_instance,
                    message.event,
                    payload or None,
                    actor=f"{message.machine}:{message.instance}",
                    event_id=message.event_id,
                )
            except (
                InvalidTransition,
                UnknownInstance,
                UnknownEvent,
                PayloadInvalid,
                ActionFailed,
            ) as exc:
                error = f"{exc.code} {exc.message}"
                self._mark(message, "failed", error)
                deliveries.append(Delivery(message, "failed", None, error))
                continue
            self._mark(message, "delivered", None)
            deliveries.append(Delivery(message, "delivered", result, None))
        return deliveries

    def _mark(self, message: OutboxMessage, status: OutboxStatus, error: str | None) -> None:
        message_id = message.id
        assert message_id is not None

        def work(txn: Transaction, chain: _Chain) -> None:
            txn.mark_outbox(message_id, status, error)

        self._submit(work)

    def notifications(self, *, status: OutboxStatus | None = "pending") -> list[OutboxMessage]:
        """Escalation notifications in the outbox (JSON body: recipient, message, deadline)."""
        return self._store.outbox(kind="notification", status=status)

    def acknowledge(self, message: OutboxMessage) -> None:
        """Mark a notification (or event) as handled by whoever delivered it."""
        self._mark(message, "delivered", None)

    # -- retention, checkpoints, replay, verification ------------------------------------------

    def purge_expired(self, now: int | None = None) -> tuple[int, int]:
        """Forget processed event ids and idempotency keys older than the retention window;
        returns (event ids, idempotency keys) removed. A repeat after this is processed anew."""
        instant = self._clock.now_ms() if now is None else now
        before = instant - self._retention_ms

        def work(txn: Transaction, chain: _Chain) -> tuple[int, int]:
            return txn.purge_dedup(before)

        return self._submit(work)

    def checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint over every entry now (checkpoint mode); None if nothing is new."""
        sealer = self._sealer
        if sealer is None or sealer.mode != "checkpoint":
            return None

        def work(txn: Transaction, chain: _Chain) -> Checkpoint | None:
            chain.load(txn)
            last = txn.last_checkpoint()
            if chain.next_seq == 0 or (last is not None and last.size >= chain.next_seq):
                return None
            signed = sealer.checkpoint(chain.next_seq, chain.head, self._clock.now_ms())
            txn.add_checkpoint(signed)
            self._covered = chain.next_seq
            return signed

        return self._submit(work)

    def replay(self, machine: str, instance: str, *, use_snapshot: bool = True) -> ReplayedState:
        """Rebuild an instance's state from its ledger entries, from its latest snapshot on
        (verified against the entry it names) or from the start. Every entry read is checked
        against its hash, and each must start where the previous one ended."""
        store = self._store
        state: str | None = None
        version = 0
        after = -1
        snapshot_version: int | None = None
        if use_snapshot:
            snapshot = store.latest_snapshot(machine, instance)
            if snapshot is not None:
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
            if entry.kind == "rejection":
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
        return ReplayedState(
            machine, instance, state, version, last_seq, snapshot_version, replayed
        )

    def verify(self, keyring: Keyring) -> VerifyReport:
        """Verify the whole stored ledger (every entry, checkpoint and signature)."""
        mode = self._sealer.mode if self._sealer is not None else self._store.ledger_mode()
        return verify_entries(
            self._store.ledger_entries(),
            keyring,
            checkpoints=self._store.checkpoints(),
            mode=mode,
        )

    def ledger(self) -> Iterator[LedgerEntry]:
        return self._store.ledger_entries()

    def close(self) -> None:
        """Sign the remaining entries (checkpoint mode), then close the store (also when the
        signing fails, for example on a ledger that no longer verifies: that error is raised)."""
        try:
            if self._sealer is not None and self._sealer.mode == "checkpoint":
                self.checkpoint()
        finally:
            self._store.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
