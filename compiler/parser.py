"""Text -> IR: reads a machine file safely, parses it with lark (LALR) and builds the model."""

from __future__ import annotations

import difflib
import enum
import gc
import hashlib
import re
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

from lark import (
    Lark,
    Token,
    Tree,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
)
from lark.lexer import PatternRE, PatternStr
from lark.parsers.lalr_analysis import Shift

from .errors import Diagnostic, SourceSpan, fail
from .grammar_cache import default_folders, load_parser
from .model import Flow, Machine, construct_span
from .transform import SPANLESS_RULES, ModelBuilder

MAX_SOURCE_BYTES = 64 * 1024 * 1024

# Friendly names for terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name",
    "STRING": 'a "quoted string"',
    "DURATION": "a duration such as 24h",
    "NUMBER": "a number such as 12 or 0.50",
    "CONTEXT_REF": "$instance, $actor, $event or $data.FIELD",
    "EQUAL": "'='",
    "RECIPIENT_KIND": "'queue' or 'role'",
    "BACKOFF_KIND": "'exponential' or 'jitter'",
    "FLOW_KIND": "sequence, parallel, conditional, fanout or saga",
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

_UNITS_HINT = "units are ms, s, m, h, d and w, combined largest first: 24h, 2w, 1d12h"

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
        _UNITS_HINT,
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
        "the file must start with `machine Name {` or `flow Name kind {`",
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


# lark's LALR parser with its contextual lexer, building a parse tree with positions.
LARK_OPTIONS: dict[str, Any] = {
    "parser": "lalr",
    "lexer": "contextual",
    "propagate_positions": True,
    "maybe_placeholders": False,
}


@cache
def _lark() -> Lark:
    """The reference parser. It parses whatever the fast path declines, and names every
    syntax error. lark parsers keep no state between parses, so threads can share it. Its
    LALR analysis is cached on disk (see grammar_cache)."""
    folder = Path(str(resources.files("autonomic.compiler").joinpath("grammar")))
    return load_parser(_grammar(), LARK_OPTIONS, default_folders(folder))


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pauses the cyclic garbage collector: parse trees and IR nodes are hundreds of thousands
    of acyclic objects, and collection passes over them would double the time of a large
    machine. Reference counting still frees everything.

    On the way out, what the block built moves to the oldest generation without being
    looked at (freezing and unfreezing moves every tracked object there): left in the
    youngest, the first allocation after the pause would walk all of it, a fifth of the
    time of the parse. Garbage among it is still found by the next full collection. Skipped
    when the program keeps objects frozen itself, which unfreezing would undo."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if not gc.get_freeze_count():
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def parse_source(source: SourceFile) -> tuple[Machine | None, list[Diagnostic]]:
    """Parses one file into at most one machine; every problem comes back as a diagnostic.
    A file with syntax errors gives no machine (see `parse_recovering` for the checker)."""
    machine, diagnostics, recovered = parse_recovering(source)
    return (None if recovered is not Recovery.NONE else machine), diagnostics


class Recovery(enum.Enum):
    """How a file's machine was read: as written; past syntax errors by repairs that kept
    everything written (a missing `->` inserted, a misspelt keyword corrected); or past
    repairs that dropped text, so that its checks may echo the syntax errors."""

    NONE = "none"
    REPAIRED = "repaired"
    LOSSY = "lossy"


def parse_recovering(source: SourceFile) -> tuple[Machine | None, list[Diagnostic], Recovery]:
    """Like `parse_source`, but past syntax errors: each is reported (at most one per line)
    and the parse goes on, so one run names all of them. The machine read around them comes
    back too, with how it was recovered: the checker checks it, knowing whether a skipped
    token may have taken a marker or a state with it."""
    parsed, recovered = parse_file_recovering(source)
    return parsed.machine, parsed.diagnostics, recovered


@dataclass
class ParsedFile:
    """What one file declares: at most one machine, and any flows beside it."""

    machine: Machine | None
    flows: list[Flow]
    diagnostics: list[Diagnostic]


