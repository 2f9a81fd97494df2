"""The audit ledger: canonical JSON, entry layout, sealing, checkpoints, rotation, streaming."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import sqlite3
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import replace
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
from autonomic.runtime.event_inputs import _canonical_fields
from autonomic.runtime.keychain import RootOfTrust
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
from autonomic.runtime.merkle import TreeFrontier, tree_root
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
    """The genesis entry and `count` entries (a checkpoint after every `batch` of them)."""
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


def _encoded_or_error(encode: Callable[[dict[str, object]], bytes], value: object) -> object:
    try:
        return encode(value)  # type: ignore[arg-type]
    except PayloadEncodingError as exc:
        return str(exc)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(), min_size=1, max_size=5, unique=True),
    st.lists(json_scalars | st.lists(json_scalars, max_size=2), min_size=5, max_size=5),
    st.lists(st.text(), max_size=2),
)
def test_a_flat_models_canonical_json_is_canonical_json(
    names: list[str], values: list[object], others: list[str]
) -> None:
    # A dispatch encodes a flat model's dump with its keys ordered once (event_inputs.py):
    # the same bytes, or the same error, as canonical_json, for its own keys or any others.
    encode = _canonical_fields(names)
    for keys in (names, [*names[1:], *others], [*names, *others]):
        value = dict(zip(keys, values, strict=False))
        assert _encoded_or_error(encode, value) == _encoded_or_error(canonical_json, value)
    assert encode(dict.fromkeys(reversed(names), "x")) == canonical_json(dict.fromkeys(names, "x"))


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
    assert report.ok and report.count == 31 and report.index is None
    assert report.checkpoints == (3 if mode == "checkpoint" else 0)
    assert (report.mode, report.keys) == (mode, (signer.key_id,))
    entries = list(ledger.entries())
    assert [e.seq for e in entries] == list(range(31))
    assert entries[0].prev_hash == GENESIS_HASH and entries[0].kind == "genesis"
    assert all(b.prev_hash == a.entry_hash for a, b in itertools.pairwise(entries))


def test_sign_each_signatures_are_plain_ed25519_over_the_tagged_hash(signer: Signer) -> None:
    entry = list(_ledger(signer, "sign-each", count=1).entries())[1]
    assert entry.key_id == signer.key_id
    signer.private_key.public_key().verify(entry.signature, SIG_TAG + entry.entry_hash)


def test_checkpoint_signature_covers_size_head_tree_time_and_the_previous_one(
    signer: Signer,
) -> None:
    ledger = _ledger(signer, "checkpoint", count=12)  # a checkpoint at size 11 already
    previous = list(ledger.checkpoints())[-1]
    checkpoint = ledger.checkpoint(T0 + 50)
    root = tree_root(e.entry_hash for e in ledger.entries())
    message = (
        CHECKPOINT_TAG
        + struct.pack(">Q", 13)
        + ledger.head_hash
        + root
        + struct.pack(">q", checkpoint.ts_ms)
        + hashlib.sha256(previous.signed_message()).digest()
    )
    assert checkpoint.tree_root == root and checkpoint.prev_checkpoint == previous.digest()
    signer.private_key.public_key().verify(checkpoint.signature, message)
    frontier = TreeFrontier.from_bytes(13, checkpoint.frontier)
    assert frontier is not None and frontier.root() == root


def test_a_ledger_starts_with_its_genesis_entry(signer: Signer, keyring: Keyring) -> None:
    report = verify_entries([], keyring)
    assert (report.ok, report.index, report.problem) == (False, 0, "genesis")
    ledger = _ledger(signer, "sign-each", count=3)
    entries = list(ledger.entries())
    report = verify_entries(entries[1:], keyring)  # renumbering aside, seq 0 must be genesis
    assert (report.ok, report.index) == (False, 0)
    sealer = LedgerSealer(signer, "sign-each")
    plain = sealer.seal(0, GENESIS_HASH, _data(0))
    report = verify_entries([plain], keyring)
    assert (report.index, report.problem) == (0, "genesis")
    genesis = json.loads(entries[0].event)
    assert genesis["mode"] == "sign-each" and genesis["root_key"]["key_id"] == signer.key_id


def test_checkpoint_mode_requires_every_entry_to_be_covered(
    signer: Signer, keyring: Keyring
) -> None:
    ledger = _ledger(signer, "checkpoint", count=25)  # checkpoints at 11 and 21 only
    report = ledger.verify(keyring)
    assert (report.ok, report.index, report.problem) == (False, 21, "uncovered")
    assert "21..25" in (report.reason or "")
    ledger.checkpoint(T0 + 99)
    assert ledger.verify(keyring).ok


def test_mode_is_enforced_when_known(signer: Signer, keyring: Keyring) -> None:
    # The genesis entry declares the mode; a store declaring another one fails at seq 0.
    signed = list(_ledger(signer, "sign-each", count=3).entries())
    report = verify_entries(signed, keyring, mode="checkpoint")
    assert (report.index, report.problem) == (0, "mode_mismatch")
    chained = _ledger(signer, "checkpoint", count=10)
    report = verify_entries(
        chained.entries(), keyring, checkpoints=chained.checkpoints(), mode="sign-each"
    )
    assert (report.index, report.problem) == (0, "mode_mismatch")
    # Within the chain, the declared mode is enforced entry by entry.
    mixed = MemoryLedger(LedgerSealer(signer, "checkpoint"))
    mixed.sealer = LedgerSealer(signer, "sign-each")
    mixed.append(_data(1))
    report = verify_entries(list(mixed.entries()), keyring)
    assert (report.index, report.problem) == (1, "unexpected_signature")


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
    ledger.rollback(11)
    assert (ledger.size, ledger.head_hash) == (11, head)
    assert ledger.verify(keyring).ok
    with pytest.raises(ValueError):
        ledger.rollback(10)


def test_key_rotation_is_an_entry_signed_by_the_outgoing_key(tmp_path: Path) -> None:
    rotation = T0 + 10 * HOUR
    generate_keypair(tmp_path / "old", valid_from_ms=T0 - HOUR)
    generate_keypair(tmp_path / "new", valid_from_ms=rotation)
    old, new = load_signer(tmp_path / "old"), load_signer(tmp_path / "new")
    ledger = MemoryLedger(LedgerSealer(old, "sign-each"), genesis_ts_ms=T0)
    for number in range(1, 10):
        ledger.append(_data(number, ts_ms=T0 + number * HOUR - number))
    rotated = ledger.rotate(new, rotation)
    for number in range(11, 20):
        ledger.append(_data(number, ts_ms=T0 + number * HOUR - number))
    entries = list(ledger.entries())
    assert rotated.seq == 10 and rotated.key_id == old.key_id and entries[11].key_id == new.key_id
    body = json.loads(rotated.event)
    assert body["retires"] == [old.key_id] and body["new_key"]["key_id"] == new.key_id
    assert body["new_key"]["valid_from_ms"] == rotation
    report = verify_entries(entries, old.public_info())
    assert report.ok and report.keys == (old.key_id, new.key_id), report.reason
    # The same ledger pinned to the new key: its genesis is not the pinned root.
    report = verify_entries(entries, new.public_info())
    assert (report.index, report.problem) == (0, "genesis")
    # The retired key signing after the rotation fails at exactly that entry.
    late = Signer(old.key_id, old.private_key)
    forged = LedgerSealer(late, "sign-each").seal(
        12, entries[11].entry_hash, _data(12, ts_ms=T0 + 12 * HOUR - 12)
    )
    report = verify_entries([*entries[:12], forged, *entries[13:]], old.public_info())
    assert (report.index, report.problem) == (12, "key_retired")
    assert "retired at seq 10" in (report.reason or "")
    # A retirement entry ends a key's signing too; after the last key, nothing verifies.
    ledger.retire([new.key_id], T0 + 20 * HOUR)
    ledger.append(_data(21, ts_ms=T0 + 21 * HOUR - 21))
    report = verify_entries(list(ledger.entries()), old.public_info())
    assert (report.index, report.problem) == (21, "key_retired")


def test_a_verifier_pins_exactly_one_root(signer: Signer, tmp_path: Path) -> None:
    ledger = _ledger(signer, "sign-each", count=2)
    by_fingerprint = hashlib.sha256(signer.public_info().public_key).hexdigest()
    assert verify_entries(ledger.entries(), by_fingerprint).ok
    assert verify_entries(ledger.entries(), RootOfTrust(by_fingerprint)).ok
    generate_keypair(tmp_path / "other", valid_from_ms=T0)
    two = Keyring([signer.public_info(), load_signer(tmp_path / "other").public_info()])
    with pytest.raises(ValueError, match="one pinned root key"):
        verify_entries(ledger.entries(), two)
    with pytest.raises(ValueError, match="64 hex digits"):
        verify_entries(ledger.entries(), signer.key_id)


# ---------------------------------------------------------------------------------------------
# Checkpoint files.


def test_checkpoint_json_round_trip_and_strict_parsing(signer: Signer) -> None:
    checkpoint = _ledger(signer, "checkpoint", count=12).checkpoint(T0)
    # The frontier is stored beside a checkpoint, never exported: the root stands for it.
    assert Checkpoint.from_json(checkpoint.to_json()) == replace(checkpoint, frontier=b"")
    doc = json.loads(checkpoint.to_json())
    assert doc["head_hash"] == checkpoint.head_hash.hex()
    assert base64.b64decode(doc["signature"]) == checkpoint.signature
    broken: list[object] = [
        {**doc, "size": -1},
        {**doc, "size": "10"},
        {**doc, "size": True},
        {**doc, "head_hash": doc["head_hash"][:-2]},
        {**doc, "tree_root": None},
        {**doc, "prev_checkpoint": "00"},
        {**doc, "version": 1},
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
        assert report.ok and report.count == 31
        export = tmp_path / "ledger.jsonl"
        with export.open("w", encoding="utf-8") as out:
            assert write_jsonl(source.entries(), source.checkpoints(), out, mode=mode) == 31
    assert database.read_bytes() == before  # reading never writes
    assert not (tmp_path / "store.db-wal").exists()
    with read_ledger(export) as source:
        assert source.kind == "jsonl" and source.mode == mode
        assert list(source.entries()) == list(ledger.entries())
        exported = [replace(c, frontier=b"") for c in ledger.checkpoints()]
        assert list(source.checkpoints()) == exported
    assert verify_ledger(export, keyring).ok
    lines = export.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "autonomic-ledger", "version": 2, "mode": mode}
    first = json.loads(lines[1])
    assert list(first) == list(LEDGER_COLUMNS)
    assert first["entry_hash"] == ledger.entries().__next__().entry_hash.hex()


def test_store_head_query(tmp_path: Path, signer: Signer) -> None:
    ledger = _ledger(signer, "checkpoint", count=10)
    with sqlite3.connect(write_sqlite_ledger(tmp_path / "s.db", ledger)) as connection:
        assert connection.execute(SELECT_HEAD_SQL).fetchone() == (10, ledger.head_hash)
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
    assert (report.ok, report.index, report.problem) == (False, 0, "mode_mismatch")


# ---------------------------------------------------------------------------------------------
# Streaming: memory stays flat however long the ledger is.


def _chain(sealer: LedgerSealer, count: int) -> Iterator[LedgerEntry]:
    """A generator of `count` valid chained entries (the genesis entry first), built as it is
    consumed."""
    genesis = sealer.genesis(T0)
    yield genesis
    prev = genesis.entry_hash
    states = ("PendingApproval", "Active", "Suspended")
    for seq in range(1, count):
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
    for count in (10_000, 100_000):
        tree = TreeFrontier()
        for entry in _chain(sealer, count):
            tree = tree.extend([entry.entry_hash])
            head = entry.entry_hash
        final = sealer.checkpoint(count, head, T0, tree, None)
        tracemalloc.start()
        try:
            entries = _chain(sealer, count)
            report = verify_entries(entries, keyring, checkpoints=[final], mode="checkpoint")
            _, peaks[count] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert report.ok and report.count == count and report.checkpoints == 1
    # Holding the entries would take hundreds of bytes each (tens of MB for 100,000), even a
    # hash each over 5 MB; the verifier's peak stays small and does not grow with the ledger
    # (ten times the entries).
    assert peaks[100_000] < 256 * 1024, peaks
    assert peaks[100_000] < 2 * peaks[10_000] + 64 * 1024, peaks


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
        hashes = [row[0] for row in connection.execute("SELECT entry_hash FROM ledger")]
        tree = TreeFrontier().extend(hashes)
        checkpoint = sealer.checkpoint(count, head, T0, tree, None)
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
        connection.execute(SET_META_SQL, (META_MODE_KEY, "checkpoint"))
    with read_ledger(database) as source:
        # The runtime commits another batch after the reader opened the file.
        for number in range(20, 25):
            connection.execute(INSERT_ENTRY_SQL, ledger.append(_data(number)))
        connection.execute(INSERT_CHECKPOINT_SQL, ledger.checkpoint(T0 + 25).as_row())
        connection.commit()
        report = source.verify(keyring)
        assert report.ok and report.count == 21
    connection.close()
    assert verify_ledger(database, keyring).count == 26


def test_an_unreadable_checkpoint_row_is_reported_where_it_stands(
    tmp_path: Path, signer: Signer, keyring: Keyring
) -> None:
    """Not one checkpoint early: SQLite's cursor reads a row ahead, and the row's size is
    what places the failure (checkpoints here stand at sizes 51, 101, ..., 2551)."""
    database = write_sqlite_ledger(tmp_path / "s.db", _ledger(signer, "checkpoint", 2600, 50))
    for size in (2551, 51, 1301):
        bad = tmp_path / f"bad-{size}.db"
        bad.write_bytes(database.read_bytes())
        with sqlite3.connect(bad) as connection:
            connection.execute(
                "UPDATE ledger_checkpoints SET key_id = CAST(X'FF' AS TEXT) WHERE size = ?",
                (size,),
            )
        connection.close()
        report = verify_ledger(bad, keyring)
        assert (report.ok, report.index, report.problem) == (False, size - 1, "malformed")
        assert f"(size {size}) cannot be read" in (report.reason or ""), report.reason


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 2.1.1 MTH, straight from its definition."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def test_a_frontier_extended_in_any_batches_has_the_tree_root_of_its_leaves() -> None:
    rng = random.Random(9162)
    for round_ in range(60):
        # Every tenth tree is long enough for batches that `extend` builds level by level.
        longest = 900 if round_ % 10 == 0 else 140
        leaves = [rng.randbytes(32) for _ in range(rng.randrange(0, longest))]
        frontier, start = TreeFrontier(), 0
        while start < len(leaves):
            step = rng.choice([1, 2, 3, 7, 16, 64, 256, 300])
            frontier = frontier.extend(leaves[start : start + step])
            start += step
        assert frontier.size == len(leaves)
        assert frontier.root() == _mth(leaves) == tree_root(leaves)
