"""Deadlines of escalation notices (`notify ... within D`), kept in the store's deadlines.

A notice with `within D` starts a deadline in the unit of work of the firing that sends it
(`NoticeDeadlines.record`): id `notice:<machine>:<timer id>:<instance>`, due D after the
notice's timer was due (a notice sent late by a late worker keeps its schedule, as the
ladder's timers keep their spacing), level 0. The awaited thing is the instance moving on: a
move that cancels the notice's timer (it leaves the state or the group, or ends) deletes the
deadline in the move's own unit of work (`NoticeDeadlines.clear`); a self-transition that
arms the ladder again keeps it, as nobody has acted yet. An event that arrives after the
deadline fell due, before any due work ran, was late: its unit escalates the miss first, as
the due work would have, then meets it (`NoticeDeadlines.escalate_late`); on a partitioned
store, where a unit of work writes one ledger chain, a deadline whose escalation entries go
to another chain than the event's (`deadline:<id>` decides the chain) is escalated all the
same in the event's unit (its notification, its miss counted), and its DeadlineMissed entry
is left to that chain as a sealing row in the deadlines table (`notice:~<level>~<missed
ms>~<checked ms>~<deadline id>`, due at the miss, level 0), which the next due work seals
there, deleting the row in the same unit. The runtime's due work
(`Runtime.fire_due`, so also `autonomic worker`) takes timers and missed deadlines in the
order they fell due, however late it runs: a deadline due before a timer escalates before
that timer fires (whose move would delete it as met); a timer due at the deadline's instant
fires first (`escalate_due`; it escalates any tracked deadline for `DeadlineTracker.check`,
through `Runtime.escalate_deadlines`). An escalation is a "DeadlineMissed" escalation entry
in the ledger, a notification to the notice's recipient that its deadline passed, and the
deadline due again 24 h after it was missed, one level up, in one unit of work. One whose
instance left the notice's state meanwhile (a store written before this module) is deleted.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .outbox import _notification_message
from .resilience.deadlines import (
    CHECK_LIMIT,
    DAY_MS,
    NOTICE_PREFIX,
    DeadlineEscalation,
    escalation_entry,
)
from .results import Notification, derive_event_id
from .sealing import _Chain
from .store.base import DeadlineRecord, InstanceRecord, Transaction
from .tables import TimerSpec
from .timers import TimerPlan

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "NoticeDeadlines",
    "escalate_due",
    "escalate_notices",
    "missed",
    "next_notice_deadline",
    "notice_deadline_id",
    "parse_notice_id",
]


# The rows that hold a miss's DeadlineMissed entry until the due work seals it in its chain:
# no machine name holds "~", so no notice's deadline id starts so.
SEALING_PREFIX = f"{NOTICE_PREFIX}~"


def _sealing_row(escalation: DeadlineEscalation) -> DeadlineRecord:
    """The row that holds `escalation`'s entry for the due work of its chain."""
    e = escalation
    key = f"{SEALING_PREFIX}{e.level}~{e.missed_ms}~{e.checked_ms}~{e.id}"
    return DeadlineRecord(key, e.name, e.governor, e.missed_ms, 0, e.action)


def _sealed_escalation(row: DeadlineRecord) -> DeadlineEscalation | None:
    """The escalation a sealing row holds; None for any other deadline."""
    if not row.id.startswith(SEALING_PREFIX):
        return None
    level, missed_ms, checked_ms, deadline_id = row.id[len(SEALING_PREFIX) :].split("~", 3)
    missed = int(missed_ms)
    return DeadlineEscalation(
        deadline_id,
        row.name,
        row.governor,
        int(level),
        row.action,
        missed,
        missed + DAY_MS,
        int(checked_ms),
    )


def notice_deadline_id(machine: str, timer_id: str, instance: str) -> str:
    """The deadline id of a notice: machine names and timer ids hold no ':', so the first two
    split it again whatever the instance id holds."""
    return f"{NOTICE_PREFIX}{machine}:{timer_id}:{instance}"


def parse_notice_id(deadline_id: str) -> tuple[str, str, str] | None:
    """(machine, timer id, instance) of a notice's deadline; None for any other deadline."""
    if not deadline_id.startswith(NOTICE_PREFIX):
        return None
    parts = deadline_id[len(NOTICE_PREFIX) :].split(":", 2)
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