def parse_file_recovering(source: SourceFile) -> tuple[ParsedFile, Recovery]:
    """`parse_recovering` with the file's flows too: a file holds one machine and any flows
    beside it, or flows only."""
    if source.text is None:
        return ParsedFile(None, [], list(source.diagnostics)), Recovery.NONE
    recovered = Recovery.NONE
    with paused_gc():
        builder = ModelBuilder(source.path, source.sha256)
        items = _parse_fast(source.text, builder)
        if items is None and len(source.text) > _MAX_RECOVERY_BYTES:
            # A large file: its mistakes are found and repaired by the fast path's table
            # alone, each repair tried on a window after the mistake (see _recover_large).
            repaired, errors, lossy = _recover_large(source.text)
            syntax = _syntax_diagnostics(source, errors)
            builder = ModelBuilder(source.path, source.sha256)
            items = None if repaired is None else _parse_fast(repaired, builder)
            if items is None and repaired is not None:
                builder = ModelBuilder(source.path, source.sha256)
                with suppress(UnexpectedInput):
                    items = builder.transform(_lark().parse(repaired))
            if items is None:
                return ParsedFile(None, [], syntax), Recovery.LOSSY
            recovered = Recovery.LOSSY if lossy else Recovery.REPAIRED if syntax else Recovery.NONE
            builder.diagnostics[:0] = syntax
        elif items is None:
            # Not plain input, or not valid: lark parses it or names the mistakes. Whatever
            # the fast path built or reported so far is dropped with its builder.
            builder = ModelBuilder(source.path, source.sha256)
            tree, errors, lossy = _parse_with_recovery(source.text)
            syntax = _syntax_diagnostics(source, errors)
            if tree is None:
                return ParsedFile(None, [], syntax), Recovery.LOSSY
            recovered = Recovery.LOSSY if lossy else Recovery.REPAIRED if syntax else Recovery.NONE
            items = builder.transform(tree)
            builder.diagnostics[:0] = syntax
    diagnostics = list(builder.diagnostics)
    machines = [item for item in items if isinstance(item, Machine)]
    flows = [item for item in items if isinstance(item, Flow)]
    if not items and recovered is not Recovery.NONE:
        # What the syntax errors say, no echo.
        return ParsedFile(None, [], diagnostics), Recovery.LOSSY
    if len(machines) > 1 or not items:
        span = machines[1].span if len(machines) > 1 else SourceSpan.point(source.path)
        what = "more than one machine" if machines else "no machine and no flow"
        diagnostics.append(
            fail(
                "E004",
                f"file holds {what}",
                span,
                "write one `machine Name { ... }` block per .fsm file (flows may sit beside it)",
            )
        )
        return ParsedFile(None, [], diagnostics), recovered
    machine = machines[0] if machines else None
    return ParsedFile(machine, flows, diagnostics), recovered


def parse_file(source: SourceFile) -> ParsedFile:
    """The machine and flows of one file; a file with syntax errors gives neither."""
    parsed, recovered = parse_file_recovering(source)
    if recovered is not Recovery.NONE:
        return ParsedFile(None, [], parsed.diagnostics)
    return parsed


# Tokens the recovery may insert where one is missing (never a name: it would invent one).
_INSERTABLE = ("->", "}", "{", ")", ",")
_MAX_SYNTAX_ERRORS = 30
# Above this size a file is not re-parsed by lark for each repair trial (each would read the
# whole file): `_recover_large` tries repairs on a window after the mistake instead.
_MAX_RECOVERY_BYTES = 256 * 1024
_REPAIR_WINDOW = 4096  # characters after a mistake that a repair trial reads


def _parse_with_recovery(
    text: str,
) -> tuple[Tree[Token] | None, list[tuple[UnexpectedInput, str]], bool]:
    """lark's parse, and after each syntax error the smallest repair of the text that lets the
    parse go furthest: a missing `->`, `{`, `}`, `)` or `,` inserted, a misspelt keyword or a
    malformed duration corrected, a token skipped, or the rest of the line (then the whole
    statement) blanked, braces kept. Lines are never added or removed, so every later error
    is still reported on its own line. Each error comes with the text it was found in; the
    flag says whether some repair dropped written text."""
    errors: list[tuple[UnexpectedInput, str]] = []
    current = text
    lossy = False
    while True:
        try:
            return _lark().parse(current), errors, lossy
        except UnexpectedInput as exc:
            errors.append((exc, current))
            if len(errors) >= _MAX_SYNTAX_ERRORS or len(current) > _MAX_RECOVERY_BYTES:
                return None, errors, True
            repaired = _best_repair(current, exc)
            if repaired is None:
                return None, errors, True
            current, lossless = repaired
            lossy = lossy or not lossless


class _At(NamedTuple):
    """Where the table parse stood: what lark's `exc.state.position` gives `_friendly`."""

    position: int


# (offset of a line start, its line number, the LALR stack there)
_Snapshot = tuple[int, int, tuple[int, ...]]


