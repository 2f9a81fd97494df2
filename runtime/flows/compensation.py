"""Compensation and a run's end: the completed steps undone newest first, how the run ends
once nothing is left to undo (or, for its last step, in the commit of that step), and a
step or compensation whose receiver does not answer, tried again from the store.

A compensation whose receiver does not answer (its policy action failed as transient or
unavailable, its breaker is open or its bulkhead full, or a hook raised NoReply) is not a
refusal: the run stays "compensating", its data counts the attempt and keeps its error, and
the run's wake_ms is when the compensation is tried again (the deterministic jitter backoff,
by the step's count of failed attempts, capped at a minute: `retry_later_ms`, as outbox
deliveries and failed timer firings are). A CompensationRetrying entry, with the attempt's
number and error, records the first attempt, then attempts 2, 4, 8, ... 256, then every
256th (`noted_attempt`, the same rule), and any attempt whose error is not the previous
one's: a day-long outage at the one-minute cap writes 13 entries, then about six a day, not
1440 a day, and the ledger still shows that the run is retrying, since when, and each change
of what went wrong.
`resume_all`, `autonomic worker` (`due_runs`) and `next_wake` take the retry time from the
store, so the retries survive restarts; the same event id makes it take effect once.
Only a refusal (the receiver has no transition, R006/R007, or its action failed for good) is
a dead end: the step is "uncompensated" and the run ends "failed"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..resilience.backoff import noted_attempt, retry_later_ms
from ..store.base import FlowStatus
from ..tables import FlowStepSpec
from ..timers import format_duration
from .ops import _Plan, _Send, _Write
from .run import _Entry, _Note, _Run, _step_result, _succeed


def _undo_outcome(status: str, detail: Any) -> tuple[str, Any]:
    """A compensation's outcome: its send's, "compensated" when that succeeded."""
    return ("compensated" if status == "succeeded" else status), detail


def _undo_due(run: _Run, now_ms: int) -> bool:
    """Whether a compensating run may try its compensations now: not before the retry time
    of one that did not answer (its wake_ms)."""
    wake = run.record.wake_ms
    return run.record.status != "compensating" or wake is None or now_ms >= wake


def _retry_undo(run: _Run, step: FlowStepSpec, detail: Any, now_ms: int) -> tuple[int, list[_Note]]:
    """A compensation that did not answer, noted in the run's data: when it is tried again,
    and the entry that says so (with the attempt's number and error) if this attempt is one
    the ledger records (`noted_attempt`)."""
    entry = run.steps[step.name]
    keys = ("undo_attempts", "undo_error")
    return _note_retry(entry, keys, ("CompensationRetrying", step.name), detail, now_ms)


def _note_retry(
    entry: dict[str, Any],
    keys: tuple[str, str],
    note: tuple[str, str],
    detail: Any,
    now_ms: int,
    until: int | None = None,
) -> tuple[int, list[_Note]]:
    """One more unanswered attempt of a step or its compensation, counted and its error kept
    in the step's entry (under `keys`: attempts, error): when it is tried again (the jitter
    backoff by the count, no later than `until`), and the `note` entry (event, step) if the
    ledger records this attempt (`noted_attempt`, or an error not the previous one's)."""
    attempts_key, error_key = keys
    attempt = int(entry.get(attempts_key, 0)) + 1
    error = str(detail)
    noted = entry.get(error_key) != error or noted_attempt(attempt)
    retry_at = now_ms + retry_later_ms(attempt)
    if until is not None:
        retry_at = min(retry_at, until)
    entry[attempts_key] = attempt
    entry[error_key] = error
    if not noted:
        return retry_at, []
    event, name = note
    return retry_at, [(event, name, {"error": error, "attempt": attempt, "retry_at": retry_at})]


def _defer_undo(run: _Run, step: FlowStepSpec, detail: Any, now_ms: int) -> _Plan:
    retry_at, notes = _retry_undo(run, step, detail, now_ms)
    yield _Write("compensating", notes, retry_at)


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
    if outcome[0] == "succeeded" and op.phase == "do":  # most sends: `_step_result`'s, inline
        detail = outcome[1]
        _succeed(run, step, detail)
        entries: list[_Entry] = [("StepSucceeded", step.name, {"result": detail}, "running")]
        if op.settle:
            entries.append(("FlowCompleted", "", {}, "completed"))
            return "completed", entries, None
        return "running", entries, None
    if op.phase == "undo" and outcome[0] == "no_reply":
        retry_at, notes = _retry_undo(run, step, outcome[1], now_ms)
        return "compensating", [(*note, "compensating") for note in notes], retry_at
    if op.phase == "undo":
        _, notes = _undo_result(run, step, _undo_outcome(*outcome))
        status: FlowStatus = "compensating"
    else:
        status, notes, wake = _step_settled(run, step, outcome, now_ms)
        if wake is not None:  # the step did not answer: tried again then
            return status, [(event, name, detail, status) for event, name, detail in notes], wake
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


# How long a forward step is tried again after its first unanswered attempt: past this, its
# next unanswered attempt fails it and the run compensates what it did before (a
# compensation has no such bound: it is tried until it is answered or refused, as nothing
# else can undo its step).
STEP_RETRY_LIMIT_MS = 24 * 3_600_000


def _step_settled(
    run: _Run, step: FlowStepSpec, outcome: tuple[str, Any], now_ms: int
) -> tuple[FlowStatus, list[_Note], int | None]:
    """A forward step's outcome recorded in the run's data (`_step_result`), with the run's
    status after it and the entries that say so; for a step whose receiver did not answer
    ("no_reply": its action failed as transient or unavailable, its breaker is open or its
    bulkhead full, or a hook raised NoReply), "waiting" and the time it is tried again, until
    its bound has passed (`_retry_step`; it fails then)."""
    if outcome[0] == "no_reply":
        retry = _retry_step(run, step, outcome[1], now_ms)
        if retry is not None:
            return "waiting", retry[1], retry[0]
        outcome = _given_up(run, step, outcome[1])
    status, notes = _step_result(run, step, outcome)
    return status, notes, None


def _retry_step(
    run: _Run, step: FlowStepSpec, detail: Any, now_ms: int
) -> tuple[int, list[_Note]] | None:
    """A forward step whose receiver did not answer, noted in the run's data (it stays
    "started"): when it is tried again (the jitter backoff by its count of attempts, as a
    compensation's), and a StepRetrying entry if the ledger records this attempt (the rule of
    CompensationRetrying: `noted_attempt`, or a new error); None once STEP_RETRY_LIMIT_MS has
    passed since its first unanswered attempt."""
    entry = run.steps.setdefault(step.name, {"status": "started"})
    until = int(entry.setdefault("retry_until", now_ms + STEP_RETRY_LIMIT_MS))
    if now_ms >= until:
        return None
    keys = ("attempts", "error")
    retry = _note_retry(entry, keys, ("StepRetrying", step.name), detail, now_ms, until)
    entry["retry_at"] = retry[0]
    return retry


def _given_up(run: _Run, step: FlowStepSpec, detail: Any) -> tuple[str, str]:
    """The failure of a step unanswered until its bound (`_retry_step` said None)."""
    attempts = int(run.steps.get(step.name, {}).get("attempts", 0)) + 1
    waited = format_duration(STEP_RETRY_LIMIT_MS)
    return "failed", f"{detail} (no answer in {attempts} attempts over {waited})"


def _retry_due(run: _Run, steps: Sequence[FlowStepSpec], now_ms: int) -> bool:
    """Whether a waiting run may try these steps now: not before the earliest retry time of
    those that did not answer (the run's wake_ms)."""
    entries = [run.steps.get(step.name, {}) for step in steps]
    waits = [entry["retry_at"] for entry in entries if "retry_at" in entry]
    return not waits or now_ms >= min(waits)
