"""The audit ledger: canonical entry encoding, hash chain, signatures, checkpoints, verification.

Entry hash (fixed binary layout, never `json.dumps`):

    sha256( b"autonomic/ledger/entry/v1\\x00"
            || seq (8 bytes BE unsigned) || ts_ms (8 bytes BE signed)
            || for kind, machine, instance, from_state, to_state, event, actor, event_id:
                   length (4 bytes BE) || UTF-8 bytes
            || payload_sha256 (32 bytes) || prev_hash (32 bytes) )

The genesis `prev_hash` is 32 zero bytes. Two modes, both verifiable offline with public keys:

- "sign-each": every entry carries `key_id` and Ed25519 over b"autonomic/ledger/sig/v1\\x00" +
  entry_hash.
- "checkpoint": entries carry no signature (`key_id` "" and `signature` b""); each commit batch
  ends with a signed checkpoint: Ed25519 over b"autonomic/ledger/checkpoint/v1\\x00" +
  size (8 bytes BE) + head_hash + ts_ms (8 bytes BE signed).

A checkpoint exported with `Checkpoint.to_json` and kept elsewhere detects truncation of the
tail. Verification streams (one pass, memory independent of the ledger's length) and names the
first bad sequence index and why. Storage formats read here: the runtime store's SQLite tables
(`SCHEMA_SQL`, written by the store) and a JSON Lines export.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import math
import os
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple, TypeAlias, cast, get_args

from .errors import (
    CheckpointFileError,
    EntryEncodingError,
    LedgerFormatError,
    LedgerReadError,
    LedgerVerificationError,
    PayloadEncodingError,
)
from .keys import Keyring, Signer, TrustedKey

__all__ = [
    "CHECKPOINT_COLUMNS",
    "CHECKPOINT_TAG",
    "EMPTY_PAYLOAD_DIGEST",
    "ENTRY_TAG",
    "GENESIS_HASH",
    "INSERT_CHECKPOINT_SQL",
    "INSERT_ENTRY_SQL",
    "KINDS",
    "LEDGER_COLUMNS",
    "META_MODE_KEY",
    "PAYLOAD_TAG",
    "SCHEMA_SQL",
    "SELECT_CHECKPOINTS_SQL",
    "SELECT_ENTRIES_SQL",
    "SELECT_HEAD_SQL",
    "SET_META_SQL",
    "SIG_TAG",
    "Checkpoint",
    "CheckpointKind",
    "EntryData",
    "EntryKind",
    "LedgerEntry",
    "LedgerMode",
    "LedgerSealer",
    "LedgerSource",
    "MalformedRecord",
    "MemoryLedger",
    "Problem",
    "VerifyReport",
    "canonical_json",
    "encode_entry",
    "entry_hash",
    "entry_to_json",
    "format_timestamp",
    "payload_digest",
    "read_ledger",
    "verify_entries",
    "verify_ledger",
    "write_jsonl",
]

LedgerMode = Literal["sign-each", "checkpoint"]
EntryKind = Literal["transition", "timer", "escalation", "rejection", "breaker", "flow"]
MODES: frozenset[str] = frozenset(get_args(LedgerMode))
KINDS: frozenset[str] = frozenset(get_args(EntryKind))

ENTRY_TAG = b"autonomic/ledger/entry/v1\x00"
SIG_TAG = b"autonomic/ledger/sig/v1\x00"
CHECKPOINT_TAG = b"autonomic/ledger/checkpoint/v1\x00"
PAYLOAD_TAG = b"autonomic/payload/v1\x00"
GENESIS_HASH = bytes(32)

JSONL_FORMAT = "autonomic-ledger"
CHECKPOINT_FORMAT = "autonomic-checkpoint"
FORMAT_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"


# ---------------------------------------------------------------------------------------------
# Storage: the SQLite schema the runtime store writes and `read_ledger` reads.

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload_sha256 BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    entry_hash BLOB NOT NULL,
    key_id TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_checkpoints (
    size INTEGER PRIMARY KEY,
    head_hash BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""


class EntryData(NamedTuple):
    """What the runtime knows about a ledger entry before it is sealed into the chain.

    A NamedTuple rather than a dataclass: it is built once per transition on the hot path, and
    a tuple costs a fifth of a frozen dataclass to build and unpack.
    """

    ts_ms: int
    kind: str
    machine: str
    instance: str
    from_state: str
    to_state: str
    event: str
    actor: str
    event_id: str
    payload_sha256: bytes


class LedgerEntry(NamedTuple):
    """One sealed ledger entry. The field order is the `ledger` table's column order, so an
    entry is also the row the store inserts, and a fetched row converts without copying fields.

    `key_id` is "" and `signature` b"" in checkpoint mode.
    """

    seq: int
    ts_ms: int
    kind: str
    machine: str
    instance: str
    from_state: str
    to_state: str
    event: str
    actor: str
    event_id: str
    payload_sha256: bytes
    prev_hash: bytes
    entry_hash: bytes
    key_id: str
    signature: bytes


LEDGER_COLUMNS: tuple[str, ...] = LedgerEntry._fields
CHECKPOINT_COLUMNS: tuple[str, ...] = ("size", "head_hash", "ts_ms", "key_id", "signature")
META_MODE_KEY = "mode"

INSERT_ENTRY_SQL = (
    f"INSERT INTO ledger ({', '.join(LEDGER_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in LEDGER_COLUMNS)})"
)
INSERT_CHECKPOINT_SQL = (
    f"INSERT INTO ledger_checkpoints ({', '.join(CHECKPOINT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in CHECKPOINT_COLUMNS)})"
)
SELECT_ENTRIES_SQL = f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger ORDER BY seq"
SELECT_CHECKPOINTS_SQL = (
    f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM ledger_checkpoints ORDER BY size"
)
# The store's chain head on open: the next seq is `seq + 1`, the next prev_hash is `entry_hash`.
SELECT_HEAD_SQL = "SELECT seq, entry_hash FROM ledger ORDER BY seq DESC LIMIT 1"
_SELECT_NEXT_ENTRY_SQL = (
    f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE seq > ? ORDER BY seq LIMIT 1"
)
SET_META_SQL = "INSERT OR REPLACE INTO ledger_meta (key, value) VALUES (?, ?)"

_new_entry = cast(Callable[[type[LedgerEntry], tuple[Any, ...]], LedgerEntry], tuple.__new__)


# ---------------------------------------------------------------------------------------------
# Canonical payload JSON (RFC 8785, JCS) and its digest.

_JSON_STRING = json.encoder.encode_basestring  # JCS escaping: \" \\ \b \f \n \r \t, \u00xx
_MAX_SAFE_INT = 2**53 - 1


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _ecma_number(value: float) -> str:
    """ECMAScript Number::toString, which RFC 8785 prescribes for numbers."""
    if math.isnan(value) or math.isinf(value):
        raise PayloadEncodingError(f"{value!r} has no JSON representation")
    if value == 0:
        return "0"
    if value < 0:
        return "-" + _ecma_number(-value)
    # repr gives the shortest digits that round-trip, as ECMAScript requires.
    mantissa, _, exponent_text = repr(value).partition("e")
    whole, _, fraction = mantissa.partition(".")
    fraction = fraction.rstrip("0")
    digits = (whole + fraction).lstrip("0")
    trailing = len(digits) - len(digits.rstrip("0"))
    digits = digits.rstrip("0")
    k = len(digits)
    # value == int(digits) * 10 ** (n - k)
    n = int(exponent_text or "0") - len(fraction) + trailing + k
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    exponent = n - 1
    sign = "+" if exponent >= 0 else "-"
    head = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{head}e{sign}{abs(exponent)}"


def _jcs(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return _JSON_STRING(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return int.__repr__(value)
        raise PayloadEncodingError(
            f"integer {value} is outside the range JSON numbers represent exactly",
            hint="pass large integers as strings",
        )
    if kind is dict or isinstance(value, Mapping):
        if not value:
            return "{}"
        keys = list(value)
        for key in keys:
            if not isinstance(key, str):
                raise PayloadEncodingError(f"object key {key!r} is not a string")
        joined = "".join(keys)
        if joined.isascii() or max(joined) < "\ue000":
            keys.sort()  # below U+E000, code point order is UTF-16 code unit order
        else:
            keys.sort(key=_utf16_key)
        return "{" + ",".join([_JSON_STRING(key) + ":" + _jcs(value[key]) for key in keys]) + "}"
    if kind is list or kind is tuple:
        return "[" + ",".join([_jcs(item) for item in value]) + "]"
    if kind is float:
        return _ecma_number(value)
    # Subclasses (StrEnum, IntEnum, ...) serialize as their base values.
    if isinstance(value, str):
        return _JSON_STRING(value)
    if isinstance(value, int):
        return _jcs(int(value))
    if isinstance(value, float):
        return _ecma_number(float(value))
    if isinstance(value, list | tuple):
        return "[" + ",".join([_jcs(item) for item in value]) + "]"
    raise PayloadEncodingError(
        f"a value of type {kind.__name__} cannot be encoded as canonical JSON",
        hint="convert Decimal and datetime values to strings, as model_dump(mode='json') does",
    )


def canonical_json(value: object) -> bytes:
    """RFC 8785 (JCS) canonical JSON of str, int, float, bool, None, dicts and lists."""
    try:
        return _jcs(value).encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadEncodingError(
            "a string holds a lone surrogate, which is not valid Unicode text"
        ) from None
    except RecursionError:
        raise PayloadEncodingError("the value is nested too deeply") from None


EMPTY_PAYLOAD_DIGEST = hashlib.sha256(PAYLOAD_TAG + b"{}").digest()


def payload_digest(payload: Mapping[str, object]) -> bytes:
    """SHA-256 over the payload domain tag and the payload's canonical JSON."""
    if not payload:
        return EMPTY_PAYLOAD_DIGEST
    if not isinstance(payload, Mapping):
        raise PayloadEncodingError(f"a payload must be a mapping, not {type(payload).__name__}")
    return hashlib.sha256(PAYLOAD_TAG + canonical_json(payload)).digest()


