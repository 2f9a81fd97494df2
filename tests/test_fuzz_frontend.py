"""Whatever the input, `check_paths` returns diagnostics with positions and never raises:
random bytes, random text, token soup, mutated machines, and the hostile cases by name."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from autonomic.compiler.checks import CheckReport, check_paths
from autonomic.compiler.errors import CODES
from autonomic.compiler.report import render_json, render_sarif, render_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "checks"
TEN_MB = 10 * 1024 * 1024

# C0 controls other than newline, DEL, C1 controls and the bidi overrides/isolates: none may
# reach a terminal from rendered text.
UNSAFE_FOR_TERMINAL = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)

SEED_MACHINE = """# a machine that uses every construct
@allow(W204, "Legacy is accepted nowhere on purpose")
machine Seed "Every construct once." {
  event Approve "doc" { approver: str, note: str?, tier: enum(basic, "pro"), amount: decimal }
  event Suspend
  event Legacy
  event PaymentFailed
  initial state Pending "doc" {
    on Approve -> Active when is_approver do record_approval, notify emit Seed.Suspend
    on Approve -> Rejected else
    ignore Suspend
    escalate ApprovalLadder {
      after 24h notify queue manager_review_queue within 4h "Manual review"
      after 48h notify role director within 1h
      after 72h -> Active do auto_approve
    }
  }
  state Active { on Suspend -> Suspended  after 30d -> Expired }
  state Suspended { after 72h -> Rejected  on PaymentFailed -> Retry1 }
  state Retry1 { on Approve -> Active }
  state Retry2 { on Approve -> Active }
  final state Rejected
  final state Expired
  final state Gave
  retry PaymentRetry on PaymentFailed {
    from Retry1
    step Retry2 after 1h do retry_charge
    exhausted -> Gave
  }
}
"""

TOKENS = [
    "machine", "event", "state", "initial", "final", "perpetual", "on", "->", "when", "else",
    "do", "emit", "after", "ignore", "escalate", "notify", "queue", "role", "within", "retry",
    "from", "step", "exhausted", "@allow", "(", ")", "{", "}", ",", ":", "?", ".", "enum",
    "str", "int", "decimal", "bool", "datetime", "24h", "0s", "1d", "30m", "250ms", "A", "B",
    "Go", "Stop", "M", "W201", "E104", '"doc"', '"', "\\", "#", "//", "\n", "\x00", "\u202e",
    "é", "_x", "class", "None", "1h30m", "->->",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_bytes(folder: Path, data: bytes, name: str = "m.fsm") -> CheckReport:
    path = folder / name
    path.write_bytes(data)
    report = check_paths([path])
    assert_sane(report)
    return report


def assert_sane(report: CheckReport) -> None:
    """Every finding is a known code with a real position, a message and a hint, and every
    renderer copes with it."""
    for diagnostic in report.diagnostics:
        span = diagnostic.span
        assert diagnostic.code in CODES
        assert diagnostic.severity is CODES[diagnostic.code][0]
        assert diagnostic.message and diagnostic.hint
        assert span.line >= 1 and span.column >= 1
        assert (span.end_line, span.end_column) >= (span.line, span.column)
        source = report.sources.get(span.path)
        if source is not None and source.lines is not None:
            assert span.line <= max(len(source.lines), 1)
    keys = [d.sort_key() for d in report.diagnostics]
    assert keys == sorted(keys)
    text = render_text(report)
    assert not UNSAFE_FOR_TERMINAL.search(text)
    assert len(json.loads(render_json(report))["diagnostics"]) == len(report.diagnostics)
    assert len(json.loads(render_sarif(report))["runs"][0]["results"]) == len(report.diagnostics)


def fixture_texts() -> Iterator[str]:
    yield SEED_MACHINE
    for path in sorted(FIXTURES.glob("*.fsm")):
        data = path.read_bytes()
        if b"\xff" not in data:
            yield data.decode("utf-8")


SEEDS = list(fixture_texts())


def test_the_seed_machine_is_clean(workdir: Path) -> None:
    report = check_bytes(workdir, SEED_MACHINE.encode(), "seed.fsm")
    assert report.diagnostics == []


# ---------------------------------------------------------------- hypothesis

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_bytes(workdir: Path, data: bytes) -> None:
    check_bytes(workdir, data)


@FUZZ
@given(text=st.text(max_size=1500))
def test_random_text(workdir: Path, text: str) -> None:
    check_bytes(workdir, text.encode("utf-8", errors="surrogatepass"))


@FUZZ
@given(words=st.lists(st.sampled_from(TOKENS), max_size=120))
def test_token_soup(workdir: Path, words: list[str]) -> None:
    check_bytes(workdir, ("machine M { " + " ".join(words)).encode("utf-8"))


@st.composite
def mutated_machines(draw: st.DrawFn) -> str:
    """A valid or nearly valid machine with a few deletions, insertions, swaps, duplicates."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        size = len(text)
        start = draw(st.integers(min_value=0, max_value=size))
        end = draw(st.integers(min_value=start, max_value=min(size, start + 40)))
        kind = draw(st.sampled_from(["delete", "insert", "swap", "duplicate", "replace"]))
        if kind == "delete":
            text = text[:start] + text[end:]
        elif kind == "insert":
            token = draw(st.sampled_from(TOKENS) | st.text(max_size=8))
            text = f"{text[:start]} {token} {text[start:]}"
        elif kind == "swap":
            other = draw(st.integers(min_value=0, max_value=size))
            first, second = sorted((start, other))
            text = text[:first] + text[end:] + text[first:end] if first < start else text
            text = text[:second] + text[start:end] + text[second:] if second > end else text
        elif kind == "duplicate":
            text = text[:end] + text[start:end] + text[end:]
        else:
            token = draw(st.sampled_from(TOKENS))
            text = text[:start] + token + text[end:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_machines())
