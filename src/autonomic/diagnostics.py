"""The one text format of every diagnostic an autonomic command prints.

`path:line:col: CODE [severity] message`, the source line with a caret under the span when the
source is at hand, then `  = hint: ...` (rustc's and ruff's style). The checker's findings, the
runtime's failures and every command's own problems pass through `render`, so a user reads
one format everywhere. This module imports neither the compiler nor the runtime: both use it,
and neither imports the other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["MAX_ECHO", "printable", "render"]

# The widest slice of a source line echoed under a diagnostic.
MAX_ECHO = 200

# ANSI SGR codes for a terminal; `render(..., colour=True)` only.
_RESET, _BOLD, _RED, _YELLOW, _CYAN, _BLUE = (
    "\x1b[0m",
    "\x1b[1m",
    "\x1b[31m",
    "\x1b[33m",
    "\x1b[36m",
    "\x1b[34m",
)


def printable(text: object) -> str:
    """Text from a file or the command line, safe on a terminal: control characters, bidi
    overrides and undecodable bytes are shown escaped, never interpreted."""
    shown = str(text)
    if shown.isprintable():
        return shown
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in shown)


def _echo(line: str) -> str:
    # One character per column, so the caret stays under its span: tabs become a space, any
    # other control character a "?".
    return "".join(" " if c == "\t" else c if c.isprintable() else "?" for c in line)


def render(
    where: str | os.PathLike[str],
    code: str,
    message: str,
    hint: str | None = None,
    *,
    severity: str = "error",
    line: int = 1,
    column: int = 1,
    end_line: int | None = None,
    end_column: int | None = None,
    source_lines: Sequence[str] | None = None,
    related: Sequence[tuple[str, str]] = (),
    colour: bool = False,
) -> str:
    """One diagnostic as text. A message of several lines (a list of binding problems) keeps
    them; the caret spans the columns up to `end_column` when the span ends on its line;
    `related` locations (`path:line:col:`, why) follow the hint as `  = see ...` lines. With
    `colour`, the same text with ANSI colours (severity, caret, hint)."""

    def paint(text: str, *codes: str) -> str:
        return "".join(codes) + text + _RESET if colour else text

    tone = _YELLOW if severity == "warning" else _RED
    first, *more = message.split("\n")
    place = printable(f"{os.fspath(where)}:{line}:{column}:")
    label = f"{code} [{severity}]"
    head = f"{paint(place, _BOLD)} {paint(label, _BOLD, tone)} {printable(first)}"
    parts = [head, *(printable(text) for text in more)]
    if source_lines is not None and 1 <= line <= len(source_lines):
        raw = source_lines[line - 1]
        col = max(column - 1, 0)
        start = max(0, col - MAX_ECHO // 2) if len(raw) > MAX_ECHO else 0
        shown = _echo(raw[start : start + MAX_ECHO])
        width = 1
        if end_line == line and end_column is not None and end_column > column:
            width = end_column - column
        width = max(1, min(width, len(shown) - (col - start)))
        gutter = f"{line:>4} | "
        parts.append(paint(gutter, _BLUE) + shown)
        parts.append(" " * (len(gutter) + col - start) + paint("^" * width, _BOLD, tone))
    if hint:
        parts.append(f"  = {paint('hint', _BOLD, _CYAN)}: {printable(hint)}")
    for place_of, why in related:
        parts.append(f"  = {paint('see', _BOLD, _CYAN)} {printable(place_of)} {printable(why)}")
    return "\n".join(parts)
