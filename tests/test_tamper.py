"""Tamper matrix: every modification of a stored ledger is found at the exact sequence index.

A 30-entry ledger is written to a real SQLite file (the store's schema) in both modes, with
real keys; then bytes are flipped in the file, rows are rewritten, deleted, renumbered, the
tail is truncated, signatures are swapped, and a store that lies about rows is simulated.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from autonomic.runtime.errors import WitnessError
from autonomic.runtime.keys import Keyring, Signer, generate_keypair, load_signer
from autonomic.runtime.ledger import (
    LEDGER_COLUMNS,
    SIG_TAG,
    Checkpoint,
    EntryData,
    LedgerEntry,
    LedgerMode,
    LedgerSealer,
    MalformedRecord,
    MemoryLedger,
    VerifyReport,
    entry_hash,
    payload_digest,
    read_ledger,
    verify_entries,
    verify_ledger,
    write_jsonl,
)
from autonomic.runtime.merkle import SubtreeHasher, TreeFrontier, consistency_proof
from autonomic.runtime.witness import FileWitness, Publication, read_witness_file
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_files import write_sqlite_ledger, write_sqlite_rows

T0 = 1_700_000_000_000
SIZE = 30
TARGETS = (0, 14, SIZE - 1)  # first, middle and last entry
MODES: tuple[LedgerMode, ...] = ("sign-each", "checkpoint")
STATES = ("PendingApproval", "Active", "Suspended", "Revoked")


@dataclass(frozen=True)
class Sample:
    mode: LedgerMode
    path: Path
    entries: tuple[LedgerEntry, ...]
    checkpoints: tuple[Checkpoint, ...]
    signer: Signer
    keyring: Keyring


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Signer, Signer]:
    root = tmp_path_factory.mktemp("keys")
    generate_keypair(root / "main", valid_from_ms=T0)
    generate_keypair(root / "other", valid_from_ms=T0)
    return load_signer(root / "main"), load_signer(root / "other")


def _build(mode: LedgerMode, signer: Signer) -> MemoryLedger:
    ledger = MemoryLedger(LedgerSealer(signer, mode), genesis_ts_ms=T0)
    for number in range(1, SIZE):  # seq 0 is the genesis entry
        ledger.append(
            EntryData(
                ts_ms=T0 + 1000 * number,
                kind=("transition", "timer", "escalation", "rejection")[number % 4],
                machine="Entitlement",
                instance=f"ent-{number % 4}",
                from_state=STATES[number % 4],
                to_state=STATES[(number + 1) % 4],
                event="Approve",
                actor="ops@example.com",
                event_id=f"evt-{number:04d}",
                payload_sha256=payload_digest({"approver": "alice", "n": number}),
            )
        )
        if mode == "checkpoint" and number % 10 == 9:
            ledger.checkpoint(T0 + 1000 * number)
    return ledger


@pytest.fixture(params=MODES)
def sample(request: pytest.FixtureRequest, tmp_path: Path, keys: tuple[Signer, Signer]) -> Sample:
    mode: LedgerMode = request.param
    signer, _ = keys
    ledger = _build(mode, signer)
    path = write_sqlite_ledger(tmp_path / "store.db", ledger)
    report = verify_ledger(path, Keyring([signer.public_info()]))
    assert report.ok and report.count == SIZE  # the untouched sample verifies
    return Sample(
        mode,
        path,
        tuple(ledger.entries()),
        tuple(ledger.checkpoints()),
        signer,
        Keyring([signer.public_info()]),
    )


def _sql(path: Path, statement: str, *params: object) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA synchronous = OFF")  # a test file: no need to wait for disk
        connection.execute(statement, params)
    connection.close()


def _failed_at(report: VerifyReport, index: int, *problems: str) -> None:
    assert not report.ok, "tampering went undetected"
    assert report.index == index, report
    if problems:
        assert report.problem in problems, report


# ---------------------------------------------------------------------------------------------
# Flipping bytes of the SQLite file itself.


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """An SQLite varint at `at`: (value, length)."""
    value = 0
    for length in range(1, 9):
        byte = data[at + length - 1]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, length
    return (value << 8) | data[at + 8], 9


def _content_size(serial_type: int) -> int:
    if serial_type >= 12:
        return (serial_type - 12) // 2
    return (0, 1, 2, 3, 4, 6, 8, 8, 0, 0)[serial_type]


@dataclass(frozen=True)
class Cell:
    """Where one ledger row lives in the file: the whole cell, and each column's body bytes."""

    start: int
    end: int
    columns: dict[str, range]


