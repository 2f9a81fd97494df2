"""Applying a decided row: its actions run, then every write of the transition (the state,
the ledger entry sealed on the verified head, kept data, timers, outbox, the processed event
id and idempotency record, a snapshot), nothing written before all checks passed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic_core import PydanticSerializationError

from .bindings import Action
from .errors import ActionFailed
from .instance_data import dump_data, keep_fields, read_data, route
from .ledger import KEPT, EntryData, LedgerEntry, kept_digest
from .outbox import _event_row, _refusal_notices
from .replay import save_snapshot
from .results import (
    _EMPTY_RESULTS,
    DispatchResult,
    EmittedEvent,
    _result_to_json,
    _RowResult,
    derive_ids_from,
    event_id_prefix,
)
from .rows import _Row
from .sealing import _Chain, _new_entry_data
from .store.base import InstanceRecord, Transaction, idempotency_event_id
from .tables import Payload, TransitionContext
from .timers import arm_timers
from .unit import _new_context

if TYPE_CHECKING:
    from .dispatch import Governor

__all__ = ["apply", "kept_seq", "run_actions", "seal_kept"]


def run_actions(
    governor: Governor,
    actions: tuple[tuple[str, Action], ...],
    event: str,
    target: str | None,
    record: InstanceRecord,
    payload: Payload | None,
    actor: str,
    now: int,
    timer: str | None = None,
    ran: Mapping[str, object] | None = None,
    event_id: str | None = None,
    idempotency_key: str | None = None,
) -> Mapping[str, object]:
    """Run `actions` in order; those in `ran` (run before the transaction) are not called
    again: their results are taken. `event_id` and `idempotency_key`: the dispatch's, for
    the actions' context."""
    if not actions:
        return _EMPTY_RESULTS
    context = _new_context(
        TransitionContext,
        (
            governor.name,
            record.instance,
            record.state,
            event,
            payload,
            actor,
            record.version,
            now,
            target,
            timer,
            event_id,
            idempotency_key,
        ),
    )
    results: dict[str, object] = {}
    for name, function in actions:
        if ran is not None and name in ran:
            results[name] = ran[name]
            continue
        try:
            results[name] = function(context)
        except Exception as exc:
            raise ActionFailed(governor.name, name, exc) from exc
    return results


