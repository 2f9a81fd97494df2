"""One step of a run, as both drivers take it: the before_step hook, compute and await steps,
a send's receiver, payload and event id, and the run's own writes (its record, version-checked,
and its ledger entries)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any, Literal, cast

from ..dispatch import Governor
from ..errors import (
    ConcurrentUpdateDetected,
    InstanceExists,
    PayloadEncodingError,
    UnknownInstance,
)
from ..ledger import (
    _JSON_STRING,
    _MAX_SAFE_INT,
    EMPTY_PAYLOAD_DIGEST,
    PAYLOAD_TAG,
    EntryData,
    payload_digest,
)
from ..results import (
    DispatchResult,
    _dumps,
    derive_ids_from,
    derive_with,
    event_id_prefix,
    id_part,
    index_prefix,
)
from ..runtime import Runtime
from ..sealing import _Chain, _new_entry_data
from ..store.base import FlowRecord, FlowStatus, Transaction, WorkOutcome, new_flow_record
from ..tables import Emit, FlowSpec, FlowStepSpec
from ..timers import format_duration
from .compensation import _settled
from .ops import _SETTLED, _Send
from .run import _OUTCOMES, StepContext, StepFailed, _Detail, _Entry, _Note, _Run, _step_outcome

_sha256 = hashlib.sha256
_JSON_OWN = (str, int, bool, type(None))


class _StepRunner:
    """What the drivers share: a step's work and the run's writes (FlowRunner sets the
    attributes)."""

    runtime: Runtime
    specs: dict[str, FlowSpec]
    functions: dict[str, Callable[[Mapping[str, Any]], Any]]
    before_step: Callable[[StepContext], None] | None
    actor: str
    # Fanout branches still running after their gather (their replies will be late).
    _late_futures: set[Future[tuple[str, Any]]]
    _late_tasks: set[asyncio.Task[tuple[str, Any]]]
    # (id(step), phase, last) -> the op that sends it (`_send_op`).
    _sends: dict[tuple[int, str, bool], _Send]

    def _send_op(self, step: FlowStepSpec, phase: Literal["do", "undo"], last: bool) -> _Send:
        """The op that sends `step` (phase "do") or its compensation ("undo"); `last`: the
        plan's last one. It depends on these alone, so each is built once per runner (a
        frozen dataclass takes about 9k instructions to build)."""
        key = (id(step), phase, last)
        op = self._sends.get(key)
        if op is None:  # (the op holds its step: no other step has its id meanwhile)
            emit = step.send if phase == "do" else step.compensate
            assert emit is not None
            status: FlowStatus = "running" if phase == "do" else "compensating"
            part = id_part(step.name, phase)
            op = self._sends[key] = _Send(step, emit, phase, status, part, last)
        return op

    def _hook(self, run: _Run, step: FlowStepSpec, phase: Literal["do", "undo"]) -> None:
        if self.before_step is not None:
            record = run.record
            self.before_step(
                StepContext(run.spec.name, record.flow_id, record.instance, step.name, phase)
            )

    def _attempt_here(
        self, run: _Run, step: FlowStepSpec, *, hooked: bool = False
    ) -> tuple[str, Any]:
        """A compute or await step, which needs no write: ("succeeded", result) |
        ("failed", reason) | ("waiting", (since, deadline))."""
        try:
            if not hooked and self.before_step is not None:
                self._hook(run, step, "do")
            if step.kind == "compute":
                assert step.function is not None
                values = {**run.data["inputs"], **run.data["values"]}
                value = self.functions[step.function](values)
                if type(value) not in _JSON_OWN:  # else its JSON round trip is itself
                    value = json.loads(_dumps(value))
                return "succeeded", value
            return self._check_wait(run, step)
        except StepFailed as failed:
            return _step_outcome(failed)

    def _check_wait(self, run: _Run, step: FlowStepSpec) -> tuple[str, Any]:
        assert step.machine is not None
        record = self.runtime.governor(step.machine).get(run.record.instance)
        if record is not None and record.state in step.states:
            return "succeeded", {"state": record.state}
        if record is not None and record.state in step.fails:  # the outcome is known
            return "failed", f"{step.machine} reached {record.state}"
        now = self.runtime.clock.now_ms()
        waiting_since = run.steps.get(step.name, {}).get("since", now)
        deadline = None if step.within_ms is None else waiting_since + step.within_ms
        if deadline is not None and now >= deadline:
            shown = record.state if record is not None else "no instance"
            waited = format_duration(step.within_ms or 0)
            return "failed", f"{step.machine} still in {shown} after waiting {waited}"
        return "waiting", (waiting_since, deadline)

    def _dispatch(
        self,
        governor: Governor,
        target: str,
        event: str,
        payload: dict[str, Any],
        event_id: str,
        then: Callable[[Transaction, _Chain], object] | None = None,
    ) -> DispatchResult:
        """dispatch, creating a missing receiver first (created meanwhile, or by an earlier
        attempt of this step: either will do). An event that calls the outside world looks
        first: its dispatch claims the event id, which a missing receiver would take twice.
        `then` runs in the dispatch's transaction, after its unit of work."""
        if then is None:
            send = partial(
                governor.dispatch, target, event, payload or None, self.actor, event_id=event_id
            )
        else:
            work = governor._work(
                target, event, payload or None, self.actor, event_id, None, None, False
            )
            send = partial(governor._run_prepared, work, self.runtime._partition_of(target), then)
        if event in governor._external_events and governor.get(target) is None:
            with contextlib.suppress(InstanceExists):
                governor.create(target, self.actor)
        try:
            return send()
        except UnknownInstance:
            with contextlib.suppress(InstanceExists):
                governor.create(target, self.actor)
            return send()

    def _receiver(
        self, run: _Run, step: FlowStepSpec, emit: Emit, part: bytes
    ) -> tuple[Governor, str, dict[str, Any], str]:
        """The receiver, its instance, the payload and the event id of a send (`part`: its
        op's, what the id adds to the run's prefix)."""
        governor = self.runtime.governor(emit.machine)
        inputs = run.data["inputs"]
        target = run.record.instance if step.to is None else str(inputs[step.to])
        payload = _payload(emit, {**inputs, **run.data["values"]}, target, self.actor, run)
        event_id = derive_with(run.ids, part)
        return governor, target, payload, event_id

    def _write_work(
        self,
        run: _Run,
        status: FlowStatus,
        notes: Sequence[_Note],
        wake_ms: int | None,
        gather: Callable[[Transaction], tuple[FlowStatus, list[_Note]]] | None = None,
    ) -> Callable[[Transaction, _Chain], FlowRecord]:
        """The unit of work that writes the run's record (version-checked) and its ledger
        entries, the pending notes first. With `gather`, the run's status and the last
        notes are decided inside the unit's transaction."""
        before = run.record
        pending = run.pending
        run.pending = []
        if gather is not None:

            def gathered(txn: Transaction, chain: _Chain) -> FlowRecord:
                final, more = gather(txn)
                entries = [*pending, *((e, s, d, final) for e, s, d in (*notes, *more))]
                return self._store_run(txn, chain, before, final, entries, run.data_text(), None)

            return gathered
        entries = [*pending, *((event, step, detail, status) for event, step, detail in notes)]
        text = run.data_text()

        def work(txn: Transaction, chain: _Chain) -> FlowRecord:
            return self._store_run(txn, chain, before, status, entries, text, wake_ms)

        return work

    def _store_run(
        self,
        txn: Transaction,
        chain: _Chain,
        before: FlowRecord,
        status: FlowStatus,
        entries: Sequence[_Entry],
        text: str,
        wake_ms: int | None,
    ) -> FlowRecord:
        """Write the run's record over `before` (version-checked) and seal its entries."""
        now = self.runtime.clock.now_ms()
        flow_id, flow, version = before.flow_id, before.flow, before.version + 1
        record = new_flow_record(
            flow_id, flow, before.instance, status, version, text, now, wake_ms
        )
        txn.save_flow(record, before.version)
        ids = event_id_prefix("flow", flow_id, version)
        self._seal_entries(txn, chain, flow, flow_id, now, ids, entries, 0)
        return record

    def _seal_entries(
        self,
        txn: Transaction,
        chain: _Chain,
        flow: str,
        flow_id: str,
        now: int,
        ids: hashlib._Hash,
        entries: Sequence[_Entry],
        first: int,
    ) -> None:
        """Seal the entries of a write of the run `flow_id` (of `flow`) at `now`, numbered
        from `first` among that write's entries: each one's event id is `ids`, the hash after
        the write's own parts ("flow", the run's id, the version it writes), and its number."""
        if self.runtime._sealer is None or not entries:
            return
        actor = self.actor
        chain.append_each(
            txn,
            (
                _new_entry_data(
                    EntryData,
                    (
                        now,
                        "flow",
                        flow,
                        flow_id,
                        step,
                        to_state,
                        event,
                        actor,
                        event_id,
                        _detail_digest(detail) if detail else EMPTY_PAYLOAD_DIGEST,
                    ),
                )
                for (event, step, detail, to_state), event_id in zip(
                    entries, derive_ids_from(ids, len(entries), first), strict=True
                )
            ),
        )

    def _recording(
        self, run: _Run, op: _Send, unit: Callable[[Transaction, _Chain], object]
    ) -> Callable[[Transaction, _Chain], FlowRecord]:
        """A send as one unit of work, where its dispatch commits in the run's transaction:
        the run's pending notes, the dispatch `unit`, then the send's outcome and the run's
        status after it (`_settled`: for the plan's last send, how the run ends), and the
        run's record, written once, version-checked, over the one the send started from.
        Either failing rolls the whole unit back: a dispatch that raises raises _Unrecorded
        (the driver writes the notes then, `_unrecorded`); a run that another driver wrote
        meanwhile raises _Moved (the driver commits the dispatch on its own then, as it
        would beside the run's failed write, and reads the run again)."""
        before = run.record
        pending = run.pending
        run.pending = []

        def work(txn: Transaction, chain: _Chain) -> FlowRecord:
            # The record's time and version, for the entries sealed before it is written.
            now = self.runtime.clock.now_ms()
            flow_id, flow, version = before.flow_id, before.flow, before.version + 1
            ids = index_prefix(run.ids, version)
            self._seal_entries(txn, chain, flow, flow_id, now, ids, pending, 0)
            try:
                value = unit(txn, chain)
            except Exception as error:
                raise _Unrecorded(error, pending) from error
            rejected = getattr(value, "error", None)  # the dispatch's _Rejected
            status, entries, wake = _settled(run, op, _step_outcome(rejected or value), now)
            self._seal_entries(txn, chain, flow, flow_id, now, ids, entries, len(pending))
            text = run.data_text()
            record = new_flow_record(
                flow_id, flow, before.instance, status, version, text, now, wake
            )
            try:
                txn.save_flow(record, before.version)
            except ConcurrentUpdateDetected as moved:
                raise _Moved(moved) from moved
            return record

        return work

    def _unrecorded(
        self, run: _Run, op: _Send, unrecorded: _Unrecorded
    ) -> Callable[[Transaction, _Chain], FlowRecord]:
        """After a `_recording` unit's dispatch raised (nothing of the unit is stored): the
        write that stores what a batch of the run's write and the dispatch as units of their
        own would have (the dispatch's rolled back): the pending notes, and, when the error
        is the step's failure (`_OUTCOMES`), its outcome (`_settled`)."""
        error = unrecorded.error
        run.pending = [*unrecorded.pending, *run.pending]
        if not isinstance(error, _OUTCOMES):
            return self._write_work(run, op.status, [], None)
        now = self.runtime.clock.now_ms()
        status, entries, wake = _settled(run, op, _step_outcome(error), now)
        run.pending += entries
        return self._write_work(run, status, [], wake)

    def _settling(
        self,
        run: _Run,
        op: _Send,
        start: Callable[[Transaction, _Chain], FlowRecord],
        unit: Callable[[Transaction, _Chain], object],
    ) -> list[Callable[[Transaction, _Chain], object]]:
        """The run's write before the dispatch (`start`) and the dispatch (`unit`), wrapped to
        keep what they wrote and answered, then the unit that runs after them in the same
        transaction: it records the step's outcome and how the run ends (the plan's next two
        writes) over the record `start` wrote, so that the last step's effect, its result and
        the end of the run commit together. It writes nothing (None) when the dispatch did
        not answer with a step's outcome (a missing receiver, an unexpected error), or ran
        in another transaction (another partition): the plan records the outcome then."""
        written: list[FlowRecord] = []
        answered: list[object] = []

        def started(txn: Transaction, chain: _Chain) -> FlowRecord:
            record = start(txn, chain)
            written.append(record)
            return record

        def dispatch(txn: Transaction, chain: _Chain) -> object:
            try:
                value = unit(txn, chain)
            except BaseException as exc:
                answered.append(exc)
                raise
            answered.append(getattr(value, "error", None) or value)  # a _Rejected: its error
            return value

        def settle(txn: Transaction, chain: _Chain) -> FlowRecord | None:
            if not written or not answered or not isinstance(answered[0], _OUTCOMES):
                return None
            now = self.runtime.clock.now_ms()
            status, entries, wake = _settled(run, op, _step_outcome(answered[0]), now)
            return self._store_run(txn, chain, written[0], status, entries, run.data_text(), wake)

        return [started, dispatch, settle]

    def _batch_works(
        self, run: _Run, op: _Send, unit: Callable[[Transaction, _Chain], object]
    ) -> list[Callable[[Transaction, _Chain], object]]:
        """A send's batch: the run's write (its pending notes) and the dispatch `unit`, and
        for the last step the unit that records its outcome and the run's end
        (`_settling`)."""
        start = self._write_work(run, op.status, [], None)
        if op.settle:
            return self._settling(run, op, start, unit)
        return [start, unit]