def _find_cell(data: bytes, entry: LedgerEntry) -> Cell:
    """Parse the table b-tree leaf pages for the cell holding `entry` (by rowid and content)."""
    page_size = int.from_bytes(data[16:18], "big")
    for number in range(len(data) // page_size):
        base = number * page_size
        header = base + (100 if number == 0 else 0)
        if data[header] != 0x0D:  # not a table leaf page
            continue
        for index in range(int.from_bytes(data[header + 3 : header + 5], "big")):
            pointer = header + 8 + 2 * index
            start = base + int.from_bytes(data[pointer : pointer + 2], "big")
            payload_size, first = _varint(data, start)
            rowid, second = _varint(data, start + first)
            record = start + first + second
            end = record + payload_size
            if rowid != entry.seq or entry.entry_hash not in data[record:end]:
                continue
            header_size, used = _varint(data, record)
            at, body = record + used, record + header_size
            columns: dict[str, range] = {}
            for name in LEDGER_COLUMNS:
                serial_type, used = _varint(data, at)
                at += used
                size = _content_size(serial_type)
                columns[name] = range(body, body + size)
                body += size
            assert body == end
            return Cell(start, end, columns)
    raise AssertionError(f"no cell for seq {entry.seq}")


# What a flipped byte inside a column's stored value must be reported as. Text that stops
# being UTF-8 cannot be handed out by SQLite at all: a malformed row at the same index.
EXPECTED_BY_COLUMN: dict[LedgerMode, dict[str, tuple[str, ...]]] = {
    "sign-each": {
        "prev_hash": ("chain_break",),
        "key_id": ("unknown_key", "malformed"),
        "signature": ("bad_signature",),
    },
    "checkpoint": {"prev_hash": ("chain_break",)},
}


@pytest.mark.parametrize("target", TARGETS)
def test_every_byte_of_an_entry_flipped_in_the_file(
    sample: Sample, tmp_path: Path, target: int
) -> None:
    original = sample.path.read_bytes()
    cell = _find_cell(original, sample.entries[target])
    # The genesis entry (seq 0) is signed in either mode.
    expected = EXPECTED_BY_COLUMN["sign-each" if target == 0 else sample.mode]
    column_of = {at: name for name, span in cell.columns.items() for at in span}
    copy = tmp_path / "flipped.db"
    for offset in range(cell.start, cell.end):
        for mask in (0x01, 0x80):  # 0x80 also turns ASCII text into invalid UTF-8
            mutated = bytearray(original)
            mutated[offset] ^= mask
            copy.write_bytes(mutated)
            report = verify_ledger(copy, sample.keyring)
            column = column_of.get(offset)
            if column is None:  # cell and record headers: any failure, at the right index
                _failed_at(report, target)
            else:
                allowed = expected.get(column, ("hash_mismatch", "malformed"))
                _failed_at(report, target, *allowed)


# ---------------------------------------------------------------------------------------------
# Rewriting row fields through SQL.


def _flips(value: int | str | bytes) -> Iterator[tuple[str, object]]:
    """Each one-bit change of a stored value: (SQL placeholder, replacement of the same type).

    Integers flip a bit of their 8-byte form; text is written back as text (CAST), even where
    the change leaves it invalid UTF-8."""
    if isinstance(value, int):
        raw = value.to_bytes(8, "big", signed=True)
    else:
        raw = value.encode() if isinstance(value, str) else value
    for position in range(len(raw)):
        changed = bytearray(raw)
        changed[position] ^= 0x01
        if isinstance(value, int):
            yield "?", int.from_bytes(changed, "big", signed=True)
        elif isinstance(value, str):
            yield "CAST(? AS TEXT)", bytes(changed)
        else:
            yield "?", bytes(changed)


@pytest.mark.parametrize("target", TARGETS)
def test_every_byte_of_every_field_rewritten_through_sql(sample: Sample, target: int) -> None:
    entry = sample.entries[target]
    signed = sample.mode == "sign-each" or target == 0  # the genesis entry is always signed
    for column in LEDGER_COLUMNS[1:]:
        value = getattr(entry, column)
        for placeholder, replacement in _flips(value):
            statement = f"UPDATE ledger SET {column} = {placeholder} WHERE seq = ?"
            _sql(sample.path, statement, replacement, target)
            report = verify_ledger(sample.path, sample.keyring)
            _sql(sample.path, f"UPDATE ledger SET {column} = ? WHERE seq = ?", value, target)
            if column == "prev_hash":
                _failed_at(report, target, "chain_break")
            elif column == "key_id" and signed:
                _failed_at(report, target, "unknown_key")
            elif column == "signature" and signed:
                _failed_at(report, target, "bad_signature")
            else:
                _failed_at(report, target, "hash_mismatch")
    assert verify_ledger(sample.path, sample.keyring).ok  # every change was undone


@pytest.mark.parametrize("sample", ["checkpoint"], indirect=True)
def test_signature_data_added_in_checkpoint_mode(sample: Sample) -> None:
    _sql(sample.path, "UPDATE ledger SET key_id = ? WHERE seq = 3", sample.signer.key_id)
    _failed_at(verify_ledger(sample.path, sample.keyring), 3, "unexpected_signature")


def test_wrong_types_and_lengths_from_the_store(sample: Sample) -> None:
    cases: list[tuple[str, object]] = [
        ("ts_ms", "yesterday"),  # INTEGER affinity keeps non-numeric text
        ("ts_ms", 1.5),
        ("kind", b"transition"),
        ("instance", b"\xff\xfe"),  # TEXT affinity turns numbers into text; a blob stays
        ("payload_sha256", sample.entries[14].payload_sha256 + b"\x00"),
        ("payload_sha256", sample.entries[14].payload_sha256.hex()),
        ("prev_hash", sample.entries[14].prev_hash[:31]),
        ("entry_hash", 7),
        ("signature", "text"),
    ]
    for column, value in cases:
        original = getattr(sample.entries[14], column)
        _sql(sample.path, f"UPDATE ledger SET {column} = ? WHERE seq = 14", value)
        report = verify_ledger(sample.path, sample.keyring)
        _sql(sample.path, f"UPDATE ledger SET {column} = ? WHERE seq = 14", original)
        if column == "signature":  # in checkpoint mode any signature data is unexpected
            _failed_at(report, 14, "malformed", "unexpected_signature")
        else:
            _failed_at(report, 14, "malformed")


# ---------------------------------------------------------------------------------------------
# Deleting, duplicating, reordering.


def test_deleted_entry_is_a_gap(sample: Sample) -> None:
    _sql(sample.path, "DELETE FROM ledger WHERE seq = 14")
    report = verify_ledger(sample.path, sample.keyring)
    _failed_at(report, 14, "gap")
    assert report.count == 14


def test_renumbered_rows_break_the_chain_at_the_first(sample: Sample) -> None:
    # Swap rows 14 and 15 by renumbering them (the store's primary key forbids duplicates).
    _sql(sample.path, "UPDATE ledger SET seq = -1 WHERE seq = 14")
    _sql(sample.path, "UPDATE ledger SET seq = 14 WHERE seq = 15")
    _sql(sample.path, "UPDATE ledger SET seq = 15 WHERE seq = -1")
    _failed_at(verify_ledger(sample.path, sample.keyring), 14, "chain_break")


def _export(sample: Sample, path: Path) -> list[str]:
    with read_ledger(sample.path) as source, path.open("w", encoding="utf-8") as out:
        write_jsonl(source.entries(), source.checkpoints(), out, mode=sample.mode)
    return path.read_text().splitlines()


def _entry_lines(lines: list[str]) -> dict[int, int]:
    """seq -> line index in an export."""
    return {
        json.loads(line)["seq"]: number
        for number, line in enumerate(lines)
        if line.startswith('{"seq"')
    }


def test_duplicated_and_reordered_lines_in_an_export(sample: Sample, tmp_path: Path) -> None:
    lines = _export(sample, tmp_path / "ledger.jsonl")
    at = _entry_lines(lines)
    tampered = tmp_path / "tampered.jsonl"
    duplicated = [*lines[: at[14] + 1], lines[at[14]], *lines[at[14] + 1 :]]
    tampered.write_text("\n".join(duplicated) + "\n")
    _failed_at(verify_ledger(tampered, sample.keyring), 15, "duplicate")
    swapped = list(lines)
    swapped[at[14]], swapped[at[15]] = swapped[at[15]], swapped[at[14]]
    tampered.write_text("\n".join(swapped) + "\n")
    _failed_at(verify_ledger(tampered, sample.keyring), 14, "reorder")
    moved = [line for number, line in enumerate(lines) if number != at[3]]
    moved.insert(at[20], lines[at[3]])
    tampered.write_text("\n".join(moved) + "\n")
    _failed_at(verify_ledger(tampered, sample.keyring), 3, "reorder")
    deleted = [line for number, line in enumerate(lines) if number != at[7]]
    tampered.write_text("\n".join(deleted) + "\n")
    _failed_at(verify_ledger(tampered, sample.keyring), 7, "gap")


def test_duplicate_from_a_store_that_repeats_a_row(sample: Sample) -> None:
    repeated = [*sample.entries[:10], sample.entries[9], *sample.entries[10:]]
    report = verify_entries(
        repeated, sample.keyring, checkpoints=sample.checkpoints, mode=sample.mode
    )
    _failed_at(report, 10, "duplicate")


# ---------------------------------------------------------------------------------------------
# Truncation of the tail, against an external checkpoint.


def _external(sample: Sample, tmp_path: Path) -> Checkpoint:
    with read_ledger(sample.path) as source:
        kept = source.latest_signed_checkpoint()
    file = tmp_path / "kept-elsewhere.json"
    file.write_text(kept.to_json())
    return Checkpoint.load(file)


def test_truncated_tail_is_detected_against_the_kept_checkpoint(
    sample: Sample, tmp_path: Path
) -> None:
    external = _external(sample, tmp_path)
    assert external.size == SIZE
    assert external.kind == ("entry" if sample.mode == "sign-each" else "checkpoint")
    assert verify_ledger(sample.path, sample.keyring, external_checkpoint=external).ok
    _sql(sample.path, "DELETE FROM ledger WHERE seq >= 25")
    _sql(sample.path, "DELETE FROM ledger_checkpoints WHERE size > 25")
    report = verify_ledger(sample.path, sample.keyring, external_checkpoint=external)
    _failed_at(report, 25, "truncated")
    assert report.count == 25
    if sample.mode == "sign-each":
        # Without the kept checkpoint, a cut at an entry boundary is undetectable in this mode.
        assert verify_ledger(sample.path, sample.keyring).ok
    else:
        # Entries 20..24 lost their covering checkpoint along with the tail.
        _failed_at(verify_ledger(sample.path, sample.keyring), 20, "uncovered")


@pytest.mark.parametrize("sample", ["checkpoint"], indirect=True)
def test_truncation_at_a_checkpoint_boundary(sample: Sample, tmp_path: Path) -> None:
    external = _external(sample, tmp_path)
    _sql(sample.path, "DELETE FROM ledger WHERE seq >= 25")  # the stored checkpoint remains
    _failed_at(verify_ledger(sample.path, sample.keyring), 25, "truncated")
    _sql(sample.path, "DELETE FROM ledger WHERE seq >= 20")
    _sql(sample.path, "DELETE FROM ledger_checkpoints WHERE size > 20")
    # A clean cut at a checkpoint, checkpoint removed too: only the kept checkpoint tells.
    assert verify_ledger(sample.path, sample.keyring).ok
    report = verify_ledger(sample.path, sample.keyring, external_checkpoint=external)
    _failed_at(report, 20, "truncated")


def test_external_checkpoint_of_another_history(sample: Sample, tmp_path: Path) -> None:
    external = _external(sample, tmp_path)
    forged = replace(external, head_hash=bytes(32))
    report = verify_ledger(sample.path, sample.keyring, external_checkpoint=forged)
    _failed_at(report, SIZE - 1, "checkpoint_signature")


def test_forged_checkpoints_are_no_evidence_of_truncation(sample: Sample, tmp_path: Path) -> None:
    external = _external(sample, tmp_path)
    beyond = Checkpoint(SIZE + 10, bytes(32), external.ts_ms, external.key_id, bytes(64))
    report = verify_ledger(sample.path, sample.keyring, external_checkpoint=beyond)
    _failed_at(report, SIZE + 9, "checkpoint_signature")
    _sql(
        sample.path,
        "INSERT INTO ledger_checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        SIZE + 10,
        bytes(32),
        T0,
        sample.signer.key_id,
        bytes(64),
        bytes(32),
        bytes(32),
        b"",
    )
    report = verify_ledger(sample.path, sample.keyring)
    _failed_at(report, SIZE, "checkpoint_signature")


# ---------------------------------------------------------------------------------------------
# Swapping in another key.


def test_signature_swapped_for_another_keys(sample: Sample, keys: tuple[Signer, Signer]) -> None:
    _, other = keys
    target = sample.entries[14]
    forged_signature = other.sign(SIG_TAG + target.entry_hash)
    if sample.mode == "sign-each":
        _sql(sample.path, "UPDATE ledger SET signature = ? WHERE seq = 14", forged_signature)
        _failed_at(verify_ledger(sample.path, sample.keyring), 14, "bad_signature")
        _sql(sample.path, "UPDATE ledger SET key_id = ? WHERE seq = 14", other.key_id)
        report = verify_ledger(sample.path, sample.keyring)
        _failed_at(report, 14, "unknown_key")
        assert "never introduced" in (report.reason or "")
    else:
        checkpoint = sample.checkpoints[1]  # size 20
        resigned = other.sign(checkpoint.signed_message())
        _sql(sample.path, "UPDATE ledger_checkpoints SET signature = ? WHERE size = 20", resigned)
        _failed_at(verify_ledger(sample.path, sample.keyring), 19, "checkpoint_signature")
        _sql(sample.path, "UPDATE ledger_checkpoints SET key_id = ? WHERE size = 20", other.key_id)
        report = verify_ledger(sample.path, sample.keyring)
        _failed_at(report, 19, "checkpoint_signature")
        assert "never introduced" in (report.reason or "")


@pytest.mark.parametrize("sample", ["checkpoint"], indirect=True)
def test_every_byte_of_a_stored_checkpoint_flipped(sample: Sample) -> None:
    checkpoint = sample.checkpoints[1]  # size 20: reported at its head entry, seq 19
    for column in ("head_hash", "ts_ms", "key_id", "signature"):
        value = getattr(checkpoint, column)
        for placeholder, replacement in _flips(value):
            statement = f"UPDATE ledger_checkpoints SET {column} = {placeholder} WHERE size = 20"
            _sql(sample.path, statement, replacement)
            report = verify_ledger(sample.path, sample.keyring)
            _sql(sample.path, f"UPDATE ledger_checkpoints SET {column} = ? WHERE size = 20", value)
            _failed_at(report, 19, "checkpoint_signature")
    _sql(sample.path, "UPDATE ledger_checkpoints SET size = 21 WHERE size = 20")
    _failed_at(verify_ledger(sample.path, sample.keyring), 20, "checkpoint_signature")


# ---------------------------------------------------------------------------------------------
# A store that returns modified rows.


def _lying(
    entries: Iterator[LedgerEntry | MalformedRecord], seq: int
) -> Iterator[LedgerEntry | MalformedRecord]:
    for entry in entries:
        if isinstance(entry, LedgerEntry) and entry.seq == seq:
            yield entry._replace(actor="mallory")
        else:
            yield entry


def test_a_store_that_returns_modified_rows(sample: Sample) -> None:
    with read_ledger(sample.path) as source:
        report = verify_entries(
            _lying(source.entries(), 14),
            sample.keyring,
            checkpoints=source.checkpoints(),
            mode=source.mode,
        )
    _failed_at(report, 14, "hash_mismatch")


def test_a_row_rewritten_and_rehashed(sample: Sample) -> None:
    original = sample.entries[14]
    strings = (
        original.kind,
        original.machine,
        original.instance,
        "Revoked",  # from_state rewritten
        original.to_state,
        original.event,
        original.actor,
        original.event_id,
    )
    rehashed = entry_hash(14, original.ts_ms, strings, original.payload_sha256, original.prev_hash)
    _sql(
        sample.path,
        "UPDATE ledger SET from_state = 'Revoked', entry_hash = ? WHERE seq = 14",
        rehashed,
    )
    report = verify_ledger(sample.path, sample.keyring)
    # Signed: the entry's signature no longer matches. Chained: the next entry still links
    # the original hash, which pins the rewrite to seq 14.
    _failed_at(report, 14, "bad_signature" if sample.mode == "sign-each" else "chain_break")


@pytest.mark.parametrize("sample", ["checkpoint"], indirect=True)
def test_a_whole_chain_rewritten_after_an_entry(sample: Sample) -> None:
    # (In sign-each mode the first rewritten entry's own signature fails, as tested above.)
    # The strongest forgery without the key: rewrite seq 14 and rechain everything after it.
    sealer = LedgerSealer(sample.signer, "checkpoint")  # its checkpoints are never used
    forged: list[LedgerEntry] = list(sample.entries[:14])
    for entry in sample.entries[14:]:
        data = EntryData(*entry[1:11])
        if entry.seq == 14:
            data = data._replace(actor="mallory")
        forged.append(sealer.seal(entry.seq, forged[-1].entry_hash, data))
    report = verify_entries(forged, sample.keyring, checkpoints=sample.checkpoints)
    # No entry is wrong on its own; the signed checkpoint at size 20 is the first to disagree.
    _failed_at(report, 19, "checkpoint_mismatch")


# ---------------------------------------------------------------------------------------------
# Any single field of any entry, changed to any other value of its type.


@pytest.fixture(scope="module")
def memory_ledgers(keys: tuple[Signer, Signer]) -> dict[str, MemoryLedger]:
    signer, _ = keys
    return {mode: _build(mode, signer) for mode in MODES}


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    target=st.integers(0, SIZE - 1),
    column=st.sampled_from(LEDGER_COLUMNS),
    data=st.data(),
)
def test_any_changed_field_is_found_at_its_entry(
    keys: tuple[Signer, Signer],
    memory_ledgers: dict[str, MemoryLedger],
    mode: LedgerMode,
    target: int,
    column: str,
    data: st.DataObject,
) -> None:
    signer, _ = keys
    ledger = memory_ledgers[mode]
    entries = list(ledger.entries())
    old = getattr(entries[target], column)
    values: st.SearchStrategy[object]
    if isinstance(old, int):
        values = st.integers(-(2**63), 2**63 - 1)
    elif isinstance(old, str):
        values = st.text(max_size=20)
    else:
        values = st.binary(max_size=70)
    new = data.draw(values.filter(lambda value: value != old))
    fields: list[object] = list(entries[target])
    fields[LEDGER_COLUMNS.index(column)] = new
    entries[target] = LedgerEntry._make(fields)
    keyring = Keyring([signer.public_info()])
    report = verify_entries(entries, keyring, checkpoints=ledger.checkpoints(), mode=mode)
    _failed_at(report, target)