def _recover_large(text: str) -> tuple[str | None, list[tuple[UnexpectedInput, str]], bool]:
    """`_parse_with_recovery` for a large file: the same repairs, each tried by driving the
    fast path's LALR table (lark's own) from the last line start before the repair, over a
    window after the mistake, instead of re-parsing the whole file with lark. The errors are
    lark's exception types, as lark raises them from the same table and state. Returns the
    repaired text (None if the repairs ran out), the errors with the text each was met in,
    and whether some repair dropped written text."""
    tables = _fast_tables()
    if tables is None:
        return None, [], True
    snapshots: list[_Snapshot] = [(0, 1, (tables.start_state,))]
    errors: list[tuple[UnexpectedInput, str]] = []
    lossy = False
    resume = snapshots[0]
    while True:
        _, error = _recognize(tables, text, resume, None, snapshots)
        if error is None:
            return text, errors, lossy
        errors.append((error, text))
        if len(errors) >= _MAX_SYNTAX_ERRORS:
            return None, errors, True
        offset = _error_offset(text, error)
        previous = _previous_token(text, offset)
        floor = text.rfind("\n", 0, offset) + 1
        if previous is not None:
            floor = min(floor, _offset(text, previous[1], 1))
        del snapshots[bisect_right(snapshots, (floor, 1 << 62)) :]
        resume = snapshots[-1]
        best: tuple[str, bool] | None = None
        best_reach = offset
        for candidate, lossless in _repairs(text, error):
            shift = len(candidate) - len(text)
            limit = offset + shift + _REPAIR_WINDOW
            reach, _ = _recognize(tables, candidate, resume, limit, None)
            reach = min(reach, limit) - shift
            if reach > best_reach:
                best, best_reach = (candidate, lossless), reach
        if best is None:
            return None, errors, True
        text, lossless = best
        lossy = lossy or not lossless


def _recognize(
    tables: _FastTables,
    text: str,
    start: _Snapshot,
    limit: int | None,
    snapshots: list[_Snapshot] | None,
) -> tuple[int, UnexpectedInput | None]:
    """Drive the LALR table over `text` from `start` without building anything: (where it
    stopped, the syntax error there or None). It stops with no error at the end of valid
    input (offset len(text) + 1) or at the first token past `limit`; `snapshots` collects
    the stack at each line start."""
    actions, words, punctuation = tables.actions, tables.words, tables.punctuation
    reductions, end_state = tables.reductions, tables.end_state
    group = tables.scanner.groupindex
    name_group, punct_group, newline_group = group["NAME"], group["PUNCT"], group["NL"]
    comment_group, other_group = group["COMMENT"], group["OTHER"]
    kinds = {group[n]: n for n in ("STRING", "DURATION", "NUMBER", "CONTEXT_REF")}
    position, line, stack = start
    states = list(stack)
    line_start = position
    end = position
    for match in chain(tables.scanner.finditer(text, position), (None,)):
        if match is not None:
            index = match.lastindex
            assert index is not None  # every alternative is a group
            end = match.end()
            if index == newline_group:
                line, line_start = line + 1, end
                if snapshots is not None:
                    snapshots.append((end, line, tuple(states)))
                continue
            if index == comment_group:
                continue
            value = match[index]
            begin = end - len(value)
            if limit is not None and begin > limit:
                return begin, None
            if index == other_group and value.isspace():
                continue  # a blank the scanner's prefix gave back (trailing blanks)
            if index == other_group:
                expected = {t for t in actions[states[-1]] if t.isupper()}
                column = begin - line_start + 1
                error: UnexpectedInput = UnexpectedCharacters(  # type: ignore[no-untyped-call]
                    text, begin, line, column, allowed=expected, state=_At(states[-1])
                )
                return begin, error
            if index == name_group:
                ttype = words[states[-1]].get(value, "NAME")
            elif index == punct_group:
                ttype = punctuation[value]
            else:
                ttype = kinds[index]
        else:
            begin = len(text) if _TRAILING_BLANKS.fullmatch(text, end) else end
            ttype, value = "$END", ""
        action = actions[states[-1]].get(ttype)
        while action is not None and action < 0:
            how, size, origin, _, _ = reductions[~action]
            if how == _PASS:
                del states[-1]
            elif how == _APPEND:
                del states[-2:]
            elif size:
                del states[-size:]
            goto = actions[states[-1]][origin]
            states.append(goto)
            if goto == end_state and ttype == "$END":
                return len(text) + 1, None
            action = actions[goto].get(ttype)
        if action is None or match is None:
            expected = {t for t in actions[states[-1]] if t.isupper()}
            token = Token(ttype, value, begin, line, begin - line_start + 1)
            error = UnexpectedToken(token, expected, state=_At(states[-1]))  # type: ignore[no-untyped-call]
            return begin, error
        states.append(action)
    return len(text) + 1, None  # not reached: the end of input returns above


def _error_offset(text: str, exc: UnexpectedInput) -> int:
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        return len(text)
    if isinstance(exc, UnexpectedCharacters):
        return exc.pos_in_stream or 0
    start = getattr(getattr(exc, "token", None), "start_pos", None)
    if start is not None:
        return int(start)
    return _offset(text, getattr(exc, "line", 1) or 1, getattr(exc, "column", 1) or 1)


_UNBRACED = re.compile("[^{}\n]+")
_BLANK_BYTES = bytes(b if b in b"{}\n" else 32 for b in range(256))


def _blank(text: str) -> str:
    """`text` with everything but braces and line breaks turned into spaces. A repair may
    blank megabytes of one line: ASCII goes through bytes.translate, the rest a run at a
    time."""
    if text.isascii():
        return text.encode("ascii").translate(_BLANK_BYTES).decode("ascii")
    return _UNBRACED.sub(lambda run: " " * len(run.group()), text)


