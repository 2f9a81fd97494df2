"""The outbox: messages written with the change that caused them, and their delivery.

Delivery (`deliver_outbox`): the due pending events, each receiving instance's in the order
they were emitted, go to their receivers in chunks through `Governor.dispatch_many`, one
receiving machine at a time, one instance's oldest message per round; each is marked
delivered in its own unit of work, in the commit of its dispatch (so a chunk of N deliveries
is one commit, and no crash can leave a delivery committed but unmarked). What did not take
effect is marked in one more commit:
- refused (no transition, guards, payload, idempotency conflict, an action's business
  failure such as a declined card): "failed", with the refusal, and its notice released;
- unanswered (the receiver's outside call failed transiently or as unavailable, its breaker
  is open or the tenant's bulkhead full: resilience.errors.is_unanswered): still "pending",
  with its count of attempts and the time it is tried again, `retry_later_ms(attempts)` after
  (the jitter backoff compensations use: 217 ms, 434 ms, ... capped at 1 min). Its event id
  and idempotency key stay the same, so the receiver and its outside service deduplicate a
  call that did reach them; later messages to the same instance wait behind it. Only once
  GIVE_UP_MS (24 h) have passed since it was emitted is an unanswered delivery "failed"
  ("no answer ... given up"), with its refusal notice released like a refusal's.

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
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from .errors import (
    ActionFailed,
    IdempotencyConflict,
    InvalidTransition,
    OutsideCallInProgress,
    PayloadInvalid,
    UnknownEvent,
    UnknownInstance,
)
from .event_inputs import DispatchRequest
from .resilience.backoff import retry_later_ms
from .resilience.batch import chunks
from .resilience.errors import is_unanswered
from .results import Delivery, DispatchResult, EmittedEvent, Notification, _dumps, derive_event_id
from .sealing import _Chain
from .store.base import OutboxMessage, OutboxRow, OutboxStatus, Transaction
from .tables import Payload
from .timers import DAY_MS

if TYPE_CHECKING:
    from .dispatch import Governor
    from .rows import _EmitPlan
    from .runtime import Runtime

# An unanswered delivery is tried again until this long after it was emitted, then failed.
GIVE_UP_MS = DAY_MS
# Deliveries to one machine per dispatch_many call (each a commit batch, up to max_batch).
CHUNK_SIZE = 256
# What a receiver answers a delivery it does not take with: the delivery fails (unless its
# action got no answer, `is_unanswered`).
_REFUSALS = (
    InvalidTransition,
    UnknownInstance,
    UnknownEvent,
    PayloadInvalid,
    ActionFailed,
    IdempotencyConflict,
)


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
) -> list[OutboxRow]:
    """The held notices of the emits that have one: from each emitted event's receiver back
    to the emitting instance (see the module docstring); `data`: its kept data."""
    notices: list[OutboxRow] = []
    for emitted_event, plan in zip(emitted, plans, strict=True):
        notice = plan.refused
        if notice is None:
            continue
        notices.append(
            (
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
                None,
            )
        )
    return notices


def _event_row(
    machine: str, instance: str, version: int, emitted: EmittedEvent, now: int, body: str
) -> OutboxRow:
    """The outbox row of an emitted event (Transaction.add_outbox_rows)."""
    return (
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
        "pending",
        None,
    )


def _notification_message(notification: Notification, version: int) -> OutboxMessage:
    return OutboxMessage(None, *_notification_row(notification, version))


def _notification_row(notification: Notification, version: int) -> OutboxRow:
    """The outbox row of an escalation step's notice (Transaction.add_outbox_rows)."""
    return (
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
        "pending",
        None,
    )


def deliver_outbox(
    runtime: Runtime, *, limit: int = 1000, chunk_size: int = CHUNK_SIZE
) -> list[Delivery]:
    """Deliver the pending emitted events due now (see the module docstring), at most
    `limit`, each with its derived event id (a repeated delivery is deduplicated by the
    receiver), the payload built when it was emitted from the emit's arguments, and the
    payload's `idempotency_key` field (if any) as its idempotency key. Returns each one's
    Delivery: "delivered", "failed" (with the refusal), "retrying" (its receiver gave no
    answer: `message.attempts` and `message.retry_at_ms` say when it is tried again) or
    "skipped" (its receiver's governor is not loaded here: it stays pending)."""
    fleet = runtime._partitioned
    now = runtime._clock.now_ms()
    if fleet is None:
        due = runtime._store.outbox(kind="event", status="pending", limit=limit, due_ms=now)
        return _deliver_all(runtime, due, chunk_size)
    # A fleet store leases each message to this worker (a worker that dies leaves it to the
    # next after the lease), only the oldest pending one per receiver at a time: claim again
    # until nothing is left, so a receiver's queue drains in order.
    deliveries: list[Delivery] = []
    while len(deliveries) < limit:
        claimed = fleet.claim_outbox(kind="event", limit=limit - len(deliveries), due_ms=now)
        if not claimed:
            break
        deliveries += _deliver_all(runtime, claimed, chunk_size)
    return deliveries