# ---------------------------------------------------------------------------------------------
# The root of trust, the declared mode, the chain of checkpoints, and a witness.


def _resealed(
    sample: Sample, signer: Signer, start: int
) -> tuple[list[LedgerEntry], list[Checkpoint]]:
    """The sample's history from seq `start` on rewritten (actor "mallory") and re-sealed by
    `signer`, with every checkpoint from there on re-signed and re-chained by it."""
    sealer = LedgerSealer(signer, sample.mode)
    entries = list(sample.entries[:start])
    for old in sample.entries[start:]:
        data = EntryData(*old[1:11])._replace(actor="mallory")
        entries.append(sealer.seal(old.seq, entries[-1].entry_hash, data))
    checkpoints: list[Checkpoint] = []
    previous = None
    for checkpoint in sample.checkpoints:
        if checkpoint.size > start:
            tree = TreeFrontier().extend(e.entry_hash for e in entries[: checkpoint.size])
            head = entries[checkpoint.size - 1].entry_hash
            checkpoint = sealer.checkpoint(checkpoint.size, head, checkpoint.ts_ms, tree, previous)
        checkpoints.append(checkpoint)
        previous = checkpoint
    return entries, checkpoints


def test_a_forged_key_in_the_keyring_is_not_trusted(
    sample: Sample, tmp_path: Path, keys: tuple[Signer, Signer]
) -> None:
    _, attacker = keys
    forged = write_sqlite_rows(
        tmp_path / "forged.db", *_resealed(sample, attacker, 14), sample.mode
    )
    root = sample.signer.public_info()
    report = verify_ledger(forged, root)
    if sample.mode == "sign-each":
        _failed_at(report, 14, "unknown_key")
    else:  # unsigned entries: the first checkpoint over them is the forged signature
        _failed_at(report, 19, "checkpoint_signature")
    assert "never introduced" in (report.reason or "")
    # Handing the verifier the attacker's key too changes nothing: it pins one root.
    with pytest.raises(ValueError, match="one pinned root"):
        verify_ledger(forged, Keyring([root, attacker.public_info()]))
    # The whole history rewritten from its genesis on: not the pinned root.
    entries, _ = _resealed(sample, attacker, 1)
    rooted = MemoryLedger(LedgerSealer(attacker, sample.mode), genesis_ts_ms=T0)
    entries[0] = next(rooted.entries())
    rewritten = write_sqlite_rows(tmp_path / "rewritten.db", entries, [], sample.mode)
    _failed_at(verify_ledger(rewritten, root), 0, "genesis")


