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
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from .bindings import Action, Guard
from .errors import (
    ActionFailed,
    ConcurrentUpdateDetected,
    IdempotencyConflict,
    InstanceExists,
    InvalidTransition,
    NestedDispatch,
    NoGuardHeld,
    PayloadInvalid,
    UnknownEvent,
    UnknownInstance,
)
from .ledger import EMPTY_PAYLOAD_DIGEST, EntryData, LedgerEntry, payload_digest
from .outbox import _event_message
from .replay import save_snapshot
from .results import (
    _EMPTY_RESULTS,
    DispatchResult,
    EmittedEvent,
    TransitionContext,
    _request_digest,
    _result_from_json,
    _result_to_json,
    _RowResult,
    _UnsealedResult,
    derive_event_id,
)
from .rows import _EmitPlan, _Row
from .sealing import _Chain, _new_entry_data
from .store.base import InstanceRecord, Transaction
from .tables import MachineSpec, Payload
from .timers import ArmedTimer, arm_timers

if TYPE_CHECKING:
    from .runtime import Runtime


CREATE_EVENT = "create"
DEFAULT_ACTOR = "system"


class _Rejected(NamedTuple):
    """A rejection recorded in the ledger: raised to the caller after the commit."""

    error: InvalidTransition


def _validation_problems(error: ValidationError) -> tuple[tuple[str, str], ...]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(payload)"
        problems.append((where, str(item["msg"])))
    return tuple(problems)


class DispatchRequest(NamedTuple):
    """One event for `Governor.dispatch_many`: `dispatch`'s arguments."""

    instance_id: str
    event: str
    payload: Mapping[str, Any] | Payload | None = None
    actor: str = DEFAULT_ACTOR
    event_id: str | None = None
    idempotency_key: str | None = None
    expected_version: int | None = None


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
                    save_snapshot(txn, name, instance_id, 1, initial, entry)
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
            save_snapshot(memory, row.machine, instance_id, version, target, entry)
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
        work = self._dispatch_work(
            instance_id,
            event,
            payload,
            actor,
            event_id,
            idempotency_key,
            expected_version,
            record_rejection,
        )
        outcome = self.runtime._submit(work)
        if type(outcome) is _Rejected:
            raise outcome.error
        return cast(DispatchResult, outcome)

    def dispatch_many(
        self, requests: Sequence[DispatchRequest]
    ) -> list[DispatchResult | Exception]:
        """Dispatch every request, in order, in one commit where the store batches commits
        (SQLite: one transaction for up to `max_batch` units); each request succeeds or fails
        on its own, as `dispatch` would, and its slot holds the result or the error."""
        results: list[DispatchResult | Exception | None] = [None] * len(requests)
        works = []
        slots = []
        for index, r in enumerate(requests):
            try:
                works.append(
                    self._dispatch_work(
                        r.instance_id,
                        r.event,
                        r.payload,
                        r.actor,
                        r.event_id,
                        r.idempotency_key,
                        r.expected_version,
                        False,
                    )
                )
                slots.append(index)
            except Exception as error:  # invalid payload or event: nothing to submit
                results[index] = error
        for index, outcome in zip(slots, self.runtime._submit_many(works), strict=True):
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

    def _dispatch_work(
        self,
        instance_id: str,
        event: str,
        payload: Mapping[str, Any] | Payload | None,
        actor: str,
        event_id: str | None,
        idempotency_key: str | None,
        expected_version: int | None,
        record_rejection: bool,
    ) -> Callable[[Transaction, _Chain], DispatchResult | _Rejected]:
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

        return work

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
                save_snapshot(txn, name, instance_id, version, row.target, entry)
        if event_id is not None:
            txn.record_processed(name, event_id, instance_id, stored, now)
        if idempotency_key is not None and request is not None:
            txn.record_idempotency(name, idempotency_key, request, stored, now)
        if entry is not None:
            chain.advance(entry)
        return result
