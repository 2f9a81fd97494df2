"""The audit ledger: canonical entry encoding, hash chain, signatures, checkpoints, sealing.

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

A move that keeps instance data (a row's `keep`, runtime/instance_data.py) is followed, in the
same transaction, by a "kept" entry of the same instance: `payload_sha256` is `kept_digest` of
the instance's data as stored after the move (b"autonomic/kept/v1\\x00" + the stored JSON
text), from_state and to_state the state it is in, event the causing event. A kept entry is
signed in either mode (as control entries are), so that the runtime can check the data it routes
by against one entry, without walking to a checkpoint; the newest kept entry of an instance is
the commitment its stored data must match (`autonomic audit verify` checks every instance).
Other entries are unchanged by it, and a ledger without kept entries verifies as before.

A checkpoint exported with `Checkpoint.to_json` and kept elsewhere detects truncation of the
tail. Verification (`verify.py`) streams (one pass, memory independent of the ledger's length)
and names the first bad sequence index and why; `ledger_io.py` reads the stored formats (the
runtime store's SQLite tables, `SCHEMA_SQL`, and a JSON Lines export) and `ledger_ranges.py`
verifies a large SQLite ledger in parallel. Their public names are importable from here too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias, cast, get_args

from autonomic.lazy import load_attribute

from .errors import (
    CheckpointFileError,
    EntryEncodingError,
    PayloadEncodingError,
)
from .keychain import (
    CONTROL_ACTOR,
    CONTROL_KINDS,
    GENESIS,
    ROTATION,
    RootOfTrust,
    encode_body,
    genesis_body,
    rotation_body,
)
from .keys import Keyring, PublicKeyInfo, Signer
from .merkle import TreeFrontier

if TYPE_CHECKING:
    from .ledger_io import (
        LedgerSource,
        entry_to_json,
        format_timestamp,
        read_ledger,
        write_jsonl,
    )
    from .ledger_ranges import verify_ledger
    from .memory_ledger import MemoryLedger
    from .verify import (
        MalformedRecord,
        Problem,
        Span,
        VerifyReport,
        verify_batches,
        verify_entries,
    )

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
    "KEPT",
    "KEPT_TAG",
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
    "kept_digest",
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
    "kept",
    "genesis",
    "key_rotation",
    "key_retirement",
]
KEPT = "kept"  # the entry kind that commits to an instance's kept data (module docstring)
MODES: frozenset[str] = frozenset(get_args(LedgerMode))
KINDS: frozenset[str] = frozenset(get_args(EntryKind))
DATA_KINDS: frozenset[str] = KINDS - CONTROL_KINDS
# What `LedgerSealer.seal` seals: control and kept entries have methods of their own.
_SEALED_KINDS: frozenset[str] = DATA_KINDS - {KEPT}
_FAR = 1 << 63  # beyond any 64-bit ts_ms: an open end of a key's window

ENTRY_TAG = b"autonomic/ledger/entry/v1\x00"
SIG_TAG = b"autonomic/ledger/sig/v1\x00"
CHECKPOINT_TAG = b"autonomic/ledger/checkpoint/v2\x00"
PAYLOAD_TAG = b"autonomic/payload/v1\x00"
KEPT_TAG = b"autonomic/kept/v1\x00"
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
    if kind is dict:
        return _jcs_object(value)
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
    if isinstance(value, Mapping):
        return _jcs_object(value)
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


def _sort_keys(keys: list[str], joined: str) -> None:
    """Sort an object's `keys` (`joined`: their text run together) in JCS order, by UTF-16
    code units: below U+E000 that is code point order, Python's own."""
    if joined.isascii() or max(joined) < "\ue000":
        keys.sort()
    else:
        keys.sort(key=_utf16_key)


def _jcs_object(value: Mapping[Any, Any]) -> str:
    if not value:
        return "{}"
    keys = list(value)
    try:
        joined = "".join(keys)  # a key that is not a string fails it
    except TypeError:
        for key in keys:
            if not isinstance(key, str):
                raise PayloadEncodingError(f"object key {key!r} is not a string") from None
        raise
    _sort_keys(keys, joined)
    # Written out rather than a comprehension, and a string member encoded here: objects are
    # mostly small and their members mostly strings (a payload's, a flow entry's detail).
    members = []
    for key in keys:
        item = value[key]
        text = _JSON_STRING(item) if type(item) is str else _jcs(item)
        members.append(_JSON_STRING(key) + ":" + text)
    return "{" + ",".join(members) + "}"


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


def kept_digest(text: str) -> bytes:
    """What a "kept" entry commits to: SHA-256 over its tag and the data's stored JSON text."""
    return hashlib.sha256(KEPT_TAG + text.encode("utf-8")).digest()


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
    and are encoded every time, in place (an empty event id too: its four zero bytes).
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
        event_id_bytes = event_id.encode()
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