def _rotated(sample: Sample, tmp_path: Path, new: Signer) -> Path:
    """A ledger whose key rotates to `new` at seq 10, signed and checkpointed as the runtime
    does it."""
    ledger = MemoryLedger(LedgerSealer(sample.signer, sample.mode), genesis_ts_ms=T0)
    for entry in sample.entries[1:10]:
        ledger.append(EntryData(*entry[1:11]))
    ledger.rotate(new, T0 + 10_000)
    for entry in sample.entries[11:]:
        ledger.append(EntryData(*entry[1:11]))
    if sample.mode == "checkpoint":
        ledger.checkpoint(T0 + 60_000)
    return write_sqlite_ledger(tmp_path / "rotated.db", ledger)


def test_a_rotation_without_the_old_keys_signature(
    sample: Sample, tmp_path: Path, keys: tuple[Signer, Signer]
) -> None:
    _, new = keys
    path = _rotated(sample, tmp_path, new)
    root = sample.signer.public_info()
    report = verify_ledger(path, root)
    assert report.ok and report.keys == (sample.signer.key_id, new.key_id), report.reason
    with read_ledger(path) as source:
        rotation = list(source.entries())[10]
    assert rotation.kind == "key_rotation" and rotation.key_id == sample.signer.key_id
    # Signed by the incoming key instead of the outgoing one: its signature does not verify.
    by_new = new.sign(SIG_TAG + rotation.entry_hash)
    _sql(path, "UPDATE ledger SET signature = ? WHERE seq = 10", by_new)
    _failed_at(verify_ledger(path, root), 10, "bad_signature")
    # ... and named as its signer: a key the chain has not introduced yet.
    _sql(path, "UPDATE ledger SET key_id = ? WHERE seq = 10", new.key_id)
    _failed_at(verify_ledger(path, root), 10, "unknown_key")
    # A rotation removed: the new key's entries are signed by a key never introduced.
    _sql(path, "UPDATE ledger SET signature = ?, key_id = ? WHERE seq = 10", b"", "")
    _failed_at(verify_ledger(path, root), 10, "missing_signature")


