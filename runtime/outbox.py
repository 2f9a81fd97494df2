"""The outbox: messages written with the change that caused them, and their delivery.

Refusal notices (`emit Entitlement.GrantEntitlements if refused TierChangeFailed(...)`): the
notice, an event of the emitting machine with its payload built from the emit's cause, is
written with the emitted event, in the same transaction, as a "held" message to the emitting
instance, its event id derived from the emitted event's. When the delivery of the emitted
event is refused, one unit of work marks it failed and releases its notice ("pending"); the
notice is then delivered at once, as any outbox event: dispatched with its own event id (a
repeated delivery is deduplicated by the sender), ledgered by the sender's transition, and
marked delivered or failed (a refused notice has no notice of its own). A delivered event's
notice is dropped with the same unit. A notice is released only from "held", so a delivery
refused again releases nothing more.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import (
    ActionFailed,
    IdempotencyConflict,
    InvalidTransition,
    PayloadInvalid,
    UnknownEvent,
    UnknownInstance,
)
from .results import Delivery, EmittedEvent, Notification, _dumps, derive_event_id
from .sealing import _Chain
from .store.base import OutboxMessage, OutboxStatus, Transaction
from .tables import Payload

if TYPE_CHECKING:
    from .rows import _EmitPlan
    from .runtime import Runtime


def refusal_id(event_id: str) -> str:
    """The event id of the refusal notice of the emitted event `event_id`."""
    return derive_event_id("refused", event_id)


def _refusal_notices(
    machine: str,
    instance: str,
    version: int,
    emitted: Sequence[EmittedEvent],
    plans: Sequence[_EmitPlan],
    payload: Payload | None,
    actor: str,
    cause: str,
    now: int,
    data: Mapping[str, object] | None = None,
) -> list[OutboxMessage]:
    """The held notices of the emits that have one: from each emitted event's receiver back
    to the emitting instance (see the module docstring); `data`: its kept data."""
    notices = []
    for emitted_event, plan in zip(emitted, plans, strict=True):
        notice = plan.refused
        if notice is None:
            continue
        notices.append(
            OutboxMessage(
                None,
                "event",
                emitted_event.machine,
                emitted_event.instance,
                version,
                machine,
                instance,
                notice.event,
                refusal_id(emitted_event.event_id),
                notice.body(payload, instance, actor, cause, data),
                now,
                "held",
            )
        )
    return notices


def _event_message(
    machine: str, instance: str, version: int, emitted: EmittedEvent, now: int, body: str
) -> OutboxMessage:
    return OutboxMessage(
        None,
        "event",
        machine,
        instance,
        version,
        emitted.machine,
        emitted.instance,
        emitted.event,
        emitted.event_id,
        body,
        now,
    )


def _notification_message(notification: Notification, version: int) -> OutboxMessage:
    return OutboxMessage(
        None,
        "notification",
        notification.machine,
        notification.instance,
        version,
        notification.kind,
        notification.recipient,
        notification.ladder or "",
        notification.event_id,
        _dumps(notification._asdict()),
        notification.fired_ms,
    )


def deliver_outbox(runtime: Runtime, *, limit: int = 1000) -> list[Delivery]:
    """Deliver pending emitted events to their governors in order, each with its derived
    event id (a repeated delivery is deduplicated by the receiver) and the payload built
    when it was emitted from the emit's arguments, and with the payload's `idempotency_key`
    field (if any) as its idempotency key. An event its receiver rejects (also for
    its payload) is marked failed with the reason; one for a governor not loaded here stays
    pending."""
    fleet = runtime._partitioned
    if fleet is None:
        pending = runtime._store.outbox(kind="event", status="pending", limit=limit)
        return [delivery for message in pending for delivery in _deliver(runtime, message)]
    # A fleet store leases each message to this worker (a worker that dies leaves it to the
    # next after the lease), only the oldest pending one per receiver at a time: claim again
    # until nothing is left, so a receiver's queue drains in order.
    deliveries: list[Delivery] = []
    while len(deliveries) < limit:
        claimed = fleet.claim_outbox(kind="event", limit=limit - len(deliveries))
        if not claimed:
            break
        for message in claimed:
            deliveries += _deliver(runtime, message)
    return deliveries


def _deliver(runtime: Runtime, message: OutboxMessage) -> list[Delivery]:
    """The delivery of `message`, and of the refusal notice its failure released."""
    governor = runtime._governors.get(message.target_machine)
    if governor is None:
        return [Delivery(message, "skipped", None, "governor not loaded")]
    try:
        payload = json.loads(message.body) if message.body else {}
    except ValueError:
        payload = message.body  # not JSON: the receiver refuses it as PayloadInvalid
    # The delivery carries the payload's `idempotency_key`, when it has one, as the
    # dispatch's key: a charge the receiver already took under that key (a webhook, a
    # direct call) returns its stored result instead of being evaluated again; the key
    # taken for another request is the receiver's refusal (R009), as any other below.
    key = payload.get("idempotency_key") if isinstance(payload, dict) else None
    try:
        result = governor.dispatch(
            message.target_instance,
            message.event,
            payload or None,
            actor=f"{message.machine}:{message.instance}",
            event_id=message.event_id,
            idempotency_key=key if isinstance(key, str) and key else None,
        )
    except (
        InvalidTransition,
        UnknownInstance,
        UnknownEvent,
        PayloadInvalid,
        ActionFailed,
        IdempotencyConflict,
    ) as exc:
        error = f"{exc.code} {exc.message}"
        notice = mark(runtime, message, "failed", error)
        failed = Delivery(message, "failed", None, error)
        # The sender learns of it at once; a refused notice is only marked failed.
        return [failed] if notice is None else [failed, *_deliver(runtime, notice)]
    mark(runtime, message, "delivered", None)
    return [Delivery(message, "delivered", result, None)]


_PARTS = ("code", "message")


def _with_refusal(body: str, error: str) -> str:
    """A held notice's body with its refusal slots (runtime/rows.py REFUSAL_SLOTS) filled from
    the refusal it tells of: `error` is "CODE message", as `_deliver` writes it."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict):
        return body
    slots = {
        field: value["$refusal"]
        for field, value in payload.items()
        if isinstance(value, dict) and len(value) == 1 and value.get("$refusal") in _PARTS
    }
    if not slots:
        return body
    code, _, text = error.partition(" ")
    parts = {"code": code, "message": text}
    values: dict[str, Any] = {**payload, **{field: parts[part] for field, part in slots.items()}}
    return _dumps(values)