class NoticeDeadlines:
    """The notices of one machine that carry a deadline, and which moves meet them."""

    def __init__(self, machine: str, plan: TimerPlan, timers: tuple[TimerSpec, ...]) -> None:
        self._machine = machine
        self._plan = plan
        self._timers = timers
        self._clears: dict[tuple[str, str], tuple[str, ...]] = {}

    @classmethod
    def of(cls, machine: str, plan: TimerPlan) -> NoticeDeadlines | None:
        """None when no notice of the machine has a `within`: its moves then pay nothing."""
        timers = tuple(
            spec
            for spec in plan.specs.values()
            if spec.notify is not None and spec.notify.within_ms is not None
        )
        return cls(machine, plan, timers) if timers else None

    def record(self, spec: TimerSpec, instance: str, deadline_ms: int) -> DeadlineRecord:
        """The deadline a firing of `spec` starts (its notice has a `within`)."""
        notify = spec.notify
        assert notify is not None
        return DeadlineRecord(
            notice_deadline_id(self._machine, spec.id, instance),
            notify.message or spec.id,
            self._machine,
            deadline_ms,
            0,
            f"notify {notify.kind} {notify.recipient}",
        )

    def _met(self, source: str, target: str) -> tuple[str, ...]:
        """The timer ids of the notices whose deadlines a move from `source` to `target`
        meets."""
        key = (source, target)
        met = self._clears.get(key)
        if met is None:
            arms, keep, _ = self._plan.on_move(source, target)
            armed = {spec.id for spec in arms}
            met = tuple(
                spec.id
                for spec in self._timers
                if self._plan.holds(spec, source) and spec.id not in keep and spec.id not in armed
            )
            self._clears[key] = met
        return met

    def clear(self, txn: Transaction, instance: str, source: str, target: str) -> None:
        """Delete the deadlines a move from `source` to `target` meets (called by moves that
        cancel timers)."""
        for timer_id in self._met(source, target):
            txn.delete_deadline(notice_deadline_id(self._machine, timer_id, instance))

    def escalate_late(
        self,
        runtime: Runtime,
        txn: Transaction,
        chain: _Chain,
        record: InstanceRecord,
        target: str,
        now: int,
    ) -> None:
        """Before an event's move from `record.state` to `target` at `now` (which `clear`
        then makes): escalate each deadline the move meets that fell due before the event
        arrived, as the due work would have had it run in time (its notification, ledger
        entry and event id, re-armed 24 h after the miss, again while that is before `now`),
        in time order. A miss is a miss however late the due work runs; an event at the
        deadline's very instant meets it. On a partitioned store, a unit of work writes to
        one chain: the entry of a deadline whose chain is another is left in a sealing row
        for the due work of that chain (see the module docstring)."""
        partitions = runtime.partitions
        late = []
        for timer_id in self._met(record.state, target):
            found = txn.deadline(notice_deadline_id(self._machine, timer_id, record.instance))
            if found is not None and found.due_ms < now:
                late.append(found)
        while late:
            deadline = min(late, key=lambda d: (d.due_ms, d.id))
            late.remove(deadline)
            rearmed = deadline.due_ms + DAY_MS
            if missed(runtime, txn, deadline, now, rearmed) is not True:
                continue
            if (
                partitions > 1
                and runtime._partition_of(f"deadline:{deadline.id}") != chain.partition
            ):
                d = deadline
                e = DeadlineEscalation(
                    d.id, d.name, d.governor, d.level + 1, d.action, d.due_ms, rearmed, now
                )
                txn.save_deadline(_sealing_row(e))  # the move deletes the deadline as met
            else:
                e = _escalated(runtime, txn, chain, deadline, now, rearmed)
            if rearmed < now:  # missed again meanwhile
                late.append(DeadlineRecord(e.id, e.name, e.governor, rearmed, e.level, e.action))


