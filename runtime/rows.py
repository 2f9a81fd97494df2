"""A machine's transition rows and emits, pre-bound at load time for dispatch."""

from __future__ import annotations

import sys
from _json import encode_basestring_ascii
from collections.abc import Callable, Mapping
from typing import cast, final

from .bindings import Action, Guard
from .errors import InvalidTransition, StoreIntegrityError
from .results import _EMPTY_RESULTS, EmittedEvent, _dumps, _Outcome
from .tables import ELSE, Emit, Payload, TimerSpec, Transition
from .timers import ArmedTimer, TimerPlan

# What a refusal notice's $refusal_code / $refusal_message arguments hold until the notice is
# released with the refusal (runtime/outbox.py fills them): a JSON object no payload field
# takes, so a notice delivered without its refusal is refused for its payload, not guessed.
REFUSAL_SLOTS: dict[str, dict[str, str]] = {
    "refusal_code": {"$refusal": "code"},
    "refusal_message": {"$refusal": "message"},
}

_new_exception = cast(Callable[[type[InvalidTransition]], InvalidTransition], BaseException.__new__)


@final
class _Row:
    """One transition row, pre-bound: the guard and action callables, the timers to arm."""

    __slots__ = (
        "absent",
        "actions",
        "arms",
        "bare",
        "cancels",
        "data",
        "emits",
        "event",
        "guard",
        "guard_fn",
        "json",
        "keep",
        "kept",
        "machine",
        "notices",
        "outcome",
        "ref",
        "short",
        "source",
        "target",
    )

    def __init__(
        self,
        machine: str,
        row: Transition,
        guards: Mapping[str, Guard],
        actions: Mapping[str, Action],
        plan: TimerPlan,
    ) -> None:
        self.machine = machine
        # Interned, like the table keys and the initial state: a record's state is then the
        # very key object, and the lookups compare by identity.
        self.source = sys.intern(str(row.source))
        self.event = sys.intern(str(row.event))
        self.target = sys.intern(str(row.target))
        self.guard = row.guard
        self.guard_fn: Guard | None = (
            None if row.guard is None or row.guard == ELSE else guards[row.guard]
        )
        # The target's entry actions and emits run after the row's own, in its transaction.
        entering = plan.on_entry(self.target)
        self.actions: tuple[tuple[str, Action], ...] = tuple(
            (a, actions[a]) for a in (*row.actions, *(a for t in entering for a in t.actions))
        )
        self.emits = tuple(
            _EmitPlan(emit) for emit in (*row.emits, *(e for t in entering for e in t.emits))
        )
        # The row's `keep`s, and whether it reads or writes the instance's kept data at all
        # (runtime/instance_data.py): most rows do neither.
        self.kept = row.keep
        self.data = bool(self.kept) or any(e.to is not None or e.reads for e in self.emits)
        # Some emit tells the sender of a refused delivery: its notice is held in the outbox.
        self.notices = any(emit.refused is not None for emit in self.emits)
        # Leaving a state cancels its timers; entering one (also itself) arms the target's;
        # group and creation timers are armed, kept or cancelled as timers.TimerPlan says.
        self.arms: tuple[TimerSpec, ...]
        self.keep: frozenset[str]
        self.arms, self.keep, self.cancels = plan.on_move(self.source, self.target)
        self.ref = row.ref
        self.absent = False
        # Changes the state and nothing else: no guard, no actions, no timers, no emits.
        self.bare = not (
            self.guard_fn or self.actions or self.emits or self.cancels or self.arms or self.kept
        )
        self.short = False  # the governor sets it: bare, and no ledger to write
        # What a result of this row holds besides instance, version and seq, when the row
        # runs no actions and arms, cancels and emits nothing (the fast paths' rows).
        self.outcome: _Outcome = (
            machine,
            self.event,
            self.source,
            self.target,
            None,
            (),
            (),
            _EMPTY_RESULTS,
            (),
            False,
            False,
        )
        self.json = _ResultText(self)


