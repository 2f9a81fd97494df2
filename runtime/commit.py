"""Commit batching: concurrent callers' units of work share one transaction per round."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

from .store.base import WorkOutcome

__all__ = ["AsyncBatcher", "GroupCommit"]

W = TypeVar("W")


class _Caller:
    """One `submit_many` call: how many of its units are still to commit, and the lock its
    thread sleeps on until they are, or until it is handed the lead."""

    __slots__ = ("lead", "left", "wake")

    def __init__(self, units: int) -> None:
        self.left = units
        self.lead = False
        self.wake = threading.Lock()
        self.wake.acquire()  # held until someone wakes this caller


class _Pending(Generic[W]):
    __slots__ = ("caller", "outcome", "work")

    def __init__(self, work: W, caller: _Caller) -> None:
        self.work = work
        self.caller = caller
        self.outcome: WorkOutcome[Any] = WorkOutcome(None, None)


class GroupCommit(Generic[W]):
    """Batches units of work from concurrent threads into one transaction per round.

    No committer thread: callers queue their work; one of them at a time leads, taking
    everything queued so far (its own work and that of threads that arrived while the
    previous batch was committing, at most `max_batch`) and running it through `run_batch`
    as one transaction. When the batch is committed, the leader wakes the callers whose work
    is all done; when its own is done too, it hands the lead to the caller of the oldest
    queued unit, or, with nothing queued, gives it up. A single caller commits alone with no
    hand-off; under load a batch grows to the number of waiting threads. Every caller returns
    only after the commit of the batch that held its work.

    Each caller sleeps on a lock of its own, and only the callers concerned are woken: a
    condition variable woke every waiting thread after each batch, and under the GIL their
    wake-ups delayed the next batch by as much as its statements took.
    """

    def __init__(
        self,
        run_batch: Callable[[list[W]], list[WorkOutcome[Any]]],
        *,
        max_batch: int = 512,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queue: list[_Pending[W]] = []
        self._mutex = threading.Lock()
        self._leading = False
        self.batches = 0
        self.committed_units = 0

    def submit(self, work: W) -> Any:
        """Run one unit; return its value or raise its error, after its batch committed."""
        with self._mutex:
            alone = not self._leading  # then nothing is queued either
            self._leading = True
        if alone:
            # Nobody to batch with: commit it at once, without queueing it (a lone thread's
            # dispatch, the common case, skips the caller's wake lock and the queue).
            try:
                outcome = self._outcomes([work])[0]
            finally:
                with self._mutex:
                    self._hand_over()
        else:
            outcome = self.submit_many([work])[0]
        if outcome.error is not None:
            raise outcome.error
        return outcome.value

    def submit_many(self, works: Sequence[W]) -> list[WorkOutcome[Any]]:
        """Run units in order (in as few batches as the queue allows); their outcomes."""
        if not works:
            return []
        with self._mutex:
            alone = not self._leading and len(works) <= self._max_batch
            if alone:
                self._leading = True  # then nothing is queued either
        if alone:
            # As in `submit`: nobody to batch with, so one batch at once, without the queue,
            # the caller's wake lock or a hand-off (a flow's sends, one after another).
            try:
                return self._outcomes(list(works))
            finally:
                with self._mutex:
                    self._hand_over()
        caller = _Caller(len(works))
        pendings = [_Pending(work, caller) for work in works]
        with self._mutex:
            self._queue.extend(pendings)
            if not self._leading:
                self._leading = caller.lead = True
        if not caller.lead:
            self._sleep(caller, pendings)
            if not caller.left:
                return [p.outcome for p in pendings]
        self._lead(caller)
        return [p.outcome for p in pendings]

    def _sleep(self, caller: _Caller, pendings: list[_Pending[W]]) -> None:
        try:
            caller.wake.acquire()
        except BaseException:
            # Interrupted while queued: withdraw what has not started, and pass on the lead
            # if it was handed over meanwhile, so that nobody waits for this thread.
            with self._mutex:
                self._queue = [p for p in self._queue if p.caller is not caller]
                if caller.lead:
                    self._hand_over()
            raise

    def _lead(self, caller: _Caller) -> None:
        """Run batches until this caller's units are all committed, then hand over."""
        try:
            while caller.left:
                with self._mutex:
                    batch = self._queue[: self._max_batch]
                    del self._queue[: self._max_batch]
                if not batch:  # cannot happen: a leader's own units stay queued until run
                    raise RuntimeError("group commit: the leader's units left the queue")
                for finished in self._commit(batch):
                    if finished is not caller:
                        finished.wake.release()
        finally:
            with self._mutex:
                self._hand_over()

    def _outcomes(self, works: list[W]) -> list[WorkOutcome[Any]]:
        """Run `works` as one batch (one transaction): their outcomes, in order."""
        try:
            outcomes = self._run_batch(works)
            if len(outcomes) != len(works):
                raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(works)}")
        except BaseException as exc:
            outcomes = [WorkOutcome(None, exc) for _ in works]
        self.batches += 1
        self.committed_units += len(works)
        return outcomes

    def _hand_over(self) -> None:
        """With the mutex held: wake the caller of the oldest queued unit to lead, or stop."""
        if self._queue:
            successor = self._queue[0].caller
            successor.lead = True
            successor.wake.release()
        else:
            self._leading = False

    def _commit(self, batch: list[_Pending[W]]) -> list[_Caller]:
        """Run one batch; return the callers whose units are now all done."""
        outcomes = self._outcomes([pending.work for pending in batch])
        finished: list[_Caller] = []
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.outcome = outcome
            owner = pending.caller
            owner.left -= 1
            if not owner.left:
                finished.append(owner)
        return finished


