"""Durable flow execution: a flow run's progress lives in the store beside the governors, and
every step start, step result, compensation and flow end is a ledger entry (kind "flow").

Semantics a user must know:
- A run is identified by its flow id: `start` with the same flow, instance and inputs (or the
  same explicit `flow_id`) resumes the stored run instead of starting another, so calling it
  again after a crash is safe.
- A send step dispatches its event with an event id derived from (flow id, step, "do"), a
  compensation with (flow id, step, "undo"). The receiver remembers processed event ids, so a
  step re-run after a crash between its dispatch and the flow's own write returns the stored
  result and changes nothing: every effect happens once. The flow's own writes are
  version-checked (two resuming processes cannot both advance one run). A step's result is
  written with the next step's dispatch; the last step's (or compensation's), and the end of
  the run, in the commit of its own dispatch (the sync API on one ledger chain), so a saga
  of N sends takes N commits.
- A send step succeeds when the receiver takes a transition or ignores the event; it fails
  when the receiver rejects it (invalid transition, no guard held, an action failed, a payload
  it refuses) or a `before_step` hook raises StepFailed. A missing receiver instance is
  created (initial state) first.
- sequence, saga, conditional (the branch named by the `on` input): steps in order; after a
  failure the completed steps are compensated newest first, then CompensationCompleted
  records the failed step and the reason. A compensation the receiver rejects is recorded as
  CompensationFailed and the run ends "failed": a person must look.
- parallel: every step runs (concurrently in the asyncio API); if any failed, the others are
  compensated. fanout: every step runs, nothing is compensated, and the gathered result says
  which succeeded, failed or timed out; it succeeds with `quorum`. `within` is a deadline on
  the runtime's clock, stored with the run before any branch is sent (the run's wake_ms): a
  branch without a reply (NoReply, or its receiver's action failing as transient or
  unavailable) keeps the run "waiting", asked again by each resume; at the deadline what
  arrived is gathered and the rest is timed out, also in a process started after a crash. A
  reply that comes after the deadline (a slow dispatch; in the asyncio API, still running when
  the time left has passed) counts as timed out.
- await: the run is stored as "waiting" until the machine is in one of the states; governor
  timers move the machine meanwhile (nothing is held in memory). `resume_all` (after
  `fire_due` / `deliver_outbox`, or in a new process) checks again; past `within` it fails.
- compute: calls the registered pure function with the inputs and earlier results; its
  result is stored, so a resumed run never calls it with other results in mind.
- The asyncio API runs the same plan (`_plan`, one generator for both): a send goes through
  `Governor.dispatch_async` with the run's write queued beside it, so on SQLite they share the
  group commit with every other coroutine's units; no threads of the runner's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from ..dispatch import Governor
from ..errors import (
    ActionFailed,
    IdempotencyConflict,
    InstanceExists,
    InvalidTransition,
    PayloadEncodingError,
    PayloadInvalid,
    RuntimeFailure,
    UnknownEvent,
    UnknownInstance,
    UnknownMachine,
)
from ..ledger import EntryData, payload_digest
from ..resilience.errors import BulkheadFull, is_transient, is_unavailable
from ..results import DispatchResult, _dumps, derive_event_id
from ..runtime import Runtime
from ..sealing import _Chain
from ..store.base import FLOW_FINISHED, FlowRecord, FlowStatus, Transaction
from ..tables import Emit, FlowSpec, FlowStepSpec
from ..timers import format_duration

__all__ = ["FlowResult", "FlowRunner", "NoReply", "StepContext", "StepFailed"]

FLOW_ACTOR = "flow"
StepStatus = Literal["started", "succeeded", "failed", "timed_out", "compensated", "uncompensated"]
# What a step's dispatch may answer with that fails the step rather than the process.
_STEP_FAILURES = (
    InvalidTransition,
    ActionFailed,
    PayloadEncodingError,
    PayloadInvalid,
    UnknownEvent,
    IdempotencyConflict,
)


class StepFailed(RuntimeFailure):
    """Raised by a `before_step` hook (or a compute function) to fail a step on purpose."""

    code = "R030"


class NoReply(StepFailed):
    """Raised by a `before_step` hook: the step's receiver does not answer (yet). A fanout
    branch without a reply is tried again by each resume until the fanout's deadline; any
    other step fails. The receiver's action failing transiently or as unavailable (see
    runtime/resilience/errors.py) counts the same."""

    code = "R032"


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a `before_step` hook sees: `phase` is "do" for the step, "undo" for its
    compensation."""

    flow: str
    flow_id: str
    instance: str
    step: str
    phase: Literal["do", "undo"]