@final
class _ResultText:
    """A row's stored result (`results._result_to_json`, the same text) in pieces made at
    load time: json's encoder sorts and joins the whole document at every dispatch, where
    all but the instance, version, seq, event id and what the row emitted and armed is the
    row's own. `text` is None for what it does not write (action results other than None),
    for the caller's `_result_to_json`."""

    __slots__ = ("actions", "arms", "event", "machine", "source", "target")

    def __init__(self, row: _Row) -> None:
        # In the document's sorted key order, each piece with the key that follows it.
        self.actions = _dumps(dict.fromkeys(name for name, _ in row.actions)) + ',"armed":'
        # Each armed timer's row, around its instance, due time and version.
        self.arms = tuple(
            ("[" + _dumps(row.machine) + ",", "," + _dumps(t.id) + "," + _dumps(t.state) + ",")
            for t in row.arms
        )
        self.event = ',"event":' + _dumps(row.event) + ',"event_id":'
        self.source = ',"from_state":' + _dumps(row.source) + ',"instance":'
        self.machine = ',"machine":' + _dumps(row.machine) + ',"notifications":[],"seq":'
        self.target = ',"to_state":' + _dumps(row.target) + ',"version":'

    def text(
        self,
        row: _Row,
        instance: str,
        version: int,
        seq: int | None,
        event_id: str | None,
        emitted: tuple[EmittedEvent, ...],
        results: Mapping[str, object],
        armed: tuple[ArmedTimer, ...],
    ) -> str | None:
        """The stored result of `row` applied (what `_apply` made of it: `emitted` from its
        emits, `armed` from its arms, `results` from its actions); None if an action returned
        something. TypeError for a part that is not text: `_result_to_json` writes it then."""
        if results:
            for value in results.values():
                if value is not None:
                    return None
            actions = self.actions
        else:
            actions = '{},"armed":'
        if type(version) is not int or not (seq is None or type(seq) is int):
            return None
        quote = encode_basestring_ascii
        at = quote(instance)
        timers = "[]"
        if armed:
            each = []
            for (head, middle), timer in zip(self.arms, armed, strict=True):
                if type(timer.due_ms) is not int:
                    return None
                each.append(f"{head}{at}{middle}{timer.due_ms},{version}]")
            timers = "[" + ",".join(each) + "]"
        events = "[]"
        if emitted:
            # An emitted id is derive_ids_from's "evt_" and hex digits: nothing to escape.
            events = (
                "["
                + ",".join(
                    [
                        plan.json
                        + (at if sent.instance is instance else quote(sent.instance))
                        + plan.json_event
                        + sent.event_id
                        + '"]'
                        for plan, sent in zip(row.emits, emitted, strict=True)
                    ]
                )
                + "]"
            )
        return "".join(
            [
                '{"action_results":',
                actions,
                timers,
                ',"emitted":',
                events,
                self.event,
                "null" if event_id is None else quote(event_id),
                self.source,
                at,
                self.machine,
                "null" if seq is None else str(seq),
                self.target,
                str(version),
                "}",
            ]
        )


@final
class _Guarded:
    """The rows of one (state, event) with guards, tried in order (`else` last)."""

    __slots__ = ("rows",)
    # Never applied by dispatch's short path: guards run in a unit of work.
    short = bare = absent = False

    def __init__(self, rows: tuple[_Row, ...]) -> None:
        self.rows = rows


