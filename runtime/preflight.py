"""Outside calls before the write transaction: the actions a machine's `policy` names run
after a look at what is committed (`preflight`), under a claim on the event id and
idempotency key until the commit; `dispatch_async` and `dispatch_many` take the same way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .errors import ActionFailed, InvalidTransition
from .event_inputs import DEFAULT_ACTOR, DispatchRequest
from .results import DispatchResult
from .rows import _Absent
from .store.base import ClaimKey, Transaction, WorkOutcome
from .tables import Payload
from .unit import _NO_ENTRIES, _LookAgain, _Preran, _Rejected, _settled, _UnitInputs

if TYPE_CHECKING:
    from .dispatch import Governor
    from .resilience.claims import Local, Release
    from .sealing import _Chain

T = TypeVar("T")

__all__ = [
    "claim_keys",
    "committed",
    "dispatch_async",
    "dispatch_many",
    "lets_go",
    "preflight",
    "prepare",
    "run_prepared",
]


async def dispatch_async(
    governor: Governor,
    instance_id: str,
    event: str,
    payload: Mapping[str, Any] | Payload | None = None,
    actor: str = DEFAULT_ACTOR,
    event_id: str | None = None,
    idempotency_key: str | None = None,
    expected_version: int | None = None,
    record_rejection: bool = False,
) -> DispatchResult:
    """`dispatch` for asyncio: the same checks, writes and errors. On a transactional
    store the coroutine waits, without blocking its event loop, for the commit that holds
    its unit of work; the units of every coroutine waiting meanwhile commit together, so
    many concurrent dispatchers share each fsync. On the memory store it runs at once.
    Cancelled while its outside calls run, it leaves them to the action thread making them,
    which commits their result once they end and lets go of the claim (`_record_abandoned`):
    no claim is left held, or renewed, for a caller that has gone."""
    work = governor._work(
        instance_id,
        event,
        payload,
        actor,
        event_id,
        idempotency_key,
        expected_version,
        record_rejection,
    )
    runtime = governor.runtime
    partition = runtime._partition_of(instance_id)
    if not governor._external or work.args[0][1] not in governor._external_events:
        # Nothing this event does calls the outside world (`prepare` would hand the work
        # back as it is): no claim to take, and no hand-off to the action threads for it.
        return _settled(await runtime._submit_async(work, partition))
    loop = asyncio.get_running_loop()
    pool = runtime._action_threads()
    keys = governor._claim_keys(work)
    outside = runtime._outside
    release = None
    while keys:  # claimed here, in the loop's thread: a cancelled wait leaves no claim
        release, busy = outside.try_local(keys)
        if busy is None:
            break
        await loop.run_in_executor(pool, busy.wait)
    held: Release | None = None
    committed = False
    unprepared = work
    try:
        while True:
            if keys:
                # The claim (held from the first turn on) and the outside calls in one
                # hand-off to the pool (each costs the loop 30-50 us of CPU).
                calling = pool.submit(_hold_and_prepare, governor, keys, unprepared, held)
                try:
                    held, work = await _outcome_in(loop, calling)
                except asyncio.CancelledError:
                    # Nobody waits for the calls, which go on in the pool: their thread
                    # records them (a commit of their own) and lets go of the claim once they
                    # end, with no help from this event loop, which may be closing.
                    calling.add_done_callback(partial(_abandon, pool, governor, partition, release))
                    held = release = None
                    raise
            else:
                work = await loop.run_in_executor(pool, governor._prepare, unprepared)
            try:
                if held is None:
                    done = await runtime._submit_async(work, partition)
                else:
                    queued = runtime._queue_async(work, partition)
                    try:
                        # Awaited as it is: cancelling it leaves its unit in the batch all the
                        # same (AsyncBatcher drops the outcome only).
                        done = await queued
                    except asyncio.CancelledError:
                        # Its unit is queued, and commits unless this event loop is closing
                        # before its batch: the pool commits it as well (the second of the
                        # two finds the claim let go and writes nothing) and lets go of the
                        # claim, with no help from this loop.
                        queued.add_done_callback(_retrieved)
                        _record_in_pool(pool, governor, partition, held, release, work)
                        held = release = None
                        raise
                    finally:
                        if runtime._breakers.unstored:  # as _submit_async does
                            runtime._settle_breakers()
            except _LookAgain:
                continue  # the committed state changed since the look: look again
            committed = lets_go(work)
            return _settled(done)
    finally:
        if held is None:
            if release is not None:
                release()
        elif committed:
            # Its commit let go of the claim in the store: nothing to write, so here.
            held(committed=True)
            if release is not None:
                release()
        else:
            # Let go in the pool, not in the loop's thread: the store's release waits for its
            # write lock, which a commit batch holds through its fsync, and the loop would
            # stall all that time. Nobody waits for it: the caller has its answer, another
            # process finds the result committed, and a coroutine here repeating the key
            # waits for the local claim, let go last (so it never claims the store's row as
            # the same holder just before that row is deleted).
            try:
                pool.submit(_let_go, held, release)
            except RuntimeError:  # the pool is shut down: the runtime is closing
                _let_go(held, release)


def _outcome_in(loop: asyncio.AbstractEventLoop, calling: Future[T]) -> asyncio.Future[T]:
    """`calling`'s outcome as a future of `loop`, whose cancelling leaves `calling` running:
    asyncio.shield over asyncio.wrap_future, in one future and one callback where those took
    two futures and four callbacks."""
    waiter: asyncio.Future[T] = loop.create_future()
    calling.add_done_callback(partial(_to_loop, loop, waiter))
    return waiter


def _to_loop(
    loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[T], calling: Future[T]
) -> None:
    """In the thread that ran `calling`, once it ended: hand its outcome to the loop."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, waiter, calling)


