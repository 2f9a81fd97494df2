"""The asyncio driver: runs the same plan with each send through `Governor.dispatch_async`
and the run's writes queued beside it, so they share the group commit; a parallel flow's
branches run in an asyncio.TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from ..dispatch import Governor
from ..errors import InstanceExists, UnknownInstance
from ..results import DispatchResult
from ..store.base import FlowStatus
from ..tables import FlowStepSpec
from .ops import _TIMED_OUT, _Branches, _Send, _Write
from .plan import _plan
from .run import _STEP_FAILURES, FlowResult, StepFailed, _Note, _result, _Run, _step_outcome
from .steps import _StepRunner


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
            if isinstance(op, _Write):
                await self._write_async(run, op.status, op.notes, op.wake_ms)
                answer = None
            elif isinstance(op, _Send):
                answer = await self._send_async(run, op)
            else:
                answer = await self._branches_async(run, op)

    async def _send_async(self, run: _Run, op: _Send) -> tuple[str, Any]:
        """`_send` for asyncio: the run's write and `Governor.dispatch_async` queued together,
        so they (and every other coroutine's units meanwhile) share one group commit."""
        try:
            self._hook(run, op.step, op.phase)
            governor, target, payload, event_id = self._receiver(run, op.step, op.emit, op.phase)
        except StepFailed as failed:
            return "failed", failed.message
        written, sent = await asyncio.gather(
            self._write_async(run, op.status, []),
            self._dispatch_async(governor, target, op.emit.event, payload, event_id),
            return_exceptions=True,
        )
        if isinstance(written, BaseException):
            raise written
        return _step_outcome(sent)

    async def _dispatch_async(
        self,
        governor: Governor,
        target: str,
        event: str,
        payload: dict[str, Any],
        event_id: str,
    ) -> DispatchResult:
        """dispatch_async, creating a missing receiver first (asked only when it is missing,
        so no store read blocks the event loop on the way)."""
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

    async def _attempt_async(
        self, run: _Run, step: FlowStepSpec, deadline: int | None
    ) -> tuple[str, Any]:
        try:
            self._hook(run, step, "do")
            if step.kind != "send":
                return self._attempt_here(run, step, hooked=True)
            assert step.send is not None
            governor, target, payload, event_id = self._receiver(run, step, step.send, "do")
            result = await self._dispatch_async(
                governor, target, step.send.event, payload, event_id
            )
        except (StepFailed, *_STEP_FAILURES) as failed:
            return _step_outcome(failed)
        return self._late(_step_outcome(result), deadline)

    async def _branches_async(self, run: _Run, op: _Branches) -> list[tuple[str, Any]]:
        """Every branch at once. A fanout's branches still running at its deadline (the time
        left on the runtime's clock, waited by the event loop) count as timed out; their
        dispatch still finishes, deduplicated if it is ever repeated."""
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._attempt_async(run, step, op.deadline)) for step in op.steps
            ]
            if op.deadline is None:
                return [await task for task in tasks]
            left = max(0, op.deadline - self.runtime.clock.now_ms()) / 1000
            await asyncio.wait(tasks, timeout=left)
            late = [t for t in tasks if not t.done()]
            if late:
                await asyncio.wait(late)  # let them finish inside the group
        return [_TIMED_OUT if task in late else task.result() for task in tasks]

    async def _write_async(
        self, run: _Run, status: FlowStatus, notes: Sequence[_Note], wake_ms: int | None = None
    ) -> None:
        runtime = self.runtime
        work = self._write_work(run, status, notes, wake_ms)
        run.record = await runtime._submit_async(work, runtime._partition_of(run.record.flow_id))
