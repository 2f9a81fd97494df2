"""Dispatch over generated tables: a Governor runs one machine's events for the Runtime.

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
  the entry; leaving a state cancels its armed timers. The state's entry actions and emits
  (`entry do ...`) run in the same transaction as whatever entered it (a row, after its own
  actions; a timer; `create`), so they commit with it or not at all. A timer that moves the
  instance enters the target at the timer's due time, so a ladder missed while the process
  was down replays in order with its original spacing; the ledger timestamp is the actual
  firing time.
- Emitted events go to the instance with the same id in the target machine when
  `Runtime.deliver_outbox` runs, or with `emit ... to FIELD` to the instance whose id the
  emitting instance keeps in its data field FIELD (a row's `keep`s are written with its move;
  runtime/instance_data.py). An emit with `if refused Notice` also writes its notice, held,
  for the outbox to release to the emitting instance if the delivery is refused
  (runtime/outbox.py). Their payload is built when they are emitted, from the
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
- Except the actions a machine's `policy` names (they call the outside world, with retries,
  breaker, fallback and bulkhead around them): before the write transaction, dispatch reads
  what is committed (event id, idempotency key, the instance), decides the row, and runs
  those actions there, so their retries wait and their calls overlap outside the write lock
  (`dispatch_async` runs them in the runtime's action threads). The unit of work then decides
  again on the instance as it is now, and never calls those actions a second time: if the
  event is decided the same way (the same row: the instance did not move, or moved and came
  back to the same state, a self-transition say), it takes their results; if the instance
  moved to where the event is decided otherwise (another row, a rejection, ignored), the
  dispatch is refused with OutsideCallsSuperseded (R024, a ConcurrentUpdateDetected) that
  carries their results, and nothing of it is stored. A repeated event id or idempotency key
  found committed calls nothing, and every dispatch that runs such actions (`dispatch`,
  `dispatch_async`, `dispatch_many`, flow steps) holds a claim on its event id and idempotency
  key from before those calls until its commit, in this runtime and in the store
  (runtime/resilience/claims.py): a second dispatch of either, in any process on the store,
  waits, then finds the first's result committed and calls nothing (`dispatch_many` does not
  wait: that request fails with OutsideCallInProgress, R025).
- Every dispatch decides the same way (`_decide`: the row table built at load time, the
  guards in order, the ignore list, the rejection) and writes through one unit of work
  (`_step`, its inputs checked once by `_inputs`). On the memory store, its owning thread
  applies a row that only changes the state in place (no ledger, no event id, no payload),
  and runs every other unit itself, without a commit around it (the store commits as it
  writes); other threads, and every other store, submit the unit to the store's lock or to
  group commit. The hypothesis test in tests/test_interpreter.py holds the ways to the same
  answers.
- The payload digest (canonical JSON, SHA-256) is computed only when something needs it: a
  ledger entry or an idempotency key. The payload size bound measures that canonical JSON
  then, and pydantic's JSON of the payload otherwise (see runtime/inputs.py).
- `dispatch_async` and `create_async` are the same operations for asyncio: on a
  transactional store, the units of all waiting coroutines commit together (see
  `commit.AsyncBatcher`); guards and actions then run in the committing worker thread.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast, final

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from .bindings import Action, Guard
from .errors import (
    ActionFailed,
    ConcurrentUpdateDetected,
    IdempotencyConflict,
    InstanceExists,
    InvalidTransition,
    NoGuardHeld,
    OutsideCallsSuperseded,
    PayloadEncodingError,
    PayloadInvalid,
    UnknownEvent,
    UnknownInstance,
)
from .inputs import (
    InputLimits,
    capped_validator,
    check_identifier,
    check_payload_depth,
    check_payload_size,
    payload_error_message,
    payload_is_flat,
    payload_size_bound,
)
from .instance_data import dump_data, keep_fields, read_data, route
from .ledger import (
    EMPTY_PAYLOAD_DIGEST,
    KEPT,
    PAYLOAD_TAG,
    EntryData,
    LedgerEntry,
    canonical_json,
    kept_digest,
)
from .outbox import _event_message, _refusal_notices
from .replay import save_snapshot
from .results import (
    _EMPTY_RESULTS,
    DispatchResult,
    EmittedEvent,
    _new_result,
    _request_digest,
    _result_from_json,
    _result_to_json,
    _RowResult,
    _UnsealedResult,
    derive_event_id,
)
from .rows import _Absent, _EmitPlan, _Guarded, _Row
from .sealing import _Chain, _new_entry_data
from .store.base import ClaimKey, InstanceRecord, OutboxMessage, Transaction
from .store.memory import MemoryStore
from .tables import MachineSpec, Payload, TransitionContext
from .timers import ArmedTimer, TimerPlan, arm_timers

if TYPE_CHECKING:
    from .resilience.claims import Release
    from .runtime import Runtime

__all__ = ["CREATE_EVENT", "DEFAULT_ACTOR", "DispatchRequest", "Governor"]

CREATE_EVENT = "create"
DEFAULT_ACTOR = "system"

_get_ident = threading.get_ident
# Guard and action contexts are built with tuple.__new__, skipping the named tuple's __new__.
_new_context = cast(
    Callable[[type[TransitionContext], tuple[Any, ...]], TransitionContext], tuple.__new__
)
# (state, event) -> the key's only row when it is unguarded, else its rows in order.
_Entry = _Row | _Guarded | _Absent
_NO_ENTRIES: Mapping[str, _Entry] = MappingProxyType({})


class _NoOwner:
    """Stands in for the memory store on other stores: no thread owns it."""

    owner = None
    busy = 0


_NO_OWNER = _NoOwner()


class _Preran(NamedTuple):
    """Results of a row's outside actions, run before the unit of work on `version`."""

    version: int
    row: _Row
    results: Mapping[str, object]


