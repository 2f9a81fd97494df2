"""The `keygen` and `audit` commands: exit codes, output, diagnostics, real subprocesses."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from autonomic.runtime.audit_cli import main
from autonomic.runtime.keys import Signer, load_signer
from autonomic.runtime.ledger import (
    SCHEMA_SQL,
    SIG_TAG,
    Checkpoint,
    EntryData,
    LedgerMode,
    LedgerSealer,
    MemoryLedger,
    payload_digest,
)
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from ledger_files import run_sql, write_sqlite_ledger

T0 = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)
SIZE = 30


def _keygen(folder: Path) -> tuple[Signer, Path]:
    assert main(["keygen", str(folder), "--valid-from", "2025-01-01T00:00:00Z"]) == 0
    (public,) = folder.glob("*.public.json")
    return load_signer(folder), public


def _store(path: Path, signer: Signer, mode: LedgerMode, actor: str = "ops") -> Path:
    ledger = MemoryLedger(LedgerSealer(signer, mode), genesis_ts_ms=T0)
    for number in range(1, SIZE):  # seq 0 is the genesis entry
        ledger.append(
            EntryData(
                ts_ms=T0 + 60_000 * number,
                kind="timer" if number % 5 == 4 else "transition",
                machine="Entitlement",
                instance=f"ent-{number % 3}",
                from_state=f"S{number}",
                to_state=f"S{number + 1}",
                event="Tick" if number % 5 == 4 else "Approve",
                actor=actor,
                event_id=f"evt-{number}",
                payload_sha256=payload_digest({"n": number}),
            )
        )
        if mode == "checkpoint" and number % 10 == 9:
            ledger.checkpoint(T0 + 60_000 * number)
    return write_sqlite_ledger(path, ledger)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signer, Path]:
    return _keygen(tmp_path / "keys")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier setup printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ---------------------------------------------------------------------------------------------
# keygen


def test_keygen_writes_a_0600_private_key_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "keys"
    code, out, _ = _run(capsys, "keygen", str(folder), "--valid-from", "2025-01-01")
    assert code == 0
    (private,) = folder.glob("*.private.pem")
    (public,) = folder.glob("*.public.json")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert json.loads(public.read_text())["valid_from_ms"] == T0
    key_id = private.name.removesuffix(".private.pem")
    assert f"key {key_id} valid from 2025-01-01T00:00:00.000Z" in out
    before = private.read_bytes()
    code, out, err = _run(capsys, "keygen", str(folder))
    assert code == 1 and out == ""
    assert err.startswith(f"{folder}:1:1: A011 [error] ")
    assert "= hint: " in err
    assert private.read_bytes() == before


def test_keygen_rejects_a_bad_time_as_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["keygen", str(tmp_path / "k"), "--valid-from", "next tuesday"])
    assert caught.value.code == 2
    assert "not an ISO 8601 time" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_keygen_rotation_writes_the_chain_entry_and_retires_the_old_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, old_public = _keygen(tmp_path / "old")
    store = tmp_path / "store.db"
    Runtime(SQLiteStore(store), sealer=LedgerSealer(old, "checkpoint")).close()  # its genesis
    new_dir = tmp_path / "new"
    with pytest.raises(SystemExit) as caught:  # a rotation needs its ledger entry
        main(["keygen", str(new_dir), "--retire", str(old_public)])
    assert caught.value.code == 2 and "--ledger" in capsys.readouterr().err
    assert not new_dir.exists()
    argv = ["keygen", str(new_dir), "--retire", str(old_public), "--ledger", str(store)]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    new = load_signer(new_dir)
    assert f"{store}: rotation entry seq 1 introduces key {new.key_id}" in out
    # The old key's window closes just after the rotation entry it signed.
    with sqlite3.connect(store) as connection:
        (rotated_at,) = connection.execute("SELECT ts_ms FROM ledger WHERE seq = 1").fetchone()
    connection.close()
    assert json.loads(old_public.read_text())["valid_until_ms"] == rotated_at + 1
    assert "retired: valid until " in out
    # Pinned to the old (root) key, the ledger follows the rotation to the new key.
    code, out, _ = _run(capsys, "audit", "verify", str(store), "--public-key", str(old_public))
    assert code == 0 and f"keys {old.key_id} -> {new.key_id}" in out, out
    with sqlite3.connect(store) as connection:
        kind, key_id = connection.execute(
            "SELECT kind, key_id FROM ledger WHERE seq = 1"
        ).fetchone()
        signer_of_last = connection.execute(
            "SELECT key_id FROM ledger_checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
    connection.close()
    assert (kind, key_id, signer_of_last) == ("key_rotation", old.key_id, (new.key_id,))
    # The new key's file alone is no root: the genesis entry names the old key.
    new_public = str(new_dir / f"{new.key_id}.public.json")
    code, out, _ = _run(capsys, "audit", "verify", str(store), "--public-key", new_public)
    assert code == 1 and "is not the pinned root" in out


# ---------------------------------------------------------------------------------------------
# audit verify


@pytest.mark.parametrize("mode", ["sign-each", "checkpoint"])
def test_verify_reports_the_count_or_the_first_bad_seq(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Signer, Path], mode: LedgerMode
) -> None:
    signer, public = keys
    store = _store(tmp_path / "store.db", signer, mode)
    code, out, _ = _run(capsys, "audit", "verify", str(store), "--public-key", str(public))
    assert code == 0
    extra = ", 3 signed checkpoints" if mode == "checkpoint" else ""
    assert (
        out.splitlines()[0] == f"verified {SIZE} entries (mode {mode}{extra}, keys {signer.key_id})"
    )
    assert out.splitlines()[1].startswith("truncation not checked: without a witness")
    root = hashlib.sha256(signer.public_info().public_key).hexdigest()
    code, by_fingerprint, _ = _run(capsys, "audit", "verify", str(store), "--root", root)
    assert (code, by_fingerprint) == (0, out)
    run_sql(store, "UPDATE ledger SET actor = 'mallory' WHERE seq = 14")
    code, out, _ = _run(capsys, "audit", "verify", str(store), "--public-key", str(public))
    assert code == 1
    assert out.startswith(f"{store}: seq 14: entry hash mismatch")


def test_verify_with_a_kept_checkpoint_detects_truncation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Signer, Path]
) -> None:
    signer, public = keys
    store = _store(tmp_path / "store.db", signer, "sign-each")
    kept = tmp_path / "kept.json"
    code, out, _ = _run(capsys, "audit", "checkpoint", str(store), "--out", str(kept))
    assert code == 0 and f"checkpoint at size {SIZE}" in out and "not verified" in out
    assert Checkpoint.load(kept).kind == "entry"
    args = ["audit", "verify", str(store), "--public-key", str(public), "--checkpoint", str(kept)]
    code, out, _ = _run(capsys, *args)
    assert code == 0 and f"holds all {SIZE} entries of the newest checkpoint" in out
    run_sql(store, "DELETE FROM ledger WHERE seq >= 27")
    code, out, _ = _run(capsys, *args)
    assert code == 1
    assert out.startswith(f"{store}: seq 27: truncated")
    assert "(3 entries are missing)" in out


def test_verify_follows_the_chain_not_the_keys_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, old_public = _keygen(tmp_path / "old")
    new, _new_public = _keygen(tmp_path / "new")
    exported = tmp_path / "old.jsonl"
    store = _store(tmp_path / "old.db", old, "sign-each")
    assert main(["audit", "export", str(store), "--out", str(exported)]) == 0
    # The same history, with entries from seq 10 on re-signed by another key: no rotation
    # entry introduced it, so it is not trusted, whatever the verifier is handed.
    lines = exported.read_text().splitlines()
    rotated_lines = [lines[0]]
    for line in lines[1:]:
        doc = json.loads(line)
        if doc["seq"] >= 10:
            digest = bytes.fromhex(doc["entry_hash"])
            doc["key_id"] = new.key_id
            doc["signature"] = base64.b64encode(new.sign(SIG_TAG + digest)).decode()
        rotated_lines.append(json.dumps(doc))
    rotated = tmp_path / "rotated.jsonl"
    rotated.write_text("\n".join(rotated_lines) + "\n")
    code, out, _ = _run(capsys, "audit", "verify", str(rotated), "--public-key", str(old_public))
    assert code == 1 and out.startswith(f"{rotated}: seq 10: entry signed by key '{new.key_id}'")
    assert "never introduced" in out
    with pytest.raises(SystemExit) as caught:  # one root, not a keyring
        main(["audit", "verify", str(rotated), "--public-key", str(old_public), "--root", "00"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        main(["audit", "verify", str(rotated), "--root", "not-hex"])
    assert caught.value.code == 2 and "64 hex digits" in capsys.readouterr().err


def test_verify_unusable_inputs_are_diagnostics_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Signer, Path]
) -> None:
    signer, public = keys
    store = _store(tmp_path / "store.db", signer, "checkpoint")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    bad_checkpoint = tmp_path / "checkpoint.json"
    bad_checkpoint.write_text('{"format": "autonomic-checkpoint"}')
    (private,) = (tmp_path / "keys").glob("*.private.pem")
    cases = [
        (tmp_path / "missing.db", public, None, "missing.db", "A001"),
        (tmp_path, public, None, str(tmp_path), "A001"),
        (garbage, public, None, "garbage.bin", "A002"),
        (store, private, None, private.name, "A010"),
        (store, tmp_path / "nokey.json", None, "nokey.json", "A010"),
        (store, tmp_path / "keys", None, "keys", "A010"),
        (store, garbage, None, "garbage.bin", "A010"),
        (store, public, bad_checkpoint, "checkpoint.json", "A020"),
        (store, public, tmp_path / "nothing.json", "nothing.json", "A020"),
    ]
    for ledger, key, checkpoint, where, code_name in cases:
        argv = ["audit", "verify", str(ledger), "--public-key", str(key)]
        if checkpoint is not None:
            argv += ["--checkpoint", str(checkpoint)]
        code, out, err = _run(capsys, *argv)
        assert code == 1, (argv, out, err)
        first = err.splitlines()[0]
        assert first.split(":1:1: ")[0].endswith(where), first
        assert f":1:1: {code_name} [error] " in first, first
    with pytest.raises(SystemExit) as caught:
        main(["audit", "verify", str(store)])  # --public-key is required
    assert caught.value.code == 2


# ---------------------------------------------------------------------------------------------
# audit export, show, checkpoint


def test_export_round_trips_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Signer, Path]
) -> None:
    signer, public = keys
    store = _store(tmp_path / "store.db", signer, "checkpoint")
    code, out, _ = _run(capsys, "audit", "export", str(store))
    assert code == 0
    lines = out.splitlines()
    assert json.loads(lines[0])["format"] == "autonomic-ledger"
    assert sum(1 for line in lines if line.startswith('{"seq"')) == SIZE
    assert sum(1 for line in lines if line.startswith('{"checkpoint"')) == 3
    exported = tmp_path / "export.jsonl"
    code, out, _ = _run(capsys, "audit", "export", str(store), "--out", str(exported))
    assert (code, out) == (0, f"exported {SIZE} entries to {exported}\n")
    assert exported.read_text().splitlines() == lines
    code, out, _ = _run(capsys, "audit", "verify", str(exported), "--public-key", str(public))
    assert code == 0 and out.startswith(f"verified {SIZE} entries (mode checkpoint")


def test_export_of_an_unreadable_row_fails_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Signer, Path]
) -> None:
    signer, _ = keys
    store = _store(tmp_path / "store.db", signer, "checkpoint")
    run_sql(store, "UPDATE ledger SET actor = CAST(X'FF' AS TEXT) WHERE seq = 5")
    out_file = tmp_path / "export.jsonl"
    code, _, err = _run(capsys, "audit", "export", str(store), "--out", str(out_file))
    assert code == 1
    assert err.startswith(f"{store}:1:1: A003 [error] seq 5: row cannot be read")
    assert not out_file.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_show_prints_one_instance_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Signer, Path]
) -> None:
    signer, _ = keys
    store = _store(tmp_path / "store.db", signer, "sign-each", actor="eve\x1b[2J\u202e")
    code, out, _ = _run(capsys, "audit", "show", str(store), "ent-1")
    assert code == 0
    lines = out.splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(1, SIZE, 3))
    first = lines[0].split()
    assert first[1:6] == ["2025-01-01T00:01:00.000Z", "transition", "S1", "->", "S2"]
    assert first[6] == "Approve"
    assert "\x1b" not in out and "\u202e" not in out
    assert "eve\\x1b[2J\\u202e" in out
    code, out, err = _run(capsys, "audit", "show", str(store), "ent-9")
    assert code == 1 and out == ""
    assert err.startswith(f"{store}:1:1: A005 [error] no ledger entry for instance 'ent-9'")


def test_checkpoint_export_verifies_first_when_given_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Signer, Path]
) -> None:
    signer, public = keys
    store = _store(tmp_path / "store.db", signer, "checkpoint")
    kept = tmp_path / "kept.json"
    argv = ["audit", "checkpoint", str(store), "--out", str(kept), "--public-key", str(public)]
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and "verified" in out and "not verified" not in out
    checkpoint = Checkpoint.load(kept)
    assert (checkpoint.kind, checkpoint.size) == ("checkpoint", SIZE)
    kept.unlink()
    run_sql(store, "UPDATE ledger SET event = 'Forged' WHERE seq = 3")
    code, out, _ = _run(capsys, *argv)
    assert code == 1 and out.startswith(f"{store}: seq 3: entry hash mismatch")
    assert not kept.exists()


# ---------------------------------------------------------------------------------------------
# As a real process.


def _process(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autonomic.runtime.audit_cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_commands_as_a_subprocess(tmp_path: Path) -> None:
    result = _process("keygen", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr
    assert "fingerprint (pin it: audit verify --root): " in result.stdout
    (private,) = (tmp_path / "keys").glob("*.private.pem")
    (public,) = (tmp_path / "keys").glob("*.public.json")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded = load_signer(private)
    unchecked = Signer(loaded.key_id, loaded.private_key)  # signs outside the key's window
    store = _store(tmp_path / "store.db", unchecked, "checkpoint")
    # The key is valid from "now", so the sample's 2025 timestamps are outside its window.
    result = _process("audit", "verify", str(store), "--public-key", str(public))
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith(f"{store}: seq 0: root key "), result.stdout
    keyed = _keygen(tmp_path / "dated")
    store = _store(tmp_path / "dated.db", keyed[0], "checkpoint")
    result = _process("audit", "verify", str(store), "--public-key", str(keyed[1]))
    assert result.returncode == 0
    assert result.stdout.startswith(
        f"verified {SIZE} entries (mode checkpoint, 3 signed checkpoints, keys {keyed[0].key_id})"
    )
    run_sql(store, "UPDATE ledger_checkpoints SET head_hash = zeroblob(32) WHERE size = 20")
    result = _process("audit", "verify", str(store), "--public-key", str(keyed[1]))
    assert result.returncode == 1
    assert result.stdout == (f"{store}: seq 19: checkpoint at size 20: bad signature\n")
    for argv, code in (
        (("audit", "verify", str(tmp_path / "nothing"), "--public-key", str(public)), 1),
        (("audit", "verify", str(tmp_path), "--public-key", str(public)), 1),
        (("audit", "show", str(private), "x"), 1),
        (("audit", "verify", str(store)), 2),
        (("audit",), 2),
        (("keygen", str(tmp_path / "keys")), 1),
    ):
        result = _process(*argv)
        assert result.returncode == code, (argv, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr


def test_checkpoint_export_needs_something_signed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "empty.db"
    with sqlite3.connect(store) as connection:
        connection.executescript(SCHEMA_SQL)
    connection.close()
    out_file = tmp_path / "kept.json"
    code, _, err = _run(capsys, "audit", "checkpoint", str(store), "--out", str(out_file))
    assert code == 1
    assert err.startswith(f"{store}:1:1: A003 [error] the ledger holds no signed checkpoint")
    assert not out_file.exists()
