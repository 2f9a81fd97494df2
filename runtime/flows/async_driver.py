"""The asyncio driver: runs the same plan with each send through `Governor.dispatch_async`
and the run's writes queued beside it, so they share the group commit; a parallel flow's
branches run in an asyncio.TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast

from ..dispatch import Governor
from ..errors import InstanceExists, UnknownInstance
from ..results import DispatchResult
from ..sealing import _Chain
from ..store.base import FlowRecord, FlowStatus, Transaction
from ..tables import FlowStepSpec
from .fanin import _FanIn, _late_fold, _late_work, _poll_s
from .ops import _SETTLED, _Branches, _Send, _Write
from .plan import _plan
from .run import (
    _OUTCOMES,
    _STEP_FAILURES,
    FlowResult,
    StepFailed,
    _Note,
    _result,
    _Run,
    _step_outcome,
)
from .steps import _batch_answer, _Moved, _StepRunner, _Unrecorded


class _AsyncDriver(_StepRunner):
    """FlowRunner's asyncio API drives runs with these."""

    async def _drive_async(self, run: _Run) -> FlowResult:
        plan = _plan(self, run)
        answer: Any = None
        while True:
            try:
                op = plan.send(answer)
            except StopIteration:
                return _result(run)
            if isinstance(op, _Send):  # most ops
                answer = await self._send_async(run, op)
            elif isinstance(op, _Write):
                await self._write_async(run, op.status, op.notes, op.wake_ms, op.gather)
                answer = None
            else:
                answer = await self._branches_async(run, op)

    async def _send_async(self, run: _Run, op: _Send) -> tuple[str, Any]:
        """`_send` for asyncio. A send whose event calls nothing outside is one unit, as in
        the sync API (`_recording`: the run's write, the dispatch, its outcome and, for the
        last step, the run's end), queued at once, so it shares the group commit of
        every other coroutine's units meanwhile. One that calls the outside world goes
        through `Governor.dispatch_async` (its claim and calls in the action threads), the
        run's write queued before it: in the current batch, while the calls run."""
        try:
            if self.before_step is not None:
                self._hook(run, op.step, op.phase)
            governor, target, payload, event_id = self._receiver(run, op.step, op.emit, op.part)
        except StepFailed as failed:
            return _step_outcome(failed)
        runtime, event = self.runtime, op.emit.event
        mine = runtime._partition_of(run.record.flow_id)
        if event in governor._external_events or runtime._partition_of(target) != mine:
            written = self._queue_write(run, op.status, [])
            try:
                sent: object = await self._dispatch_async(
                    governor, target, event, payload, event_id
                )
            except Exception as error:
                sent = error
            except BaseException:
                written.cancel()  # its unit commits all the same; nobody waits for it
                raise
            run.record = await written
            return _step_outcome(sent)
        try:
            work = governor._work(
                target, event, payload or None, self.actor, event_id, None, None, False
            )
        except _STEP_FAILURES as failed:
            return _step_outcome(failed)
        if runtime._memory is None:
            # One unit: the run's write, the dispatch, and the send's outcome (`_recording`).
            try:
                run.record = await runtime._submit_async(self._recording(run, op, work), mine)
                return _SETTLED
            except _Moved as moved:
                with contextlib.suppress(Exception):
                    await runtime._submit_async(work, mine)  # the other driver records it
                raise moved.error from None
            except _Unrecorded as unrecorded:
                run.record = await runtime._submit_async(
                    self._unrecorded(run, op, unrecorded), mine
                )
                failure = unrecorded.error
            if isinstance(failure, _OUTCOMES):
                return _SETTLED
            if not isinstance(failure, UnknownInstance):
                raise failure
        else:
            batch = await runtime._submit_many_async(self._batch_works(run, op, work), mine)
            answer = _batch_answer(run, batch)
            if answer is not None:
                return answer
        try:  # the receiver's first event
            result = await self._dispatch_async(governor, target, event, payload, event_id)
        except _STEP_FAILURES as failed:
            return _step_outcome(failed)
        return _step_outcome(result)

    async def _dispatch_async(
        self,
        governor: Governor,
        target: str,
        event: str,
        payload: dict[str, Any],
        event_id: str,
    ) -> DispatchResult:
        """dispatch_async, creating the receiver if it is missing (its first event)."""
        try:
            return await governor.dispatch_async(
                target, event, payload or None, self.actor, event_id=event_id
            )
        except UnknownInstance:
            with contextlib.suppress(InstanceExists):
                await governor.create_async(target, self.actor)
            return await governor.dispatch_async(
                target, event, payload or None, self.actor, event_id=event_id
            )

    async def _dispatch_then(
        self,
        governor: Governor,
        target: str,
        event: str,
        payload: dict[str, Any],
        event_id: str,
        then: Callable[[Transaction, _Chain], object],
    ) -> DispatchResult:
        """`_dispatch_async` with `then` run in the dispatch's transaction, after its unit of
        work (a fanout branch's late reply, `_late_fold`): the sync `_dispatch` in an action
        thread."""
        pool = self.runtime._action_threads()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            pool, self._dispatch, governor, target, event, payload, event_id, then
        )

    async def _attempt_async(
        self, run: _Run, step: FlowStepSpec, late: bool = False
    ) -> tuple[str, Any]:
        try:
            self._hook(run, step, "do")
            if step.kind != "send":
                return self._attempt_here(run, step, hooked=True)
            assert step.send is not None
            governor, target, payload, event_id = self._receiver(
                run, step, step.send, self._send_op(step, "do", False).part
            )
            then = _late_fold(self, run, step, target) if late else None
            event = step.send.event
            if then is None:
                result = await self._dispatch_async(governor, target, event, payload, event_id)
            else:
                result = await self._dispatch_then(governor, target, event, payload, event_id, then)
        except (StepFailed, *_STEP_FAILURES) as failed:
            return _step_outcome(failed)
        return _step_outcome(result)

    async def _branches_async(self, run: _Run, op: _Branches) -> list[tuple[str, Any]]:
        """Every branch at once, each a task (their outside calls, the actions a policy
        names, overlap in the runtime's action threads; their units share commits). A
        fanout waits until its deadline at most (on the runtime's clock): what arrived by
        then is gathered; the branches still running go on as tasks of their own, and their
        replies are recorded as late (`_late_work`; `drain_async` waits for them)."""
        if op.deadline is None:
            async with asyncio.TaskGroup() as group:
                if run.pending:
                    # The run's start first: in the branches' commit (or before it), so the
                    # ledger has FlowStarted and StepStarted before their transitions.
                    group.create_task(self._write_async(run, "running", []))
                tasks = [group.create_task(self._attempt_async(run, step)) for step in op.steps]
            return [task.result() for task in tasks]
        fanin = _FanIn(op.steps)
        tasks = [
            asyncio.ensure_future(self._branch_async(run, fanin, i)) for i in range(len(op.steps))
        ]
        clock, pending = self.runtime.clock, set(tasks)
        while pending and not fanin.complete():
            left = op.deadline - clock.now_ms()
            if left <= 0:
                break
            _, pending = await asyncio.wait(
                pending, timeout=_poll_s(clock, left), return_when=asyncio.FIRST_EXCEPTION
            )
        failed = next((t for t in tasks if t.done() and t.exception() is not None), None)
        late = [task for task in tasks if not task.done()]
        self._late_tasks.update(late)
        for task in late:
            task.add_done_callback(self._late_tasks.discard)
        if failed is not None:
            raise cast(BaseException, failed.exception())
        return fanin.close()

    async def _branch_async(self, run: _Run, fanin: _FanIn, index: int) -> tuple[str, Any]:
        """`_branch` for asyncio."""
        step = fanin.steps[index]
        outcome = await self._attempt_async(run, step, late=True)
        if not fanin.put(index, outcome):
            flow_id = run.record.flow_id
            work = _late_work(self, flow_id, step.name, outcome)
            await self.runtime._submit_async(work, self.runtime._partition_of(flow_id))
        return outcome

    async def _write_async(
        self,
        run: _Run,
        status: FlowStatus,
        notes: Sequence[_Note],
        wake_ms: int | None = None,
        gather: Callable[[Transaction], tuple[FlowStatus, list[_Note]]] | None = None,
    ) -> None:
        run.record = await self._queue_write(run, status, notes, wake_ms, gather)

    def _queue_write(
        self,
        run: _Run,
        status: FlowStatus,
        notes: Sequence[_Note],
        wake_ms: int | None = None,
        gather: Callable[[Transaction], tuple[FlowStatus, list[_Note]]] | None = None,
    ) -> asyncio.Future[FlowRecord]:
        """The run's write (`_write_work`), queued now: a future of the record written."""
        runtime = self.runtime
        work = self._write_work(run, status, notes, wake_ms, gather)
        return runtime._queue_async(work, runtime._partition_of(run.record.flow_id))