def _settle(waiter: asyncio.Future[T], calling: Future[T]) -> None:
    """In the loop: `calling`'s outcome into `waiter`, unless its coroutine has gone."""
    if waiter.cancelled():  # its coroutine was cancelled
        return
    if calling.cancelled():  # the pool was shut down before it ran
        waiter.cancel()
        return
    error = calling.exception()
    if error is None:
        waiter.set_result(calling.result())
    else:
        waiter.set_exception(error)


def _hold_and_prepare(
    governor: Governor,
    keys: tuple[ClaimKey, ...],
    work: partial[DispatchResult | _Rejected],
    held: Release | None = None,
) -> tuple[Release | None, partial[DispatchResult | _Rejected]]:
    """Claim `keys` in the store (unless `held`: claimed on an earlier look), then prepare
    `work` (its outside calls): the store's release (None if the result was committed
    already) and the prepared work. If preparing fails, the store's claim is let go here."""
    if held is None:
        held = governor.runtime._outside.hold(keys, governor._committed(work))
    try:
        return held, governor._prepare(work)
    except BaseException:
        if held is not None:
            held()
        raise


def _abandon(
    pool: Executor,
    governor: Governor,
    partition: int,
    local: Local | None,
    calling: Future[tuple[Release | None, partial[DispatchResult | _Rejected]]],
) -> None:
    """Once the outside calls of a dispatch whose caller was cancelled have ended (this runs
    in the thread that made them, or at once if they had): record them (`_record_abandoned`),
    or, if they failed, let go of the claim in this runtime (the store's was let go by
    `_hold_and_prepare`)."""
    if calling.cancelled() or calling.exception() is not None:
        if local is not None:
            local()
        return
    held, work = calling.result()
    _record_in_pool(pool, governor, partition, held, local, work)


def _record_in_pool(
    pool: Executor,
    governor: Governor,
    partition: int,
    held: Release | None,
    local: Local | None,
    work: partial[DispatchResult | _Rejected],
) -> None:
    """`_record_abandoned` in the pool, never in the event loop's thread (a commit waits)."""
    try:
        pool.submit(_record_abandoned, governor, partition, held, local, work)
    except RuntimeError:  # the pool is shut down: the runtime is closing
        _record_abandoned(governor, partition, held, local, work)


