"""The audit ledger: canonical JSON, entry layout, sealing, checkpoints, rotation, streaming."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import sqlite3
import struct
import tracemalloc
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import rfc8785
from autonomic.runtime.errors import (
    CheckpointFileError,
    EntryEncodingError,
    KeyWindowError,
    LedgerFormatError,
    LedgerReadError,
    PayloadEncodingError,
)
from autonomic.runtime.keys import Keyring, Signer, generate_keypair, load_signer
from autonomic.runtime.ledger import (
    CHECKPOINT_TAG,
    EMPTY_PAYLOAD_DIGEST,
    ENTRY_TAG,
    GENESIS_HASH,
    INSERT_CHECKPOINT_SQL,
    INSERT_ENTRY_SQL,
    LEDGER_COLUMNS,
    META_MODE_KEY,
    PAYLOAD_TAG,
    SCHEMA_SQL,
    SELECT_HEAD_SQL,
    SET_META_SQL,
    SIG_TAG,
    Checkpoint,
    EntryData,
    LedgerEntry,
    LedgerMode,
    LedgerSealer,
    MemoryLedger,
    canonical_json,
    encode_entry,
    entry_hash,
    payload_digest,
    read_ledger,
    verify_entries,
    verify_ledger,
    write_jsonl,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_files import write_sqlite_ledger

T0 = 1_700_000_000_000
HOUR = 3_600_000
MODES: tuple[LedgerMode, ...] = ("sign-each", "checkpoint")


def _data(number: int, ts_ms: int = T0, instance: str = "order-1") -> EntryData:
    return EntryData(
        ts_ms=ts_ms + number,
        kind="transition",
        machine="Entitlement",
        instance=instance,
        from_state="PendingApproval",
        to_state="Active",
        event="Approve",
        actor="alice",
        event_id=f"evt-{number}",
        payload_sha256=payload_digest({"approver": "alice", "n": number}),
    )


def _ledger(signer: Signer, mode: LedgerMode, count: int = 30, batch: int = 10) -> MemoryLedger:
    ledger = MemoryLedger(LedgerSealer(signer, mode))
    for number in range(count):
        ledger.append(_data(number, instance=f"order-{number % 3}"))
        if number % batch == batch - 1 and mode == "checkpoint":
            ledger.checkpoint(T0 + number)
    return ledger


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, valid_from_ms=T0 - HOUR)
    return load_signer(folder)


@pytest.fixture(scope="module")
def keyring(signer: Signer) -> Keyring:
    return Keyring([signer.public_info()])


# ---------------------------------------------------------------------------------------------
# Canonical JSON (RFC 8785) and payload digests.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _rfc8785_or_error(value: object) -> bytes | None:
    try:
        return rfc8785.dumps(value)  # type: ignore[arg-type]
    except rfc8785.CanonicalizationError:
        return None


def _ours_or_error(value: object) -> bytes | None:
    try:
        return canonical_json(value)
    except PayloadEncodingError:
        return None


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_canonical_json_equals_the_rfc8785_package(value: object) -> None:
    assert _ours_or_error(value) == _rfc8785_or_error(value)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53))
def test_numbers_match_the_rfc8785_package(number: float) -> None:
    assert _ours_or_error(number) == _rfc8785_or_error(number)


def test_rfc8785_key_sorting_vector() -> None:
    # RFC 8785 section 3.2.3: keys sort by UTF-16 code units, so the emoji (a surrogate pair)
    # sorts before U+FB33 although its code point is larger.
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = [key for key, _ in json.loads(canonical_json(value)).items()]
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_rfc8785_number_vectors() -> None:
    # ECMAScript Number::toString examples from RFC 8785 appendix B.
    vectors = {
        0.0: "0",
        5e-324: "5e-324",
        1.7976931348623157e308: "1.7976931348623157e+308",
        9007199254740992.0: "9007199254740992",
        1e21: "1e+21",
        1e20: "100000000000000000000",
        0.000001: "0.000001",
        1e-7: "1e-7",
        333333333.3333333: "333333333.3333333",
        -1.5: "-1.5",
    }
    for number, text in vectors.items():
        assert canonical_json(number) == text.encode()


def test_canonical_json_rejects_what_it_cannot_represent() -> None:
    for bad in (
        {"amount": Decimal("1.5")},
        {"big": 2**53},
        {"nan": float("nan")},
        {"lone": "\ud800"},
        {1: "int key"},
        {"set": {1, 2}},
    ):
        with pytest.raises(PayloadEncodingError):
            payload_digest(bad)  # type: ignore[arg-type]


def test_payload_digest_is_domain_separated_and_order_independent() -> None:
    assert payload_digest({}) == EMPTY_PAYLOAD_DIGEST
    assert hashlib.sha256(PAYLOAD_TAG + b"{}").digest() == EMPTY_PAYLOAD_DIGEST
    assert canonical_json(-0.0) == b"0"
    first = payload_digest({"a": 1, "b": [True, None, "x"]})
    second = payload_digest({"b": [True, None, "x"], "a": 1})
    assert first == second
    assert first == hashlib.sha256(PAYLOAD_TAG + b'{"a":1,"b":[true,null,"x"]}').digest()
    assert payload_digest({"a": 2, "b": [True, None, "x"]}) != first
    assert payload_digest({"a": "1"}) != payload_digest({"a": 1})


# ---------------------------------------------------------------------------------------------
# The entry layout.

STRINGS = ("transition", "M", "i-1", "A", "B", "Go", "bob", "")


def test_entry_layout_is_the_documented_binary_form() -> None:
    payload, prev = bytes(range(32)), bytes(range(32, 64))
    expected = ENTRY_TAG + struct.pack(">Q", 7) + struct.pack(">q", -5)
    for text in STRINGS:
        data = text.encode()
        expected += len(data).to_bytes(4, "big") + data
    expected += payload + prev
    assert encode_entry(7, -5, STRINGS, payload, prev) == expected
    assert entry_hash(7, -5, STRINGS, payload, prev) == hashlib.sha256(expected).digest()


def test_field_boundaries_are_unambiguous() -> None:
    digest = bytes(32)
    moved = ("transition", "Ma", "chine", "A", "B", "Go", "bob", "")
    unmoved = ("transition", "Mac", "hine", "A", "B", "Go", "bob", "")
    assert entry_hash(0, 0, moved, digest, digest) != entry_hash(0, 0, unmoved, digest, digest)


entry_texts = st.text(max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**63),
    st.integers(-(2**63), 2**63 - 1),
    st.tuples(*[entry_texts] * 7),
    st.binary(min_size=32, max_size=32),
)
def test_sealed_hash_equals_the_reference_encoding(
    seq: int, ts_ms: int, texts: tuple[str, ...], payload: bytes
) -> None:
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    sealer = LedgerSealer(signer, "checkpoint")
    machine, instance, source, target, event, actor, event_id = texts
    strings = ("timer", machine, instance, source, target, event, actor, event_id)
    entry = sealer.seal(seq, GENESIS_HASH, EntryData(ts_ms, *strings, payload))
    assert entry.entry_hash == entry_hash(seq, ts_ms, strings, payload, GENESIS_HASH)
    assert (entry.key_id, entry.signature) == ("", b"")


def test_hash_cache_stays_correct_past_its_limit(signer: Signer) -> None:
    # Thousands of distinct actors overflow the encoding cache; every hash must still match.
    ledger = MemoryLedger(LedgerSealer(signer, "checkpoint"))
    for number in range(6000):
        ledger.append(_data(number)._replace(actor=f"actor-{number}", machine=f"M{number % 7}"))
    for entry in ledger.entries():
        seq, ts_ms, *texts = entry[:10]
        strings = (texts[0], texts[1], texts[2], texts[3], texts[4], texts[5], texts[6], texts[7])
        expected = entry_hash(seq, ts_ms, strings, entry.payload_sha256, entry.prev_hash)
        assert entry.entry_hash == expected


# ---------------------------------------------------------------------------------------------
# Sealing, signing and verification in memory.


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_verifies(signer: Signer, keyring: Keyring, mode: LedgerMode) -> None:
    ledger = _ledger(signer, mode)
    report = ledger.verify(keyring)
    assert report.ok and report.count == 30 and report.index is None
    assert report.checkpoints == (3 if mode == "checkpoint" else 0)
    entries = list(ledger.entries())
    assert [e.seq for e in entries] == list(range(30))
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.entry_hash for a, b in itertools.pairwise(entries))


def test_sign_each_signatures_are_plain_ed25519_over_the_tagged_hash(signer: Signer) -> None:
    entry = _ledger(signer, "sign-each", count=1).entries().__next__()
    assert entry.key_id == signer.key_id
    signer.private_key.public_key().verify(entry.signature, SIG_TAG + entry.entry_hash)


def test_checkpoint_signature_covers_size_head_and_time(signer: Signer) -> None:
    ledger = _ledger(signer, "checkpoint", count=10)
    checkpoint = ledger.checkpoint(T0 + 50)
    message = (
        CHECKPOINT_TAG
        + struct.pack(">Q", 10)
        + ledger.head_hash
        + struct.pack(">q", checkpoint.ts_ms)
    )
    signer.private_key.public_key().verify(checkpoint.signature, message)


def test_empty_ledger_verifies_and_a_size_zero_checkpoint_checks_genesis(
    signer: Signer, keyring: Keyring
) -> None:
    assert verify_entries([], keyring).ok
    sealer = LedgerSealer(signer, "checkpoint")
    genesis = sealer.checkpoint(0, GENESIS_HASH, T0)
    assert verify_entries([], keyring, external_checkpoint=genesis).ok
    wrong = sealer.checkpoint(0, b"\x01" * 32, T0)
    report = verify_entries([], keyring, external_checkpoint=wrong)
    assert (report.ok, report.problem) == (False, "checkpoint_mismatch")


def test_checkpoint_mode_requires_every_entry_to_be_covered(
    signer: Signer, keyring: Keyring
) -> None:
    ledger = _ledger(signer, "checkpoint", count=25)  # checkpoints at 10 and 20 only
    report = ledger.verify(keyring)
    assert (report.ok, report.index, report.problem) == (False, 20, "uncovered")
    assert "20..24" in (report.reason or "")
    ledger.checkpoint(T0 + 99)
    assert ledger.verify(keyring).ok


def test_mode_is_enforced_when_known(signer: Signer, keyring: Keyring) -> None:
    signed = list(_ledger(signer, "sign-each", count=3).entries())
    report = verify_entries(signed, keyring, mode="checkpoint")
    assert (report.index, report.problem) == (0, "unexpected_signature")
    chained = _ledger(signer, "checkpoint", count=10)
    report = verify_entries(
        chained.entries(), keyring, checkpoints=chained.checkpoints(), mode="sign-each"
    )
    assert (report.index, report.problem) == (0, "missing_signature")


def test_sealer_rejects_bad_input(signer: Signer) -> None:
    sealer = LedgerSealer(signer, "sign-each")
    with pytest.raises(ValueError):
        sealer.seal(0, GENESIS_HASH, _data(0)._replace(kind="explosion"))
    with pytest.raises(ValueError):
        sealer.seal(0, b"short", _data(0))
    with pytest.raises(EntryEncodingError):
        sealer.seal(0, GENESIS_HASH, _data(0)._replace(actor="\udc80"))
    with pytest.raises(KeyWindowError):
        sealer.seal(0, GENESIS_HASH, _data(0, ts_ms=T0 - 2 * HOUR))
    with pytest.raises(ValueError):
        LedgerSealer(signer, "sometimes")  # type: ignore[arg-type]


def test_rollback_never_drops_signed_entries(signer: Signer, keyring: Keyring) -> None:
    ledger = _ledger(signer, "checkpoint", count=10)
    head = ledger.head_hash
    ledger.append(_data(10))
    ledger.append(_data(11))
    ledger.rollback(10)
    assert (ledger.size, ledger.head_hash) == (10, head)
    assert ledger.verify(keyring).ok
    with pytest.raises(ValueError):
        ledger.rollback(9)


def test_key_rotation_with_validity_windows(tmp_path: Path) -> None:
    rotation = T0 + 10 * HOUR
    old_info = generate_keypair(tmp_path / "old", valid_from_ms=T0)
    new_info = generate_keypair(tmp_path / "new", valid_from_ms=rotation)
    from autonomic.runtime.keys import retire_key

    retire_key(old_info.public_json_path, rotation)
    old, new = load_signer(tmp_path / "old"), load_signer(tmp_path / "new")
    assert old.valid_until_ms == rotation
    ledger_entries: list[LedgerEntry] = []
    head, times = GENESIS_HASH, [T0 + n * HOUR for n in range(20)]
    for seq, ts_ms in enumerate(times):
        sealer = LedgerSealer(old if ts_ms < rotation else new, "sign-each")
        entry = sealer.seal(seq, head, _data(seq, ts_ms=ts_ms - seq))
        ledger_entries.append(entry)
        head = entry.entry_hash
    both = Keyring.from_files([old_info.public_json_path, new_info.public_json_path])
    assert verify_entries(ledger_entries, both).ok
    only_old = Keyring.from_files([old_info.public_json_path])
    report = verify_entries(ledger_entries, only_old)
    assert (report.index, report.problem) == (10, "unknown_key")
    # The old key signing after its retirement: a key-window failure at exactly that entry.
    late = Signer(old.key_id, old.private_key)  # a signer that ignores the window
    forged = LedgerSealer(late, "sign-each").seal(
        12, ledger_entries[11].entry_hash, _data(12, ts_ms=times[12] - 12)
    )
    tampered = [*ledger_entries[:12], forged, *ledger_entries[13:]]
    report = verify_entries(tampered, both)
    assert (report.index, report.problem) == (12, "key_window")


# ---------------------------------------------------------------------------------------------
# Checkpoint files.


def test_checkpoint_json_round_trip_and_strict_parsing(signer: Signer) -> None:
    checkpoint = _ledger(signer, "checkpoint", count=10).checkpoint(T0)
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint
    doc = json.loads(checkpoint.to_json())
    assert doc["head_hash"] == checkpoint.head_hash.hex()
    assert base64.b64decode(doc["signature"]) == checkpoint.signature
    broken: list[object] = [
        {**doc, "size": -1},
        {**doc, "size": "10"},
        {**doc, "size": True},
        {**doc, "head_hash": doc["head_hash"][:-2]},
        {**doc, "signature": "***"},
        {**doc, "kind": "other"},
        {**doc, "format": "something-else"},
        {**doc, "extra": 1},
        {key: value for key, value in doc.items() if key != "ts_ms"},
        [doc],
    ]
    for bad in broken:
        with pytest.raises(CheckpointFileError):
            Checkpoint.from_json(json.dumps(bad))
    for text in ("", "{", "\xff"):
        with pytest.raises(CheckpointFileError):
            Checkpoint.from_json(text)


# ---------------------------------------------------------------------------------------------
# Stored ledgers: SQLite store files and JSON Lines exports.


@pytest.mark.parametrize("mode", MODES)
def test_sqlite_and_jsonl_round_trips(
    tmp_path: Path, signer: Signer, keyring: Keyring, mode: LedgerMode
) -> None:
    ledger = _ledger(signer, mode)
    database = write_sqlite_ledger(tmp_path / "store.db", ledger)
    before = database.read_bytes()
    with read_ledger(database) as source:
        assert source.kind == "sqlite" and source.mode == mode
        assert list(source.entries()) == list(ledger.entries())
        assert list(source.checkpoints()) == list(ledger.checkpoints())
        report = source.verify(keyring)
        assert report.ok and report.count == 30
        export = tmp_path / "ledger.jsonl"
        with export.open("w", encoding="utf-8") as out:
            assert write_jsonl(source.entries(), source.checkpoints(), out, mode=mode) == 30
    assert database.read_bytes() == before  # reading never writes
    assert not (tmp_path / "store.db-wal").exists()
    with read_ledger(export) as source:
        assert source.kind == "jsonl" and source.mode == mode
        assert list(source.entries()) == list(ledger.entries())
        assert list(source.checkpoints()) == list(ledger.checkpoints())
    assert verify_ledger(export, keyring).ok
    lines = export.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "autonomic-ledger", "version": 1, "mode": mode}
    first = json.loads(lines[1])
    assert list(first) == list(LEDGER_COLUMNS)
    assert first["entry_hash"] == ledger.entries().__next__().entry_hash.hex()


def test_store_head_query(tmp_path: Path, signer: Signer) -> None:
    ledger = _ledger(signer, "checkpoint", count=10)
    with sqlite3.connect(write_sqlite_ledger(tmp_path / "s.db", ledger)) as connection:
        assert connection.execute(SELECT_HEAD_SQL).fetchone() == (9, ledger.head_hash)
    connection.close()


def test_jsonl_malformed_lines_fail_at_their_position(
    tmp_path: Path, signer: Signer, keyring: Keyring
) -> None:
    ledger = _ledger(signer, "sign-each", count=12)
    export = tmp_path / "ledger.jsonl"
    with export.open("w", encoding="utf-8") as out:
        write_jsonl(ledger.entries(), ledger.checkpoints(), out, mode="sign-each")
    lines = export.read_text().splitlines()  # line 0 is the header, entry k is line k + 1
    cases = {
        "not json {": "not valid JSON",
        json.dumps({**json.loads(lines[6]), "seq": "5"}): "seq is str",
        json.dumps({**json.loads(lines[6]), "prev_hash": "00"}): "prev_hash must be 64 hex",
        json.dumps({**json.loads(lines[6]), "signature": "!!"}): "signature must be base64",
        json.dumps({**json.loads(lines[6]), "note": "extra"}): "unexpected ['note']",
        json.dumps([1, 2]): "not a JSON object",
    }
    for replacement, reason in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join([*lines[:6], replacement, *lines[7:]]) + "\n")
        report = verify_ledger(bad, keyring)
        assert (report.ok, report.index, report.problem) == (False, 5, "malformed"), replacement
        assert reason in (report.reason or ""), (reason, report.reason)


def test_reading_unusable_files_fails_cleanly(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01garbage\xff" * 10)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fake_sqlite = tmp_path / "fake.db"
    fake_sqlite.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    other_db = tmp_path / "other.db"
    with sqlite3.connect(other_db) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    other_json = tmp_path / "other.jsonl"
    other_json.write_text('{"format": "something", "version": 1}\n')
    cases: dict[Path, type[Exception]] = {
        tmp_path / "missing.db": LedgerReadError,
        tmp_path: LedgerReadError,
        garbage: LedgerFormatError,
        empty: LedgerFormatError,
        fake_sqlite: LedgerFormatError,
        other_db: LedgerFormatError,
        other_json: LedgerFormatError,
    }
    for path, error in cases.items():
        with pytest.raises(error):
            read_ledger(path)


def test_unknown_mode_in_the_store_is_a_verification_failure(
    tmp_path: Path, signer: Signer, keyring: Keyring
) -> None:
    database = write_sqlite_ledger(tmp_path / "s.db", _ledger(signer, "checkpoint", count=10))
    with sqlite3.connect(database) as connection:
        connection.execute(SET_META_SQL, (META_MODE_KEY, "trust-me"))
    connection.close()
    report = verify_ledger(database, keyring)
    assert (report.ok, report.index, report.problem) == (False, 0, "malformed")


# ---------------------------------------------------------------------------------------------
# Streaming: memory stays flat however long the ledger is.


def _chain(sealer: LedgerSealer, count: int) -> Iterator[LedgerEntry]:
    """A generator of `count` valid chained entries, built as it is consumed."""
    prev = GENESIS_HASH
    states = ("PendingApproval", "Active", "Suspended")
    for seq in range(count):
        data = EntryData(
            T0 + seq,
            "transition",
            "Entitlement",
            f"order-{seq % 1000}",
            states[seq % 3],
            states[(seq + 1) % 3],
            "Approve",
            "alice",
            f"evt-{seq}",
            EMPTY_PAYLOAD_DIGEST,
        )
        entry = sealer.seal(seq, prev, data)
        yield entry
        prev = entry.entry_hash


def test_verification_streams_in_flat_memory(signer: Signer, keyring: Keyring) -> None:
    sealer = LedgerSealer(signer, "checkpoint")
    peaks = {}
    for count in (20_000, 200_000):
        head = GENESIS_HASH
        for entry in _chain(sealer, count):
            head = entry.entry_hash
        final = sealer.checkpoint(count, head, T0)
        tracemalloc.start()
        try:
            entries = _chain(sealer, count)
            report = verify_entries(entries, keyring, checkpoints=[final], mode="checkpoint")
            _, peaks[count] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert report.ok and report.count == count and report.checkpoints == 1
    # Holding the entries would take hundreds of bytes each (over 100 MB for 200,000); the
    # verifier's peak stays small and does not grow with the ledger.
    assert peaks[200_000] < 256 * 1024, peaks
    assert peaks[200_000] < 2 * peaks[20_000] + 64 * 1024, peaks


def test_verifying_an_sqlite_ledger_streams_its_rows(
    tmp_path: Path, signer: Signer, keyring: Keyring
) -> None:
    sealer = LedgerSealer(signer, "checkpoint")
    count = 50_000
    database = tmp_path / "big.db"
    with sqlite3.connect(database) as connection:
        connection.executescript(SCHEMA_SQL)
        connection.executemany(INSERT_ENTRY_SQL, _chain(sealer, count))
        head = connection.execute(SELECT_HEAD_SQL).fetchone()[1]
        checkpoint = sealer.checkpoint(count, head, T0)
        connection.execute(INSERT_CHECKPOINT_SQL, checkpoint.as_row())
        connection.execute(SET_META_SQL, (META_MODE_KEY, "checkpoint"))
    connection.close()
    tracemalloc.start()
    try:
        report = verify_ledger(database, keyring)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.count == count
    assert peak < 512 * 1024, peak  # the rows alone would take well over 20 MB


def test_reading_uses_one_snapshot_while_the_store_keeps_writing(
    tmp_path: Path, signer: Signer, keyring: Keyring
) -> None:
    ledger = _ledger(signer, "checkpoint", count=20)
    database = tmp_path / "live.db"
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(SCHEMA_SQL)
        connection.executemany(INSERT_ENTRY_SQL, ledger.entries())
        connection.executemany(INSERT_CHECKPOINT_SQL, [c.as_row() for c in ledger.checkpoints()])
    with read_ledger(database) as source:
        # The runtime commits another batch after the reader opened the file.
        for number in range(20, 25):
            connection.execute(INSERT_ENTRY_SQL, ledger.append(_data(number)))
        connection.execute(INSERT_CHECKPOINT_SQL, ledger.checkpoint(T0 + 25).as_row())
        connection.commit()
        report = source.verify(keyring)
        assert report.ok and report.count == 20
    connection.close()
    assert verify_ledger(database, keyring).count == 25