def _deliver_all(
    runtime: Runtime, messages: Sequence[OutboxMessage], chunk_size: int
) -> list[Delivery]:
    """Deliver `messages` (in id order) in rounds: each round the oldest message left of each
    receiving instance, grouped by receiving machine; a message left pending holds back the
    later ones to its instance."""
    queues: dict[tuple[str, str], list[OutboxMessage]] = defaultdict(list)
    for message in messages:
        queues[(message.target_machine, message.target_instance)].append(message)
    for queue in queues.values():
        queue.reverse()  # popped from the end: oldest first
    deliveries: list[Delivery] = []
    while queues:
        by_machine: dict[str, list[OutboxMessage]] = defaultdict(list)
        for receiver, queue in list(queues.items()):
            by_machine[receiver[0]].append(queue.pop())
            if not queue:
                del queues[receiver]
        for machine, round_ in by_machine.items():
            governor = runtime._governors.get(machine)
            if governor is None:
                deliveries += [Delivery(m, "skipped", None, "governor not loaded") for m in round_]
                continue
            for chunk in chunks(round_, chunk_size):
                done = _deliver_chunk(runtime, governor, chunk)
                deliveries += done
                for delivery in done:
                    if delivery.status == "retrying":
                        m = delivery.message
                        queues.pop((m.target_machine, m.target_instance), None)
    return deliveries


def _request(message: OutboxMessage) -> DispatchRequest:
    try:
        payload = json.loads(message.body) if message.body else {}
    except ValueError:
        payload = message.body  # not JSON: the receiver refuses it as PayloadInvalid
    # The delivery carries the payload's `idempotency_key`, when it has one, as the
    # dispatch's key: a charge the receiver already took under that key (a webhook, a
    # direct call) returns its stored result instead of being evaluated again; the key
    # taken for another request is the receiver's refusal (R009), as any other below.
    key = payload.get("idempotency_key") if isinstance(payload, dict) else None
    return DispatchRequest(
        message.target_instance,
        message.event,
        payload or None,
        actor=f"{message.machine}:{message.instance}",
        event_id=message.event_id,
        idempotency_key=key if isinstance(key, str) and key else None,
    )


def _deliver_chunk(
    runtime: Runtime, governor: Governor, messages: Sequence[OutboxMessage]
) -> list[Delivery]:
    """Deliver `messages` (to `governor`'s instances) in one dispatch_many, each marked
    delivered in its unit; then mark the rest in one more commit, and deliver the refusal
    notices that released."""
    marks = [partial(_mark_delivered, runtime, m, _holds_notice(runtime, m)) for m in messages]
    results = governor.dispatch_many([_request(m) for m in messages], then=marks)
    deliveries: list[Delivery] = []
    settle: list[tuple[OutboxMessage, OutboxStatus, str]] = []
    unexpected: Exception | None = None
    for message, answer in zip(messages, results, strict=True):
        result = (
            _deliver_alone(runtime, governor, message)
            if isinstance(answer, OutsideCallInProgress)
            else answer
        )
        if isinstance(result, DispatchResult):
            deliveries.append(Delivery(message, "delivered", result, None))
        elif isinstance(result, _REFUSALS):
            error = f"{result.code} {result.message}"
            answered = not (isinstance(result, ActionFailed) and is_unanswered(result.cause))
            settle.append((message, "failed" if answered else "pending", error))
        elif unexpected is None:
            unexpected = result  # a broken store, say: raised once the others are marked
    if settle:
        deliveries += _settle(runtime, settle)
    if unexpected is not None:
        raise unexpected
    return deliveries