def _repairs(text: str, exc: UnexpectedInput) -> Iterator[tuple[str, bool]]:
    """Candidate repairs of the text at the error, smallest first, each with whether it keeps
    everything that was written (an insertion or a correction) or drops some of it."""
    offset = _error_offset(text, exc)
    if offset >= len(text.rstrip()):
        # The file ends early: whatever was meant to follow is missing.
        for closers in range(1, 9):
            yield text + "}" * closers, False
        return
    expected = _expected_terminals(exc)
    word = _NAME_RE.match(text, offset)
    if word is not None and (keyword := _close_keyword(word.group(), expected)) is not None:
        yield text[:offset] + keyword + text[word.end() :], True
    if "DURATION" in expected and (fixed := _duration_fix(text, offset)) is not None:
        yield fixed, True
    for token in _INSERTABLE:
        yield text[:offset] + token + " " + text[offset:], True
    if len(expected) <= 3:
        # A missing keyword where only a few things can follow (`between 1h and 2h`).
        keywords = _keywords()
        for terminal in sorted(expected):
            missing = keywords.get(terminal)
            if missing is not None:
                yield text[:offset] + missing + " " + text[offset:], True
    size = max(len(exc.token) if isinstance(exc, UnexpectedToken) else 1, 1)
    yield text[:offset] + " " * size + text[offset + size :], False
    previous = _previous_token(text, offset)
    if previous is not None:
        word_text, prev_line, prev_end = previous
        prev_offset = _offset(text, prev_line, prev_end) - len(word_text)
        yield (
            text[:prev_offset] + " " * len(word_text) + text[prev_offset + len(word_text) :],
            False,
        )
        if prev_line < text.count("\n", 0, offset) + 1:
            # The statement ended too early: drop it, braces kept.
            start = text.rfind("\n", 0, prev_offset) + 1
            end = text.find("\n", prev_offset)
            yield text[:start] + _blank(text[start:end]) + text[end:], False
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    line_end = len(text) if line_end < 0 else line_end
    yield text[:offset] + _blank(text[offset:line_end]) + text[line_end:], False
    block = max(text.rfind("{", line_start, offset), text.rfind("}", line_start, offset)) + 1
    statement = max(block, line_start)
    yield text[:statement] + _blank(text[statement:line_end]) + text[line_end:], False
    if statement != line_start:
        yield text[:line_start] + _blank(text[line_start:line_end]) + text[line_end:], False


def _best_repair(text: str, exc: UnexpectedInput) -> tuple[str, bool] | None:
    """The candidate after which the parse gets furthest (all the way, at best), with
    whether it kept everything written."""
    best, best_reach = None, _error_offset(text, exc)
    for candidate, lossless in _repairs(text, exc):
        try:
            _lark().parse(candidate)
        except UnexpectedInput as later:
            reach = _error_offset(candidate, later) - (len(candidate) - len(text))
        else:
            reach = len(text) + 1
        if reach > best_reach:
            best, best_reach = (candidate, lossless), reach
    return best


def _duration_fix(text: str, offset: int) -> str | None:
    """The text with a malformed duration at `offset` replaced by a well-formed one."""
    for pattern in (_FRACTION, _SPACED, _UNKNOWN_UNIT, _BARE_NUMBER):
        match = pattern.match(text, offset)
        if match is not None:
            digits = re.match("[0-9]+", match.group())
            whole = digits.group() if digits else "1"
            fixed = f"{whole}h"
            return text[:offset] + fixed.ljust(len(match.group())) + text[match.end() :]
    return None


def _syntax_diagnostics(
    source: SourceFile, errors: list[tuple[UnexpectedInput, str]]
) -> list[Diagnostic]:
    """One finding per line: the rest of a broken line is usually the same mistake again."""
    found: list[Diagnostic] = []
    seen: set[int] = set()
    for exc, text in errors:
        diagnostic = _syntax_diagnostic(source, exc, text)
        if diagnostic.span.line not in seen:
            seen.add(diagnostic.span.line)
            found.append(diagnostic)
    return found


# ---------------------------------------------------------------- the fast path
#
# lark spends most of a large parse in per-token and per-rule Python calls: its lexer, its
# parser loop, the tree it builds and the positions it propagates. The fast path is one loop
# that scans with a single regular expression and drives lark's own LALR table, calling the
# ModelBuilder rules as it reduces, so the grammar file stays the one definition of the
# language. It takes input only when it is sure to read it exactly as lark would (keywords are
# contextual as in lark's contextual lexer); on anything else it gives up and the reference
# parser takes over, which also makes every syntax error lark's own.