def test_a_deleted_mode_row(sample: Sample) -> None:
    _sql(sample.path, "DELETE FROM ledger_meta WHERE key = 'mode'")
    report = verify_ledger(sample.path, sample.keyring)
    _failed_at(report, 0, "mode_mismatch")
    assert "no mode row" in (report.reason or "")
    other = "checkpoint" if sample.mode == "sign-each" else "sign-each"
    _sql(sample.path, "INSERT INTO ledger_meta VALUES ('mode', ?)", other)
    _failed_at(verify_ledger(sample.path, sample.keyring), 0, "mode_mismatch")


@pytest.mark.parametrize("sample", ["checkpoint"], indirect=True)
def test_a_deleted_middle_checkpoint(sample: Sample) -> None:
    _sql(sample.path, "DELETE FROM ledger_checkpoints WHERE size = 20")
    report = verify_ledger(sample.path, sample.keyring)
    _failed_at(report, 29, "checkpoint_chain")
    assert "at size 10: a checkpoint between them was removed" in (report.reason or "")
    _sql(sample.path, "DELETE FROM ledger_checkpoints WHERE size = 10")
    _failed_at(verify_ledger(sample.path, sample.keyring), 29, "checkpoint_chain")


def _publish_all(sample: Sample, witness: FileWitness) -> None:
    """Publish the sample's checkpoints as the runtime would, each with its proof."""
    hashes = [entry.entry_hash for entry in sample.entries]
    sent = TreeFrontier()
    for checkpoint in sample.checkpoints:
        proof = consistency_proof(
            sent.size, checkpoint.size, SubtreeHasher(lambda i: hashes[i], sent)
        )
        witness.publish(Publication(checkpoint, sent.size, sent.root(), tuple(proof)))
        sent = TreeFrontier().extend(hashes[: checkpoint.size])