# What `_inputs` checked, in `_step`'s order: instance id, event, payload, its digest, actor,
# event id, idempotency key, request digest, expected version, record_rejection, preran.
_UnitInputs = tuple[
    str,
    str,
    Payload | None,
    bytes,
    str,
    str | None,
    str | None,
    bytes | None,
    int | None,
    bool,
    _Preran | None,
]


class _Rejected(NamedTuple):
    """A rejection recorded in the ledger: raised to the caller after the commit."""

    error: InvalidTransition


def _settled(outcome: DispatchResult | _Rejected) -> DispatchResult:
    if type(outcome) is _Rejected:
        raise outcome.error
    return cast(DispatchResult, outcome)


def _json_size(payload: Payload) -> int:
    """The length of pydantic's JSON of a validated payload."""
    try:
        return len(payload.__pydantic_serializer__.to_json(payload))
    except PydanticSerializationError as exc:  # a lone surrogate in a string, say
        raise PayloadEncodingError(f"the payload cannot be written as JSON: {exc}") from None


def _validation_problems(error: ValidationError) -> tuple[tuple[str, str], ...]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(payload)"
        problems.append((where, payload_error_message(item)))
    return tuple(problems)


def _takes_no_payload(payload: object) -> Payload:
    raise AssertionError("an event without a model validates nothing")


@final
class _EventInput:
    """How dispatch checks one event's payload, decided at load time: the plain event name,
    the generated model (None: the event takes no payload), its validator, whether the model
    is flat (no depth check needed), and how the JSON size limit is kept (see inputs.py):
    `capped`, the validator refuses what could exceed it (what it refuses is validated again
    by `exact`, the model's own, and measured); else its JSON size bound, or None (measured)."""

    __slots__ = ("bound", "capped", "exact", "flat", "model", "name", "validate")

    def __init__(self, name: str, model: type[Payload] | None, limits: InputLimits) -> None:
        self.name = sys.intern(name)
        self.model = model
        self.validate: Callable[[object], Payload] = _takes_no_payload
        self.exact: Callable[[object], Payload] = _takes_no_payload
        self.capped = False
        self.flat = False
        self.bound: int | None = None
        if model is not None:
            # The validator model_validate calls, without its Python frame and options.
            self.validate = model.__pydantic_validator__.validate_python
            self.exact = self.validate
            self.flat = payload_is_flat(model)
            self.bound = payload_size_bound(model)
            capped = capped_validator(model, limits.max_payload_bytes) if self.flat else None
            if capped is not None:
                self.validate = capped
                self.capped = True


class DispatchRequest(NamedTuple):
    """One event for `Governor.dispatch_many`: `dispatch`'s arguments."""

    instance_id: str
    event: str
    payload: Mapping[str, Any] | Payload | None = None
    actor: str = DEFAULT_ACTOR
    event_id: str | None = None
    idempotency_key: str | None = None
    expected_version: int | None = None


class _Dispatch(Protocol):
    def __call__(
        self,
        instance_id: str,
        event: str,
        payload: Mapping[str, Any] | Payload | None = None,
        actor: str = DEFAULT_ACTOR,
        event_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
        record_rejection: bool = False,
    ) -> DispatchResult: ...