@final
class _Absent:
    """No row for one (state, event) of the machine: the event is ignored there (`ignored`,
    with the result's fixed part), or rejected (with the hint listing what the state
    accepts). In the table so that every known event finds an entry."""

    __slots__ = ("event", "fields", "hint", "ignored", "machine", "outcome", "state")
    short = bare = False
    absent = True

    def __init__(
        self, machine: str, state: str, event: str, ignored: bool, accepted: tuple[str, ...]
    ) -> None:
        self.machine = machine
        self.state = state
        self.event = event
        self.ignored = ignored
        self.hint = (
            f"{state} accepts: {', '.join(accepted)}"
            if accepted
            else (f"{state} accepts no events")
        )
        self.outcome: _Outcome = (
            machine,
            event,
            state,
            state,
            None,
            (),
            (),
            _EMPTY_RESULTS,
            (),
            False,
            True,
        )
        self.fields = {"machine": machine, "state": state, "event": event, "hint": self.hint}

    def rejection(self, instance: str) -> InvalidTransition:
        """The InvalidTransition for this (state, event), as `InvalidTransition(machine,
        instance, state, event, accepted=...)` builds it, in a third of the time: its
        attributes set at once, its message formatted when first read (errors.py)."""
        failure = _new_exception(InvalidTransition)
        attributes = failure.__dict__
        attributes.update(self.fields)
        attributes["instance"] = instance
        return failure


@final
class _EmitPlan:
    """One emit of a row or timer, pre-built at load time: its target, and its payload as a
    constant JSON body or as the pieces to fill in from the causing event."""

    __slots__ = (
        "constant",
        "context",
        "event",
        "fields",
        "fixed",
        "json",
        "json_event",
        "kept",
        "machine",
        "reads",
        "refused",
        "to",
    )

    def __init__(self, emit: Emit) -> None:
        self.machine = emit.machine
        self.event = emit.event
        self.to = emit.to  # the data field holding the receiver's id; None: the same id
        # Its EmittedEvent in a stored result (_ResultText), around the receiver and the id.
        self.json = "[" + _dumps(self.machine) + ","
        self.json_event = "," + _dumps(self.event) + ',"'
        # The notice the emitting instance gets if the receiver refuses (runtime/outbox.py).
        self.refused = None if emit.refused is None else _EmitPlan(emit.refused)
        self.constant: dict[str, object] = {}
        self.fields: tuple[tuple[str, str], ...] = ()  # (target field, causing field)
        self.context: tuple[tuple[str, str], ...] = ()  # (target field, instance|actor|event)
        self.kept: tuple[tuple[str, str], ...] = ()  # (target field, data field): `$data.F`
        for arg in emit.args:
            if arg.source == "literal":
                self.constant[arg.field] = arg.value
            elif arg.source == "field":
                self.fields += ((arg.field, str(arg.value)),)
            elif arg.source == "data":
                self.kept += ((arg.field, str(arg.value)),)
            else:
                self.context += ((arg.field, arg.source),)
        # Whether its body (or its notice's) reads the instance's kept data.
        self.reads: bool = bool(self.kept) or (self.refused is not None and self.refused.reads)
        # Literals only (or no arguments): the body is the same for every emission. The
        # compiler lists every target field an emit supplies, implicit same-name ones too.
        self.fixed: str | None = (
            None if self.fields or self.context or self.kept else _dumps(self.constant)
        )

    def body(
        self,
        payload: Payload | None,
        instance: str,
        actor: str,
        event: str,
        data: Mapping[str, object] | None = None,
    ) -> str:
        """The emitted payload as JSON text: values from the causing payload keep their model
        types until `_dumps` (a Decimal becomes its exact string, a datetime ISO 8601);
        `data` is the instance's kept data (checked against the ledger when it was read)."""
        if self.fixed is not None:
            return self.fixed
        values = dict(self.constant)
        for target, source in self.fields:
            values[target] = getattr(payload, source, None)
        for target, ref in self.context:
            values[target] = (
                instance
                if ref == "instance"
                else actor
                if ref == "actor"
                else event
                if ref == "event"
                else REFUSAL_SLOTS[ref]  # filled when the notice is released (outbox.py)
            )
        for target, field in self.kept:
            value = None if data is None else data.get(field)
            if value is None:
                raise StoreIntegrityError(
                    f"'{instance}' keeps no '{field}' for the {self.event} it emits",
                    hint="the machine's checks (E149) rule this out; was the store or the "
                    "machine changed under live instances?",
                )
            values[target] = value
        return _dumps(values)