def _batch_answer(run: _Run, outcomes: Sequence[WorkOutcome[Any]]) -> tuple[str, Any] | None:
    """A send's outcome from its batch's (`_batch_works`): the run's record as written (or
    the write's error, raised), then _SETTLED if the batch recorded the step's outcome and
    the run's end too, else the dispatch's outcome; None when the receiver does not exist
    yet (the caller creates it and sends again)."""
    for written in outcomes[::2]:  # the run's own units
        if written.error is not None:
            raise written.error
        if written.value is not None:
            run.record = cast(FlowRecord, written.value)
    if len(outcomes) == 3 and outcomes[2].value is not None:
        return _SETTLED
    outcome = outcomes[1]
    if isinstance(outcome.error, UnknownInstance):  # the receiver's first event
        return None
    if outcome.error is not None:
        return _step_outcome(outcome.error)
    value = outcome.value
    rejected = getattr(value, "error", None)  # the dispatch's _Rejected
    return _step_outcome(rejected if rejected is not None else value)


def _detail_digest(detail: Mapping[str, Any]) -> bytes:
    """The payload digest of a flow entry's detail. The runner's details hold JSON values
    already (results and inputs went through JSON when they were stored), and canonical JSON
    of such a value is that of its JSON round trip; anything else is made JSON first."""
    if type(detail) is _Detail:
        return detail.digest
    if len(detail) == 1:
        result = detail.get("result")
        if type(result) is str:
            # A computed str value (most are: JSON text, a decimal as text): canonical_json's
            # text of one member, the key as this one.
            text = f'{{"result":{_JSON_STRING(result)}}}'
            try:
                return _sha256(PAYLOAD_TAG + text.encode("utf-8")).digest()
            except UnicodeEncodeError:
                pass  # a lone surrogate: refused below, as canonical_json refuses it
        elif type(result) is dict and len(result) == 2:
            # A send's result, {"state": ..., "seq": ...}: its canonical JSON written as
            # canonical_json writes it (keys in order, the int as is, the text escaped),
            # without the general walk; its checks are canonical_json's.
            state, seq = result.get("state"), result.get("seq")
            if type(state) is str and type(seq) is int and -_MAX_SAFE_INT <= seq <= _MAX_SAFE_INT:
                text = f'{{"result":{{"seq":{seq},"state":{_JSON_STRING(state)}}}}}'
                try:
                    return _sha256(PAYLOAD_TAG + text.encode("utf-8")).digest()
                except UnicodeEncodeError:
                    pass  # a lone surrogate: refused below, as canonical_json refuses it
    try:
        return payload_digest(detail)
    except PayloadEncodingError:
        return payload_digest(json.loads(_dumps(detail)))