# ---------------------------------------------------------------------------------------------
# Entry encoding and hashing.

_pack_seq_ts = struct.Struct(">Qq").pack
_pack_length = struct.Struct(">I").pack
_pack_size = struct.Struct(">Q").pack
_pack_ts = struct.Struct(">q").pack
_sha256 = hashlib.sha256
_join = b"".join


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    return _pack_length(len(data)) + data


def encode_entry(
    seq: int,
    ts_ms: int,
    strings: tuple[str, str, str, str, str, str, str, str],
    payload_sha256: bytes,
    prev_hash: bytes,
) -> bytes:
    """The canonical bytes of an entry (the reference form; sealing uses a cached fast path).

    `strings` is (kind, machine, instance, from_state, to_state, event, actor, event_id).
    """
    return _join(
        [ENTRY_TAG, _pack_seq_ts(seq, ts_ms)]
        + [_length_prefixed(text) for text in strings]
        + [payload_sha256, prev_hash]
    )


def entry_hash(
    seq: int,
    ts_ms: int,
    strings: tuple[str, str, str, str, str, str, str, str],
    payload_sha256: bytes,
    prev_hash: bytes,
) -> bytes:
    return hashlib.sha256(encode_entry(seq, ts_ms, strings, payload_sha256, prev_hash)).digest()


EntryHasher: TypeAlias = Callable[
    [int, int, str, str, str, str, str, str, str, str, bytes, bytes], bytes
]


def _entry_hasher(cache_limit: int = 4096) -> EntryHasher:
    """A fast entry hasher: the same bytes as `encode_entry`, hashed in about a microsecond.

    Kinds, machines, states, events and actors repeat from entry to entry, so their
    length-prefixed encodings are cached (bounded: cleared when full). Instance and event ids
    are mostly fresh and are encoded every time.
    """
    cache: dict[str, bytes] = {}
    cached = cache.get
    pack_seq_ts, pack_length, sha256, join, tag = (
        _pack_seq_ts,
        _pack_length,
        _sha256,
        _join,
        ENTRY_TAG,
    )

    def remember(text: str) -> bytes:
        encoded = _length_prefixed(text)
        if len(cache) >= cache_limit:
            cache.clear()
        cache[text] = encoded
        return encoded

    def compute(
        seq: int,
        ts_ms: int,
        kind: str,
        machine: str,
        instance: str,
        from_state: str,
        to_state: str,
        event: str,
        actor: str,
        event_id: str,
        payload_sha256: bytes,
        prev_hash: bytes,
    ) -> bytes:
        instance_bytes = instance.encode("utf-8")
        event_id_bytes = event_id.encode("utf-8")
        return sha256(
            join(
                (
                    tag,
                    pack_seq_ts(seq, ts_ms),
                    cached(kind) or remember(kind),
                    cached(machine) or remember(machine),
                    pack_length(len(instance_bytes)),
                    instance_bytes,
                    cached(from_state) or remember(from_state),
                    cached(to_state) or remember(to_state),
                    cached(event) or remember(event),
                    cached(actor) or remember(actor),
                    pack_length(len(event_id_bytes)),
                    event_id_bytes,
                    payload_sha256,
                    prev_hash,
                )
            )
        ).digest()

    return compute


# ---------------------------------------------------------------------------------------------
# Checkpoints.

