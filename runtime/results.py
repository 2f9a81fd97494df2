"""What guards and actions see, and what dispatch, timer firings and deliveries return."""

from __future__ import annotations

import hashlib
import json
import struct
from _json import encode_basestring_ascii, make_encoder
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from pydantic_core import to_jsonable_python

from .errors import IdempotencyConflict, StoreIntegrityError
from .store.base import OutboxMessage
from .timers import ArmedTimer

_EMPTY_RESULTS: Mapping[str, object] = MappingProxyType({})
_pack_length = struct.Struct(">I").pack


class EmittedEvent(NamedTuple):
    """An event written to the outbox for another governor (delivered by deliver_outbox)."""

    machine: str
    instance: str
    event: str
    event_id: str


class Notification(NamedTuple):
    """An escalation step's notice: who must act, about what, and by when (absolute)."""

    machine: str
    instance: str
    state: str
    ladder: str | None
    step: int | None
    kind: str
    recipient: str
    message: str | None
    fired_ms: int
    deadline_ms: int | None
    event_id: str


class DispatchResult:
    """What a dispatch (or a timer firing) did. `duplicate` marks a stored result returned
    again for a repeated event id or idempotency key; `ignored` an event the state ignores.
    `seq` is the ledger sequence index (None without a ledger or when nothing was written).
    Results returned for duplicates hold action results as JSON values.

    Immutable, and it behaves like the named tuple of its `_fields` (equality, iteration,
    `_asdict`, `_replace`). It is not a tuple: a tuple subclass costs a dispatch more to build
    than the whole in-memory transition. Everything but the instance, version and seq is a
    property of the transition row, so the fast paths share one precomputed `_outcome` tuple
    per row.
    """

    __slots__ = ("_instance", "_outcome", "_seq", "_version")

    _fields = (
        "machine",
        "instance",
        "event",
        "from_state",
        "to_state",
        "version",
        "seq",
        "event_id",
        "emitted",
        "notifications",
        "action_results",
        "armed",
        "duplicate",
        "ignored",
    )

    def __init__(
        self,
        machine: str,
        instance: str,
        event: str,
        from_state: str,
        to_state: str,
        version: int,
        seq: int | None,
        event_id: str | None,
        emitted: tuple[EmittedEvent, ...],
        notifications: tuple[Notification, ...],
        action_results: Mapping[str, object],
        armed: tuple[ArmedTimer, ...],
        duplicate: bool = False,
        ignored: bool = False,
    ) -> None:
        self._instance = instance
        self._version = version
        self._seq = seq
        self._outcome: _Outcome = (
            machine,
            event,
            from_state,
            to_state,
            event_id,
            emitted,
            notifications,
            action_results,
            armed,
            duplicate,
            ignored,
        )

    @property
    def machine(self) -> str:
        return self._outcome[0]

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def event(self) -> str:
        return self._outcome[1]

    @property
    def from_state(self) -> str:
        return self._outcome[2]

    @property
    def to_state(self) -> str:
        return self._outcome[3]

    @property
    def version(self) -> int:
        return self._version

    @property
    def seq(self) -> int | None:
        return self._seq

    @property
    def event_id(self) -> str | None:
        return self._outcome[4]

    @property
    def emitted(self) -> tuple[EmittedEvent, ...]:
        return self._outcome[5]

    @property
    def notifications(self) -> tuple[Notification, ...]:
        return self._outcome[6]

    @property
    def action_results(self) -> Mapping[str, object]:
        return self._outcome[7]

    @property
    def armed(self) -> tuple[ArmedTimer, ...]:
        return self._outcome[8]

    @property
    def duplicate(self) -> bool:
        return self._outcome[9]

    @property
    def ignored(self) -> bool:
        return self._outcome[10]

    def _astuple(self) -> tuple[Any, ...]:
        machine, event, from_state, to_state, event_id, *rest = self._outcome
        return (
            machine,
            self._instance,
            event,
            from_state,
            to_state,
            self._version,
            self._seq,
            event_id,
            *rest,
        )

    def _asdict(self) -> dict[str, Any]:
        return dict(zip(self._fields, self._astuple(), strict=True))

    def _replace(self, **changes: Any) -> DispatchResult:
        fields = self._asdict()
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"got unexpected field names: {sorted(unknown)!r}")
        fields.update(changes)
        return DispatchResult(**fields)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._astuple())

    def __len__(self) -> int:
        return len(self._fields)

    def __getitem__(self, index: int) -> Any:
        return self._astuple()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DispatchResult):
            return self._astuple() == other._astuple()
        if isinstance(other, tuple):
            return self._astuple() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __reduce__(self) -> tuple[type[DispatchResult], tuple[Any, ...]]:
        return (DispatchResult, self._astuple())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, self._astuple(), strict=True))
        return f"DispatchResult({fields})"