def _started_detail(inputs: dict[str, Any], text: str) -> Mapping[str, Any]:
    """FlowStarted's detail, {"inputs": inputs}, `text` being `_dumps(inputs)` of inputs that
    are str, int, bool or None each (`engine._plain`), with its digest when that text is
    canonical_json's too: printable ASCII with nothing escaped (the keys then sort alike), no
    int outside the range canonical_json takes. The general walk costs about 25k
    instructions a run."""
    detail = {"inputs": inputs}
    if not text.isascii() or "\\" in text:
        return detail
    for value in inputs.values():
        if type(value) is int and not -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return detail
    digested = _Detail(detail)
    digested.digest = _sha256(PAYLOAD_TAG + f'{{"inputs":{text}}}'.encode()).digest()
    return digested


def _payload(
    emit: Emit, values: Mapping[str, Any], instance: str, actor: str, run: _Run
) -> dict[str, Any]:
    """A step's payload from its arguments: inputs and computed values by name ("field"),
    literals, and $instance, $actor, $event (the flow's name)."""
    payload: dict[str, Any] = {}
    for arg in emit.args:
        if arg.source == "field":
            name = str(arg.value)
            if name in values and values[name] is not None:
                payload[arg.field] = values[name]
        elif arg.source == "literal":
            payload[arg.field] = arg.value
        elif arg.source == "instance":
            payload[arg.field] = instance
        elif arg.source == "actor":
            payload[arg.field] = actor
        else:
            payload[arg.field] = run.spec.name
    return payload


class _Unrecorded(Exception):
    """A `_recording` unit's dispatch raised `error`: the unit (`pending`, the run's notes
    it was to write, included) is rolled back."""

    def __init__(self, error: Exception, pending: list[_Entry]) -> None:
        super().__init__(error)
        self.error = error
        self.pending = pending


class _Moved(Exception):
    """A `_recording` unit found its run written by another driver meanwhile (`error`, R020
    on the run): the unit is rolled back."""

    def __init__(self, error: ConcurrentUpdateDetected) -> None:
        super().__init__(error)
        self.error = error
