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
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple, NoReturn, TypeAlias, cast, get_args

from .errors import (
    CheckpointFileError,
    EntryEncodingError,
    LedgerFormatError,
    LedgerReadError,
    LedgerVerificationError,
    PayloadEncodingError,
)
from .keychain import (
    CONTROL_ACTOR,
    CONTROL_KINDS,
    GENESIS,
    RETIREMENT,
    ROTATION,
    ChainError,
    KeyChain,
    RootOfTrust,
    encode_body,
    genesis_body,
    retirement_body,
    rotation_body,
)
from .keys import Keyring, PublicKeyInfo, Signer
from .merkle import TreeFrontier, extend_frontier

RootLike: TypeAlias = RootOfTrust | PublicKeyInfo | Keyring | str

__all__ = [
    "CHECKPOINT_COLUMNS",
    "CHECKPOINT_TAG",
    "DATA_KINDS",
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
    "RootLike",
    "Span",
    "VerifyReport",
    "canonical_json",
    "encode_entry",
    "entry_hash",
    "entry_to_json",
    "format_timestamp",
    "payload_digest",
    "read_ledger",
    "verify_batches",
    "verify_entries",
    "verify_ledger",
    "write_jsonl",
]

LedgerMode = Literal["sign-each", "checkpoint"]
EntryKind = Literal[
    "transition",
    "timer",
    "escalation",
    "rejection",
    "breaker",
    "flow",
    "genesis",
    "key_rotation",
    "key_retirement",
]
MODES: frozenset[str] = frozenset(get_args(LedgerMode))
KINDS: frozenset[str] = frozenset(get_args(EntryKind))
DATA_KINDS: frozenset[str] = KINDS - CONTROL_KINDS

ENTRY_TAG = b"autonomic/ledger/entry/v1\x00"
SIG_TAG = b"autonomic/ledger/sig/v1\x00"
CHECKPOINT_TAG = b"autonomic/ledger/checkpoint/v2\x00"
PAYLOAD_TAG = b"autonomic/payload/v1\x00"
GENESIS_HASH = bytes(32)