def test_mutated_machines(workdir: Path, text: str) -> None:
    check_bytes(workdir, text.encode("utf-8", errors="surrogatepass"))


# ---------------------------------------------------------------- hostile inputs by name


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "E004"),
        (b"   \n\t\n", "E004"),
        (b"# nothing but a comment", "E004"),
        (b"\x00\x01\x02binary\xff\xfe", "E002"),
        (b"machine M {\n  state A\x00 }", "E002"),
        (b"machine M { \x80 }", "E002"),
        (b"machine M { state A \xc3", "E002"),
        (b"machine \xc0\xaf { }", "E002"),
        (b"machine \xed\xa0\x80 { }", "E002"),
        (b"\xef\xbb\xbf\xef\xbb\xbfmachine M { }", "E001"),
        ("machine M { state \u202eA }".encode(), "E001"),
        (b"{" * 100_000, "E001"),
        (b"machine M " + b"{" * 100_000 + b"}" * 100_000, "E001"),
        (b"machine M { state A " + b"{" * 50_000, "E001"),
        (b"machine M {\r  state A\r}\r", "E101"),
        (b"machine M {" + b"\n" * 100_000, "E001"),
        (b"@allow(" * 10_000, "E001"),
        (b'"' * 100_001, "E001"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_hostile_input(workdir: Path, data: bytes, code: str) -> None:
    report = check_bytes(workdir, data)
    assert report.diagnostics, "every hostile input gets at least one finding"
    assert report.diagnostics[0].code == code


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"x" * TEN_MB, [("E001", 1)]),
        (b"machine M { " + b"a" * TEN_MB + b" }", [("E001", 13)]),
        (b'machine M { state A "' + b"d" * TEN_MB, [("E001", 21)]),
        (b"machine M { state A } " + b"}" * TEN_MB, [("E001", 23)]),
        (
            b'machine M "' + b"d" * TEN_MB + b'" { initial state A }',
            [("W202", 9), ("W203", TEN_MB + 30)],
        ),
        (b"#" + b"c" * TEN_MB + b"\nmachine M { initial final state A }", [("E116", 33)]),
    ],
    ids=["garbage", "name", "unterminated-string", "braces", "doc", "comment"],
)
def test_ten_megabyte_line(workdir: Path, data: bytes, expected: list[tuple[str, int]]) -> None:
    report = check_bytes(workdir, data)
    assert [(d.code, d.span.column) for d in report.diagnostics] == expected
    text = render_text(report)
    assert len(text) < 5000, "a huge line is echoed clipped"


def test_directory_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "folder.fsm").mkdir()
    report = check_paths([tmp_path / "folder.fsm", tmp_path / "missing.fsm", tmp_path / "x" / "y"])
    assert_sane(report)
    assert [d.code for d in report.diagnostics] == ["W207", "E003", "E003"]


def test_symlink_loop_in_a_folder_terminates(tmp_path: Path) -> None:
    (tmp_path / "a.fsm").write_text("machine A {")
    os.symlink(tmp_path, tmp_path / "loop")
    report = check_paths([tmp_path])
    assert_sane(report)
    assert list(report.sources) == [str(tmp_path / "a.fsm")]


def test_dangling_symlink_is_e003(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.fsm", tmp_path / "dangling.fsm")
    report = check_paths([tmp_path])
    assert_sane(report)
    assert [d.code for d in report.diagnostics] == ["E003"]


def test_bidi_controls_in_docs_never_reach_the_terminal(workdir: Path) -> None:
    text = 'machine M "\u202eevil\u2066" {\n  initial state A "\u202e" { on E -> B }\n}\n'
    report = check_bytes(workdir, text.encode())
    # Both the unknown event and the unknown state line echo the doc string's line.
    assert {d.code for d in report.diagnostics} >= {"E104", "E106"}


def test_control_characters_in_a_file_name_are_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "evil\u202e\x1b[31m.fsm"
    path.write_text("machine M {")
    report = check_paths([path])
    assert_sane(report)
    assert [d.code for d in report.diagnostics] == ["W206", "E001"]


@pytest.mark.parametrize("path", ["", "with\x00nul.fsm", "x" * 5000 + ".fsm", "/dev/null"])
def test_odd_paths_are_findings(path: str) -> None:
    report = check_paths([path])
    assert_sane(report)
    assert [d.code for d in report.diagnostics] in (["E003"], ["E004"])
