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
  version-checked (two resuming processes cannot both advance one run).
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
  which succeeded, failed or timed out (slower than `within`); it succeeds with `quorum`.
- await: the run is stored as "waiting" until the machine is in one of the states; governor
  timers move the machine meanwhile (nothing is held in memory). `resume_all` (after
  `fire_due` / `deliver_outbox`, or in a new process) checks again; past `within` it fails.
- compute: calls the registered pure function with the inputs and earlier results; its
  result is stored, so a resumed run never calls it with other results in mind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar, cast

from ..dispatch import Governor
from ..errors import (
    ActionFailed,
    IdempotencyConflict,
    InstanceExists,
    InvalidTransition,
    PayloadInvalid,
    RuntimeFailure,
    UnknownEvent,
    UnknownMachine,
)
from ..ledger import EntryData, payload_digest
from ..results import DispatchResult, _dumps, derive_event_id
from ..runtime import Runtime
from ..sealing import _Chain
from ..store.base import FLOW_FINISHED, FlowRecord, FlowStatus, Transaction, WorkOutcome
from ..tables import Emit, FlowSpec, FlowStepSpec
from ..timers import format_duration

__all__ = ["FlowResult", "FlowRunner", "StepContext", "StepFailed"]

T = TypeVar("T")

FLOW_ACTOR = "flow"
StepStatus = Literal["started", "succeeded", "failed", "timed_out", "compensated", "uncompensated"]
# What a step's dispatch may answer with that fails the step rather than the process.
_STEP_FAILURES = (
    InvalidTransition,
    ActionFailed,
    PayloadInvalid,
    UnknownEvent,
    IdempotencyConflict,
)


class StepFailed(RuntimeFailure):
    """Raised by a `before_step` hook (or a compute function) to fail a step on purpose."""

    code = "R030"


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
    pending: list[tuple[str, str, Mapping[str, Any], FlowStatus]] = field(default_factory=list)

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


# A ledger entry the next write seals: (event, step, detail).
_Note = tuple[str, str, Mapping[str, Any]]