def _checkpoint_message(
    size: int, head_hash: bytes, tree_root: bytes, ts_ms: int, prev_checkpoint: bytes
) -> bytes:
    """What a checkpoint of kind "checkpoint" signs (see Checkpoint)."""
    return _join(
        (CHECKPOINT_TAG, _pack_size(size), head_hash, tree_root, _pack_ts(ts_ms), prev_checkpoint)
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
        return _checkpoint_message(
            self.size, self.head_hash, self.tree_root, self.ts_ms, self.prev_checkpoint
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
        except (ValueError, RecursionError) as exc:
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


# A stored checkpoint's slots (CHECKPOINT_COLUMNS order), and its kind's, set directly.
_CHECKPOINT_SETTERS = tuple(getattr(Checkpoint, name).__set__ for name in CHECKPOINT_COLUMNS)
_set_checkpoint_kind = getattr(Checkpoint, "kind").__set__  # noqa: B009


def _signed_checkpoint(
    size: int,
    head_hash: bytes,
    ts_ms: int,
    key_id: str,
    signature: bytes,
    tree_root: bytes,
    prev_checkpoint: bytes,
    frontier: bytes,
) -> Checkpoint:
    """Checkpoint(size, ..., frontier) of kind "checkpoint", its slots set directly: a runtime
    signs one at every commit, and the dataclass __init__ (nine object.__setattr__ calls)
    costs twice as much."""
    checkpoint = object.__new__(Checkpoint)
    set0, set1, set2, set3, set4, set5, set6, set7 = _CHECKPOINT_SETTERS
    set0(checkpoint, size)
    set1(checkpoint, head_hash)
    set2(checkpoint, ts_ms)
    set3(checkpoint, key_id)
    set4(checkpoint, signature)
    set5(checkpoint, tree_root)
    set6(checkpoint, prev_checkpoint)
    set7(checkpoint, frontier)
    _set_checkpoint_kind(checkpoint, "checkpoint")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Sealing.


class LedgerSealer:
    """Seals EntryData into LedgerEntry (hash, and a signature in sign-each mode), seals the
    control entries (genesis, rotation, retirement: always signed) and signs checkpoints. It
    holds no chain state: the caller passes the seq and prev_hash.
    """

    __slots__ = ("_each", "_from", "_hash", "_key_id", "_sign", "_until", "mode", "signer")

    def __init__(self, signer: Signer, mode: LedgerMode = "checkpoint") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ledger mode {mode!r}; expected one of {sorted(MODES)}")
        self.mode: LedgerMode = mode
        self.signer = signer
        self._key_id = signer.key_id
        self._sign = signer.sign
        self._hash = _entry_hasher()
        self._each = mode == "sign-each"
        # The signer's window as ts_ms bounds (it is frozen): one comparison per signed entry,
        # and `require_window` for its error outside it.
        self._from = -_FAR if signer.valid_from_ms is None else signer.valid_from_ms
        self._until = _FAR if signer.valid_until_ms is None else signer.valid_until_ms

    def seal(self, seq: int, prev_hash: bytes, data: EntryData) -> LedgerEntry:
        kind = data[1]
        if kind not in _SEALED_KINDS:
            expected = sorted(_SEALED_KINDS)
            raise ValueError(f"unknown entry kind {kind!r}; expected one of {expected}")
        return self._seal(seq, prev_hash, data, self._each, self.signer)

    def seal_kept(self, seq: int, prev_hash: bytes, data: EntryData) -> LedgerEntry:
        """A "kept" entry: signed in either mode (see the module docstring)."""
        if data[1] != KEPT:
            raise ValueError(f"a kept entry has kind {KEPT!r}, not {data[1]!r}")
        return self._seal(seq, prev_hash, data, True, self.signer)

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
            if signer is not self.signer or not self._from <= ts_ms < self._until:
                signer.require_window(ts_ms)  # fails closed outside the window
            key_id, signature = signer.key_id, signer.sign(SIG_TAG + digest)
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
        return self._checkpoint(size, head_hash, ts_ms, tree, previous, None)[0]

    def chained_checkpoint(
        self,
        size: int,
        head_hash: bytes,
        ts_ms: int,
        tree: TreeFrontier,
        previous: Checkpoint | None,
        chained: bytes | None = None,
    ) -> tuple[Checkpoint, bytes]:
        """`checkpoint`, and the digest of the checkpoint signed (what the next one chains to).
        `chained`: `previous.digest()`, if the caller kept it from signing `previous` (a
        runtime signing at every commit does): its message is not built and hashed again."""
        checkpoint, message = self._checkpoint(size, head_hash, ts_ms, tree, previous, chained)
        return checkpoint, _sha256(message).digest()

    def _checkpoint(
        self,
        size: int,
        head_hash: bytes,
        ts_ms: int,
        tree: TreeFrontier,
        previous: Checkpoint | None,
        chained: bytes | None,
    ) -> tuple[Checkpoint, bytes]:
        """The checkpoint, and the message it signs."""
        if size < 0 or len(head_hash) != 32 or tree.size != size:
            raise ValueError("a checkpoint needs its size, a 32-byte head and the tree of size")
        if previous is not None and previous.size >= size:
            raise ValueError("checkpoint sizes must increase")
        if not self._from <= ts_ms < self._until:
            self.signer.require_window(ts_ms)  # fails closed outside the window
        root = tree.root()
        if chained is None:
            chained = GENESIS_HASH if previous is None else previous.digest()
        message = _checkpoint_message(size, head_hash, root, ts_ms, chained)
        signature = self._sign(message)
        checkpoint = _signed_checkpoint(
            size, head_hash, ts_ms, self._key_id, signature, root, chained, tree.to_bytes()
        )
        return checkpoint, message


# Verification (verify.py), stored ledgers (ledger_io.py) and the in-memory ledger
# (memory_ledger.py) live in modules of their own, which import this one; their public names
# stay importable from here, loaded on first use.
_HOMES = {
    "LedgerSource": "ledger_io",
    "MemoryLedger": "memory_ledger",
    "MalformedRecord": "verify",
    "Problem": "verify",
    "Span": "verify",
    "VerifyReport": "verify",
    "entry_to_json": "ledger_io",
    "format_timestamp": "ledger_io",
    "read_ledger": "ledger_io",
    "verify_batches": "verify",
    "verify_entries": "verify",
    "verify_ledger": "ledger_ranges",
    "write_jsonl": "ledger_io",
}


def __getattr__(name: str) -> Any:
    return load_attribute(globals(), _HOMES, name)