def _record_abandoned(
    governor: Governor,
    partition: int,
    held: Release | None,
    local: Local | None,
    work: partial[DispatchResult | _Rejected],
) -> None:
    """Commit the prepared unit of a dispatch whose caller was cancelled, so the outside
    calls made are recorded (a repeat of its event id then returns their result, calling
    nothing), then let go of its claim, in the store (which stops its renewal) and in this
    runtime."""
    try:
        committed = False
        try:
            governor.runtime._submit(work, partition)
            committed = lets_go(work)
        except Exception:  # refused, failed, or committed already: nothing more is stored
            pass
        finally:
            if held is not None:
                held(committed=committed)
    finally:
        if local is not None:
            local()


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Take a future's error, which nobody awaits (asyncio would log it as never retrieved)."""
    if not future.cancelled():
        future.exception()


def _let_go(held: Release, local: Local | None) -> None:
    """Release a claim in the store, then in this runtime."""
    try:
        held()
    finally:
        if local is not None:
            local()


def dispatch_many(
    governor: Governor,
    requests: Sequence[DispatchRequest],
    *,
    then: Sequence[Callable[[Transaction, _Chain], object]] | None = None,
) -> list[DispatchResult | Exception]:
    """Dispatch every request, in order, in one commit where the store batches commits
    (SQLite: one transaction for up to `max_batch` units); each request succeeds or fails
    on its own, as `dispatch` would, and its slot holds the result or the error. `then[i]`
    runs after request i's unit of work, in its transaction, unless the unit refused the
    event (the outbox marks a delivery delivered so, runtime/outbox.py)."""
    results: list[DispatchResult | Exception | None] = [None] * len(requests)
    works: list[partial[DispatchResult | _Rejected]] = []
    slots: list[int] = []
    # The claims this batch holds: a request repeating one of them is not prepared (its
    # unit finds the earlier one's result in the batch); one held elsewhere is refused.
    claimed: dict[ClaimKey, int] = {}  # -> the index of the request that claimed it
    releases: dict[int, Release] = {}  # by the index of the request that holds it
    done: list[WorkOutcome[DispatchResult | _Rejected]] = []
    # By position in `works`: the work as it was before its look, and, for a repeat of an
    # earlier request of the batch, that request's position.
    unprepared: list[partial[DispatchResult | _Rejected]] = []
    repeats: dict[int, int] = {}
    try:
        for index, r in enumerate(requests):
            try:
                work = governor._work(
                    r.instance_id,
                    r.event,
                    r.payload,
                    r.actor,
                    r.event_id,
                    r.idempotency_key,
                    r.expected_version,
                    False,
                )
                keys = governor._claim_keys(work)
                earlier = next((claimed[k] for k in keys if k in claimed), None)
                if earlier is not None:
                    failed = results[earlier]
                    if isinstance(failed, Exception):  # its outside call failed: not again
                        raise failed
                    repeats[len(works)] = slots.index(earlier)
                    works.append(work)
                    unprepared.append(work)
                    slots.append(index)
                    continue
                if keys:
                    release = governor.runtime._outside.claim(
                        keys, governor._committed(work), wait=False
                    )
                    if release is not None:
                        releases[index] = release
                        claimed.update(dict.fromkeys(keys, index))
                # A failed call's breaker change goes in the batch (not alone).
                works.append(governor._prepare(work, alone=False))
                unprepared.append(work)
                slots.append(index)
            except Exception as error:  # invalid payload or event, a call failed or busy
                results[index] = error
        partition_of = governor.runtime._partition_of
        partitions = [partition_of(requests[index].instance_id) for index in slots]
        units = (
            works
            if then is None
            else [partial(_followed, w, then[i]) for w, i in zip(works, slots, strict=True)]
        )
        done = governor.runtime._submit_many(units, partitions)
        for at, outcome in enumerate(done):
            if type(outcome.error) is _LookAgain:
                done[at] = _looked_again(
                    governor,
                    works,
                    unprepared,
                    repeats,
                    done,
                    at,
                    partitions[at],
                    None if then is None else then[slots[at]],
                )
    finally:
        # A claim whose unit committed went with it (claimed_step): nothing left to write.
        committed = {
            index
            for index, work, outcome in zip(slots, works, done, strict=False)
            if outcome.error is None and lets_go(work)
        }
        for index, release in releases.items():
            release(committed=index in committed)
    for index, outcome in zip(slots, done, strict=True):
        value, failure = outcome.value, outcome.error
        if failure is not None and not isinstance(failure, Exception):
            raise failure  # KeyboardInterrupt and the like stop the whole batch
        if failure is not None:
            results[index] = failure
        elif type(value) is _Rejected:
            results[index] = value.error
        else:
            results[index] = cast(DispatchResult, value)
    return cast(list[DispatchResult | Exception], results)


