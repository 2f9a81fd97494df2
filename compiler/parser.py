"""Text -> IR: reads a machine file safely, parses it with lark (LALR) and builds the model."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.exceptions import VisitError

from .errors import Diagnostic, SourceSpan, fail
from .model import Machine
from .transform import ModelBuilder

MAX_SOURCE_BYTES = 64 * 1024 * 1024

# Friendly names for terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name",
    "STRING": 'a "quoted string"',
    "DURATION": "a duration such as 24h",
    "RECIPIENT_KIND": "'queue' or 'role'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "COLON": "':'",
    "COMMA": "','",
    "DOT": "'.'",
    "QMARK": "'?'",
    "OPTIONAL": "'?'",
    "INITIAL": "'initial'",
    "FINAL": "'final'",
    "PERPETUAL": "'perpetual'",
    "_ARROW": "'->'",
    "_ALLOW": "'@allow'",
    "$END": "end of file",
}

# Known mistakes -> friendly message and hint (lark's match_examples).
_EXAMPLES: dict[tuple[str, str], list[str]] = {
    (
        "a transition needs '->' between the event and the target state",
        "write `on Event -> Target`",
    ): [
        "machine M { state A { on E B } }",
        "machine M { state A { on E => B } }",
        "machine M { state A { on E = B } }",
        "machine M { state A { on E } }",
    ],
    (
        "a duration needs a unit",
        "units are ms, s, m, h, d: write `after 24h -> Target`",
    ): [
        "machine M { state A { after 24 -> B } }",
        "machine M { state A { after -> B } }",
        "machine M { state A { escalate { after 24 notify queue q } } }",
        "machine M { retry R on E { from A step B after 3 } }",
    ],
    (
        "a suppression must give a reason",
        'write @allow(W201, "why this is intended")',
    ): [
        "machine M { @allow(W201) state A }",
        "@allow(W201) machine M { }",
    ],
    (
        "a state marker goes before `state`",
        "write `initial state Name` or `final state Name`",
    ): [
        "machine M { state initial A }",
        "machine M { state final A }",
        "machine M { state A initial }",
        "machine M { state A final }",
    ],
    (
        "an escalation step names whom it notifies",
        "write `after 24h notify queue manager_review_queue within 4h`",
    ): [
        "machine M { state A { escalate { after 24h notify q } } }",
        "machine M { state A { escalate { after 24h q } } }",
    ],
    (
        "the file must start with `machine Name {`",
        "a machine file holds one `machine Name { ... }` block",
    ): [
        "state A",
        "event E",
        "M { }",
        "machine { }",
    ],
    (
        "a payload field is written `name: type`",
        "types are str, int, decimal, bool, datetime, enum(a, b, ...); add ? for optional",
    ): [
        "machine M { event E { amount decimal } }",
        "machine M { event E { amount: } }",
    ],
}


@dataclass
class SourceFile:
    """A machine file as read: its text (None if unreadable) and what went wrong."""

    path: str
    text: str | None
    sha256: str
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def lines(self) -> list[str] | None:
        return None if self.text is None else self.text.splitlines()


def read_source(path: str | Path) -> SourceFile:
    """Reads bytes and decodes strict UTF-8; never raises for bad input."""
    display = str(path)
    p = Path(path)
    try:
        if p.is_dir():
            return _unreadable(display, "is a directory", "pass a .fsm file or a folder of them")
        with p.open("rb") as handle:
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except FileNotFoundError:
        return _unreadable(display, "no such file", "check the path")
    except OSError as exc:
        return _unreadable(display, f"cannot be read ({exc.strerror})", "check its permissions")
    if len(data) > MAX_SOURCE_BYTES:
        return _unreadable(display, "is larger than 64 MiB", "split the machine into smaller files")
    return decode_source(display, data)


def decode_source(display: str, data: bytes) -> SourceFile:
    digest = hashlib.sha256(data).hexdigest()
    if b"\x00" in data:
        line, col = _position_of(data, data.index(b"\x00"))
        diag = fail(
            "E002",
            "file contains NUL bytes: it looks binary, not a machine file",
            SourceSpan.point(display, line, col),
            "machine files are UTF-8 text",
        )
        return SourceFile(display, None, digest, [diag])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _position_of(data, exc.start)
        diag = fail(
            "E002",
            f"invalid UTF-8 (byte 0x{data[exc.start]:02x})",
            SourceSpan.point(display, line, col),
            "save the file as UTF-8",
        )
        return SourceFile(display, None, digest, [diag])
    if text.startswith("\ufeff"):
        text = text[1:]
    return SourceFile(display, text, digest)


def _position_of(data: bytes, offset: int) -> tuple[int, int]:
    before = data[:offset]
    line = before.count(b"\n") + 1
    col = offset - (before.rfind(b"\n") + 1) + 1
    return line, col


def _unreadable(path: str, why: str, hint: str) -> SourceFile:
    return SourceFile(path, None, "", [fail("E003", f"{path} {why}", SourceSpan.point(path), hint)])


@cache
def _grammar() -> str:
    return (
        resources.files("autonomic.compiler")
        .joinpath("grammar/machine.lark")
        .read_text(encoding="utf-8")
    )


_local = threading.local()


def _parser() -> tuple[Lark, ModelBuilder]:
    # One parser per thread: the transformer holds per-parse state.
    cached: tuple[Lark, ModelBuilder] | None = getattr(_local, "parser", None)
    if cached is None:
        builder = ModelBuilder()
        lark = Lark(
            _grammar(),
            parser="lalr",
            lexer="contextual",
            propagate_positions=True,
            maybe_placeholders=False,
        )
        cached = (lark, builder)
        _local.parser = cached
    return cached


def parse_source(source: SourceFile) -> tuple[Machine | None, list[Diagnostic]]:
    """Parses one file into at most one machine; every problem comes back as a diagnostic."""
    if source.text is None:
        return None, list(source.diagnostics)
    lark, builder = _parser()
    builder.path, builder.sha256, builder.diagnostics = source.path, source.sha256, []
    try:
        tree = lark.parse(source.text)
    except UnexpectedInput as exc:
        return None, [_syntax_diagnostic(source, exc)]
    try:
        machines = builder.transform(tree)
    except VisitError as exc:  # pragma: no cover - a bug in the transformer, not the input
        raise exc.orig_exc from exc
    diagnostics = list(builder.diagnostics)
    if len(machines) != 1:
        span = machines[1].span if len(machines) > 1 else SourceSpan.point(source.path)
        what = "more than one machine" if machines else "no machine"
        diagnostics.append(
            fail(
                "E004",
                f"file holds {what}",
                span,
                "write one `machine Name { ... }` block per .fsm file",
            )
        )
        return None, diagnostics
    return machines[0], diagnostics


def parse_text(text: str, path: str = "<input>") -> tuple[Machine | None, list[Diagnostic]]:
    return parse_source(decode_source(path, text.encode("utf-8")))


def _syntax_diagnostic(source: SourceFile, exc: UnexpectedInput) -> Diagnostic:
    line = getattr(exc, "line", 1) or 1
    column = getattr(exc, "column", 1) or 1
    if isinstance(exc, UnexpectedEOF) or line < 1:
        lines = source.text.splitlines() if source.text else [""]
        line = max(len(lines), 1)
        column = len(lines[-1]) + 1 if lines else 1
    width = 1
    if isinstance(exc, UnexpectedToken) and isinstance(exc.token, Token) and exc.token.type != "$END":
        width = max(1, len(str(exc.token)))
        found = f"unexpected '{_clip(str(exc.token))}'"
    elif isinstance(exc, UnexpectedCharacters):
        assert source.text is not None
        ch = source.text[exc.pos_in_stream] if exc.pos_in_stream < len(source.text) else ""
        found = f"unexpected character {ch!r}"
        if ch == '"':
            found = "unterminated or invalid string"
    else:
        found = "unexpected end of file"
    span = SourceSpan.model_construct(
        path=source.path, line=line, column=column, end_line=line, end_column=column + width
    )
    friendly = None if found.startswith("unterminated") else _friendly(source.text or "", exc)
    expected = _expected(exc)
    if friendly is not None:
        message, hint = friendly
        return fail("E001", f"{message} ({found})", span, hint)
    hint = f"expected {expected}" if expected else None
    if found.startswith("unterminated"):
        hint = 'close the string with " on the same line; escape quotes as \\"'
    elif isinstance(exc, UnexpectedCharacters) and not ch.isascii():
        hint = "names are ASCII letters, digits and underscores; put other text in a doc string"
    return fail("E001", f"syntax error: {found}", span, hint)


def _clip(text: str, limit: int = 40) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _expected(exc: UnexpectedInput) -> str:
    names: set[str] = set()
    raw = getattr(exc, "expected", None) or getattr(exc, "allowed", None) or set()
    for term in raw:
        names.add(_TERMINAL_NAMES.get(term, f"'{term.lower()}'" if term.isupper() else term))
    ordered = sorted(names)
    if len(ordered) > 8:
        ordered = [*ordered[:8], "..."]
    return ", ".join(ordered)


def _friendly(text: str, exc: UnexpectedInput) -> tuple[str, str] | None:
    if not isinstance(exc, UnexpectedToken | UnexpectedEOF | UnexpectedCharacters):
        return None
    try:
        found = exc.match_examples(
            _parser()[0].parse,
            _EXAMPLES,
            token_type_match_fallback=True,
            use_accepts=True,
        )
    except Exception:  # noqa: BLE001 - a failed lookup only costs the friendly wording
        return None
    return found if isinstance(found, tuple) else None