def mark(
    runtime: Runtime, message: OutboxMessage, status: OutboxStatus, error: str | None
) -> OutboxMessage | None:
    """Mark a delivery "delivered" or "failed", and in the same unit of work drop or release
    its held refusal notice; returns the notice it released (now pending)."""
    message_id = message.id
    assert message_id is not None
    sender = runtime._governors.get(message.machine)
    # Only an emit with `if refused` holds a notice: the sender's tables say which (a sender
    # not loaded here might, so its notice is looked for).
    held = sender is None or (message.target_machine, message.event) in sender._refusals

    fleet = runtime._partitioned

    def work(txn: Transaction, chain: _Chain) -> OutboxMessage | None:
        txn.mark_outbox(message_id, status, error)
        if not held:
            return None
        notice = txn.outbox_message(refusal_id(message.event_id))
        if notice is None or notice.status != "held" or notice.id is None:
            return None
        if status != "failed":
            txn.mark_outbox(notice.id, "dropped", None)
            return None
        # Released with the refusal it tells of: its $refusal_code and $refusal_message
        # arguments take the code and message the delivery failed with.
        body = _with_refusal(notice.body, error or "")
        if body != notice.body:
            txn.set_outbox_body(notice.id, body)
        txn.mark_outbox(notice.id, "pending", None)
        if fleet is not None:
            # This worker delivers it next: leased to it like any claimed message, so no
            # other worker takes it meanwhile, and the fleet does if this one dies.
            fleet.lease_in(txn, notice.id)
        return replace(notice, body=body, status="pending")

    return runtime._submit(work, None)
