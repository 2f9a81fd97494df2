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
  carries their results, and nothing of it is stored. If the look found nothing to call (no
  instance yet, or a state where the event calls nothing) and the unit now takes a row that
  calls out (the instance was created or moved meanwhile), the unit calls nothing either,
  never inside the transaction: it stores nothing and the dispatch looks again, still under
  its claim (unit._LookAgain). A repeated event id or idempotency key found committed calls
  nothing, and every dispatch that runs such actions (`dispatch`, `dispatch_async`,
  `dispatch_many`, flow steps) holds a claim on its event id and idempotency key from before
  those calls until its commit, in this runtime and in the store
  (runtime/resilience/claims.py): a second dispatch of either, in any process on the store,
  waits, then finds the first's result committed and calls nothing (`dispatch_many` does not
  wait: that request fails with OutsideCallInProgress, R025). The claim is renewed while the
  calls run; a dispatch whose claim was taken over meanwhile (its process stalled past the
  lease) stores nothing and fails with OutsideClaimLost, R026.
- Every dispatch decides the same way (`_decide`: the row table built at load time, the
  guards in order, the ignore list, the rejection) and writes through one unit of work
  (`_step`, its inputs checked once by `_inputs`). Those parts are modules of their own,
  bound to the Governor as methods: event_inputs.py (the inputs), unit.py (the unit of
  work and the decision), applying.py (actions and writes), preflight.py (outside calls,
  `dispatch_async`, `dispatch_many`), creating.py (`create`). On the memory store, its owning thread
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

import sys
import threading
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

from . import applying, creating, event_inputs, preflight, unit
from .bindings import Action, Guard
from .creating import CREATE_EVENT
from .event_inputs import DEFAULT_ACTOR, DispatchRequest, _EventInput
from .ledger import EMPTY_PAYLOAD_DIGEST, LedgerEntry
from .notice_deadlines import NoticeDeadlines
from .results import DispatchResult, _UnsealedResult, event_id_prefix
from .rows import _Absent, _EmitPlan, _Guarded, _Row
from .store.base import InstanceRecord
from .store.memory import MemoryStore
from .tables import MachineSpec, Payload
from .timers import ArmedTimer, TimerPlan
from .unit import _Entry, _Rejected, _settled

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["CREATE_EVENT", "DEFAULT_ACTOR", "DispatchRequest", "Governor"]

_get_ident = threading.get_ident


class _NoOwner:
    """Stands in for the memory store on other stores: no thread owns it."""

    owner = None
    busy = 0
    mine = bool


_NO_OWNER = _NoOwner()


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
        # Notices with a `within`: their deadlines are met by the moves that cancel them.
        self._notices = NoticeDeadlines.of(spec.name, plan)
        # The hash state of its emits' event ids after their common parts ("emit", the name).
        self._emit_ids = event_id_prefix("emit", spec.name)
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
        # The rows that run one (their calls are made before the unit, never in it), and
        # the events with such a row: the only ones worth a look before the unit.
        self._calling_rows = frozenset(
            row
            for rows in self._rows.values()
            for row in rows
            if any(a in self._external for a, _ in row.actions)
        )
        self._external_events = frozenset(
            event
            for (_, event), rows in self._rows.items()
            if any(row in self._calling_rows for row in rows)
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

        def commit_bare(record: InstanceRecord, row: _Row, actor: str) -> DispatchResult:
            """With a ledger, a row that runs no guard or action: the unit's own writes
            (_apply: the entry sealed on the verified head, the state, a snapshot) without
            the unit around them."""
            return commit_in_memory(
                mine,
                apply,
                record,
                row,
                None,
                EMPTY_PAYLOAD_DIGEST,
                actor,
                now_ms(),
                None,
                None,
                None,
                None,
            )

        apply_bare = commit_bare if sealed else None

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
                and owned.mine()
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
                        result: DispatchResult = new_result()
                        result._instance = instance_id
                        result._version = record.version = record.version + 1
                        record.state = found.target
                        result._outcome = found.outcome
                        return result
                    if found.absent:
                        if found.ignored:
                            return without_row(record, found, None)
                        if not (record_rejection and apply_bare is not None):
                            raise found.rejection(instance_id)
                    elif apply_bare is not None and found.bare:
                        return apply_bare(record, found, actor)
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

    # -- the parts of a dispatch, each in its module, bound here as methods ------------------
    # Its inputs checked (event_inputs.py).
    _inputs = event_inputs.check_inputs
    _refused = event_inputs.refused
    _refuse_payload = event_inputs.refuse_payload
    _unknown_event = event_inputs.unknown_event
    # Its unit of work: deduplicate, read, decide (unit.py) and apply (applying.py).
    _step = unit.step
    _superseded = unit.superseded
    _decide = unit.decide
    _without_row = unit.without_row
    _record_rejection = unit.record_rejection
    _apply = applying.apply
    _run_actions = applying.run_actions
    _kept_seq = applying.kept_seq
    _seal_kept = applying.seal_kept
    # Outside calls before the transaction, and the entrances that make them (preflight.py).
    dispatch_async = preflight.dispatch_async
    dispatch_many = preflight.dispatch_many
    _claim_keys = preflight.claim_keys
    _committed = preflight.committed
    _run_prepared = preflight.run_prepared
    _prepare = preflight.prepare
    _preflight = preflight.preflight
    # Creating an instance (creating.py).
    _create_work = creating.create_work
    _enter_created = creating.enter_created
