"""Creating an instance: the unit of work that writes it in the initial state (version 1),
with its timers armed, the initial state's entry actions and emits, and its ledger entry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .errors import InstanceExists
from .inputs import check_identifier
from .instance_data import route
from .ledger import EMPTY_PAYLOAD_DIGEST, EntryData
from .outbox import _event_row, _refusal_notices
from .replay import save_snapshot
from .results import (
    _EMPTY_RESULTS,
    DispatchResult,
    EmittedEvent,
    _result_to_json,
    _stored_result,
    derive_ids_from,
    event_id_prefix,
)
from .rows import _EmitPlan
from .sealing import _Chain
from .store.base import InstanceRecord, OutboxRow, Transaction
from .timers import arm_timers

if TYPE_CHECKING:
    from .dispatch import Governor

__all__ = ["CREATE_EVENT", "create_work", "enter_created"]

CREATE_EVENT = "create"


def create_work(
    governor: Governor, instance_id: str, actor: str, event_id: str | None
) -> Callable[[Transaction, _Chain], DispatchResult]:
    check_identifier("instance id", instance_id)
    check_identifier("actor", actor)
    check_identifier("event id", event_id, optional=True)
    name = governor.name
    initial = governor._initial
    runtime = governor.runtime

    def work(txn: Transaction, chain: _Chain) -> DispatchResult:
        if event_id is not None:
            stored = txn.processed(name, event_id)
            if stored is not None:
                return _stored_result(stored, name, instance_id, event_id)
        if txn.instance(name, instance_id) is not None:
            raise InstanceExists(name, instance_id)
        now = runtime._clock.now_ms()
        armed = arm_timers(
            name, instance_id, governor._plan.on_create(initial), now, 1, None, governor._settings
        )
        results, emitted, messages = governor._enter_created(instance_id, actor, now)
        entry = None
        if runtime._sealer is not None:
            data = EntryData(
                now,
                "transition",
                name,
                instance_id,
                "",
                initial,
                CREATE_EVENT,
                actor,
                event_id or "",
                EMPTY_PAYLOAD_DIGEST,
            )
            entry = chain.seal(txn, data)
        result = DispatchResult(
            name,
            instance_id,
            CREATE_EVENT,
            "",
            initial,
            1,
            None if entry is None else entry.seq,
            event_id,
            emitted,
            (),
            results,
            armed,
        )
        txn.insert_instance(InstanceRecord(name, instance_id, initial, 1))
        if armed:
            txn.arm_timers(armed)
        if messages:
            txn.add_outbox_rows(messages)
        if entry is not None:
            txn.append_ledger(entry)
            if runtime._snapshot_every == 1:
                save_snapshot(txn, name, instance_id, 1, initial, entry)
        if event_id is not None:
            txn.record_processed(name, event_id, instance_id, _result_to_json(result), now)
        if entry is not None:
            chain.advance(entry)
        return result

    return work


def enter_created(
    governor: Governor, instance_id: str, actor: str, now: int
) -> tuple[Mapping[str, object], tuple[EmittedEvent, ...], list[OutboxRow]]:
    """The initial state's entry actions, run for `create`: their results, emitted
    events and outbox messages (version 1)."""
    entering = governor._plan.on_entry(governor._initial)
    if not entering:
        return _EMPTY_RESULTS, (), []
    record = InstanceRecord(governor.name, instance_id, "", 0)
    results: dict[str, object] = {}
    plans: list[_EmitPlan] = []
    for spec in entering:
        actions = governor._timer_actions[spec.id]
        results.update(
            governor._run_actions(
                actions, CREATE_EVENT, governor._initial, record, None, actor, now
            )
        )
        plans.extend(governor._timer_emits[spec.id])
    ids = derive_ids_from(event_id_prefix(instance_id, 1, after=governor._emit_ids), len(plans))
    emitted = tuple(
        EmittedEvent(
            emit.machine,
            # A new instance keeps no data: a routed emit here is refused (E149).
            instance_id if emit.to is None else route(None, emit.to, governor.name, instance_id),
            emit.event,
            emitted_id,
        )
        for emit, emitted_id in zip(plans, ids, strict=True)
    )
    messages = [
        _event_row(
            governor.name, instance_id, 1, e, now, emit.body(None, instance_id, actor, CREATE_EVENT)
        )
        for e, emit in zip(emitted, plans, strict=True)
    ]
    messages += _refusal_notices(
        governor.name, instance_id, 1, emitted, plans, None, actor, CREATE_EVENT, now
    )
    return results or _EMPTY_RESULTS, emitted, messages
