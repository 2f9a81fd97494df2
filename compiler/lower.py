"""Model -> tables: the plain rows a generated governor module holds, in their final order.

Lowering is where the language's sugar turns into table rows: retry ladders become
transition rows and retry-step timers, escalation ladders become escalation timers. Order is
decided here once: mappings are sorted by key; rows whose order carries meaning (guarded rows
of one state and event, ladder steps) keep their source order, `else` rows last.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
import keyword
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, pairwise
from typing import Literal, NamedTuple, TypeVar

from pydantic import BaseModel

from . import model as m
from .errors import Diagnostic, SourceSpan, fail

ELSE = "else"

TimerKind = Literal[
    "timeout", "escalation_step", "escalation_end", "retry_step", "retry_timeout", "entry"
]
TimerScope = Literal["state", "group", "creation"]
NameRole = Literal[
    "machine", "state", "event", "field", "guard", "action", "recipient", "ladder", "emit", "name"
]

# ASCII only: str.isidentifier() would accept letters that Python folds (NFKC) into others.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Members of a StrEnum may not shadow str methods (mypy rejects them) or Enum internals.
_ENUM_RESERVED = frozenset(
    {n for n in dir(enum.StrEnum) if not n.startswith("_")} | {"name", "value", "mro"}
)
# Payload fields may not shadow pydantic's BaseModel API or the type names the module uses
# (a field `datetime: datetime | None = None` would rebind the type before it is read).
_FIELD_RESERVED = frozenset(
    {n for n in dir(BaseModel) if not n.startswith("_")}
    | {"str", "int", "bool", "Decimal", "datetime", "Literal"}
)


@functools.lru_cache(maxsize=1 << 16)
def name_problem(name: str, role: NameRole) -> str | None:
    """Why `name` cannot stand in generated Python code in this role, or None if it can."""
    if not IDENTIFIER.match(name):
        return "is not an ASCII Python identifier"
    if keyword.iskeyword(name):
        return "is a Python keyword"
    if role in ("machine", "state", "event", "field") and name.startswith("_"):
        return "starts with an underscore, which Python treats as private"
    if role in ("guard", "action") and name.startswith("_"):
        # Each becomes a method of the generated Bindings protocol (`__x` would be mangled).
        return "starts with an underscore; guards and actions become methods of a protocol"
    if role in ("state", "event") and name in _ENUM_RESERVED:
        return "is an attribute of Python's str and enum types"
    if role == "field" and (name in _FIELD_RESERVED or name.startswith("model_")):
        return "is an attribute of the payload model or a type name of the generated module"
    if role == "machine":
        module = m.snake_case(name)
        if keyword.iskeyword(module):
            return f"becomes the module name '{module}', a Python keyword"
    return None


class LoweringError(Exception):
    """The model cannot be lowered: what the checks should have caught, as diagnostics."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("; ".join(d.message for d in diagnostics))
        self.diagnostics = diagnostics


# ---------------------------------------------------------------- tables


class Ref(NamedTuple):
    # A named tuple, as TransitionRow: one per row of a large machine, built in a third of
    # the time a frozen dataclass takes.
    path: str
    line: int
    column: int


EmitSource = Literal[
    "field", "literal", "instance", "actor", "event", "refusal_code", "refusal_message", "data"
]


@dataclass(frozen=True, slots=True)
class EmitArgRow:
    """One field of an emitted payload: `value` is the causing field's name ("field"), the
    literal itself ("literal"; a decimal as its text), the data field's name ("data", for
    `$data.FIELD`), or None for `$instance`, `$actor`, `$event`."""

    field: str
    source: EmitSource
    value: str | int | bool | None


@dataclass(frozen=True, slots=True)
class EmitRow:
    """`args` is the whole payload mapping: the written arguments and the implicit ones
    (target fields filled from the causing event's same-named fields), in the target
    event's field order."""

    machine: str
    event: str
    args: tuple[EmitArgRow, ...] = ()
    # The data field holding the receiving instance's id; None: the emitting instance's id.
    to: str | None = None
    # `if refused`: this machine's event the emitting instance gets if the delivery is refused.
    refused: EmitRow | None = None


class TransitionRow(NamedTuple):
    """`ladder` names the retry ladder a row was lowered from; `step` is the step it enters
    (None with a ladder: the exhausted move). `keep` is (data field, causing field) for each
    `keep` of the row."""

    source: str
    event: str
    target: str
    guard: str | None
    actions: tuple[str, ...]
    emits: tuple[EmitRow, ...]
    ref: Ref
    ladder: str | None = None
    step: int | None = None
    keep: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class NotifyRow:
    kind: Literal["queue", "role"]
    recipient: str
    within_ms: int | None
    within_text: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class TimerRow:
    id: str
    state: str
    after_ms: int
    after_text: str
    kind: TimerKind
    target: str | None
    actions: tuple[str, ...]
    emits: tuple[EmitRow, ...]
    notify: NotifyRow | None
    ladder: str | None
    step: int | None
    ref: Ref
    # Where it is measured from: entry into `state`, into the group `group`, or creation.
    scope: TimerScope = "state"
    group: str | None = None
    # The delay comes from a duration field of the entering event, or from a setting.
    after_field: str | None = None
    after_setting: str | None = None
    # Which attempt of a repeated retry step (1: the first); not part of the generated spec.
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class EscalationStepRow:
    step: int
    after_ms: int
    after_text: str
    notify: NotifyRow
    timer_id: str


