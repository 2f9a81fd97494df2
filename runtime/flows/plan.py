"""The plan of a run: one generator that decides the run's course and yields the store work
it needs (ops.py), answered by the sync driver or the asyncio one."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from ..tables import FlowStepSpec
from .compensation import (
    _defer_undo,
    _end_compensation,
    _record_undo,
    _to_compensate,
    _undo_due,
    _undo_outcome,
)
from .fanin import _gather
from .ops import _SETTLED, _TIMED_OUT, _Branches, _Op, _Plan, _Send, _Write
from .run import _next_steps, _Note, _Run, _start_notes, _step_result, _succeed
from .steps import _StepRunner


def _plan(runner: _StepRunner, run: _Run) -> _Plan:
    """What driving the run does, as the store work it needs (`_Op`s, each answered by the
    sync or the asyncio driver): the one place that decides a run's course."""
    if not _undo_due(run, runner.runtime.clock.now_ms()):
        return  # a compensation that did not answer is tried again at the run's wake_ms
    while run.record.status in ("running", "waiting"):
        steps = _next_steps(run)
        if not steps:
            yield _Write("completed", [("FlowCompleted", "", {})])
            break
        if run.spec.kind in ("parallel", "fanout"):
            deadline = _fanout_deadline(runner, run)
            if deadline is not None and run.record.version == 0:
                # The deadline is stored before any branch runs: a restart keeps it.
                yield _Write("running", [], deadline)
            if deadline is not None and runner.runtime.clock.now_ms() >= deadline:
                outcomes = [_TIMED_OUT] * len(steps)
            else:
                outcomes = yield _Branches(tuple(steps), deadline)
            if not (yield from _record_all(run, steps, outcomes, deadline)):
                break  # a fanout waits for replies until its deadline
            continue
        step = steps[0]
        if step.kind == "send":
            assert step.send is not None
            run.note(_start_notes(run, [step]))
            # The plan's last step settles the run in the commit of its dispatch.
            last = step is run.plan()[-1]
            outcome = yield _Send(step, step.send, "do", "running", last)
            if outcome is _SETTLED:
                continue
        else:
            run.note(_start_notes(run, [step]))
            outcome = runner._attempt_here(run, step)
        if outcome[0] == "waiting":
            yield from _wait(run, step, outcome)
            break
        _record_one(run, step, outcome)
    if run.record.status == "compensating":
        undo = _to_compensate(run)
        for step in undo:
            assert step.compensate is not None
            last = step is undo[-1]
            answer = yield _Send(step, step.compensate, "undo", "compensating", last)
            if answer is _SETTLED:
                if run.status_of(step.name) == "succeeded":
                    return  # not undone yet: its commit stored when it is tried again
                continue
            status, detail = _undo_outcome(*answer)
            if status == "no_reply":
                # Newest first: the older steps wait until this one is undone.
                yield from _defer_undo(run, step, detail, runner.runtime.clock.now_ms())
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


def _record_one(run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> None:
    """A step's outcome, noted for the run's next write. A failure turns the run to
    compensating at once, in memory: the first compensation's commit (or the run's end, with
    nothing to undo) writes it. A crash before that retries the step, whose failure nothing
    recorded, as a crash before the step would; no commit of its own."""
    status, notes = _step_result(run, step, outcome)
    if status != "running":
        run.record = replace(run.record, status=status)
    run.note(notes, status)


def _record_all(
    run: _Run,
    steps: Sequence[FlowStepSpec],
    outcomes: Sequence[tuple[str, Any]],
    deadline: int | None,
) -> Generator[_Op, Any, bool]:
    """Record the branches' replies; True when the run goes on. A fanout branch without a
    reply yet (NoReply) keeps the run waiting until the deadline; then the gather decides,
    inside its own transaction, which of the branches timed out (`_gather`)."""
    notes: list[_Note] = []
    failed: list[tuple[FlowStepSpec, str]] = []
    timed_out: list[FlowStepSpec] = []
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
        yield _Write("completed", notes, None, partial(_gather, run, timed_out))
        return True
    if failed:
        run.data["failed"] = failed[0][0].name
        run.data["reason"] = "; ".join(f"{s.name}: {why}" for s, why in failed)
        yield _Write("compensating", notes)
    else:
        yield _Write("running", notes)
    return True


def _wait(run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> _Plan:
    since, deadline = outcome[1]
    entry = run.steps.setdefault(step.name, {"status": "started"})
    if run.record.status == "waiting" and entry.get("since") == since and not run.pending:
        return  # still waiting: nothing new to record
    entry["since"] = since
    yield _Write("waiting", [("StepWaiting", step.name, {"until": deadline})], deadline)
