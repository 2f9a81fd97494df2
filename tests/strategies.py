"""Hypothesis strategies: random valid machines as text, each with the tables it must lower to.

The expectations are worked out here from the drawn structure, independently of the compiler's
lowering, so a round-trip test compares two derivations rather than one with itself. Also holds
`load_module`, which imports generated source from a file the way the runtime would.
"""

from __future__ import annotations

import importlib.util
import itertools
import keyword
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from autonomic.compiler.lower import NameRole, name_problem
from hypothesis import strategies as st

UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

# Words the grammar reserves somewhere; a random name never uses them, to stay valid.
GRAMMAR_WORDS = frozenset(
    {"machine", "event", "state", "initial", "final", "perpetual", "on", "when", "else", "do"}
    | {"emit", "after", "ignore", "escalate", "notify", "queue", "role", "within", "retry"}
    | {"from", "step", "exhausted", "enum", "flow"}
)
FIELD_KINDS = ("str", "int", "decimal", "bool", "datetime", "enum")


# ---------------------------------------------------------------- expectations


@dataclass(frozen=True)
class RowExpectation:
    target: str
    guard: str | None  # None, a guard name, or "else"
    actions: tuple[str, ...]
    emits: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class NotifyExpectation:
    kind: str
    recipient: str
    within_ms: int | None
    message: str | None


@dataclass(frozen=True)
class TimerExpectation:
    id: str
    after_ms: int
    kind: str
    target: str | None
    actions: tuple[str, ...]
    emits: tuple[tuple[str, str], ...]
    notify: NotifyExpectation | None
    ladder: str | None
    step: int | None


@dataclass(frozen=True)
class FieldExpectation:
    name: str
    kind: str
    literals: tuple[str, ...]
    optional: bool


@dataclass
class MachineCase:
    """A machine file's text and what its generated tables must hold."""

    text: str
    name: str
    doc: str | None
    states: tuple[str, ...]
    events: tuple[str, ...]
    initial: str
    finals: frozenset[str]
    transitions: dict[tuple[str, str], tuple[RowExpectation, ...]]
    timers: dict[str, frozenset[TimerExpectation]]
    ignored: dict[str, frozenset[str]]
    fields: dict[str, tuple[FieldExpectation, ...]]
    guards: frozenset[str]
    actions: frozenset[str]
    retries: dict[
        str, tuple[str, tuple[str, ...], tuple[str, ...], str]
    ]  # event, entries, steps, exhausted
    escalations: dict[str, tuple[int, ...]]  # "State/Ladder" -> step after_ms


# ---------------------------------------------------------------- text pieces


def quote(text: str) -> str:
    """A machine-language string literal holding `text` exactly."""
    body = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{body}"'


def _usable(name: str, role: NameRole) -> bool:
    return (
        name not in GRAMMAR_WORDS
        and not keyword.issoftkeyword(name)
        and name != "type"
        and name_problem(name, role) is None
    )


def camel_names(role: NameRole) -> st.SearchStrategy[str]:
    return st.from_regex(r"[A-Z][A-Za-z0-9]{0,7}", fullmatch=True).filter(
        lambda n: _usable(n, role)
    )


def snake_names(role: NameRole) -> st.SearchStrategy[str]:
    return st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(lambda n: _usable(n, role))


# Free text for docs, messages and enum literals: anything the language can quote, including
# quotes, backslashes, newlines, bidi controls and other invisible characters.
free_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r"),
    max_size=24,
)
tricky_text = st.sampled_from(
    [
        '"""; import os; os.system("x") #',
        "'''",
        "\\",
        'a"b',
        "line\nbreak",
        "\u202eevil\u202c",
        "\u2066isolate\u2069",
        "}\n{",
        "</script><b>",
        "| # ; : %% direction LR",
        "end note",
        "{{ 1 }}",
        "\x0b\x0c\x1c\x85\u2028",
    ]
)
any_text = st.one_of(free_text, tricky_text)


@st.composite
def durations(draw: st.DrawFn, minutes: int) -> tuple[str, int]:
    """`minutes` written in a random unit that expresses it exactly: (text, millis)."""
    choices = [f"{minutes}m", f"{minutes * 60}s", f"{minutes * 60_000}ms"]
    if minutes % 60 == 0:
        choices.append(f"{minutes // 60}h")
    if minutes % 1440 == 0:
        choices.append(f"{minutes // 1440}d")
    return draw(st.sampled_from(choices)), minutes * 60_000


# ---------------------------------------------------------------- the machine strategy


@dataclass
class _StateDraft:
    name: str
    initial: bool
    final: bool
    doc: str | None = None
    lines: list[str] = field(default_factory=list)
    acting_ms: set[int] = field(default_factory=set)  # moments of timers that move or act


Emits = tuple[tuple[str, str], ...]


@dataclass
class _Draft:
    """The machine drawn so far, as text lines per state, and what its tables must hold."""

    draw: st.DrawFn
    name: str
    state_names: list[str]
    events: list[str]
    action_pool: list[str]
    guard_pool: list[str]
    states: dict[str, _StateDraft]
    retry_lines: list[str] = field(default_factory=list)
    transitions: dict[tuple[str, str], tuple[RowExpectation, ...]] = field(default_factory=dict)
    timers: dict[str, set[TimerExpectation]] = field(default_factory=dict)
    ignored: dict[str, frozenset[str]] = field(default_factory=dict)
    guards: set[str] = field(default_factory=set)
    actions_used: set[str] = field(default_factory=set)
    retries: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = field(
        default_factory=dict
    )
    escalations: dict[str, tuple[int, ...]] = field(default_factory=dict)
    in_ladder: dict[str, set[str]] = field(default_factory=dict)  # event -> states it moves
    emitted: set[str] = field(default_factory=set)  # events that some emit sends

    def actions(self) -> tuple[str, ...]:
        chosen = tuple(
            self.draw(st.lists(st.sampled_from(self.action_pool), max_size=2, unique=True))
        )
        self.actions_used.update(chosen)
        return chosen

    def emits(self) -> tuple[Emits, str]:
        """Events of this machine, some written `Machine.Event`, some bare."""
        chosen = self.draw(st.lists(st.sampled_from(self.events), max_size=2, unique=True))
        self.emitted.update(chosen)
        shown = [f"{self.name}.{e}" if self.draw(st.booleans()) else e for e in chosen]
        return tuple((self.name, e) for e in chosen), (
            f" emit {', '.join(shown)}" if chosen else ""
        )

    def timer(self, state: str, expected: TimerExpectation) -> None:
        self.timers.setdefault(state, set()).add(expected)


def _clauses(actions: tuple[str, ...], emit_text: str) -> str:
    return (f" do {', '.join(actions)}" if actions else "") + emit_text


def _draw_retry_ladder(d: _Draft, ladder: str, event: str, active: list[str]) -> None:
    """`retry` on a dedicated event: entry -> steps -> exhausted, as the lowering promises."""
    draw = d.draw
    steps = draw(st.lists(st.sampled_from(active), min_size=1, max_size=3, unique=True))
    candidates = [s for s in active if s not in steps]
    if not candidates:
        return
    entries = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=2, unique=True))
    exhausted = draw(st.sampled_from([s for s in d.state_names if s not in steps]))
    size = len(steps)
    moments = sorted(draw(st.sets(st.integers(1, 5000), min_size=size, max_size=size)))
    written = [draw(durations(mins)) for mins in moments]
    if any(ms in d.states[s].acting_ms for s, (_, ms) in zip(steps, written, strict=True)):
        return  # a step timer due at the same moment as another timer of its state
    lines = [f"  retry {ladder} on {event} {{", f"    from {', '.join(entries)}"]
    for number, (step, (text, ms)) in enumerate(zip(steps, written, strict=True), start=1):
        d.states[step].acting_ms.add(ms)
        actions = d.actions()
        lines.append(f"    step {step} after {text}" + _clauses(actions, ""))
        d.timer(
            step,
            TimerExpectation(
                f"{step}/{ladder}/{number}",
                ms,
                "retry_step",
                None,
                actions,
                (),
                None,
                ladder,
                number,
            ),
        )
    end_actions = d.actions()
    end_emits, emit_text = d.emits()
    lines += [f"    exhausted -> {exhausted}" + _clauses(end_actions, emit_text), "  }"]
    d.retry_lines.extend(lines)
    d.in_ladder[event] = set(entries) | set(steps)
    for entry in entries:
        d.transitions[entry, event] = (RowExpectation(steps[0], None, (), ()),)
    for before, after in itertools.pairwise(steps):
        d.transitions[before, event] = (RowExpectation(after, None, (), ()),)
    d.transitions[steps[-1], event] = (RowExpectation(exhausted, None, end_actions, end_emits),)
    d.retries[ladder] = (event, tuple(sorted(entries)), tuple(steps), exhausted)