class _RowResult(DispatchResult):
    """A DispatchResult that the fast paths fill in slot by slot: calling a Python __init__
    would cost a third of the transition."""

    __slots__ = ()
    __init__ = object.__init__


class _UnsealedResult(_RowResult):
    """A fast-path result without a ledger: `seq` is None for all of them, so it is a class
    attribute (shadowing the slot) rather than one more store per result."""

    __slots__ = ()
    _seq = None


# machine, event, from_state, to_state, event_id, emitted, notifications, action_results,
# armed, duplicate, ignored: the part of a result that a transition row fixes.
_Outcome = tuple[
    str,
    str,
    str,
    str,
    str | None,
    tuple[EmittedEvent, ...],
    tuple[Notification, ...],
    Mapping[str, object],
    tuple[ArmedTimer, ...],
    bool,
    bool,
]


class TimerFiring(NamedTuple):
    """One timer fired: the timer, its ledger kind ("timer" or "escalation"), what it did."""

    timer: ArmedTimer
    kind: str
    result: DispatchResult


class Delivery(NamedTuple):
    """The outcome of delivering one outbox event: delivered, failed (with why) or skipped."""

    message: OutboxMessage
    status: str
    result: DispatchResult | None
    error: str | None


class ReplayedState(NamedTuple):
    """An instance's state rebuilt from its ledger entries (and a snapshot, if one was used)."""

    machine: str
    instance: str
    state: str
    version: int
    last_seq: int
    snapshot_version: int | None
    replayed: int
    data: str | None = None  # its kept data (JSON text), checked against its newest kept entry


def derive_event_id(*parts: str | int) -> str:
    """A deterministic event id for something caused by a change (an emitted event, a timer
    firing): the same cause always yields the same id, so its redelivery deduplicates."""
    digest = _EVENT_ID_HASH.copy()
    for part in parts:
        data = (part if type(part) is str else str(part)).encode("utf-8")
        digest.update(_pack_length(len(data)) + data)
    return "evt_" + digest.hexdigest()[:32]


def derive_event_ids(parts: tuple[str | int, ...], count: int, first: int = 0) -> list[str]:
    """`derive_event_id(*parts, index)` for the `count` indexes from `first` on, the common
    parts hashed once (a flow run's write derives one per ledger entry)."""
    return derive_ids_from(event_id_prefix(*parts), count, first)


def event_id_prefix(*parts: str | int, after: hashlib._Hash | None = None) -> hashlib._Hash:
    """`derive_event_id`'s hash after these leading parts (after those `after` holds, if
    given): the ids that share them (a flow run's, "flow" and its id) are derived from copies
    of it (`derive_from`, `derive_ids_from`), the common parts hashed once."""
    digest = (_EVENT_ID_HASH if after is None else after).copy()
    for part in parts:
        data = (part if type(part) is str else str(part)).encode("utf-8")
        digest.update(_pack_length(len(data)) + data)
    return digest


def derive_from(prefix: hashlib._Hash, *parts: str | int) -> str:
    """`derive_event_id(*leading, *parts)`, `prefix` being `event_id_prefix(*leading)`."""
    return "evt_" + event_id_prefix(*parts, after=prefix).hexdigest()[:32]


def derive_ids_from(prefix: hashlib._Hash, count: int, first: int = 0) -> list[str]:
    """`derive_from(prefix, index)` for the `count` indexes from `first` on."""
    ids = []
    for index in range(first, first + count):
        digest = prefix.copy()
        if index < _INDEXES:
            digest.update(_INDEX_PARTS[index])
        else:
            data = str(index).encode("utf-8")
            digest.update(_pack_length(len(data)) + data)
        ids.append("evt_" + digest.hexdigest()[:32])
    return ids


def id_part(*parts: str | int) -> bytes:
    """What `event_id_prefix` hashes for `parts`, made once for ids that add the same parts to
    different prefixes (a flow step's send, to each of its runs' prefixes: `derive_with`)."""
    data = [(part if type(part) is str else str(part)).encode("utf-8") for part in parts]
    return b"".join([_pack_length(len(d)) + d for d in data])


def derive_with(prefix: hashlib._Hash, part: bytes) -> str:
    """`derive_from(prefix, *parts)`, `part` being `id_part(*parts)`."""
    digest = prefix.copy()
    digest.update(part)
    return "evt_" + digest.hexdigest()[:32]