@pytest.mark.parametrize("sample", ["checkpoint"], indirect=True)
def test_truncation_with_a_witness(sample: Sample, tmp_path: Path) -> None:
    witness = FileWitness(tmp_path / "elsewhere.jsonl")
    _publish_all(sample, witness)
    newest, count = read_witness_file(witness.path)
    assert (newest.size, count) == (SIZE, 3)
    assert verify_ledger(sample.path, sample.keyring, external_checkpoint=newest).ok
    _sql(sample.path, "DELETE FROM ledger WHERE seq >= 25")
    _sql(sample.path, "DELETE FROM ledger_checkpoints WHERE size > 20")
    report = verify_ledger(sample.path, sample.keyring, external_checkpoint=newest)
    _failed_at(report, 25, "truncated")
    assert report.missing == 5 and "(5 entries are missing)" in (report.reason or "")
    # The witness refuses a history rewritten after the cut.
    forged = replace(sample.checkpoints[-1], tree_root=bytes(32))
    with pytest.raises(WitnessError, match="holds a different tree at size 30"):
        witness.publish(Publication(forged, 20, sample.checkpoints[1].tree_root, ()))
    longer = replace(forged, size=SIZE + 5)
    with pytest.raises(WitnessError, match="does not extend the checkpoint at size 30"):
        witness.publish(Publication(longer, SIZE, newest.tree_root, ()))
