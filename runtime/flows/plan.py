"""The plan of a run: one generator that decides the run's course and yields the store work
it needs (ops.py), answered by the sync driver or the asyncio one."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from ..store.base import FlowStatus
from ..tables import FlowStepSpec
from .compensation import (
    _defer_undo,
    _end_compensation,
    _given_up,
    _record_undo,
    _retry_due,
    _retry_step,
    _step_settled,
    _to_compensate,
    _undo_due,
    _undo_outcome,
)
from .fanin import _gather
from .ops import _SETTLED, _TIMED_OUT, _Branches, _Op, _Plan, _Write
from .run import _next_steps, _Note, _Run, _start, _succeed
from .steps import _StepRunner


def _plan(runner: _StepRunner, run: _Run) -> _Plan:
    """What driving the run does, as the store work it needs (`_Op`s, each answered by the
    sync or the asyncio driver): the one place that decides a run's course."""
    if not _undo_due(run, runner.runtime.clock.now_ms()):
        return  # a compensation that did not answer is tried again at the run's wake_ms
    clock = runner.runtime.clock
    plan = run.plan()
    while run.record.status in ("running", "waiting"):
        steps = _next_steps(run)
        if not steps:
            yield _Write("completed", [("FlowCompleted", "", {})])
            break
        if run.record.status == "waiting" and not _retry_due(run, steps, clock.now_ms()):
            break  # a step that did not answer is tried again at the run's wake_ms
        if run.spec.kind in ("parallel", "fanout"):
            deadline = _fanout_deadline(runner, run)
            if deadline is not None and run.record.version == 0:
                # The deadline is stored before any branch runs: a restart keeps it.
                yield _Write("running", [], deadline)
            if deadline is not None and runner.runtime.clock.now_ms() >= deadline:
                outcomes = [_TIMED_OUT] * len(steps)
            else:
                outcomes = yield _Branches(tuple(steps), deadline)
            now = clock.now_ms()
            if not (yield from _record_all(run, steps, outcomes, deadline, now)):
                break  # a branch waits for its reply (a fanout's, until its deadline)
            continue
        step = steps[0]
        _start(run, step)
        if step.kind == "send":
            # The plan's last step settles the run in the commit of its dispatch.
            outcome = yield runner._send_op(step, "do", step is plan[-1])
            if outcome is _SETTLED:
                continue
        else:
            outcome = runner._attempt_here(run, step)
        if outcome[0] == "waiting":
            yield from _wait(run, step, outcome)
            break
        after, notes, wake = _step_settled(run, step, outcome, clock.now_ms())
        if wake is not None:
            yield _Write(after, notes, wake)  # the step did not answer: tried again then
            break
        _record_one(run, after, notes)
    if run.record.status == "compensating":
        undo = _to_compensate(run)
        for step in undo:
            answer = yield runner._send_op(step, "undo", step is undo[-1])
            if answer is _SETTLED:
                if run.status_of(step.name) == "succeeded":
                    return  # not undone yet: its commit stored when it is tried again
                continue
            status, detail = _undo_outcome(*answer)
            if status == "no_reply":
                # Newest first: the older steps wait until this one is undone.
                yield from _defer_undo(run, step, detail, clock.now_ms())
                return
            yield from _record_undo(run, step, (status, detail))
        if run.record.status == "compensating":
            yield from _end_compensation(run)


def _fanout_deadline(runner: _StepRunner, run: _Run) -> int | None:
    """A fanout's `within` as a point in time on the runtime's clock, fixed when the run
    starts and stored with it (the run's `wake_ms` while it waits for replies)."""
    spec = run.spec
    if spec.kind != "fanout" or spec.within_ms is None:
        return None
    if "deadline" not in run.data:
        run.data["deadline"] = runner.runtime.clock.now_ms() + spec.within_ms
    return int(run.data["deadline"])


