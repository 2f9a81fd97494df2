"""Parse -> IR: one method per grammar rule builds the frozen model as the parser reduces."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

from lark import Token, Tree
from lark.tree import Meta

from . import model as m
from .errors import CODES, Diagnostic, SourceSpan, did_you_mean, fail
from .model import construct, construct_name, construct_span

_UNITS = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_UNIT_ORDER = {unit: rank for rank, unit in enumerate(_UNITS)}
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")
# The longest duration a machine or flow may write: 100 years. The runtime keeps instants and
# delays as milliseconds in 64-bit integers (SQLite INTEGER, PostgreSQL BIGINT), and a timer is
# due at now plus sums and multiples of durations (ladder steps, up to 10000 repeats): 100
# years leaves room for all of them, and no deadline of a business process is longer.
MAX_DURATION_DAYS = 36_500
MAX_DURATION_MS = MAX_DURATION_DAYS * _UNITS["d"]
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_CODE = re.compile(r"[EW][0-9]{3}")

# Rules whose node carries no span of its own: the parser need not compute one for them.
SPANLESS_RULES = frozenset(
    {
        "start",
        "doc",
        "actions",
        "emits",
        "emit_args",
        "literal",
        "simple_type",
        "event_body",
        "state_flag",
        "state_body",
        "retry_entry",
        "machine_flag",
        "flow_on",
        "flow_within",
        "flow_quorum",
        "flow_input",
        "await_unless",
        "bound_least",
        "bound_most",
        "compensate_clause",
        "irreversible_clause",
        "delay",
        "attempt_cap",
        "retry_attempt",
        "group_scope",
        "creation_scope",
        "emit_to",
        "emit_refused",
        "keeps",
    }
)

# The grammar's rules and aliases: ModelBuilder has a method of each name.
RULES = (
    "start",
    "machine",
    "machine_flag",
    "annotation",
    "doc",
    "event_decl",
    "event_body",
    "field",
    "input_field",
    "bound_least",
    "bound_most",
    "simple_type",
    "enum_type",
    "literal",
    "state_decl",
    "state_flag",
    "state_body",
    "transition",
    "when_guard",
    "else_guard",
    "actions",
    "emits",
    "event_ref",
    "emit_args",
    "emit_arg",
    "arg_name",
    "arg_string",
    "timer",
    "ignore",
    "escalation",
    "escalation_step",
    "escalation_end",
    "retry_decl",
    "retry_entry",
    "retry_step",
    "retry_end",
    "policy_decl",
    "policy_retry",
    "policy_breaker",
    "policy_fallback",
    "policy_bulkhead",
    "flow",
    "flow_on",
    "flow_within",
    "flow_quorum",
    "flow_input",
    "flow_step",
    "send_action",
    "await_action",
    "await_unless",
    "compute_action",
    "compensate_clause",
    "irreversible_clause",
    "flow_branch",
    "delay",
    "field_delay",
    "setting_delay",
    "entry",
    "repeat",
    "attempt_cap",
    "retry_attempt",
    "group_decl",
    "setting_decl",
    "machine_timer",
    "group_scope",
    "creation_scope",
    "emit_to",
    "emit_refused",
    "keeps",
    "keep_item",
    "data_decl",
    "always_decl",
)

Rule = Callable[[SourceSpan | None, list[Any]], Any]
Terminal = Callable[[str, int, int], Any]


def unquote(token: str) -> str:
    body = token[1:-1]
    if "\\" not in body:
        return body
    return re.sub(r"\\(.)", lambda mt: _ESCAPES[mt.group(1)], body)


class _Clause:
    """A parsed optional clause, tagged so that positional children can be sorted out."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: Any) -> None:
        self.kind = kind
        self.value = value


