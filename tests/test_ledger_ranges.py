"""An SQLite ledger verified in seq ranges in parallel processes: the same report as the
sequential verifier, for valid ledgers and for tampering before, at and after a boundary."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import pickle
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
from autonomic.runtime.errors import LedgerFormatError
from autonomic.runtime.keychain import RootOfTrust
from autonomic.runtime.keys import PublicKeyInfo, Signer, generate_keypair, load_signer
from autonomic.runtime.ledger import (
    INSERT_CHECKPOINT_SQL,
    INSERT_ENTRY_SQL,
    LEDGER_COLUMNS,
    PAYLOAD_TAG,
    SIG_TAG,
    Checkpoint,
    EntryData,
    LedgerMode,
    LedgerSealer,
    MemoryLedger,
    VerifyReport,
    entry_hash,
    payload_digest,
)
from autonomic.runtime.ledger_io import read_ledger, sqlite_entry_batches
from autonomic.runtime.ledger_ranges import verify_in_ranges, verify_ledger, verify_source
from autonomic.runtime.verify import Span, verify_batches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_files import run_sql, write_sqlite_ledger, write_sqlite_rows
from sqlite_pages import link_leaf_twice

T0 = 1_700_000_000_000
HOUR = 3_600_000
RANGE = 8  # ranges [0, 8), [8, 16), ...: boundaries at multiples of 8
ROTATION_SEQ = 19  # in range [16, 24); entries from 24 on are verified by later ranges
SIZE = 46
# Checkpoints every 5 entries: most of them cover a Merkle range that spans several ranges.
CHECKPOINT_EVERY = 5
RANGES_WORKER = Path(__file__).with_name("ranges_worker.py")


@dataclasses.dataclass(frozen=True)
class Keys:
    old: Signer
    new: Signer
    other: Signer  # a key the ledger never introduces
    root: PublicKeyInfo
    root_file: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "old", valid_from_ms=T0 - HOUR)
    generate_keypair(folder / "new", valid_from_ms=T0 + ROTATION_SEQ * HOUR)
    generate_keypair(folder / "other", valid_from_ms=T0 + ROTATION_SEQ * HOUR)
    old, new = load_signer(folder / "old"), load_signer(folder / "new")
    root_file = folder / "old" / f"{old.key_id}.public.json"
    return Keys(old, new, load_signer(folder / "other"), old.public_info(), root_file)


def _data(number: int) -> EntryData:
    return EntryData(
        ts_ms=T0 + number * HOUR,
        kind="timer" if number % 7 == 3 else "transition",
        machine="Billing",
        instance=f"bill-{number % 4}",
        from_state=f"S{number % 3}",
        to_state=f"S{(number + 1) % 3}",
        event="Tick" if number % 7 == 3 else "Pay",
        actor="ops",
        event_id=f"evt-{number}",
        payload_sha256=payload_digest({"n": number}),
    )


def _ledger(keys: Keys, mode: LedgerMode) -> MemoryLedger:
    """Genesis, entries signed by the old key, its rotation to the new key at ROTATION_SEQ,
    entries signed by the new one; in checkpoint mode a checkpoint every CHECKPOINT_EVERY."""
    ledger = MemoryLedger(LedgerSealer(keys.old, mode), genesis_ts_ms=T0)
    for number in range(1, SIZE):
        if number == ROTATION_SEQ:
            ledger.rotate(keys.new, T0 + number * HOUR)
        else:
            ledger.append(_data(number))
        if mode == "checkpoint" and number % CHECKPOINT_EVERY == 0:
            ledger.checkpoint(T0 + number * HOUR)
    if mode == "checkpoint":
        ledger.checkpoint(T0 + SIZE * HOUR)
    return ledger


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ledgers")
    return {
        mode: write_sqlite_ledger(folder / f"{mode}.db", _ledger(keys, mode))
        for mode in ("checkpoint", "sign-each")
    }


def _copy(files: dict[str, Path], mode: str, folder: Path) -> Path:
    path = folder / f"{mode}-copy.db"
    shutil.copy(files[mode], path)
    return path


def _both(
    path: Path, keys: Keys, external: Checkpoint | None = None
) -> tuple[VerifyReport | None, VerifyReport]:
    """The ranges' report (None: they refused the ledger) and the sequential one; verify_ledger
    must answer exactly what the sequential verifier answers."""
    with read_ledger(path) as source:
        ranged = verify_in_ranges(
            source,
            keys.root,
            external_checkpoint=external,
            processes=2,
            range_size=RANGE,
            min_entries=0,
        )
    sequential = _sequential(path, keys.root, external)
    whole = verify_ledger(
        path, keys.root, external_checkpoint=external, processes=2, range_size=RANGE, min_entries=0
    )
    assert whole == sequential
    return ranged, sequential


def _sequential(
    path: Path, root: PublicKeyInfo, external: Checkpoint | None = None
) -> VerifyReport:
    """The report of the verifier that reads the whole ledger in this process."""
    with read_ledger(path) as source:
        return source.verify(root, external_checkpoint=external)


def _refused(path: Path, keys: Keys, external: Checkpoint | None = None) -> VerifyReport:
    """The ranges refuse the ledger and the sequential verifier fails it: its report."""
    ranged, sequential = _both(path, keys, external)
    assert ranged is None and not sequential.ok
    return sequential


def _entry(path: Path, seq: int) -> tuple[object, ...]:
    with sqlite3.connect(path) as connection:
        row = connection.execute(
            f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE seq = ?", (seq,)
        ).fetchone()
    connection.close()
    return tuple(row)


def _hash_as_mallory(path: Path, seq: int) -> bytes:
    """The hash entry `seq` would have with actor 'mallory'."""
    row = _entry(path, seq)
    strings = cast(tuple[str, str, str, str, str, str, str, str], (*row[2:8], "mallory", row[9]))
    return entry_hash(
        cast(int, row[0]), cast(int, row[1]), strings, cast(bytes, row[10]), cast(bytes, row[11])
    )


@pytest.mark.parametrize("mode", ["checkpoint", "sign-each"])
def test_a_valid_ledger_verifies_in_ranges_with_the_sequential_report(
    files: dict[str, Path], keys: Keys, mode: str
) -> None:
    ranged, sequential = _both(files[mode], keys)
    assert sequential.ok and sequential.count == SIZE
    # The rotation sits in range [16, 24): later ranges replayed it and trust the new key.
    assert sequential.keys == (keys.old.key_id, keys.new.key_id)
    assert ranged == sequential
    if mode == "checkpoint":
        assert sequential.checkpoints == 9  # at sizes 6, 11, ..., 46


@pytest.mark.parametrize("seq", [RANGE * 2 - 1, RANGE * 2, RANGE * 2 + 1])
@pytest.mark.parametrize(
    "column, value",
    [("payload_sha256", b"\x07" * 32), ("entry_hash", b"\x08" * 32), ("instance", "bill-9")],
)
def test_a_tampered_entry_before_at_or_after_a_boundary_fails_where_it_stands(
    files: dict[str, Path], keys: Keys, tmp_path: Path, seq: int, column: str, value: object
) -> None:
    path = _copy(files, "checkpoint", tmp_path)
    run_sql(path, f"UPDATE ledger SET {column} = ? WHERE seq = ?", value, seq)
    report = _refused(path, keys)
    assert report.index == seq and report.problem == "hash_mismatch"


@pytest.mark.parametrize("seq", [RANGE * 3 - 1, RANGE * 3, RANGE * 3 + 1])
def test_a_bad_signature_by_a_boundary_fails_at_its_entry(
    files: dict[str, Path], keys: Keys, tmp_path: Path, seq: int
) -> None:
    path = _copy(files, "sign-each", tmp_path)
    signature = bytearray(cast(bytes, _entry(path, seq)[14]))
    signature[5] ^= 1
    run_sql(path, "UPDATE ledger SET signature = ? WHERE seq = ?", bytes(signature), seq)
    report = _refused(path, keys)
    assert (report.index, report.problem) == (seq, "bad_signature")


def test_an_entry_altered_and_rehashed_just_before_a_boundary_breaks_the_join(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    """Seq 23 rehashed after its change: range [16, 24) holds together on its own, only the
    link to seq 24 in the next range shows it."""
    path = _copy(files, "checkpoint", tmp_path)
    seq = RANGE * 3 - 1
    digest = _hash_as_mallory(path, seq)
    run_sql(path, "UPDATE ledger SET actor = 'mallory', entry_hash = ? WHERE seq = ?", digest, seq)
    report = _refused(path, keys)
    assert (report.index, report.problem) == (seq, "chain_break")


@pytest.mark.parametrize("seq", [RANGE * 2 - 1, RANGE * 2, RANGE * 2 + 1])
def test_a_deleted_entry_at_a_boundary_is_a_gap(
    files: dict[str, Path], keys: Keys, tmp_path: Path, seq: int
) -> None:
    path = _copy(files, "checkpoint", tmp_path)
    run_sql(path, "DELETE FROM ledger WHERE seq = ?", seq)
    report = _refused(path, keys)
    assert (report.index, report.problem) == (seq, "gap")


def test_a_duplicated_entry_at_a_boundary_fails(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    """Seq 15 stored again as seq 16, the rest moved up by one."""
    path = _copy(files, "checkpoint", tmp_path)
    boundary = RANGE * 2
    run_sql(path, "UPDATE ledger SET seq = -seq - 1 WHERE seq >= ?", boundary)
    run_sql(path, "UPDATE ledger SET seq = -seq WHERE seq < 0")
    row = list(_entry(path, boundary - 1))
    row[0] = boundary
    run_sql(path, INSERT_ENTRY_SQL, *row)
    report = _refused(path, keys)
    assert (report.index, report.problem) == (boundary, "chain_break")


def test_entries_signed_by_the_key_a_rotation_in_an_earlier_range_retired_fail(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    path = _copy(files, "sign-each", tmp_path)
    forged_at = RANGE * 3 + 2  # a range after the rotation's
    signature = keys.old.private_key.sign(SIG_TAG + cast(bytes, _entry(path, forged_at)[12]))
    run_sql(
        path,
        "UPDATE ledger SET key_id = ?, signature = ? WHERE seq = ?",
        keys.old.key_id,
        signature,
        forged_at,
    )
    report = _refused(path, keys)
    assert (report.index, report.problem) == (forged_at, "key_retired")
    assert f"retired at seq {ROTATION_SEQ}" in (report.reason or "")


def test_a_rotation_entry_altered_fails_at_the_rotation(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    path = _copy(files, "sign-each", tmp_path)
    run_sql(path, "UPDATE ledger SET ts_ms = ts_ms + 1 WHERE seq = ?", ROTATION_SEQ)
    report = _refused(path, keys)
    assert (report.index, report.problem) == (ROTATION_SEQ, "hash_mismatch")


def _resign(
    path: Path, signer: Signer, size: int, *, tree_root: bytes | None = None, key_id: str = ""
) -> None:
    """Change the checkpoint at `size` (its tree root, its key id) and sign it again."""
    with sqlite3.connect(path) as connection:
        row = connection.execute(
            "SELECT * FROM ledger_checkpoints WHERE size = ?", (size,)
        ).fetchone()
    connection.close()
    stored = Checkpoint(*row)
    changed = dataclasses.replace(
        stored, tree_root=tree_root or stored.tree_root, key_id=key_id or stored.key_id
    )
    signed = dataclasses.replace(
        changed, signature=signer.private_key.sign(changed.signed_message())
    )
    run_sql(path, "DELETE FROM ledger_checkpoints WHERE size = ?", size)
    run_sql(path, INSERT_CHECKPOINT_SQL, *signed.as_row())


@pytest.mark.parametrize("size", [21, SIZE])
def test_a_signed_tree_root_over_several_ranges_is_checked_by_the_join(
    files: dict[str, Path], keys: Keys, tmp_path: Path, size: int
) -> None:
    """The checkpoint at size 21 covers entries of ranges [0, 8), [8, 16) and [16, 24), the
    last one every range: a wrong root, validly signed, shows only where the ranges'
    subtrees are joined (for the last, nothing else links to it)."""
    path = _copy(files, "checkpoint", tmp_path)
    _resign(path, keys.new, size, tree_root=b"\x09" * 32)
    report = _refused(path, keys)
    assert (report.index, report.problem) == (size - 1, "checkpoint_mismatch")
    assert "Merkle tree root" in (report.reason or "")


def test_an_entry_rehashed_and_signed_again_shows_only_in_the_hash_chain_across_ranges(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    """Sign-each mode has no Merkle tree to give it away: seq 23, changed, rehashed and signed
    again by the active key, makes range [16, 24) verify alone; only seq 24's prev_hash, in
    the next range, shows it."""
    path = _copy(files, "sign-each", tmp_path)
    seq = RANGE * 3 - 1
    digest = _hash_as_mallory(path, seq)
    signature = keys.new.private_key.sign(SIG_TAG + digest)
    run_sql(
        path,
        "UPDATE ledger SET actor = 'mallory', entry_hash = ?, signature = ? WHERE seq = ?",
        digest,
        signature,
        seq,
    )
    report = _refused(path, keys)
    assert (report.index, report.problem) == (seq + 1, "chain_break")


def test_entries_a_later_range_leaves_uncovered_fail_at_the_first_of_them(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    """The last two checkpoints removed: range [32, 40) settles the one at 36, and neither it
    nor [40, 46) covers what follows; only the join sees that nothing later does."""
    path = _copy(files, "checkpoint", tmp_path)
    run_sql(path, "DELETE FROM ledger_checkpoints WHERE size > 36")
    report = _refused(path, keys)
    assert (report.index, report.problem) == (36, "uncovered")


def test_a_range_holds_the_control_entries_it_was_given_to_the_stored_ones(
    files: dict[str, Path], keys: Keys
) -> None:
    """The ranges after a rotation trust it because the range holding it accepts exactly the
    control entries they were given: handed a different rotation, or one too many or too
    few, that range refuses."""
    path = files["sign-each"]
    with sqlite3.connect(path) as connection:
        rows = {
            row[0]: row
            for row in connection.execute(
                f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE machine = ''"
            )
        }
        owner = list(sqlite_entry_batches(connection, RANGE * 2, RANGE * 3))
    connection.close()
    assert set(rows) == {0, ROTATION_SEQ}
    forged = MemoryLedger(LedgerSealer(keys.old, "sign-each"), genesis_ts_ms=T0)
    for number in range(1, ROTATION_SEQ):
        forged.append(_data(number))
    other = forged.rotate(keys.other, T0 + ROTATION_SEQ * HOUR)
    for given_control, ok in (
        (rows, True),
        ({0: rows[0]}, False),
        ({0: rows[0], ROTATION_SEQ: tuple(other)}, False),
        ({**rows, RANGE * 2 + 1: rows[ROTATION_SEQ]}, False),
    ):
        span = Span(RANGE * 2, RANGE * 3, dict(given_control))
        report = verify_batches(iter(owner), keys.root, span=span)
        assert report.ok == ok, (sorted(given_control), report.reason)


def test_a_checkpoint_removed_between_ranges_breaks_the_checkpoint_chain(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    path = _copy(files, "checkpoint", tmp_path)
    run_sql(path, "DELETE FROM ledger_checkpoints WHERE size = 16")
    report = _refused(path, keys)
    assert (report.index, report.problem) == (20, "checkpoint_chain")


def test_a_checkpoint_signed_by_the_retired_key_in_a_later_range_fails(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    path = _copy(files, "checkpoint", tmp_path)
    _resign(path, keys.old, 36, key_id=keys.old.key_id)
    report = _refused(path, keys)
    assert (report.index, report.problem) == (35, "checkpoint_signature")


def test_truncation_is_found_by_the_ranges_as_by_the_sequential_verifier(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    path = _copy(files, "checkpoint", tmp_path)
    with sqlite3.connect(path) as connection:
        last = Checkpoint(
            *connection.execute("SELECT * FROM ledger_checkpoints ORDER BY size DESC").fetchone()
        )
    connection.close()
    # Whole: the external checkpoint at the end verifies, in the last range.
    ranged, sequential = _both(path, keys, last)
    assert sequential.ok and ranged == sequential
    # The tail and its checkpoints cut off: only the external checkpoint shows it.
    run_sql(path, "DELETE FROM ledger WHERE seq >= 41")
    run_sql(path, "DELETE FROM ledger_checkpoints WHERE size > 41")
    report = _refused(path, keys, last)
    assert (report.problem, report.missing) == ("truncated", SIZE - 41)
    # Entries cut off below a stored checkpoint.
    path = _copy(files, "checkpoint", tmp_path)
    run_sql(path, "DELETE FROM ledger WHERE seq >= 43")
    report = _refused(path, keys)
    assert (report.index, report.problem) == (43, "truncated")


def test_the_report_is_of_the_snapshot_the_caller_holds_while_the_store_grows(
    tmp_path: Path, keys: Keys
) -> None:
    """Workers read snapshots of their own: when the store grew after the caller's snapshot,
    the ranges do not answer for it, and the caller gets the report of what it holds."""
    ledger = _ledger(keys, "checkpoint")
    entries, checkpoints = list(ledger.entries()), list(ledger.checkpoints())
    path = tmp_path / "growing.db"
    run_sql(path, "PRAGMA journal_mode = WAL")
    write_sqlite_rows(path, entries[:31], [c for c in checkpoints if c.size <= 31], "checkpoint")
    with read_ledger(path) as source:
        with sqlite3.connect(path) as writer:  # the runtime commits more meanwhile
            writer.executemany(INSERT_ENTRY_SQL, entries[31:])
            writer.executemany(
                INSERT_CHECKPOINT_SQL, [c.as_row() for c in checkpoints if c.size > 31]
            )
        writer.close()
        ranged = verify_in_ranges(source, keys.root, processes=2, range_size=RANGE, min_entries=0)
        assert ranged is None
        report = verify_source(source, keys.root, processes=2, range_size=RANGE, min_entries=0)
        assert (report.ok, report.count) == (True, 31)
        assert source.latest_signed_checkpoint().size == 31
    whole = verify_ledger(path, keys.root, processes=2, range_size=RANGE, min_entries=0)
    assert whole == _sequential(path, keys.root) and whole.count == SIZE


def test_entries_left_uncovered_before_a_last_range_of_control_entries_only_fail(
    tmp_path: Path, keys: Keys
) -> None:
    """A range that holds no unsigned entry and settles no checkpoint (here a key rotation
    alone) leaves the entries an earlier range left uncovered still uncovered."""
    ledger = MemoryLedger(LedgerSealer(keys.old, "checkpoint"), genesis_ts_ms=T0)
    for number in range(1, 2 * RANGE):
        ledger.append(_data(number))
        if number == 11:
            ledger.checkpoint(T0 + number * HOUR)  # covers seq 0..11; 12..15 stay uncovered
    ledger.rotate(keys.new, T0 + ROTATION_SEQ * HOUR)  # seq 16: the last range alone
    path = write_sqlite_ledger(tmp_path / "uncovered.db", ledger)
    report = _refused(path, keys)
    assert (report.index, report.problem) == (12, "uncovered")


def test_the_cli_verifies_a_large_ledger_in_ranges_with_the_same_output(
    tmp_path: Path, keys: Keys
) -> None:
    """Past the size where verification starts workers, `audit verify`, `audit checkpoint
    --public-key` and `verify_ledger` answer what the sequential verifier answers, for a valid
    ledger and for one entry tampered at a boundary."""
    from autonomic.runtime.ledger_ranges import PARALLEL_MIN_ENTRIES

    sealer = LedgerSealer(keys.old, "checkpoint")
    ledger = MemoryLedger(sealer, genesis_ts_ms=T0)
    for number in range(1, PARALLEL_MIN_ENTRIES + 100):
        ledger.append(_data(number % ROTATION_SEQ))
        if number % 1000 == 0:
            ledger.checkpoint(T0 + HOUR)
    ledger.checkpoint(T0 + HOUR)
    path = write_sqlite_ledger(tmp_path / "large.db", ledger)
    del ledger
    command = [sys.executable, "-m", "autonomic", "audit", "verify", str(path)]

    def cli(*args: str) -> str:
        done = subprocess.run(
            [*(args or command), "--public-key", str(keys.root_file)],
            capture_output=True,
            text=True,
        )
        return f"{done.returncode}: {done.stdout}{done.stderr}"

    def checkpoint_cli(out: str) -> str:
        return cli(
            sys.executable, "-m", "autonomic", "audit", "checkpoint", str(path), "--out", out
        )

    with read_ledger(path) as source:
        newest = source.latest_signed_checkpoint()
    sequential = _sequential(path, keys.root)
    assert cli().startswith(f"0: verified {PARALLEL_MIN_ENTRIES + 100} entries")
    # The library, at the defaults, in a process with no other thread: it verifies in worker
    # processes (their CPU time is its children's), and work that needs the ledger's size but
    # not its verdict runs in it while they verify.
    forked = _in_a_clean_process(path, keys, "all")
    assert forked["ranged"] == sequential
    assert forked["plain"][0] == sequential and forked["plain"][1] > 0
    report, children_cpu, seen = forked["meanwhile"]
    assert report == sequential and children_cpu > 0
    [(count, children)] = seen
    assert count == PARALLEL_MIN_ENTRIES + 100 and children and forked["pid"] not in children
    out = tmp_path / "newest.json"
    done = checkpoint_cli(str(out))
    assert done.startswith("0: checkpoint at size 65636") and "; verified)" in done
    assert Checkpoint.load(out).to_json() == newest.to_json()
    boundary = 1 << 14
    run_sql(path, "UPDATE ledger SET actor = 'eve' WHERE seq = ?", boundary)
    report = _sequential(path, keys.root)
    # Range workers verify the tampered ledger, and the sequential verifier's report is the
    # answer (as the ranges accept nothing it fails).
    tampered, children_cpu = _in_a_clean_process(path, keys)["plain"]
    assert tampered == report and children_cpu > 0
    assert cli() == f"1: {path}: seq {boundary}: {report.reason}\n"
    assert checkpoint_cli(str(tmp_path / "refused.json")) == cli()


def _in_a_clean_process(path: Path, keys: Keys, *options: str) -> dict[str, Any]:
    """What ranges_worker.py reports of the ledger at `path` verified from the old root: a
    process that runs no other thread, where verify_ledger forks its range workers (this one
    may run other threads, as a pytest-xdist worker does)."""
    command = [sys.executable, str(RANGES_WORKER), str(path), str(keys.root_file), *options]
    done = subprocess.run(command, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    result = cast(dict[str, Any], pickle.loads(done.stdout))
    assert result["threads"] == 1
    return result


# Random tampering: whatever is changed, removed or moved, the ranges answer exactly what the
# sequential verifier answers (and accept only what it accepts).
ENTRY_VALUES: list[object] = [b"\x00" * 32, b"\x01" * 31, "text", 7, -1, b"", "", "genesis"]
CHECKPOINT_COLUMNS = ["size", "head_hash", "ts_ms", "key_id", "signature", "tree_root"]
tamperings = st.one_of(
    st.tuples(
        st.just("entry"),
        st.integers(0, SIZE - 1),
        st.sampled_from(LEDGER_COLUMNS[1:]),
        st.sampled_from(ENTRY_VALUES),
    ),
    st.tuples(st.just("delete"), st.integers(0, SIZE - 1), st.just(""), st.just(0)),
    st.tuples(st.just("swap"), st.integers(0, SIZE - 2), st.just(""), st.just(0)),
    st.tuples(
        st.just("checkpoint"),
        st.sampled_from([6, 16, 21, 41, 46]),
        st.sampled_from(CHECKPOINT_COLUMNS),
        st.sampled_from([0, 3, 60, b"\x02" * 32, "k"]),
    ),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["checkpoint", "sign-each"]),
    changes=st.lists(tamperings, min_size=1, max_size=2),
)
def test_random_tampering_gets_the_same_report_in_ranges_as_sequentially(
    files: dict[str, Path], keys: Keys, mode: str, changes: list[tuple[str, int, str, object]]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = _copy(files, mode, Path(folder))
        for what, at, column, value in changes:
            if what == "entry":
                statement = f"UPDATE ledger SET {column} = ? WHERE seq = ?"
                _try_sql(path, statement, value, at)
            elif what == "delete":
                _try_sql(path, "DELETE FROM ledger WHERE seq = ?", at)
            elif what == "swap":
                _try_sql(path, "UPDATE ledger SET seq = -1 WHERE seq = ?", at)
                _try_sql(path, "UPDATE ledger SET seq = ? WHERE seq = ?", at, at + 1)
                _try_sql(path, "UPDATE ledger SET seq = ? WHERE seq = -1", at + 1)
            else:
                statement = f"UPDATE ledger_checkpoints SET {column} = ? WHERE size = ?"
                _try_sql(path, statement, value, at)
        ranged, sequential = _both(path, keys)
        assert ranged is None or ranged == sequential
        assert (ranged is not None) == sequential.ok


def _try_sql(path: Path, statement: str, *params: object) -> None:
    """A change the schema refuses (a duplicate key) leaves the file as it was."""
    with contextlib.suppress(sqlite3.IntegrityError):
        run_sql(path, statement, *params)


def test_a_store_claiming_many_control_entries_is_verified_sequentially(
    files: dict[str, Path], keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every range is given the control entries, so their number is capped (a ledger holds
    one per key rotation); past the cap the sequential verifier answers, in flat memory."""
    import autonomic.runtime.ledger_ranges as ranges

    monkeypatch.setattr(ranges, "_MAX_CONTROL_ENTRIES", 1)  # the genesis and one rotation: 2
    ranged, sequential = _both(files["sign-each"], keys)
    assert ranged is None and sequential.ok