class Governor:
    """One loaded machine: dispatch, create and read its instances. Built by Runtime.load."""

    dispatch: _Dispatch
    """`dispatch(instance_id, event, payload=None, actor="system", event_id=None,
    idempotency_key=None, expected_version=None, record_rejection=False)`: apply `event` to
    the instance; see the module docstring for what is written. Raises UnknownInstance,
    UnknownEvent, PayloadInvalid (nothing stored), InvalidTransition / NoGuardHeld (nothing
    stored unless `record_rejection`, then a "rejection" ledger entry), ActionFailed,
    IdempotencyConflict, ConcurrentUpdateDetected."""

    def __init__(
        self,
        runtime: Runtime,
        spec: MachineSpec,
        guards: Mapping[str, Guard],
        actions: Mapping[str, Action],
        settings: Mapping[str, int] | None = None,
    ) -> None:
        self.runtime = runtime
        self._now_ms = runtime._clock.now_ms
        self.spec = spec
        self.name = spec.name
        timers = {str(state): specs for state, specs in spec.timers.items()}
        self._plan = plan = TimerPlan(spec)
        self._settings: Mapping[str, int] = dict(settings or {})
        self._rows: dict[tuple[str, str], tuple[_Row, ...]] = {
            (sys.intern(str(state)), sys.intern(str(event))): tuple(
                _Row(spec.name, r, guards, actions, plan) for r in rows
            )
            for (state, event), rows in spec.transitions.items()
        }
        # The table every dispatch decides by: state -> event -> entry. The states interned
        # like those records hold, the events the generated enum's members: lookups of
        # either then compare by identity (a str subclass compares slower than a str).
        self._table: dict[str, dict[str, _Entry]] = {
            sys.intern(str(state)): {} for state in spec.state_type
        }
        self._sealed = runtime._sealer is not None
        for (state, event), rows in self._rows.items():
            for row in rows:
                # Applied by dispatch's short path in place (with a ledger, through _apply).
                row.short = row.bare and not self._sealed
            only = rows[0]
            entry = only if len(rows) == 1 and only.guard_fn is None else _Guarded(rows)
            self._table.setdefault(state, {})[spec.event_type(event)] = entry
        self._events = frozenset(str(e) for e in spec.event_type)
        self._ignored = {str(s): frozenset(str(e) for e in es) for s, es in spec.ignored.items()}
        # Events with payload fields validate through the generated model; others take none.
        self._models: dict[str, type[Payload]] = {
            str(event): model for event, model in spec.payloads.items() if model.model_fields
        }
        # Keyed by the enum's members, like the table: what `_inputs` checks an event with.
        self._event_inputs: dict[str, _EventInput] = {
            member: _EventInput(str(member), self._models.get(str(member)), runtime._limits)
            for member in spec.event_type
        }
        self._timers = timers
        self._timer_specs = plan.specs
        self._timer_emits = {
            t.id: tuple(_EmitPlan(e) for e in t.emits) for t in self._timer_specs.values()
        }
        self._timer_actions = {
            t.id: tuple((a, actions[a]) for a in t.actions) for t in self._timer_specs.values()
        }
        # (receiver, event) of the emits with a refusal notice: their deliveries' notices.
        self._refusals = frozenset(
            (emit.machine, emit.event)
            for plans in (
                *(row.emits for rows in self._rows.values() for row in rows),
                *self._timer_emits.values(),
            )
            for emit in plans
            if emit.refused is not None
        )
        # Whether some row keeps data: its snapshots then name the newest kept entry.
        self._keeps = any(row.kept for rows in self._rows.values() for row in rows)
        # The data fields some emit is routed by: kept values must be instance ids.
        self._routes = frozenset(
            emit.to
            for plans in (
                *(row.emits for rows in self._rows.values() for row in rows),
                *self._timer_emits.values(),
            )
            for emit in plans
            if emit.to is not None
        )
        # Actions a policy names: they call the outside world, so dispatch runs them before
        # taking the write lock (see the module docstring).
        self._external = frozenset(a for p in spec.policies.values() for a in p.actions)
        # The events with a row that runs one: the only ones worth a look before the unit.
        self._external_events = frozenset(
            event
            for (_, event), rows in self._rows.items()
            for row in rows
            if any(a in self._external for a, _ in row.actions)
        )
        self._initial = sys.intern(str(spec.initial))
        self._accepts: dict[str, tuple[str, ...]] = {}
        for state, event in self._rows:
            self._accepts.setdefault(state, ())
            self._accepts[state] += (event,)
        # Every known event has an entry in every state: a lookup never misses for them.
        for state, entries in self._table.items():
            ignored = self._ignored.get(state, frozenset())
            for member in spec.event_type:
                if member not in entries:
                    entries[member] = _Absent(
                        self.name, state, str(member), str(member) in ignored, self.accepts(state)
                    )
        self._memory = runtime._memory
        self._records: dict[str, InstanceRecord] = (
            {} if self._memory is None else self._memory.records(self.name)
        )
        self.dispatch = self._dispatcher()

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
        Raises InputRejected (nothing stored) for a malformed instance id, actor or event id.
        """
        runtime = self.runtime
        work = self._create_work(instance_id, actor, event_id)
        return runtime._submit(work, runtime._partition_of(instance_id))

    async def create_async(
        self, instance_id: str, actor: str = DEFAULT_ACTOR, *, event_id: str | None = None
    ) -> DispatchResult:
        """`create` for asyncio: on a transactional store, it commits with the units of the
        other coroutines waiting at the same time (see the module docstring)."""
        runtime = self.runtime
        work = self._create_work(instance_id, actor, event_id)
        return await runtime._submit_async(work, runtime._partition_of(instance_id))

    def _create_work(
        self, instance_id: str, actor: str, event_id: str | None
    ) -> Callable[[Transaction, _Chain], DispatchResult]:
        check_identifier("instance id", instance_id)
        check_identifier("actor", actor)
        check_identifier("event id", event_id, optional=True)
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
            armed = arm_timers(
                name, instance_id, self._plan.on_create(initial), now, 1, None, self._settings
            )
            results, emitted, messages = self._enter_created(instance_id, actor, now)
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
                emitted,
                (),
                results,
                armed,
            )
            txn.insert_instance(InstanceRecord(name, instance_id, initial, 1))
            if armed:
                txn.arm_timers(armed)
            if messages:
                txn.add_outbox(messages)
            if entry is not None:
                txn.append_ledger(entry)
                if runtime._snapshot_every == 1:
                    save_snapshot(txn, name, instance_id, 1, initial, entry)
            if event_id is not None:
                txn.record_processed(name, event_id, instance_id, _result_to_json(result), now)
            if entry is not None:
                chain.advance(entry)
            return result

        return work

    def _enter_created(
        self, instance_id: str, actor: str, now: int
    ) -> tuple[Mapping[str, object], tuple[EmittedEvent, ...], list[OutboxMessage]]:
        """The initial state's entry actions, run for `create`: their results, emitted
        events and outbox messages (version 1)."""
        entering = self._plan.on_entry(self._initial)
        if not entering:
            return _EMPTY_RESULTS, (), []
        record = InstanceRecord(self.name, instance_id, "", 0)
        results: dict[str, object] = {}
        plans: list[_EmitPlan] = []
        for spec in entering:
            actions = self._timer_actions[spec.id]
            results.update(
                self._run_actions(actions, CREATE_EVENT, self._initial, record, None, actor, now)
            )
            plans.extend(self._timer_emits[spec.id])
        emitted = tuple(
            EmittedEvent(
                emit.machine,
                # A new instance keeps no data: a routed emit here is refused (E149).
                instance_id if emit.to is None else route(None, emit.to, self.name, instance_id),
                emit.event,
                derive_event_id("emit", self.name, instance_id, 1, index),
            )
            for index, emit in enumerate(plans)
        )
        messages = [
            _event_message(
                self.name, instance_id, 1, e, now, emit.body(None, instance_id, actor, CREATE_EVENT)
            )
            for e, emit in zip(emitted, plans, strict=True)
        ]
        messages += _refusal_notices(
            self.name, instance_id, 1, emitted, plans, None, actor, CREATE_EVENT, now
        )
        return results or _EMPTY_RESULTS, emitted, messages

    # -- dispatching ---------------------------------------------------------------------------

    def _dispatcher(self) -> _Dispatch:
        """Build `dispatch`: a closure over this governor's tables, which skips a dozen
        attribute reads per event (a fifth of a short dispatch)."""
        memory = self._memory
        runtime = self.runtime
        # Owned by no thread: on other stores the short path is never taken.
        owned: MemoryStore | _NoOwner = _NO_OWNER if memory is None else memory
        records = self._records
        # Entries as Any: `short` is true only on a _Row, which mypy cannot narrow by.
        table: dict[str, dict[str, Any]] = self._table
        sealed = self._sealed
        inputs_of = self._inputs
        step = self._step
        chain = runtime._chain
        commit_in_memory = runtime._commit_in_memory
        # Their actions run before the unit (see the module docstring): through `prepare`.
        external = self._external_events
        prepare = self._run_prepared if self._external else None
        without_row = self._without_row
        apply = self._apply
        now_ms = self._now_ms
        submit = runtime._submit
        partition_of = runtime._partition_of
        new_result = _UnsealedResult
        get_ident = _get_ident

        # The store the owning thread runs units on: only used when `owned` is the memory store.
        mine = cast(MemoryStore, owned)

        def rest(
            instance_id: str,
            event: str,
            payload: Mapping[str, Any] | Payload | None,
            actor: str,
            event_id: str | None,
            idempotency_key: str | None,
            expected_version: int | None,
            record_rejection: bool,
        ) -> DispatchResult:
            """Every dispatch but the short path's: the memory store's owning thread runs the
            unit of work itself, without a commit around it (the store commits as it writes);
            other threads and stores submit it."""
            unit = inputs_of(
                instance_id,
                event,
                payload,
                actor,
                event_id,
                idempotency_key,
                expected_version,
                record_rejection,
            )
            me = get_ident()
            if owned.owner != me or owned.busy or (prepare is not None and event in external):
                work = partial(step, unit)  # as _work makes it
                if prepare is not None:
                    return prepare(work, partition_of(instance_id))
                return _settled(submit(work, partition_of(instance_id)))
            # As _submit_unit marks a unit: a dispatch from its guards and actions is refused
            # (NestedDispatch).
            owned.busy = 1
            runtime._working_thread = me
            try:
                outcome = commit_in_memory(mine, step, unit) if sealed else step(unit, mine, chain)
            finally:
                runtime._working_thread = None
                owned.busy = 0
            if type(outcome) is _Rejected:
                raise outcome.error
            return outcome  # type: ignore[return-value]  # not _Rejected

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
                and owned.owner == get_ident()
                and not owned.busy  # not from a guard or action of this thread's unit
            ):
                # The memory store's owning thread (see store/memory.py): decided here, and
                # applied here if the row changes the state and nothing else.
                try:
                    record = records[instance_id]
                    found = table[record.state][event]
                except KeyError:
                    pass  # an unknown instance, state or event: the unit of work says so
                else:
                    if found.short:
                        version = record.version + 1
                        record.state = found.target
                        record.version = version
                        result: DispatchResult = new_result()
                        result._instance = instance_id
                        result._version = version
                        result._outcome = found.outcome
                        return result
                    if found.absent:
                        if found.ignored:
                            return without_row(record, found, None)
                        if not (record_rejection and sealed):
                            raise found.rejection(instance_id)
                    elif sealed and found.bare:
                        # No guard or action runs: the unit's own writes (_apply: the entry
                        # sealed on the verified head, the state, a snapshot) without the
                        # unit around them.
                        return commit_in_memory(
                            owned,
                            apply,
                            record,
                            found,
                            None,
                            EMPTY_PAYLOAD_DIGEST,
                            actor,
                            now_ms(),
                            None,
                            None,
                            None,
                            None,
                        )
            return rest(
                instance_id,
                event,
                payload,
                actor,
                event_id,
                idempotency_key,
                expected_version,
                record_rejection,
            )

        if memory is not None:
            memory.run_unlocked(dispatch.__code__)
            memory.run_unlocked(rest.__code__)
            # Where the thread that is no longer the owner goes from `rest`: to the lock.
            memory.leaves_unlocked(Governor._run_prepared.__code__)
            memory.leaves_unlocked(type(runtime)._submit.__code__)
        return dispatch

    async def dispatch_async(
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
        """`dispatch` for asyncio: the same checks, writes and errors. On a transactional
        store the coroutine waits, without blocking its event loop, for the commit that holds
        its unit of work; the units of every coroutine waiting meanwhile commit together, so
        many concurrent dispatchers share each fsync. On the memory store it runs at once."""
        work = self._work(
            instance_id,
            event,
            payload,
            actor,
            event_id,
            idempotency_key,
            expected_version,
            record_rejection,
        )
        runtime = self.runtime
        partition = runtime._partition_of(instance_id)
        if not self._external:
            return _settled(await runtime._submit_async(work, partition))
        loop = asyncio.get_running_loop()
        pool = runtime._action_threads()
        keys = self._claim_keys(work)
        outside = runtime._outside
        release = None
        while keys:  # claimed here, in the loop's thread: a cancelled wait leaves no claim
            release, busy = outside.try_local(keys)
            if busy is None:
                break
            await loop.run_in_executor(pool, busy.wait)
        held: Release | None = None
        try:
            if keys:
                held = await loop.run_in_executor(pool, outside.hold, keys, self._committed(work))
            work = await loop.run_in_executor(pool, self._prepare, work)
            return _settled(await runtime._submit_async(work, partition))
        finally:
            try:
                if held is not None:
                    held()
            finally:
                if release is not None:
                    release()

    def dispatch_many(
        self, requests: Sequence[DispatchRequest]
    ) -> list[DispatchResult | Exception]:
        """Dispatch every request, in order, in one commit where the store batches commits
        (SQLite: one transaction for up to `max_batch` units); each request succeeds or fails
        on its own, as `dispatch` would, and its slot holds the result or the error."""
        results: list[DispatchResult | Exception | None] = [None] * len(requests)
        works = []
        slots = []
        # The claims this batch holds: a request repeating one of them is not prepared (its
        # unit finds the earlier one's result in the batch); one held elsewhere is refused.
        claimed: dict[ClaimKey, int] = {}  # -> the index of the request that claimed it
        releases: list[Release] = []
        try:
            for index, r in enumerate(requests):
                try:
                    work = self._work(
                        r.instance_id,
                        r.event,
                        r.payload,
                        r.actor,
                        r.event_id,
                        r.idempotency_key,
                        r.expected_version,
                        False,
                    )
                    keys = self._claim_keys(work)
                    earlier = next((claimed[k] for k in keys if k in claimed), None)
                    if earlier is not None:
                        failed = results[earlier]
                        if isinstance(failed, Exception):  # its outside call failed: not again
                            raise failed
                        works.append(work)
                        slots.append(index)
                        continue
                    if keys:
                        release = self.runtime._outside.claim(
                            keys, self._committed(work), wait=False
                        )
                        if release is not None:
                            releases.append(release)
                            claimed.update(dict.fromkeys(keys, index))
                    # A failed call's breaker change goes in the batch (not alone).
                    works.append(self._prepare(work, alone=False))
                    slots.append(index)
                except Exception as error:  # invalid payload or event, a call failed or busy
                    results[index] = error
            partition_of = self.runtime._partition_of
            partitions = [partition_of(requests[index].instance_id) for index in slots]
            done = self.runtime._submit_many(works, partitions)
        finally:
            for release in releases:
                release()
        for index, outcome in zip(slots, done, strict=True):
            value, failure = outcome.value, outcome.error
            if failure is not None and not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt and the like stop the whole batch
            if failure is not None:
                results[index] = failure
            elif type(value) is _Rejected:
                results[index] = value.error
            else:
                results[index] = cast(DispatchResult, value)
        return cast(list[DispatchResult | Exception], results)

    def _work(
        self,
        instance_id: str,
        event: str,
        payload: Mapping[str, Any] | Payload | None,
        actor: str,
        event_id: str | None,
        idempotency_key: str | None,
        expected_version: int | None,
        record_rejection: bool,
    ) -> partial[DispatchResult | _Rejected]:
        """The unit of work that decides and writes the transition, its inputs checked."""
        return partial(
            self._step,
            self._inputs(
                instance_id,
                event,
                payload,
                actor,
                event_id,
                idempotency_key,
                expected_version,
                record_rejection,
            ),
        )

    def _inputs(
        self,
        instance_id: str,
        event: str,
        payload: Mapping[str, Any] | Payload | None,
        actor: str,
        event_id: str | None,
        idempotency_key: str | None,
        expected_version: int | None,
        record_rejection: bool,
    ) -> _UnitInputs:
        """Check the identifiers and the event, validate the payload and its bounds (nothing is
        stored yet): what the unit of work (`_step`) takes."""
        # An instance the memory store holds was checked when it was created.
        if type(instance_id) is not str or instance_id not in self._records:
            check_identifier("instance id", instance_id)
        if actor is not DEFAULT_ACTOR:
            check_identifier("actor", actor)
        if event_id is not None:
            check_identifier("event id", event_id)
        if idempotency_key is not None:
            check_identifier("idempotency key", idempotency_key)
        plan = self._event_inputs.get(event)
        if plan is None:
            raise self._unknown_event(event)
        event = plan.name
        model = plan.model
        validated: Payload | None
        fits = False  # the validator refused any payload over the size limit (plan.capped)
        if model is None:
            validated = None
            if payload is not None:
                self._refuse_payload(event, payload)
        elif type(payload) is model:
            validated = payload
        else:
            if payload is not None and not plan.flat:
                check_payload_depth(payload, self.runtime._limits)
            data = {} if payload is None else payload
            try:
                validated = plan.validate(data)
            except ValidationError as exc:
                validated = self._refused(plan, payload, data, exc)
            else:
                fits = plan.capped
        digest = EMPTY_PAYLOAD_DIGEST
        if validated is not None:
            limits = self.runtime._limits
            if self._sealed or idempotency_key is not None:
                encoded = canonical_json(validated.model_dump(mode="json"))
                check_payload_size(len(encoded), limits)
                digest = hashlib.sha256(PAYLOAD_TAG + encoded).digest()
            elif not fits:
                # Nothing records a digest: the size bound needs only the JSON's length, and
                # a flat payload's is bounded by its values' text (see inputs.py) unless long.
                bound = plan.bound
                if (
                    bound is None
                    or bound + 6 * sum(map(len, map(str, validated.__dict__.values())))
                    > limits.max_payload_bytes
                ):
                    check_payload_size(_json_size(validated), limits)
        request = None if idempotency_key is None else _request_digest(instance_id, event, digest)
        return (
            instance_id,
            event,
            validated,
            digest,
            actor,
            event_id,
            idempotency_key,
            request,
            expected_version,
            record_rejection,
            None,
        )

    def _refused(
        self,
        plan: _EventInput,
        payload: Mapping[str, Any] | Payload | None,
        data: object,
        error: ValidationError,
    ) -> Payload:
        """A payload the event's validator refused: valid after all if only a cap of a capped
        validator refused it (the caller then measures its JSON), else PayloadInvalid with the
        model's own errors."""
        if plan.capped:
            try:
                return plan.exact(data)
            except ValidationError as exc:
                error = exc
        # A flat model walks no nested input, so its depth is checked only now: a payload
        # nested too deeply is refused as such, whatever else is wrong.
        if payload is not None and plan.flat:
            check_payload_depth(payload, self.runtime._limits)
        raise PayloadInvalid(self.name, plan.name, _validation_problems(error)) from None

    def _claim_keys(self, work: partial[DispatchResult | _Rejected]) -> tuple[ClaimKey, ...]:
        """What `work` claims while its outside actions run and its unit commits: its event id
        and idempotency key, if its event may run such actions (see OutsideClaims)."""
        args: _UnitInputs = work.args[0]
        if args[1] not in self._external_events:
            return ()
        name = self.name
        event_id, key = args[5], args[6]
        keys: tuple[ClaimKey, ...] = ()
        if event_id is not None:
            keys += ((name, "event", event_id),)
        if key is not None:
            keys += ((name, "key", key),)
        return keys

    def _committed(self, work: partial[DispatchResult | _Rejected]) -> Callable[[], bool]:
        """Whether the result of `work`'s event id or idempotency key is committed."""
        args: _UnitInputs = work.args[0]
        event_id, key = args[5], args[6]
        store, name = self.runtime._store, self.name

        def committed() -> bool:
            return (event_id is not None and store.processed(name, event_id) is not None) or (
                key is not None and store.idempotency(name, key) is not None
            )

        return committed

    def _run_prepared(
        self, work: partial[DispatchResult | _Rejected], partition: int
    ) -> DispatchResult:
        """Dispatch `work` with its outside actions run before its transaction, holding the
        claim on its event id and idempotency key from before they run until the commit: a
        concurrent dispatch of the same id or key, in this process or another, waits, then
        calls nothing (runtime/resilience/claims.py)."""
        keys = self._claim_keys(work)
        release = self.runtime._outside.claim(keys, self._committed(work)) if keys else None
        try:
            return _settled(self.runtime._submit(self._prepare(work), partition))
        finally:
            if release is not None:
                release()

    def _prepare(
        self, work: partial[DispatchResult | _Rejected], *, alone: bool = True
    ) -> partial[DispatchResult | _Rejected]:
        """`work` (from `_work`) with this machine's outside actions already run, outside any
        transaction, when the committed state says the unit will take a row that has some;
        else `work` itself. Raises ActionFailed (nothing stored) when one of them fails; the
        breaker changes of its calls are then written at once (`alone`), else left to the
        caller's next commit (dispatch_many: its batch, before it returns)."""
        inputs: _UnitInputs = work.args[0]
        if inputs[1] not in self._external_events:
            return work
        runtime = self.runtime
        try:
            preran = self._preflight(*inputs[:-1])
        except BaseException:
            # Nothing of the dispatch is stored: the breaker statuses its calls changed are
            # written on their own (or with a unit that took them), before the caller hears
            # of the failure. Otherwise the unit of work writes them in its transaction.
            if alone:
                runtime._settle_breakers()
            raise
        if runtime._partitioned is not None and runtime._breakers.pending:
            # A breaker whose entries go to another ledger chain than the dispatch's: stored
            # before the dispatch commits, so no committed dispatch lacks its breaker change.
            runtime._record_breaker_moves(keep=runtime._partition_of(inputs[0]))
        return work if preran is None else partial(self._step, (*inputs[:-1], preran))

    def _preflight(
        self,
        instance_id: str,
        event: str,
        payload: Payload | None,
        digest: bytes,
        actor: str,
        event_id: str | None,
        idempotency_key: str | None,
        request: bytes | None,
        expected_version: int | None,
        record_rejection: bool,
    ) -> _Preran | None:
        """Decide on the committed state, as `_step` will, and run the row's outside actions.
        None when the unit will not need them (a repeat, a rejection, no such actions): the
        unit then decides and raises as usual."""
        name = self.name
        store = self.runtime._store
        if event_id is not None and store.processed(name, event_id) is not None:
            return None
        if idempotency_key is not None and store.idempotency(name, idempotency_key) is not None:
            return None
        record = store.get_instance(name, instance_id)
        if record is None or expected_version not in (None, record.version):
            return None
        found = self._table.get(record.state, _NO_ENTRIES).get(event)
        if found is None or type(found) is _Absent:
            return None
        now = self.runtime._clock.now_ms()
        try:
            row = self._decide(found, record, payload, actor, now)
        except (InvalidTransition, ActionFailed):
            return None
        outside = tuple((a, f) for a, f in row.actions if a in self._external)
        if not outside:
            return None
        results = self._run_actions(outside, row.event, row.target, record, payload, actor, now)
        return _Preran(record.version, row, results)

    def _step(
        self, inputs: _UnitInputs, txn: Transaction, chain: _Chain
    ) -> DispatchResult | _Rejected:
        """The unit of work of one dispatch: deduplicate, read the instance, decide, write."""
        (
            instance_id,
            event,
            payload,
            digest,
            actor,
            event_id,
            idempotency_key,
            request,
            expected_version,
            record_rejection,
            preran,
        ) = inputs
        name = self.name
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
        # The memory store's own records (as the short path reads them), else a read.
        record = (
            self._records.get(instance_id)
            if txn is self._memory
            else txn.instance(name, instance_id)
        )
        if record is None:
            raise UnknownInstance(name, instance_id)
        if expected_version is not None and record.version != expected_version:
            if preran is not None:
                raise self._superseded(preran, record)
            raise ConcurrentUpdateDetected(name, instance_id, expected_version, record.version)
        found = self._table.get(record.state, _NO_ENTRIES).get(event)
        now = self._now_ms()
        try:
            if type(found) is _Row:
                row = found
            elif found is None:  # a state this machine does not declare
                raise InvalidTransition(name, instance_id, record.state, event)
            elif type(found) is _Absent:
                if preran is not None:
                    raise self._superseded(preran, record)
                return self._without_row(record, found, event_id)
            else:
                row = self._decide(found, record, payload, actor, now)
        except InvalidTransition as rejection:
            if preran is not None:
                raise self._superseded(preran, record) from rejection
            if not record_rejection or not self._sealed:
                raise
            return self._record_rejection(
                txn, chain, record, event, actor, event_id, digest, now, rejection
            )
        ran = None
        if preran is not None:
            # The outside actions ran before this transaction, on the version then committed.
            # If the instance moved meanwhile and the event is still decided the same way
            # (same state, same row), their results are this dispatch's; if it is decided
            # otherwise, they are not called again (they ran once): the dispatch is refused.
            if preran.row is not row:
                raise self._superseded(preran, record)
            ran = preran.results
        return self._apply(
            record,
            row,
            payload,
            digest,
            actor,
            now,
            event_id,
            idempotency_key,
            request,
            ran,
            txn,
            chain,
        )

    def _superseded(self, preran: _Preran, record: InstanceRecord) -> OutsideCallsSuperseded:
        return OutsideCallsSuperseded(
            self.name,
            record.instance,
            preran.version,
            record.version,
            tuple(preran.results),
            preran.results,
        )

    # -- deciding: the same for every dispatch --------------------------------------------------

    def _decide(
        self,
        found: _Row | _Guarded,
        record: InstanceRecord,
        payload: Payload | None,
        actor: str,
        now: int,
    ) -> _Row:
        """The row that applies: the key's only unguarded row, or the first whose guard holds
        (`else` last); NoGuardHeld if none does."""
        if type(found) is _Row:
            return found
        rows = found.rows
        context: TransitionContext | None = None
        for row in rows:
            check = row.guard_fn
            if check is None:
                return row
            if context is None:
                context = _new_context(
                    TransitionContext,
                    (
                        self.name,
                        record.instance,
                        record.state,
                        row.event,
                        payload,
                        actor,
                        record.version,
                        now,
                        None,
                        None,
                    ),
                )
            try:
                held = check(context)
            except Exception as exc:
                raise ActionFailed(self.name, str(row.guard), exc, role="guard") from exc
            if held:
                return row
        guards = tuple(str(r.guard) for r in rows if r.guard is not None)
        raise NoGuardHeld(self.name, record.instance, record.state, rows[0].event, guards)

    def _without_row(
        self, record: InstanceRecord, absent: _Absent, event_id: str | None
    ) -> DispatchResult:
        """(state, event) has no row: the result of an ignored event, else the rejection."""
        if not absent.ignored:
            raise absent.rejection(record.instance)
        outcome = absent.outcome
        if event_id is not None:
            outcome = (*outcome[:4], event_id, *outcome[5:])
        return _new_result(record.instance, record.version, None, outcome)

    def _refuse_payload(self, event: str, payload: Mapping[str, Any] | Payload) -> None:
        """PayloadInvalid for a payload with fields given to an event that takes none."""
        if isinstance(payload, Payload):
            fields = tuple(type(payload).model_fields)
        elif isinstance(payload, Mapping):
            fields = tuple(str(k) for k in payload)
        else:
            raise PayloadInvalid(
                self.name, event, (("(payload)", f"expected a mapping, not {type(payload)}"),)
            )
        if fields:
            raise PayloadInvalid(
                self.name,
                event,
                tuple((f, "unexpected field: the event takes no payload") for f in fields),
            )

    def _unknown_event(self, event: object) -> UnknownEvent:
        close = difflib.get_close_matches(str(event), sorted(self._events), n=1, cutoff=0.6)
        hint = (
            f"did you mean '{close[0]}'?"
            if close
            else (f"{self.name} declares: {', '.join(sorted(self._events))}")
        )
        return UnknownEvent(self.name, str(event), hint)

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
        ran: Mapping[str, object] | None = None,
    ) -> Mapping[str, object]:
        """Run `actions` in order; those in `ran` (run before the transaction) are not called
        again: their results are taken."""
        if not actions:
            return _EMPTY_RESULTS
        context = _new_context(
            TransitionContext,
            (
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
            ),
        )
        results: dict[str, object] = {}
        for name, function in actions:
            if ran is not None and name in ran:
                results[name] = ran[name]
                continue
            try:
                results[name] = function(context)
            except Exception as exc:
                raise ActionFailed(self.name, name, exc) from exc
        return results

    # -- writing -------------------------------------------------------------------------------

    def _record_rejection(
        self,
        txn: Transaction,
        chain: _Chain,
        record: InstanceRecord,
        event: str,
        actor: str,
        event_id: str | None,
        digest: bytes,
        now: int,
        rejection: InvalidTransition,
    ) -> _Rejected:
        """A "rejection" ledger entry; the caller raises the rejection after the commit."""
        data = EntryData(
            now,
            "rejection",
            self.name,
            record.instance,
            record.state,
            record.state,
            event,
            actor,
            event_id or "",
            digest,
        )
        entry = chain.seal(txn, data)
        txn.append_ledger(entry)
        chain.advance(entry)
        rejection.ledger_seq = entry.seq
        return _Rejected(rejection)

    def _apply(
        self,
        record: InstanceRecord,
        row: _Row,
        payload: Payload | None,
        digest: bytes,
        actor: str,
        now: int,
        event_id: str | None,
        idempotency_key: str | None,
        request: bytes | None,
        ran: Mapping[str, object] | None,
        txn: Transaction,
        chain: _Chain,
    ) -> DispatchResult:
        """Run the chosen row's actions (but those in `ran`), then write everything of the
        transition."""
        name = self.name
        instance_id = record.instance
        runtime = self.runtime
        results = (
            self._run_actions(
                row.actions, row.event, row.target, record, payload, actor, now, None, ran
            )
            if row.actions
            else _EMPTY_RESULTS
        )
        version = record.version + 1
        armed = (
            arm_timers(name, instance_id, row.arms, now, version, payload, self._settings)
            if row.arms
            else ()
        )
        emitted: tuple[EmittedEvent, ...] = ()
        bodies: Sequence[str] = ()
        kept = None
        if row.data:  # the row keeps data fields, or an emit is routed by or reads one
            kept = read_data(txn, name, instance_id, runtime._kept, chain.partition)
            if row.kept:
                kept = keep_fields(kept, row.kept, payload, self._routes)
        if row.emits:
            emitted = tuple(
                EmittedEvent(
                    emit.machine,
                    instance_id if emit.to is None else route(kept, emit.to, name, instance_id),
                    emit.event,
                    derive_event_id("emit", name, instance_id, version, index),
                )
                for index, emit in enumerate(row.emits)
            )
            bodies = [emit.body(payload, instance_id, actor, row.event, kept) for emit in row.emits]
        notices = (
            _refusal_notices(
                name,
                instance_id,
                version,
                emitted,
                row.emits,
                payload,
                actor,
                row.event,
                now,
                kept,
            )
            if row.notices
            else ()
        )
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
                    digest,
                ),
            )
            entry = chain.seal(txn, data)
        kept_text: str | None = None
        kept_entry: LedgerEntry | None = None
        if row.kept and kept is not None:
            kept_text = dump_data(kept)
            if entry is not None:
                kept_entry = self._seal_kept(entry, record, row, actor, now, kept_text)
        # _new_result without its frame.
        result: DispatchResult = _RowResult()
        result._instance = instance_id
        result._version = version
        result._seq = None if entry is None else entry.seq
        result._outcome = (
            name,
            row.event,
            record.state,
            row.target,
            event_id,
            emitted,
            (),
            results,
            armed,
            False,
            False,
        )
        stored = ""
        if event_id is not None or idempotency_key is not None:
            try:
                stored = _result_to_json(result)
            except (TypeError, ValueError, PydanticSerializationError) as exc:
                # The result is stored for repeats, so it must be JSON: fail before writing.
                raise ActionFailed(name, ", ".join(results), exc, role="result of") from exc
        # Writes: nothing above this line has touched the store.
        if txn is self._memory:
            # The live record, read in this unit, which holds the store: no one moved it.
            record.state = row.target
            record.version = version
        else:
            txn.update_instance(name, instance_id, row.target, version, record.version)
        if kept_text is not None:
            txn.save_instance_data(name, instance_id, kept_text)
        if row.cancels:
            if row.keep:
                txn.cancel_timers(name, instance_id, row.keep)
            else:
                txn.cancel_timers(name, instance_id)
        if armed:
            txn.arm_timers(armed)
        if emitted:
            txn.add_outbox(
                [
                    *(
                        _event_message(name, instance_id, version, e, now, body)
                        for e, body in zip(emitted, bodies, strict=True)
                    ),
                    *notices,
                ]
            )
        if entry is not None:
            txn.append_ledger(entry)
            if kept_entry is not None:
                txn.append_ledger(kept_entry)
            if version % runtime._snapshot_every == 0:
                kept_seq = self._kept_seq(txn, instance_id, kept_entry)
                save_snapshot(txn, name, instance_id, version, row.target, entry, kept_seq)
        if event_id is not None:
            txn.record_processed(name, event_id, instance_id, stored, now)
        if idempotency_key is not None and request is not None:
            txn.record_idempotency(name, idempotency_key, request, stored, now)
        if entry is not None:
            chain.advance(entry)
            if kept_entry is not None:
                chain.advance(kept_entry)
        return result

    def _kept_seq(self, txn: Transaction, instance_id: str, kept: LedgerEntry | None = None) -> int:
        """The seq of the instance's newest kept entry (`kept`, written now, or the stored
        one) for a snapshot; -1 if it has none or its machine keeps nothing."""
        if kept is None and self._keeps:
            kept = txn.kept_entry(self.name, instance_id)
        return -1 if kept is None else kept.seq

    def _seal_kept(
        self,
        entry: LedgerEntry,
        record: InstanceRecord,
        row: _Row,
        actor: str,
        now: int,
        text: str,
    ) -> LedgerEntry:
        """The "kept" entry after the move's `entry`: the instance's data as stored after the
        move, committed in the same transaction (see runtime/ledger.py)."""
        sealer = self.runtime._sealer
        assert sealer is not None
        data = EntryData(
            now,
            KEPT,
            self.name,
            record.instance,
            row.target,
            row.target,
            row.event,
            actor,
            "",
            kept_digest(text),
        )
        return sealer.seal_kept(entry.seq + 1, entry.entry_hash, data)
