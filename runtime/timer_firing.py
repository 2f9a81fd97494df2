"""Firing due timers: each firing is one unit of work that moves or stays, notifies and emits.

A timer's own actions that a policy names (outside calls, such as a retry ladder's
`retry_charge`) run before the firing's transaction, on the committed state, as dispatch runs
them (runtime/dispatch.py): their retries wait without the write lock, and the unit takes
their results whenever the timer is still armed and its state holds, even if the instance
moved meanwhile: a call is never made twice for one firing. A timer fired or cancelled
between its preflight and its transaction (the payment arrived meanwhile) records nothing of
the call it made. A preflight that fails leaves the timer armed and due, as a failed firing does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from .errors import ActionFailed, OutsideCallInProgress, StoreIntegrityError
from .instance_data import read_data, route
from .ledger import EntryData, payload_digest
from .notice_deadlines import escalate_notices, next_notice_deadline
from .outbox import _event_row, _notification_row, _refusal_notices
from .replay import save_snapshot
from .resilience.backoff import noted_attempt, retry_later_ms
from .resilience.errors import is_unanswered
from .results import (
    DispatchResult,
    EmittedEvent,
    Notification,
    TimerFiring,
    derive_event_id,
    derive_ids_from,
    event_id_prefix,
)
from .sealing import _Chain
from .store.base import ClaimKey, Transaction, WorkOutcome
from .tables import TimerSpec
from .timers import ArmedTimer, arm_timers

if TYPE_CHECKING:
    from .dispatch import Governor
    from .resilience.claims import Release
    from .runtime import Runtime


# The results of a timer's outside actions, run before the firing on the instance's version.
_Preran = tuple[int, Mapping[str, object]]


class _Failed(NamedTuple):
    """A firing whose action failed, made as the move of another timer of its machine (`instead`:
    the ladder attempt's timeout), entering its target at `entered_ms`; `why` goes on the
    ledger entry."""

    instead: TimerSpec
    entered_ms: int
    why: Mapping[str, object]


class TimerRetry(NamedTuple):
    """A firing whose action failed, left armed: due again at `retry_at_ms`."""

    timer: ArmedTimer
    attempts: int
    retry_at_ms: int
    failure: ActionFailed


def _attempt_timeout(governor: Governor, spec: TimerSpec) -> tuple[int, TimerSpec] | None:
    """For a retry ladder step's timer (or a repeat of its attempt) whose step has an attempt
    state: the attempt's timeout in ms and the timer that ends the attempt when it runs out."""
    if spec.kind != "retry_step" or spec.ladder is None:
        return None
    ladder = governor.spec.retries.get(spec.ladder)
    step = None if ladder is None else next((s for s in ladder.steps if s.step == spec.step), None)
    if step is None or step.timeout_ms is None or step.timeout_timer_id is None:
        return None
    timeout = governor._timer_specs.get(step.timeout_timer_id)
    return None if timeout is None else (step.timeout_ms, timeout)


def _error_of(failure: ActionFailed) -> str:
    return f"{type(failure.cause).__name__}: {failure.cause}"


def _after_failure(
    governor: Governor, timer: ArmedTimer, failure: ActionFailed, now: int
) -> Callable[[Transaction, _Chain], TimerFiring | TimerRetry | None]:
    """What a firing whose action failed does instead, as one unit of work.

    A retry ladder's attempt whose call was refused (a declined card: any failure but an
    unanswered one, `is_unanswered`) fails as its answer would: the instance moves as the
    attempt's timeout moves it (Retry1 -> Retry2, or on to the ladder's end), the ledger entry
    saying which action failed and why. An unanswered call (transient, unreachable, breaker
    open, bulkhead full) is tried again after the jitter backoff of the timer's failed
    firings (`retry_later_ms`), until the attempt's timeout: from then on it counts as
    timed out, and the ladder moves on. Any other timer whose action fails is tried again
    after the same backoff, for as long as it fails; its "rejection" entries (no change of
    state) record attempts 1, 2, 4, ... NOTE_EVERY, then every NOTE_EVERY-th, and each change
    of error. A retry keeps the firing's event id (and so its idempotency key)."""
    runtime = governor.runtime
    cause = failure.cause

    def work(txn: Transaction, chain: _Chain) -> TimerFiring | TimerRetry | None:
        spec = governor._timer_specs.get(timer.timer_id)
        record = txn.instance(governor.name, timer.instance)
        if (
            spec is None
            or record is None
            or not txn.timer_armed(timer)
            or not governor._plan.holds(spec, record.state)
        ):
            return None  # moved or fired meanwhile: the next firing settles it
        before = txn.timer_retry(timer)
        attempts = 1 if before is None else before[0] + 1
        why: dict[str, object] = {
            "action": failure.action,
            "error": _error_of(failure),
            "attempts": attempts,
        }
        unanswered = is_unanswered(cause)
        attempt = _attempt_timeout(governor, spec)
        retry_at = now + retry_later_ms(attempts)
        if attempt is not None:
            timeout_ms, ends = attempt
            give_up = timer.due_ms + timeout_ms
            if not unanswered or retry_at >= give_up:
                # Refused: the failure's move, now. Unanswered with no try left before the
                # attempt's timeout: the timeout's move, entering the next step when it runs out.
                counts = {"counts_as": "timeout" if unanswered else "failure"}
                entered = give_up if unanswered else min(now, give_up)
                failed = _Failed(ends, entered, {**why, **counts})
                try:
                    return fire_work(governor, timer, now, None, failed)(txn, chain)
                except ActionFailed as refused:  # raised before any write: retried below
                    why = {**why, "action": refused.action, "error": _error_of(refused)}
        text = str(why["error"])
        txn.retry_timer(timer, attempts, retry_at, text)
        if runtime._sealer is not None and (
            before is None or before[1] != text or noted_attempt(attempts)
        ):
            body = {"timer": spec.id, "due_ms": timer.due_ms, **why, "retry_at": retry_at}
            data = EntryData(
                now,
                "rejection",
                governor.name,
                timer.instance,
                record.state,
                record.state,
                spec.id,
                runtime._timer_actor,
                "",
                payload_digest(body),
            )
            entry = chain.seal(txn, data)
            txn.append_ledger(entry)
            chain.advance(entry)
        return TimerRetry(timer, attempts, retry_at, failure)

    return work


def preflight(governor: Governor, timer: ArmedTimer, now: int) -> _Preran | None:
    """Run the timer's outside actions on the committed state, outside any transaction; None
    when it has none, or when the firing will find nothing to do. Raises ActionFailed."""
    spec = governor._timer_specs.get(timer.timer_id)
    if spec is None or not governor._external:
        return None
    outside = tuple((a, f) for a, f in governor._timer_actions[spec.id] if a in governor._external)
    if not outside:
        return None
    runtime = governor.runtime
    store = runtime._store
    record = store.get_instance(governor.name, timer.instance)
    if record is None or not governor._plan.holds(spec, record.state):
        return None
    if timer not in store.armed_timers(governor.name, timer.instance):
        return None  # fired or cancelled meanwhile
    target = None if spec.target is None else str(spec.target)
    actor = runtime._timer_actor
    key = firing_id(timer)
    results = governor._run_actions(
        outside, spec.id, target, record, None, actor, now, spec.id, None, key, key
    )
    return record.version, results


def firing_id(timer: ArmedTimer) -> str:
    """The event id of this arming's firing: its ledger entry's, and the key its actions get
    (`TransitionContext.event_id` and `.idempotency_key`) for their outside calls. The same
    at every attempt of the firing (a preflight that failed, a process killed before the
    commit, another runtime taking it over); the next arming of the timer is another one."""
    return derive_event_id(
        "timer", timer.machine, timer.instance, timer.timer_id, timer.armed_version
    )


def _calls_outside(governor: Governor, timer: ArmedTimer) -> bool:
    """Whether the timer runs some of its machine's policy actions (outside calls)."""
    spec = governor._timer_specs.get(timer.timer_id)
    external = governor._external
    return spec is not None and bool(external) and not external.isdisjoint(spec.actions)


def _firing_key(timer: ArmedTimer) -> ClaimKey:
    return (timer.machine, "timer", f"{timer.instance}/{timer.timer_id}/{timer.armed_version}")


def _claim_firing(runtime: Runtime, timer: ArmedTimer) -> Release | None:
    """Claim this arming of the timer without waiting: the release, None if it fired
    meanwhile; OutsideCallInProgress if another runtime is firing it."""
    store = runtime._store

    def fired() -> bool:
        return timer not in store.armed_timers(timer.machine, timer.instance)

    return runtime._outside.claim((_firing_key(timer),), fired, wait=False)


def _claim_checked(
    runtime: Runtime,
    timer: ArmedTimer,
    preran: _Preran,
    work: Callable[[Transaction, _Chain], TimerFiring | None],
) -> Callable[[Transaction, _Chain], TimerFiring | None]:
    """`work`, refused (OutsideClaimLost) if the firing's claim, under which its outside
    actions ran, was taken over meanwhile (runtime/resilience/claims.py)."""
    keys = (_firing_key(timer),)
    outside = runtime._outside

    def checked(txn: Transaction, chain: _Chain) -> TimerFiring | None:
        outside.check(txn, keys, preran[1])
        fired = work(txn, chain)
        outside.let_go(txn, keys)  # the claim goes with this commit
        return fired

    return checked


def fire_work(
    governor: Governor,
    timer: ArmedTimer,
    now: int,
    preran: _Preran | None = None,
    failed: _Failed | None = None,
) -> Callable[[Transaction, _Chain], TimerFiring | None]:
    """The firing of `timer`, or with `failed`, the move its failed action makes instead
    (a ladder attempt's failure edge, `_after_failure`)."""
    name = governor.name
    runtime = governor.runtime

    def work(txn: Transaction, chain: _Chain) -> TimerFiring | None:
        if not txn.timer_armed(timer):
            return None  # fired by someone else, or cancelled since it was listed
        record = txn.instance(name, timer.instance)
        spec = governor._timer_specs.get(timer.timer_id)
        if record is not None and timer.armed_version > record.version:
            # Armed by a move the instance (its row sealed) has not made: not this runtime's.
            raise StoreIntegrityError(
                f"{name} '{timer.instance}' is at version {record.version}, yet its timer "
                f"{timer.timer_id} names version {timer.armed_version} as its arming",
                hint="the store was changed outside autonomic: run `autonomic audit verify`",
            )
        if record is None or spec is None or not governor._plan.holds(spec, record.state):
            txn.take_timer(timer)  # a timer of a state already left (or an older machine)
            return None
        # A failed ladder attempt moves as its attempt's timeout would (its target, actions,
        # emits), from the step's own state, at the time the failure counts.
        moves = spec if failed is None else failed.instead
        entered = timer.due_ms if failed is None else failed.entered_ms
        target = moves.target
        to_state = record.state if target is None else str(target)
        kind = "escalation" if spec.kind.startswith("escalation") else "timer"
        key = firing_id(timer)
        results = governor._run_actions(
            governor._timer_actions[moves.id],
            moves.id,
            None if target is None else to_state,
            record,
            None,
            runtime._timer_actor,
            now,
            moves.id,
            # Still armed, its state still holding: the firing is decided as its preflight
            # was, even if the instance moved meanwhile, so the calls made are not repeated.
            None if preran is None else preran[1],
            key,
            key,
        )
        emits = governor._timer_emits[moves.id]
        if target is not None:
            # The target's entry actions run in this firing's transaction, after its own.
            for entering in governor._plan.on_entry(to_state):
                results = {
                    **results,
                    **governor._run_actions(
                        governor._timer_actions[entering.id],
                        spec.id,
                        to_state,
                        record,
                        None,
                        runtime._timer_actor,
                        now,
                        spec.id,
                        None,
                        key,
                        key,
                    ),
                }
                emits += governor._timer_emits[entering.id]
        version = record.version + 1
        armed: tuple[ArmedTimer, ...] = ()
        keep: frozenset[str] = frozenset()
        cancels = False
        if target is not None:
            # Entered at the due time: a ladder missed while down keeps its spacing.
            arms, keep, cancels = governor._plan.on_move(record.state, to_state)
            armed = arm_timers(
                name, timer.instance, arms, entered, version, None, governor._settings
            )
        notifications: tuple[Notification, ...] = ()
        deadline = None
        if moves.notify is not None:
            notify = moves.notify
            # Counted from the notice's due time: a late firing keeps its schedule.
            deadline = None if notify.within_ms is None else timer.due_ms + notify.within_ms
            notifications = (
                Notification(
                    name,
                    timer.instance,
                    record.state,
                    spec.ladder,
                    spec.step,
                    notify.kind,
                    notify.recipient,
                    notify.message,
                    now,
                    deadline,
                    derive_event_id("notify", name, timer.instance, version),
                ),
            )
        # An emit routed by (or with arguments from) kept data reads it here: a timer has no
        # payload of its own.
        kept = (
            read_data(txn, name, timer.instance, runtime._kept, chain.partition)
            if any(e.to or e.reads for e in emits)
            else None
        )
        ids = derive_ids_from(
            event_id_prefix(timer.instance, version, after=governor._emit_ids), len(emits)
        )
        emitted = tuple(
            EmittedEvent(
                emit.machine,
                timer.instance if emit.to is None else route(kept, emit.to, name, timer.instance),
                emit.event,
                emitted_id,
            )
            for emit, emitted_id in zip(emits, ids, strict=True)
        )
        # A timer has no causing payload: its emits' arguments are literals, context and data.
        actor = runtime._timer_actor
        bodies = [emit.body(None, timer.instance, actor, spec.id, kept) for emit in emits]
        entry = None
        if runtime._sealer is not None:
            body: dict[str, object] = {
                "timer": spec.id,
                "due_ms": timer.due_ms,
                "notify": [n._asdict() for n in notifications],
            }
            if failed is not None:
                body["failed"] = failed.why
            data = EntryData(
                now,
                kind,
                name,
                timer.instance,
                record.state,
                to_state,
                spec.id,
                runtime._timer_actor,
                key,
                payload_digest(body),
            )
            entry = chain.seal(txn, data)
        result = DispatchResult(
            name,
            timer.instance,
            spec.id,
            record.state,
            to_state,
            version,
            None if entry is None else entry.seq,
            key,
            emitted,
            notifications,
            results,
            armed,
        )
        if not txn.take_timer(timer):
            raise StoreIntegrityError(f"timer {timer.timer_id} vanished inside a transaction")
        if spec.actions:  # one whose firing failed before kept its retry beside it
            txn.forget_timer_retry(timer)
        txn.update_instance(name, timer.instance, to_state, version, version - 1)
        if target is not None:
            if cancels:
                if keep:
                    txn.cancel_timers(name, timer.instance, keep)
                else:
                    txn.cancel_timers(name, timer.instance)
                if governor._notices is not None:
                    governor._notices.clear(txn, timer.instance, record.state, to_state)
            if armed:
                txn.arm_timers(armed)
        messages = [_notification_row(n, version) for n in notifications]
        if deadline is not None and governor._notices is not None:
            # The notice's deadline starts with it (runtime/notice_deadlines.py).
            txn.save_deadline(governor._notices.record(spec, timer.instance, deadline))
        messages += [
            _event_row(name, timer.instance, version, e, now, body)
            for e, body in zip(emitted, bodies, strict=True)
        ]
        messages += _refusal_notices(
            name, timer.instance, version, emitted, emits, None, actor, spec.id, now, kept
        )
        if messages:
            txn.add_outbox_rows(messages)
        if entry is not None:
            txn.append_ledger(entry)
            if version % runtime._snapshot_every == 0:
                kept_seq = governor._kept_seq(txn, timer.instance)
                save_snapshot(txn, name, timer.instance, version, to_state, entry, kept_seq)
            chain.advance(entry)
        return TimerFiring(timer, kind, result)

    return work


def _in_time_order(due: list[ArmedTimer], runtime: Runtime) -> list[ArmedTimer]:
    """`due` with only the earliest timer of each instance whose machine has notices with a
    deadline: a notice one firing sends may fall due before that instance's next timer,
    which fires in a later round, after the deadline has been looked at."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for timer in due:
        if runtime._governors[timer.machine]._notices is not None:
            key = (timer.machine, timer.instance)
            if key in seen:
                continue
            seen.add(key)
        kept.append(timer)
    return kept


def fire_due(runtime: Runtime, now: int | None = None, *, limit: int = 1000) -> list[TimerFiring]:
    """Fire every timer due at `now` (default: the clock), earliest first, each exactly
    once; timers armed by these firings that are already due fire too. The notices' missed
    deadlines (runtime/notice_deadlines.py) escalate in time order among them: a deadline
    due before a timer escalates before that timer fires, however late this call comes, so a
    worker that runs once a day escalates what one that runs every second does."""
    instant = runtime._clock.now_ms() if now is None else now
    machines = sorted(runtime._governors)
    fired: list[TimerFiring] = []
    failed: list[BaseException] = []
    after: list[tuple[ArmedTimer, ActionFailed]] = []  # firings whose action failed
    retried: list[TimerRetry] = []
    skip: set[ArmedTimer] = set()  # not fired by this call: failed, or another's to fire
    gave_up: set[ArmedTimer] = set()  # of those, the ones whose firing failed here
    fleet = runtime._partitioned
    for _ in range(10_000):
        # Only the timers due up to the earliest missed notice deadline, that instant included
        # (a move at the deadline meets it); the deadline escalates before any later timer,
        # whose move would delete it as met.
        notice = next_notice_deadline(runtime)
        missed = notice is not None and notice <= instant
        until = notice if missed and notice is not None else instant
        if fleet is None:
            due = runtime._store.due_timers(until, machines, limit + len(skip))
        else:
            # Leased to this worker: others skip them until they fire or the lease runs out.
            due = fleet.claim_due_timers(until, machines, limit + len(skip))
        due = _in_time_order([t for t in due if t not in skip][:limit], runtime)
        if not due:
            if not missed or notice is None:
                break
            # Every deadline due before the next timer, in one unit of work. A timer due
            # before the deadline that this call did not fire is another worker's (leased to
            # it, or its outside calls claimed): it fires first, and its move may meet the
            # deadline, so the deadline waits for it (the next call escalates it, after that
            # firing). Escalating up to the deadline regardless escalated, on PostgreSQL, a
            # deadline another worker's firing was about to meet. Only a timer whose firing
            # failed here does not hold deadlines back.
            listed = runtime._store.due_timers(instant, machines, len(gave_up) + 1)
            following = [t for t in listed if t not in gave_up][:1]
            due_by = min([instant, *(t.due_ms - 1 for t in following)])
            if due_by < notice:
                break
            if (
                not escalate_notices(runtime, instant, due_by)
                and next_notice_deadline(runtime) == notice
            ):
                break  # none of them is this runtime's to escalate or delete
            continue
        works = []
        ready = []
        letting_go: set[ArmedTimer] = set()  # the firings whose units let go of their claim
        releases: dict[ArmedTimer, Release] = {}
        for timer in due:
            governor = runtime._governors[timer.machine]
            release = None
            try:
                if fleet is None and _calls_outside(governor, timer):
                    # Another process on the file may be firing it now: its outside calls are
                    # claimed like a dispatch's (runtime/resilience/claims.py); a timer held
                    # elsewhere is left to its holder.
                    release = _claim_firing(runtime, timer)
                    if release is not None:
                        releases[timer] = release
                preran = preflight(governor, timer, instant)
            except OutsideCallInProgress:
                skip.add(timer)
                continue
            except ActionFailed as error:  # an outside action failed: settled below
                after.append((timer, error))
                skip.add(timer)
                gave_up.add(timer)
                continue
            except Exception as error:  # anything else leaves the timer due
                failed.append(error)
                skip.add(timer)
                gave_up.add(timer)
                continue
            work = fire_work(governor, timer, instant, preran)
            if release is not None and preran is not None:
                work = _claim_checked(runtime, timer, preran, work)
                letting_go.add(timer)
            works.append(work)
            ready.append(timer)
        if fleet is not None and runtime._breakers.pending:
            # Stored before the firings commit: on a partitioned store a breaker's entries
            # may go to another chain than a firing's (see Governor._prepare).
            runtime._record_breaker_moves()
        partitions = [runtime._partition_of(t.instance) for t in ready]
        outcomes: list[WorkOutcome[TimerFiring | None]] = []
        try:
            outcomes = runtime._submit_many(works, partitions)
        finally:
            # A checked firing that committed let go of its claim in its transaction.
            committed = {
                timer
                for timer, outcome in zip(ready, outcomes, strict=False)
                if outcome.error is None and timer in letting_go
            }
            for timer, release in releases.items():
                release(committed=timer in committed)
        for timer, outcome in zip(ready, outcomes, strict=True):
            if isinstance(outcome.error, ActionFailed):
                after.append((timer, outcome.error))
                skip.add(timer)
                gave_up.add(timer)
            elif outcome.error is not None:
                # The timer stays armed and due: the next call tries it again.
                failed.append(outcome.error)
                skip.add(timer)
                gave_up.add(timer)
            elif outcome.value is not None:
                fired.append(outcome.value)
        _settle_failures(runtime, after, instant, fired, retried, failed)
        after.clear()
    runtime._settle_breakers()  # changed by a preflight whose firing did not run
    if failed:
        raise failed[0]
    if retried:
        raise _retry_report(retried, instant)
    return fired


def _settle_failures(
    runtime: Runtime,
    after: list[tuple[ArmedTimer, ActionFailed]],
    now: int,
    fired: list[TimerFiring],
    retried: list[TimerRetry],
    failed: list[BaseException],
) -> None:
    """Each firing whose action failed, settled in a unit of its own (`_after_failure`): the
    ladder moves on, or the timer waits for its retry; a unit that fails leaves it due."""
    if not after:
        return
    # The backoff counts from the failure, which a policy's own retries may have delayed.
    now = max(now, runtime._clock.now_ms())
    works = [_after_failure(runtime._governors[t.machine], t, e, now) for t, e in after]
    partitions = [runtime._partition_of(t.instance) for t, _ in after]
    for outcome in runtime._submit_many(works, partitions):
        if outcome.error is not None:
            failed.append(outcome.error)
        elif isinstance(outcome.value, TimerRetry):
            retried.append(outcome.value)
        elif outcome.value is not None:
            fired.append(outcome.value)


def _retry_report(retried: list[TimerRetry], now: int) -> ActionFailed:
    """The first retried firing's failure, saying when it is tried again (raised once every
    other timer has fired, as a failed firing always was)."""
    first = retried[0]
    failure = first.failure
    timer = first.timer
    report = ActionFailed(failure.machine, failure.action, failure.cause, role=failure.role)
    more = f"; {len(retried) - 1} more timers' firings failed too" if len(retried) > 1 else ""
    tries = "1 failed firing" if first.attempts == 1 else f"{first.attempts} failed firings"
    report.hint = (
        f"timer {timer.timer_id} of {timer.machine} '{timer.instance}' stays armed: its "
        f"firing is tried again in {first.retry_at_ms - now} ms (jitter backoff after "
        f"{tries}){more}"
    )
    return report


def next_deadline(runtime: Runtime) -> int | None:
    """The earliest armed timer or notice deadline of a loaded governor, or None."""
    timers = [t for t in runtime._store.armed_timers() if t.machine in runtime._governors]
    # A timer whose firing failed is due again at its retry time (`_after_failure`).
    retries = runtime._store.timer_retries() if timers else {}
    due = min((max(t.due_ms, retries.get(t.arming(), 0)) for t in timers), default=None)
    notice = next_notice_deadline(runtime)
    return notice if due is None else due if notice is None else min(due, notice)