def _record_one(run: _Run, status: FlowStatus, notes: list[_Note]) -> None:
    """A step's outcome (`_step_settled`), noted for the run's next write. A failure turns
    the run to compensating at once, in memory: the first compensation's commit (or the run's
    end, with nothing to undo) writes it. A crash before that retries the step, whose failure
    nothing recorded, as a crash before the step would; no commit of its own."""
    if status != "running":
        run.record = replace(run.record, status=status)
    run.note(notes, status)


def _record_all(
    run: _Run,
    steps: Sequence[FlowStepSpec],
    outcomes: Sequence[tuple[str, Any]],
    deadline: int | None,
    now_ms: int,
) -> Generator[_Op, Any, bool]:
    """Record the branches' replies; True when the run goes on. A fanout branch without a
    reply yet (NoReply) keeps the run waiting until the deadline; then the gather decides,
    inside its own transaction, which of the branches timed out (`_gather`). Any other
    branch without a reply is tried again from the store (`_retry_step`), the run waiting
    until the earliest retry time: the other branches' results are recorded meanwhile, and
    when one of them failed, the run compensates instead (the unanswered one fails)."""
    notes: list[_Note] = []
    failed: list[tuple[FlowStepSpec, str]] = []
    timed_out: list[FlowStepSpec] = []
    retrying: list[tuple[FlowStepSpec, Any]] = []
    retry_at: list[int] = []
    unanswered = False
    for step, (status, detail) in zip(steps, outcomes, strict=True):
        if status == "succeeded":
            _succeed(run, step, detail)
            notes.append(("StepSucceeded", step.name, {"result": detail}))
        elif status == "no_reply" and deadline is not None:
            unanswered = True
            entry = run.steps.setdefault(step.name, {"status": "started"})
            if not entry.get("unanswered"):
                entry["unanswered"] = True
                why = {"until": deadline, "why": str(detail)}
                notes.append(("StepWaiting", step.name, why))
        elif status == "timed_out" and run.spec.kind == "fanout":
            timed_out.append(step)
        elif status == "no_reply" and (retry := _retry_step(run, step, detail, now_ms)):
            retrying.append((step, detail))
            retry_at.append(retry[0])
            notes += retry[1]
        else:
            if status == "no_reply":
                status, detail = _given_up(run, step, detail)
            _fail(run, step, status, detail, notes, failed)
    if failed and run.spec.kind != "fanout":
        for step, detail in retrying:  # not tried again: the run compensates
            _fail(run, step, "failed", detail, notes, failed)
    elif retrying:
        yield _Write("waiting", notes, min(retry_at))
        return False
    if run.spec.kind == "fanout":
        if unanswered:
            if notes or run.pending or run.record.status != "waiting":
                yield _Write("waiting", notes, deadline)
            return False  # still waiting: nothing new to record
        yield _Write("completed", notes, None, partial(_gather, run, timed_out))
        return True
    if failed:
        run.data["failed"] = failed[0][0].name
        run.data["reason"] = "; ".join(f"{s.name}: {why}" for s, why in failed)
        yield _Write("compensating", notes)
    else:
        yield _Write("running", notes)
    return True


def _fail(
    run: _Run,
    step: FlowStepSpec,
    status: str,
    detail: Any,
    notes: list[_Note],
    failed: list[tuple[FlowStepSpec, str]],
) -> None:
    """A branch's failure noted in the run's data and for its next write."""
    run.steps[step.name] = {"status": status, "error": str(detail)}
    notes.append(("StepFailed", step.name, {"error": str(detail)}))
    failed.append((step, str(detail)))


def _wait(run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> _Plan:
    since, deadline = outcome[1]
    entry = run.steps.setdefault(step.name, {"status": "started"})
    if run.record.status == "waiting" and entry.get("since") == since and not run.pending:
        return  # still waiting: nothing new to record
    entry["since"] = since
    yield _Write("waiting", [("StepWaiting", step.name, {"until": deadline})], deadline)