@dataclass(frozen=True, slots=True)
class FlowResult:
    """A run as stored: its status, each step's status, the failed step and why, computed
    values and (fanout) the gathered replies."""

    flow_id: str
    flow: str
    instance: str
    status: FlowStatus
    steps: Mapping[str, str]
    failed_step: str | None = None
    reason: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    gathered: Mapping[str, str] | None = None

    @property
    def finished(self) -> bool:
        return self.status in FLOW_FINISHED


# A ledger entry the next write seals: (event, step, detail).
_Note = tuple[str, str, Mapping[str, Any]]
# The same with the run's status when it happened (the entry's to_state).
_Entry = tuple[str, str, Mapping[str, Any], FlowStatus]


@dataclass
class _Run:
    """A run being driven: the stored record and its decoded data."""

    spec: FlowSpec
    record: FlowRecord
    data: dict[str, Any]
    # Ledger notes not yet written: the next write carries them (a result is written with
    # the next step's dispatch, in one commit; lost in a crash, it is found again by
    # repeating the step, whose dispatch its event id deduplicates).
    # Each with the run's status when it happened, the entry's to_state.
    pending: list[_Entry] = field(default_factory=list)

    def note(self, notes: Iterable[_Note], status: FlowStatus = "running") -> None:
        self.pending += [(event, step, detail, status) for event, step, detail in notes]

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        steps: dict[str, dict[str, Any]] = self.data["steps"]
        return steps

    def status_of(self, step: str) -> str | None:
        entry = self.steps.get(step)
        return None if entry is None else str(entry["status"])

    def plan(self) -> tuple[FlowStepSpec, ...]:
        spec = self.spec
        if spec.kind == "conditional":
            return spec.branches.get(str(self.data.get("branch")), ())
        return spec.steps