CheckpointKind = Literal["checkpoint", "entry"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _unhex32(text: object) -> bytes | None:
    if not isinstance(text, str) or len(text) != 64:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


_CHECKPOINT_JSON_KEYS = frozenset(
    ("format", "version", "kind", "size", "head_hash", "ts_ms", "key_id", "signature")
)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement "the ledger had `size` entries and its head hash was `head_hash`".

    kind "checkpoint": signed by `LedgerSealer.checkpoint` over the checkpoint message.
    kind "entry": taken from a sign-each ledger's last entry, whose own signature (over its
    entry hash, which commits to its seq) serves as the checkpoint signature.
    """

    size: int
    head_hash: bytes
    ts_ms: int
    key_id: str
    signature: bytes
    kind: CheckpointKind = "checkpoint"

    def signed_message(self) -> bytes:
        if self.kind == "entry":
            return SIG_TAG + self.head_hash
        return CHECKPOINT_TAG + _pack_size(self.size) + self.head_hash + _pack_ts(self.ts_ms)

    def as_row(self) -> tuple[int, bytes, int, str, bytes]:
        """The `ledger_checkpoints` row (CHECKPOINT_COLUMNS order)."""
        if self.kind != "checkpoint":
            raise ValueError("only kind 'checkpoint' checkpoints are stored in a ledger")
        return (self.size, self.head_hash, self.ts_ms, self.key_id, self.signature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "size": self.size,
            "head_hash": self.head_hash.hex(),
            "ts_ms": self.ts_ms,
            "key_id": self.key_id,
            "signature": _b64(self.signature),
        }

    def to_json(self) -> str:
        """The small JSON document a user keeps elsewhere to detect truncation later."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, doc: object) -> Checkpoint:
        """Parse and check every field; raise CheckpointFileError naming the first bad one."""
        if not isinstance(doc, dict):
            raise CheckpointFileError("a checkpoint must be a JSON object")
        if doc.get("format") != CHECKPOINT_FORMAT or doc.get("version") != FORMAT_VERSION:
            raise CheckpointFileError(
                f"not an {CHECKPOINT_FORMAT} version {FORMAT_VERSION} document",
                hint="export one with `autonomic audit checkpoint LEDGER --out FILE`",
            )
        expected = _CHECKPOINT_JSON_KEYS
        if set(doc) != expected:
            extra = sorted(set(doc) - expected)
            missing = sorted(expected - set(doc))
            raise CheckpointFileError(f"checkpoint fields: missing {missing}, unexpected {extra}")
        kind = doc["kind"]
        if kind not in ("checkpoint", "entry"):
            raise CheckpointFileError(f"kind must be 'checkpoint' or 'entry', not {kind!r}")
        size, ts_ms, key_id = doc["size"], doc["ts_ms"], doc["key_id"]
        if type(size) is not int or size < 0:
            raise CheckpointFileError("size must be a non-negative integer")
        if type(ts_ms) is not int:
            raise CheckpointFileError("ts_ms must be an integer")
        if not isinstance(key_id, str) or not key_id:
            raise CheckpointFileError("key_id must be a non-empty string")
        head = _unhex32(doc["head_hash"])
        if head is None:
            raise CheckpointFileError("head_hash must be 64 hex digits")
        signature = _unb64(doc["signature"])
        if signature is None:
            raise CheckpointFileError("signature must be base64")
        return cls(size, head, ts_ms, key_id, signature, cast(CheckpointKind, kind))

    @classmethod
    def from_json(cls, text: str | bytes) -> Checkpoint:
        try:
            doc = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFileError(f"not JSON: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Checkpoint:
        file = Path(path)
        try:
            with file.open("rb") as handle:
                data = handle.read(1 << 16)
        except IsADirectoryError:
            raise CheckpointFileError(f"{file} is a directory, not a checkpoint file") from None
        except OSError as exc:
            raise CheckpointFileError(f"checkpoint file {file}: {exc.strerror}") from None
        return cls.from_json(data)


# ---------------------------------------------------------------------------------------------
# Sealing.


class LedgerSealer:
    """Seals EntryData into LedgerEntry (hash, and a signature in sign-each mode) and signs
    checkpoints. It holds no chain state: the caller passes the seq and prev_hash.
    """

    __slots__ = ("_hash", "_key_id", "_sign", "mode", "signer")

    def __init__(self, signer: Signer, mode: LedgerMode = "checkpoint") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ledger mode {mode!r}; expected one of {sorted(MODES)}")
        self.mode: LedgerMode = mode
        self.signer = signer
        self._key_id = signer.key_id
        self._sign = signer.private_key.sign
        self._hash = _entry_hasher()

    def seal(self, seq: int, prev_hash: bytes, data: EntryData) -> LedgerEntry:
        (ts_ms, kind, machine, instance, from_state, to_state, event, actor, event_id, payload) = (
            data
        )
        if kind not in KINDS:
            raise ValueError(f"unknown entry kind {kind!r}; expected one of {sorted(KINDS)}")
        if len(payload) != 32 or len(prev_hash) != 32:
            raise ValueError("payload_sha256 and prev_hash must be 32-byte SHA-256 digests")
        try:
            digest = self._hash(
                seq,
                ts_ms,
                kind,
                machine,
                instance,
                from_state,
                to_state,
                event,
                actor,
                event_id,
                payload,
                prev_hash,
            )
        except (UnicodeEncodeError, struct.error, AttributeError, TypeError) as exc:
            raise EntryEncodingError(
                f"ledger entry {seq} cannot be encoded: {exc}",
                hint="entry fields must be valid Unicode text; seq and ts_ms 64-bit integers",
            ) from None
        if self.mode == "checkpoint":
            key_id, signature = "", b""
        else:
            self.signer.require_window(ts_ms)
            key_id, signature = self._key_id, self._sign(SIG_TAG + digest)
        return _new_entry(
            LedgerEntry,
            (
                seq,
                ts_ms,
                kind,
                machine,
                instance,
                from_state,
                to_state,
                event,
                actor,
                event_id,
                payload,
                prev_hash,
                digest,
                key_id,
                signature,
            ),
        )

    def checkpoint(self, size: int, head_hash: bytes, ts_ms: int) -> Checkpoint:
        if size < 0 or len(head_hash) != 32:
            raise ValueError("a checkpoint needs a non-negative size and a 32-byte head hash")
        self.signer.require_window(ts_ms)
        message = Checkpoint(size, head_hash, ts_ms, self._key_id, b"").signed_message()
        return Checkpoint(size, head_hash, ts_ms, self._key_id, self._sign(message))


class MemoryLedger:
    """An in-memory ledger for tests, benchmarks and the runtime's memory store."""

    __slots__ = ("_checkpoints", "_entries", "_head", "_seal", "sealer")

    def __init__(self, sealer: LedgerSealer) -> None:
        self.sealer = sealer
        self._seal = sealer.seal
        self._entries: list[LedgerEntry] = []
        self._checkpoints: list[Checkpoint] = []
        self._head = GENESIS_HASH

    @property
    def mode(self) -> LedgerMode:
        return self.sealer.mode

    @property
    def size(self) -> int:
        return len(self._entries)

    @property
    def head_hash(self) -> bytes:
        return self._head

    def append(self, data: EntryData) -> LedgerEntry:
        entry = self._seal(len(self._entries), self._head, data)
        self._entries.append(entry)
        self._head = entry.entry_hash
        return entry

    def checkpoint(self, ts_ms: int) -> Checkpoint:
        """Sign the current head (once per commit batch in checkpoint mode)."""
        size = len(self._entries)
        if self._checkpoints and self._checkpoints[-1].size == size:
            return self._checkpoints[-1]
        checkpoint = self.sealer.checkpoint(size, self._head, ts_ms)
        self._checkpoints.append(checkpoint)
        return checkpoint

    def rollback(self, size: int) -> None:
        """Drop entries from `size` on (an aborted batch); never below a signed checkpoint."""
        signed = self._checkpoints[-1].size if self._checkpoints else 0
        if not signed <= size <= len(self._entries):
            raise ValueError(f"cannot roll back to {size}: signed up to {signed}")
        del self._entries[size:]
        self._head = self._entries[-1].entry_hash if self._entries else GENESIS_HASH

    def entries(self) -> Iterator[LedgerEntry]:
        return iter(self._entries)

    def checkpoints(self) -> Iterator[Checkpoint]:
        return iter(self._checkpoints)

    def instance_history(self, instance: str) -> Iterator[LedgerEntry]:
        return (entry for entry in self._entries if entry.instance == instance)

    def verify(
        self, keyring: Keyring, *, external_checkpoint: Checkpoint | None = None
    ) -> VerifyReport:
        return verify_entries(
            self._entries,
            keyring,
            checkpoints=self._checkpoints,
            external_checkpoint=external_checkpoint,
            mode=self.mode,
        )


# ---------------------------------------------------------------------------------------------
# Verification.

Problem = Literal[
    "malformed",
    "gap",
    "reorder",
    "duplicate",
    "chain_break",
    "hash_mismatch",
    "unknown_kind",
    "missing_signature",
    "unexpected_signature",
    "unknown_key",
    "key_window",
    "bad_signature",
    "checkpoint_order",
    "checkpoint_signature",
    "checkpoint_mismatch",
    "truncated",
    "uncovered",
]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome: `count` entries verified; on failure the first bad seq and why."""

    count: int
    ok: bool
    index: int | None
    reason: str | None
    problem: Problem | None = None
    checkpoints: int = 0


@dataclass(frozen=True, slots=True)
class MalformedRecord:
    """A stored record that could not be read as an entry or checkpoint (never trusted)."""

    reason: str


class _Failure(Exception):
    """Raised inside verification; becomes the failed VerifyReport."""

    def __init__(self, index: int, problem: Problem, reason: str, count: int) -> None:
        super().__init__(reason)
        self.index = index
        self.problem = problem
        self.reason = reason
        self.count = count


_MAX_I64 = 2**63 - 1
_MIN_I64 = -(2**63)
_STRING_FIELDS = (
    "kind",
    "machine",
    "instance",
    "from_state",
    "to_state",
    "event",
    "actor",
    "event_id",
    "key_id",
)


def _shape_problem(entry: object) -> str | None:
    """Why an entry is structurally invalid (types, lengths), or None."""
    if isinstance(entry, MalformedRecord):
        return entry.reason
    if not isinstance(entry, tuple) or len(entry) != len(LEDGER_COLUMNS):
        return f"not a ledger entry ({type(entry).__name__})"
    fields = dict(zip(LEDGER_COLUMNS, entry, strict=True))
    for name in ("seq", "ts_ms"):
        value = fields[name]
        if type(value) is not int:
            return f"{name} is {type(value).__name__}, expected an integer"
        if not _MIN_I64 <= value <= _MAX_I64 or (name == "seq" and value < 0):
            return f"{name} {value} is out of range"
    for name in _STRING_FIELDS:
        value = fields[name]
        if not isinstance(value, str):
            return f"{name} is {type(value).__name__}, expected text"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{name} is not valid Unicode text"
    for name in ("payload_sha256", "prev_hash", "entry_hash"):
        value = fields[name]
        if type(value) is not bytes:
            return f"{name} is {type(value).__name__}, expected a 32-byte blob"
        if len(value) != 32:
            return f"{name} has {len(value)} bytes, expected 32"
    if type(fields["signature"]) is not bytes:
        return f"signature is {type(fields['signature']).__name__}, expected a blob"
    return None


def _checkpoint_shape_problem(checkpoint: object) -> str | None:
    if isinstance(checkpoint, MalformedRecord):
        return checkpoint.reason
    if not isinstance(checkpoint, Checkpoint):
        return f"not a checkpoint ({type(checkpoint).__name__})"
    if type(checkpoint.size) is not int or not 0 <= checkpoint.size <= _MAX_I64:
        return "size is not a non-negative 64-bit integer"
    if type(checkpoint.ts_ms) is not int or not _MIN_I64 <= checkpoint.ts_ms <= _MAX_I64:
        return "ts_ms is not a 64-bit integer"
    if type(checkpoint.head_hash) is not bytes or len(checkpoint.head_hash) != 32:
        return "head_hash is not a 32-byte blob"
    if type(checkpoint.key_id) is not str:
        return "key_id is not text"
    if type(checkpoint.signature) is not bytes:
        return "signature is not a blob"
    if checkpoint.kind not in ("checkpoint", "entry"):
        return f"unknown checkpoint kind {checkpoint.kind!r}"
    return None


def _describe_sequence_problem(
    position: int, seq: object, rest: Iterator[object]
) -> tuple[Problem, str]:
    if type(seq) is not int:
        return "malformed", f"seq is {type(seq).__name__}, expected an integer"
    assert isinstance(seq, int)
    if seq < 0:
        return "malformed", f"seq {seq} is negative"
    if seq < position:
        return "duplicate", f"seq {seq} appears again where seq {position} was expected"
    # seq is ahead: a gap, unless the expected entry turns up later (reordered). Scanning the
    # rest keeps memory flat; the verdict is a failure either way.
    for later in rest:
        if isinstance(later, tuple) and later and later[0] == position:
            return (
                "reorder",
                f"out of order: seq {seq} comes where seq {position} was expected, "
                f"and seq {position} comes later",
            )
    return "gap", f"seq {position} is missing (the next entry has seq {seq})"


def _verify_checkpoint_signature(
    checkpoint: Checkpoint, keyring: Keyring, label: str, index: int, count: int
) -> None:
    trusted = keyring.get(checkpoint.key_id)
    where = f"{label} at size {checkpoint.size}"
    if trusted is None:
        raise _Failure(
            index,
            "checkpoint_signature",
            f"{where}: signed by unknown key id {checkpoint.key_id!r}",
            count,
        )
    if not trusted.info.covers(checkpoint.ts_ms):
        raise _Failure(
            index,
            "checkpoint_signature",
            f"{where}: key {checkpoint.key_id} is not valid at {checkpoint.ts_ms} ms "
            f"(window {trusted.info.window_text()})",
            count,
        )
    if not trusted.verify(checkpoint.signature, checkpoint.signed_message()):
        raise _Failure(index, "checkpoint_signature", f"{where}: bad signature", count)


class _CheckpointStream:
    """The stored checkpoints, consumed in step with the entries (sizes strictly increasing)."""

    __slots__ = ("_iterator", "_keyring", "next_size", "pending", "verified")

    def __init__(
        self, checkpoints: Iterable[Checkpoint | MalformedRecord], keyring: Keyring
    ) -> None:
        self._iterator = iter(checkpoints)
        self._keyring = keyring
        self.next_size = -1
        self.verified = 0
        self.pending: Checkpoint | None = None
        self.advance(0)

    def advance(self, position: int) -> None:
        item = next(self._iterator, None)
        if item is None:
            self.pending = None
            return
        problem = _checkpoint_shape_problem(item)
        if problem is not None:
            raise _Failure(
                max(position - 1, 0), "malformed", f"checkpoint record: {problem}", position
            )
        assert isinstance(item, Checkpoint)
        if item.size <= self.next_size:
            raise _Failure(
                max(position - 1, 0),
                "checkpoint_order",
                f"checkpoint at size {item.size} follows one at size {self.next_size}: "
                "checkpoint sizes must increase strictly",
                position,
            )
        self.next_size = item.size
        self.pending = item

    def settle(self, size: int, head: bytes) -> bool:
        """Verify every checkpoint signed at `size`; True when there was one."""
        settled = False
        while self.pending is not None and self.pending.size == size:
            _check_checkpoint(self.pending, self._keyring, size, head, "checkpoint")
            self.verified += 1
            settled = True
            self.advance(size)
        return settled


def _check_checkpoint(
    checkpoint: Checkpoint, keyring: Keyring, size: int, head: bytes, label: str
) -> None:
    """Verify a checkpoint's signature and its head hash against the head seen at `size`."""
    _verify_checkpoint_signature(checkpoint, keyring, label, max(size - 1, 0), size)
    _check_head(checkpoint, size, head, label)


def _check_head(checkpoint: Checkpoint, size: int, head: bytes, label: str) -> None:
    if checkpoint.head_hash != head:
        at = f"seq {size - 1}" if size else "the empty ledger"
        raise _Failure(
            max(size - 1, 0),
            "checkpoint_mismatch",
            f"{label} at size {size}: its head hash does not match the hash of {at} "
            "(the ledger was rewritten after the checkpoint was signed)",
            size,
        )


def verify_entries(
    entries: Iterable[LedgerEntry | MalformedRecord],
    keyring: Keyring,
    *,
    checkpoints: Iterable[Checkpoint | MalformedRecord] = (),
    external_checkpoint: Checkpoint | None = None,
    mode: LedgerMode | None = None,
) -> VerifyReport:
    """Verify a ledger in one streaming pass; report the first bad sequence index and why.

    Checkpoints must come in increasing size order (as stored); they are consumed in step with
    the entries, so memory stays flat. With `mode` None each entry either carries a valid
    signature or must be covered by a later signed checkpoint; a given mode is enforced too.
    `count` is the number of entries that passed every per-entry check.
    """
    try:
        return _verify(entries, keyring, checkpoints, external_checkpoint, mode)
    except _Failure as failure:
        return VerifyReport(failure.count, False, failure.index, failure.reason, failure.problem)


def _verify(
    entries: Iterable[LedgerEntry | MalformedRecord],
    keyring: Keyring,
    checkpoints: Iterable[Checkpoint | MalformedRecord],
    external: Checkpoint | None,
    mode: LedgerMode | None,
    start: int = 0,
    start_head: bytes = GENESIS_HASH,
    tail: list[Any] | None = None,
) -> VerifyReport:
    """The single pass. A seq range of a larger ledger starts at `start` on `start_head`
    (the stored hash of entry `start - 1`) and, with `tail` given, leaves the coverage of its
    end for `finish_ranges`: tail receives (computed head, first uncovered entry or -1,
    whether a checkpoint settled)."""
    if mode is not None and mode not in MODES:
        raise _Failure(0, "malformed", f"unknown ledger mode {mode!r}", 0)
    if external is not None:
        problem = _checkpoint_shape_problem(external)
        if problem is not None:
            raise _Failure(0, "malformed", f"external checkpoint: {problem}", 0)
        # Checked first: a forged checkpoint must not pass for evidence of truncation.
        label, index = "external checkpoint", max(external.size - 1, 0)
        _verify_checkpoint_signature(external, keyring, label, index, 0)
    stream = _CheckpointStream(checkpoints, keyring)
    external_size = external.size if external is not None else -1
    compute = _entry_hasher()
    kinds, sig_tag = KINDS, SIG_TAG
    trusted_keys: dict[str, TrustedKey] = {}
    sign_each = mode == "sign-each"
    checkpoint_mode = mode == "checkpoint"
    uncovered_from = -1  # the first unsigned entry not yet covered by a signed checkpoint
    head = start_head
    position = start

    def settle(size: int) -> bool:
        covered = stream.settle(size, head)
        if size == external_size and external is not None:
            _check_head(external, size, head, "external checkpoint")
            covered = True
        return covered

    if settle(start):
        uncovered_from = -1
    iterator: Iterator[Any] = iter(entries)
    for entry in iterator:
        try:
            (
                seq,
                ts_ms,
                kind,
                machine,
                instance,
                from_state,
                to_state,
                event,
                actor,
                event_id,
                payload,
                prev,
                stored,
                key_id,
                signature,
            ) = entry
        except (TypeError, ValueError):
            raise _Failure(
                position, "malformed", _shape_problem(entry) or "not a ledger entry", position
            ) from None
        if seq != position or type(seq) is not int:
            problem, reason = _describe_sequence_problem(position, seq, iterator)
            raise _Failure(position, problem, reason, position)
        try:
            computed = compute(
                seq,
                ts_ms,
                kind,
                machine,
                instance,
                from_state,
                to_state,
                event,
                actor,
                event_id,
                payload,
                prev,
            )
        except (AttributeError, TypeError, UnicodeEncodeError, struct.error, OverflowError):
            reason = _shape_problem(entry) or "the entry cannot be encoded"
            raise _Failure(position, "malformed", reason, position) from None
        if computed != stored or prev != head or len(payload) != 32:
            shape = _shape_problem(entry)
            if shape is not None:
                raise _Failure(position, "malformed", shape, position)
            if prev != head and computed == stored and position and not (key_id or signature):
                # Entry `position` is intact and unsigned, so its prev_hash is the one that was
                # written: the previous entry was altered and rehashed after this one linked it.
                raise _Failure(
                    position - 1,
                    "chain_break",
                    f"seq {position - 1} was altered after it was chained: its hash no longer "
                    f"matches the prev_hash that seq {position} recorded for it",
                    position - 1,
                )
            if prev != head:
                link = f"the hash of seq {position - 1}" if position else "the genesis hash"
                raise _Failure(
                    position,
                    "chain_break",
                    f"prev_hash does not match {link} (chain broken)",
                    position,
                )
            raise _Failure(
                position,
                "hash_mismatch",
                "entry hash mismatch: the stored hash does not match the entry's content",
                position,
            )
        if kind not in kinds:
            raise _Failure(position, "unknown_kind", f"unknown entry kind {kind!r}", position)
        if key_id or signature:
            if checkpoint_mode:
                raise _Failure(
                    position,
                    "unexpected_signature",
                    "entry carries a key id or signature, but the ledger is in checkpoint mode",
                    position,
                )
            if type(key_id) is not str or type(signature) is not bytes:
                reason = _shape_problem(entry) or "key_id or signature has the wrong type"
                raise _Failure(position, "malformed", reason, position)
            trusted = trusted_keys.get(key_id)
            if trusted is None:
                found = keyring.get(key_id)
                if found is None:
                    raise _Failure(
                        position, "unknown_key", f"signed by unknown key id {key_id!r}", position
                    )
                trusted = trusted_keys[key_id] = found
            if not trusted.info.covers(ts_ms):
                raise _Failure(
                    position,
                    "key_window",
                    f"key {key_id} is not valid at {ts_ms} ms "
                    f"(window {trusted.info.window_text()})",
                    position,
                )
            if not trusted.verify(signature, sig_tag + computed):
                raise _Failure(
                    position, "bad_signature", f"bad signature by key {key_id}", position
                )
        elif key_id != "" or signature != b"":
            reason = _shape_problem(entry) or "key_id or signature has the wrong type"
            raise _Failure(position, "malformed", reason, position)
        elif sign_each:
            raise _Failure(
                position, "missing_signature", "missing signature (sign-each mode)", position
            )
        elif uncovered_from < 0:
            uncovered_from = position
        head = computed
        position += 1
        if (position == stream.next_size or position == external_size) and settle(position):
            uncovered_from = -1

    if stream.pending is not None:
        # Only a validly signed checkpoint is evidence that entries are missing.
        _verify_checkpoint_signature(stream.pending, keyring, "checkpoint", position, position)
        raise _Failure(
            position,
            "truncated",
            f"truncated: a checkpoint is signed at size {stream.pending.size}, "
            f"but the ledger ends after {position} entries",
            position,
        )
    if external_size > position:
        raise _Failure(
            position,
            "truncated",
            f"truncated: the external checkpoint is signed at size {external_size}, "
            f"but the ledger ends after {position} entries",
            position,
        )
    if tail is not None:
        tail.extend((head, uncovered_from, stream.verified > 0))
        return VerifyReport(position, True, None, None, None, stream.verified)
    if uncovered_from >= 0:
        raise _Failure(
            uncovered_from,
            "uncovered",
            f"entries {uncovered_from}..{position - 1} are not covered by a signed checkpoint",
            position,
        )
    return VerifyReport(position, True, None, None, None, stream.verified)


# ---------------------------------------------------------------------------------------------
# Reading stored ledgers (SQLite store, JSON Lines export) without trusting them.

_ENTRY_JSON_KEYS = frozenset(LEDGER_COLUMNS)
_CHECKPOINT_LINE_PREFIX = b'{"checkpoint":'


def entry_to_json(entry: LedgerEntry) -> dict[str, Any]:
    """One JSON Lines object: hashes as hex, the signature as base64."""
    doc: dict[str, Any] = entry._asdict()
    doc["payload_sha256"] = entry.payload_sha256.hex()
    doc["prev_hash"] = entry.prev_hash.hex()
    doc["entry_hash"] = entry.entry_hash.hex()
    doc["signature"] = _b64(entry.signature)
    return doc


def _entry_from_json(doc: object) -> LedgerEntry | str:
    """The entry a JSON Lines object describes, or why it describes none."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.keys() != _ENTRY_JSON_KEYS:
        missing = sorted(_ENTRY_JSON_KEYS - doc.keys())
        extra = sorted(doc.keys() - _ENTRY_JSON_KEYS)
        return f"entry fields: missing {missing}, unexpected {extra}"
    values = [doc[name] for name in LEDGER_COLUMNS]
    for index, name in ((10, "payload_sha256"), (11, "prev_hash"), (12, "entry_hash")):
        digest = _unhex32(values[index])
        if digest is None:
            return f"{name} must be 64 hex digits"
        values[index] = digest
    signature = _unb64(values[14])
    if signature is None:
        return "signature must be base64"
    values[14] = signature
    return _new_entry(LedgerEntry, tuple(values))


def _checkpoint_from_row(row: tuple[Any, ...]) -> Checkpoint | MalformedRecord:
    checkpoint = Checkpoint(*row)
    problem = _checkpoint_shape_problem(checkpoint)
    if problem is not None:
        return MalformedRecord(f"checkpoint row (size {row[0]!r}): {problem}")
    return checkpoint


def _unreadable_tail(record: MalformedRecord) -> LedgerVerificationError:
    return LedgerVerificationError(
        f"the ledger's last record cannot be read: {record.reason}",
        hint="run `autonomic audit verify` to find the first bad entry",
    )


class LedgerSource:
    """A stored ledger opened for reading: its mode, and streams of entries and checkpoints."""

    def __init__(
        self,
        path: Path,
        kind: Literal["sqlite", "jsonl"],
        mode: LedgerMode | None,
        mode_problem: str | None,
        connection: sqlite3.Connection | None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.mode = mode
        self.mode_problem = mode_problem
        self._connection = connection

    def __enter__(self) -> LedgerSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def entries(self) -> Iterator[LedgerEntry | MalformedRecord]:
        if self._connection is not None:
            return self._sqlite_entries(self._connection)
        return self._jsonl_entries()

    def checkpoints(self) -> Iterator[Checkpoint | MalformedRecord]:
        if self._connection is not None:
            return self._sqlite_checkpoints(self._connection)
        return self._jsonl_checkpoints()

    def verify(
        self, keyring: Keyring, *, external_checkpoint: Checkpoint | None = None
    ) -> VerifyReport:
        if self.mode_problem is not None:
            return VerifyReport(0, False, 0, self.mode_problem, "malformed")
        return verify_entries(
            self.entries(),
            keyring,
            checkpoints=self.checkpoints(),
            external_checkpoint=external_checkpoint,
            mode=self.mode,
        )

    def last_entry(self) -> LedgerEntry | MalformedRecord | None:
        if self._connection is not None:
            return self._sqlite_last_entry(self._connection)
        last: LedgerEntry | MalformedRecord | None = None
        for last in self._jsonl_entries():  # noqa: B007 - keep only the final item
            pass
        return last

    def latest_signed_checkpoint(self) -> Checkpoint:
        """The newest signed statement about the ledger's head: its last checkpoint, or in
        sign-each mode its last entry (whose signature covers its hash, which covers its seq).
        Not verified here: verify the ledger, or the checkpoint against it, before relying on it.
        """
        last = self.last_entry()
        stored = self.last_checkpoint()
        if isinstance(last, MalformedRecord):
            raise _unreadable_tail(last)
        if isinstance(stored, MalformedRecord):
            raise _unreadable_tail(stored)
        problem = None if last is None else _shape_problem(last)
        if problem is not None:
            raise _unreadable_tail(MalformedRecord(problem))
        if last is not None and last.signature and (stored is None or stored.size <= last.seq):
            return Checkpoint(
                last.seq + 1, last.entry_hash, last.ts_ms, last.key_id, last.signature, "entry"
            )
        if stored is None:
            raise LedgerVerificationError(
                "the ledger holds no signed checkpoint and no signed entry",
                hint="a checkpoint-mode store signs a checkpoint with every commit",
            )
        return stored

    def last_checkpoint(self) -> Checkpoint | MalformedRecord | None:
        if self._connection is not None:
            try:
                sql = SELECT_CHECKPOINTS_SQL + " DESC LIMIT 1"
                row = self._connection.execute(sql).fetchone()
            except sqlite3.Error as exc:
                return MalformedRecord(f"checkpoint row cannot be read: {exc}")
            return None if row is None else _checkpoint_from_row(row)
        last: Checkpoint | MalformedRecord | None = None
        for last in self._jsonl_checkpoints():  # noqa: B007 - keep only the final item
            pass
        return last

    @staticmethod
    def _sqlite_entries(
        connection: sqlite3.Connection, where: str = "", bounds: tuple[int, ...] = ()
    ) -> Iterator[LedgerEntry | MalformedRecord]:
        new, entry_type = _new_entry, LedgerEntry
        last_seq: int | None = None
        select = (
            SELECT_ENTRIES_SQL.replace(" ORDER BY", f" {where} ORDER BY")
            if where
            else (SELECT_ENTRIES_SQL)
        )
        try:
            for row in connection.execute(select, bounds):
                last_seq = row[0]
                yield new(entry_type, row)
        except sqlite3.Error as exc:
            # A row the database cannot hand out (not UTF-8, a corrupt record) is a failure at
            # the position where it was expected, not a crash. Python's cursor reads one row
            # ahead, so an error raised while handing out row k may come from row k + 1: read
            # row k alone (LIMIT 1 never steps past it) to tell which.
            try:
                if last_seq is None:
                    row = connection.execute(SELECT_ENTRIES_SQL + " LIMIT 1").fetchone()
                else:
                    row = connection.execute(_SELECT_NEXT_ENTRY_SQL, (last_seq,)).fetchone()
            except sqlite3.Error as again:
                yield MalformedRecord(f"row cannot be read: {again}")
                return
            if row is not None:
                yield new(entry_type, row)
            yield MalformedRecord(f"row cannot be read: {exc}")

    @staticmethod
    def _sqlite_last_entry(connection: sqlite3.Connection) -> LedgerEntry | MalformedRecord | None:
        try:
            row = connection.execute(SELECT_ENTRIES_SQL + " DESC LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            return MalformedRecord(f"row cannot be read: {exc}")
        return None if row is None else _new_entry(LedgerEntry, row)

    @staticmethod
    def _sqlite_checkpoints(
        connection: sqlite3.Connection, where: str = "", bounds: tuple[int, ...] = ()
    ) -> Iterator[Checkpoint | MalformedRecord]:
        select = (
            SELECT_CHECKPOINTS_SQL.replace(" ORDER BY", f" {where} ORDER BY")
            if where
            else (SELECT_CHECKPOINTS_SQL)
        )
        try:
            for row in connection.execute(select, bounds):
                yield _checkpoint_from_row(row)
        except sqlite3.Error as exc:
            yield MalformedRecord(f"checkpoint row cannot be read: {exc}")

    def _jsonl_lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            with self.path.open("rb") as handle:
                yield from enumerate(handle, start=1)
        except OSError as exc:
            raise LedgerReadError(f"{self.path}: {exc.strerror}") from None

    def _jsonl_entries(self) -> Iterator[LedgerEntry | MalformedRecord]:
        for number, line in self._jsonl_lines():
            if line.startswith(_CHECKPOINT_LINE_PREFIX) or not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                yield MalformedRecord(f"line {number}: not valid JSON")
                continue
            if number == 1 and isinstance(doc, dict) and "format" in doc:
                continue  # the header, checked by read_ledger
            parsed = _entry_from_json(doc)
            if isinstance(parsed, str):
                yield MalformedRecord(f"line {number}: {parsed}")
            else:
                yield parsed

    def _jsonl_checkpoints(self) -> Iterator[Checkpoint | MalformedRecord]:
        for number, line in self._jsonl_lines():
            if not line.startswith(_CHECKPOINT_LINE_PREFIX):
                continue
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict) or doc.keys() != {"checkpoint"}:
                    raise CheckpointFileError("a checkpoint line holds only a 'checkpoint' object")
                yield Checkpoint.from_dict(doc["checkpoint"])
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                yield MalformedRecord(f"line {number}: not valid JSON")
            except CheckpointFileError as exc:
                yield MalformedRecord(f"line {number}: {exc.message}")


def _open_sqlite(path: Path) -> LedgerSource:
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerReadError(f"{path}: cannot open SQLite database: {exc}") from None
    try:
        # One read transaction: the schema, mode, entries and checkpoints all come from the
        # same snapshot, even while the runtime keeps writing.
        connection.execute("BEGIN")
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        missing = {"ledger", "ledger_checkpoints"} - tables
        if missing:
            raise LedgerFormatError(
                f"{path} is an SQLite database without the {', '.join(sorted(missing))} table",
                hint="pass the runtime's store file (or a JSON Lines export of it)",
            )
        mode: LedgerMode | None = None
        mode_problem: str | None = None
        if "ledger_meta" in tables:
            row = connection.execute(
                "SELECT value FROM ledger_meta WHERE key = ?", (META_MODE_KEY,)
            ).fetchone()
            if row is not None:
                if row[0] in MODES:
                    mode = cast(LedgerMode, row[0])
                else:
                    mode_problem = f"ledger_meta holds unknown mode {row[0]!r}"
        connection.execute("SELECT 1 FROM ledger LIMIT 1").fetchall()
    except sqlite3.OperationalError as exc:  # locked, busy, cannot open
        connection.close()
        raise LedgerReadError(f"{path}: cannot read the database: {exc}") from None
    except sqlite3.Error as exc:  # not a database, corrupt
        connection.close()
        raise LedgerFormatError(f"{path}: not a readable ledger database: {exc}") from None
    except LedgerFormatError:
        connection.close()
        raise
    return LedgerSource(path, "sqlite", mode, mode_problem, connection)


def _open_jsonl(path: Path, first_line: bytes) -> LedgerSource:
    not_a_ledger = LedgerFormatError(
        f"{path} is neither an SQLite ledger nor a JSON Lines ledger export",
        hint="pass the runtime's store file or a file written by `autonomic audit export`",
    )
    try:
        doc = json.loads(first_line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise not_a_ledger from None
    if not isinstance(doc, dict):
        raise not_a_ledger
    if "format" not in doc:
        if "seq" in doc or "checkpoint" in doc:
            return LedgerSource(path, "jsonl", None, None, None)  # an export without header
        raise not_a_ledger
    if doc.get("format") != JSONL_FORMAT or doc.get("version") != FORMAT_VERSION:
        raise LedgerFormatError(
            f"{path}: unsupported ledger format {doc.get('format')!r} "
            f"version {doc.get('version')!r}",
            hint=f"this tool reads {JSONL_FORMAT} version {FORMAT_VERSION}",
        )
    mode = doc.get("mode")
    if mode is None or mode in MODES:
        return LedgerSource(path, "jsonl", cast(LedgerMode | None, mode), None, None)
    return LedgerSource(path, "jsonl", None, f"header holds unknown mode {mode!r}", None)


def read_ledger(path: str | os.PathLike[str]) -> LedgerSource:
    """Open a stored ledger: an SQLite store file (by its header) or a JSON Lines export."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            magic = handle.read(len(SQLITE_MAGIC))
            first_line = magic + handle.readline(1 << 20) if magic != SQLITE_MAGIC else b""
    except FileNotFoundError:
        raise LedgerReadError(
            f"{file}: no such file", hint="pass the runtime's store file or an export"
        ) from None
    except IsADirectoryError:
        raise LedgerReadError(f"{file} is a directory, not a ledger file") from None
    except OSError as exc:
        raise LedgerReadError(f"{file}: {exc.strerror}") from None
    if magic == SQLITE_MAGIC:
        return _open_sqlite(file)
    if not first_line.strip():
        raise LedgerFormatError(
            f"{file} is empty or does not start with a ledger record",
            hint="an export always starts with its header line",
        )
    return _open_jsonl(file, first_line)


@dataclass(frozen=True)
class RangeResult:
    """What `verify_range` found in one seq range of a SQLite ledger."""

    first: int
    start_head: bytes
    report: VerifyReport
    head: bytes  # the computed hash of its last entry
    uncovered_from: int  # its first unsigned entry after its last checkpoint, or -1
    settled: bool  # a checkpoint was verified in it


def verify_range(
    connection: sqlite3.Connection,
    keyring: Keyring,
    mode: LedgerMode | None,
    first: int,
    end: int | None,
) -> RangeResult:
    """Verify the entries with seq in [first, end) (from seq 0: every seq below `end`; `end`
    None: to the last) and the checkpoints of sizes in (first, end], starting on the stored
    hash of entry `first - 1`, which the range before verifies."""
    start_head = GENESIS_HASH
    if first > 0:
        row = connection.execute("SELECT entry_hash FROM ledger WHERE seq = ?", (first - 1,))
        stored = row.fetchone()
        start_head = stored[0] if stored is not None and isinstance(stored[0], bytes) else b""
    seqs, sizes, bounds = [], [], []
    if first > 0:
        seqs.append("seq >= ?")
        sizes.append("size > ?")
        bounds.append(first)
    if end is not None:
        seqs.append("seq < ?")
        sizes.append("size <= ?")
        bounds.append(end)
    entries = LedgerSource._sqlite_entries(
        connection, "WHERE " + " AND ".join(seqs) if seqs else "", tuple(bounds)
    )
    checkpoints = LedgerSource._sqlite_checkpoints(
        connection, "WHERE " + " AND ".join(sizes) if sizes else "", tuple(bounds)
    )
    tail: list[Any] = []
    try:
        report = _verify(entries, keyring, checkpoints, None, mode, first, start_head, tail)
    except _Failure as failure:
        report = VerifyReport(failure.count, False, failure.index, failure.reason, failure.problem)
        return RangeResult(first, start_head, report, b"", -1, False)
    head, uncovered_from, settled = tail
    return RangeResult(first, start_head, report, head, uncovered_from, settled)


def finish_ranges(results: Sequence[RangeResult]) -> VerifyReport | None:
    """Join ranges verified apart: the report of the whole ledger when every range passed and
    they join (each starts where the one before ended, on the hash it computed, and the tail
    is covered by a signed checkpoint); None when the caller must verify in one pass to name
    the first failure exactly as that pass does."""
    ordered = sorted(results, key=lambda r: r.first)
    for before, after in itertools.pairwise(ordered):
        if not before.report.ok or before.report.count != after.first:
            return None
        if before.head != after.start_head:
            return None
    if not ordered[-1].report.ok:
        return None
    uncovered = -1
    for result in reversed(ordered):
        if result.uncovered_from >= 0:
            uncovered = result.uncovered_from
        if result.settled:
            break
    if uncovered >= 0:
        return None
    checkpoints = sum(r.report.checkpoints for r in ordered)
    return VerifyReport(ordered[-1].report.count, True, None, None, None, checkpoints)


def verify_ledger(
    path: str | os.PathLike[str],
    keyring: Keyring,
    *,
    external_checkpoint: Checkpoint | None = None,
) -> VerifyReport:
    """Verify a stored ledger file (SQLite store or JSON Lines export)."""
    with read_ledger(path) as source:
        return source.verify(keyring, external_checkpoint=external_checkpoint)


def write_jsonl(
    entries: Iterable[LedgerEntry | MalformedRecord],
    checkpoints: Iterable[Checkpoint | MalformedRecord],
    out: IO[str],
    *,
    mode: LedgerMode | None,
) -> int:
    """Write the JSON Lines export: a header, then entries, each checkpoint after the entry
    that completes its size. Returns the number of entries; raises on a malformed record."""
    header = {"format": JSONL_FORMAT, "version": FORMAT_VERSION, "mode": mode}
    out.write(json.dumps(header, separators=(",", ":")) + "\n")
    pending = iter(checkpoints)

    def next_checkpoint() -> Checkpoint | None:
        item = next(pending, None)
        if isinstance(item, MalformedRecord):
            raise LedgerVerificationError(f"cannot export a checkpoint: {item.reason}")
        return item

    def write_checkpoint(checkpoint: Checkpoint) -> None:
        doc = {"checkpoint": checkpoint.to_dict()}
        out.write(json.dumps(doc, separators=(",", ":")) + "\n")

    checkpoint = next_checkpoint()
    count = 0
    while checkpoint is not None and checkpoint.size == 0:
        write_checkpoint(checkpoint)
        checkpoint = next_checkpoint()
    for entry in entries:
        if isinstance(entry, MalformedRecord):
            raise LedgerVerificationError(f"seq {count}: {entry.reason}")
        shape = _shape_problem(entry)
        if shape is not None:
            raise LedgerVerificationError(f"seq {count}: {shape}")
        out.write(json.dumps(entry_to_json(entry), separators=(",", ":")) + "\n")
        count += 1
        while checkpoint is not None and checkpoint.size <= count:
            write_checkpoint(checkpoint)
            checkpoint = next_checkpoint()
    while checkpoint is not None:
        write_checkpoint(checkpoint)
        checkpoint = next_checkpoint()
    return count


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_timestamp(ts_ms: int) -> str:
    """ISO 8601 UTC with milliseconds, or the raw value when it is no representable time."""
    try:
        moment = _EPOCH + timedelta(milliseconds=ts_ms)
    except (OverflowError, TypeError):  # stored values are never trusted to be sane
        return f"{ts_ms!r}ms"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
