"""The unit of work of one dispatch: deduplicate, read the instance, decide the row (the same
way for every dispatch: the table built at load time, the guards in order, the ignore list,
the rejection), then apply it (runtime/applying.py) or record the rejection."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from .errors import (
    ActionFailed,
    ConcurrentUpdateDetected,
    IdempotencyConflict,
    InvalidTransition,
    NoGuardHeld,
    OutsideCallsSuperseded,
    UnknownInstance,
)
from .ledger import EntryData
from .results import DispatchResult, _new_result, _request_digest, _stored_result
from .rows import _Absent, _Guarded, _Row
from .sealing import _Chain
from .store.base import InstanceRecord, Transaction
from .tables import Payload, TransitionContext

if TYPE_CHECKING:
    from .dispatch import Governor

__all__ = ["decide", "record_rejection", "step", "superseded", "without_row"]


class _LookAgain(Exception):
    """The unit found a row whose outside actions (a policy's) its look before the
    transaction did not run: the committed state changed in between (the instance was
    created, or moved to where the event calls out). Nothing is written and nothing called;
    the dispatcher looks again (`preflight.prepare`), under the claim it still holds."""


# Guard and action contexts are built with tuple.__new__, skipping the named tuple's __new__.
_new_context = cast(
    Callable[[type[TransitionContext], tuple[Any, ...]], TransitionContext], tuple.__new__
)
# (state, event) -> the key's only row when it is unguarded, else its rows in order.
_Entry = _Row | _Guarded | _Absent
_NO_ENTRIES: Mapping[str, _Entry] = MappingProxyType({})


class _Preran(NamedTuple):
    """Results of a row's outside actions, run before the unit of work on `version`."""

    version: int
    row: _Row
    results: Mapping[str, object]


# What `_inputs` checked, in `_step`'s order: instance id, event, payload, its digest, actor,
# event id, idempotency key, request digest, expected version, record_rejection, preran.
_UnitInputs = tuple[
    str,
    str,
    Payload | None,
    bytes,
    str,
    str | None,
    str | None,
    bytes | None,
    int | None,
    bool,
    _Preran | None,
]


class _Rejected(NamedTuple):
    """A rejection recorded in the ledger: raised to the caller after the commit."""

    error: InvalidTransition


def _settled(outcome: DispatchResult | _Rejected) -> DispatchResult:
    if type(outcome) is _Rejected:
        raise outcome.error
    return cast(DispatchResult, outcome)


def step(
    governor: Governor, inputs: _UnitInputs, txn: Transaction, chain: _Chain
) -> DispatchResult | _Rejected:
    """The unit of work of one dispatch: deduplicate, read the instance, decide, write."""
    (
        instance_id,
        event,
        payload,
        digest,
        actor,
        event_id,
        idempotency_key,
        request,
        expected_version,
        record_rejection,
        preran,
    ) = inputs
    name = governor.name
    record: InstanceRecord | None
    if event_id is not None and idempotency_key is None and txn is not governor._memory:
        # The dedup probe and the instance in one read (the instance checked on a miss only).
        stored, record = txn.processed_and_instance(name, event_id, instance_id)
        if stored is not None:
            return _stored_result(stored, name, instance_id, event_id)
    else:
        if event_id is not None:
            stored = txn.processed(name, event_id)
            if stored is not None:
                return _stored_result(stored, name, instance_id, event_id)
        if idempotency_key is not None:
            known = txn.idempotency(name, idempotency_key)
            if known is not None:
                # Or as a request stored before decimals compared by value (event_inputs.py).
                if known[0] != request and known[0] != _request_digest(instance_id, event, digest):
                    raise IdempotencyConflict(name, idempotency_key)
                return _stored_result(known[1], name, instance_id, idempotency_key)
        # The memory store's own records (as the short path reads them), else a read.
        record = (
            governor._records.get(instance_id)
            if txn is governor._memory
            else txn.instance(name, instance_id)
        )
    if record is None:
        raise UnknownInstance(name, instance_id)
    if expected_version is not None and record.version != expected_version:
        if preran is not None:
            raise governor._superseded(preran, record)
        raise ConcurrentUpdateDetected(name, instance_id, expected_version, record.version)
    found = governor._table.get(record.state, _NO_ENTRIES).get(event)
    now = governor._now_ms()
    try:
        if type(found) is _Row:
            row = found
        elif found is None:  # a state this machine does not declare
            raise InvalidTransition(name, instance_id, record.state, event)
        elif type(found) is _Absent:
            if preran is not None:
                raise governor._superseded(preran, record)
            return governor._without_row(record, found, event_id)
        else:
            row = governor._decide(found, record, payload, actor, now)
    except InvalidTransition as rejection:
        if preran is not None:
            raise governor._superseded(preran, record) from rejection
        if not record_rejection or not governor._sealed:
            raise
        return governor._record_rejection(
            txn, chain, record, event, actor, event_id, digest, now, rejection
        )
    ran = None
    if preran is None:
        if row in governor._calling_rows:
            # Never called here: in the transaction the call would hold the store's write
            # lock (every commit waits for it), and a unit rolled back and run again (its
            # batch failed, its run moved) would call twice.
            raise _LookAgain()
    else:
        # The outside actions ran before this transaction, on the version then committed.
        # If the instance moved meanwhile and the event is still decided the same way
        # (same state, same row), their results are this dispatch's; if it is decided
        # otherwise, they are not called again (they ran once): the dispatch is refused.
        if preran.row is not row:
            raise governor._superseded(preran, record)
        ran = preran.results
    return governor._apply(
        record,
        row,
        payload,
        digest,
        actor,
        now,
        event_id,
        idempotency_key,
        request,
        ran,
        txn,
        chain,
    )


def superseded(
    governor: Governor, preran: _Preran, record: InstanceRecord
) -> OutsideCallsSuperseded:
    return OutsideCallsSuperseded(
        governor.name,
        record.instance,
        preran.version,
        record.version,
        tuple(preran.results),
        preran.results,
    )


def decide(
    governor: Governor,
    found: _Row | _Guarded,
    record: InstanceRecord,
    payload: Payload | None,
    actor: str,
    now: int,
) -> _Row:
    """The row that applies: the key's only unguarded row, or the first whose guard holds
    (`else` last); NoGuardHeld if none does."""
    if type(found) is _Row:
        return found
    rows = found.rows
    context: TransitionContext | None = None
    for row in rows:
        check = row.guard_fn
        if check is None:
            return row
        if context is None:
            context = _new_context(
                TransitionContext,
                (
                    governor.name,
                    record.instance,
                    record.state,
                    row.event,
                    payload,
                    actor,
                    record.version,
                    now,
                    None,
                    None,
                    None,
                    None,
                ),
            )
        try:
            held = check(context)
        except Exception as exc:
            raise ActionFailed(governor.name, str(row.guard), exc, role="guard") from exc
        if held:
            return row
    guards = tuple(str(r.guard) for r in rows if r.guard is not None)
    raise NoGuardHeld(governor.name, record.instance, record.state, rows[0].event, guards)


def without_row(
    governor: Governor, record: InstanceRecord, absent: _Absent, event_id: str | None
) -> DispatchResult:
    """(state, event) has no row: the result of an ignored event, else the rejection."""
    if not absent.ignored:
        raise absent.rejection(record.instance)
    outcome = absent.outcome
    if event_id is not None:
        outcome = (*outcome[:4], event_id, *outcome[5:])
    return _new_result(record.instance, record.version, None, outcome)


def record_rejection(
    governor: Governor,
    txn: Transaction,
    chain: _Chain,
    record: InstanceRecord,
    event: str,
    actor: str,
    event_id: str | None,
    digest: bytes,
    now: int,
    rejection: InvalidTransition,
) -> _Rejected:
    """A "rejection" ledger entry; the caller raises the rejection after the commit."""
    data = EntryData(
        now,
        "rejection",
        governor.name,
        record.instance,
        record.state,
        record.state,
        event,
        actor,
        event_id or "",
        digest,
    )
    entry = chain.seal(txn, data)
    txn.append_ledger(entry)
    chain.advance(entry)
    rejection.ledger_seq = entry.seq
    return _Rejected(rejection)
