"""The sync driver: runs a run's plan with each step's dispatch and the run's writes committed
through the runtime's batches (`Runtime._submit_many`), a send and its run's write in one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION
from concurrent.futures import wait as wait_futures
from typing import Any, cast

from ..dispatch import Governor
from ..errors import UnknownInstance
from ..preflight import lets_go
from ..resilience.claims import Release
from ..sealing import _Chain
from ..store.base import FlowStatus, Transaction
from ..tables import FlowStepSpec
from ..unit import _LookAgain
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


class _SyncDriver(_StepRunner):
    """FlowRunner's sync API drives runs with these."""

    def _drive(self, run: _Run) -> FlowResult:
        plan = _plan(self, run)
        answer: Any = None
        while True:
            try:
                op = plan.send(answer)
            except StopIteration:
                return _result(run)
            if isinstance(op, _Send):  # most ops
                answer = self._send(run, op)
            elif isinstance(op, _Write):
                self._write(run, op.status, op.notes, op.wake_ms, op.gather)
                answer = None
            else:
                answer = self._branches(run, op)

    def _send(self, run: _Run, op: _Send) -> tuple[str, Any]:
        """A send (or compensation) and the run's pending notes in one commit: one unit of
        work with its outcome (`_recording`; the answer is then _SETTLED), or, on the memory
        store or across ledger partitions, a batch of units of their own (`_send_units`)."""
        try:
            if self.before_step is not None:
                self._hook(run, op.step, op.phase)
            governor, target, payload, event_id = self._receiver(run, op.step, op.emit, op.part)
            work = governor._work(
                target, op.emit.event, payload or None, self.actor, event_id, None, None, False
            )
        except (StepFailed, *_STEP_FAILURES) as failed:
            return _step_outcome(failed)
        # Prepared: a receiver's outside actions (a policy's) run before the commit, under the
        # claim of the step's event id, so another process resuming this run waits for it.
        keys = governor._claim_keys(work)
        release = self.runtime._outside.claim(keys, governor._committed(work)) if keys else None
        try:
            while True:
                try:
                    unit = governor._prepare(work)
                except _STEP_FAILURES as failed:
                    # Its outside action failing as transient or unavailable is "no_reply": a
                    # compensation is tried again later, a step fails (plan.py).
                    return _step_outcome(failed)
                try:
                    return self._send_prepared(
                        run, op, governor, target, payload, event_id, unit, release
                    )
                except _LookAgain:
                    continue  # the committed state changed since the look: look again
        finally:
            if release is not None:
                release()  # unless let go already: nothing left to do then

    def _send_prepared(
        self,
        run: _Run,
        op: _Send,
        governor: Governor,
        target: str,
        payload: dict[str, Any],
        event_id: str,
        unit: Callable[[Transaction, _Chain], object],
        release: Release | None = None,
    ) -> tuple[str, Any]:
        """The rest of `_send`, once its dispatch's outside actions ran (see there), with the
        release of their claim (let go as soon as the send's commit is done or failed)."""
        runtime = self.runtime
        mine = runtime._partition_of(run.record.flow_id)
        if runtime._memory is not None or runtime._partition_of(target) != mine:
            return self._send_units(run, op, governor, target, payload, event_id, unit, release)
        # One unit: the run's write, the dispatch, and the send's outcome (`_recording`).
        try:
            run.record = runtime._submit(self._recording(run, op, unit), mine)
        except _Moved as moved:
            committed = False
            with contextlib.suppress(Exception):
                runtime._submit(unit, mine)  # its outcome is the other driver's to record
                committed = lets_go(unit)
            if release is not None:
                release(committed=committed)
            raise moved.error from None
        except _Unrecorded as unrecorded:
            if type(unrecorded.error) is _LookAgain:
                # Nothing of the unit is stored: its notes go with the next look's unit, and
                # the claim is kept for that look.
                run.pending = [*unrecorded.pending, *run.pending]
                raise unrecorded.error from None
            if release is not None:
                release()
            run.record = runtime._submit(self._unrecorded(run, op, unrecorded), mine)
            error = unrecorded.error
            if isinstance(error, _OUTCOMES):
                return _SETTLED
            if not isinstance(error, UnknownInstance):
                raise error from None
            return self._first_event(run, op, governor, target, payload, event_id)
        except BaseException:
            if release is not None:
                release()
            raise
        if release is not None:
            # Its commit let go of the claim in the store (preflight.lets_go).
            release(committed=lets_go(unit))
        return _SETTLED

    def _send_units(
        self,
        run: _Run,
        op: _Send,
        governor: Governor,
        target: str,
        payload: dict[str, Any],
        event_id: str,
        unit: Callable[[Transaction, _Chain], object],
        release: Release | None,
    ) -> tuple[str, Any]:
        """`_send_prepared` on the memory store, or with the dispatch in another ledger
        partition than the run: the run's write and the dispatch as two units of one batch
        (each atomic on its own); the last one's batch has a third unit, its result and the
        run's end (`_settling`). A partitioned store commits the run's units in the
        partition of its run id, the dispatch in its receiver's."""
        runtime = self.runtime
        works = self._batch_works(run, op, unit)
        mine = runtime._partition_of(run.record.flow_id)
        partitions = [mine, runtime._partition_of(target), mine][: len(works)]
        try:
            outcomes = runtime._submit_many(works, partitions)
        except BaseException:
            if release is not None:
                release()
            raise
        # A dispatch that must look again keeps the claim for that look (`_batch_answer`
        # raises _LookAgain once the run's record is taken).
        if release is not None and type(outcomes[1].error) is not _LookAgain:
            # Its unit's commit let go of the claim in the store (preflight.lets_go).
            release(committed=outcomes[1].error is None and lets_go(unit))
        answer = _batch_answer(run, outcomes)
        if answer is not None:
            return answer
        return self._first_event(run, op, governor, target, payload, event_id)

    def _first_event(
        self,
        run: _Run,
        op: _Send,
        governor: Governor,
        target: str,
        payload: dict[str, Any],
        event_id: str,
    ) -> tuple[str, Any]:
        """The send's dispatch when its receiver does not exist yet: created, then sent."""
        try:
            result = self._dispatch(governor, target, op.emit.event, payload, event_id)
        except _STEP_FAILURES as failed:
            return _step_outcome(failed)
        return _step_outcome(result)

    def _branches(self, run: _Run, op: _Branches) -> list[tuple[str, Any]]:
        """Every branch at once, each in one of the runtime's action threads, when one of
        them may call the outside world (an action a policy names, which runs before the
        transaction): those calls overlap, and the branches' units share commits. Otherwise
        (all their work is in the transaction, where nothing overlaps) one after another.
        A fanout waits until its deadline at most: what arrived by then is gathered, later
        replies are recorded as late (`_late_work`)."""
        steps = op.steps
        if not any(self._calls_outside(step) for step in steps):
            return [self._attempt(run, step) for step in steps]
        if run.pending:
            # The run's start first (its own commit, while the calls are still to come): the
            # ledger has FlowStarted and StepStarted before the branches' transitions, and a
            # worker finds the run if this process dies during the calls.
            self._write(run, "running", [])
        fanin = _FanIn(steps)
        pool = self.runtime._action_threads()
        late = op.deadline is not None  # a fanout's replies may come after its gather
        futures = [pool.submit(self._branch, run, fanin, i, late) for i in range(len(steps))]
        if op.deadline is None:
            return [future.result() for future in futures]
        clock, pending = self.runtime.clock, set(futures)
        while pending and not fanin.complete():
            left = op.deadline - clock.now_ms()
            if left <= 0:
                break
            _, pending = wait_futures(pending, _poll_s(clock, left), FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                raise cast(BaseException, future.exception())
        self._late_futures.update(f for f in futures if not f.done())
        return fanin.close()

    def _branch(self, run: _Run, fanin: _FanIn, index: int, late: bool) -> tuple[str, Any]:
        """One branch in an action thread: its outcome goes to the gather, or, after the
        gather, is recorded as late: a fanout's reply in its own commit (`_late_fold`), a
        refusal (or a reply on another ledger partition) in a commit of its own."""
        step = fanin.steps[index]
        outcome = self._attempt(run, step, late)
        if not fanin.put(index, outcome):
            flow_id = run.record.flow_id
            work = _late_work(self, flow_id, step.name, outcome)
            self.runtime._submit(work, self.runtime._partition_of(flow_id))
        return outcome

    def _calls_outside(self, step: FlowStepSpec) -> bool:
        """Whether the step's send may run an action a policy names (an outside call)."""
        send = step.send
        if send is None:
            return False
        return send.event in self.runtime.governor(send.machine)._external_events

    def _attempt(self, run: _Run, step: FlowStepSpec, late: bool = False) -> tuple[str, Any]:
        """A parallel or fanout branch: ("succeeded", result) | ("failed", reason) |
        ("no_reply", reason). `late`: its reply may come after the gather (`_late_fold`)."""
        try:
            self._hook(run, step, "do")
            if step.kind != "send":
                return self._attempt_here(run, step, hooked=True)
            assert step.send is not None
            governor, target, payload, event_id = self._receiver(
                run, step, step.send, self._send_op(step, "do", False).part
            )
            then = _late_fold(self, run, step, target) if late else None
            result = self._dispatch(governor, target, step.send.event, payload, event_id, then)
        except (StepFailed, *_STEP_FAILURES) as failed:
            return _step_outcome(failed)
        return _step_outcome(result)

    def _write(
        self,
        run: _Run,
        status: FlowStatus,
        notes: Sequence[_Note],
        wake_ms: int | None = None,
        gather: Callable[[Transaction], tuple[FlowStatus, list[_Note]]] | None = None,
    ) -> None:
        """Write the run (`_write_work`) in a commit of its own."""
        runtime = self.runtime
        work = self._write_work(run, status, notes, wake_ms, gather)
        run.record = runtime._submit(work, runtime._partition_of(run.record.flow_id))