def _looked_again(
    governor: Governor,
    works: list[partial[DispatchResult | _Rejected]],
    unprepared: Sequence[partial[DispatchResult | _Rejected]],
    repeats: Mapping[int, int],
    done: Sequence[WorkOutcome[DispatchResult | _Rejected]],
    at: int,
    partition: int,
    then: Callable[[Transaction, _Chain], object] | None,
) -> WorkOutcome[DispatchResult | _Rejected]:
    """The outcome of `dispatch_many`'s request at `at` (in `works`), whose unit found the
    committed state changed since its look (nothing stored, nothing called): looked at again
    and committed alone, under the claim the batch holds. A repeat of an earlier request is
    not prepared: it finds that one's result, or takes its error (nothing called twice)."""
    earlier = repeats.get(at)
    while True:
        try:
            unit = unprepared[at] if earlier is not None else governor._prepare(unprepared[at])
        except Exception as error:  # its call failed: as in the batch, the slot's error
            return WorkOutcome(None, error)
        works[at] = unit
        work = unit if then is None else partial(_followed, unit, then)
        [outcome] = governor.runtime._submit_many([work], [partition])
        if type(outcome.error) is not _LookAgain:
            return outcome
        if earlier is not None:  # that one stored nothing
            return WorkOutcome(None, done[earlier].error or outcome.error)


def claim_keys(
    governor: Governor, work: partial[DispatchResult | _Rejected]
) -> tuple[ClaimKey, ...]:
    """What `work` claims while its outside actions run and its unit commits: its event id
    and idempotency key, if its event may run such actions (see OutsideClaims)."""
    args: _UnitInputs = work.args[0]
    if args[1] not in governor._external_events:
        return ()
    name = governor.name
    event_id, key = args[5], args[6]
    keys: tuple[ClaimKey, ...] = ()
    if event_id is not None:
        keys += ((name, "event", event_id),)
    if key is not None:
        keys += ((name, "key", key),)
    return keys


def committed(governor: Governor, work: partial[DispatchResult | _Rejected]) -> Callable[[], bool]:
    """Whether the result of `work`'s event id or idempotency key is committed."""
    args: _UnitInputs = work.args[0]
    event_id, key = args[5], args[6]
    store, name = governor.runtime._store, governor.name

    def committed() -> bool:
        return (event_id is not None and store.processed(name, event_id) is not None) or (
            key is not None and store.idempotency(name, key) is not None
        )

    return committed


def run_prepared(
    governor: Governor,
    work: partial[DispatchResult | _Rejected],
    partition: int,
    then: Callable[[Transaction, _Chain], object] | None = None,
) -> DispatchResult:
    """Dispatch `work` with its outside actions run before its transaction, holding the
    claim on its event id and idempotency key from before they run until the commit: a
    concurrent dispatch of the same id or key, in this process or another, waits, then
    calls nothing (runtime/resilience/claims.py). `then` runs after the unit of work, in
    its transaction, unless the unit refused the event (a fanout's late reply, fanin.py)."""
    keys = governor._claim_keys(work)
    release = governor.runtime._outside.claim(keys, governor._committed(work)) if keys else None
    committed = False
    try:
        while True:
            unit = governor._prepare(work)
            lets = lets_go(unit)
            if then is not None:
                unit = partial(_followed, unit, then)
            try:
                done = governor.runtime._submit(unit, partition)
            except _LookAgain:
                continue  # the committed state changed since the look: look again
            committed = lets
            return _settled(done)
    finally:
        if release is not None:
            release(committed=committed)


def _followed(
    unit: Callable[[Transaction, _Chain], DispatchResult | _Rejected],
    then: Callable[[Transaction, _Chain], object],
    txn: Transaction,
    chain: _Chain,
) -> DispatchResult | _Rejected:
    outcome = unit(txn, chain)
    if type(outcome) is not _Rejected:
        then(txn, chain)
    return outcome


