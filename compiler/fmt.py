"""`autonomic fmt`: the canonical layout of a machine file, comments kept, meaning unchanged.

The layout follows the tokens, not the grammar's rules, so every construct the grammar gains
is formatted without changes here:
- lines stay where the author broke them; runs of blank lines become one, and the file has no
  blank lines at its start or end and ends in one newline;
- each line is indented two spaces per open `{` and `(` before it (a line that starts by
  closing one is indented as its opener);
- within a line, tokens are separated by one space, except none before `,` `)` `:` `?` `.`,
  none after `(` and `.`, and none between a name and the `(` that follows it
  (`emit Billing.RefundRequested(reason = "late")`, `enum(a, b)`, `@allow(W204, "why")`);
- a comment keeps its text; a comment after code keeps its distance from the code (at least
  two spaces), so aligned comment columns stay aligned.

Formatting only ever adds or removes blanks between tokens, never between the characters of
one, so the machine read back is the same; `format_source` checks that on every file anyway
and refuses to write a file whose model would change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import Diagnostic, Severity
from .model import Machine
from .parser import ParsedFile, decode_source, parse_file

_TOKEN = re.compile(
    r"""
    (?P<comment>(?:\#|//)[^\n]*)
  | (?P<string>"(?:[^"\\\r\n]|\\.)*"?)
  | (?P<arrow>->)
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?(?![A-Za-z0-9_.]))
  | (?P<word>[$@]?[A-Za-z0-9_]+)
  | (?P<punct>\S)
    """,
    re.VERBOSE,
)
_NO_SPACE_BEFORE = frozenset({",", ")", ":", "?", "."})
_NO_SPACE_AFTER = frozenset({"(", "."})
_OPENERS, _CLOSERS = frozenset("{("), frozenset("})")
COMMENT_GAP = 2


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int


def _tokens(line: str) -> list[_Token]:
    return [
        _Token(match.lastgroup or "punct", match.group(), match.start(), match.end())
        for match in _TOKEN.finditer(line)
    ]


def _joined(tokens: list[_Token]) -> str:
    out = ""
    previous: _Token | None = None
    for token in tokens:
        if previous is not None:
            tight = (
                token.text in _NO_SPACE_BEFORE
                or previous.text in _NO_SPACE_AFTER
                or (token.text == "(" and previous.kind == "word")
            )
            out += "" if tight else " "
        out += token.text
        previous = token
    return out


def format_text(text: str) -> str:
    """The canonical layout of a machine file's text (which should parse: the layout of
    broken text is still whitespace-only, but nothing checks it)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    depth = 0
    blank = False
    for raw in lines:
        tokens = _tokens(raw)
        if not tokens:
            blank = bool(out)
            continue
        if blank:
            out.append("")
            blank = False
        comment = tokens[-1] if tokens[-1].kind == "comment" else None
        code = tokens[:-1] if comment is not None else tokens
        leading = 0
        for token in code:
            if token.text not in _CLOSERS:
                break
            leading += 1
        indent = "  " * max(depth - leading, 0)
        body = _joined(code)
        if comment is not None:
            text_of_comment = comment.text.rstrip()
            if code:
                gap = max(comment.start - code[-1].end, COMMENT_GAP)
                body += " " * gap + text_of_comment
            else:
                body = text_of_comment
        out.append(indent + body)
        for token in code:
            if token.text in _OPENERS:
                depth += 1
            elif token.text in _CLOSERS:
                depth = max(depth - 1, 0)
    return "\n".join(out) + "\n" if out else ""


# ---------------------------------------------------------------- the meaning is kept


def without_positions(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: without_positions(item)
            for key, item in value.items()
            if key not in ("span", "source_sha256")
        }
    if isinstance(value, list | tuple):
        return [without_positions(item) for item in value]
    return value


def meaning(machine: Machine) -> Any:
    """A machine's model without source positions: what formatting must not change."""
    return without_positions(machine.model_dump())


def file_meaning(parsed: ParsedFile) -> Any:
    """A file's machine and flows without source positions."""
    machine = None if parsed.machine is None else meaning(parsed.machine)
    return (machine, [without_positions(flow.model_dump()) for flow in parsed.flows])


@dataclass(frozen=True, slots=True)
class Formatted:
    """`text` is None when the file cannot be formatted; `diagnostics` say why."""

    path: str
    original: str | None
    text: str | None
    diagnostics: tuple[Diagnostic, ...]

    @property
    def changed(self) -> bool:
        return self.text is not None and self.text != self.original


class MeaningChanged(Exception):
    """Formatting would change what the file declares: a bug in fmt, never written."""


def format_source(path: str, data: bytes) -> Formatted:
    """Format one file's bytes: parse it (refusing text that does not parse), lay it out,
    and parse the result to prove its machine and flows are unchanged."""
    source = decode_source(path, data)
    if source.text is None:
        return Formatted(path, None, None, tuple(source.diagnostics))
    parsed = parse_file(source)
    errors = tuple(d for d in parsed.diagnostics if d.severity is Severity.ERROR)
    if errors or (parsed.machine is None and not parsed.flows):
        return Formatted(path, source.text, None, errors or tuple(parsed.diagnostics))
    text = format_text(source.text)
    if text != source.text:
        again = parse_file(decode_source(path, text.encode("utf-8")))
        if file_meaning(again) != file_meaning(parsed):
            raise MeaningChanged(f"{path}: formatting would change what the file declares")
    return Formatted(path, source.text, text, ())