def missed(
    runtime: Runtime, txn: Transaction, deadline: DeadlineRecord, now: int, rearmed_ms: int
) -> bool | None:
    """Escalate a notice's missed deadline: True when it escalates (its notification is in
    `txn`'s outbox), False when it was met (deleted in `txn`), None when its machine is not
    loaded here (left for a runtime that loads it) or it is no notice's."""
    parsed = parse_notice_id(deadline.id)
    if parsed is None:
        return None
    machine, timer_id, instance = parsed
    governor = runtime._governors.get(machine)
    if governor is None:
        return None
    spec = governor._timer_specs.get(timer_id)
    record = txn.instance(machine, instance)
    notify = None if spec is None else spec.notify
    if (
        spec is None
        or notify is None
        or record is None
        or not governor._plan.holds(spec, record.state)
    ):
        txn.delete_deadline(deadline.id)
        return False
    level = deadline.level + 1
    passed = f"deadline passed (escalation level {level}): {notify.message or spec.id}"
    notice = Notification(
        machine,
        instance,
        record.state,
        spec.ladder,
        spec.step,
        notify.kind,
        notify.recipient,
        passed,
        now,
        rearmed_ms,
        # The instance's version too: a notice sent again after the instance moved on and
        # back has the same deadline schedule (counted from its timer's due time, and clocks
        # of workers differ), and its miss is another one; a move or firing between any two
        # misses of one deadline changes the version, and a miss and its re-arm commit as one.
        derive_event_id("deadline", deadline.id, deadline.due_ms, level, record.version),
    )
    txn.add_outbox([_notification_message(notice, record.version)])
    return True


def _escalated(
    runtime: Runtime,
    txn: Transaction,
    chain: _Chain,
    deadline: DeadlineRecord,
    now: int,
    rearmed: int,
) -> DeadlineEscalation:
    """The rest of a miss `missed` notified, in `txn`: the deadline due again at `rearmed`,
    one level up, and its escalation entry stamped at `now` (with a ledger)."""
    d = deadline
    escalation = DeadlineEscalation(
        d.id, d.name, d.governor, d.level + 1, d.action, d.due_ms, rearmed, now
    )
    txn.save_deadline(DeadlineRecord(d.id, d.name, d.governor, rearmed, d.level + 1, d.action))
    if runtime.sealer is not None:
        chain.append(txn, escalation_entry(escalation))
    return escalation


def escalate_due(
    runtime: Runtime,
    now: int | None,
    *,
    rearm_ms: int = DAY_MS,
    notices_only: bool,
    due_by: int | None = None,
) -> list[DeadlineEscalation]:
    """Escalate every deadline due at `due_by` (default: `now`, default the runtime's clock),
    each in the unit of work that re-arms it, stamped at `now`; with `notices_only` only the
    deadlines of notices whose machine the runtime has loaded (what `Runtime.fire_due` does),
    else every one. A notice's deadline is due again `rearm_ms` after it was missed (its
    schedule does not depend on when the due work runs); any other `rearm_ms` after the check,
    as the seed's tracker does."""
    partitions = runtime.partitions
    partition_of = runtime._partition_of

    def work(txn: Transaction, chain: _Chain, part: int) -> list[DeadlineEscalation]:
        instant = runtime.clock.now_ms() if now is None else now
        found = []
        for d in txn.due_deadlines(instant if due_by is None else due_by, CHECK_LIMIT):
            sealing = _sealed_escalation(d)
            deadline_id = d.id if sealing is None else sealing.id
            # A partitioned store: each escalation in the chain of its entry's instance.
            if partitions > 1 and partition_of(f"deadline:{deadline_id}") != part:
                continue
            if sealing is not None:  # escalated by a late event on another chain
                txn.delete_deadline(d.id)
                if runtime.sealer is not None:
                    chain.append(txn, escalation_entry(sealing))
                found.append(sealing)
                continue
            notice_id = d.id.startswith(NOTICE_PREFIX)
            rearmed = (d.due_ms if notice_id else instant) + rearm_ms
            notice = missed(runtime, txn, d, instant, rearmed)
            if notice is False or (notice is None and notices_only):
                continue  # met (deleted), or not this call's to escalate
            if notice is None and notice_id:
                continue  # a notice of a machine another runtime loads
            found.append(_escalated(runtime, txn, chain, d, instant, rearmed))
        return found

    escalations = [
        escalation
        for part in range(partitions)
        for escalation in runtime._submit(functools.partial(work, part=part), part)
    ]
    escalations.sort(key=lambda e: (e.missed_ms, e.id))
    return escalations


def next_notice_deadline(runtime: Runtime) -> int | None:
    """The earliest due time of a notice deadline whose machine the runtime has loaded."""
    return runtime.store.earliest_deadline(NOTICE_PREFIX, sorted(runtime._governors))


def escalate_notices(runtime: Runtime, now: int, due_by: int) -> list[DeadlineEscalation]:
    """What `Runtime.fire_due` runs when missed notice deadlines come before any timer still
    due: the notices' deadlines due at `due_by` (before that timer), stamped at `now`."""
    return escalate_due(runtime, now, notices_only=True, due_by=due_by)