JSONL_FORMAT = "autonomic-ledger"
CHECKPOINT_FORMAT = "autonomic-checkpoint"
FORMAT_VERSION = 2
SQLITE_MAGIC = b"SQLite format 3\x00"
SMALLEST_DATABASE = 512  # the smallest page size: a database with anything in it is larger


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
    signature BLOB NOT NULL,
    tree_root BLOB NOT NULL,
    prev_checkpoint BLOB NOT NULL,
    frontier BLOB NOT NULL
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
CHECKPOINT_COLUMNS: tuple[str, ...] = (
    "size",
    "head_hash",
    "ts_ms",
    "key_id",
    "signature",
    "tree_root",
    "prev_checkpoint",
    "frontier",
)
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
_ENTRY_FETCH = 256  # rows fetched at once by verification (a quarter of a megabyte)
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

    Kinds and machines, and the (from state, to state, event, actor) of a transition, repeat
    from entry to entry, so their length-prefixed encodings are cached per combination
    (bounded: cleared when full), one lookup each. Instance and event ids are mostly fresh
    and are encoded every time, but for the common empty event id.
    """
    cache: dict[tuple[str, ...], bytes] = {}
    cached = cache.get
    pack_seq_ts, pack_length, sha256, join, tag = (
        _pack_seq_ts,
        _pack_length,
        _sha256,
        _join,
        ENTRY_TAG,
    )
    no_event_id = _length_prefixed("")

    def remember(texts: tuple[str, ...]) -> bytes:
        encoded = join([_length_prefixed(text) for text in texts])
        if len(cache) >= cache_limit:
            cache.clear()
        cache[texts] = encoded
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
        instance_bytes = instance.encode()
        head = (kind, machine)
        move = (from_state, to_state, event, actor)
        return sha256(
            join(
                (
                    tag,
                    pack_seq_ts(seq, ts_ms),
                    cached(head) or remember(head),
                    pack_length(len(instance_bytes)),
                    instance_bytes,
                    cached(move) or remember(move),
                    no_event_id if event_id == "" else _length_prefixed(event_id),
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
    (
        "format",
        "version",
        "kind",
        "size",
        "head_hash",
        "tree_root",
        "ts_ms",
        "prev_checkpoint",
        "key_id",
        "signature",
    )
)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement "the ledger had `size` entries and its head hash was `head_hash`".

    kind "checkpoint": signed by `LedgerSealer.checkpoint` over the checkpoint message, which
    also commits to `tree_root` (the RFC 9162 Merkle root over the first `size` entry hashes)
    and to `prev_checkpoint` (the digest of the checkpoint stored before it, zeros for the
    first), so that the stored checkpoints form a chain of their own. `frontier` (stored, not
    signed) holds the perfect-subtree roots of that tree, authenticated by `tree_root`; a writer
    resumes the tree from it.
    kind "entry": taken from a sign-each ledger's last entry, whose own signature (over its
    entry hash, which commits to its seq) serves as the checkpoint signature; it carries no
    tree root and no chaining (both zero).
    """

    size: int
    head_hash: bytes
    ts_ms: int
    key_id: str
    signature: bytes
    tree_root: bytes = GENESIS_HASH
    prev_checkpoint: bytes = GENESIS_HASH
    frontier: bytes = b""
    kind: CheckpointKind = "checkpoint"

    def signed_message(self) -> bytes:
        if self.kind == "entry":
            return SIG_TAG + self.head_hash
        return _join(
            (
                CHECKPOINT_TAG,
                _pack_size(self.size),
                self.head_hash,
                self.tree_root,
                _pack_ts(self.ts_ms),
                self.prev_checkpoint,
            )
        )

    def digest(self) -> bytes:
        """What the next checkpoint records as its `prev_checkpoint`."""
        return _sha256(self.signed_message()).digest()

    def as_row(self) -> tuple[int, bytes, int, str, bytes, bytes, bytes, bytes]:
        """The `ledger_checkpoints` row (CHECKPOINT_COLUMNS order)."""
        if self.kind != "checkpoint":
            raise ValueError("only kind 'checkpoint' checkpoints are stored in a ledger")
        return (
            self.size,
            self.head_hash,
            self.ts_ms,
            self.key_id,
            self.signature,
            self.tree_root,
            self.prev_checkpoint,
            self.frontier,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "size": self.size,
            "head_hash": self.head_hash.hex(),
            "tree_root": self.tree_root.hex(),
            "ts_ms": self.ts_ms,
            "prev_checkpoint": self.prev_checkpoint.hex(),
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
        head, root, prev = (
            _unhex32(doc["head_hash"]),
            _unhex32(doc["tree_root"]),
            _unhex32(doc["prev_checkpoint"]),
        )
        if head is None or root is None or prev is None:
            raise CheckpointFileError(
                "head_hash, tree_root and prev_checkpoint must be 64 hex digits each"
            )
        signature = _unb64(doc["signature"])
        if signature is None:
            raise CheckpointFileError("signature must be base64")
        return cls(
            size,
            head,
            ts_ms,
            key_id,
            signature,
            tree_root=root,
            prev_checkpoint=prev,
            kind=cast(CheckpointKind, kind),
        )

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
    """Seals EntryData into LedgerEntry (hash, and a signature in sign-each mode), seals the
    control entries (genesis, rotation, retirement: always signed) and signs checkpoints. It
    holds no chain state: the caller passes the seq and prev_hash.
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
        kind = data[1]
        if kind not in KINDS or kind in CONTROL_KINDS:
            raise ValueError(f"unknown entry kind {kind!r}; expected one of {sorted(DATA_KINDS)}")
        return self._seal(seq, prev_hash, data, self.mode == "sign-each", self.signer)

    def _seal(
        self, seq: int, prev_hash: bytes, data: EntryData, signed: bool, signer: Signer
    ) -> LedgerEntry:
        (ts_ms, kind, machine, instance, from_state, to_state, event, actor, event_id, payload) = (
            data
        )
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
        if signed:
            signer.require_window(ts_ms)
            key_id, signature = signer.key_id, signer.private_key.sign(SIG_TAG + digest)
        else:
            key_id, signature = "", b""
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

    def seal_control(
        self,
        seq: int,
        prev_hash: bytes,
        ts_ms: int,
        kind: str,
        body: dict[str, Any],
        signer: Signer | None = None,
    ) -> LedgerEntry:
        """A control entry (see runtime/keychain.py), signed by `signer` (default: ours)."""
        if kind not in CONTROL_KINDS:
            raise ValueError(f"{kind!r} is not a control entry kind")
        text = encode_body(body)
        digest = _sha256(PAYLOAD_TAG + text.encode("ascii")).digest()
        data = EntryData(ts_ms, kind, "", "", "", "", text, CONTROL_ACTOR, "", digest)
        return self._seal(seq, prev_hash, data, True, signer or self.signer)

    def genesis(self, ts_ms: int) -> LedgerEntry:
        """Seq 0: the root key (ours) and the mode, signed by the root key."""
        body = genesis_body(self.mode, self.signer.public_info())
        return self.seal_control(0, GENESIS_HASH, ts_ms, GENESIS, body)

    def rotation(
        self, seq: int, prev_hash: bytes, ts_ms: int, new_signer: Signer
    ) -> tuple[LedgerEntry, LedgerSealer]:
        """The rotation entry to `new_signer`, signed by our (outgoing) key, which it retires;
        and the sealer that signs from then on."""
        if new_signer.key_id == self.signer.key_id:
            raise ValueError("a rotation needs a new key")
        body = rotation_body(new_signer.public_info(), [self.signer.key_id])
        entry = self.seal_control(seq, prev_hash, ts_ms, ROTATION, body)
        return entry, LedgerSealer(new_signer, self.mode)

    def checkpoint(
        self,
        size: int,
        head_hash: bytes,
        ts_ms: int,
        tree: TreeFrontier,
        previous: Checkpoint | None,
    ) -> Checkpoint:
        """Sign a checkpoint at `size`, chained to the `previous` stored checkpoint."""
        if size < 0 or len(head_hash) != 32 or tree.size != size:
            raise ValueError("a checkpoint needs its size, a 32-byte head and the tree of size")
        if previous is not None and previous.size >= size:
            raise ValueError("checkpoint sizes must increase")
        self.signer.require_window(ts_ms)
        root, chained = tree.root(), GENESIS_HASH if previous is None else previous.digest()
        frontier = tree.to_bytes()
        unsigned = Checkpoint(size, head_hash, ts_ms, self._key_id, b"", root, chained, frontier)
        # Made again with its signature: dataclasses.replace took several microseconds.
        signature = self._sign(unsigned.signed_message())
        return Checkpoint(size, head_hash, ts_ms, self._key_id, signature, root, chained, frontier)


class MemoryLedger:
    """An in-memory ledger for tests and benchmarks; it starts with its genesis entry.

    `genesis_ts_ms` defaults to the start of the signer's window (or 0).
    """

    __slots__ = ("_checkpoints", "_entries", "_head", "_tree", "sealer")

    def __init__(self, sealer: LedgerSealer, *, genesis_ts_ms: int | None = None) -> None:
        self.sealer = sealer
        self._entries: list[LedgerEntry] = []
        self._checkpoints: list[Checkpoint] = []
        self._tree = TreeFrontier()  # over the entries up to the last checkpoint
        ts = genesis_ts_ms if genesis_ts_ms is not None else sealer.signer.valid_from_ms or 0
        genesis = sealer.genesis(ts)
        self._entries.append(genesis)
        self._head = genesis.entry_hash

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
        entry = self.sealer.seal(len(self._entries), self._head, data)
        self._entries.append(entry)
        self._head = entry.entry_hash
        return entry

    def rotate(self, new_signer: Signer, ts_ms: int) -> LedgerEntry:
        """Append the rotation entry (signed by the current key) and sign with the new key."""
        entry, self.sealer = self.sealer.rotation(len(self._entries), self._head, ts_ms, new_signer)
        self._entries.append(entry)
        self._head = entry.entry_hash
        return entry

    def retire(self, key_ids: list[str], ts_ms: int) -> LedgerEntry:
        """Append a retirement entry signed by the current key."""
        body = retirement_body(key_ids)
        entry = self.sealer.seal_control(len(self._entries), self._head, ts_ms, RETIREMENT, body)
        self._entries.append(entry)
        self._head = entry.entry_hash
        return entry

    def tree(self) -> TreeFrontier:
        return self._tree.extend(e.entry_hash for e in self._entries[self._tree.size :])

    def checkpoint(self, ts_ms: int) -> Checkpoint:
        """Sign the current head (once per commit batch in checkpoint mode)."""
        size = len(self._entries)
        previous = self._checkpoints[-1] if self._checkpoints else None
        if previous is not None and previous.size == size:
            return previous
        self._tree = self.tree()
        checkpoint = self.sealer.checkpoint(size, self._head, ts_ms, self._tree, previous)
        self._checkpoints.append(checkpoint)
        return checkpoint

    def rollback(self, size: int) -> None:
        """Drop entries from `size` on (an aborted batch); never below a signed checkpoint."""
        signed = self._checkpoints[-1].size if self._checkpoints else 1
        if not signed <= size <= len(self._entries):
            raise ValueError(f"cannot roll back to {size}: signed up to {signed}")
        del self._entries[size:]
        self._head = self._entries[-1].entry_hash

    def entries(self) -> Iterator[LedgerEntry]:
        return iter(self._entries)

    def checkpoints(self) -> Iterator[Checkpoint]:
        return iter(self._checkpoints)

    def instance_history(self, instance: str) -> Iterator[LedgerEntry]:
        return (entry for entry in self._entries if entry.instance == instance)

    def verify(
        self, root: RootLike, *, external_checkpoint: Checkpoint | None = None
    ) -> VerifyReport:
        return verify_entries(
            self._entries,
            root,
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
    "key_retired",
    "bad_signature",
    "genesis",
    "rotation",
    "mode_mismatch",
    "checkpoint_order",
    "checkpoint_chain",
    "checkpoint_signature",
    "checkpoint_mismatch",
    "truncated",
    "uncovered",
]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome: `count` entries verified; on failure the first bad seq and why.

    `mode` is the mode the genesis entry declares, `keys` the key ids the chain introduced (the
    root first), `missing` how many entries a newer external checkpoint proves are missing.
    """

    count: int
    ok: bool
    index: int | None
    reason: str | None
    problem: Problem | None = None
    checkpoints: int = 0
    mode: str | None = None
    keys: tuple[str, ...] = ()
    missing: int = 0


@dataclass(slots=True)
class Span:
    """A seq range [start, end) verified on its own, so that a ledger can be verified in ranges
    and the ranges joined (ledger_ranges.py). `end` None: to the ledger's end (set to where it
    ended). `control`: the ledger's control entries by seq, as the join read them; a range
    replays those before its start into its key chain and must hold exactly those within it.

    What the join checks, filled in by verification: the range's first prev_hash and last
    entry hash (the hash chain), the Merkle frontier of its own leaves and (size, signed root,
    root of its own leaves) of each checkpoint (the tree), the prev_checkpoint of its first
    checkpoint and the digest of its last (the checkpoint chain), whether it settled a
    checkpoint and whether entries after its last one are uncovered."""

    start: int = 0
    end: int | None = None
    control: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    first_prev: bytes = GENESIS_HASH
    last_hash: bytes = GENESIS_HASH
    frontier: tuple[bytes, ...] = ()
    roots: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    first_link: bytes | None = None
    last_link: bytes | None = None
    settled: bool = False
    uncovered: bool = False


@dataclass(frozen=True, slots=True)
class MalformedRecord:
    """A stored record that could not be read as an entry or checkpoint (never trusted).

    `size`: for an unreadable checkpoint row whose size could still be read, that size, so the
    failure is reported where the checkpoint stands rather than where reading stopped."""

    reason: str
    size: int | None = None


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
    for name in ("tree_root", "prev_checkpoint"):
        value = getattr(checkpoint, name)
        if type(value) is not bytes or len(value) != 32:
            return f"{name} is not a 32-byte blob"
    if type(checkpoint.frontier) is not bytes:
        return "frontier is not a blob"
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


_CHAIN_PROBLEMS: dict[str, Problem] = {
    "genesis": "genesis",
    "unknown_key": "unknown_key",
    "key_window": "key_window",
    "key_retired": "key_retired",
    "rotation": "rotation",
}


def _chain_failure(error: ChainError, index: int, count: int, prefix: str = "") -> _Failure:
    return _Failure(index, _CHAIN_PROBLEMS[error.problem], prefix + error.reason, count)


def _verify_checkpoint_signature(
    checkpoint: Checkpoint, chain: KeyChain, label: str, index: int, count: int, *, any_key: bool
) -> None:
    """Check a checkpoint's signature by a key of the chain: the key active at its size, or
    (`any_key`, for a checkpoint beyond the ledger's end) any key the chain introduced."""
    where = f"{label} at size {checkpoint.size}"
    if any_key:
        trusted = chain.any_introduced(checkpoint.key_id)
        if trusted is None:
            raise _Failure(
                index,
                "checkpoint_signature",
                f"{where}: signed by key {checkpoint.key_id!r}, which this ledger's chain of "
                "keys does not introduce (its rotation may be among the missing entries)",
                count,
            )
        if not trusted.info.covers(checkpoint.ts_ms):
            raise _Failure(
                index,
                "checkpoint_signature",
                f"{where}: key {checkpoint.key_id} is not valid at {checkpoint.ts_ms} ms",
                count,
            )
    else:
        try:
            trusted = chain.signer(index, checkpoint.key_id, checkpoint.ts_ms, where)
        except ChainError as error:
            raise _Failure(index, "checkpoint_signature", error.reason, count) from None
    if not trusted.verify(checkpoint.signature, checkpoint.signed_message()):
        raise _Failure(index, "checkpoint_signature", f"{where}: bad signature", count)


class _Tree:
    """The verifier's Merkle frontier (merkle.TreeFrontier, mutable for speed). Entry hashes
    wait in `pending` (at most _TREE_BATCH of them, so memory stays flat) and go into the
    tree a batch at a time, a level at a time, when a root is needed or the batch is full."""

    __slots__ = ("deferred", "nodes", "pending", "size")

    def __init__(self) -> None:
        self.nodes: list[bytes] = []
        self.size = 0
        self.pending: list[bytes] = []
        # A range that starts after seq 0 knows only its own subtrees: it records (size, signed
        # root, root of its own leaves) for the join to finish (see Span).
        self.deferred: list[tuple[int, bytes, bytes]] | None = None

    def flush(self) -> None:
        pending = self.pending
        if pending:
            leaves = [_sha256(b"\x00" + entry).digest() for entry in pending]
            self.size = extend_frontier(self.nodes, self.size, leaves)
            pending.clear()

    def root(self) -> bytes:
        self.flush()
        return TreeFrontier(self.size, tuple(self.nodes)).root()


_TREE_BATCH = 1024


class _CheckpointStream:
    """The stored checkpoints, consumed in step with the entries (sizes strictly increasing,
    each chained to the one before it)."""

    __slots__ = (
        "_chain",
        "_iterator",
        "_previous",
        "_tree",
        "first_link",
        "link_known",
        "next_size",
        "pending",
        "unreadable",
        "verified",
    )

    def __init__(
        self,
        checkpoints: Iterable[Checkpoint | MalformedRecord],
        chain: KeyChain,
        tree: _Tree,
        *,
        link_known: bool = True,
    ) -> None:
        self._iterator = iter(checkpoints)
        self._chain = chain
        self._tree = tree
        self._previous: Checkpoint | None = None
        # False in a range that starts after seq 0: the checkpoint before its first one is in
        # an earlier range, so the first link is recorded for the join to check.
        self.link_known = link_known
        self.first_link: bytes | None = None
        self.next_size = -1
        self.verified = 0
        self.pending: Checkpoint | None = None
        self.unreadable: MalformedRecord | None = None  # an unreadable row of known size
        self.advance(0)

    def advance(self, position: int) -> None:
        item = next(self._iterator, None)
        if item is None:
            self.pending = None
            return
        if isinstance(item, MalformedRecord) and item.size is not None and item.size > position:
            # Reported when the entries reach it: an earlier bad entry is reported first.
            self.pending, self.unreadable, self.next_size = None, item, item.size
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
        self.fail_if_unreadable(size)
        settled = False
        while self.pending is not None and self.pending.size == size:
            checkpoint = self.pending
            _check_checkpoint(checkpoint, self._chain, self._tree, size, head, "checkpoint")
            self._check_link(checkpoint, size)
            self._previous = checkpoint
            self.verified += 1
            settled = True
            self.advance(size)
        return settled

    def fail_if_unreadable(self, size: int) -> None:
        """Fail at an unreadable checkpoint row once the entries reach its size (or end)."""
        bad = self.unreadable
        if bad is not None and bad.size is not None and bad.size <= size:
            index = max(bad.size - 1, 0)
            raise _Failure(index, "malformed", f"checkpoint record: {bad.reason}", index)

    def last_digest(self) -> bytes | None:
        return None if self._previous is None else self._previous.digest()

    def _check_link(self, checkpoint: Checkpoint, size: int) -> None:
        if not self.link_known:
            self.first_link, self.link_known = checkpoint.prev_checkpoint, True
            return
        previous = self._previous
        expected = GENESIS_HASH if previous is None else previous.digest()
        if checkpoint.prev_checkpoint == expected:
            return
        if previous is None:
            reason = (
                f"the first stored checkpoint (size {size}) was signed after an earlier "
                "checkpoint that is missing: a checkpoint was removed"
            )
        else:
            reason = (
                f"checkpoint at size {size} was not signed right after the stored checkpoint "
                f"at size {previous.size}: a checkpoint between them was removed"
            )
        raise _Failure(max(size - 1, 0), "checkpoint_chain", reason, size)


def _check_checkpoint(
    checkpoint: Checkpoint, chain: KeyChain, tree: _Tree, size: int, head: bytes, label: str
) -> None:
    """Verify a checkpoint's signature, head hash and tree root against the ledger at `size`."""
    index = max(size - 1, 0)
    _verify_checkpoint_signature(checkpoint, chain, label, index, size, any_key=False)
    _check_head(checkpoint, size, head, label)
    if checkpoint.kind != "checkpoint":
        return
    if tree.deferred is not None:
        tree.deferred.append((size, checkpoint.tree_root, tree.root()))
    elif checkpoint.tree_root != tree.root():
        raise _Failure(
            index,
            "checkpoint_mismatch",
            f"{label} at size {size}: its Merkle tree root does not match the ledger's entries",
            size,
        )


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
    root: RootLike,
    *,
    checkpoints: Iterable[Checkpoint | MalformedRecord] = (),
    external_checkpoint: Checkpoint | None = None,
    mode: LedgerMode | None = None,
    external_label: str = "external checkpoint",
) -> VerifyReport:
    """Verify a ledger in one streaming pass; report the first bad sequence index and why.

    `root` pins the root of trust: the genesis entry's key must be it (a PublicKeyInfo, its
    fingerprint, or a Keyring holding exactly that one key). Every other key must be introduced
    by the chain's own rotation entries. Checkpoints must come in increasing size order (as
    stored); they are consumed in step with the entries, so memory stays flat. `mode`, when
    given (the store's declared mode), must match the mode the genesis entry declares.
    `count` is the number of entries that passed every per-entry check.
    """
    return verify_batches(
        (entries,),
        root,
        checkpoints=checkpoints,
        external_checkpoint=external_checkpoint,
        mode=mode,
        external_label=external_label,
    )