def index_prefix(prefix: hashlib._Hash, index: int) -> hashlib._Hash:
    """`event_id_prefix(index, after=prefix)`, a small index's part from the table (a flow
    run's version, at each of its writes)."""
    digest = prefix.copy()
    digest.update(_INDEX_PARTS[index] if 0 <= index < _INDEXES else id_part(index))
    return digest


# The hash state after the domain tag, copied per id (a flow run derives one per entry).
_EVENT_ID_HASH = hashlib.sha256(b"autonomic/event-id/v1\x00")
# The length-prefixed parts of the first indexes (a write's entries: a few), made once.
_INDEXES = 64
_INDEX_PARTS = tuple(
    _pack_length(len(data)) + data for data in (str(i).encode("utf-8") for i in range(_INDEXES))
)


def _request_digest(instance: str, event: str, payload_sha256: bytes) -> bytes:
    digest = hashlib.sha256(b"autonomic/idempotency/v1\x00")
    for text in (instance, event):
        data = text.encode("utf-8")
        digest.update(_pack_length(len(data)) + data)
    digest.update(payload_sha256)
    return digest.digest()


def _dumps(value: object) -> str:
    """Canonical JSON text: sorted keys, no spaces, ASCII (json.dumps's, with its errors)."""
    try:
        return "".join(_ENCODE(value, 0))
    except RecursionError:
        pass
    # A value that holds itself, or one nested too deep: the encoder with its circular check
    # raises what json.dumps would (ValueError for the first, RecursionError again else).
    return _CHECKED(value)


# json's C encoder, built once and called directly: JSONEncoder.encode builds one (and a
# dict of the containers it is in, to find a value that holds itself) per call, about 8k
# of the 14k instructions a small result takes. Without that dict it keeps no state, so
# threads share it; a value that holds itself recurses until RecursionError, and only then
# is encoded again with the check (`_CHECKED`), for json.dumps's error.
_ENCODE = make_encoder(
    None, to_jsonable_python, encode_basestring_ascii, None, ":", ",", True, False, True
)
_CHECKED = json.JSONEncoder(
    separators=(",", ":"), sort_keys=True, default=to_jsonable_python
).encode


def _result_to_json(result: DispatchResult) -> str:
    # The document of `_asdict` less duplicate and ignored, built from the slots at once.
    # Named tuples encode as JSON arrays, as the lists `_result_from_json` reads back.
    (machine, event, from_state, to_state, event_id, emitted, notifications, actions, armed) = (
        result._outcome[:9]
    )
    return _dumps(
        {
            "machine": machine,
            "instance": result._instance,
            "event": event,
            "from_state": from_state,
            "to_state": to_state,
            "version": result._version,
            "seq": result._seq,
            "event_id": event_id,
            "emitted": emitted,
            "notifications": notifications,
            "action_results": dict(actions),
            "armed": [t.row() for t in armed],
        }
    )


def _stored_result(text: str, machine: str, instance: str, key: str) -> DispatchResult:
    """The stored result (processed_events / idempotency_keys) of an earlier dispatch under
    the dedup `key` (an event id or idempotency key), as the duplicate's answer: only if it
    decodes and names this machine and instance (StoreIntegrityError otherwise; a key reused
    for another instance is IdempotencyConflict)."""
    try:
        result = _result_from_json(text)
        same = result.machine == machine and result.instance == instance
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreIntegrityError(
            f"the stored result of {machine} '{key}' does not decode: {exc}",
            hint="the store was changed outside autonomic: run `autonomic audit verify` on it",
        ) from None
    if not same:
        if result.machine != machine:
            raise StoreIntegrityError(
                f"the stored result of {machine} '{key}' is one of {result.machine}",
                hint="the store was changed outside autonomic: run `autonomic audit verify`",
            )
        raise IdempotencyConflict(machine, key)
    return result


def _result_from_json(text: str) -> DispatchResult:
    doc = json.loads(text)
    return DispatchResult(
        machine=doc["machine"],
        instance=doc["instance"],
        event=doc["event"],
        from_state=doc["from_state"],
        to_state=doc["to_state"],
        version=doc["version"],
        seq=doc["seq"],
        event_id=doc["event_id"],
        emitted=tuple(EmittedEvent(*e) for e in doc["emitted"]),
        notifications=tuple(Notification(*n) for n in doc["notifications"]),
        action_results=MappingProxyType(doc["action_results"]),
        armed=tuple(ArmedTimer(*t) for t in doc["armed"]),
        duplicate=True,
    )


def _new_result(instance: str, version: int, seq: int | None, outcome: _Outcome) -> DispatchResult:
    """A result filled in slot by slot (DispatchResult's __init__ builds the outcome tuple)."""
    result: DispatchResult = _RowResult()
    result._instance = instance
    result._version = version
    result._seq = seq
    result._outcome = outcome
    return result