class FlowRunner:
    """Runs flows on a Runtime whose governors are loaded.

    `functions` are the pure functions compute steps name, called with a mapping of the
    inputs and earlier results. `before_step` is called before every step and compensation:
    raising StepFailed there fails it, NoReply leaves it unanswered (tests and the demo inject
    failures so)."""

    def __init__(
        self,
        runtime: Runtime,
        flows: Iterable[FlowSpec],
        *,
        functions: Mapping[str, Callable[[Mapping[str, Any]], Any]] | None = None,
        before_step: Callable[[StepContext], None] | None = None,
        actor: str = FLOW_ACTOR,
    ) -> None:
        self.runtime = runtime
        self.specs = {spec.name: spec for spec in flows}
        self.functions = dict(functions or {})
        self.before_step = before_step
        self.actor = actor
        missing = sorted(
            step.function
            for spec in self.specs.values()
            for step in _all_steps(spec)
            if step.function is not None and step.function not in self.functions
        )
        if missing:
            raise ValueError(f"compute steps name unregistered functions: {', '.join(missing)}")

    def close(self) -> None:
        """Nothing to release: the runner holds no threads or connections of its own."""

    # ------------------------------------------------------------------ the sync API

    def start(
        self,
        flow: str,
        instance: str,
        inputs: Mapping[str, Any],
        *,
        flow_id: str | None = None,
    ) -> FlowResult:
        """Start (or resume, if this run exists) and drive the run as far as it goes now."""
        run = self._open(flow, instance, inputs, flow_id)
        return self._drive(run)

    def resume(self, flow_id: str) -> FlowResult:
        run = self._load(flow_id)
        return self._result(run) if run.record.status in FLOW_FINISHED else self._drive(run)

    def resume_all(self, *, limit: int = 1000) -> list[FlowResult]:
        """Drive every unfinished run of a loaded flow: after a restart, or after timers
        fired and the outbox was delivered (waiting runs check their wait again)."""
        return [
            self.resume(record.flow_id)
            for record in self.runtime.store.unfinished_flows(limit)
            if record.flow in self.specs
        ]

    def result(self, flow_id: str) -> FlowResult:
        return self._result(self._load(flow_id))

    def next_wake(self) -> int | None:
        """The earliest time a waiting run times out (an await's or a fanout's `within`):
        call `resume_all` then (after `fire_due`), as for the governors' timers."""
        wakes = [
            r.wake_ms
            for r in self.runtime.store.unfinished_flows()
            if r.wake_ms is not None and r.flow in self.specs
        ]
        return min(wakes, default=None)

    # ------------------------------------------------------------------ the asyncio API

    async def start_async(
        self,
        flow: str,
        instance: str,
        inputs: Mapping[str, Any],
        *,
        flow_id: str | None = None,
    ) -> FlowResult:
        """`start`, awaited: each step's dispatch goes through `Governor.dispatch_async` and
        the run's own writes through the same asyncio group commit, so concurrent runs (and a
        parallel flow's branches, run in an asyncio.TaskGroup) share commits."""
        run = self._open(flow, instance, inputs, flow_id)
        return await self._drive_async(run)

    async def resume_async(self, flow_id: str) -> FlowResult:
        run = self._load(flow_id)
        if run.record.status in FLOW_FINISHED:
            return self._result(run)
        return await self._drive_async(run)

    async def resume_all_async(self, *, limit: int = 1000) -> list[FlowResult]:
        records = self.runtime.store.unfinished_flows(limit)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self.resume_async(r.flow_id))
                for r in records
                if r.flow in self.specs
            ]
        return [task.result() for task in tasks]

    # ------------------------------------------------------------------ opening a run

    def _spec(self, flow: str) -> FlowSpec:
        spec = self.specs.get(flow)
        if spec is None:
            raise UnknownMachine(flow, tuple(sorted(self.specs)))
        return spec

    def flow_id(self, flow: str, instance: str, inputs: Mapping[str, Any]) -> str:
        """The id `start` gives a run of `flow` on `instance` with `inputs`."""
        given = json.loads(_dumps(dict(inputs)))
        return "flw_" + derive_event_id(flow, instance, _dumps(given))[4:]

    def _open(
        self, flow: str, instance: str, inputs: Mapping[str, Any], flow_id: str | None
    ) -> _Run:
        spec = self._spec(flow)
        given = json.loads(_dumps(dict(inputs)))
        if flow_id is None:
            flow_id = self.flow_id(flow, instance, given)
        stored = self.runtime.store.get_flow(flow_id)
        if stored is not None:
            return _Run(spec, stored, json.loads(stored.data))
        unknown = sorted(set(given) - set(spec.inputs))
        if unknown:
            raise PayloadInvalid(flow, "start", ((", ".join(unknown), "not an input"),))
        data: dict[str, Any] = {"inputs": given, "values": {}, "steps": {}, "order": []}
        if spec.kind == "conditional":
            assert spec.on is not None
            branch = given.get(spec.on)
            if branch not in spec.branches:
                problem = f"not one of {', '.join(spec.branches)}"
                raise PayloadInvalid(flow, "start", ((spec.on, problem),))
            data["branch"] = branch
        record = FlowRecord(flow_id, flow, instance, "running", 0, "", 0)
        run = _Run(spec, record, data)
        # Written with the first step's dispatch (or the parallel branches' results).
        run.note([("FlowStarted", "", {"inputs": given})])
        if spec.kind in ("parallel", "fanout"):
            run.note(self._start_notes(run, self._next_steps(run)))
        return run

    def _load(self, flow_id: str) -> _Run:
        record = self.runtime.store.get_flow(flow_id)
        if record is None:
            raise KeyError(f"no flow run {flow_id!r}")
        return _Run(self._spec(record.flow), record, json.loads(record.data))

    # ------------------------------------------------------------------ the plan of a run

    def _next_steps(self, run: _Run) -> list[FlowStepSpec]:
        """The steps to run now: all unfinished ones of a parallel or fanout flow, else the
        first step not yet succeeded."""
        plan = run.plan()
        if run.spec.kind in ("parallel", "fanout"):
            return [s for s in plan if run.status_of(s.name) in (None, "started")]
        for step in plan:
            if run.status_of(step.name) != "succeeded":
                return [step]
        return []

    def _start_notes(self, run: _Run, steps: Sequence[FlowStepSpec]) -> list[_Note]:
        notes: list[_Note] = []
        for step in steps:
            if run.status_of(step.name) is None:
                run.steps[step.name] = {"status": "started"}
                notes.append(("StepStarted", step.name, {}))
        return notes

    def _plan(self, run: _Run) -> _Plan:
        """What driving the run does, as the store work it needs (`_Op`s, each answered by the
        sync or the asyncio driver): the one place that decides a run's course."""
        while run.record.status in ("running", "waiting"):
            steps = self._next_steps(run)
            if not steps:
                yield _Write("completed", [("FlowCompleted", "", {})])
                break
            if run.spec.kind in ("parallel", "fanout"):
                deadline = self._fanout_deadline(run)
                if deadline is not None and run.record.version == 0:
                    # The deadline is stored before any branch runs: a restart keeps it.
                    yield _Write("running", [], deadline)
                if deadline is not None and self.runtime.clock.now_ms() >= deadline:
                    outcomes = [_TIMED_OUT] * len(steps)
                else:
                    outcomes = yield _Branches(tuple(steps), deadline)
                if not (yield from self._record_all(run, steps, outcomes, deadline)):
                    break  # a fanout waits for replies until its deadline
                continue
            step = steps[0]
            if step.kind == "send":
                assert step.send is not None
                run.note(self._start_notes(run, [step]))
                # The plan's last step settles the run in the commit of its dispatch.
                last = step is run.plan()[-1]
                outcome = yield _Send(step, step.send, "do", "running", last)
                if outcome is _SETTLED:
                    continue
            else:
                run.note(self._start_notes(run, [step]))
                outcome = self._attempt_here(run, step)
            if outcome[0] == "waiting":
                yield from self._wait(run, step, outcome)
                break
            yield from self._record_one(run, step, outcome)
        if run.record.status == "compensating":
            undo = self._to_compensate(run)
            for step in undo:
                assert step.compensate is not None
                last = step is undo[-1]
                answer = yield _Send(step, step.compensate, "undo", "compensating", last)
                if answer is _SETTLED:
                    continue
                status, detail = answer
                yield from self._record_undo(run, step, _undo_outcome(status, detail))
            if run.record.status == "compensating":
                yield from self._end_compensation(run)

    def _fanout_deadline(self, run: _Run) -> int | None:
        """A fanout's `within` as a point in time on the runtime's clock, fixed when the run
        starts and stored with it (the run's `wake_ms` while it waits for replies)."""
        spec = run.spec
        if spec.kind != "fanout" or spec.within_ms is None:
            return None
        if "deadline" not in run.data:
            run.data["deadline"] = self.runtime.clock.now_ms() + spec.within_ms
        return int(run.data["deadline"])

    # ------------------------------------------------------------------ the sync driver

    def _drive(self, run: _Run) -> FlowResult:
        plan = self._plan(run)
        answer: Any = None
        while True:
            try:
                op = plan.send(answer)
            except StopIteration:
                return self._result(run)
            if isinstance(op, _Write):
                self._write(run, op.status, op.notes, op.wake_ms)
                answer = None
            elif isinstance(op, _Send):
                answer = self._send(run, op)
            else:
                answer = [self._attempt(run, step, op.deadline) for step in op.steps]

    def _send(self, run: _Run, op: _Send) -> tuple[str, Any]:
        """A send (or compensation) and the run's pending notes in one commit: the flow's
        write and the dispatch are two units of one batch (each atomic on its own); the last
        one's batch has a third unit, its result and the run's end (`_settling`)."""
        try:
            self._hook(run, op.step, op.phase)
            governor, target, payload, event_id = self._receiver(run, op.step, op.emit, op.phase)
            work = governor._work(
                target, op.emit.event, payload or None, self.actor, event_id, None, None, False
            )
        except StepFailed as failed:
            return "failed", failed.message
        except _STEP_FAILURES as failed:
            return "failed", f"{failed.code}: {failed.message}"
        # Prepared: a receiver's outside actions (a policy's) run before the commit, under the
        # claim of the step's event id, so another process resuming this run waits for it.
        keys = governor._claim_keys(work)
        release = self.runtime._outside.claim(keys, governor._committed(work)) if keys else None
        try:
            try:
                unit = governor._prepare(work)
            except _STEP_FAILURES as failed:
                return "failed", f"{failed.code}: {failed.message}"
            return self._send_prepared(run, op, governor, target, payload, event_id, unit)
        finally:
            if release is not None:
                release()

    def _send_prepared(
        self,
        run: _Run,
        op: _Send,
        governor: Governor,
        target: str,
        payload: dict[str, Any],
        event_id: str,
        unit: Callable[[Transaction, _Chain], object],
    ) -> tuple[str, Any]:
        """The rest of `_send`, once its dispatch's outside actions ran (see there)."""
        # One batch: the run's write (its pending notes), the dispatch, and for the last step
        # the unit that records its outcome and the run's end. A partitioned store commits
        # the run's units in the partition of its run id, the dispatch in its receiver's.
        runtime = self.runtime
        start = self._write_work(run, op.status, [], None)
        works: list[Callable[[Transaction, _Chain], object]] = [start, unit]
        if op.settle:
            works = self._settling(run, op, start, unit)
        mine = runtime._partition_of(run.record.flow_id)
        partitions = [mine, runtime._partition_of(target), mine][: len(works)]
        outcomes = runtime._submit_many(works, partitions)
        for written in outcomes[::2]:  # the run's own units
            if written.error is not None:
                raise written.error
            if written.value is not None:
                run.record = cast(FlowRecord, written.value)
        if len(outcomes) == 3 and outcomes[2].value is not None:
            return _SETTLED
        outcome = outcomes[1]
        if isinstance(outcome.error, UnknownInstance):  # the receiver's first event
            try:
                result = self._dispatch(governor, target, op.emit.event, payload, event_id)
            except _STEP_FAILURES as failed:
                return _step_outcome(failed)
            return _step_outcome(result)
        if outcome.error is not None:
            return _step_outcome(outcome.error)
        value = outcome.value
        rejected = getattr(value, "error", None)  # the dispatch's _Rejected
        return _step_outcome(rejected if rejected is not None else value)

    def _attempt(self, run: _Run, step: FlowStepSpec, deadline: int | None) -> tuple[str, Any]:
        """A parallel or fanout branch: ("succeeded", result) | ("failed", reason) |
        ("no_reply", reason) | ("timed_out", reason)."""
        try:
            self._hook(run, step, "do")
            if step.kind != "send":
                return self._attempt_here(run, step, hooked=True)
            assert step.send is not None
            governor, target, payload, event_id = self._receiver(run, step, step.send, "do")
            result = self._dispatch(governor, target, step.send.event, payload, event_id)
        except (StepFailed, *_STEP_FAILURES) as failed:
            return _step_outcome(failed)
        return self._late(_step_outcome(result), deadline)

    def _dispatch(
        self,
        governor: Governor,
        target: str,
        event: str,
        payload: dict[str, Any],
        event_id: str,
    ) -> DispatchResult:
        """dispatch, creating a missing receiver first (created meanwhile, or by an earlier
        attempt of this step: either will do)."""
        try:
            return governor.dispatch(target, event, payload or None, self.actor, event_id=event_id)
        except UnknownInstance:
            with contextlib.suppress(InstanceExists):
                governor.create(target, self.actor)
            return governor.dispatch(target, event, payload or None, self.actor, event_id=event_id)

    def _late(self, outcome: tuple[str, Any], deadline: int | None) -> tuple[str, Any]:
        """A reply that came after the fanout's deadline counts as timed out (its effect
        stands, and a repeat is deduplicated)."""
        now = self.runtime.clock.now_ms()
        if deadline is not None and now > deadline and outcome[0] != "no_reply":
            return "timed_out", f"replied {now - deadline} ms after the fanout's deadline"
        return outcome

    # ------------------------------------------------------------------ the asyncio driver

    async def _drive_async(self, run: _Run) -> FlowResult:
        plan = self._plan(run)
        answer: Any = None
        while True:
            try:
                op = plan.send(answer)
            except StopIteration:
                return self._result(run)
            if isinstance(op, _Write):
                await self._write_async(run, op.status, op.notes, op.wake_ms)
                answer = None
            elif isinstance(op, _Send):
                answer = await self._send_async(run, op)
            else:
                answer = await self._branches_async(run, op)

    async def _send_async(self, run: _Run, op: _Send) -> tuple[str, Any]:
        """`_send` for asyncio: the run's write and `Governor.dispatch_async` queued together,
        so they (and every other coroutine's units meanwhile) share one group commit."""
        try:
            self._hook(run, op.step, op.phase)
            governor, target, payload, event_id = self._receiver(run, op.step, op.emit, op.phase)
        except StepFailed as failed:
            return "failed", failed.message
        written, sent = await asyncio.gather(
            self._write_async(run, op.status, []),
            self._dispatch_async(governor, target, op.emit.event, payload, event_id),
            return_exceptions=True,
        )
        if isinstance(written, BaseException):
            raise written
        return _step_outcome(sent)

    async def _dispatch_async(
        self,
        governor: Governor,
        target: str,
        event: str,
        payload: dict[str, Any],
        event_id: str,
    ) -> DispatchResult:
        """dispatch_async, creating a missing receiver first (asked only when it is missing,
        so no store read blocks the event loop on the way)."""
        try:
            return await governor.dispatch_async(
                target, event, payload or None, self.actor, event_id=event_id
            )
        except UnknownInstance:
            with contextlib.suppress(InstanceExists):
                await governor.create_async(target, self.actor)
            return await governor.dispatch_async(
                target, event, payload or None, self.actor, event_id=event_id
            )

    async def _attempt_async(
        self, run: _Run, step: FlowStepSpec, deadline: int | None
    ) -> tuple[str, Any]:
        try:
            self._hook(run, step, "do")
            if step.kind != "send":
                return self._attempt_here(run, step, hooked=True)
            assert step.send is not None
            governor, target, payload, event_id = self._receiver(run, step, step.send, "do")
            result = await self._dispatch_async(
                governor, target, step.send.event, payload, event_id
            )
        except (StepFailed, *_STEP_FAILURES) as failed:
            return _step_outcome(failed)
        return self._late(_step_outcome(result), deadline)

    async def _branches_async(self, run: _Run, op: _Branches) -> list[tuple[str, Any]]:
        """Every branch at once. A fanout's branches still running at its deadline (the time
        left on the runtime's clock, waited by the event loop) count as timed out; their
        dispatch still finishes, deduplicated if it is ever repeated."""
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._attempt_async(run, step, op.deadline)) for step in op.steps
            ]
            if op.deadline is None:
                return [await task for task in tasks]
            left = max(0, op.deadline - self.runtime.clock.now_ms()) / 1000
            await asyncio.wait(tasks, timeout=left)
            late = [t for t in tasks if not t.done()]
            if late:
                await asyncio.wait(late)  # let them finish inside the group
        return [_TIMED_OUT if task in late else task.result() for task in tasks]

    # ------------------------------------------------------------------ one step

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
            if not hooked:
                self._hook(run, step, "do")
            if step.kind == "compute":
                assert step.function is not None
                values = {**run.data["inputs"], **run.data["values"]}
                return "succeeded", json.loads(_dumps(self.functions[step.function](values)))
            return self._check_wait(run, step)
        except StepFailed as failed:
            return _step_outcome(failed)

    def _check_wait(self, run: _Run, step: FlowStepSpec) -> tuple[str, Any]:
        assert step.machine is not None
        record = self.runtime.governor(step.machine).get(run.record.instance)
        if record is not None and record.state in step.states:
            return "succeeded", {"state": record.state}
        now = self.runtime.clock.now_ms()
        waiting_since = run.steps.get(step.name, {}).get("since", now)
        deadline = None if step.within_ms is None else waiting_since + step.within_ms
        if deadline is not None and now >= deadline:
            shown = record.state if record is not None else "no instance"
            waited = format_duration(step.within_ms or 0)
            return "failed", f"{step.machine} still in {shown} after waiting {waited}"
        return "waiting", (waiting_since, deadline)

    def _receiver(
        self, run: _Run, step: FlowStepSpec, emit: Emit, phase: str
    ) -> tuple[Governor, str, dict[str, Any], str]:
        """The receiver, its instance, the payload and the event id of a send."""
        governor = self.runtime.governor(emit.machine)
        inputs = run.data["inputs"]
        target = run.record.instance if step.to is None else str(inputs[step.to])
        payload = _payload(emit, {**inputs, **run.data["values"]}, target, self.actor, run)
        event_id = derive_event_id("flow", run.record.flow_id, step.name, phase)
        return governor, target, payload, event_id

    # ------------------------------------------------------------------ recording

    def _record_one(self, run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> _Plan:
        status, notes = self._step_result(run, step, outcome)
        if status == "running":
            run.note(notes)
            return
        yield _Write(status, notes)

    def _step_result(
        self, run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]
    ) -> tuple[FlowStatus, list[_Note]]:
        """A step's outcome recorded in the run's data: the run's status after it ("running",
        or "compensating" after a failure) and the entries that say so."""
        status, detail = outcome
        if status == "succeeded":
            self._succeed(run, step, detail)
            return "running", [("StepSucceeded", step.name, {"result": detail})]
        run.steps[step.name] = {"status": status, "error": str(detail)}
        run.data["failed"], run.data["reason"] = step.name, str(detail)
        return "compensating", [("StepFailed", step.name, {"error": str(detail)})]

    def _succeed(self, run: _Run, step: FlowStepSpec, detail: Any) -> None:
        run.steps[step.name] = {"status": "succeeded", "result": detail}
        run.data["order"].append(step.name)
        if step.kind == "compute":
            run.data["values"][step.name] = detail

    def _record_all(
        self,
        run: _Run,
        steps: Sequence[FlowStepSpec],
        outcomes: Sequence[tuple[str, Any]],
        deadline: int | None,
    ) -> Generator[_Op, Any, bool]:
        """Record the branches' replies; True when the run goes on. A fanout branch without a
        reply yet (NoReply) keeps the run waiting until the deadline, when it times out."""
        notes: list[_Note] = []
        failed: list[tuple[FlowStepSpec, str]] = []
        unanswered = False
        for step, (status, detail) in zip(steps, outcomes, strict=True):
            if status == "succeeded":
                self._succeed(run, step, detail)
                notes.append(("StepSucceeded", step.name, {"result": detail}))
            elif status == "no_reply" and deadline is not None:
                unanswered = True
                entry = run.steps.setdefault(step.name, {"status": "started"})
                if not entry.get("unanswered"):
                    entry["unanswered"] = True
                    why = {"until": deadline, "why": str(detail)}
                    notes.append(("StepWaiting", step.name, why))
            else:
                status = "failed" if status == "no_reply" else status
                run.steps[step.name] = {"status": status, "error": str(detail)}
                notes.append(("StepFailed", step.name, {"error": str(detail)}))
                failed.append((step, str(detail)))
        if run.spec.kind == "fanout":
            if unanswered:
                if notes or run.pending or run.record.status != "waiting":
                    yield _Write("waiting", notes, deadline)
                return False  # still waiting: nothing new to record
            gathered = {s.name: run.status_of(s.name) or "" for s in run.plan()}
            run.data["gathered"] = gathered
            succeeded = sum(1 for status in gathered.values() if status == "succeeded")
            quorum = run.spec.quorum if run.spec.quorum is not None else len(gathered)
            notes.append(("FanInGathered", "", {"gathered": gathered, "quorum": quorum}))
            if succeeded >= quorum:
                notes.append(("FlowCompleted", "", {}))
                yield _Write("completed", notes)
            else:
                run.data["reason"] = f"{succeeded} of {len(gathered)} replies, quorum {quorum}"
                notes.append(("FlowFailed", "", {"reason": run.data["reason"]}))
                yield _Write("failed", notes)
            return True
        if failed:
            run.data["failed"] = failed[0][0].name
            run.data["reason"] = "; ".join(f"{s.name}: {why}" for s, why in failed)
            yield _Write("compensating", notes)
        else:
            yield _Write("running", notes)
        return True

    def _wait(self, run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> _Plan:
        since, deadline = outcome[1]
        entry = run.steps.setdefault(step.name, {"status": "started"})
        if run.record.status == "waiting" and entry.get("since") == since and not run.pending:
            return  # still waiting: nothing new to record
        entry["since"] = since
        yield _Write("waiting", [("StepWaiting", step.name, {"until": deadline})], deadline)

    def _to_compensate(self, run: _Run) -> list[FlowStepSpec]:
        """Completed steps with a compensation not yet run, newest first."""
        by_name = {s.name: s for s in run.plan()}
        return [
            by_name[name]
            for name in reversed(run.data["order"])
            if by_name[name].compensate is not None and run.status_of(name) == "succeeded"
        ]

    def _record_undo(self, run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> _Plan:
        compensated, notes = self._undo_result(run, step, outcome)
        if compensated:
            run.note(notes, "compensating")
            return
        yield _Write("compensating", notes)

    def _undo_result(
        self, run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]
    ) -> tuple[bool, list[_Note]]:
        """A compensation's outcome recorded in the run's data: whether it compensated, and
        the entry that says so."""
        status, detail = outcome
        if status == "compensated":
            run.steps[step.name]["status"] = "compensated"
            return True, [("StepCompensated", step.name, {"result": detail})]
        run.steps[step.name]["status"] = "uncompensated"
        run.steps[step.name]["error"] = str(detail)
        return False, [("CompensationFailed", step.name, {"error": str(detail)})]

    def _end_compensation(self, run: _Run) -> _Plan:
        yield _Write(*self._compensation_end(run))

    def _compensation_end(self, run: _Run) -> tuple[FlowStatus, list[_Note]]:
        """How a run ends once nothing is left to compensate: "compensated", or "failed" when
        a compensation was refused (a person must look)."""
        failed = [name for name, s in run.steps.items() if s["status"] == "uncompensated"]
        detail = {"failed_step": run.data.get("failed"), "reason": run.data.get("reason")}
        if failed:
            detail["uncompensated"] = failed
            return "failed", [("FlowFailed", str(run.data.get("failed")), detail)]
        return "compensated", [("CompensationCompleted", str(run.data.get("failed")), detail)]

    def _settled(
        self, run: _Run, op: _Send, outcome: tuple[str, Any]
    ) -> tuple[FlowStatus, list[_Entry]]:
        """The last step's (or compensation's) outcome recorded, and how the run ends after
        it or that it goes on to compensate: what the plan's next writes would hold, each
        entry with the run's status when it happened."""
        step = op.step
        if op.phase == "undo":
            _, notes = self._undo_result(run, step, _undo_outcome(*outcome))
            status: FlowStatus = "compensating"
        else:
            status, notes = self._step_result(run, step, outcome)
        entries = [(event, name, detail, status) for event, name, detail in notes]
        end: list[_Note]
        if status == "running":
            status, end = "completed", [("FlowCompleted", "", {})]
        elif op.phase == "undo" or not self._to_compensate(run):
            status, end = self._compensation_end(run)
        else:
            return status, entries
        return status, entries + [(event, name, detail, status) for event, name, detail in end]

    # ------------------------------------------------------------------ writing

    def _write_work(
        self, run: _Run, status: FlowStatus, notes: Sequence[_Note], wake_ms: int | None
    ) -> Callable[[Transaction, _Chain], FlowRecord]:
        """The unit of work that writes the run's record (version-checked) and its ledger
        entries, the pending notes first."""
        before = run.record
        entries = [*run.pending, *((event, step, detail, status) for event, step, detail in notes)]
        run.pending = []
        text = _dumps(run.data)

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
        runtime = self.runtime
        flow_id, flow, actor = before.flow_id, before.flow, self.actor
        now = runtime.clock.now_ms()
        record = FlowRecord(
            flow_id, flow, before.instance, status, before.version + 1, text, now, wake_ms
        )
        txn.save_flow(record, before.version)
        if runtime.sealer is not None:
            for index, (event, step, detail, to_state) in enumerate(entries):
                event_id = derive_event_id("flow", flow_id, before.version + 1, index)
                digest = _detail_digest(detail)
                chain.append(
                    txn,
                    EntryData(
                        now, "flow", flow, flow_id, step, to_state, event, actor, event_id, digest
                    ),
                )
        return record

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
            status, entries = self._settled(run, op, _step_outcome(answered[0]))
            return self._store_run(txn, chain, written[0], status, entries, _dumps(run.data), None)

        return [started, dispatch, settle]

    def _write(
        self, run: _Run, status: FlowStatus, notes: Sequence[_Note], wake_ms: int | None = None
    ) -> None:
        """Write the run (`_write_work`) in a commit of its own."""
        runtime = self.runtime
        work = self._write_work(run, status, notes, wake_ms)
        run.record = runtime._submit(work, runtime._partition_of(run.record.flow_id))

    async def _write_async(
        self, run: _Run, status: FlowStatus, notes: Sequence[_Note], wake_ms: int | None = None
    ) -> None:
        runtime = self.runtime
        work = self._write_work(run, status, notes, wake_ms)
        run.record = await runtime._submit_async(work, runtime._partition_of(run.record.flow_id))

    def _result(self, run: _Run) -> FlowResult:
        data = run.data
        return FlowResult(
            run.record.flow_id,
            run.record.flow,
            run.record.instance,
            run.record.status,
            {name: str(s["status"]) for name, s in data["steps"].items()},
            data.get("failed"),
            data.get("reason"),
            dict(data["values"]),
            data.get("gathered"),
        )


@dataclass(frozen=True, slots=True)
class _Write:
    """Write the run's record with these notes (and the pending ones) in one unit of work."""

    status: FlowStatus
    notes: Sequence[_Note]
    wake_ms: int | None = None


@dataclass(frozen=True, slots=True)
class _Send:
    """Run a send step (or compensation) with the run's pending notes, in one commit; the
    answer is ("succeeded", result) or ("failed", reason)."""

    step: FlowStepSpec
    emit: Emit
    phase: Literal["do", "undo"]
    status: FlowStatus
    # The last step (or compensation): its outcome and the run's end are recorded in the
    # commit of its dispatch (where the driver can), and the answer is then _SETTLED.
    settle: bool = False


@dataclass(frozen=True, slots=True)
class _Branches:
    """Run every branch of a parallel or fanout flow at once; the answer is their outcomes."""

    steps: tuple[FlowStepSpec, ...]
    deadline: int | None


_Op = _Write | _Send | _Branches
_Plan = Generator[_Op, Any, None]
_TIMED_OUT = ("timed_out", "no reply within the fanout's deadline")
_SETTLED = ("settled", None)  # a settling _Send's answer when its commit recorded everything
# What a step's dispatch answers with, as _step_outcome takes it (anything else is raised).
_OUTCOMES = (DispatchResult, StepFailed, *_STEP_FAILURES)


def _detail_digest(detail: Mapping[str, Any]) -> bytes:
    """The payload digest of a flow entry's detail. The runner's details hold JSON values
    already (results and inputs went through JSON when they were stored), and canonical JSON
    of such a value is that of its JSON round trip; anything else is made JSON first."""
    try:
        return payload_digest(detail)
    except PayloadEncodingError:
        return payload_digest(json.loads(_dumps(detail)))


def _undo_outcome(status: str, detail: Any) -> tuple[str, Any]:
    """A compensation's outcome: its send's, "compensated" when that succeeded."""
    return ("compensated" if status == "succeeded" else status), detail


def _step_outcome(answer: object) -> tuple[str, Any]:
    """A step's outcome from what its dispatch answered (a result, or the error it raised)."""
    if isinstance(answer, DispatchResult):
        return "succeeded", {"state": answer.to_state, "seq": answer.seq}
    if isinstance(answer, NoReply):
        return "no_reply", answer.message
    if isinstance(answer, StepFailed):
        return "failed", answer.message
    if isinstance(answer, ActionFailed) and _unanswered(answer.cause):
        return "no_reply", f"{answer.code}: {answer.message}"
    if isinstance(answer, _STEP_FAILURES):
        return "failed", f"{answer.code}: {answer.message}"
    if isinstance(answer, BaseException):
        raise answer
    raise TypeError(f"unexpected dispatch outcome {answer!r}")


def _unanswered(cause: BaseException) -> bool:
    """The receiver's action could not reach its service (yet): a fanout branch may get its
    reply on a later attempt."""
    return is_transient(cause) or is_unavailable(cause) or isinstance(cause, BulkheadFull)


def _all_steps(spec: FlowSpec) -> Iterable[FlowStepSpec]:
    yield from spec.steps
    for steps in spec.branches.values():
        yield from steps


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