def apply(
    governor: Governor,
    record: InstanceRecord,
    row: _Row,
    payload: Payload | None,
    digest: bytes,
    actor: str,
    now: int,
    event_id: str | None,
    idempotency_key: str | None,
    request: bytes | None,
    ran: Mapping[str, object] | None,
    txn: Transaction,
    chain: _Chain,
) -> DispatchResult:
    """Run the chosen row's actions (but those in `ran`), then write everything of the
    transition."""
    name = governor.name
    instance_id = record.instance
    runtime = governor.runtime
    results = (
        governor._run_actions(
            row.actions,
            row.event,
            row.target,
            record,
            payload,
            actor,
            now,
            None,
            ran,
            event_id,
            idempotency_key,
        )
        if row.actions
        else _EMPTY_RESULTS
    )
    version = record.version + 1
    armed = (
        arm_timers(name, instance_id, row.arms, now, version, payload, governor._settings)
        if row.arms
        else ()
    )
    emitted: tuple[EmittedEvent, ...] = ()
    bodies: Sequence[str] = ()
    kept = None
    if row.data:  # the row keeps data fields, or an emit is routed by or reads one
        kept = read_data(txn, name, instance_id, runtime._kept, chain.partition)
        if row.kept:
            kept = keep_fields(kept, row.kept, payload, governor._routes)
    if row.emits:
        ids = derive_ids_from(
            event_id_prefix(instance_id, version, after=governor._emit_ids), len(row.emits)
        )
        emitted = tuple(
            EmittedEvent(
                emit.machine,
                instance_id if emit.to is None else route(kept, emit.to, name, instance_id),
                emit.event,
                emitted_id,
            )
            for emit, emitted_id in zip(row.emits, ids, strict=True)
        )
        bodies = [emit.body(payload, instance_id, actor, row.event, kept) for emit in row.emits]
    notices = (
        _refusal_notices(
            name,
            instance_id,
            version,
            emitted,
            row.emits,
            payload,
            actor,
            row.event,
            now,
            kept,
        )
        if row.notices
        else ()
    )
    deadlines = governor._notices
    if row.cancels and deadlines is not None:
        # The deadlines this move meets that fell due before the event arrived were missed:
        # escalated here first (as the due work would have, and a valid state on its own),
        # with their entries before the move's; the move then deletes them as met.
        deadlines.escalate_late(runtime, txn, chain, record, row.target, now)
    entry = None
    if runtime._sealer is not None:
        # A keyed dispatch's entry names its key's digest: the anchor of its idempotency row.
        ledger_id = (
            event_id
            if event_id is not None
            else ("" if idempotency_key is None else idempotency_event_id(name, idempotency_key))
        )
        data = _new_entry_data(
            EntryData,
            (
                now,
                "transition",
                name,
                instance_id,
                record.state,
                row.target,
                row.event,
                actor,
                ledger_id,
                digest,
            ),
        )
        entry = chain.seal(txn, data)
    kept_text: str | None = None
    kept_entry: LedgerEntry | None = None
    if row.kept and kept is not None:
        kept_text = dump_data(kept)
        if entry is not None:
            kept_entry = governor._seal_kept(entry, record, row, actor, now, kept_text)
    # _new_result without its frame.
    result: DispatchResult = _RowResult()
    result._instance = instance_id
    result._version = version
    result._seq = None if entry is None else entry.seq
    result._outcome = (
        name,
        row.event,
        record.state,
        row.target,
        event_id,
        emitted,
        (),
        results,
        armed,
        False,
        False,
    )
    stored = ""
    if event_id is not None or idempotency_key is not None:
        try:
            text = row.json.text(
                row, instance_id, version, result._seq, event_id, emitted, results, armed
            )
        except (TypeError, ValueError):  # a part not of the kinds it writes: json's says how
            text = None
        try:
            stored = _result_to_json(result) if text is None else text
        except (TypeError, ValueError, PydanticSerializationError) as exc:
            # The result is stored for repeats, so it must be JSON: fail before writing.
            raise ActionFailed(name, ", ".join(results), exc, role="result of") from exc
    # Writes: nothing above this line has touched the store (but a late deadline's miss).
    if txn is governor._memory:
        # The live record, read in this unit, which holds the store: no one moved it.
        record.state = row.target
        record.version = version
    else:
        txn.update_instance(name, instance_id, row.target, version, record.version)
    if kept_text is not None:
        txn.save_instance_data(name, instance_id, kept_text)
    if row.cancels:
        if row.keep:
            txn.cancel_timers(name, instance_id, row.keep)
        else:
            txn.cancel_timers(name, instance_id)
        if governor._notices is not None:  # the notices' deadlines this move meets
            governor._notices.clear(txn, instance_id, record.state, row.target)
    if armed:
        txn.arm_timers(armed)
    if emitted:
        txn.add_outbox_rows(
            [
                *(
                    _event_row(name, instance_id, version, e, now, body)
                    for e, body in zip(emitted, bodies, strict=True)
                ),
                *notices,
            ]
        )
    if entry is not None:
        txn.append_ledger(entry)
        if kept_entry is not None:
            txn.append_ledger(kept_entry)
        if version % runtime._snapshot_every == 0:
            kept_seq = governor._kept_seq(txn, instance_id, kept_entry)
            save_snapshot(txn, name, instance_id, version, row.target, entry, kept_seq)
    if event_id is not None:
        txn.record_processed(name, event_id, instance_id, stored, now)
    if idempotency_key is not None and request is not None:
        txn.record_idempotency(name, idempotency_key, request, stored, now)
    if entry is not None:
        chain.advance(entry)
        if kept_entry is not None:
            chain.advance(kept_entry)
    return result


def kept_seq(
    governor: Governor, txn: Transaction, instance_id: str, kept: LedgerEntry | None = None
) -> int:
    """The seq of the instance's newest kept entry (`kept`, written now, or the stored
    one) for a snapshot; -1 if it has none or its machine keeps nothing."""
    if kept is None and governor._keeps:
        kept = txn.kept_entry(governor.name, instance_id)
    return -1 if kept is None else kept.seq


def seal_kept(
    governor: Governor,
    entry: LedgerEntry,
    record: InstanceRecord,
    row: _Row,
    actor: str,
    now: int,
    text: str,
) -> LedgerEntry:
    """The "kept" entry after the move's `entry`: the instance's data as stored after the
    move, committed in the same transaction (see runtime/ledger.py)."""
    sealer = governor.runtime._sealer
    assert sealer is not None
    data = EntryData(
        now,
        KEPT,
        governor.name,
        record.instance,
        row.target,
        row.target,
        row.event,
        actor,
        "",
        kept_digest(text),
    )
    return sealer.seal_kept(entry.seq + 1, entry.entry_hash, data)
