"""Compensation and a run's end: the completed steps undone newest first, and how the run
ends once nothing is left to undo (or, for its last step, in the commit of that step)."""

from __future__ import annotations

from typing import Any

from ..store.base import FlowStatus
from ..tables import FlowStepSpec
from .ops import _Plan, _Send, _Write
from .run import _Entry, _Note, _Run, _step_result


def _undo_outcome(status: str, detail: Any) -> tuple[str, Any]:
    """A compensation's outcome: its send's, "compensated" when that succeeded."""
    return ("compensated" if status == "succeeded" else status), detail


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


def _settled(run: _Run, op: _Send, outcome: tuple[str, Any]) -> tuple[FlowStatus, list[_Entry]]:
    """The last step's (or compensation's) outcome recorded, and how the run ends after
    it or that it goes on to compensate: what the plan's next writes would hold, each
    entry with the run's status when it happened."""
    step = op.step
    if op.phase == "undo":
        _, notes = _undo_result(run, step, _undo_outcome(*outcome))
        status: FlowStatus = "compensating"
    else:
        status, notes = _step_result(run, step, outcome)
    entries = [(event, name, detail, status) for event, name, detail in notes]
    end: list[_Note]
    if status == "running":
        status, end = "completed", [("FlowCompleted", "", {})]
    elif op.phase == "undo" or not _to_compensate(run):
        status, end = _compensation_end(run)
    else:
        return status, entries
    return status, entries + [(event, name, detail, status) for event, name, detail in end]