class AsyncBatcher(Generic[W]):
    """Gathers what coroutines on one event loop hand to a worker thread into batches: units
    of work into group commits (`run` is `GroupCommit.submit_many`), or a flow runner's reads
    of stored runs while the store is busy (`run` reads each).

    A coroutine queues its items and awaits a future. The first item queued while no batch is
    in flight starts a drain task, which hands everything queued to `run` in a worker thread
    (so the event loop keeps running during the statements and the fsync) and resolves the
    futures when it returns; items queued meanwhile form the next batch. With N coroutines
    dispatching in a loop, commit batches grow to about N (up to the committer's
    `max_batch`). Units of threads calling the GroupCommit directly share the same batches
    and order.
    """

    def __init__(
        self, run: Callable[[Sequence[W]], list[WorkOutcome[Any]]], executor: Executor
    ) -> None:
        self._run = run
        self._executor = executor
        self._queue: list[W] = []
        # One per `queue` call, in queue order: how many units, the future, whether it takes
        # every outcome (`queue_many`) or one unit's value.
        self._waiters: list[tuple[int, asyncio.Future[Any], bool]] = []
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, work: W) -> Any:
        """Run one unit; return its value or raise its error, after its batch committed."""
        return await self.queue(work)

    def queue(self, work: W) -> asyncio.Future[Any]:
        """Queue one unit now: a future of its value (or error), set once its batch
        committed. Units queued one after another without an await between them go to the
        committer in that order, together."""
        return self._queue_units([work], False)

    def queue_many(self, works: Sequence[W]) -> asyncio.Future[list[WorkOutcome[Any]]]:
        """Queue units now, in order (in as few batches as `max_batch` allows): a future of
        their outcomes."""
        return self._queue_units(works, True)

    def _queue_units(self, works: Sequence[W], many: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.extend(works)
        self._waiters.append((len(works), future, many))
        if self._draining is None:
            self._draining = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                works, waiters = self._queue, self._waiters
                self._queue, self._waiters = [], []
                try:
                    outcomes = await loop.run_in_executor(self._executor, self._run, works)
                except BaseException as exc:  # the loop is closing, or the executor is gone
                    outcomes = [WorkOutcome(None, exc) for _ in works]
                first = 0
                for count, future, many in waiters:
                    mine = outcomes[first : first + count]
                    first += count
                    if future.done():  # its coroutine was cancelled
                        continue
                    if many:
                        future.set_result(mine)
                    elif mine[0].error is not None:
                        future.set_exception(mine[0].error)
                    else:
                        future.set_result(mine[0].value)
        finally:
            self._draining = None
