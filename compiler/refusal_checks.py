"""Refusal notices: `emit Machine.Event if refused Notice(...)` (E150, E151).

When the receiver refuses an emitted event's delivery (it accepts it in no row of its state,
its guards refuse it, its payload or an action fails), the outbox marks the delivery failed
and dispatches the notice, an event of the emitting machine, to the emitting instance. The
notice must be an event of the emitting machine (E150), handled where the instance waits for
the delivery's outcome: the state the emitting move leads to (E151). Its arguments follow the
emit's rules with the emit's causing event (E141-E143, in check_emit_payloads).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import Diagnostic, did_you_mean, fail
from .model import EventRef, Name

if TYPE_CHECKING:
    from .checks import MachineFacts

__all__ = ["check_refusals", "refusal_sites"]


def check_refusals(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E150: a notice names an event of the emitting machine. E151: the state the emitting
    move leads to handles it."""
    own = facts.machine.name.value
    handled: dict[str, set[str]] | None = None
    seen: set[int] = set()
    for ref, _, waiting in refusal_sites(facts):
        if id(ref) in seen:
            continue  # a ladder's `exhausted` emit, once per cause
        seen.add(id(ref))
        notice = ref.refused
        assert notice is not None
        name = notice.event.value
        if notice.machine is not None and notice.machine.value != own:
            yield fail(
                "E150",
                f"a refusal notice goes back to '{own}', not to '{notice.machine.value}'",
                notice.machine.span,
                f"name an event of '{own}': if refused {name}(...)",
            )
            continue
        if name not in facts.events:
            yield fail(
                "E150",
                f"'{own}' has no event '{name}' to be told of a refused delivery",
                notice.event.span,
                did_you_mean(name, facts.events)
                or f"declare `event {name}` in '{own}' and handle it where the emit waits",
            )
            continue
        if handled is None:
            handled = _handled_events(facts)
        for state in waiting:
            if state.value in facts.states and name not in handled.get(state.value, ()):
                yield fail(
                    "E151",
                    f"the notice '{name}' of a refused "
                    f"'{_shown(ref)}' is not handled in '{state.value}', where the emit waits",
                    notice.event.span,
                    f"add `on {name} -> ...` to state '{state.value}'",
                )


def refusal_sites(facts: MachineFacts) -> Iterator[tuple[EventRef, Name | None, list[Name]]]:
    """Each emit with a refusal notice, the event that causes it (None: a timer or an
    entry) and the states the emitting instance waits in afterwards."""
    machine = facts.machine
    for state in facts.emitting_states:
        for row in facts.emitting_rows(state):
            for ref in row.emits:
                if ref.refused is not None:
                    yield ref, row.event, [row.target]
    for state in facts.timed:
        for timer in state.timers:
            waiting = timer.target or state.name
            yield from ((ref, None, [waiting]) for ref in timer.emits if ref.refused)
        for escalation in state.escalations:
            end = escalation.end
            if end is not None:
                yield from ((ref, None, [end.target]) for ref in end.emits if ref.refused)
    for state in facts.entered:
        for entry in state.entries:
            yield from ((ref, None, [state.name]) for ref in entry.emits if ref.refused)
    for mtimer in machine.machine_timers:
        yield from ((ref, None, [mtimer.target]) for ref in mtimer.emits if ref.refused)
    for ladder in machine.retries:
        exhausted = ladder.exhausted
        if exhausted is None:
            continue
        timed_out = bool(ladder.steps) and ladder.steps[-1].timeout is not None
        for ref in exhausted.emits:
            if ref.refused is not None:
                yield ref, ladder.event, [exhausted.target]
                if timed_out:
                    yield ref, None, [exhausted.target]


def _handled_events(facts: MachineFacts) -> dict[str, set[str]]:
    """Each state with the events its rows and retry ladders take."""
    handled: dict[str, set[str]] = {}
    for state in facts.machine.states:
        handled.setdefault(state.name.value, set()).update(
            row.event.value for row in state.transitions
        )
    for edge in facts.retry_edges:
        if edge.by_event:
            handled.setdefault(edge.source.value, set()).add(edge.ladder.event.value)
    return handled


def _shown(ref: EventRef) -> str:
    return f"{ref.machine.value}.{ref.event.value}" if ref.machine else ref.event.value
