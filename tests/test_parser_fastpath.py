"""The parser's fast path reads every input it accepts exactly as lark does: same IR, same
spans, same diagnostics; and it accepts the machines it is there for."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from autonomic.compiler.parser import _fast_tables, _lark, _parse_fast, parse_text
from autonomic.compiler.transform import ModelBuilder
from lark import UnexpectedInput

REPO = Path(__file__).resolve().parents[1]
KEYWORDS = [
    "machine", "event", "state", "initial", "final", "perpetual", "on", "when", "else", "do",
    "emit", "after", "ignore", "escalate", "notify", "queue", "role", "within", "retry", "from",
    "step", "exhausted", "enum", "onE", "queuex", "_on",
]  # fmt: skip
PIECES = [
    *KEYWORDS, "->", "@allow", "(", ")", "{", "}", ",", ":", "?", ".", '"doc"', "24h", "0s",
    "A", "B", "\n", " ", "\t", "\r", "\x0c", "\x0b", "# c\n", "// c\n", "é", "24", "1d2",
]  # fmt: skip
TOKEN = re.compile(r'\s+|[A-Za-z_]\w*|[0-9]+[a-z]*|"(?:[^"\\\n]|\\.)*"|->|@allow|.')


def corpus() -> list[str]:
    texts = [EVERY_CONSTRUCT]
    texts += [p.read_text(encoding="utf-8") for p in sorted((REPO / "machines").glob("*.fsm"))]
    for path in sorted((REPO / "tests" / "fixtures").rglob("*.fsm")):
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def by_lark(text: str) -> object:
    """What the reference path makes of `text`: the machines, or the syntax error."""
    builder = ModelBuilder("m.fsm", "")
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        return type(exc).__name__
    return [m.model_dump() for m in builder.transform(tree)], builder.diagnostics


def by_fast_path(text: str) -> object:
    builder = ModelBuilder("m.fsm", "")
    machines = _parse_fast(text, builder)
    if machines is None:
        return None
    return [m.model_dump() for m in machines], builder.diagnostics


def variants(texts: list[str], count: int, seed: int) -> list[str]:
    """Token-level mutations: deleted, inserted, replaced and glued tokens, changed blanks."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = TOKEN.findall(rng.choice(texts))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(parts))
            action = rng.randrange(4)
            if action == 0:
                del parts[at]
            elif action == 1:
                parts.insert(at, rng.choice(PIECES))
            elif action == 2:
                parts[at] = rng.choice(PIECES)
            elif parts[at].isspace():
                parts[at] = rng.choice(["", " ", "\n", "  # c\n", "\r\n"])
        out.append("".join(parts))
    return out


EVERY_CONSTRUCT = """# a comment
@allow(W204, "kept")
machine Seed perpetual "Every construct." {
  event Approve "doc" { approver: str, note: str?, tier: enum(basic, "pro"), amount: decimal }
  event Suspend
  initial state Pending "doc" {
    on Approve -> Active when is_approver do record, notify emit Seed.Suspend, Suspend
    on Approve -> Done else  // another comment
    ignore Suspend
    escalate Ladder {
      after 24h notify queue review within 4h "Manual review"
      after 48h notify role director
      after 72h -> Active do auto_approve
    }
  }
  state Active { on Suspend -> Retry1  after 30d -> Done emit Suspend }
  state Retry1 { on Approve -> Active }
  final state Done
  retry R on Suspend { from Active step Retry1 after 1h do retry exhausted -> Done }
}
"""


def test_the_fast_path_is_in_use() -> None:
    assert _fast_tables() is not None
    fast = by_fast_path(EVERY_CONSTRUCT)
    assert fast is not None
    assert fast == by_lark(EVERY_CONSTRUCT)


@pytest.mark.parametrize("seed", range(4))
def test_whatever_the_fast_path_accepts_lark_reads_the_same(seed: int) -> None:
    texts = corpus()
    accepted = 0
    for text in [*texts, *variants(texts, 300, seed)]:
        fast = by_fast_path(text)
        if fast is not None:
            accepted += 1
            assert fast == by_lark(text), text
    assert accepted > 50  # the mutations must exercise the fast path, not only the fallback


def test_keywords_stay_contextual_as_in_lark() -> None:
    base = corpus()[0]
    names = list(re.finditer(r"\b[A-Z][A-Za-z0-9_]*\b", base))[:40]
    for found in names:
        for word in KEYWORDS:
            text = base[: found.start()] + word + base[found.end() :]
            fast = by_fast_path(text)
            if fast is not None:
                assert fast == by_lark(text), (word, found.start())


def test_syntax_errors_are_lark_s() -> None:
    machine, diagnostics = parse_text("machine M { state A { on E B } }", "bad.fsm")
    assert machine is None
    assert [(d.code, d.span.line, d.span.column) for d in diagnostics] == [("E001", 1, 28)]
