"""The whole `autonomic` command line under hostile input, as real subprocesses.

Every user error is a diagnostic `path:line:col: CODE ...` with a hint and exit 1; usage is
exit 2; never a traceback; bad input never changes a byte of what is stored. A hypothesis
test drives `main(argv)` in-process with random argument lists for the same promises.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from autonomic.compiler import cli
from autonomic.runtime.errors import StoreConfigError
from autonomic.runtime.store.sqlite import SQLiteStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSTIC = re.compile(r"^\S.*:\d+:\d+: [A-Z]\d{3} ", re.MULTILINE)
HINT = re.compile(r"^\s+= hint: \S", re.MULTILINE)
INTERNAL = "autonomic: internal error:"  # the crash report (the help names exit 70 too)


def autonomic(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autonomic.compiler.cli", *argv],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, stream
        assert INTERNAL not in stream, stream


def assert_diagnostic(
    result: subprocess.CompletedProcess[str], code: str, stream: str = "stderr"
) -> str:
    """Exit 1, and `stream` starts with a diagnostic of `code` that has a hint."""
    assert_clean(result)
    text: str = getattr(result, stream)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    first = text.splitlines()[0] if text else ""
    assert DIAGNOSTIC.match(first) and f": {code} " in first, text
    assert HINT.search(text), text
    return text


def sqlite_tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}


# ---------------------------------------------------------------------------------------------
# A folder of hostile inputs, and a real store with a signed ledger written by the demo.


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "bin.fsm").write_bytes(b"\xff\xfe\x00garbage\x80\x00\x01")
    (root / "badutf.fsm").write_bytes(b"machine X { \xc3\x28 }\n")
    (root / "empty.fsm").write_bytes(b"")
    (root / "big.fsm").write_text("x" * 10_000_000 + "\n", encoding="ascii")  # a 10 MB line
    (root / "dir.fsm").mkdir()
    (root / "notes.txt").write_text("not a machine\n", encoding="utf-8")
    shutil.copytree(ROOT / "machines", root / "machines")
    done = autonomic("demo", "--db", "store.db", "--keys", "keys", cwd=root)
    assert done.returncode == 0, done.stderr
    exported = autonomic("audit", "export", "store.db", "--out", "export.jsonl", cwd=root)
    assert exported.returncode == 0, exported.stderr
    lines = (root / "export.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "truncated.jsonl").write_text("".join(lines[:5]) + lines[5][:40], encoding="utf-8")
    (root / "notkey.json").write_text(json.dumps({"format": "something else"}), encoding="utf-8")
    (root / "garbage-keys").mkdir()
    (root / "garbage-keys" / "0000.private.pem").write_bytes(b"-----BEGIN nonsense\n")
    (root / "garbage-keys" / "0000.private.pem").chmod(0o600)
    scripts = {
        "ok.yaml": "steps:\n  - advance: 1h\n",
        "bad.yaml": "steps: [\n  - dispatch: Approve\n",
        "unknown-event.json": '{"steps": [{"dispatch": "Aprove"}]}',
        "bad-payload.yaml": "steps:\n  - dispatch: Approve\n    payload: {approver: [1, 2]}\n",
        "bad-duration.yaml": "steps:\n  - advance: 3 fortnights\n",
        "huge-duration.yaml": "steps:\n  - advance: 99999999999999999999d\n",
        "python-tag.yaml": "steps:\n  - dispatch: Approve\n"
        "    payload: !!python/object:os.system x\n",
        "bad-date.yaml": "start: 2026-13-45\nsteps: []\n",
        "alias-cycle.yaml": "steps:\n  - dispatch: Approve\n    payload: &p {approver: *p}\n",
    }
    for name, text in scripts.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def public_key(world: Path) -> str:
    (public,) = (world / "keys").glob("*.public.json")
    return str(public.relative_to(world))


def private_key(world: Path) -> str:
    (private,) = (world / "keys").glob("*.private.pem")
    return str(private.relative_to(world))


# ---------------------------------------------------------------------------------------------
# Every command, bad input: a diagnostic with a code and a hint, exit 1, no traceback.

OUT, ERR = "stdout", "stderr"
# (id, command line split on spaces, code, stream); {pub} and {priv} are the world's keys.
CASES: list[tuple[str, str, str, str]] = [
    # check: the report is the command's output, so its findings go to stdout
    ("check-missing", "check missing.fsm", "E003", OUT),
    ("check-binary", "check bin.fsm", "E002", OUT),
    ("check-invalid-utf8", "check badutf.fsm", "E002", OUT),
    ("check-empty-file", "check empty.fsm", "E004", OUT),
    ("check-10mb-line", "check big.fsm", "E001", OUT),
    ("check-empty-folder-strict", "check --strict dir.fsm", "W207", OUT),
    ("check-output-is-a-folder", "check machines --output dir.fsm", "E006", ERR),
    ("check-output-nowhere", "check machines -o nowhere/r.txt", "E006", ERR),
    ("build-missing", "build missing.fsm --out gen-missing", "E003", ERR),
    ("build-binary", "build bin.fsm --out gen-binary", "E002", ERR),
    ("build-out-is-a-file", "build machines --out notes.txt", "E006", ERR),
    ("build-empty-folder", "build dir.fsm --out gen-empty", "E007", ERR),
    ("graph-unknown-machine", "graph Biling", "E007", ERR),
    ("graph-missing-folder", "graph Billing --machines nowhere", "E003", ERR),
    ("graph-binary", "graph bin.fsm", "E002", ERR),
    ("graph-folder-named-fsm", "graph dir.fsm", "E007", ERR),
    ("graph-output-is-a-folder", "graph Billing -o dir.fsm", "E006", ERR),
    ("graph-svg-nowhere", "graph Billing --format svg -o nowhere/b.svg", "E006", ERR),
    ("graph-unknown-view", "graph Billing --view Dispute", "E007", ERR),
    ("graph-view-without-groups", "graph Entitlement --view overview", "E007", ERR),
    # keygen and audit
    ("keygen-existing-key-folder", "keygen keys", "A011", ERR),
    ("keygen-into-a-file", "keygen notes.txt", "A010", ERR),
    ("keygen-unwritable", "keygen /proc/autonomic-h8-keys", "A010", ERR),
    (
        "keygen-retire-missing",
        "keygen k-new --retire gone.public.json --ledger store.db",
        "A010",
        ERR,
    ),
    ("keygen-retire-not-json", "keygen k-new --retire bin.fsm --ledger store.db", "A010", ERR),
    ("verify-missing", "audit verify missing.db --public-key {pub}", "A001", ERR),
    ("verify-garbage", "audit verify bin.fsm --public-key {pub}", "A002", ERR),
    ("verify-empty", "audit verify empty.fsm --public-key {pub}", "A002", ERR),
    ("verify-folder", "audit verify dir.fsm --public-key {pub}", "A001", ERR),
    ("verify-json-not-a-key", "audit verify store.db --public-key notkey.json", "A010", ERR),
    ("verify-key-garbage", "audit verify store.db --public-key bin.fsm", "A010", ERR),
    ("verify-key-private", "audit verify store.db --public-key {priv}", "A010", ERR),
    ("verify-key-folder", "audit verify store.db --public-key keys", "A010", ERR),
    ("verify-key-missing", "audit verify store.db --public-key no.json", "A010", ERR),
    (
        "verify-checkpoint-garbage",
        "audit verify store.db --public-key {pub} --checkpoint bin.fsm",
        "A020",
        ERR,
    ),
    (
        "verify-checkpoint-is-a-key",
        "audit verify store.db --public-key {pub} --checkpoint {pub}",
        "A020",
        ERR,
    ),
    ("export-missing", "audit export missing.db", "A001", ERR),
    ("export-garbage", "audit export bin.fsm --out x.jsonl", "A002", ERR),
    ("export-out-folder", "audit export store.db --out dir.fsm", "A004", ERR),
    ("export-out-nowhere", "audit export store.db --out no/x.jsonl", "A004", ERR),
    ("show-garbage", "audit show bin.fsm acme-1", "A002", ERR),
    ("show-folder", "audit show dir.fsm acme-1", "A001", ERR),
    ("show-unknown-instance", "audit show store.db nobody", "A005", ERR),
    ("checkpoint-garbage", "audit checkpoint bin.fsm --out cp.json", "A002", ERR),
    ("checkpoint-missing", "audit checkpoint no.db --out cp.json", "A001", ERR),
    ("checkpoint-out-folder", "audit checkpoint store.db --out dir.fsm", "A004", ERR),
    # simulate
    ("simulate-missing-script", "simulate entitlement --script no.yaml", "S001", ERR),
    ("simulate-binary-script", "simulate entitlement --script bin.fsm", "S001", ERR),
    ("simulate-folder-script", "simulate entitlement --script dir.fsm", "S001", ERR),
    ("simulate-empty-script", "simulate entitlement --script empty.fsm", "S003", ERR),
    ("simulate-10mb-line", "simulate entitlement --script big.fsm", "S001", ERR),
    ("simulate-endless-script", "simulate entitlement --script /dev/zero", "S001", ERR),
    ("simulate-invalid-yaml", "simulate entitlement --script bad.yaml", "S002", ERR),
    ("simulate-unknown-event", "simulate entitlement --script unknown-event.json", "S004", ERR),
    ("simulate-bad-payload", "simulate entitlement --script bad-payload.yaml", "S008", ERR),
    ("simulate-bad-duration", "simulate entitlement --script bad-duration.yaml", "S006", ERR),
    ("simulate-huge-duration", "simulate entitlement --script huge-duration.yaml", "S006", ERR),
    ("simulate-python-tag", "simulate entitlement --script python-tag.yaml", "S003", ERR),
    ("simulate-bad-date", "simulate entitlement --script bad-date.yaml", "S003", ERR),
    ("simulate-alias-cycle", "simulate entitlement --script alias-cycle.yaml", "S003", ERR),
    ("simulate-unknown-machine", "simulate Nope --script ok.yaml", "S010", ERR),
    ("simulate-machine-file", "simulate machines/entitlement.fsm --script ok.yaml", "S010", ERR),
    ("simulate-not-generated", "simulate ./notes.py --script ok.yaml", "S010", ERR),
    # demo
    ("demo-db-is-a-folder", "demo --db dir.fsm --keys keys", "R022", ERR),
    ("demo-db-in-a-file", "demo --db notes.txt/s.db --keys keys", "R022", ERR),
    ("demo-garbage-key", "demo --db g.db --keys garbage-keys", "A010", ERR),
    ("demo-key-is-public", "demo --db g.db --keys {pub}", "A010", ERR),
    ("demo-generated-missing", "demo --generated nowhere", "S010", ERR),
]


@pytest.mark.parametrize(
    ("command", "code", "stream"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_diagnostic(world: Path, command: str, code: str, stream: str) -> None:
    (world / "notes.py").write_text("print('not generated')\n", encoding="utf-8")
    argv = command.format(pub=public_key(world), priv=private_key(world)).split()
    result = autonomic(*argv, cwd=world)
    assert_diagnostic(result, code, stream)
    assert not (world / "k-new").exists()  # --retire is checked before a key is written
    assert not (world / "g.db").exists()  # the demo opens no store before its key is usable


USAGE = [
    [],
    ["bogus"],
    ["check"],
    ["check", "machines", "--format", "xml"],
    ["graph", "Billing", "--format", "png"],
    ["build", "--out"],
    ["keygen"],
    ["keygen", "k", "--valid-from", "next tuesday"],
    ["audit"],
    ["audit", "verify", "store.db"],
    ["audit", "checkpoint", "store.db"],
    ["audit", "show", "store.db"],
    ["simulate", "entitlement"],
    ["demo", "--bogus"],
]


def test_usage_errors_say_what_is_missing(world: Path) -> None:
    alone = autonomic(cwd=world)
    assert "  build     check, then generate" in alone.stderr  # the commands, not only a usage
    show = autonomic("audit", "show", "store.db", cwd=world)
    assert show.returncode == 2
    assert "which instance? pass its id after the ledger" in show.stderr
    assert "no ledger" not in show.stderr


@pytest.mark.parametrize("argv", USAGE, ids=[" ".join(a) or "(none)" for a in USAGE])
def test_usage_errors_exit_2(world: Path, argv: list[str]) -> None:
    result = autonomic(*argv, cwd=world)
    assert_clean(result)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: autonomic")
    assert "error:" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_files_are_diagnostics(world: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked.fsm"
    shutil.copy(world / "machines" / "billing.fsm", locked)
    locked.chmod(0)
    try:
        assert_diagnostic(autonomic("check", str(locked), cwd=world), "E003", "stdout")
        script = tmp_path / "locked.yaml"
        script.write_text("steps: []\n", encoding="utf-8")
        script.chmod(0)
        result = autonomic("simulate", "entitlement", "--script", str(script), cwd=world)
        assert_diagnostic(result, "S001")
    finally:
        locked.chmod(0o600)


# ---------------------------------------------------------------------------------------------
# Bad input never loses or corrupts stored data.


def test_demo_leaves_files_that_are_not_its_store_untouched(world: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(foreign)) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total TEXT)")
        connection.execute("INSERT INTO invoices (total) VALUES ('99.00')")
        connection.commit()
    victims = {
        foreign: "R022",
        tmp_path / "notes.db": "R022",
        tmp_path / "binary.db": "R022",
    }
    (tmp_path / "notes.db").write_text("my notes\n", encoding="utf-8")
    (tmp_path / "binary.db").write_bytes(bytes(range(256)) * 64)
    for path, code in victims.items():
        before = path.read_bytes()
        result = autonomic("demo", "--db", str(path), "--keys", "keys", cwd=world)
        text = assert_diagnostic(result, code)
        assert "left untouched" in text
        assert path.read_bytes() == before
        assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    assert sqlite_tables(foreign) == {"invoices"}


def test_demo_refuses_a_store_signed_by_another_key(world: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    shutil.copy(world / "store.db", store)
    before = store.read_bytes()
    assert autonomic("keygen", str(tmp_path / "other"), cwd=world).returncode == 0
    result = autonomic("demo", "--db", str(store), "--keys", str(tmp_path / "other"), cwd=world)
    text = assert_diagnostic(result, "A003")
    assert "is not the pinned root" in text and "nothing was added" in text
    # A folder without any key is refused too, before a key is generated into it.
    empty_keys = tmp_path / "no-keys"
    result = autonomic("demo", "--db", str(store), "--keys", str(empty_keys), cwd=world)
    assert_diagnostic(result, "A010")
    assert not empty_keys.exists()
    assert store.read_bytes() == before


def test_demo_uses_the_given_key_and_runs_twice_on_one_store(world: Path, tmp_path: Path) -> None:
    keys = tmp_path / "my-keys"
    made = autonomic("keygen", str(keys), cwd=world)
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.split()[1]
    store = tmp_path / "again.db"
    first = autonomic("demo", "--db", str(store), "--keys", str(keys), cwd=world)
    assert first.returncode == 0, first.stderr
    assert "generated signing key" not in first.stdout
    assert f"; ledger: every entry signed by key {key_id}" in first.stdout
    # All seven governors are loaded: deliveries reach Subscription and CustomerAccount.
    assert "governor not loaded" not in first.stdout
    assert "outbox Subscription.RenewalFailed delivered: Subscription PastDue -> Suspended" in (
        first.stdout
    )
    assert "recorded action calls:" in first.stdout
    second = autonomic("demo", "--db", str(store), "--keys", str(keys), cwd=world)
    assert second.returncode == 0, second.stderr
    assert "customer acme-2" in second.stdout
    first_count = int(first.stdout.rsplit("ledger verified: ", 1)[1].split()[0])
    second_count = int(second.stdout.rsplit("ledger verified: ", 1)[1].split()[0])
    assert second_count > first_count
    verified = autonomic("audit", "verify", str(store), "--public-key", str(keys), cwd=world)
    assert verified.returncode == 1  # a folder is not a key file: a diagnostic, not a crash
    (public,) = keys.glob("*.public.json")
    verified = autonomic("audit", "verify", str(store), "--public-key", str(public), cwd=world)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"verified {second_count} entries")
    with contextlib.closing(sqlite3.connect(store)) as connection:
        stamps = [ts for (ts,) in connection.execute("SELECT ts_ms FROM ledger ORDER BY seq")]
    assert stamps == sorted(stamps)  # the second run's clock starts after the first's end


def test_outputs_never_replace_a_ledger_a_key_or_a_machine(world: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    shutil.copy(world / "store.db", store)
    keys = tmp_path / "keys"
    shutil.copytree(world / "keys", keys)
    (private,) = keys.glob("*.private.pem")
    shutil.copytree(world / "machines", tmp_path / "machines")
    machine = tmp_path / "machines" / "billing.fsm"
    guarded = [store, private, machine]
    before = {path: path.read_bytes() for path in guarded}
    attempts = [
        (["audit", "export", str(store), "--out", str(store)], "A004"),
        (["audit", "export", str(store), "--out", str(private)], "A004"),
        (["audit", "checkpoint", str(store), "--out", str(store)], "A004"),
        (["audit", "checkpoint", str(store), "--out", str(private)], "A004"),
        (["check", str(machine), "--output", str(machine)], "E006"),
        (["check", "machines", "--format", "sarif", "-o", str(machine)], "E006"),
        (["graph", str(machine), "-o", str(machine)], "E006"),
    ]
    for argv, code in attempts:
        assert_diagnostic(autonomic(*argv, cwd=world), code)
    assert {path: path.read_bytes() for path in guarded} == before
    # An earlier export of the same kind is replaced, atomically.
    exported = tmp_path / "ledger.jsonl"
    for _ in range(2):
        result = autonomic("audit", "export", str(store), "--out", str(exported), cwd=world)
        assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob(".*.tmp"))


def test_build_writes_only_into_a_folder_it_owns(world: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# My project\n", encoding="utf-8")
    result = autonomic("build", "machines", "--out", str(project), "--no-svg", cwd=world)
    assert_diagnostic(result, "E006")
    assert [p.name for p in project.iterdir()] == ["README.md"]
    assert (project / "README.md").read_text(encoding="utf-8") == "# My project\n"
    out = tmp_path / "generated"
    # 6 machines drawn whole x 3 (.py, .dot, .mmd); Billing's .py and 6 views x 2 (its
    # overview and five groups); 5 flows x 3; README.md and __init__.py
    for expected in ("48 files written", "0 files written"):
        built = autonomic("build", "machines", "--out", str(out), "--no-svg", cwd=world)
        assert built.returncode == 0, built.stderr
        assert expected in built.stdout


def test_keygen_retire_is_checked_before_a_key_is_written(world: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    assert autonomic("keygen", str(old), "--valid-from", "2030-01-01", cwd=world).returncode == 0
    (public,) = old.glob("*.public.json")
    before = public.read_bytes()
    new = tmp_path / "new"
    result = autonomic(
        "keygen",
        str(new),
        "--valid-from",
        "2029-01-01",
        "--retire",
        str(public),
        "--ledger",
        "store.db",
        cwd=world,
    )
    assert_diagnostic(result, "A013")
    assert not new.exists() and public.read_bytes() == before


def test_a_failed_verification_names_the_first_bad_seq(world: Path, tmp_path: Path) -> None:
    assert autonomic("keygen", str(tmp_path / "other"), cwd=world).returncode == 0
    (other,) = (tmp_path / "other").glob("*.public.json")
    result = autonomic("audit", "verify", "store.db", "--public-key", str(other), cwd=world)
    assert_clean(result)
    assert result.returncode == 1
    assert result.stdout.startswith("store.db: seq 0: ") and "not the pinned root" in result.stdout
    result = autonomic(
        "audit", "verify", "truncated.jsonl", "--public-key", public_key(world), cwd=world
    )
    assert_clean(result)
    assert result.returncode == 1
    assert re.match(r"truncated\.jsonl: seq \d+: line \d+: ", result.stdout), result.stdout


def test_paths_that_are_not_utf8_are_shown_escaped(world: Path) -> None:
    undecodable = os.fsdecode(b"\xff-missing.fsm")
    result = subprocess.run(
        [sys.executable, "-m", "autonomic.compiler.cli", "graph", undecodable],
        capture_output=True,
        timeout=60,
        cwd=world,
    )
    assert result.returncode == 1
    stderr = result.stderr.decode("utf-8")  # valid UTF-8: the byte is escaped, not echoed
    assert "Traceback" not in stderr and ": E003 " in stderr


def test_simulate_trace_shows_script_text_escaped(world: Path, tmp_path: Path) -> None:
    script = tmp_path / "actor.yaml"
    script.write_text(
        'actor: "eve\\e[2J\\u202e"\nsteps:\n  - dispatch: Approve\n'
        "    payload: {approver: vendor-admin}\n",
        encoding="utf-8",
    )
    result = autonomic("simulate", "entitlement", "--script", str(script), cwd=world)
    assert_clean(result)
    # Control characters never reach the ledger: the actor is refused, and shown escaped.
    assert result.returncode == 1, result.stdout
    assert "R031" in result.stderr and "control character U+001B" in result.stderr
    output = result.stdout + result.stderr
    assert "\x1b" not in output and "\u202e" not in output
    assert "eve\\x1b[2J\\u202e" in result.stderr


# ---------------------------------------------------------------------------------------------
# --version, --help everywhere, and the last line of defence for bugs.


def test_version(world: Path) -> None:
    result = autonomic("--version", cwd=world)
    assert (result.returncode, result.stdout) == (0, "autonomic 0.1.0\n")


def _commands(
    parser: object, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], object]]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_help_on_every_command_lists_every_option_with_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    commands = list(_commands(cli.build_parser()))
    names = {" ".join(path) for path, _ in commands}
    assert {"check", "build", "graph", "keygen", "simulate", "demo"} <= names
    assert {"audit verify", "audit export", "audit show", "audit checkpoint"} <= names
    for path, parser in commands:
        assert isinstance(parser, argparse.ArgumentParser)
        with pytest.raises(SystemExit) as exited:
            cli.main([*path, "--help"])
        assert exited.value.code == 0
        shown = " ".join(capsys.readouterr().out.split())
        assert parser.description or not path, path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, (path, action.dest)
            for option in action.option_strings:
                assert option in shown, (path, option)
            first_words = " ".join(str(action.help).split()[:3])
            assert first_words in shown, (path, action.dest, first_words)


def test_help_as_a_subprocess(world: Path) -> None:
    result = autonomic("audit", "verify", "--help", cwd=world)
    assert result.returncode == 0
    assert "--public-key FILE" in result.stdout and "--checkpoint FILE" in result.stdout


def test_a_bug_is_one_line_and_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], world: Path
) -> None:
    checks = importlib.import_module("autonomic.compiler.checks")

    def broken(paths: object) -> object:
        raise ZeroDivisionError("division by zero\nin a checker")

    monkeypatch.setattr(checks, "check_paths", broken)
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    assert cli.main(["check", str(world / "machines")]) == cli.EXIT_INTERNAL
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0] == (
        "autonomic: internal error: ZeroDivisionError: division by zero in a checker"
    )
    assert lines[1].startswith("  = hint: this is a bug in autonomic 0.1.0; please report it")
    assert len(lines) == 2 and captured.out == ""
    # A developer can still ask for the traceback.
    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["check", str(world / "machines")])


# ---------------------------------------------------------------------------------------------
# Fuzz: random argument lists, in-process. Never a traceback, never an internal error.

# Each command: how many positionals, its options that take a value (required ones first,
# marked by `!`), and its switches.
GRAMMAR: dict[tuple[str, ...], tuple[range, tuple[str, ...], tuple[str, ...]]] = {
    ("check",): (range(1, 3), ("--format", "--output", "-o"), ("--strict",)),
    ("build",): (range(0, 3), ("--out",), ("--check", "--strict", "--no-svg")),
    ("graph",): (range(1, 2), ("--format", "--machines", "--output"), ()),
    ("keygen",): (range(1, 2), ("--valid-from", "--retire"), ()),
    ("audit", "verify"): (range(1, 2), ("!--public-key", "--checkpoint"), ()),
    ("audit", "export"): (range(1, 2), ("--out",), ()),
    ("audit", "show"): (range(2, 3), (), ()),
    ("audit", "checkpoint"): (range(1, 2), ("!--out", "--public-key"), ()),
    ("simulate",): (range(1, 2), ("!--script",), ()),
    ("demo",): (range(0, 1), ("--db", "--keys", "--generated"), ()),
}
COMMANDS = [[], ["audit"], *(list(command) for command in GRAMMAR)]
OPTIONS = sorted({o.lstrip("!") for _, options, _ in GRAMMAR.values() for o in options})
SWITCHES = ["--check", "--strict", "--no-svg", "--help", "--version", "--"]
VALUES = [
    "machines",
    "machines/billing.fsm",
    "Billing",
    "entitlement",
    "quota_sla",
    "missing.fsm",
    "bin.fsm",
    "badutf.fsm",
    "empty.fsm",
    "long.fsm",
    "dir.fsm",
    "notes.txt",
    "store.db",
    "export.jsonl",
    "truncated.jsonl",
    "keys",
    "{pub}",
    "{priv}",
    "notkey.json",
    "garbage-keys",
    "ok.yaml",
    "bad.yaml",
    "bad-payload.yaml",
    "alias-cycle.yaml",
    "acme-1",
    "out",
    "out/deeper",
    "/proc/autonomic-h8",
    "dot",
    "svg",
    "mermaid",
    "json",
    "sarif",
    "2026-01-01T00:00:00Z",
    "-",
    "",
    "\udcff",
    "é",
    "x" * 300,
]
# Mostly command lines that parse, so that the commands run and meet the hostile values;
# sometimes any tokens at all.
value = st.sampled_from(VALUES)
token = st.one_of(
    value,
    st.sampled_from(OPTIONS + SWITCHES),
    st.text(st.characters(blacklist_characters="\x00"), max_size=6),
)


@st.composite
def well_formed(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(sorted(GRAMMAR)))
    positionals, options, switches = GRAMMAR[command]
    line = [
        *command,
        *draw(st.lists(value, min_size=positionals.start, max_size=positionals.stop - 1)),
    ]
    for option in options:
        if option.startswith("!") or draw(st.booleans()):
            line += [option.lstrip("!"), draw(value)]
    line += draw(st.lists(st.sampled_from(switches), max_size=2, unique=True)) if switches else []
    return line


anything = st.builds(
    lambda command, rest: [*command, *rest], st.sampled_from(COMMANDS), st.lists(token, max_size=6)
)
command_line = st.one_of(well_formed(), well_formed(), well_formed(), anything)


@pytest.fixture(scope="module")
def fuzz_world(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    for entry in world.iterdir():
        if entry.name in ("big.fsm",) or entry.name.startswith("store.db-"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, root / entry.name)
        else:
            shutil.copy2(entry, root / entry.name)
    (root / "long.fsm").write_text("machine " + "x" * 200_000 + "\n", encoding="ascii")
    return root


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exited:  # argparse: --help, --version, usage errors
            code = exited.code if isinstance(exited.code, int) else 0
    texts = []
    for stream in (out, err):
        stream.flush()
        buffer = stream.buffer
        assert isinstance(buffer, io.BytesIO)
        texts.append(buffer.getvalue().decode("utf-8", "backslashreplace"))
    return code, texts[0], texts[1]


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(line=command_line)
def test_random_command_lines_never_crash(fuzz_world: Path, line: list[str]) -> None:
    pub = next((fuzz_world / "keys").glob("*.public.json")).name
    priv = next((fuzz_world / "keys").glob("*.private.pem")).name
    argv = [v.replace("{pub}", f"keys/{pub}").replace("{priv}", f"keys/{priv}") for v in line]
    with contextlib.chdir(fuzz_world):
        code, out, err = run_in_process(argv)
    assert "Traceback" not in out + err
    assert INTERNAL not in err, (argv, err)
    assert code in (0, 1, 2), (argv, code, err)
    if code == 2:
        assert "usage: autonomic" in err, (argv, err)


# ---------------------------------------------------------------------------------------------
# Regressions: bugs found by this suite's review in other modules, fixed since.


def test_sqlite_store_refuses_a_database_that_is_not_its_own(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(foreign)) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
        connection.commit()
    before = foreign.read_bytes()
    with pytest.raises(StoreConfigError):
        SQLiteStore(foreign).close()
    assert foreign.read_bytes() == before and sqlite_tables(foreign) == {"invoices"}


def _undeliverable_emits() -> list[str]:
    """Emits whose delivery must fail: a required field of the target event that no argument
    supplies, an argument from a causing field that is missing (a timer has none) or optional
    where the target requires it, or a literal the target field refuses. The runtime builds an
    emitted payload from `Emit.args` alone, so these deliveries would fail with R005."""
    generated = importlib.import_module("autonomic.generated")
    specs = {}
    for module in generated.MODULES:
        spec = importlib.import_module(f"autonomic.generated.{module}").MACHINE
        specs[spec.name] = spec

    def fields(machine: str, event: str) -> dict[str, Any]:
        model = specs[machine].payloads.get(event)
        return {} if model is None else dict(model.model_fields)

    def problems(emit: Any, causing: dict[str, Any]) -> list[str]:
        target = fields(emit.machine, emit.event)
        found = [f"{name} unsupplied" for name, info in target.items() if info.is_required()]
        found = [p for p in found if p.split()[0] not in {a.field for a in emit.args}]
        for arg in emit.args:
            info = target.get(arg.field)
            if info is None:
                found.append(f"{arg.field} is not a field of the target")
            elif arg.source == "field":
                source = causing.get(str(arg.value))
                if source is None:
                    found.append(f"{arg.field} from missing causing field {arg.value}")
                elif info.is_required() and not source.is_required():
                    found.append(f"{arg.field} from optional causing field {arg.value}")
            elif arg.source == "literal":
                try:
                    TypeAdapter(info.annotation).validate_python(arg.value)
                except ValidationError:
                    found.append(f"{arg.field} refuses the literal {arg.value!r}")
        return found

    found = []
    for spec in specs.values():
        for (state, event), rows in spec.transitions.items():
            for row in rows:
                for emit in row.emits:
                    for problem in problems(emit, fields(spec.name, event)):
                        where = f"{spec.name}.{state} on {event}: {emit.machine}.{emit.event}"
                        found.append(f"{where}: {problem}")
        for state, timers in spec.timers.items():
            for timer in timers:
                for emit in timer.emits:
                    for problem in problems(emit, {}):
                        where = f"{spec.name}.{state} {timer.id}: {emit.machine}.{emit.event}"
                        found.append(f"{where}: {problem}")
    return found


def test_every_emit_in_the_machines_can_be_delivered() -> None:
    assert _undeliverable_emits() == []


@pytest.mark.parametrize(
    ("name", "fmt", "generated"),
    [
        ("SubscriptionCancellation", "dot", "flow_subscription_cancellation.dot"),
        ("flow_noisy_neighbour", "mermaid", "flow_noisy_neighbour.mmd"),
    ],
)
def test_graph_draws_a_flow_as_build_does(world: Path, name: str, fmt: str, generated: str) -> None:
    result = autonomic("graph", name, "--format", fmt, cwd=world)
    assert_clean(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "generated" / generated).read_text(encoding="utf-8")


def test_graph_of_a_file_of_several_flows_names_them(world: Path) -> None:
    text = assert_diagnostic(autonomic("graph", "machines/flows.fsm", cwd=world), "E007")
    assert "several flows" in text and "SubscriptionUpgrade" in text
    misspelt = assert_diagnostic(autonomic("graph", "SubscriptionCancelation", cwd=world), "E007")
    assert "did you mean 'SubscriptionCancellation'?" in misspelt