class ModelBuilder:
    """Builds the IR of one file, bottom up, as the parser reduces.

    Terminals come first: a NAME becomes an `m.Name`, a STRING an `m.Name` holding the
    unquoted text, a DURATION an `m.Duration`, each with the span of its token; other kept
    terminals (markers such as `initial` or `?`) stay plain strings. Then the method named
    after a rule gets the rule's span (None for SPANLESS_RULES) and its built children,
    as a lark `Transformer` with `v_args(meta=True)` would, minus lark's per-call wrappers.
    """

    def __init__(self, path: str = "<input>", sha256: str = "") -> None:
        self.path = path
        self.sha256 = sha256
        self.diagnostics: list[Diagnostic] = []
        self._texts: dict[str, str] = {}

    # ------------------------------------------------------------ what the parser calls
    def terminals(self) -> dict[str, Terminal]:
        """Builders of the terminals that become model nodes, by terminal name."""
        return {
            "NAME": self.name,
            "STRING": self.string,
            "DURATION": self.duration,
            "NUMBER": self.number,
            "CONTEXT_REF": self.context_ref,
        }

    def rules(self) -> dict[str, Rule]:
        """The rule methods, by rule name (or alias)."""
        return {name: getattr(self, name) for name in RULES}

    def span(self, line: int, column: int, end_line: int, end_column: int) -> SourceSpan:
        return construct_span(self.path, line, column, end_line, end_column)

    def name(self, text: str, line: int, column: int) -> m.Name:
        # One string object per distinct name: later sets and dicts of names compare them
        # by identity and hash each once.
        text = self._texts.setdefault(text, text)
        return construct_name(text, self.path, line, column, column + len(text))

    def string(self, text: str, line: int, column: int) -> m.Name:
        return construct_name(unquote(text), self.path, line, column, column + len(text))

    def duration(self, text: str, line: int, column: int) -> m.Duration:
        span = self.span(line, column, line, column + len(text))
        millis, rank = 0, -1
        for part in _DURATION_PART.finditer(text):  # the lexer only produces number-unit parts
            count, unit = part.groups()
            millis += int(count) * _UNITS[unit]
            if _UNIT_ORDER[unit] <= rank:
                self.diagnostics.append(
                    fail(
                        "E118",
                        f"duration '{text}' repeats a unit or puts a smaller unit first",
                        span,
                        "write each unit once, largest first, e.g. 1d12h or 2h30m",
                    )
                )
                break
            rank = _UNIT_ORDER[unit]
        if millis > MAX_DURATION_MS:
            self.diagnostics.append(
                fail(
                    "E124",
                    f"duration '{text}' is longer than {MAX_DURATION_DAYS}d (100 years)",
                    span,
                    f"write at most {MAX_DURATION_DAYS}d: times are 64-bit milliseconds; a "
                    "timer that should never fire is no timer, leave it out",
                )
            )
        return construct(m.Duration, span=span, millis=millis, text=text)

    def number(self, text: str, line: int, column: int) -> m.EmitValue:
        span = self.span(line, column, line, column + len(text))
        return construct(m.EmitValue, span=span, kind="number", text=text)

    def context_ref(self, text: str, line: int, column: int) -> m.EmitValue:
        span = self.span(line, column, line, column + len(text))
        return construct(m.EmitValue, span=span, kind="ref", text=text[1:])

    def transform(self, tree: Tree[Token]) -> Any:
        """The same build from a lark parse tree made with propagate_positions."""
        terminals = self.terminals()
        rules = self.rules()

        def build(node: Tree[Token]) -> Any:
            children: list[Any] = []
            for child in node.children:
                if isinstance(child, Tree):
                    children.append(build(child))
                elif child.type in terminals:
                    line, column = child.line or 1, child.column or 1
                    children.append(terminals[child.type](str(child), line, column))
                else:
                    children.append(str(child))
            rule = str(node.data)
            span = None if rule in SPANLESS_RULES else self._meta_span(node.meta)
            return rules[rule](span, children)

        return build(tree)

    def _meta_span(self, meta: Meta) -> SourceSpan:
        if getattr(meta, "empty", True):
            return SourceSpan.point(self.path)
        return self.span(meta.line, meta.column, meta.end_line, meta.end_column)

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _split(children: list[Any]) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """Annotations first, then bare terminals/nodes, clauses by kind."""
        notes: list[Any] = []
        rest: list[Any] = []
        clauses: dict[str, Any] = {}
        for child in children:
            if isinstance(child, m.Suppression):
                notes.append(child)
            elif isinstance(child, _Clause):
                clauses[child.kind] = child.value
            else:
                rest.append(child)
        return notes, rest, clauses

    # ------------------------------------------------------------ shared
    def annotation(self, span: SourceSpan, children: list[m.Name]) -> m.Suppression:
        code_name, reason_name = children
        code, reason = code_name.value, reason_name.value
        if not _CODE.fullmatch(code) or code not in CODES:
            self.diagnostics.append(
                fail(
                    "E005",
                    f"'{code}' is not a diagnostic code",
                    code_name.span,
                    "write a code such as W201, as printed by `autonomic check`",
                )
            )
        if not reason.strip():
            self.diagnostics.append(
                fail(
                    "E005",
                    "a suppression must give a reason",
                    reason_name.span,
                    f'write @allow({code}, "why this is intended")',
                )
            )
        return construct(m.Suppression, span=span, code=code, reason=reason)

    def doc(self, span: None, children: list[m.Name]) -> _Clause:
        return _Clause("doc", children[0].value)

    def actions(self, span: None, children: list[m.Name]) -> _Clause:
        return _Clause("actions", tuple(children))

    def emits(self, span: None, children: list[m.EventRef | _Clause]) -> _Clause:
        refs: list[m.EventRef] = []
        for child in children:
            if isinstance(child, _Clause):  # `to field`, `if refused E` after their emit
                refs[-1] = refs[-1].model_copy(update={child.kind: child.value})
            else:
                refs.append(child)
        return _Clause("emits", tuple(refs))

    def emit_to(self, span: None, children: list[m.Name]) -> _Clause:
        return _Clause("to", children[0])

    def emit_refused(self, span: None, children: list[m.EventRef]) -> _Clause:
        return _Clause("refused", children[0])

    def keeps(self, span: None, children: list[m.Keep]) -> _Clause:
        return _Clause("keeps", tuple(children))

    def keep_item(self, span: SourceSpan, children: list[m.Name]) -> m.Keep:
        return construct(m.Keep, span=span, field=children[0], source=children[-1])

    def event_ref(self, span: SourceSpan, children: list[Any]) -> m.EventRef:
        args: tuple[m.EmitArgument, ...] = ()
        if children and isinstance(children[-1], tuple):
            args = children.pop()
        if len(children) == 2:
            machine, event = children
            return construct(
                m.EventRef,
                span=span,
                machine=machine,
                event=event,
                args=args,
                to=None,
                refused=None,
            )
        return construct(m.EventRef, span=span, machine=None, event=children[0], args=args, to=None)

    def emit_args(self, span: None, children: list[m.EmitArgument]) -> tuple[m.EmitArgument, ...]:
        return tuple(children)

    def emit_arg(self, span: SourceSpan, children: list[Any]) -> m.EmitArgument:
        field, value = children
        return construct(m.EmitArgument, span=span, field=field, value=value)

    def arg_name(self, span: SourceSpan, children: list[m.Name]) -> m.EmitValue:
        """A causing event's field, or the booleans `true` and `false`."""
        name = children[0].value
        kind = "bool" if name in ("true", "false") else "field"
        return construct(m.EmitValue, span=span, kind=kind, text=name)

    def arg_string(self, span: SourceSpan, children: list[m.Name]) -> m.EmitValue:
        return construct(m.EmitValue, span=span, kind="string", text=children[0].value)

    # ------------------------------------------------------------ events
    def literal(self, span: None, children: list[m.Name]) -> m.Name:
        return children[0]

    def simple_type(self, span: None, children: list[m.Name]) -> m.Name:
        return children[0]  # validated in `field`, which knows about `?`

    def enum_type(self, span: SourceSpan, children: list[m.Name]) -> m.FieldType:
        return construct(
            m.FieldType, span=span, kind="enum", literals=tuple(children), optional=False
        )

    def field(self, span: SourceSpan, children: list[Any]) -> m.Field:
        _, rest, clauses = self._split(children)
        name, type_ref = rest[0], rest[1]
        optional = "?" in rest[2:]  # the OPTIONAL marker, the only thing after the type
        if isinstance(type_ref, m.Name):
            kind = type_ref.value
            if kind not in m.FIELD_KINDS:
                self.diagnostics.append(
                    fail(
                        "E114",
                        f"unknown payload type '{kind}'",
                        type_ref.span,
                        did_you_mean(kind, m.FIELD_KINDS)
                        or "types are str, int, decimal, bool, datetime, enum(a, b, ...)",
                    )
                )
                kind = "str"
            ftype = construct(
                m.FieldType,
                span=type_ref.span,
                kind=cast(m.FieldKind, kind),
                literals=(),
                optional=optional,
            )
        else:
            ftype = type_ref.model_copy(update={"optional": optional})
        return construct(m.Field, span=span, name=name, type=ftype, doc=clauses.get("doc"))

    def input_field(self, span: SourceSpan, children: list[Any]) -> m.Field:
        built = self.field(span, children)  # `field` leaves the bound clauses aside
        bounds = {c.kind: c.value for c in children if isinstance(c, _Clause) and c.kind != "doc"}
        return built.model_copy(update=bounds) if bounds else built

    def bound_least(self, span: None, children: list[Any]) -> _Clause:
        return _Clause("at_least", children[0])

    def bound_most(self, span: None, children: list[Any]) -> _Clause:
        return _Clause("at_most", children[0])

    def event_body(self, span: None, children: list[m.Field]) -> _Clause:
        return _Clause("fields", tuple(children))

    def event_decl(self, span: SourceSpan, children: list[Any]) -> m.Event:
        notes, rest, clauses = self._split(children)
        return construct(
            m.Event,
            span=span,
            name=rest[0],
            doc=clauses.get("doc"),
            fields=clauses.get("fields", ()),
            suppressions=tuple(notes),
        )

    # ------------------------------------------------------------ states
    def state_flag(self, span: None, children: list[str]) -> _Clause:
        return _Clause("flag:" + children[0], True)

    def when_guard(self, span: SourceSpan, children: list[m.Name]) -> _Clause:
        return _Clause("guard", construct(m.Guard, span=span, name=children[0]))

    def else_guard(self, span: SourceSpan, children: list[Any]) -> _Clause:
        return _Clause("guard", construct(m.Guard, span=span, name=None))

    def transition(self, span: SourceSpan, children: list[Any]) -> m.Transition:
        if len(children) == 2:  # `on Event -> Target` and nothing more: most rows
            event, target = children
            return construct(
                m.Transition,
                span=span,
                event=event,
                target=target,
                guard=None,
                actions=(),
                keeps=(),
                emits=(),
                suppressions=(),
            )
        notes, rest, clauses = self._split(children)
        return construct(
            m.Transition,
            span=span,
            event=rest[0],
            target=rest[1],
            guard=clauses.get("guard"),
            actions=clauses.get("actions", ()),
            keeps=clauses.get("keeps", ()),
            emits=clauses.get("emits", ()),
            suppressions=tuple(notes),
        )

    def delay(self, span: None, children: list[m.Duration]) -> m.Duration:
        return children[0]

    def field_delay(self, span: SourceSpan, children: list[m.Name]) -> m.Delay:
        return construct(m.Delay, span=span, kind="field", name=children[0])

    def setting_delay(self, span: SourceSpan, children: list[m.Name]) -> m.Delay:
        return construct(m.Delay, span=span, kind="setting", name=children[0])

    @staticmethod
    def _after(delay: m.Duration | m.Delay) -> tuple[m.Duration, m.Delay | None]:
        """A timer's `after` and `delay` fields: a data delay has no millis of its own."""
        if isinstance(delay, m.Duration):
            return delay, None
        source = "event" if delay.kind == "field" else "setting"
        text = f"{source}.{delay.name.value}"
        return construct(m.Duration, span=delay.span, millis=0, text=text), delay

    def timer(self, span: SourceSpan, children: list[Any]) -> m.Timer:
        notes, rest, clauses = self._split(children)
        after, delay = self._after(rest[0])
        return construct(
            m.Timer,
            span=span,
            after=after,
            delay=delay,
            target=rest[1] if len(rest) > 1 else None,
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
            suppressions=tuple(notes),
        )

    def entry(self, span: SourceSpan, children: list[Any]) -> m.Entry:
        notes, _, clauses = self._split(children)
        return construct(
            m.Entry,
            span=span,
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
            suppressions=tuple(notes),
        )

    def _count(self, value: m.EmitValue, what: str) -> int:
        """A repeat count or attempt cap: a whole number of at least 1 (E119 otherwise)."""
        text = value.text
        if not text.isdigit() or int(text) < 1 or int(text) > 10_000:
            self.diagnostics.append(
                fail(
                    "E119",
                    f"{what} must be a whole number from 1 to 10000, not {text}",
                    value.span,
                    f"write a whole {what} such as 3",
                )
            )
            return 1
        return int(text)

    def repeat(self, span: SourceSpan, children: list[Any]) -> m.Repeat:
        count, every = children
        return construct(
            m.Repeat,
            span=span,
            count=self._count(count, "repeat count"),
            count_span=count.span,
            every=every,
        )

    def ignore(self, span: SourceSpan, children: list[Any]) -> m.Ignore:
        notes, rest, _ = self._split(children)
        return construct(m.Ignore, span=span, events=tuple(rest), suppressions=tuple(notes))

    def escalation_step(self, span: SourceSpan, children: list[Any]) -> m.EscalationStep:
        _, rest, clauses = self._split(children)
        repeats = [c for c in rest if isinstance(c, m.Repeat)]
        rest = [c for c in rest if not isinstance(c, m.Repeat)]
        after, kind, recipient = rest[0], rest[1], rest[2]
        return construct(
            m.EscalationStep,
            span=span,
            after=after,
            recipient_kind="queue" if kind == "queue" else "role",
            recipient=recipient,
            within=rest[3] if len(rest) > 3 else None,
            message=clauses.get("doc"),
            repeat=repeats[0] if repeats else None,
        )

    def escalation_end(self, span: SourceSpan, children: list[Any]) -> m.EscalationEnd:
        _, rest, clauses = self._split(children)
        return construct(
            m.EscalationEnd,
            span=span,
            after=rest[0],
            target=rest[1],
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
        )

    def escalation(self, span: SourceSpan, children: list[Any]) -> m.Escalation:
        notes, rest, _ = self._split(children)
        name = rest[0] if rest and isinstance(rest[0], m.Name) else None
        steps = tuple(c for c in rest if isinstance(c, m.EscalationStep))
        ends = [c for c in rest if isinstance(c, m.EscalationEnd)]
        return construct(
            m.Escalation,
            span=span,
            name=name,
            steps=steps,
            end=ends[0] if ends else None,
            suppressions=tuple(notes),
        )

    def state_body(self, span: None, children: list[Any]) -> _Clause:
        return _Clause("body", children)

    def state_decl(self, span: SourceSpan, children: list[Any]) -> m.State:
        notes, rest, clauses = self._split(children)
        members: dict[type, list[Any]] = {
            m.Transition: [],
            m.Timer: [],
            m.Ignore: [],
            m.Escalation: [],
            m.Entry: [],
        }
        for member in clauses.get("body", ()):
            members[type(member)].append(member)
        return construct(
            m.State,
            span=span,
            name=rest[0],
            doc=clauses.get("doc"),
            initial="flag:initial" in clauses,
            final="flag:final" in clauses,
            perpetual="flag:perpetual" in clauses,
            resting="flag:resting" in clauses,
            transitions=tuple(members[m.Transition]),
            timers=tuple(members[m.Timer]),
            ignores=tuple(members[m.Ignore]),
            escalations=tuple(members[m.Escalation]),
            entries=tuple(members[m.Entry]),
            suppressions=tuple(notes),
        )

    # ------------------------------------------------------------ retry ladders
    def retry_entry(self, span: None, children: list[m.Name]) -> _Clause:
        return _Clause("entry", tuple(children))

    def retry_attempt(self, span: None, children: list[Any]) -> _Clause:
        return _Clause("attempt", (children[0], children[1]))

    def attempt_cap(self, span: None, children: list[m.EmitValue]) -> _Clause:
        return _Clause("cap", (self._count(children[0], "attempt cap"), children[0].span))

    def retry_step(self, span: SourceSpan, children: list[Any]) -> m.RetryStep:
        _, rest, clauses = self._split(children)
        attempt, timeout = clauses.get("attempt", (None, None))
        repeats = [c for c in rest if isinstance(c, m.Repeat)]
        return construct(
            m.RetryStep,
            span=span,
            state=rest[0],
            after=rest[1],
            actions=clauses.get("actions", ()),
            attempt=attempt,
            timeout=timeout,
            repeat=repeats[0] if repeats else None,
        )

    def retry_end(self, span: SourceSpan, children: list[Any]) -> m.RetryEnd:
        _, rest, clauses = self._split(children)
        return construct(
            m.RetryEnd,
            span=span,
            target=rest[0],
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
        )

    def retry_decl(self, span: SourceSpan, children: list[Any]) -> m.RetryLadder:
        notes, rest, clauses = self._split(children)
        ends = [c for c in rest if isinstance(c, m.RetryEnd)]
        cap, cap_span = clauses.get("cap", (None, None))
        return construct(
            m.RetryLadder,
            span=span,
            name=rest[0],
            event=rest[1],
            entry_states=clauses.get("entry", ()),
            steps=tuple(c for c in rest if isinstance(c, m.RetryStep)),
            exhausted=ends[0] if ends else None,
            cap=cap,
            cap_span=cap_span,
            suppressions=tuple(notes),
        )

    # ------------------------------------------------------------ groups, settings, timers
    def group_decl(self, span: SourceSpan, children: list[Any]) -> m.Group:
        notes, rest, clauses = self._split(children)
        return construct(
            m.Group,
            span=span,
            name=rest[0],
            doc=clauses.get("doc"),
            states=tuple(rest[1:]),
            suppressions=tuple(notes),
        )

    def setting_decl(self, span: SourceSpan, children: list[Any]) -> m.Setting:
        notes, rest, clauses = self._split(children)
        return construct(
            m.Setting,
            span=span,
            name=rest[0],
            doc=clauses.get("doc"),
            low=rest[1],
            high=rest[2],
            suppressions=tuple(notes),
        )

    def always_decl(self, span: SourceSpan, children: list[Any]) -> m.AlwaysAccept:
        _, rest, clauses = self._split(children)
        return construct(
            m.AlwaysAccept,
            span=span,
            event=rest[0],
            exceptions=tuple(rest[1:]),
            doc=clauses.get("doc"),
        )

    def data_decl(self, span: SourceSpan, children: list[Any]) -> _Clause:
        _, rest, _ = self._split(children)
        return _Clause("data", tuple(c for c in rest if isinstance(c, m.Field)))

    def group_scope(self, span: None, children: list[m.Name]) -> _Clause:
        return _Clause("scope", ("group", children[0]))

    def creation_scope(self, span: None, children: list[Any]) -> _Clause:
        return _Clause("scope", ("creation", None))

    def machine_timer(self, span: SourceSpan, children: list[Any]) -> m.MachineTimer:
        notes, rest, clauses = self._split(children)
        after, delay = self._after(rest[0])
        scope, group = clauses["scope"]
        return construct(
            m.MachineTimer,
            span=span,
            after=after,
            delay=delay,
            scope=scope,
            group=group,
            target=rest[1],
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
            suppressions=tuple(notes),
        )

    # ------------------------------------------------------------ resilience policies
    def policy_retry(self, span: SourceSpan, children: list[Any]) -> m.PolicyRetry:
        # children: the attempts, then the backoff kind (a plain string) and its `max`.
        maxima = [c for c in children if isinstance(c, m.Duration)]
        kinds = [c for c in children if isinstance(c, str)]
        return construct(
            m.PolicyRetry,
            span=span,
            attempts=children[0],
            backoff=kinds[0] if kinds else "jitter",
            backoff_max=maxima[0] if maxima else None,
        )

    def policy_breaker(self, span: SourceSpan, children: list[Any]) -> m.PolicyBreaker:
        return construct(m.PolicyBreaker, span=span, tolerated=children[0], cooldown=children[1])

    def policy_fallback(self, span: SourceSpan, children: list[Any]) -> m.PolicyFallback:
        return construct(m.PolicyFallback, span=span, action=children[0])

    def policy_bulkhead(self, span: SourceSpan, children: list[Any]) -> m.PolicyBulkhead:
        return construct(m.PolicyBulkhead, span=span, limit=children[0])

    def policy_decl(self, span: SourceSpan, children: list[Any]) -> m.Policy:
        notes, rest, clauses = self._split(children)
        names = [c for c in rest if isinstance(c, m.Name)]
        return construct(
            m.Policy,
            span=span,
            name=names[0],
            actions=tuple(names[1:]),
            doc=clauses.get("doc"),
            clauses=tuple(c for c in rest if not isinstance(c, m.Name)),
            suppressions=tuple(notes),
        )

    # ------------------------------------------------------------ machine
    def machine_flag(self, span: None, children: list[str]) -> _Clause:
        return _Clause("flag:perpetual", True)

    def machine(self, span: SourceSpan, children: list[Any]) -> m.Machine:
        # `data` blocks arrive as clauses: several are joined, in order.
        data: tuple[m.Field, ...] = ()
        kept = [c for c in children if isinstance(c, _Clause) and c.kind == "data"]
        if kept:
            data = tuple(f for c in kept for f in c.value)
            children = [c for c in children if not (isinstance(c, _Clause) and c.kind == "data")]
        notes, rest, clauses = self._split(children)
        members = rest[1:]
        return construct(
            m.Machine,
            span=span,
            name=rest[0],
            doc=clauses.get("doc"),
            perpetual="flag:perpetual" in clauses,
            events=tuple(c for c in members if isinstance(c, m.Event)),
            states=tuple(c for c in members if isinstance(c, m.State)),
            retries=tuple(c for c in members if isinstance(c, m.RetryLadder)),
            policies=tuple(c for c in members if isinstance(c, m.Policy)),
            groups=tuple(c for c in members if isinstance(c, m.Group)),
            settings=tuple(c for c in members if isinstance(c, m.Setting)),
            machine_timers=tuple(c for c in members if isinstance(c, m.MachineTimer)),
            data=data,
            always=tuple(c for c in members if isinstance(c, m.AlwaysAccept)),
            suppressions=tuple(notes),
            path=self.path,
            source_sha256=self.sha256,
        )

    # ------------------------------------------------------------ flows
    def flow_on(self, span: None, children: list[m.Name]) -> _Clause:
        return _Clause("on", children[0])

    def flow_within(self, span: None, children: list[m.Duration]) -> _Clause:
        return _Clause("within", children[0])

    def flow_quorum(self, span: None, children: list[m.EmitValue]) -> _Clause:
        return _Clause("quorum", children[0])

    def flow_input(self, span: None, children: list[m.Field]) -> _Clause:
        return _Clause("input", tuple(children))

    def send_action(self, span: SourceSpan, children: list[Any]) -> _Clause:
        to = children[1] if len(children) > 1 else None
        return _Clause("action", {"kind": "send", "target": children[0], "to": to})

    def await_action(self, span: SourceSpan, children: list[Any]) -> _Clause:
        within = children.pop() if isinstance(children[-1], m.Duration) else None
        unless = children.pop().value if isinstance(children[-1], _Clause) else ()
        machine, *states = children
        action = {
            "kind": "await",
            "machine": machine,
            "states": tuple(states),
            "unless": unless,
            "within": within,
        }
        return _Clause("action", action)

    def await_unless(self, span: None, children: list[m.Name]) -> _Clause:
        return _Clause("unless", tuple(children))

    def compute_action(self, span: SourceSpan, children: list[m.Name]) -> _Clause:
        return _Clause("action", {"kind": "compute", "function": children[0]})

    def compensate_clause(self, span: None, children: list[m.EventRef]) -> _Clause:
        return _Clause("compensate", children[0])

    def irreversible_clause(self, span: None, children: list[Any]) -> _Clause:
        return _Clause("irreversible", True)

    def flow_step(self, span: SourceSpan, children: list[Any]) -> m.FlowStep:
        notes, rest, clauses = self._split(children)
        return construct(
            m.FlowStep,
            span=span,
            name=rest[0],
            **clauses["action"],
            compensate=clauses.get("compensate"),
            irreversible="irreversible" in clauses,
            doc=clauses.get("doc"),
            suppressions=tuple(notes),
        )

    def flow_branch(self, span: SourceSpan, children: list[Any]) -> m.FlowBranch:
        case, *steps = children
        return construct(m.FlowBranch, span=span, case=case, steps=tuple(steps))

    def flow(self, span: SourceSpan, children: list[Any]) -> m.Flow:
        notes, rest, clauses = self._split(children)
        name, kind, *members = rest
        return construct(
            m.Flow,
            span=span,
            name=name,
            kind=cast(m.FlowKind, kind),
            doc=clauses.get("doc"),
            inputs=clauses.get("input", ()),
            on=clauses.get("on"),
            within=clauses.get("within"),
            quorum=clauses.get("quorum"),
            steps=tuple(c for c in members if isinstance(c, m.FlowStep)),
            branches=tuple(c for c in members if isinstance(c, m.FlowBranch)),
            suppressions=tuple(notes),
            path=self.path,
            source_sha256=self.sha256,
        )

    def start(self, span: None, children: list[Any]) -> list[Any]:
        return list(children)
