"""The outbox: messages written with the change that caused them, and their delivery."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .errors import ActionFailed, InvalidTransition, PayloadInvalid, UnknownEvent, UnknownInstance
from .results import Delivery, EmittedEvent, Notification, _dumps
from .sealing import _Chain
from .store.base import OutboxMessage, OutboxStatus, Transaction

if TYPE_CHECKING:
    from .runtime import Runtime


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
        return [_deliver(runtime, message) for message in pending]
    # A fleet store leases each message to this worker (a worker that dies leaves it to the
    # next after the lease), only the oldest pending one per receiver at a time: claim again
    # until nothing is left, so a receiver's queue drains in order.
    deliveries: list[Delivery] = []
    while len(deliveries) < limit:
        claimed = fleet.claim_outbox(kind="event", limit=limit - len(deliveries))
        if not claimed:
            break
        deliveries += [_deliver(runtime, message) for message in claimed]
    return deliveries


def _deliver(runtime: Runtime, message: OutboxMessage) -> Delivery:
    governor = runtime._governors.get(message.target_machine)
    if governor is None:
        return Delivery(message, "skipped", None, "governor not loaded")
    try:
        payload = json.loads(message.body) if message.body else {}
    except ValueError:
        payload = message.body  # not JSON: the receiver refuses it as PayloadInvalid
    # The delivery carries the payload's `idempotency_key`, when it has one, as the
    # dispatch's key: a charge the receiver already took under that key (a webhook, a
    # direct call) returns its stored result instead of being evaluated again.
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
    ) as exc:
        error = f"{exc.code} {exc.message}"
        mark(runtime, message, "failed", error)
        return Delivery(message, "failed", None, error)
    mark(runtime, message, "delivered", None)
    return Delivery(message, "delivered", result, None)


def mark(runtime: Runtime, message: OutboxMessage, status: OutboxStatus, error: str | None) -> None:
    message_id = message.id
    assert message_id is not None

    def work(txn: Transaction, chain: _Chain) -> None:
        txn.mark_outbox(message_id, status, error)

    runtime._submit(work, None)