_SCANNED_TERMINALS = ("NAME", "STRING", "DURATION", "NUMBER", "CONTEXT_REF", "COMMENT")
# The ones ModelBuilder.terminals builds.
_BUILT_TERMINALS = ("NAME", "STRING", "DURATION", "NUMBER", "CONTEXT_REF")
_WHITESPACE = "(?:[ \t\x0c\r\n])+"  # %import common.WS, as lark compiles it
_TRAILING_BLANKS = re.compile("[ \t\x0c\r]*")
_WORD_LIST = re.compile(r"\(\?:([A-Za-z_]+(?:\|[A-Za-z_]+)*)\)")
# How a reduction builds its node (see _reduction).
_RULE, _SPANNED_RULE, _LIST, _APPEND, _PASS = range(5)


class _Reduction(NamedTuple):
    how: int  # one of _RULE .. _PASS
    size: int  # symbols popped
    origin: str  # the nonterminal pushed in their place
    keep: tuple[tuple[int, bool], ...] | None  # (index, splice) of kept children; None: all
    rule: str | None  # the ModelBuilder rule, for _RULE and _SPANNED_RULE


@dataclass(frozen=True)
class _FastTables:
    scanner: re.Pattern[str]
    actions: list[dict[str, int]]  # per state: symbol -> shift/goto state (>= 0) or ~reduction
    reductions: list[_Reduction]
    words: list[dict[str, str]]  # per state: word -> keyword terminal accepted there
    punctuation: dict[str, str]  # text -> terminal
    start_state: int
    end_state: int


_NAME_RE = re.compile("[A-Za-z_][A-Za-z0-9_]*")


@cache
def _fast_tables() -> _FastTables | None:
    """lark's LALR table in the fast path's terms, or None if the grammar uses something the
    fast path cannot reproduce exactly (then every parse takes the reference path)."""
    lark = _lark()
    conf = lark.parse_interactive("").parser_state.parse_conf
    patterns: dict[str, str] = {}
    punctuation: dict[str, str] = {}
    keywords: dict[str, str] = {}  # literal keyword -> terminal
    word_lists: dict[str, frozenset[str]] = {}  # regex terminal of alternative words
    for terminal in lark.terminals:
        pattern = terminal.pattern
        if isinstance(pattern, PatternStr) and not pattern.flags:
            if _NAME_RE.fullmatch(pattern.value):
                keywords[pattern.value] = terminal.name
            else:
                punctuation[pattern.value] = terminal.name
        elif terminal.name in _SCANNED_TERMINALS and isinstance(pattern, PatternRE):
            patterns[terminal.name] = pattern.to_regexp()
        elif terminal.name == "WS" and pattern.to_regexp() == _WHITESPACE:
            continue
        elif isinstance(pattern, PatternRE) and (listed := _WORD_LIST.fullmatch(pattern.value)):
            word_lists[terminal.name] = frozenset(listed.group(1).split("|"))
        else:
            return None
    if set(patterns) != set(_SCANNED_TERMINALS) or patterns["NAME"] != _NAME_RE.pattern:
        return None
    if set(lark.lexer_conf.ignore) != {"WS", "COMMENT"}:
        return None
    punct = "|".join(re.escape(p) for p in sorted(punctuation, key=len, reverse=True))
    scanner = re.compile(
        "[ \t\x0c\r]*(?:(?P<NL>\n)"
        f"|(?P<COMMENT>{patterns['COMMENT']})"
        f"|(?P<DURATION>{patterns['DURATION']})"
        f"|(?P<NAME>{patterns['NAME']})"
        f"|(?P<STRING>{patterns['STRING']})"
        # Before the punctuation: `-1` is a number, `->` stays an arrow.
        f"|(?P<NUMBER>{patterns['NUMBER']})"
        f"|(?P<CONTEXT_REF>{patterns['CONTEXT_REF']})"
        f"|(?P<PUNCT>{punct})"
        "|(?P<OTHER>[\\s\\S]))"  # anything else, so that no character is skipped
    )

    states = conf.states
    if sorted(states) != list(range(len(states))):
        return None
    rules: dict[Any, int] = {}
    reductions: list[_Reduction] = []
    actions: list[dict[str, int]] = []
    words: list[dict[str, str]] = []
    for state in range(len(states)):
        row: dict[str, int] = {}
        for symbol, (action, arg) in states[state].items():
            symbol = str(symbol)  # lark's names may be Tokens, which compare slowly
            if action is Shift:
                row[symbol] = arg
                continue
            if arg not in rules:
                reduction = _reduction(arg, conf.start)
                if reduction is None:
                    return None
                rules[arg] = len(reductions)
                reductions.append(reduction)
            row[symbol] = ~rules[arg]
        actions.append(row)
        # lark's contextual lexer: a keyword accepted here wins over NAME; a word list
        # terminal (`queue`|`role`) is matched only where NAME is not, since NAME is
        # tried first wherever both are accepted.
        accepted = {word: term for word, term in keywords.items() if term in row}
        if "NAME" not in row:
            for term, alternatives in word_lists.items():
                if term in row:
                    accepted.update(dict.fromkeys(alternatives, term))
        words.append(accepted)
    return _FastTables(
        scanner, actions, reductions, words, punctuation, conf.start_state, conf.end_state
    )


