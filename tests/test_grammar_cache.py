"""The parser cache: a loaded parser parses exactly as a built one, and a cache that is stale,
corrupt, planted or unwritable is never trusted and never stops a command."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lark
import pytest
from autonomic.compiler.grammar_cache import cache_key, default_folders, load_parser
from autonomic.compiler.parser import LARK_OPTIONS, _grammar
from lark import Lark, Token, Tree, UnexpectedInput

REPO = Path(__file__).resolve().parents[1]
BUILT = "<string>"  # lark's source_path of a parser built from grammar text
LOADED = "<deserialized>"  # ... and of one loaded from a cache


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def shape(node: object) -> object:
    """A parse tree with every position, token type and value in it."""
    if isinstance(node, Token):
        return (node.type, str(node), node.line, node.column, node.end_line, node.end_column)
    assert isinstance(node, Tree)
    meta = node.meta
    where = None if meta.empty else (meta.line, meta.column, meta.end_line, meta.end_column)
    return (str(node.data), where, [shape(child) for child in node.children])


def outcome(parser: Lark, text: str) -> object:
    try:
        return shape(parser.parse(text))
    except UnexpectedInput as exc:
        expected = getattr(exc, "expected", None) or ()
        return type(exc).__name__, exc.line, exc.column, sorted(map(str, expected))


def test_a_loaded_parser_parses_every_machine_and_fixture_as_a_built_one(tmp_path: Path) -> None:
    built = load_parser(_grammar(), LARK_OPTIONS, [tmp_path])
    loaded = load_parser(_grammar(), LARK_OPTIONS, [tmp_path])
    assert (built.source_path, loaded.source_path) == (BUILT, LOADED)
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "machines").glob("*.fsm"))]
    for path in sorted((REPO / "tests" / "fixtures").rglob("*.fsm")):
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    texts += ["machine M { state A { on E B } }", "machine M { state A { after 24 -> B } }"]
    failures = 0
    for text in texts:
        expected = outcome(built, text)
        failures += isinstance(expected, tuple)
        assert outcome(loaded, text) == expected
    assert failures >= 2  # syntax errors are compared too


def test_the_cache_is_written_once_atomically_and_read_back(tmp_path: Path) -> None:
    load_parser(_grammar(), LARK_OPTIONS, [tmp_path])
    [written] = cache_files(tmp_path)  # no temporary file left behind
    before = written.stat()
    assert load_parser(_grammar(), LARK_OPTIONS, [tmp_path]).source_path == LOADED
    after = written.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert written.read_bytes().startswith(
        b"autonomic-lark-cache 1 " + cache_key(_grammar(), LARK_OPTIONS).encode()
    )


def test_the_key_follows_the_grammar_the_options_and_the_lark_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = cache_key(_grammar(), LARK_OPTIONS)
    assert cache_key(_grammar() + "\n", LARK_OPTIONS) != key
    assert cache_key(_grammar(), {**LARK_OPTIONS, "propagate_positions": False}) != key
    monkeypatch.setattr(lark, "__version__", "0.0.1")
    assert cache_key(_grammar(), LARK_OPTIONS) != key


def _cached(tmp_path: Path) -> Path:
    load_parser(_grammar(), LARK_OPTIONS, [tmp_path])
    [written] = cache_files(tmp_path)
    return written


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bit_flipped(data: bytes) -> bytes:
    at = len(data) * 3 // 4
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _other_lark(data: bytes) -> bytes:
    header, _, body = data.partition(b"\n")
    stale = cache_key(_grammar() + "# another grammar\n", LARK_OPTIONS).encode()
    return b" ".join([*header.split(b" ")[:2], stale, header.split(b" ")[-1]]) + b"\n" + body


@pytest.mark.parametrize(
    "damage",
    [
        _truncated,
        _bit_flipped,
        _other_lark,
        lambda data: b"",
        lambda data: b"\xff" * 500,
        lambda data: data + b"\0" * (16 << 20),
    ],
    ids=["truncated", "bit-flipped", "stale-key", "empty", "garbage", "oversized"],
)
def test_a_damaged_or_stale_cache_is_rebuilt_and_replaced(tmp_path: Path, damage: object) -> None:
    written = _cached(tmp_path)
    sound = written.read_bytes()
    assert callable(damage)
    written.write_bytes(damage(sound))
    parser = load_parser(_grammar(), LARK_OPTIONS, [tmp_path])
    assert parser.source_path == BUILT
    assert cache_files(tmp_path) == [written]  # replaced by a sound cache, read next time
    assert written.read_bytes() != damage(sound)
    again = load_parser(_grammar(), LARK_OPTIONS, [tmp_path])
    assert again.source_path == LOADED
    text = (REPO / "machines" / "billing.fsm").read_text(encoding="utf-8")
    assert shape(parser.parse(text)) == shape(again.parse(text))


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_planted_cache_with_a_valid_checksum_runs_no_code(tmp_path: Path) -> None:
    written = _cached(tmp_path)
    marker = tmp_path / "planted-code-ran"
    body = pickle.dumps({"data": _Planted(marker), "memo": {}})
    key = cache_key(_grammar(), LARK_OPTIONS)
    written.write_bytes(
        b"autonomic-lark-cache 1 %s %s\n"
        % (key.encode(), hashlib.sha256(body).hexdigest().encode())
        + body
    )
    assert load_parser(_grammar(), LARK_OPTIONS, [tmp_path]).source_path == BUILT
    assert not marker.exists()


def test_an_unwritable_folder_falls_back_to_the_next_then_to_memory(tmp_path: Path) -> None:
    # A folder under a regular file can be neither created nor written, even by root.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    install, user = blocker / "__pycache__", tmp_path / "user-cache"
    assert load_parser(_grammar(), LARK_OPTIONS, [install, user]).source_path == BUILT
    assert len(cache_files(user)) == 1
    assert load_parser(_grammar(), LARK_OPTIONS, [install, user]).source_path == LOADED
    parser = load_parser(_grammar(), LARK_OPTIONS, [install, blocker / "other"])
    assert parser.source_path == BUILT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "user-cache"]


def test_a_failed_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert load_parser(_grammar(), LARK_OPTIONS, [tmp_path]).source_path == BUILT
    assert cache_files(tmp_path) == []


def test_the_folders_are_beside_the_grammar_then_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grammar = tmp_path / "grammar"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_folders(grammar) == [grammar / "__pycache__", tmp_path / "xdg" / "autonomic"]
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_folders(grammar)[1] == tmp_path / "home" / ".cache" / "autonomic"


def test_check_imports_neither_the_runtime_nor_networkx() -> None:
    # What keeps `autonomic check` quick to start besides the cache: the runtime's commands
    # and networkx are imported only by the commands that use them.
    probe = (
        "import sys\n"
        "from autonomic.compiler.cli import main\n"
        "code = main(['check', 'machines'])\n"
        "heavy = ('networkx', 'autonomic.runtime')\n"
        "print(code, sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr
