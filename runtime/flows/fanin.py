"""A parallel or fanout flow's branches run at once, and a fanout's fan-in: the wait bounded
by its deadline, the gather decided inside its own transaction (a reply counts when its
transition is committed), and replies that come after the gather, recorded as late."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..results import _dumps, _stored_result, derive_event_id
from ..sealing import _Chain
from ..store.base import FLOW_FINISHED, FlowRecord, FlowStatus, Transaction
from ..tables import FlowStepSpec
from ..timers import Clock, SystemClock
from .ops import _TIMED_OUT
from .run import _Note, _Run, _succeed

if TYPE_CHECKING:
    from .steps import _StepRunner

# How often a wait for replies looks at a clock other than the wall clock again (a
# VirtualClock moves only when told, so the time left says nothing about when).
_POLL_S = 0.02


def _poll_s(clock: Clock, left_ms: int) -> float:
    """How long to wait for replies before looking at the clock again."""
    if isinstance(clock, SystemClock):
        return left_ms / 1000
    return min(left_ms / 1000, _POLL_S)


class _FanIn:
    """The replies of one run of a flow's branches: each branch puts its outcome here,
    unless the gather has already taken what arrived (`close`): its reply is then late."""

    def __init__(self, steps: Sequence[FlowStepSpec]) -> None:
        self.steps = steps
        self.outcomes: list[tuple[str, Any] | None] = [None] * len(steps)
        self.closed = False
        self._lock = threading.Lock()

    def put(self, index: int, outcome: tuple[str, Any]) -> bool:
        """Record a branch's outcome; False if it came after the gather (late)."""
        with self._lock:
            if self.closed:
                return False
            self.outcomes[index] = outcome
            return True

    def close(self) -> list[tuple[str, Any]]:
        """What arrived, the rest timed out; later outcomes are late."""
        with self._lock:
            self.closed = True
            return [_TIMED_OUT if o is None else o for o in self.outcomes]

    def complete(self) -> bool:
        with self._lock:
            return all(o is not None for o in self.outcomes)


def _committed_reply(run: _Run, step: FlowStepSpec, txn: Transaction) -> dict[str, Any] | None:
    """The result of a branch's dispatch if its receiver has committed it (by the event id
    the step sends with), as seen inside `txn`."""
    if step.kind != "send" or step.send is None:
        return None
    event_id = derive_event_id("flow", run.record.flow_id, step.name, "do")
    text = txn.processed(step.send.machine, event_id)
    if text is None:
        return None
    target = run.record.instance if step.to is None else str(run.data["inputs"][step.to])
    result = _stored_result(text, step.send.machine, target, event_id)
    return {"state": result.to_state, "seq": result.seq}


def _gather(
    run: _Run, timed_out: Sequence[FlowStepSpec], txn: Transaction
) -> tuple[FlowStatus, list[_Note]]:
    """A fanout's gather, inside the transaction that writes it: a branch without a reply
    by the deadline whose transition is committed after all (it shared a commit with a
    slow one, or came in before this transaction) counts as arrived, so the gathered
    result never contradicts the ledger; the quorum rule decides how the run ends."""
    notes: list[_Note] = []
    for step in timed_out:
        arrived = _committed_reply(run, step, txn)
        if arrived is not None:
            if step.name not in run.data["order"]:  # the unit may run again after a rollback
                _succeed(run, step, arrived)
            notes.append(("StepSucceeded", step.name, {"result": arrived}))
        else:
            run.steps[step.name] = {"status": "timed_out", "error": _TIMED_OUT[1]}
            notes.append(("StepFailed", step.name, {"error": _TIMED_OUT[1]}))
    gathered = {s.name: run.status_of(s.name) or "" for s in run.plan()}
    run.data["gathered"] = gathered
    succeeded = sum(1 for status in gathered.values() if status == "succeeded")
    quorum = run.spec.quorum if run.spec.quorum is not None else len(gathered)
    notes.append(("FanInGathered", "", {"gathered": gathered, "quorum": quorum}))
    if succeeded >= quorum:
        run.data.pop("reason", None)
        notes.append(("FlowCompleted", "", {}))
        return "completed", notes
    run.data["reason"] = f"{succeeded} of {len(gathered)} replies, quorum {quorum}"
    notes.append(("FlowFailed", "", {"reason": run.data["reason"]}))
    return "failed", notes


def _late_fold(
    runner: _StepRunner, run: _Run, step: FlowStepSpec, target: str
) -> Callable[[Transaction, _Chain], None] | None:
    """What a fanout branch's dispatch (to `target`) runs after its unit of work, in its
    transaction: if the gather has ended the run without this reply, `_late_work`'s
    StepLate. A late reply and the entry that says so commit together, so a process killed
    right after the reply's commit leaves nothing unrecorded. Before the gather, nothing:
    the gather, in its own transaction, finds the committed reply itself
    (`_committed_reply`). None on a partitioned store when the run's entries go to another
    ledger chain than the receiver's: the late reply is then recorded after its commit."""
    flow_id = run.record.flow_id
    if runner.runtime._partition_of(flow_id) != runner.runtime._partition_of(target):
        return None

    def fold(txn: Transaction, chain: _Chain) -> None:
        record = txn.flow(flow_id)
        if record is None or record.status not in FLOW_FINISHED:
            return
        arrived = _committed_reply(run, step, txn)
        if arrived is not None:
            _late_work(runner, flow_id, step.name, ("succeeded", arrived))(txn, chain)

    return fold


def _late_work(
    runner: _StepRunner, flow_id: str, step: str, outcome: tuple[str, Any]
) -> Callable[[Transaction, _Chain], FlowRecord | None]:
    """The unit that records a branch's reply that came after its fanout's gather: a
    StepLate entry, and the step's `late` detail in the run (its gathered status stays). Its
    effect stands: fanout steps are irreversible, and the gather decided without it, as a
    workflow engine treats an activity that completes after the workflow's timer won the race.
    Nothing is written when the gather is not committed yet (it looks for the reply itself)
    or the reply's own commit wrote it (`_late_fold`)."""

    def work(txn: Transaction, chain: _Chain) -> FlowRecord | None:
        record = txn.flow(flow_id)
        if record is None or record.status not in FLOW_FINISHED:
            return None
        data = json.loads(record.data)
        entry = data.get("steps", {}).get(step)
        if not isinstance(entry, dict) or entry.get("status") != "timed_out" or "late" in entry:
            return None
        status, detail = outcome
        late = {"outcome": status, "result" if status == "succeeded" else "error": detail}
        entry["late"] = late
        note = ("StepLate", step, late, record.status)
        return runner._store_run(txn, chain, record, record.status, [note], _dumps(data), None)

    return work