def _reduction(rule: Any, start: str) -> _Reduction | None:
    """How to reduce one lark rule as lark's tree builder would (maybe_placeholders off):
    tokens filtered out, `_rule` children spliced into their parent, `?rule` replaced by
    its one child; None for what the fast path does not do."""
    origin = str(rule.origin.name)
    size = len(rule.expansion)
    if (size == 0 and origin != start) or rule.options.keep_all_tokens:
        return None  # an empty node would need lark's positions of empty nodes
    keep = tuple(
        (index, not symbol.is_term and symbol.name.startswith("_"))
        for index, symbol in enumerate(rule.expansion)
        if not (symbol.is_term and symbol.filter_out)
    )
    whole = None if len(keep) == size and not any(splice for _, splice in keep) else keep
    if origin.startswith("_"):
        how = _APPEND if size == 2 and keep == ((0, True), (1, False)) else _LIST
        return _Reduction(how, size, origin, whole, None)
    if rule.options.expand1 and not rule.alias:
        return _Reduction(_PASS, size, origin, None, None) if keep == ((0, False),) else None
    name = str(rule.alias or origin)
    how = _RULE if name in SPANLESS_RULES else _SPANNED_RULE
    return _Reduction(how, size, origin, whole, name)


def _parse_fast(text: str, builder: ModelBuilder) -> list[Machine | Flow] | None:
    """The machines of `text`, or None where the reference parser must decide."""
    tables = _fast_tables()
    if tables is None:
        return None
    terminals = builder.terminals()
    methods = builder.rules()
    if set(terminals) != set(_BUILT_TERMINALS) or any(
        r.rule is not None and r.rule not in methods for r in tables.reductions
    ):
        return None
    new_name = terminals["NAME"]
    reductions = [
        (how, size, origin, keep, None if rule is None else methods[rule])
        for how, size, origin, keep, rule in tables.reductions
    ]
    actions, words, punctuation = tables.actions, tables.words, tables.punctuation
    end_state = tables.end_state
    path = builder.path
    group = tables.scanner.groupindex
    name_group, punct_group, newline_group = group["NAME"], group["PUNCT"], group["NL"]
    comment_group, other_group = group["COMMENT"], group["OTHER"]
    group_terminals = {
        group[name]: name for name in ("STRING", "DURATION", "NUMBER", "CONTEXT_REF")
    }

    state = tables.start_state
    states = [state]  # the LALR stack (`state` is its top) ...
    values: list[Any] = []  # ... what each symbol on it built ...
    starts: list[int] = []  # ... and the offset where it starts
    line, line_start = 1, 0
    line_starts = [0]  # offset of each line, for the line and column of an offset
    end = 0  # where the last match ended
    # Where the last shifted token ends: the end of whatever is reduced next.
    last_line, last_column = 1, 1
    for match in chain(tables.scanner.finditer(text), (None,)):
        if match is not None:
            index = match.lastindex
            assert index is not None  # every alternative is a group
            end = match.end()
            if index == name_group:
                token = match[index]
                start = end - len(token)
                ttype = words[state].get(token)
                if ttype is None:
                    ttype = "NAME"
                    value = new_name(token, line, start - line_start + 1)
                else:
                    value = token  # a keyword
            elif index == punct_group:
                value = match[index]
                start = end - len(value)
                ttype = punctuation[value]
            elif index == newline_group:
                line_start = end
                line += 1
                line_starts.append(end)
                continue
            elif index == comment_group:
                continue
            elif index == other_group:
                return None  # a character no terminal starts with
            else:
                token = match[index]
                start = end - len(token)
                ttype = group_terminals[index]
                value = terminals[ttype](token, line, start - line_start + 1)
        elif _TRAILING_BLANKS.fullmatch(text, end) is None:
            return None
        else:
            ttype, start = "$END", end
        action = actions[state].get(ttype)
        while action is not None and action < 0:
            how, size, origin, keep, rule = reductions[~action]
            if how == _PASS:
                del states[-1]
            elif how == _APPEND:
                values[-2].append(values.pop())
                del starts[-1], states[-2:]
            else:
                if size:
                    base = len(values) - size
                    first = starts[base]
                    if keep is None:
                        children = values[base:]
                    else:
                        children = []
                        for offset, splice in keep:
                            child = values[base + offset]
                            if not splice:
                                children.append(child)
                            elif children:
                                children.extend(child)
                            else:
                                children = child  # a list rule's own list: grows in place
                    del states[-size:], values[base:], starts[base:]
                else:
                    children, first = [], start
                if rule is None:
                    node: Any = children
                elif how == _RULE:
                    node = rule(None, children)
                elif size:
                    first_line = bisect_right(line_starts, first)
                    first_column = first - line_starts[first_line - 1] + 1
                    span = construct_span(path, first_line, first_column, last_line, last_column)
                    node = rule(span, children)
                else:
                    node = rule(SourceSpan.point(path), children)
                values.append(node)
                starts.append(first)
            state = actions[states[-1]][origin]
            states.append(state)
            if state == end_state and ttype == "$END":
                items: list[Machine | Flow] = values[-1]
                return items
            action = actions[state].get(ttype)
        if action is None or match is None:
            return None
        state = action
        states.append(state)
        values.append(value)
        starts.append(start)
        last_line, last_column = line, end - line_start + 1
    return None  # not reached: the end of input returns above