def _draw_rows(d: _Draft, state: str, event: str) -> None:
    """One unguarded row, or guarded rows with an optional `else` written anywhere among them."""
    draw = d.draw
    written: list[tuple[RowExpectation, str]] = []
    guards = draw(st.lists(st.sampled_from(d.guard_pool), max_size=3, unique=True))
    options: list[str | None] = [*guards] if guards else [None]
    for guard in options:
        target = draw(st.sampled_from(d.state_names))
        actions, (emits, emit_text) = d.actions(), d.emits()
        when = f" when {guard}" if guard else ""
        text = f"on {event} -> {target}{when}" + _clauses(actions, emit_text)
        written.append((RowExpectation(target, guard, actions, emits), text))
    d.guards.update(guards)
    with_else: bool = draw(st.booleans())
    if guards and with_else:
        target = draw(st.sampled_from(d.state_names))
        actions, (emits, emit_text) = d.actions(), d.emits()
        text = f"on {event} -> {target} else" + _clauses(actions, emit_text)
        written.insert(
            draw(st.integers(0, len(written))),
            (RowExpectation(target, "else", actions, emits), text),
        )
    d.states[state].lines.extend(text for _, text in written)
    rows = [row for row, _ in written]
    d.transitions[state, event] = tuple(
        [r for r in rows if r.guard != "else"] + [r for r in rows if r.guard == "else"]
    )


def _draw_transitions_and_ignores(d: _Draft, state: str) -> None:
    draw = d.draw
    usable = [e for e in d.events if state not in d.in_ladder.get(e, set())]
    handled = draw(st.lists(st.sampled_from(usable), max_size=3, unique=True)) if usable else []
    for event in handled:
        _draw_rows(d, state, event)
    rest = [e for e in usable if e not in handled]
    with_ignore: bool = draw(st.booleans())
    if rest and with_ignore:
        chosen = draw(st.lists(st.sampled_from(rest), min_size=1, max_size=3, unique=True))
        d.states[state].lines.append("ignore " + ", ".join(chosen))
        d.ignored[state] = frozenset(chosen)


def _draw_timers(d: _Draft, state: str) -> None:
    """Plain timers, each due at a moment no other acting timer of the state uses."""
    draw, draft = d.draw, d.states[state]
    occurrences: dict[str, int] = {}
    for mins in draw(st.lists(st.integers(1, 20000), max_size=2, unique=True)):
        text, ms = draw(durations(mins))
        if ms in draft.acting_ms:
            continue
        draft.acting_ms.add(ms)
        target = draw(st.none() | st.sampled_from(d.state_names))
        actions = d.actions()
        if target is None and not actions:
            actions = (d.action_pool[0],)
            d.actions_used.add(actions[0])
        emits, emit_text = d.emits()
        occurrence = occurrences.get(text, 0)
        occurrences[text] = occurrence + 1
        arrow = f" -> {target}" if target is not None else ""
        draft.lines.append(f"after {text}{arrow}" + _clauses(actions, emit_text))
        d.timer(
            state,
            TimerExpectation(
                f"{state}/after/{text}#{occurrence}",
                ms,
                "timeout",
                target,
                actions,
                emits,
                None,
                None,
                None,
            ),
        )