@dataclass(frozen=True, slots=True)
class EscalationRow:
    """`key` is `State/Ladder`, unique within the machine (ladder names need not be)."""

    key: str
    name: str
    state: str
    steps: tuple[EscalationStepRow, ...]
    end_after_ms: int | None
    end_after_text: str | None
    end_target: str | None
    end_timer_id: str | None
    ref: Ref


@dataclass(frozen=True, slots=True)
class RetryStepRow:
    step: int
    state: str
    after_ms: int
    after_text: str
    actions: tuple[str, ...]
    timer_id: str
    attempt_state: str | None = None
    timeout_ms: int | None = None
    timeout_text: str | None = None
    timeout_timer_id: str | None = None
    # `repeat N every E`: N attempts in all, E apart while unanswered.
    repeat: int = 1
    every_ms: int | None = None
    every_text: str | None = None


@dataclass(frozen=True, slots=True)
class RetryRow:
    name: str
    event: str
    entry_states: tuple[str, ...]
    steps: tuple[RetryStepRow, ...]
    exhausted_target: str | None
    ref: Ref


@dataclass(frozen=True, slots=True)
class PolicyRow:
    """A checked resilience policy; None where the policy has no such clause."""

    name: str
    actions: tuple[str, ...]
    attempts: int
    backoff: str
    backoff_max_ms: int | None
    tolerated_failures: int | None
    cooldown_ms: int | None
    fallback: str | None
    bulkhead: int | None
    ref: Ref


@dataclass(frozen=True, slots=True)
class FieldRow:
    name: str
    kind: m.FieldKind
    literals: tuple[str, ...]
    optional: bool


@dataclass(frozen=True, slots=True)
class PayloadRow:
    event: str
    fields: tuple[FieldRow, ...]


@dataclass(frozen=True, slots=True)
class StateRow:
    name: str
    doc: str | None
    initial: bool
    final: bool
    perpetual: bool
    resting: bool = False


@dataclass(frozen=True, slots=True)
class SettingRow:
    name: str
    doc: str | None
    min_ms: int
    min_text: str
    max_ms: int
    max_text: str
    ref: Ref


