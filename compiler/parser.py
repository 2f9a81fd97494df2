"""Text -> IR: reads a machine file safely, parses it with lark (LALR) and builds the model."""

from __future__ import annotations

import gc
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lark import Lark, Token, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

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
        'a suppression is written @allow(CODE, "reason")',
        'the reason is mandatory: write @allow(W201, "why this is intended")',
    ): [
        "machine M { @allow(W201) state A }",
        "@allow(W201) machine M { }",
    ],
    (
        'a state is declared `[initial|final|perpetual] state Name "doc" { ... }`',
        "markers go before `state`: write `initial state Name` or `final state Name`",
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
        return None if self.text is None else source_lines(self.text)


def source_lines(text: str) -> list[str]:
    """Lines as the lexer counts them: only \n ends a line (str.splitlines would also split
    on form feeds and U+2028 inside strings and put every caret after them on the wrong line)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_source(path: str | Path) -> SourceFile:
    """Reads bytes and decodes strict UTF-8; never raises for bad input."""
    display = str(path)
    if not display or "\x00" in display:
        return _unreadable(repr(display), "is not a usable path", "pass a .fsm file path")
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


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pauses the cyclic garbage collector: parse trees and IR nodes are hundreds of thousands
    of acyclic objects, and collection passes over them would double the time of a large
    machine. Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_source(source: SourceFile) -> tuple[Machine | None, list[Diagnostic]]:
    """Parses one file into at most one machine; every problem comes back as a diagnostic."""
    if source.text is None:
        return None, list(source.diagnostics)
    lark, builder = _parser()
    builder.path, builder.sha256, builder.diagnostics = source.path, source.sha256, []
    with paused_gc():
        try:
            tree = lark.parse(source.text)
        except UnexpectedInput as exc:
            return None, [_syntax_diagnostic(source, exc)]
        machines: list[Machine] = builder.transform(tree)
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
    at_end = isinstance(exc, UnexpectedEOF) or (
        isinstance(exc, UnexpectedToken) and getattr(exc.token, "type", None) == "$END"
    )
    if at_end or line < 1:
        # Point just after the last written character, not at a trailing blank line.
        lines = source_lines((source.text or "").rstrip())
        line = len(lines)
        column = len(lines[-1]) + 1
    width = 1
    if (
        isinstance(exc, UnexpectedToken)
        and isinstance(exc.token, Token)
        and exc.token.type != "$END"
    ):
        width = max(1, len(str(exc.token)))
        found = f"unexpected '{_clip(str(exc.token))}'"
    elif isinstance(exc, UnexpectedCharacters):
        assert source.text is not None
        pos = exc.pos_in_stream or 0
        ch = source.text[pos] if pos < len(source.text) else ""
        found = f"unexpected character {ch!r}"
        if ch == '"':
            found = "unterminated or invalid string"
    else:
        found = "unexpected end of file"
    span = SourceSpan.model_construct(
        path=source.path, line=line, column=column, end_line=line, end_column=column + width
    )
    if found.startswith("unterminated"):
        hint = 'close the string with " on the same line; escape quotes as \\"'
    elif isinstance(exc, UnexpectedCharacters) and not ch.isascii():
        hint = "names are ASCII letters, digits and underscores; put other text in a doc string"
    elif friendly := _friendly(exc):
        message, friendly_hint = friendly
        return fail("E001", f"{message} ({found})", span, friendly_hint)
    else:
        expected = _expected(exc)
        hint = f"expected {expected}" if expected else "check the syntax just before this point"
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


def _error_key(exc: UnexpectedInput) -> tuple[Any, str] | None:
    """Where the parser stood (its LALR state) and what it met there."""
    position = getattr(getattr(exc, "state", None), "position", None)
    if position is None:
        return None
    if isinstance(exc, UnexpectedToken):
        return position, str(exc.token.type)
    if isinstance(exc, UnexpectedCharacters):
        return position, "<characters>"
    return position, "$END"


@cache
def _example_index() -> dict[tuple[Any, str], tuple[str, str]]:
    """Known mistakes by error key, plus (state, "*") for any other token in that state.

    lark's own match_examples also compares parse-stack depths, so `initial state A { on E B }`
    would not match the example `state A { on E B }`; the LALR state alone is what matters."""
    index: dict[tuple[Any, str], tuple[str, str]] = {}
    for label, snippets in _EXAMPLES.items():
        for snippet in snippets:
            try:
                _parser()[0].parse(snippet)
            except UnexpectedInput as exc:
                key = _error_key(exc)
                if key is not None:
                    index.setdefault(key, label)
                    index.setdefault((key[0], "*"), label)
    return index


def _friendly(exc: UnexpectedInput) -> tuple[str, str] | None:
    key = _error_key(exc)
    if key is None:
        return None
    index = _example_index()
    return index.get(key) or index.get((key[0], "*"))