def test_a_leaf_the_seeks_pass_by_but_a_scan_reads_is_not_accepted_by_the_ranges(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    """The leaf holding a boundary's entry linked twice: the range after the boundary seeks
    past the second link, the range before it stops at the boundary, and only a scan of every
    page reads the boundary's rows twice. The ranges' count must not match the table's."""
    path = _copy(files, "checkpoint", tmp_path)
    boundary = RANGE * 2
    link_leaf_twice(path, "ledger", boundary)
    report = _refused(path, keys)
    assert report.problem == "duplicate"


@pytest.mark.parametrize("table", ["ledger", "ledger_checkpoints"])
def test_an_index_that_leaves_a_row_out_hides_it_from_no_reader(
    files: dict[str, Path], keys: Keys, tmp_path: Path, table: str
) -> None:
    """A store whose key is a plain column with a partial index that lacks a second copy of one
    row (built so, then its SQL rewritten): a reader through the index would not see the copy.
    No reader gets that far: the schema is not the runtime's."""
    path = _copy(files, "checkpoint", tmp_path)
    key = "seq" if table == "ledger" else "size"
    with sqlite3.connect(path) as connection:
        (schema,) = connection.execute(
            "SELECT sql FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
        copied = connection.execute(f"SELECT * FROM {table} ORDER BY {key} LIMIT 1 OFFSET 3")
        row = list(copied.fetchone())
        connection.execute(f"ALTER TABLE {table} RENAME TO old")
        connection.execute(
            schema.replace(f"{key} INTEGER PRIMARY KEY", f"{key} INTEGER, rogue INTEGER")
        )
        info = connection.execute("PRAGMA table_info(old)").fetchall()
        columns = ", ".join(str(column[1]) for column in info)
        connection.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM old")
        connection.execute("DROP TABLE old")
        connection.execute(
            f"CREATE INDEX by_key ON {table} ({key}) WHERE {key} IS NOT NULL AND rogue IS NULL"
        )
        marks = ", ".join("?" for _ in row)
        connection.execute(f"INSERT INTO {table} ({columns}, rogue) VALUES ({marks}, 1)", row)
        connection.execute("PRAGMA writable_schema = ON")
        connection.execute(
            "UPDATE sqlite_master SET sql = ? WHERE name = 'by_key'",
            (f"CREATE INDEX by_key ON {table} ({key}) WHERE {key} IS NOT NULL",),
        )
    connection.close()
    # The table and the index are not declared as the runtime declares them: the file is
    # refused before any row is read, by every reader (store/sqlite_schema.py).
    with pytest.raises(LedgerFormatError, match="schema was altered"):
        read_ledger(path)


def test_a_control_entry_body_holding_an_integer_too_long_to_read_is_a_failure(
    files: dict[str, Path], keys: Keys, tmp_path: Path
) -> None:
    """Python refuses to read integers of over 4,300 digits (a ValueError, not a JSON error):
    the genesis entry's body is reported, not a crash."""
    path = _copy(files, "sign-each", tmp_path)
    row = list(_entry(path, 0))
    body = '{"a":' + "1" * 5000 + "}"
    digest = hashlib.sha256(PAYLOAD_TAG + body.encode()).digest()
    strings = cast(tuple[str, str, str, str, str, str, str, str], (*row[2:7], body, *row[8:10]))
    seq, ts_ms, prev_hash = cast(int, row[0]), cast(int, row[1]), cast(bytes, row[11])
    rehashed = entry_hash(seq, ts_ms, strings, digest, prev_hash)
    run_sql(
        path,
        "UPDATE ledger SET event = ?, payload_sha256 = ?, entry_hash = ? WHERE seq = 0",
        body,
        digest,
        rehashed,
    )
    report = _refused(path, keys)
    assert (report.index, report.reason) == (0, "the control entry's body is not JSON")


# The workers read through apsw and the sequential verifier through sqlite3: on crafted files
# (the red team's attacks, values of the wrong type or not UTF-8, a schema altered after the
# plan was made), every range gets the same answer from both readers.
def _altered_schema(path: Path) -> None:
    run_sql(path, "CREATE INDEX by_kind ON ledger (kind) WHERE kind <> 'timer'")


READER_FILES: dict[str, object] = {
    "valid": None,
    "a leaf linked twice": lambda path: link_leaf_twice(path, "ledger", RANGE * 2),
    "text not UTF-8": "UPDATE ledger SET instance = CAST(x'ff62' AS TEXT) WHERE seq = 17",
    "a real number": "UPDATE ledger SET ts_ms = ts_ms + 0.5 WHERE seq = 9",
    "a short blob": "UPDATE ledger SET payload_sha256 = x'00' WHERE seq = 8",
    "text stored as a blob": "UPDATE ledger SET kind = CAST(kind AS BLOB) WHERE seq = 16",
    "a NUL in text": "UPDATE ledger SET actor = 'op' || char(0) || 's' WHERE seq = 23",
    "a checkpoint's blob as text": (
        "UPDATE ledger_checkpoints SET tree_root = 'x' WHERE size = 16"
    ),
    "an index added after the plan": _altered_schema,
}


@pytest.mark.parametrize("name", sorted(READER_FILES))
def test_the_workers_reader_and_the_sequential_reader_give_every_range_one_answer(
    files: dict[str, Path], keys: Keys, tmp_path: Path, name: str
) -> None:
    from autonomic.runtime.ledger_ranges import _plan, _verify_range
    from autonomic.runtime.processes import map_in_processes

    path = _copy(files, "checkpoint", tmp_path)
    with read_ledger(path) as source:
        plan = _plan(source, RootOfTrust.of(keys.root), None, "x", 2, RANGE, 0, None)
    assert plan is not None
    tasks = plan[0]
    change = READER_FILES[name]
    if isinstance(change, str):
        run_sql(path, change)
    elif change is not None:
        cast(Callable[[Path], None], change)(path)
    answers = {
        reader: map_in_processes(partial(_verify_range, reader=reader), tasks, 2)
        for reader in ("apsw", "sqlite3")
    }
    assert answers["apsw"] == answers["sqlite3"]
    accepted = [answer is not None for answer in answers["apsw"]]
    if name in ("valid", "a leaf linked twice"):
        assert all(accepted)  # a leaf the seeks pass by: only the count of every page sees it
    else:
        assert not all(accepted)