class FlowRunner:
    """Runs flows on a Runtime whose governors are loaded.

    `functions` are the pure functions compute steps name, called with a mapping of the
    inputs and earlier results. `before_step` is called before every step and compensation:
    raising StepFailed there fails it (tests and the demo inject failures so)."""

    def __init__(
        self,
        runtime: Runtime,
        flows: Iterable[FlowSpec],
        *,
        functions: Mapping[str, Callable[[Mapping[str, Any]], Any]] | None = None,
        before_step: Callable[[StepContext], None] | None = None,
        actor: str = FLOW_ACTOR,
        threads: int = 64,
    ) -> None:
        self.runtime = runtime
        # The asyncio API's store work runs here; as many threads as runs in flight can
        # share one group commit (asyncio's default pool has only a few).
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="flow")
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
        """Stop the asyncio API's worker threads (the sync API needs none)."""
        self._threads.shutdown(wait=True)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, partial(function, *args))

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

    # ------------------------------------------------------------------ the asyncio API

    async def start_async(
        self,
        flow: str,
        instance: str,
        inputs: Mapping[str, Any],
        *,
        flow_id: str | None = None,
    ) -> FlowResult:
        """`start`, awaited: store work runs in threads, so concurrent runs (and a parallel
        flow's branches, run in an asyncio.TaskGroup) share the SQLite group commit."""
        run = await self._in_thread(self._open, flow, instance, inputs, flow_id)
        return await self._drive_async(run)

    async def resume_async(self, flow_id: str) -> FlowResult:
        run = await self._in_thread(self._load, flow_id)
        if run.record.status in FLOW_FINISHED:
            return self._result(run)
        return await self._drive_async(run)

    async def resume_all_async(self, *, limit: int = 1000) -> list[FlowResult]:
        records = await self._in_thread(self.runtime.store.unfinished_flows, limit)
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

    # ------------------------------------------------------------------ driving a run

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

    def _drive(self, run: _Run) -> FlowResult:
        while run.record.status in ("running", "waiting"):
            steps = self._next_steps(run)
            if not steps:
                self._finish(run)
                break
            if run.spec.kind in ("parallel", "fanout"):
                outcomes = [self._attempt(run, step) for step in steps]
                self._record_all(run, steps, outcomes)
                continue
            step = steps[0]
            if step.kind == "send":
                outcome = self._send_batched(run, step)
            else:
                run.note(self._start_notes(run, [step]))
                outcome = self._attempt(run, step)
            if outcome[0] == "waiting":
                self._wait(run, step, outcome)
                break
            self._record_one(run, step, outcome)
        if run.record.status == "compensating":
            self._compensate(run)
        return self._result(run)

    def _compensate(self, run: _Run) -> None:
        for step in self._to_compensate(run):
            self._record_undo(run, step, self._undo(run, step))
        self._end_compensation(run)

    async def _drive_async(self, run: _Run) -> FlowResult:
        if run.spec.kind not in ("parallel", "fanout"):
            # One step after another: each step is one commit, which the group committer
            # shares with the other coroutines' steps.
            return await self._in_thread(self._drive, run)
        while run.record.status in ("running", "waiting"):
            steps = self._next_steps(run)
            if not steps:
                await self._in_thread(self._finish, run)
                break
            outcomes = await self._attempt_all_async(run, steps)
            await self._in_thread(self._record_all, run, steps, outcomes)
        if run.record.status == "compensating":
            await self._in_thread(self._compensate, run)
        return self._result(run)

    async def _attempt_all_async(
        self, run: _Run, steps: Sequence[FlowStepSpec]
    ) -> list[tuple[str, Any]]:
        """Every branch at once. A fanout's branches that take longer than `within` count as
        timed out (their dispatch still finishes, deduplicated if it is ever repeated)."""
        timeout = None if run.spec.within_ms is None else run.spec.within_ms / 1000
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._in_thread(self._attempt, run, s)) for s in steps]
            if timeout is not None:
                await asyncio.wait(tasks, timeout=timeout)
                late = [t for t in tasks if not t.done()]
                if late:
                    await asyncio.wait(late)  # let them finish inside the group
                    return [
                        ("timed_out", "no reply within the fanout's deadline")
                        if t in late
                        else t.result()
                        for t in tasks
                    ]
        return [task.result() for task in tasks]

    # ------------------------------------------------------------------ one step

    def _attempt(self, run: _Run, step: FlowStepSpec) -> tuple[str, Any]:
        """("succeeded", result) | ("failed", reason) | ("waiting", deadline_ms)."""
        context = StepContext(
            run.spec.name, run.record.flow_id, run.record.instance, step.name, "do"
        )
        started = self.runtime.clock.now_ms()
        try:
            if self.before_step is not None:
                self.before_step(context)
            if step.kind == "compute":
                assert step.function is not None
                values = {**run.data["inputs"], **run.data["values"]}
                return "succeeded", json.loads(_dumps(self.functions[step.function](values)))
            if step.kind == "await":
                return self._check_wait(run, step)
            assert step.send is not None
            result = self._dispatch(run, step, step.send, "do")
        except StepFailed as failed:
            return "failed", failed.message
        except _STEP_FAILURES as failed:
            return "failed", f"{failed.code}: {failed.message}"
        elapsed = self.runtime.clock.now_ms() - started
        if run.spec.within_ms is not None and elapsed > run.spec.within_ms:
            return "timed_out", f"replied after {elapsed} ms"
        return "succeeded", {"state": result.to_state, "seq": result.seq}

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

    def _target(
        self, run: _Run, step: FlowStepSpec, emit: Emit, phase: str
    ) -> tuple[Governor, str, dict[str, Any], str]:
        """The receiver (its instance created if missing), the payload and the event id."""
        governor = self.runtime.governor(emit.machine)
        inputs = run.data["inputs"]
        target = run.record.instance if step.to is None else str(inputs[step.to])
        if governor.get(target) is None:
            # Created meanwhile, or by an earlier attempt of this step: either will do.
            with contextlib.suppress(InstanceExists):
                governor.create(target, self.actor)
        payload = _payload(emit, {**inputs, **run.data["values"]}, target, self.actor, run)
        event_id = derive_event_id("flow", run.record.flow_id, step.name, phase)
        return governor, target, payload, event_id

    def _dispatch(self, run: _Run, step: FlowStepSpec, emit: Emit, phase: str) -> DispatchResult:
        governor, target, payload, event_id = self._target(run, step, emit, phase)
        return governor.dispatch(target, emit.event, payload or None, self.actor, event_id=event_id)

    def _undo(self, run: _Run, step: FlowStepSpec) -> tuple[str, Any]:
        assert step.compensate is not None
        status, detail = self._batched(run, step, step.compensate, "undo", "compensating")
        return ("compensated" if status == "succeeded" else status), detail

    def _send_batched(self, run: _Run, step: FlowStepSpec) -> tuple[str, Any]:
        assert step.send is not None
        return self._batched(run, step, step.send, "do", "running")

    def _batched(
        self,
        run: _Run,
        step: FlowStepSpec,
        emit: Emit,
        phase: Literal["do", "undo"],
        status: FlowStatus,
    ) -> tuple[str, Any]:
        """A send (or compensation) and the run's pending notes in one commit: the flow's
        write and the dispatch are two units of one batch (each atomic on its own)."""
        flow_id, instance = run.record.flow_id, run.record.instance
        context = StepContext(run.spec.name, flow_id, instance, step.name, phase)
        if phase == "do":
            run.note(self._start_notes(run, [step]))
        try:
            if self.before_step is not None:
                self.before_step(context)
            governor, target, payload, event_id = self._target(run, step, emit, phase)
            unit = governor._work(
                target, emit.event, payload or None, self.actor, event_id, None, None, False
            )
        except StepFailed as failed:
            return "failed", failed.message
        except _STEP_FAILURES as failed:
            return "failed", f"{failed.code}: {failed.message}"
        outcome = self._write(run, status, [], along=unit)
        assert outcome is not None
        value, error = outcome.value, outcome.error
        if error is not None:
            if isinstance(error, _STEP_FAILURES):
                return "failed", f"{error.code}: {error.message}"
            raise error
        if isinstance(value, DispatchResult):
            return "succeeded", {"state": value.to_state, "seq": value.seq}
        rejected = getattr(value, "error", None)  # the dispatch's _Rejected
        if isinstance(rejected, RuntimeFailure):
            return "failed", f"{rejected.code}: {rejected.message}"
        raise TypeError(f"unexpected dispatch outcome {value!r}")

    # ------------------------------------------------------------------ recording

    def _record_one(self, run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> None:
        status, detail = outcome
        if status == "succeeded":
            self._succeed(run, step, detail)
            run.note([("StepSucceeded", step.name, {"result": detail})])
        else:
            self._fail(run, step, status, str(detail))

    def _succeed(self, run: _Run, step: FlowStepSpec, detail: Any) -> None:
        run.steps[step.name] = {"status": "succeeded", "result": detail}
        run.data["order"].append(step.name)
        if step.kind == "compute":
            run.data["values"][step.name] = detail

    def _fail(self, run: _Run, step: FlowStepSpec, status: str, reason: str) -> None:
        run.steps[step.name] = {"status": status, "error": reason}
        run.data["failed"], run.data["reason"] = step.name, reason
        notes: list[_Note] = [("StepFailed", step.name, {"error": reason})]
        self._write(run, "compensating", notes)

    def _record_all(
        self, run: _Run, steps: Sequence[FlowStepSpec], outcomes: Sequence[tuple[str, Any]]
    ) -> None:
        notes: list[_Note] = []
        failed: list[tuple[FlowStepSpec, str]] = []
        for step, (status, detail) in zip(steps, outcomes, strict=True):
            if status == "succeeded":
                self._succeed(run, step, detail)
                notes.append(("StepSucceeded", step.name, {"result": detail}))
            else:
                run.steps[step.name] = {"status": status, "error": str(detail)}
                notes.append(("StepFailed", step.name, {"error": str(detail)}))
                failed.append((step, str(detail)))
        if run.spec.kind == "fanout":
            gathered = {s.name: run.status_of(s.name) or "" for s in run.plan()}
            run.data["gathered"] = gathered
            succeeded = sum(1 for status in gathered.values() if status == "succeeded")
            quorum = run.spec.quorum if run.spec.quorum is not None else len(gathered)
            notes.append(("FanInGathered", "", {"gathered": gathered, "quorum": quorum}))
            if succeeded >= quorum:
                notes.append(("FlowCompleted", "", {}))
                self._write(run, "completed", notes)
            else:
                run.data["reason"] = f"{succeeded} of {len(gathered)} replies, quorum {quorum}"
                notes.append(("FlowFailed", "", {"reason": run.data["reason"]}))
                self._write(run, "failed", notes)
            return
        if failed:
            run.data["failed"] = failed[0][0].name
            run.data["reason"] = "; ".join(f"{s.name}: {why}" for s, why in failed)
            self._write(run, "compensating", notes)
        else:
            self._write(run, "running", notes)

    def _wait(self, run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> None:
        since, deadline = outcome[1]
        entry = run.steps.setdefault(step.name, {"status": "started"})
        if run.record.status == "waiting" and entry.get("since") == since and not run.pending:
            return  # still waiting: nothing new to record
        entry["since"] = since
        self._write(run, "waiting", [("StepWaiting", step.name, {"until": deadline})], deadline)

    def _to_compensate(self, run: _Run) -> list[FlowStepSpec]:
        """Completed steps with a compensation not yet run, newest first."""
        by_name = {s.name: s for s in run.plan()}
        return [
            by_name[name]
            for name in reversed(run.data["order"])
            if by_name[name].compensate is not None and run.status_of(name) == "succeeded"
        ]

    def _record_undo(self, run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> None:
        status, detail = outcome
        if status == "compensated":
            run.steps[step.name]["status"] = "compensated"
            run.note([("StepCompensated", step.name, {"result": detail})], "compensating")
        else:
            run.steps[step.name]["status"] = "uncompensated"
            run.steps[step.name]["error"] = str(detail)
            notes: list[_Note] = [("CompensationFailed", step.name, {"error": str(detail)})]
            self._write(run, "compensating", notes)

    def _end_compensation(self, run: _Run) -> None:
        failed = [name for name, s in run.steps.items() if s["status"] == "uncompensated"]
        detail = {"failed_step": run.data.get("failed"), "reason": run.data.get("reason")}
        if failed:
            detail["uncompensated"] = failed
            self._write(run, "failed", [("FlowFailed", str(run.data.get("failed")), detail)])
        else:
            note: _Note = ("CompensationCompleted", str(run.data.get("failed")), detail)
            self._write(run, "compensated", [note])

    def _finish(self, run: _Run) -> None:
        self._write(run, "completed", [("FlowCompleted", "", {})])

    def _write(
        self,
        run: _Run,
        status: FlowStatus,
        notes: Sequence[_Note],
        wake_ms: int | None = None,
        *,
        along: Callable[[Transaction, _Chain], object] | None = None,
    ) -> WorkOutcome[object] | None:
        """One unit of work: the run's record (version-checked) and its ledger entries, the
        pending notes first; with `along`, that unit too, in the same commit (its outcome is
        returned)."""
        runtime = self.runtime
        before = run.record
        entries = [*run.pending, *((event, step, detail, status) for event, step, detail in notes)]
        run.pending = []
        text = _dumps(run.data)
        flow_id, flow, actor = before.flow_id, before.flow, self.actor

        def work(txn: Transaction, chain: _Chain) -> FlowRecord:
            now = runtime.clock.now_ms()
            record = FlowRecord(
                flow_id, flow, before.instance, status, before.version + 1, text, now, wake_ms
            )
            txn.save_flow(record, before.version)
            if runtime.sealer is not None:
                for index, (event, step, detail, to_state) in enumerate(entries):
                    event_id = derive_event_id("flow", flow_id, before.version + 1, index)
                    data = EntryData(
                        now,
                        "flow",
                        flow,
                        flow_id,
                        step,
                        to_state,
                        event,
                        actor,
                        event_id,
                        payload_digest(json.loads(_dumps(detail))),
                    )
                    entry = chain.seal(txn, data)
                    txn.append_ledger(entry)
                    chain.advance(entry)
            return record

        if along is None:
            run.record = runtime._submit(work)
            return None
        written, outcome = runtime._submit_many([work, along])
        if written.error is not None:
            raise written.error
        run.record = cast(FlowRecord, written.value)
        return outcome

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
