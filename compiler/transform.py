"""Parse tree -> IR: one method per grammar rule builds the frozen model, bottom up."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

from lark import Token, Tree
from lark.tree import Meta

from . import model as m
from .errors import CODES, Diagnostic, SourceSpan, did_you_mean, fail
from .model import construct

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_CODE = re.compile(r"[EW][0-9]{3}")


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
    """Builds IR nodes; `path` and `sha256` are set before each parse.

    Like a lark `Transformer` with `v_args(meta=True)`: the method named after a rule gets the
    tree's meta and its already-built children. Dispatch is done here because lark's per-call
    wrappers cost a fifth of building a large machine."""

    def __init__(self) -> None:
        self.path = "<input>"
        self.sha256 = ""
        self.diagnostics: list[Diagnostic] = []
        self._rules: dict[str, Callable[[Meta, list[Any]], Any]] = {}

    def transform(self, tree: Tree[Token]) -> Any:
        children = [
            self.transform(child) if isinstance(child, Tree) else child for child in tree.children
        ]
        rule = self._rules.get(tree.data)
        if rule is None:
            rule = self._rules[tree.data] = getattr(self, tree.data)
        return rule(tree.meta, children)

    # ------------------------------------------------------------ helpers
    def _span(self, meta: Meta) -> SourceSpan:
        if getattr(meta, "empty", True):
            return SourceSpan.point(self.path)
        return construct(
            SourceSpan,
            path=self.path,
            line=meta.line,
            column=meta.column,
            end_line=meta.end_line,
            end_column=meta.end_column,
        )

    def _tspan(self, tok: Token) -> SourceSpan:
        return construct(
            SourceSpan,
            path=self.path,
            line=tok.line or 1,
            column=tok.column or 1,
            end_line=tok.end_line or tok.line or 1,
            end_column=tok.end_column or (tok.column or 1) + 1,
        )

    def _name(self, tok: Token) -> m.Name:
        return construct(m.Name, span=self._tspan(tok), value=str(tok))

    def _duration(self, tok: Token) -> m.Duration:
        match = _DURATION.fullmatch(str(tok))
        assert match is not None  # the lexer only produces well-formed durations
        millis = int(match.group(1)) * _UNITS[match.group(2)]
        return construct(m.Duration, span=self._tspan(tok), millis=millis, text=str(tok))

    @staticmethod
    def _split(children: list[Any]) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """Annotations first, then bare tokens/nodes, clauses by kind."""
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
    def annotation(self, meta: Meta, children: list[Token]) -> m.Suppression:
        code_tok, reason_tok = children
        span = self._span(meta)
        code, reason = str(code_tok), unquote(reason_tok)
        if not _CODE.fullmatch(code) or code not in CODES:
            self.diagnostics.append(
                fail(
                    "E005",
                    f"'{code}' is not a diagnostic code",
                    self._tspan(code_tok),
                    "write a code such as W201, as printed by `autonomic check`",
                )
            )
        if not reason.strip():
            self.diagnostics.append(
                fail(
                    "E005",
                    "a suppression must give a reason",
                    self._tspan(reason_tok),
                    f'write @allow({code}, "why this is intended")',
                )
            )
        return construct(m.Suppression, span=span, code=code, reason=reason)

    def doc(self, meta: Meta, children: list[Token]) -> _Clause:
        return _Clause("doc", unquote(children[0]))

    def actions(self, meta: Meta, children: list[Token]) -> _Clause:
        return _Clause("actions", tuple(self._name(t) for t in children))

    def emits(self, meta: Meta, children: list[m.EventRef]) -> _Clause:
        return _Clause("emits", tuple(children))

    def event_ref(self, meta: Meta, children: list[Token]) -> m.EventRef:
        span = self._span(meta)
        if len(children) == 2:
            return construct(
                m.EventRef,
                span=span,
                machine=self._name(children[0]),
                event=self._name(children[1]),
            )
        return construct(m.EventRef, span=span, machine=None, event=self._name(children[0]))

    # ------------------------------------------------------------ events
    def literal(self, meta: Meta, children: list[Token]) -> m.Name:
        tok = children[0]
        value = unquote(tok) if tok.type == "STRING" else str(tok)
        return construct(m.Name, span=self._tspan(tok), value=value)

    def simple_type(self, meta: Meta, children: list[Token]) -> m.FieldType | Token:
        return children[0]  # validated in `field`, which knows about `?`

    def enum_type(self, meta: Meta, children: list[m.Name]) -> m.FieldType:
        return construct(
            m.FieldType,
            span=self._span(meta),
            kind="enum",
            literals=tuple(children),
            optional=False,
        )

    def field(self, meta: Meta, children: list[Any]) -> m.Field:
        _, rest, clauses = self._split(children)
        name_tok, type_ref = rest[0], rest[1]
        optional = any(isinstance(c, Token) and c.type == "OPTIONAL" for c in rest[2:])
        if isinstance(type_ref, Token):
            kind = str(type_ref)
            span = self._tspan(type_ref)
            if kind not in m.FIELD_KINDS:
                self.diagnostics.append(
                    fail(
                        "E114",
                        f"unknown payload type '{kind}'",
                        span,
                        did_you_mean(kind, m.FIELD_KINDS)
                        or "types are str, int, decimal, bool, datetime, enum(a, b, ...)",
                    )
                )
                kind = "str"
            ftype = construct(
                m.FieldType, span=span, kind=cast(m.FieldKind, kind), literals=(), optional=optional
            )
        else:
            ftype = type_ref.model_copy(update={"optional": optional})
        return construct(
            m.Field,
            span=self._span(meta),
            name=self._name(name_tok),
            type=ftype,
            doc=clauses.get("doc"),
        )

    def event_body(self, meta: Meta, children: list[m.Field]) -> _Clause:
        return _Clause("fields", tuple(children))

    def event_decl(self, meta: Meta, children: list[Any]) -> m.Event:
        notes, rest, clauses = self._split(children)
        return construct(
            m.Event,
            span=self._span(meta),
            name=self._name(rest[0]),
            doc=clauses.get("doc"),
            fields=clauses.get("fields", ()),
            suppressions=tuple(notes),
        )

    # ------------------------------------------------------------ states
    def state_flag(self, meta: Meta, children: list[Token]) -> _Clause:
        return _Clause("flag:" + str(children[0]), True)

    def when_guard(self, meta: Meta, children: list[Token]) -> _Clause:
        return _Clause(
            "guard", construct(m.Guard, span=self._span(meta), name=self._name(children[0]))
        )

    def else_guard(self, meta: Meta, children: list[Token]) -> _Clause:
        return _Clause("guard", construct(m.Guard, span=self._span(meta), name=None))

    def transition(self, meta: Meta, children: list[Any]) -> m.Transition:
        notes, rest, clauses = self._split(children)
        return construct(
            m.Transition,
            span=self._span(meta),
            event=self._name(rest[0]),
            target=self._name(rest[1]),
            guard=clauses.get("guard"),
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
            suppressions=tuple(notes),
        )

    def timer(self, meta: Meta, children: list[Any]) -> m.Timer:
        notes, rest, clauses = self._split(children)
        target = self._name(rest[1]) if len(rest) > 1 else None
        return construct(
            m.Timer,
            span=self._span(meta),
            after=self._duration(rest[0]),
            target=target,
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
            suppressions=tuple(notes),
        )

    def ignore(self, meta: Meta, children: list[Any]) -> m.Ignore:
        notes, rest, _ = self._split(children)
        return construct(
            m.Ignore,
            span=self._span(meta),
            events=tuple(self._name(t) for t in rest),
            suppressions=tuple(notes),
        )

    def escalation_step(self, meta: Meta, children: list[Any]) -> m.EscalationStep:
        _, rest, clauses = self._split(children)
        after, kind, recipient = rest[0], rest[1], rest[2]
        within = self._duration(rest[3]) if len(rest) > 3 else None
        return construct(
            m.EscalationStep,
            span=self._span(meta),
            after=self._duration(after),
            recipient_kind="queue" if str(kind) == "queue" else "role",
            recipient=self._name(recipient),
            within=within,
            message=clauses.get("doc"),
        )

    def escalation_end(self, meta: Meta, children: list[Any]) -> m.EscalationEnd:
        _, rest, clauses = self._split(children)
        return construct(
            m.EscalationEnd,
            span=self._span(meta),
            after=self._duration(rest[0]),
            target=self._name(rest[1]),
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
        )

    def escalation(self, meta: Meta, children: list[Any]) -> m.Escalation:
        notes, rest, _ = self._split(children)
        name = self._name(rest[0]) if rest and isinstance(rest[0], Token) else None
        steps = tuple(c for c in rest if isinstance(c, m.EscalationStep))
        ends = [c for c in rest if isinstance(c, m.EscalationEnd)]
        return construct(
            m.Escalation,
            span=self._span(meta),
            name=name,
            steps=steps,
            end=ends[0] if ends else None,
            suppressions=tuple(notes),
        )

    def state_body(self, meta: Meta, children: list[Any]) -> _Clause:
        return _Clause("body", children)

    def state_decl(self, meta: Meta, children: list[Any]) -> m.State:
        notes, rest, clauses = self._split(children)
        body: list[Any] = clauses.get("body", [])
        return construct(
            m.State,
            span=self._span(meta),
            name=self._name(rest[0]),
            doc=clauses.get("doc"),
            initial="flag:initial" in clauses,
            final="flag:final" in clauses,
            perpetual="flag:perpetual" in clauses,
            transitions=tuple(c for c in body if isinstance(c, m.Transition)),
            timers=tuple(c for c in body if isinstance(c, m.Timer)),
            ignores=tuple(c for c in body if isinstance(c, m.Ignore)),
            escalations=tuple(c for c in body if isinstance(c, m.Escalation)),
            suppressions=tuple(notes),
        )

    # ------------------------------------------------------------ retry ladders
    def retry_entry(self, meta: Meta, children: list[Token]) -> _Clause:
        return _Clause("entry", tuple(self._name(t) for t in children))

    def retry_step(self, meta: Meta, children: list[Any]) -> m.RetryStep:
        _, rest, clauses = self._split(children)
        return construct(
            m.RetryStep,
            span=self._span(meta),
            state=self._name(rest[0]),
            after=self._duration(rest[1]),
            actions=clauses.get("actions", ()),
        )

    def retry_end(self, meta: Meta, children: list[Any]) -> m.RetryEnd:
        _, rest, clauses = self._split(children)
        return construct(
            m.RetryEnd,
            span=self._span(meta),
            target=self._name(rest[0]),
            actions=clauses.get("actions", ()),
            emits=clauses.get("emits", ()),
        )

    def retry_decl(self, meta: Meta, children: list[Any]) -> m.RetryLadder:
        notes, rest, clauses = self._split(children)
        ends = [c for c in rest if isinstance(c, m.RetryEnd)]
        return construct(
            m.RetryLadder,
            span=self._span(meta),
            name=self._name(rest[0]),
            event=self._name(rest[1]),
            entry_states=clauses.get("entry", ()),
            steps=tuple(c for c in rest if isinstance(c, m.RetryStep)),
            exhausted=ends[0] if ends else None,
            suppressions=tuple(notes),
        )

    # ------------------------------------------------------------ machine
    def machine_flag(self, meta: Meta, children: list[Token]) -> _Clause:
        return _Clause("flag:perpetual", True)

    def machine(self, meta: Meta, children: list[Any]) -> m.Machine:
        notes, rest, clauses = self._split(children)
        members = rest[1:]
        return construct(
            m.Machine,
            span=self._span(meta),
            name=self._name(rest[0]),
            doc=clauses.get("doc"),
            perpetual="flag:perpetual" in clauses,
            events=tuple(c for c in members if isinstance(c, m.Event)),
            states=tuple(c for c in members if isinstance(c, m.State)),
            retries=tuple(c for c in members if isinstance(c, m.RetryLadder)),
            suppressions=tuple(notes),
            path=self.path,
            source_sha256=self.sha256,
        )

    def start(self, meta: Meta, children: list[m.Machine]) -> list[m.Machine]:
        return list(children)