def prepare(
    governor: Governor, work: partial[DispatchResult | _Rejected], *, alone: bool = True
) -> partial[DispatchResult | _Rejected]:
    """`work` (from `_work`) with this machine's outside actions already run, outside any
    transaction, when the committed state says the unit will take a row that has some;
    else `work` itself. Raises ActionFailed (nothing stored) when one of them fails; the
    breaker changes of its calls are then written at once (`alone`), else left to the
    caller's next commit (dispatch_many: its batch, before it returns)."""
    inputs: _UnitInputs = work.args[0]
    if inputs[1] not in governor._external_events:
        return work
    runtime = governor.runtime
    try:
        preran = governor._preflight(*inputs[:-1])
    except BaseException:
        # Nothing of the dispatch is stored: the breaker statuses its calls changed are
        # written on their own (or with a unit that took them), before the caller hears
        # of the failure. Otherwise the unit of work writes them in its transaction.
        if alone:
            runtime._settle_breakers()
        raise
    if runtime._partitioned is not None and runtime._breakers.pending:
        # A breaker whose entries go to another ledger chain than the dispatch's: stored
        # before the dispatch commits, so no committed dispatch lacks its breaker change.
        runtime._record_breaker_moves(keep=runtime._partition_of(inputs[0]))
    if preran is None:
        return work
    keys = governor._claim_keys(work)
    if keys:  # the calls ran under a claim: the unit first checks it still holds it
        return partial(claimed_step, governor, keys, (*inputs[:-1], preran))
    return partial(governor._step, (*inputs[:-1], preran))


def claimed_step(
    governor: Governor,
    keys: tuple[ClaimKey, ...],
    inputs: _UnitInputs,
    txn: Transaction,
    chain: _Chain,
) -> DispatchResult | _Rejected:
    """`_step`, refused (OutsideClaimLost, nothing written) if the claim under which its
    outside actions ran was taken over meanwhile (runtime/resilience/claims.py)."""
    preran = inputs[-1]
    assert preran is not None
    outside = governor.runtime._outside
    outside.check(txn, keys, preran.results)
    done = governor._step(inputs, txn, chain)
    # The claim goes with this commit: no write of its own to let go (see lets_go).
    outside.let_go(txn, keys)
    return done


def lets_go(unit: object) -> bool:
    """Whether `unit` (a prepared dispatch) lets go of its claim in its own transaction
    (`claimed_step`): once it committed, its release has nothing left to do in the store."""
    return type(unit) is partial and unit.func is claimed_step


def preflight(
    governor: Governor,
    instance_id: str,
    event: str,
    payload: Payload | None,
    digest: bytes,
    actor: str,
    event_id: str | None,
    idempotency_key: str | None,
    request: bytes | None,
    expected_version: int | None,
    record_rejection: bool,
) -> _Preran | None:
    """Decide on the committed state, as `_step` will, and run the row's outside actions.
    None when the unit will not need them (a repeat, a rejection, no such actions): the
    unit then decides and raises as usual."""
    name = governor.name
    store = governor.runtime._store
    if event_id is not None and idempotency_key is None:
        # The look and the instance in one read (the instance checked on a miss only).
        stored, record = store.get_processed_and_instance(name, event_id, instance_id)
        if stored is not None:
            return None
    else:
        if event_id is not None and store.processed(name, event_id) is not None:
            return None
        if idempotency_key is not None and store.idempotency(name, idempotency_key) is not None:
            return None
        record = store.get_instance(name, instance_id)
    if record is None or expected_version not in (None, record.version):
        return None
    found = governor._table.get(record.state, _NO_ENTRIES).get(event)
    if found is None or type(found) is _Absent:
        return None
    now = governor.runtime._clock.now_ms()
    try:
        row = governor._decide(found, record, payload, actor, now)
    except (InvalidTransition, ActionFailed):
        return None
    outside = tuple((a, f) for a, f in row.actions if a in governor._external)
    if not outside:
        return None
    results = governor._run_actions(
        outside,
        row.event,
        row.target,
        record,
        payload,
        actor,
        now,
        None,
        None,
        event_id,
        idempotency_key,
    )
    return _Preran(record.version, row, results)