def parse_text(text: str, path: str = "<input>") -> tuple[Machine | None, list[Diagnostic]]:
    return parse_source(decode_source(path, text.encode("utf-8")))


def parse_flows_text(text: str, path: str = "<input>") -> ParsedFile:
    return parse_file(decode_source(path, text.encode("utf-8")))


def _syntax_diagnostic(
    source: SourceFile, exc: UnexpectedInput, text: str | None = None
) -> Diagnostic:
    """The finding for one syntax error; `text` is the (partly repaired) text it was met in,
    which has the lines of the source."""
    text = (source.text or "") if text is None else text
    line = getattr(exc, "line", 1) or 1
    column = getattr(exc, "column", 1) or 1
    at_end = isinstance(exc, UnexpectedEOF) or (
        isinstance(exc, UnexpectedToken) and getattr(exc.token, "type", None) == "$END"
    )
    if at_end or line < 1:
        # Point just after the last written character, not at a trailing blank line.
        lines = source_lines(text.rstrip())
        line = len(lines)
        column = len(lines[-1]) + 1
    width = 1
    ch = ""
    if (
        isinstance(exc, UnexpectedToken)
        and isinstance(exc.token, Token)
        and exc.token.type != "$END"
    ):
        width = max(1, len(str(exc.token)))
        found = f"unexpected '{_clip(str(exc.token))}'"
    elif isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        ch = text[pos] if pos < len(text) else ""
        found = f"unexpected character {ch!r}"
        if ch == '"':
            found = "unterminated or invalid string"
    else:
        found = "unexpected end of file"
    span = SourceSpan.model_construct(
        path=source.path, line=line, column=column, end_line=line, end_column=column + width
    )
    expected = _expected_terminals(exc)
    offset = _offset(text, line, column)
    if found.startswith("unterminated"):
        return fail("E001", f"syntax error: {found}", span, _UNTERMINATED)
    if isinstance(exc, UnexpectedCharacters) and not ch.isascii():
        return fail("E001", f"syntax error: {found}", span, _NOT_ASCII)
    if "DURATION" in expected and (mistake := _duration_mistake(text, offset)) is not None:
        message, hint, size = mistake
        span = span.model_copy(update={"end_column": column + size})
        return fail("E001", message, span, hint)
    word = _NAME_RE.match(text, offset)
    if word is not None and (keyword := _close_keyword(word.group(), expected)) is not None:
        span = span.model_copy(update={"end_column": column + len(word.group())})
        return fail(
            "E001",
            f"syntax error: unknown keyword '{word.group()}'",
            span,
            f"did you mean '{keyword}'? (expected {_expected(expected)})",
        )
    if friendly := _friendly(exc):
        message, friendly_hint = friendly
        return fail("E001", f"{message} ({found})", span, friendly_hint)
    previous = _previous_token(text, offset)
    if previous is not None and not at_end and previous[1] < line:
        # The line ended too early: say so where it ends, not at the next line's first token.
        word_text, prev_line, prev_end = previous
        span = SourceSpan.model_construct(
            path=source.path,
            line=prev_line,
            column=prev_end,
            end_line=prev_line,
            end_column=prev_end + 1,
        )
        return fail(
            "E001",
            f"syntax error: the line ends after '{_clip(word_text)}'",
            span,
            f"expected {_expected(expected)} after '{_clip(word_text)}'",
        )
    hint = (
        f"expected {_expected(expected)}" if expected else "check the syntax just before this point"
    )
    return fail("E001", f"syntax error: {found}", span, hint)


_UNTERMINATED = 'close the string with " on the same line; escape quotes as \\"'
_NOT_ASCII = "names are ASCII letters, digits and underscores; put other text in a doc string"
_UNIT_NAMES = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds", "ms": "ms"}
_UNIT_MS = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_FRACTION = re.compile(r"([0-9]+)\.([0-9]+) ?([A-Za-z]*)")
_SPACED = re.compile(r"([0-9]+)[ \t]+(ms|s|m|h|d|w)(?![A-Za-z0-9_])")
_UNKNOWN_UNIT = re.compile(r"((?:[0-9]+(?:ms|s|m|h|d|w))*)([0-9]+)([A-Za-z_]+)")
_BARE_NUMBER = re.compile(r"[0-9]+(?![A-Za-z0-9_.])")
_UNIT_WORDS = {
    "min": "m",
    "mins": "m",
    "minute": "m",
    "minutes": "m",
    "sec": "s",
    "secs": "s",
    "second": "s",
    "seconds": "s",
    "hr": "h",
    "hrs": "h",
    "hour": "h",
    "hours": "h",
    "day": "d",
    "days": "d",
    "wk": "w",
    "wks": "w",
    "week": "w",
    "weeks": "w",
}