def verify_batches(
    batches: Iterable[Iterable[LedgerEntry | MalformedRecord | tuple[Any, ...]]],
    root: RootLike,
    *,
    checkpoints: Iterable[Checkpoint | MalformedRecord] = (),
    external_checkpoint: Checkpoint | None = None,
    mode: LedgerMode | None = None,
    external_label: str = "external checkpoint",
    span: Span | None = None,
) -> VerifyReport:
    """`verify_entries` over entries that come in batches (rows fetched many at a time), or
    over the range `span` of a ledger (see Span)."""
    chain = KeyChain(RootOfTrust.of(root))
    try:
        return _verify(batches, chain, checkpoints, external_checkpoint, mode, external_label, span)
    except _Failure as failure:
        return VerifyReport(
            failure.count,
            False,
            failure.index,
            failure.reason,
            failure.problem,
            mode=chain.mode,
            keys=tuple(chain.introduced),
        )


def _verify_control(
    chain: KeyChain,
    position: int,
    kind: str,
    entry: tuple[Any, ...],
    computed: bytes,
) -> None:
    """Check a control entry (genesis, rotation, retirement) and apply it to the key chain."""
    ts_ms, machine, instance, from_state, to_state, body = entry[1], *entry[3:8]
    actor, event_id, payload, key_id, signature = entry[8], entry[9], entry[10], *entry[13:15]
    if (machine, instance, from_state, to_state, event_id, actor) != (
        "",
        "",
        "",
        "",
        "",
        CONTROL_ACTOR,
    ) or not isinstance(body, str):
        raise _Failure(position, "malformed", f"a {kind} entry must hold only its body", position)
    if not body.isascii() or payload != _sha256(PAYLOAD_TAG + body.encode()).digest():
        raise _Failure(
            position, "malformed", f"the {kind} entry's payload digest is not its body's", position
        )
    if not key_id or type(key_id) is not str or type(signature) is not bytes or not signature:
        raise _Failure(position, "missing_signature", f"a {kind} entry must be signed", position)
    try:
        if kind == GENESIS:
            trusted = chain.genesis(position, body, key_id)
            if not trusted.info.covers(ts_ms):
                raise ChainError(
                    "key_window",
                    f"root key {key_id} is not valid at {ts_ms} ms "
                    f"(window {trusted.info.window_text()})",
                )
        else:
            trusted = chain.signer(position, key_id, ts_ms, f"{kind} entry")
    except ChainError as error:
        raise _chain_failure(error, position, position) from None
    if not trusted.verify(signature, SIG_TAG + computed):
        raise _Failure(
            position,
            "bad_signature",
            f"bad signature on the {kind} entry by key {key_id}"
            + (" (a rotation must be signed by the outgoing key)" if kind == ROTATION else ""),
            position,
        )
    if kind != GENESIS:
        try:
            chain.apply(position, kind, body)
        except ChainError as error:
            raise _chain_failure(error, position, position) from None