def _draw_escalations(d: _Draft, state: str) -> None:
    """0-2 ladders: steps strictly increasing, each deadline over before the next moment."""
    draw, draft = d.draw, d.states[state]
    named: set[str] = set()
    unnamed = 0
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.none() | camel_names("ladder"))
        step_count = draw(st.integers(0, 3))
        has_end = step_count == 0 or draw(st.booleans())
        size = step_count + has_end
        moments = sorted(draw(st.sets(st.integers(1, 20000), min_size=size, max_size=size)))
        end_ms = moments[-1] * 60_000 if has_end else None
        if (name is not None and name in named) or end_ms in draft.acting_ms:
            continue
        if name is None:
            label, unnamed = f"escalate#{unnamed}", unnamed + 1
        else:
            label = name
            named.add(name)
        key = f"{state}/{label}"
        body: list[str] = []
        step_ms: list[int] = []
        for number, mins in enumerate(moments[:step_count], start=1):
            text, ms = draw(durations(mins))
            kind = draw(st.sampled_from(["queue", "role"]))
            recipient = draw(snake_names("recipient"))
            within_ms, within_text = None, ""
            if draw(st.booleans()):
                room = moments[number] - mins if number < len(moments) else 5000
                shown, within_ms = draw(durations(draw(st.integers(1, room))))
                within_text = f" within {shown}"
            message = draw(st.none() | any_text)
            quoted = f" {quote(message)}" if message is not None else ""
            body.append(f"after {text} notify {kind} {recipient}{within_text}{quoted}")
            step_ms.append(ms)
            notify = NotifyExpectation(kind, recipient, within_ms, message)
            d.timer(
                state,
                TimerExpectation(
                    f"{key}/{number}", ms, "escalation_step", None, (), (), notify, label, number
                ),
            )
        if end_ms is not None:
            text, _ = draw(durations(moments[-1]))
            target = draw(st.sampled_from([s for s in d.state_names if s != state]))
            actions = d.actions()
            emits, emit_text = d.emits()
            draft.acting_ms.add(end_ms)
            body.append(f"after {text} -> {target}" + _clauses(actions, emit_text))
            d.timer(
                state,
                TimerExpectation(
                    f"{key}/end",
                    end_ms,
                    "escalation_end",
                    target,
                    actions,
                    emits,
                    None,
                    label,
                    None,
                ),
            )
        draft.lines.append(f"escalate {name} {{" if name is not None else "escalate {")
        draft.lines.extend("  " + line for line in body)
        draft.lines.append("}")
        d.escalations[key] = tuple(step_ms)


def _draw_event(d: _Draft, event: str, taken: set[str]) -> tuple[str, tuple[FieldExpectation, ...]]:
    """`event E "doc" { field: type?, ... }` and the payload fields it declares. An event that
    is emitted (without arguments) has only optional fields, named unlike any field in `taken`,
    so that no required field goes unsupplied and no same-named causing field of another
    type fills one (E141, E143)."""
    draw = d.draw
    written: list[str] = []
    expected: list[FieldExpectation] = []
    emitted = event in d.emitted
    names = (
        snake_names("field").filter(lambda n: n not in taken) if emitted else snake_names("field")
    )
    for name in draw(st.lists(names, max_size=4, unique=True)):
        taken.add(name)
        kind = draw(st.sampled_from(FIELD_KINDS))
        optional = emitted or draw(st.booleans())
        literals: tuple[str, ...] = ()
        type_text = kind
        if kind == "enum":
            literals = tuple(
                draw(st.lists(snake_names("field") | any_text, min_size=1, max_size=3, unique=True))
            )
            type_text = f"enum({', '.join(_literal_text(v) for v in literals)})"
        doc = draw(st.none() | any_text)
        written.append(
            f"{name}: {type_text}"
            + ("?" if optional else "")
            + (f" {quote(doc)}" if doc is not None else "")
        )
        expected.append(FieldExpectation(name, kind, literals, optional))
    doc = draw(st.none() | any_text)
    braces: bool = draw(st.booleans())
    body = " { " + ", ".join(written) + " }" if written or braces else ""
    head = f"  event {event}" + (f" {quote(doc)}" if doc is not None else "")
    return head + body, tuple(expected)