def _deliver_alone(
    runtime: Runtime, governor: Governor, message: OutboxMessage
) -> DispatchResult | Exception:
    """Deliver `message` as `dispatch` would, marked in its unit: when another dispatch (of
    this or a killed process) holds the claim on its event id or idempotency key, which
    dispatch_many does not wait for (OutsideCallInProgress), wait for it to commit or let go
    (a dead holder's lease to run out); the repeat then returns the stored result, or is
    evaluated anew."""
    request = _request(message)
    mark_it = partial(_mark_delivered, runtime, message, _holds_notice(runtime, message))
    try:
        work = governor._work(*request[:6], None, False)
        return governor._run_prepared(work, runtime._partition_of(request[0]), mark_it)
    except Exception as error:  # classified as dispatch_many's slots are
        return error


def _holds_notice(runtime: Runtime, message: OutboxMessage) -> bool:
    """Whether a delivery of `message` may hold a refusal notice: only an emit with `if
    refused` does, which the sender's tables say (a sender not loaded here might)."""
    sender = runtime._governors.get(message.machine)
    return sender is None or (message.target_machine, message.event) in sender._refusals


def _mark_delivered(
    runtime: Runtime, message: OutboxMessage, held: bool, txn: Transaction, chain: _Chain
) -> None:
    """In the unit of work that delivered `message`: mark it delivered, drop its notice."""
    _mark_in(runtime, txn, message, "delivered", None, held)


def _settle(
    runtime: Runtime,
    outcomes: Sequence[tuple[OutboxMessage, OutboxStatus, str]],
) -> list[Delivery]:
    """Mark deliveries that did not take effect (`mark_many`); then deliver the refusal
    notices that released."""
    deliveries = []
    for delivery, notice in mark_many(runtime, outcomes):
        deliveries.append(delivery)
        if notice is not None:
            # The sender learns of it at once; a refused notice is only marked failed.
            deliveries += _deliver_all(runtime, [notice], CHUNK_SIZE)
    return deliveries


def mark_many(
    runtime: Runtime,
    outcomes: Sequence[tuple[OutboxMessage, OutboxStatus, str]],
) -> list[tuple[Delivery, OutboxMessage | None]]:
    """Mark deliveries that did not take effect, in one commit: "failed" with the refusal,
    its notice released; "pending" (no answer) with its next retry, or "failed" as given up
    once GIVE_UP_MS have passed since its emit. Each one's Delivery, and the notice it
    released (now pending), if any."""
    now = runtime._clock.now_ms()

    def work(txn: Transaction, chain: _Chain) -> list[tuple[Delivery, OutboxMessage | None]]:
        done: list[tuple[Delivery, OutboxMessage | None]] = []
        for message, status, error in outcomes:
            if status == "pending" and now - message.created_ms < GIVE_UP_MS:
                attempts = message.attempts + 1
                retry_at = now + retry_later_ms(attempts)
                txn.retry_outbox(_id(message), attempts, retry_at, error)
                waiting = replace(message, error=error, attempts=attempts, retry_at_ms=retry_at)
                done.append((Delivery(waiting, "retrying", None, error), None))
                continue
            if status == "pending":
                error = (
                    f"{error} (no answer within {GIVE_UP_MS // 3_600_000} h of the emit, "
                    f"{message.attempts + 1} attempts: given up)"
                )
            held = _holds_notice(runtime, message)
            notice = _mark_in(runtime, txn, message, "failed", error, held)
            done.append((Delivery(message, "failed", None, error), notice))
        return done

    return runtime._submit(work, None)


def _id(message: OutboxMessage) -> int:
    message_id = message.id
    assert message_id is not None
    return message_id


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
    held = _holds_notice(runtime, message)

    def work(txn: Transaction, chain: _Chain) -> OutboxMessage | None:
        return _mark_in(runtime, txn, message, status, error, held)

    return runtime._submit(work, None)


def _mark_in(
    runtime: Runtime,
    txn: Transaction,
    message: OutboxMessage,
    status: OutboxStatus,
    error: str | None,
    held: bool,
) -> OutboxMessage | None:
    """`mark`'s writes, in `txn`: the notice released, if any. `held`: `_holds_notice`."""
    message_id = _id(message)
    txn.mark_outbox(message_id, status, error)
    if message.attempts:
        txn.forget_outbox_retry(message_id)
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
    fleet = runtime._partitioned
    if fleet is not None:
        # This worker delivers it next: leased to it like any claimed message, so no
        # other worker takes it meanwhile, and the fleet does if this one dies.
        fleet.lease_in(txn, notice.id)
    return replace(notice, body=body, status="pending")