@dataclass(frozen=True, slots=True)
class MachineTables:
    """Everything a generated module and a diagram show, sorted and ready to render."""

    name: str
    module: str
    doc: str | None
    source_path: str
    source_sha256: str
    states: tuple[StateRow, ...]  # declaration order
    events: tuple[str, ...]  # declaration order
    initial: str
    finals: tuple[str, ...]
    transitions: tuple[tuple[tuple[str, str], tuple[TransitionRow, ...]], ...]
    timers: tuple[tuple[str, tuple[TimerRow, ...]], ...]
    ignored: tuple[tuple[str, tuple[str, ...]], ...]
    payloads: tuple[PayloadRow, ...]  # event declaration order
    escalations: tuple[EscalationRow, ...]
    retries: tuple[RetryRow, ...]
    guards: tuple[tuple[str, Ref], ...]
    actions: tuple[tuple[str, Ref], ...]
    policies: tuple[PolicyRow, ...] = ()
    resting: tuple[str, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    group_docs: tuple[tuple[str, str], ...] = ()  # documented groups, by name: for diagrams
    group_timers: tuple[tuple[str, tuple[TimerRow, ...]], ...] = ()
    creation_timers: tuple[TimerRow, ...] = ()
    settings: tuple[SettingRow, ...] = ()
    data: tuple[str, ...] = ()  # the `data` fields, in declaration order


# ---------------------------------------------------------------- lowering


@contextlib.contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """Lowering and rendering build only acyclic data, yet allocate enough of it that Python's
    cycle collector, rescanning a large IR each time, would take most of the run (4x on a
    10k-state machine)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def lower(
    machine: m.Machine,
    source_path: str | None = None,
    *,
    others: Iterable[m.Machine] | None = (),
) -> MachineTables:
    """The tables of one checked machine. `source_path` is how generated code names the file
    (project-relative, forward slashes); it defaults to the path the machine was read from.
    `others` are the machines its emits may name: an emitted payload is completed from the
    target event's declared fields. None leaves emits without their payloads (for diagrams,
    which do not show them); generated code needs the complete mapping."""
    with cycle_collection_paused():
        return _lower(machine, source_path, others)


def _lower(
    machine: m.Machine, source_path: str | None, others: Iterable[m.Machine] | None
) -> MachineTables:
    path = (source_path if source_path is not None else machine.path).replace("\\", "/")
    # One walk over every row for the names of guards and actions, used three times below.
    guard_names = list(_guard_names(machine))
    action_names = list(_action_names(machine))
    problems = list(_name_problems(machine, guard_names, action_names))
    initials = [s for s in machine.states if s.initial]
    if len(initials) != 1:
        problems.append(fail("E101", "machine needs exactly one initial state", machine.name.span))
    if problems:
        raise LoweringError(problems)
    lowering = _Lowering(machine, path, others)
    timers = lowering.timers()
    _require_unique_timer_ids(machine, timers)
    transitions = lowering.transitions()
    if lowering.problems:
        raise LoweringError(lowering.problems)
    return MachineTables(
        name=machine.name.value,
        module=m.snake_case(machine.name.value),
        doc=machine.doc,
        source_path=path,
        source_sha256=machine.source_sha256,
        states=tuple(
            StateRow(s.name.value, s.doc, s.initial, s.final, s.perpetual, s.resting)
            for s in machine.states
        ),
        events=tuple(e.name.value for e in machine.events),
        initial=initials[0].name.value,
        finals=tuple(sorted(s.name.value for s in machine.states if s.final)),
        transitions=transitions,
        timers=timers,
        ignored=lowering.ignored(),
        payloads=tuple(_payload(e) for e in machine.events),
        escalations=lowering.escalations(),
        retries=lowering.retries(),
        guards=lowering.first_uses(guard_names),
        actions=lowering.first_uses(chain(action_names, _fallback_names(machine))),
        policies=lowering.policies(),
        resting=tuple(sorted(s.name.value for s in machine.states if s.resting)),
        groups=tuple(
            sorted((g.name.value, tuple(sorted(n.value for n in g.states))) for g in machine.groups)
        ),
        group_docs=tuple(sorted((g.name.value, g.doc) for g in machine.groups if g.doc)),
        group_timers=lowering.group_timers(),
        creation_timers=lowering.creation_timers(),
        settings=tuple(
            sorted(
                (
                    SettingRow(
                        s.name.value,
                        s.doc,
                        s.low.millis,
                        s.low.text,
                        s.high.millis,
                        s.high.text,
                        lowering.ref(s.span),
                    )
                    for s in machine.settings
                ),
                key=lambda r: r.name,
            )
        ),
        data=tuple(f.name.value for f in machine.data),
    )


class _Lowering:
    """Per-machine lowering state: the display path, and the events emits may name (this
    machine's and those of `others`), with their payload fields."""

    def __init__(self, machine: m.Machine, path: str, others: Iterable[m.Machine] | None) -> None:
        self.machine = machine
        self.path = path
        self.complete = others is not None  # False: emits without payloads
        self.events: dict[tuple[str, str], m.Event] = {}
        for known in (machine, *(others or ())):
            for event in known.events:
                self.events.setdefault((known.name.value, event.name.value), event)
        self.problems: list[Diagnostic] = []

    def ref(self, span: SourceSpan) -> Ref:
        return Ref(self.path, span.line, span.column)

    def emits(self, refs: Iterable[m.EventRef], cause: m.Name | None) -> tuple[EmitRow, ...]:
        """The emits of a transition caused by event `cause` (None: a timer)."""
        own = self.machine.name.value
        causing = None if cause is None else self.events.get((own, cause.value))
        rows = []
        for r in refs:
            machine = r.machine.value if r.machine is not None else own
            to = None if r.to is None else r.to.value
            notice = r.refused
            if not self.complete:
                # Without the receivers, the arguments as written (what a diagram shows).
                told = (
                    None if notice is None else EmitRow(own, notice.event.value, _written(notice))
                )
                rows.append(EmitRow(machine, r.event.value, _written(r), to, told))
                continue
            target = self.events.get((machine, r.event.value))
            if target is None:
                self.problems.append(
                    fail(
                        "E140",
                        f"emitted event '{machine}.{r.event.value}' is not among the machines "
                        "given to the compiler",
                        r.span,
                        "build the machines it emits to together with this one",
                    )
                )
                continue
            told = None
            if notice is not None:
                own_event = self.events.get((own, notice.event.value))
                if own_event is None:
                    self.problems.append(
                        fail("E150", f"no event '{notice.event.value}' in '{own}'", notice.span)
                    )
                    continue
                args = self.emit_args(notice, own_event, causing)
                told = EmitRow(own, notice.event.value, args)
            rows.append(
                EmitRow(machine, r.event.value, self.emit_args(r, target, causing), to, told)
            )
        return tuple(rows)

    def emit_args(
        self, ref: m.EventRef, target: m.Event, causing: m.Event | None
    ) -> tuple[EmitArgRow, ...]:
        """Written arguments, then the target's other fields from same-named causing fields."""
        written = {arg.field.value: arg for arg in ref.args}
        given = {f.name.value for f in causing.fields} if causing is not None else set()
        args = []
        for field in target.fields:
            name = field.name.value
            arg = written.pop(name, None)
            if arg is not None and arg.value.kind == "ref" and not is_context_ref(arg.value.text):
                self.problems.append(
                    fail("E142", f"unknown reference '${arg.value.text}'", arg.value.span)
                )
            elif arg is not None:
                args.append(_emit_arg(name, arg.value))
            elif name in given:
                args.append(EmitArgRow(name, "field", name))
        for arg in written.values():  # the checks report these as E142
            self.problems.append(
                fail(
                    "E142",
                    f"event '{target.name.value}' has no field '{arg.field.value}'",
                    arg.field.span,
                )
            )
        return tuple(args)

    # ---------------------------------------------------- transitions
    def transitions(self) -> tuple[tuple[tuple[str, str], tuple[TransitionRow, ...]], ...]:
        rows: dict[tuple[str, str], list[TransitionRow]] = defaultdict(list)
        path = self.path
        # The hottest loop of lowering (a row per transition): positional arguments, and no
        # calls for what most rows lack (guards, actions, emits).
        for state in self.machine.states:
            source = state.name.value
            for t in state.transitions:
                guard = None if t.guard is None else (t.guard.name.value if t.guard.name else ELSE)
                event = t.event.value
                span = t.span
                row = TransitionRow(
                    source,
                    event,
                    t.target.value,
                    guard,
                    tuple([a.value for a in t.actions]) if t.actions else (),
                    self.emits(t.emits, t.event) if t.emits else (),
                    Ref(path, span.line, span.column),
                )
                if t.keeps:
                    keep = tuple((k.field.value, k.source.value) for k in t.keeps)
                    row = row._replace(keep=keep)
                rows[source, event].append(row)
        for ladder in self.machine.retries:
            for row in self.retry_rows(ladder):
                rows[row.source, row.event].append(row)
        # Guarded rows keep source order; the explicit default branch is tried last.
        return tuple(
            (key, _else_last(rows[key]) if len(rows[key]) > 1 else tuple(rows[key]))
            for key in sorted(rows)
        )

    def retry_rows(self, ladder: m.RetryLadder) -> Iterator[TransitionRow]:
        """entry -> step 1 -> ... -> step n -> exhausted (entry -> exhausted without steps).
        The failure event moves on from a step's attempt state when it has one (the step's
        own state only waits), else from the step's state."""
        exhausted = ladder.exhausted
        for entry in ladder.entry_states:
            if ladder.steps:
                first = ladder.steps[0].state
                yield self.retry_row(ladder, entry.value, first.value, entry.span, step=1)
            elif exhausted is not None:
                yield self.exhausted_row(ladder, entry.value, entry.span)
        for number, (before, after) in enumerate(pairwise(ladder.steps), start=2):
            source = before.attempt if before.attempt is not None else before.state
            yield self.retry_row(
                ladder, source.value, after.state.value, after.state.span, step=number
            )
        if ladder.steps and exhausted is not None:
            last = ladder.steps[-1]
            source = last.attempt if last.attempt is not None else last.state
            yield self.exhausted_row(ladder, source.value, exhausted.target.span)

    def retry_row(
        self, ladder: m.RetryLadder, source: str, target: str, span: SourceSpan, *, step: int
    ) -> TransitionRow:
        return TransitionRow(
            source=source,
            event=ladder.event.value,
            target=target,
            guard=None,
            actions=(),
            emits=(),
            ref=self.ref(span),
            ladder=ladder.name.value,
            step=step,
        )

    def exhausted_row(self, ladder: m.RetryLadder, source: str, span: SourceSpan) -> TransitionRow:
        end = ladder.exhausted
        assert end is not None
        return TransitionRow(
            source=source,
            event=ladder.event.value,
            target=end.target.value,
            guard=None,
            actions=_values(end.actions),
            emits=self.emits(end.emits, ladder.event),
            ref=self.ref(span),
            ladder=ladder.name.value,
            step=None,
        )

    def ignored(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        events: dict[str, set[str]] = defaultdict(set)
        for state in self.machine.states:
            for clause in state.ignores:
                events[state.name.value].update(n.value for n in clause.events)
        return tuple((state, tuple(sorted(events[state]))) for state in sorted(events))

    # ---------------------------------------------------- timers and ladders
    def timers(self) -> tuple[tuple[str, tuple[TimerRow, ...]], ...]:
        by_state: dict[str, list[TimerRow]] = defaultdict(list)
        for state in self.machine.states:
            by_state[state.name.value].extend(self.plain_timers(state))
            for row, written in self.escalation_ladders(state):
                by_state[state.name.value].extend(self.escalation_timers(row, written))
        for state in self.machine.states:
            by_state[state.name.value].extend(self.entry_timers(state))
        for retry, ladder in self.retry_ladders():
            for index, (step, written_step) in enumerate(
                zip(retry.steps, ladder.steps, strict=True)
            ):
                by_state[step.state].append(self.retry_timer(retry, step, written_step))
                for timer in self.repeated_attempts(retry, step, written_step):
                    by_state[timer.state].append(timer)
                if step.attempt_state is not None:
                    following = retry.steps[index + 1] if index + 1 < len(retry.steps) else None
                    by_state[step.attempt_state].append(
                        self.attempt_timeout(retry, ladder, step, written_step, following)
                    )
        # Firing order: earliest first; ties in source order.
        return tuple(
            (state, tuple(sorted(rows, key=lambda t: (t.after_ms, t.ref.line, t.ref.column, t.id))))
            for state, rows in sorted(by_state.items())
            if rows
        )

    def plain_timers(self, state: m.State) -> Iterator[TimerRow]:
        seen: dict[str, int] = defaultdict(int)
        for timer in state.timers:
            # `#k` counts timers with the same written duration, so that adding a timer
            # elsewhere in the state never renames this one (stores key armed timers by id).
            occurrence = seen[timer.after.text]
            seen[timer.after.text] += 1
            yield self.timer_row(
                timer, f"{state.name.value}/after/{timer.after.text}#{occurrence}", state.name.value
            )

    def timer_row(
        self,
        timer: m.Timer | m.MachineTimer,
        timer_id: str,
        state: str,
        scope: TimerScope = "state",
        group: str | None = None,
    ) -> TimerRow:
        delay = timer.delay
        return TimerRow(
            id=timer_id,
            state=state,
            after_ms=timer.after.millis,
            after_text=timer.after.text,
            kind="timeout",
            target=timer.target.value if timer.target is not None else None,
            actions=_values(timer.actions),
            emits=self.emits(timer.emits, None),
            notify=None,
            ladder=None,
            step=None,
            ref=self.ref(timer.span),
            scope=scope,
            group=group,
            after_field=delay.name.value if delay is not None and delay.kind == "field" else None,
            after_setting=(
                delay.name.value if delay is not None and delay.kind == "setting" else None
            ),
        )

    def entry_timers(self, state: m.State) -> Iterator[TimerRow]:
        """Entry actions: timers due at the moment of entry (t = 0)."""
        for number, entry in enumerate(state.entries):
            yield TimerRow(
                id=f"{state.name.value}/entry#{number}",
                state=state.name.value,
                after_ms=0,
                after_text="0s",
                kind="entry",
                target=None,
                actions=_values(entry.actions),
                emits=self.emits(entry.emits, None),
                notify=None,
                ladder=None,
                step=None,
                ref=self.ref(entry.span),
            )

    def group_timers(self) -> tuple[tuple[str, tuple[TimerRow, ...]], ...]:
        by_group: dict[str, list[TimerRow]] = defaultdict(list)
        seen: dict[str, int] = defaultdict(int)
        for timer in self.machine.machine_timers:
            if timer.scope != "group" or timer.group is None:
                continue
            group = timer.group.value
            key = f"@{group}/after/{timer.after.text}"
            timer_id = f"{key}#{seen[key]}"
            seen[key] += 1
            by_group[group].append(self.timer_row(timer, timer_id, group, "group", group))
        return tuple((group, tuple(rows)) for group, rows in sorted(by_group.items()))

    def creation_timers(self) -> tuple[TimerRow, ...]:
        rows = []
        seen: dict[str, int] = defaultdict(int)
        for timer in self.machine.machine_timers:
            if timer.scope != "creation":
                continue
            key = f"@creation/after/{timer.after.text}"
            rows.append(self.timer_row(timer, f"{key}#{seen[key]}", "", "creation"))
            seen[key] += 1
        return tuple(rows)

    def escalation_ladders(self, state: m.State) -> Iterator[tuple[EscalationRow, m.Escalation]]:
        unnamed = 0
        for ladder in state.escalations:
            if ladder.name is not None:
                name = ladder.name.value
            else:
                name = f"escalate#{unnamed}"
                unnamed += 1
            key = f"{state.name.value}/{name}"
            steps = tuple(
                EscalationStepRow(
                    step=number,
                    after_ms=at,
                    after_text=_text(at, step.after),
                    notify=NotifyRow(
                        kind=step.recipient_kind,
                        recipient=step.recipient.value,
                        within_ms=step.within.millis if step.within is not None else None,
                        within_text=step.within.text if step.within is not None else None,
                        message=step.message,
                    ),
                    # A repeated step's later firings get ids of their own: 3, 3.2, 3.3 ...
                    timer_id=f"{key}/{number}" + (f".{repetition}" if repetition > 1 else ""),
                )
                for number, step in enumerate(ladder.steps, start=1)
                for repetition, at in enumerate(_firings(step), start=1)
            )
            end = ladder.end
            row = EscalationRow(
                key=key,
                name=name,
                state=state.name.value,
                steps=steps,
                end_after_ms=end.after.millis if end is not None else None,
                end_after_text=end.after.text if end is not None else None,
                end_target=end.target.value if end is not None else None,
                end_timer_id=f"{key}/end" if end is not None else None,
                ref=self.ref(ladder.span),
            )
            yield row, ladder

    def escalation_timers(self, ladder: EscalationRow, written: m.Escalation) -> Iterator[TimerRow]:
        unrolled = [s for s in written.steps for _ in _firings(s)]
        for step, written_step in zip(ladder.steps, unrolled, strict=True):
            yield TimerRow(
                id=step.timer_id,
                state=ladder.state,
                after_ms=step.after_ms,
                after_text=step.after_text,
                kind="escalation_step",
                target=None,
                actions=(),
                emits=(),
                notify=step.notify,
                ladder=ladder.name,
                step=step.step,
                ref=self.ref(written_step.span),
            )
        end = written.end
        if end is not None and ladder.end_timer_id is not None:
            yield TimerRow(
                id=ladder.end_timer_id,
                state=ladder.state,
                after_ms=end.after.millis,
                after_text=end.after.text,
                kind="escalation_end",
                target=end.target.value,
                actions=_values(end.actions),
                emits=self.emits(end.emits, None),
                notify=None,
                ladder=ladder.name,
                step=None,
                ref=self.ref(end.span),
            )

    def escalations(self) -> tuple[EscalationRow, ...]:
        rows = [row for s in self.machine.states for row, _ in self.escalation_ladders(s)]
        return tuple(sorted(rows, key=lambda r: r.key))

    def retry_ladders(self) -> list[tuple[RetryRow, m.RetryLadder]]:
        rows = []
        for ladder in self.machine.retries:
            name = ladder.name.value
            row = RetryRow(
                name=name,
                event=ladder.event.value,
                entry_states=tuple(sorted(n.value for n in ladder.entry_states)),
                steps=tuple(
                    RetryStepRow(
                        step=number,
                        state=step.state.value,
                        after_ms=step.after.millis,
                        after_text=step.after.text,
                        actions=_values(step.actions),
                        timer_id=f"{step.state.value}/{name}/{number}",
                        attempt_state=step.attempt.value if step.attempt is not None else None,
                        timeout_ms=step.timeout.millis if step.timeout is not None else None,
                        timeout_text=step.timeout.text if step.timeout is not None else None,
                        timeout_timer_id=(
                            f"{step.attempt.value}/{name}/{number}/timeout"
                            if step.attempt is not None
                            else None
                        ),
                        repeat=step.attempts,
                        every_ms=step.repeat.every.millis if step.repeat is not None else None,
                        every_text=step.repeat.every.text if step.repeat is not None else None,
                    )
                    for number, step in enumerate(ladder.steps, start=1)
                ),
                exhausted_target=(
                    ladder.exhausted.target.value if ladder.exhausted is not None else None
                ),
                ref=self.ref(ladder.span),
            )
            rows.append((row, ladder))
        return rows

    def retries(self) -> tuple[RetryRow, ...]:
        return tuple(sorted((row for row, _ in self.retry_ladders()), key=lambda r: r.name))

    def attempt_timeout(
        self,
        retry: RetryRow,
        ladder: m.RetryLadder,
        step: RetryStepRow,
        written: m.RetryStep,
        following: RetryStepRow | None,
    ) -> TimerRow:
        """An attempt without an answer after its timeout fails: on to the next step, or
        exhausted (its actions and emits, without a causing event)."""
        assert step.attempt_state is not None and step.timeout_timer_id is not None
        assert step.timeout_ms is not None and step.timeout_text is not None
        end = ladder.exhausted
        if following is not None:
            target: str | None = following.state
            actions: tuple[str, ...] = ()
            emits: tuple[EmitRow, ...] = ()
        else:
            target = end.target.value if end is not None else None
            actions = _values(end.actions) if end is not None else ()
            emits = self.emits(end.emits, None) if end is not None else ()
        return TimerRow(
            id=step.timeout_timer_id,
            state=step.attempt_state,
            after_ms=step.timeout_ms,
            after_text=step.timeout_text,
            kind="retry_timeout",
            target=target,
            actions=actions,
            emits=emits,
            notify=None,
            ladder=retry.name,
            step=step.step,
            ref=self.ref(written.timeout.span if written.timeout is not None else written.span),
        )

    def repeated_attempts(
        self, retry: RetryRow, step: RetryStepRow, written: m.RetryStep
    ) -> Iterator[TimerRow]:
        """The second and later attempts of a repeated step, made while the attempt has no
        answer: in the step's state, measured from its entry; with an attempt state, in that
        state, measured from the attempt's start."""
        if written.repeat is None or step.every_ms is None:
            return
        in_flight = step.attempt_state is not None
        start = 0 if in_flight else step.after_ms
        for attempt in range(2, step.repeat + 1):
            at = start + (attempt - 1) * step.every_ms
            yield TimerRow(
                id=f"{step.attempt_state or step.state}/{retry.name}/{step.step}.{attempt}",
                state=step.attempt_state or step.state,
                after_ms=at,
                after_text=_text(at, written.repeat.every if in_flight else written.after),
                kind="retry_step",
                target=None,
                actions=step.actions,
                emits=(),
                notify=None,
                ladder=retry.name,
                step=step.step,
                # Where the repeated attempt is written: in the step's own state, the step
                # (so a diagram folds every attempt into one line); else the repeat clause.
                ref=self.ref(written.repeat.span if in_flight else written.span),
                attempt=attempt,
            )

    def retry_timer(self, retry: RetryRow, step: RetryStepRow, written: m.RetryStep) -> TimerRow:
        return TimerRow(
            id=step.timer_id,
            state=step.state,
            after_ms=step.after_ms,
            after_text=step.after_text,
            kind="retry_step",
            target=step.attempt_state,
            actions=step.actions,
            emits=(),
            notify=None,
            ladder=retry.name,
            step=step.step,
            ref=self.ref(written.span),
        )

    # ---------------------------------------------------- callbacks
    def policies(self) -> tuple[PolicyRow, ...]:
        rows = []
        for policy in self.machine.policies:
            retry = _clause(policy, m.PolicyRetry)
            breaker = _clause(policy, m.PolicyBreaker)
            fallback = _clause(policy, m.PolicyFallback)
            bulkhead = _clause(policy, m.PolicyBulkhead)
            rows.append(
                PolicyRow(
                    name=policy.name.value,
                    actions=tuple(sorted(name.value for name in policy.actions)),
                    attempts=1 if retry is None else int(retry.attempts.text),
                    backoff="jitter" if retry is None else retry.backoff,
                    backoff_max_ms=(
                        None
                        if retry is None or retry.backoff_max is None
                        else retry.backoff_max.millis
                    ),
                    tolerated_failures=None if breaker is None else int(breaker.tolerated.text),
                    cooldown_ms=None if breaker is None else breaker.cooldown.millis,
                    fallback=None if fallback is None else fallback.action.value,
                    bulkhead=None if bulkhead is None else int(bulkhead.limit.text),
                    ref=self.ref(policy.name.span),
                )
            )
        return tuple(sorted(rows, key=lambda row: row.name))

    def first_uses(self, names: Iterable[m.Name]) -> tuple[tuple[str, Ref], ...]:
        first: dict[str, m.Name] = {}
        for name in names:
            known = first.get(name.value)
            if known is None:
                first[name.value] = name
            elif (name.span.line, name.span.column) < (known.span.line, known.span.column):
                first[name.value] = name  # one machine, one file: the path is the same
        return tuple((value, self.ref(first[value].span)) for value in sorted(first))


def _else_last(rows: list[TransitionRow]) -> tuple[TransitionRow, ...]:
    return tuple(sorted(rows, key=lambda r: r.guard == ELSE))


def _written(ref: m.EventRef) -> tuple[EmitArgRow, ...]:
    """An emit's arguments as written, those with an unknown `$reference` left out (E142)."""
    return tuple(
        _emit_arg(arg.field.value, arg.value)
        for arg in ref.args
        if arg.value.kind != "ref" or is_context_ref(arg.value.text)
    )


def _emit_arg(field: str, value: m.EmitValue) -> EmitArgRow:
    """A written argument as a table row: numbers with a point stay text (decimals)."""
    if value.kind == "field":
        return EmitArgRow(field, "field", value.text)
    if value.kind == "string":
        return EmitArgRow(field, "literal", value.text)
    if value.kind == "bool":
        return EmitArgRow(field, "literal", value.text == "true")
    if value.kind == "number":
        return EmitArgRow(field, "literal", value.text if "." in value.text else int(value.text))
    if value.text.startswith(DATA_REF):
        return EmitArgRow(field, "data", value.text[len(DATA_REF) :])
    return EmitArgRow(field, _CONTEXT_REFS[value.text], None)


# `$name` references an emit argument may use, and what the runtime fills in for them; the
# REFUSAL_REFS only in a refusal notice's arguments (E152): the receiver's refusal.
_CONTEXT_REFS: dict[str, EmitSource] = {
    "instance": "instance",
    "actor": "actor",
    "event": "event",
    "refusal_code": "refusal_code",
    "refusal_message": "refusal_message",
}
CONTEXT_REFS = tuple(_CONTEXT_REFS)
REFUSAL_REFS = ("refusal_code", "refusal_message")
DATA_REF = "data."


def is_context_ref(text: str) -> bool:
    """Whether `$text` is a reference the runtime fills in (`$data.FIELD`: whether FIELD is a
    data field is the checks' to judge, E142)."""
    return text in _CONTEXT_REFS or (text.startswith(DATA_REF) and len(text) > len(DATA_REF))


def _firings(step: m.EscalationStep) -> list[int]:
    """When a (possibly repeated) escalation step fires, from entry."""
    if step.repeat is None:
        return [step.after.millis]
    every = step.repeat.every.millis
    return [step.after.millis + k * every for k in range(step.repeat.count)]


def _text(millis: int, written: m.Duration) -> str:
    """The written text for the first firing; a compound text for the repetitions."""
    if millis == written.millis:
        return written.text
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    if millis:
        parts.append(f"{millis}ms")
    return "".join(parts) or "0s"


def _values(names: Iterable[m.Name]) -> tuple[str, ...]:
    return tuple(n.value for n in names)


def _payload(event: m.Event) -> PayloadRow:
    return PayloadRow(
        event=event.name.value,
        fields=tuple(
            FieldRow(
                name=f.name.value,
                kind=f.type.kind,
                literals=_values(f.type.literals),
                optional=f.type.optional,
            )
            for f in event.fields
        ),
    )


def _guard_names(machine: m.Machine) -> Iterator[m.Name]:
    for state in machine.states:
        for t in state.transitions:
            if t.guard is not None and t.guard.name is not None:
                yield t.guard.name


def _action_names(machine: m.Machine) -> Iterator[m.Name]:
    for state in machine.states:
        for t in state.transitions:
            yield from t.actions
        for timer in state.timers:
            yield from timer.actions
        for ladder in state.escalations:
            if ladder.end is not None:
                yield from ladder.end.actions
        for entry in state.entries:
            yield from entry.actions
    for mtimer in machine.machine_timers:
        yield from mtimer.actions
    for retry in machine.retries:
        for step in retry.steps:
            yield from step.actions
        if retry.exhausted is not None:
            yield from retry.exhausted.actions


ClauseT = TypeVar("ClauseT", bound=m.Node)


def _clause(policy: m.Policy, kind: type[ClauseT]) -> ClauseT | None:
    return next((c for c in policy.clauses if isinstance(c, kind)), None)


def _fallback_names(machine: m.Machine) -> Iterator[m.Name]:
    for policy in machine.policies:
        for clause in policy.clauses:
            if isinstance(clause, m.PolicyFallback):
                yield clause.action


def run_actions(machine: m.Machine) -> Iterator[m.Name]:
    """Every action name a transition, timer or ladder of the machine runs."""
    return _action_names(machine)


def emit_refs(
    machine: m.Machine,
    emitting_rows: Callable[[m.State], Sequence[m.Transition]] | None = None,
) -> Iterator[m.EventRef]:
    """Every `emit` of the machine; `emitting_rows` may say which transitions of a state
    emit (the checker's MachineFacts knows), sparing a look at all of them."""
    for state in machine.states:
        rows = state.transitions if emitting_rows is None else emitting_rows(state)
        for t in rows:
            yield from t.emits
        for timer in state.timers:
            yield from timer.emits
        for ladder in state.escalations:
            if ladder.end is not None:
                yield from ladder.end.emits
        for entry in state.entries:
            yield from entry.emits
    for mtimer in machine.machine_timers:
        yield from mtimer.emits
    for retry in machine.retries:
        if retry.exhausted is not None:
            yield from retry.exhausted.emits


def named_things(
    machine: m.Machine,
    guards: Iterable[m.Name] | None = None,
    actions: Iterable[m.Name] | None = None,
) -> Iterator[tuple[m.Name, NameRole]]:
    """Every name of the machine that reaches generated code, with the role it plays there;
    `guards` and `actions` may give the machine's guard and action names, walked already."""
    yield machine.name, "machine"
    for state in machine.states:
        yield state.name, "state"
        for ladder in state.escalations:
            if ladder.name is not None:
                yield ladder.name, "ladder"
            for step in ladder.steps:
                yield step.recipient, "recipient"
    for event in machine.events:
        yield event.name, "event"
        for f in event.fields:
            yield f.name, "field"
    for retry in machine.retries:
        yield retry.name, "ladder"
    for group in machine.groups:
        yield group.name, "ladder"
    for setting in machine.settings:
        yield setting.name, "ladder"
    for f in machine.data:
        yield f.name, "field"
    for name in _guard_names(machine) if guards is None else guards:
        yield name, "guard"
    for name in _action_names(machine) if actions is None else actions:
        yield name, "action"
    for policy in machine.policies:
        yield policy.name, "name"
    for name in _fallback_names(machine):
        yield name, "action"
    for ref in emit_refs(machine):
        if ref.machine is not None:
            yield ref.machine, "emit"
        yield ref.event, "emit"
        if ref.refused is not None:
            yield ref.refused.event, "emit"


def _name_problems(
    machine: m.Machine, guards: Iterable[m.Name], actions: Iterable[m.Name]
) -> Iterator[Diagnostic]:
    known: dict[tuple[str, NameRole], str | None] = {}  # most names recur: judge each once
    for name, role in named_things(machine, guards, actions):
        key = (name.value, role)
        why = known[key] if key in known else known.setdefault(key, name_problem(*key))
        if why is not None:
            yield fail(
                "E130",
                f"{role} name '{name.value}' {why}",
                name.span,
                "rename it: generated Python code uses this name",
            )


def _require_unique_timer_ids(
    machine: m.Machine, timers: tuple[tuple[str, tuple[TimerRow, ...]], ...]
) -> None:
    seen: dict[str, TimerRow] = {}
    problems = []
    for _, rows in timers:
        for row in rows:
            if row.id in seen:
                problems.append(
                    fail(
                        "E131",
                        f"timer id '{row.id}' is produced twice",
                        SourceSpan.point(machine.path, row.ref.line, row.ref.column),
                        "give each escalation ladder of a state its own name",
                    )
                )
            seen[row.id] = row
    if problems:
        raise LoweringError(problems)