def _literal_text(value: str) -> str:
    bare = value.isascii() and value.isidentifier() and value not in GRAMMAR_WORDS
    return value if bare else quote(value)


@st.composite
def machine_cases(draw: st.DrawFn) -> MachineCase:
    """A random machine that `autonomic check` accepts without errors (warnings allowed)."""
    name = draw(camel_names("machine"))
    doc = draw(st.none() | any_text)
    state_names = draw(st.lists(camel_names("state"), min_size=2, max_size=7, unique=True))
    plain_events = draw(st.lists(camel_names("event"), min_size=1, max_size=5, unique=True))
    retry_events = draw(
        st.lists(
            camel_names("event").filter(lambda n: n not in plain_events), max_size=2, unique=True
        )
    )
    initial = state_names[0]
    finals = draw(st.sets(st.sampled_from(state_names[1:]), max_size=2))
    d = _Draft(
        draw=draw,
        name=name,
        state_names=state_names,
        events=plain_events + retry_events,
        action_pool=draw(st.lists(snake_names("action"), min_size=1, max_size=4, unique=True)),
        guard_pool=draw(st.lists(snake_names("guard"), min_size=1, max_size=4, unique=True)),
        states={s: _StateDraft(s, s == initial, s in finals) for s in state_names},
    )
    for draft in d.states.values():
        draft.doc = draw(st.none() | any_text)
    active = [s for s in state_names if s not in finals]
    # Ladders first: the states they move may not handle or ignore the ladder's event.
    for index, event in enumerate(retry_events):
        _draw_retry_ladder(d, f"Retry{name}{index}", event, active)
    for state in active:
        _draw_transitions_and_ignores(d, state)
        _draw_timers(d, state)
        _draw_escalations(d, state)
    # Events that are not emitted first: the emitted ones avoid their field names.
    taken: set[str] = set()
    drawn = {
        event: _draw_event(d, event, taken)
        for event in sorted(d.events, key=lambda e: e in d.emitted)
    }
    events = [drawn[event] for event in d.events]

    order = draw(st.permutations(state_names))  # the initial state need not come first
    lines = [f"machine {name}" + (f" {quote(doc)}" if doc is not None else "") + " {"]
    lines.extend(text for text, _ in events)
    for state in order:
        draft = d.states[state]
        flags = ("initial " if draft.initial else "") + ("final " if draft.final else "")
        head = f"  {flags}state {state}" + (f" {quote(draft.doc)}" if draft.doc is not None else "")
        if draft.lines:
            lines += [head + " {", *("    " + line for line in draft.lines), "  }"]
        else:
            lines.append(head)
    lines += [*d.retry_lines, "}"]
    return MachineCase(
        text="\n".join(lines) + "\n",
        name=name,
        doc=doc,
        states=tuple(order),
        events=tuple(d.events),
        initial=initial,
        finals=frozenset(finals),
        transitions=d.transitions,
        timers={s: frozenset(t) for s, t in d.timers.items() if t},
        ignored=d.ignored,
        fields={event: fields for event, (_, fields) in zip(d.events, events, strict=True)},
        guards=frozenset(d.guards),
        actions=frozenset(d.actions_used),
        retries=d.retries,
        escalations=d.escalations,
    )


# ---------------------------------------------------------------- importing generated code

_loaded = itertools.count()


def load_module(source: str, directory: Path, stem: str = "generated") -> ModuleType:
    """Writes `source` to a file and imports it by path under a fresh module name."""
    path = directory / f"{stem}.py"
    path.write_text(source, encoding="utf-8")
    return import_path(path)


def import_path(path: Path) -> ModuleType:
    """Imports a generated module from its file, as the runtime would, without keeping it in
    sys.modules (every test gets a fresh copy)."""
    module_name = f"_autonomic_test_{path.stem}_{next(_loaded)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[module_name]
    return module
