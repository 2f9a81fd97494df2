"""Deadline tracker: deadlines of several governors kept in the runtime's store, escalated
when missed, with every escalation in the audit ledger.

Semantics (the seed's DeadlineTracker, made durable):
- `track` stores a deadline (id, name, governor, due time, action) in the Runtime's store
  (`Transaction.save_deadline`; memory, SQLite, any Store); tracking an id again replaces it
  and starts it at level 0.
- `check()` reads the Runtime's clock and, for every deadline whose due time has come, moves
  it to the next level (1 for the first miss) and re-arms it 24 h after the check
  (`rearm_ms`), as the seed does. A re-armed deadline that is missed again escalates again, one
  level higher (the seed stops at level 1, so its re-armed deadline never fires; here it does).
  It returns one DeadlineEscalation per miss.
- Each escalation's ledger entry (an "escalation" entry of the deadline's governor, instance
  `deadline:<id>`, from level n-1 to level n, event DeadlineMissed) is written in the same
  unit of work as the deadline's new level and due time: both commit, or neither does.
- Each deadline escalates at most once per due time, also across processes sharing a store:
  the due deadlines are read inside the write transaction.
- `resolve(id)` removes a deadline that was met.
Escalations are returned, not dispatched: the caller routes them (a notification, an event to
a governor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..ledger import EntryData, payload_digest
from ..sealing import _Chain
from ..store.base import DeadlineRecord, Transaction

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = [
    "DAY_MS",
    "NOTICE_PREFIX",
    "Deadline",
    "DeadlineEscalation",
    "DeadlineTracker",
    "escalation_entry",
]

DAY_MS = 86_400_000
# Ids of the deadlines escalation notices start (runtime/notice_deadlines.py).
NOTICE_PREFIX = "notice:"
Deadline = DeadlineRecord
CHECK_LIMIT = 1000  # due deadlines escalated per unit of work


@dataclass(frozen=True, slots=True)
class DeadlineEscalation:
    """A missed deadline: escalate to `level`; the deadline now falls due at `rearmed_ms`."""

    id: str
    name: str
    governor: str
    level: int
    action: str
    missed_ms: int
    rearmed_ms: int
    checked_ms: int


def escalation_entry(escalation: DeadlineEscalation) -> EntryData:
    """The ledger entry of a missed deadline, stamped at the check that found it."""
    payload = {
        "name": escalation.name,
        "action": escalation.action,
        "missed_ms": escalation.missed_ms,
        "rearmed_ms": escalation.rearmed_ms,
    }
    return EntryData(
        escalation.checked_ms,
        "escalation",
        escalation.governor,
        f"deadline:{escalation.id}",
        f"level{escalation.level - 1}",
        f"level{escalation.level}",
        "DeadlineMissed",
        "deadline-tracker",
        "",
        payload_digest(payload),
    )


class DeadlineTracker:
    """Deadlines kept in `runtime`'s store, checked on its clock, escalations in its ledger."""

    def __init__(self, runtime: Runtime, *, rearm_ms: int = DAY_MS) -> None:
        if rearm_ms < 1:
            raise ValueError(f"a deadline re-arms at least 1 ms later, not {rearm_ms}")
        self._runtime = runtime
        self._rearm_ms = rearm_ms

    def track(self, id: str, *, name: str, governor: str, due_ms: int, action: str) -> Deadline:
        deadline = DeadlineRecord(id, name, governor, due_ms, 0, action)

        def work(txn: Transaction, chain: _Chain) -> None:
            txn.save_deadline(deadline)

        self._runtime._submit(work, None)
        return deadline

    def resolve(self, id: str) -> bool:
        """Forget a met deadline; False if it was not tracked."""

        def work(txn: Transaction, chain: _Chain) -> bool:
            return txn.delete_deadline(id)

        return self._runtime._submit(work, None)

    def pending(self) -> list[Deadline]:
        """Every tracked deadline, earliest first."""
        return self._runtime.store.deadlines()

    def check(self) -> list[DeadlineEscalation]:
        """Escalate and re-arm every deadline that is due now, earliest first (at most 1000
        per call: call again while it returns that many). Notices' deadlines
        (runtime/notice_deadlines.py) are escalated as `Runtime.fire_due` does it."""
        return self._runtime.escalate_deadlines(rearm_ms=self._rearm_ms)