def _replay_control(chain: KeyChain, control: Mapping[int, tuple[Any, ...]], start: int) -> None:
    """Apply the control entries before `start` to `chain`, checking each as the range that
    holds it does (content hash, signature by a key the chain trusts at that point). The
    join then holds each of these ranges to exactly these entries."""
    compute = _entry_hasher()
    for seq in sorted(control):
        if seq >= start:
            break
        entry = control[seq]
        try:
            computed = compute(*entry[:12])
        except (AttributeError, TypeError, UnicodeEncodeError, struct.error, OverflowError):
            raise _Failure(seq, "malformed", "a control entry cannot be encoded", seq) from None
        if computed != entry[12] or entry[0] != seq or entry[2] not in CONTROL_KINDS:
            raise _Failure(seq, "hash_mismatch", "a control entry does not hold together", seq)
        _verify_control(chain, seq, entry[2], entry, computed)
    if chain.mode is None:
        raise _Failure(0, "genesis", "the control entries start with no genesis entry", 0)


def _verify(
    batches: Iterable[Iterable[Any]],
    chain: KeyChain,
    checkpoints: Iterable[Checkpoint | MalformedRecord],
    external: Checkpoint | None,
    declared_mode: LedgerMode | None,
    label: str,
    span: Span | None = None,
) -> VerifyReport:
    if declared_mode is not None and declared_mode not in MODES:
        raise _Failure(0, "malformed", f"unknown ledger mode {declared_mode!r}", 0)
    if external is not None:
        problem = _checkpoint_shape_problem(external)
        if problem is not None:
            raise _Failure(0, "malformed", f"external checkpoint: {problem}", 0)
    tree = _Tree()
    position = 0
    head = GENESIS_HASH
    batches = iter(batches)
    control: Mapping[int, tuple[Any, ...]] | None = None
    if span is not None:
        control = span.control
        if span.start:
            # A range after seq 0: the key chain up to its start comes from the control entries
            # the join was given (checked here, and held to the stored ones by their ranges);
            # the chain link, the checkpoint link and the tree's left part are the join's.
            _replay_control(chain, control, span.start)
            position = span.start
            tree.deferred = span.roots
            first = next(batches, [])
            if not isinstance(first, list):
                first = list(first)
            if first and isinstance(first[0], tuple) and len(first[0]) == len(LEDGER_COLUMNS):
                head = first[0][11]
            span.first_prev = head
            batches = itertools.chain((first,), batches)
    stream = _CheckpointStream(checkpoints, chain, tree, link_known=not position)
    external_size = external.size if external is not None else -1
    kinds, control_kinds, data_kinds, sig_tag = KINDS, CONTROL_KINDS, DATA_KINDS, SIG_TAG
    sign_each = chain.mode == "sign-each"
    checkpoint_mode = chain.mode == "checkpoint"
    uncovered_from = -1  # the first unsigned entry not yet covered by a signed checkpoint
    settled = False
    controls_seen = 0
    append_leaf = tree.pending.append
    # The entry hash, inlined (see _entry_hasher): the (kind, machine) and (from_state,
    # to_state, event, actor) encodings repeat, and are cached per combination, one lookup.
    cache: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
    cached = cache.get
    pack_seq_ts, pack_length, sha256, join, tag = (
        _pack_seq_ts,
        _pack_length,
        _sha256,
        _join,
        ENTRY_TAG,
    )
    tree_mask = _TREE_BATCH - 1  # a power of two: flush when position & mask is 0

    def next_stop(position: int) -> int:
        """The next size at which a stored or the external checkpoint is to be checked."""
        ahead = [size for size in (stream.next_size, external_size) if size > position]
        return min(ahead) if ahead else -1

    if external_size == 0 or stream.next_size == 0:
        raise _Failure(0, "malformed", "a checkpoint at size 0 covers no genesis entry", 0)
    stop = next_stop(position)
    iterator: Iterator[Any] = iter(())
    for batch in batches:
        iterator = iter(batch)
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
                rest = itertools.chain(iterator, itertools.chain.from_iterable(batches))
                problem, reason = _describe_sequence_problem(position, seq, rest)
                raise _Failure(position, problem, reason, position)
            try:
                texts = (kind, machine, from_state, to_state, event, actor)
                head_bytes, move_bytes = cached(texts) or _remember(cache, texts)
                instance_bytes = instance.encode("utf-8")
                event_id_bytes = event_id.encode("utf-8")
                computed = sha256(
                    join(
                        (
                            tag,
                            pack_seq_ts(seq, ts_ms),
                            head_bytes,
                            pack_length(len(instance_bytes)),
                            instance_bytes,
                            move_bytes,
                            pack_length(len(event_id_bytes)),
                            event_id_bytes,
                            payload,
                            prev,
                        )
                    )
                ).digest()
            except (AttributeError, TypeError, UnicodeEncodeError, struct.error, OverflowError):
                reason = _shape_problem(entry) or "the entry cannot be encoded"
                raise _Failure(position, "malformed", reason, position) from None
            if computed != stored or prev != head or len(payload) != 32:
                _fail_link(entry, position, computed, head)
            if checkpoint_mode and kind in data_kinds and key_id == "" and signature == b"":
                # The common entry of a checkpoint-mode ledger: unsigned, covered later.
                if uncovered_from < 0:
                    uncovered_from = position
            else:
                if kind not in kinds:
                    raise _Failure(
                        position, "unknown_kind", f"unknown entry kind {kind!r}", position
                    )
                if position == 0 and kind != GENESIS:
                    raise _Failure(
                        0,
                        "genesis",
                        "seq 0 is not a genesis entry: the ledger declares no root key and no mode",
                        0,
                    )
                if kind in control_kinds:
                    if control is not None:
                        if control.get(position) != entry:
                            raise _Failure(
                                position,
                                "malformed",
                                f"the {kind} entry differs from the one the other ranges used",
                                position,
                            )
                        controls_seen += 1
                    _verify_control(chain, position, kind, entry, computed)
                    if position == 0:
                        sign_each = chain.mode == "sign-each"
                        checkpoint_mode = chain.mode == "checkpoint"
                        if declared_mode is not None and declared_mode != chain.mode:
                            raise _Failure(
                                0,
                                "mode_mismatch",
                                f"the store declares {declared_mode} mode, but the genesis "
                                f"entry declares {chain.mode} mode",
                                0,
                            )
                elif key_id or signature:
                    if checkpoint_mode:
                        raise _Failure(
                            position,
                            "unexpected_signature",
                            "entry carries a key id or signature, but the ledger is in "
                            "checkpoint mode",
                            position,
                        )
                    if type(key_id) is not str or type(signature) is not bytes:
                        reason = _shape_problem(entry) or "key_id or signature has the wrong type"
                        raise _Failure(position, "malformed", reason, position)
                    try:
                        trusted = chain.signer(position, key_id, ts_ms)
                    except ChainError as error:
                        raise _chain_failure(error, position, position) from None
                    if not trusted.verify(signature, sig_tag + computed):
                        raise _Failure(
                            position, "bad_signature", f"bad signature by key {key_id}", position
                        )
                elif key_id != "" or signature != b"":
                    reason = _shape_problem(entry) or "key_id or signature has the wrong type"
                    raise _Failure(position, "malformed", reason, position)
                elif sign_each:
                    raise _Failure(
                        position,
                        "missing_signature",
                        "missing signature (sign-each mode)",
                        position,
                    )
                elif uncovered_from < 0:
                    uncovered_from = position
            head = computed
            append_leaf(computed)
            position += 1
            if not position & tree_mask:
                tree.flush()
            if position == stop:
                covered = stream.settle(position, head)
                if position == external_size and external is not None:
                    _check_checkpoint(external, chain, tree, position, head, label)
                    covered = True
                if covered:
                    uncovered_from = -1
                    settled = True
                stop = next_stop(position)

    if span is not None and span.end is not None and position != span.end:
        reason = f"the range ends at seq {position}, not {span.end}"
        raise _Failure(position, "gap", reason, position)
    if position == 0:
        raise _Failure(0, "genesis", "the ledger is empty: it has no genesis entry", 0)
    if stream.unreadable is not None:
        stream.fail_if_unreadable(stream.next_size)
    if stream.pending is not None:
        # Only a validly signed checkpoint is evidence that entries are missing.
        pending = stream.pending
        _verify_checkpoint_signature(pending, chain, "checkpoint", position, position, any_key=True)
        raise _Failure(
            position,
            "truncated",
            f"truncated: a checkpoint is signed at size {pending.size}, but the ledger ends "
            f"after {position} entries ({_missing(pending.size - position)})",
            position,
        )
    if external is not None and external_size > position:
        _verify_checkpoint_signature(
            external, chain, label, external_size - 1, position, any_key=True
        )
        missing = external_size - position
        return VerifyReport(
            position,
            False,
            position,
            f"truncated: the {label} is signed at size {external_size}, but the "
            f"ledger ends after {position} entries ({_missing(missing)})",
            "truncated",
            stream.verified,
            chain.mode,
            tuple(chain.introduced),
            missing,
        )
    if span is not None:
        if control is not None and controls_seen != sum(
            1 for seq in control if span.start <= seq < position
        ):
            raise _Failure(position, "malformed", "control entries missing from the range", 0)
        tree.flush()
        span.end = position
        span.last_hash = head
        span.frontier = tuple(tree.nodes)
        span.first_link = stream.first_link
        span.last_link = stream.last_digest()
        span.settled = settled
        span.uncovered = uncovered_from >= 0
    elif uncovered_from >= 0:
        raise _Failure(
            uncovered_from,
            "uncovered",
            f"entries {uncovered_from}..{position - 1} are not covered by a signed checkpoint",
            position,
        )
    return VerifyReport(
        position, True, None, None, None, stream.verified, chain.mode, tuple(chain.introduced)
    )


