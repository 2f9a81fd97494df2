"""Deadline tracker: deadlines of several governors in one durable table, escalated when missed.

Semantics (the seed's DeadlineTracker, made durable):
- `track` stores a deadline (id, name, governor, due time, action) in SQLite; tracking an id
  again replaces it and starts it at level 0.
- `check()` reads the injected Clock (pass the Runtime's) and, for every deadline whose due
  time has come, returns one DeadlineEscalation at the next level (1 for the first miss) and
  re-arms the deadline 24 h after the check (`rearm_ms`), as the seed does. A re-armed deadline
  that is missed again escalates again, one level higher (the seed stops at level 1, so its
  re-armed deadline never fires; here it does).
- `resolve(id)` removes a deadline that was met.
Each deadline escalates at most once per due time, also across processes sharing the file:
the level moves with a compare-and-set inside one IMMEDIATE transaction. Escalations are
returned, not dispatched: the caller routes them (a notification, an event to a governor) and
records them in the audit ledger with `runtime.record([escalation_entry(e) for e in found])`
(an "escalation" entry of the deadline's governor, instance `deadline:<id>`, from level n-1 to
level n). That write follows the tracker's commit: a crash between the two leaves the
escalation stored here and unrecorded there.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from ..ledger import EntryData, payload_digest
from ..timers import Clock

__all__ = ["DAY_MS", "Deadline", "DeadlineEscalation", "DeadlineTracker", "escalation_entry"]

DAY_MS = 86_400_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resilience_deadlines (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    governor TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    level INTEGER NOT NULL,
    action TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS resilience_deadlines_due ON resilience_deadlines (due_ms);
"""


@dataclass(frozen=True, slots=True)
class Deadline:
    id: str
    name: str
    governor: str
    due_ms: int
    level: int
    action: str


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


def escalation_entry(escalation: DeadlineEscalation, at_ms: int | None = None) -> EntryData:
    """The ledger entry of a missed deadline, stamped at the check that found it (or `at_ms`)."""
    payload = {
        "name": escalation.name,
        "action": escalation.action,
        "missed_ms": escalation.missed_ms,
        "rearmed_ms": escalation.rearmed_ms,
    }
    return EntryData(
        escalation.checked_ms if at_ms is None else at_ms,
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
    """Deadlines kept in the SQLite file at `path` (the runtime store's file is fine: the table
    is its own)."""

    def __init__(self, path: str | Path, *, clock: Clock, rearm_ms: int = DAY_MS) -> None:
        if rearm_ms < 1:
            raise ValueError(f"a deadline re-arms at least 1 ms later, not {rearm_ms}")
        self._clock = clock
        self._rearm_ms = rearm_ms
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def track(self, id: str, *, name: str, governor: str, due_ms: int, action: str) -> Deadline:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO resilience_deadlines VALUES (?, ?, ?, ?, 0, ?)",
                (id, name, governor, due_ms, action),
            )
        return Deadline(id, name, governor, due_ms, 0, action)

    def resolve(self, id: str) -> bool:
        """Forget a met deadline; False if it was not tracked."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM resilience_deadlines WHERE id = ?", (id,))
        return cursor.rowcount == 1

    def pending(self) -> list[Deadline]:
        """Every tracked deadline, earliest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, governor, due_ms, level, action FROM resilience_deadlines "
                "ORDER BY due_ms, id"
            ).fetchall()
        return [Deadline(*row) for row in rows]

    def check(self) -> list[DeadlineEscalation]:
        """Escalate and re-arm every deadline that is due now, earliest first."""
        now = self._clock.now_ms()
        rearmed = now + self._rearm_ms
        escalations: list[DeadlineEscalation] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                due = self._db.execute(
                    "SELECT id, name, governor, due_ms, level, action FROM resilience_deadlines "
                    "WHERE due_ms <= ? ORDER BY due_ms, id",
                    (now,),
                ).fetchall()
                for id, name, governor, due_ms, level, action in due:
                    moved = self._db.execute(
                        "UPDATE resilience_deadlines SET level = ?, due_ms = ? "
                        "WHERE id = ? AND level = ? AND due_ms = ?",
                        (level + 1, rearmed, id, level, due_ms),
                    )
                    if moved.rowcount == 1:
                        escalations.append(
                            DeadlineEscalation(
                                id, name, governor, level + 1, action, due_ms, rearmed, now
                            )
                        )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return escalations