def _duration_mistake(text: str, offset: int) -> tuple[str, str, int] | None:
    """A precise message for a malformed duration where one was expected: a fraction
    (`1.5h`), a space before the unit (`48 h`), an unknown unit (`2y`, `3mo`) or none (`24`).
    Returns (message, hint, width of the mistake)."""
    if match := _FRACTION.match(text, offset):
        whole, fraction, unit = match.groups()
        size = _UNIT_MS.get(unit)
        hint = "durations are whole numbers: write it in a smaller unit or as a compound"
        if size is not None:
            millis = int(whole) * size + (int(fraction) * size) // 10 ** len(fraction)
            hint += f", e.g. {_compound(millis)}"
        return f"a duration cannot have a fraction ('{match.group()}')", hint, len(match.group())
    if match := _SPACED.match(text, offset):
        written = match.group(1) + match.group(2)
        return (
            f"a duration is written without a space before its unit ('{match.group()}')",
            f"write {written}",
            len(match.group()),
        )
    if match := _UNKNOWN_UNIT.match(text, offset):
        unit = match.group(3)
        known = _UNIT_WORDS.get(unit.lower())
        hint = (
            f"write {match.group(1)}{match.group(2)}{known} ({_UNIT_NAMES[known]})"
            if known
            else "units are ms, s, m, h, d and w (weeks); combine them as in 1d12h"
        )
        return f"unknown duration unit '{unit}' in '{match.group()}'", hint, len(match.group())
    if match := _BARE_NUMBER.match(text, offset):
        return (
            f"a duration needs a unit ('{match.group()}' has none)",
            _UNITS_HINT,
            len(match.group()),
        )
    return None


def _compound(millis: int) -> str:
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        count, millis = divmod(millis, _UNIT_MS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _offset(text: str, line: int, column: int) -> int:
    """The string offset of a 1-based line and column."""
    start = 0
    for _ in range(line - 1):
        found = text.find("\n", start)
        if found < 0:
            return len(text)
        start = found + 1
    return min(start + column - 1, len(text))


_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"?|(?:#|//)[^\n]*|[A-Za-z0-9_$]+|->|\S')
_BACK_WINDOW = 4096


def _previous_token(text: str, offset: int) -> tuple[str, int, int] | None:
    """The last token before `offset` (comments skipped): its text, line and end column.
    Looked for in growing windows of whole lines back from `offset`, so that a large file
    is not tokenized from its start for each syntax error."""
    last = None
    start = offset
    while last is None and start > 0:
        start = text.rfind("\n", 0, max(0, start - _BACK_WINDOW)) + 1
        for match in _TOKENS.finditer(text, start, offset):
            if not match.group().startswith(("#", "//")):
                last = match
        offset = start
    if last is None:
        return None
    line = text.count("\n", 0, last.start()) + 1
    line_start = text.rfind("\n", 0, last.start()) + 1
    return last.group(), line, last.end() - line_start + 1


@cache
def _keywords() -> dict[str, str]:
    """Keyword terminal -> its word (`STATE` -> `state`), `queue`/`role` included."""
    words: dict[str, str] = {}
    for terminal in _lark().terminals:
        pattern = terminal.pattern
        if isinstance(pattern, PatternStr) and _NAME_RE.fullmatch(pattern.value):
            words[terminal.name] = pattern.value
        elif listed := _WORD_LIST.fullmatch(pattern.value):
            for word in listed.group(1).split("|"):
                words[f"{terminal.name}:{word}"] = word
    return words


def _close_keyword(word: str, expected: set[str]) -> str | None:
    """The expected keyword that `word` misspells, if one is close (`inital` -> `initial`)."""
    keywords = _keywords()
    candidates = [
        text
        for terminal, text in keywords.items()
        if terminal.split(":")[0] in expected and text != word
    ]
    if not candidates:
        return None
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _clip(text: str, limit: int = 40) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _expected_terminals(exc: UnexpectedInput) -> set[str]:
    raw = getattr(exc, "expected", None) or getattr(exc, "allowed", None) or set()
    return {str(term) for term in raw}


def _expected(terminals: set[str]) -> str:
    """Every expected token, in words: `'->', a name or '}'`."""
    names: set[str] = set()
    for term in terminals:
        names.add(_TERMINAL_NAMES.get(term, f"'{term.lower()}'" if term.isupper() else term))
    ordered = sorted(names)
    if len(ordered) <= 1:
        return "".join(ordered)
    return ", ".join(ordered[:-1]) + " or " + ordered[-1]


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
                _lark().parse(snippet)
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