def _remember(
    cache: dict[tuple[Any, ...], tuple[bytes, bytes]], texts: tuple[Any, ...]
) -> tuple[bytes, bytes]:
    """The encodings of (kind, machine) and of (from_state, to_state, event, actor), cached
    (bounded: cleared when full)."""
    encoded = [_length_prefixed(text) for text in texts]
    if len(cache) >= 4096:
        cache.clear()
    cache[texts] = pair = (encoded[0] + encoded[1], _join(encoded[2:]))
    return pair


def _fail_link(entry: tuple[Any, ...], position: int, computed: bytes, head: bytes) -> NoReturn:
    """Why an entry's hash, its link to the one before it, or its payload digest is wrong."""
    prev, stored, key_id, signature = entry[11], entry[12], entry[13], entry[14]
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


def _missing(count: int) -> str:
    return f"{count} entr{'y is' if count == 1 else 'ies are'} missing"


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
    if len(row) != len(CHECKPOINT_COLUMNS):
        return MalformedRecord(f"checkpoint row has {len(row)} columns")
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

    @property
    def connection(self) -> sqlite3.Connection | None:
        """The open read transaction on an SQLite store (None for a JSON Lines export)."""
        return self._connection

    def entries(self) -> Iterator[LedgerEntry | MalformedRecord]:
        if self._connection is not None:
            new, entry_type = _new_entry, LedgerEntry
            return (
                row if isinstance(row, MalformedRecord) else new(entry_type, row)
                for row in sqlite_entry_rows(self._connection)
            )
        return self._jsonl_entries()

    def checkpoints(self) -> Iterator[Checkpoint | MalformedRecord]:
        if self._connection is not None:
            return sqlite_checkpoints(self._connection)
        return self._jsonl_checkpoints()

    def verify(
        self,
        root: RootLike,
        *,
        external_checkpoint: Checkpoint | None = None,
        external_label: str = "external checkpoint",
    ) -> VerifyReport:
        if self.mode_problem is not None:
            return VerifyReport(0, False, 0, self.mode_problem, "mode_mismatch")
        batches: Iterable[Iterable[LedgerEntry | MalformedRecord | tuple[Any, ...]]]
        if self._connection is not None:
            batches = sqlite_entry_batches(self._connection)
        else:
            batches = (self._jsonl_entries(),)
        return verify_batches(
            batches,
            root,
            checkpoints=self.checkpoints(),
            external_checkpoint=external_checkpoint,
            mode=self.mode,
            external_label=external_label,
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
                last.seq + 1, last.entry_hash, last.ts_ms, last.key_id, last.signature, kind="entry"
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
    def _sqlite_last_entry(connection: sqlite3.Connection) -> LedgerEntry | MalformedRecord | None:
        try:
            row = connection.execute(SELECT_ENTRIES_SQL + " DESC LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            return MalformedRecord(f"row cannot be read: {exc}")
        return None if row is None else _new_entry(LedgerEntry, row)

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


def _bounds(column: str, low: str, high: str, values: tuple[int | None, int | None]) -> str:
    """The SQL condition on `column` for the bounds in `values` that are not None."""
    conditions = [
        f"{column} {operator} ?"
        for operator, value in ((low, values[0]), (high, values[1]))
        if value is not None
    ]
    return " AND ".join(conditions) or "1"


def _bound_values(values: tuple[int | None, int | None]) -> tuple[int, ...]:
    return tuple(value for value in values if value is not None)


def sqlite_entry_batches(
    connection: sqlite3.Connection, low: int | None = None, high: int | None = None
) -> Iterator[list[tuple[Any, ...] | MalformedRecord]]:
    """The `ledger` rows with low <= seq < high (None: unbounded) in seq order, as raw rows in
    LEDGER_COLUMNS order, fetched many at a time. After a row that cannot be read, the rows
    come one at a time (see sqlite_entry_rows), ending with a MalformedRecord."""
    where = _bounds("seq", ">=", "<", (low, high))
    sql = f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE {where} ORDER BY seq"
    last_seq: Any = None
    try:
        cursor = connection.execute(sql, _bound_values((low, high)))
        while batch := cursor.fetchmany(_ENTRY_FETCH):
            last_seq = batch[-1][0]
            yield batch
    except sqlite3.Error:
        # Start again one row at a time after the last whole batch: the row that cannot be
        # read is then reported where it stands, as a row-by-row reader reports it.
        for row in sqlite_entry_rows(connection, low, high, after=last_seq):
            yield [row]


def sqlite_entry_rows(
    connection: sqlite3.Connection,
    low: int | None = None,
    high: int | None = None,
    *,
    after: Any = None,
) -> Iterator[tuple[Any, ...] | MalformedRecord]:
    """The rows of sqlite_entry_batches one at a time (`after`: a seq to start after).
    A row the database cannot hand out (not UTF-8, a corrupt record) becomes a MalformedRecord
    where it was expected, not a crash."""
    where = _bounds("seq", ">=", "<", (low, high))
    select = f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE {where}"
    last_seq: Any = after
    try:
        if last_seq is not None:
            rows = connection.execute(
                f"{select} AND seq > ? ORDER BY seq", (*_bound_values((low, high)), last_seq)
            )
        else:
            rows = connection.execute(f"{select} ORDER BY seq", _bound_values((low, high)))
        for row in rows:
            last_seq = row[0]
            yield row
    except sqlite3.Error as exc:
        # Python's cursor reads one row ahead, so an error raised while handing out row k may
        # come from row k + 1: read row k alone (LIMIT 1 never steps past it) to tell which.
        try:
            if last_seq is None:
                row = connection.execute(
                    f"{select} ORDER BY seq LIMIT 1", _bound_values((low, high))
                ).fetchone()
            else:
                row = connection.execute(
                    f"{select} AND seq > ? ORDER BY seq LIMIT 1",
                    (*_bound_values((low, high)), last_seq),
                ).fetchone()
        except sqlite3.Error as again:
            yield MalformedRecord(f"row cannot be read: {again}")
            return
        if row is not None:
            yield row
        yield MalformedRecord(f"row cannot be read: {exc}")


def sqlite_checkpoints(
    connection: sqlite3.Connection, low: int | None = None, high: int | None = None
) -> Iterator[Checkpoint | MalformedRecord]:
    """The `ledger_checkpoints` rows with low < size <= high (None: unbounded), by size."""
    where = _bounds("size", ">", "<=", (low, high))
    select = f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM ledger_checkpoints WHERE {where}"
    bounds = _bound_values((low, high))
    last_size: int | None = None
    try:
        for row in connection.execute(f"{select} ORDER BY size", bounds):
            last_size = row[0]
            yield _checkpoint_from_row(row)
    except sqlite3.Error as exc:
        # As for entries: the cursor reads one row ahead, so the error may belong to the
        # row after the one it was handing out. Read that row alone to tell which, and
        # the unreadable row's size (an integer, readable when its text is not), so the
        # failure is reported where that checkpoint stands.
        error: sqlite3.Error = exc
        after = -1 if last_size is None else last_size
        try:
            row = connection.execute(
                f"{select} AND size > ? ORDER BY size LIMIT 1", (*bounds, after)
            ).fetchone()
        except sqlite3.Error as again:
            error = again
        else:
            if row is not None:
                yield _checkpoint_from_row(row)
                after = row[0]
        try:
            found = connection.execute(
                f"SELECT size FROM ledger_checkpoints WHERE {where} AND size > ? "
                "ORDER BY size LIMIT 1",
                (*bounds, after),
            ).fetchone()
        except sqlite3.Error:
            found = None
        size = found[0] if found is not None and type(found[0]) is int else None
        where_text = "" if size is None else f" (size {size})"
        yield MalformedRecord(f"checkpoint row{where_text} cannot be read: {error}", size)


def _open_sqlite(path: Path) -> LedgerSource | None:
    """The ledger of an SQLite store; None if the file is not an SQLite database."""
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
        if mode is None and mode_problem is None:
            mode_problem = (
                "the store's ledger_meta table holds no mode row, which every store that keeps a "
                "ledger writes with its genesis entry (was it deleted?)"
            )
        connection.execute("SELECT 1 FROM ledger LIMIT 1").fetchall()
    except sqlite3.OperationalError as exc:  # locked, busy, cannot open
        connection.close()
        raise LedgerReadError(f"{path}: cannot read the database: {exc}") from None
    except sqlite3.Error as exc:  # not a database, corrupt
        connection.close()
        if exc.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
            return None  # read_ledger reads it as JSON Lines, or names it
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
    """Open a stored ledger: an SQLite store file (as SQLite reads it) or a JSON Lines export.

    A file that may be a database is read through SQLite before anything else: closing a
    descriptor of our own would drop the POSIX locks that a store of this process holds on
    it (see store/sqlite.py), and the store's next commits could be lost."""
    file = Path(path)
    try:
        info = file.stat()
    except FileNotFoundError:
        raise LedgerReadError(
            f"{file}: no such file", hint="pass the runtime's store file or an export"
        ) from None
    except OSError as exc:
        raise LedgerReadError(f"{file}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise LedgerReadError(f"{file} is a directory, not a ledger file")
    if info.st_size >= SMALLEST_DATABASE:
        source = _open_sqlite(file)
        if source is not None:
            return source
    try:
        with file.open("rb") as handle:
            first_line = handle.readline(1 << 20)
    except OSError as exc:
        raise LedgerReadError(f"{file}: {exc.strerror}") from None
    if first_line.startswith(SQLITE_MAGIC):
        raise LedgerFormatError(f"{file}: not a readable ledger database: file is not a database")
    if not first_line.strip():
        raise LedgerFormatError(
            f"{file} is empty or does not start with a ledger record",
            hint="an export always starts with its header line",
        )
    return _open_jsonl(file, first_line)


def verify_ledger(
    path: str | os.PathLike[str],
    root: RootLike,
    *,
    external_checkpoint: Checkpoint | None = None,
    external_label: str = "external checkpoint",
) -> VerifyReport:
    """Verify a stored ledger file (SQLite store or JSON Lines export) from its pinned root, in
    this process (`ledger_ranges.verify_file` verifies a large SQLite ledger in parallel)."""
    with read_ledger(path) as source:
        return source.verify(
            root, external_checkpoint=external_checkpoint, external_label=external_label
        )


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
