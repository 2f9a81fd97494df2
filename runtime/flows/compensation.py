"""Compensation and a run's end: the completed steps undone newest first, and how the run
ends once nothing is left to undo (or, for its last step, in the commit of that step).

A compensation whose receiver does not answer (its policy action failed as transient or
unavailable, its breaker is open or its bulkhead full, or a hook raised NoReply) is not a
refusal: the run stays "compensating", a CompensationRetrying entry records the attempt, and
the run's wake_ms is when the compensation is tried again (the deterministic jitter backoff
of runtime/resilience/backoff.py, by the step's count of failed attempts, capped at
UNDO_RETRY_CAP_MS). `resume_all`, `autonomic worker` (`due_runs`) and `next_wake` take it
from the store, so the retries survive restarts; the same event id makes it take effect once.
Only a refusal (the receiver has no transition, R006/R007, or its action failed for good) is
a dead end: the step is "uncompensated" and the run ends "failed"."""

from __future__ import annotations

from typing import Any

from ..resilience.backoff import jitter_delay_ms
from ..store.base import FlowStatus
from ..tables import FlowStepSpec
from .ops import _Plan, _Send, _Write
from .run import _Entry, _Note, _Run, _step_result

# The longest wait between two attempts of a compensation whose receiver does not answer.
UNDO_RETRY_CAP_MS = 60_000


def _undo_outcome(status: str, detail: Any) -> tuple[str, Any]:
    """A compensation's outcome: its send's, "compensated" when that succeeded."""
    return ("compensated" if status == "succeeded" else status), detail


def _undo_due(run: _Run, now_ms: int) -> bool:
    """Whether a compensating run may try its compensations now: not before the retry time
    of one that did not answer (its wake_ms)."""
    wake = run.record.wake_ms
    return run.record.status != "compensating" or wake is None or now_ms >= wake


def _retry_undo(run: _Run, step: FlowStepSpec, detail: Any, now_ms: int) -> tuple[int, _Note]:
    """A compensation that did not answer, noted in the run's data: when it is tried again,
    and the entry that says so (with the attempt's number and error)."""
    entry = run.steps[step.name]
    attempt = int(entry.get("undo_attempts", 0)) + 1
    retry_at = now_ms + jitter_delay_ms(attempt, UNDO_RETRY_CAP_MS)
    entry["undo_attempts"] = attempt
    entry["undo_error"] = str(detail)
    why = {"error": str(detail), "attempt": attempt, "retry_at": retry_at}
    return retry_at, ("CompensationRetrying", step.name, why)


def _defer_undo(run: _Run, step: FlowStepSpec, detail: Any, now_ms: int) -> _Plan:
    retry_at, note = _retry_undo(run, step, detail, now_ms)
    yield _Write("compensating", [note], retry_at)


def _to_compensate(run: _Run) -> list[FlowStepSpec]:
    """Completed steps with a compensation not yet run, newest first."""
    by_name = {s.name: s for s in run.plan()}
    return [
        by_name[name]
        for name in reversed(run.data["order"])
        if by_name[name].compensate is not None and run.status_of(name) == "succeeded"
    ]


def _record_undo(run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]) -> _Plan:
    compensated, notes = _undo_result(run, step, outcome)
    if compensated:
        run.note(notes, "compensating")
        return
    yield _Write("compensating", notes)


def _undo_result(
    run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]
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


def _end_compensation(run: _Run) -> _Plan:
    yield _Write(*_compensation_end(run))


def _compensation_end(run: _Run) -> tuple[FlowStatus, list[_Note]]:
    """How a run ends once nothing is left to compensate: "compensated" when compensations
    ran; "failed" when a compensation was refused (a person must look: the entry lists the
    `uncompensated` steps) or there was nothing to compensate."""
    failed = [name for name, s in run.steps.items() if s["status"] == "uncompensated"]
    detail = {"failed_step": run.data.get("failed"), "reason": run.data.get("reason")}
    if failed:
        detail["uncompensated"] = failed
        return "failed", [("FlowFailed", str(run.data.get("failed")), detail)]
    if not any(s["status"] == "compensated" for s in run.steps.values()):
        # Nothing was undone (nothing before the failed step had an effect to undo): the run
        # failed, it was not "compensated".
        return "failed", [("FlowFailed", str(run.data.get("failed")), detail)]
    return "compensated", [("CompensationCompleted", str(run.data.get("failed")), detail)]


def _settled(
    run: _Run, op: _Send, outcome: tuple[str, Any], now_ms: int
) -> tuple[FlowStatus, list[_Entry], int | None]:
    """A send's (or compensation's) outcome recorded, and the run's status after it: for
    the plan's last one (`op.settle`), how the run ends, or that it goes on to compensate;
    for a step that failed with nothing to undo, its end; for a compensation that did not
    answer, when it is tried again (the run's wake_ms). What the plan's next writes would
    hold, each entry with the run's status when it happened."""
    step = op.step
    if op.phase == "undo" and outcome[0] == "no_reply":
        retry_at, note = _retry_undo(run, step, outcome[1], now_ms)
        return "compensating", [(*note, "compensating")], retry_at
    if op.phase == "undo":
        _, notes = _undo_result(run, step, _undo_outcome(*outcome))
        status: FlowStatus = "compensating"
    else:
        status, notes = _step_result(run, step, outcome)
    entries = [(event, name, detail, status) for event, name, detail in notes]
    end: list[_Note]
    if status == "running":
        if not op.settle:
            return status, entries, None  # the next step follows
        status, end = "completed", [("FlowCompleted", "", {})]
    elif op.phase == "undo" and not op.settle:
        return status, entries, None  # the next compensation follows
    elif op.phase == "undo" or not _to_compensate(run):
        status, end = _compensation_end(run)
    else:
        return status, entries, None
    return status, entries + [(event, name, detail, status) for event, name, detail in end], None
