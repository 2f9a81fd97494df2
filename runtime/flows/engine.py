"""Durable flow execution: a flow run's progress lives in the store beside the governors, and
every step start, step result, compensation and flow end is a ledger entry (kind "flow").

Semantics a user must know:
- A run is identified by its flow id: `start` with the same flow, instance and inputs (or the
  same explicit `flow_id`) resumes the stored run instead of starting another, so calling it
  again after a crash is safe.
- A send step dispatches its event with an event id derived from (flow id, step, "do"), a
  compensation with (flow id, step, "undo"). The receiver remembers processed event ids, so a
  step re-run after a crash between its dispatch and the flow's own write returns the stored
  result and changes nothing: every effect happens once. The flow's own writes are
  version-checked (two resuming processes cannot both advance one run). A send is one unit
  of work, one commit: the run's pending notes, the dispatch, the step's outcome and the
  run's record, written once (for the last step or compensation, the end of the run too),
  so a saga of N sends takes N commits. A step failing before its dispatch (its hook) is
  written with the first compensation's dispatch (or the run's end, if nothing is to be
  undone), so a saga whose k-th send fails so takes k - 1 + (compensations) commits, at
  least one; a step its receiver rejects rolls its unit back whole, and its failure is
  written with the notes in a commit of their own. A unit whose run another driver wrote
  meanwhile is rolled back too: its dispatch then commits on its own (its effect and the
  outside calls it records stand) and the run is read again. On the memory store, or with
  the receiver in another ledger partition than the run, the run's write and the dispatch
  are units of their own: a step's result is then written with the next one's dispatch.
- A send step succeeds when the receiver takes a transition or ignores the event; it fails
  when the receiver rejects it (invalid transition, no guard held, an action failed for good,
  a payload it refuses) or a `before_step` hook raises StepFailed. A missing receiver instance
  is created (initial state) first. A step whose receiver does not answer (its action failed
  as transient or unavailable, retries of its policy included, its breaker open, its bulkhead
  full; or the hook raised NoReply) is no refusal: the run is stored "waiting", a StepRetrying
  entry records the attempt (attempts 1, 2, 4, ...: compensation.py), and `resume_all` / the worker
  send it again, with the same event id, after the jitter backoff (the run's wake_ms), until
  it is answered or STEP_RETRY_LIMIT_MS (a day) has passed since its first unanswered attempt;
  then it fails and the run compensates. A parallel flow's other branches finish meanwhile.
- sequence, saga, conditional (the branch named by the `on` input): steps in order; after a
  failure the completed steps are compensated newest first, then CompensationCompleted
  records the failed step and the reason (the run ends "compensated"). With nothing to
  undo the run ends "failed" (FlowFailed). A compensation the receiver rejects is recorded as
  CompensationFailed and the run ends "failed", the entry listing it: a person must look.
  A compensation whose receiver does not answer (its policy action failed as transient or
  unavailable, its breaker open, its bulkhead full) is no refusal: the run stays
  "compensating" and the compensation is tried again from the store, with backoff
  (compensation.py), until it is answered.
- parallel: every step runs at once (each branch an asyncio task, or, in the sync API, an
  action thread when a branch may call the outside world: the actions a policy names run
  before the transaction and overlap; the transactions themselves do not, they share
  commits); if any failed, the others are compensated. fanout: every step runs, nothing is
  compensated, and the gathered result says which succeeded, failed or timed out; it
  succeeds with `quorum`. `within` is a deadline on the runtime's clock, stored with the run
  before any branch is sent (the run's wake_ms): the branches are awaited until then at
  most; a branch without a reply (NoReply, or its receiver's action failing as transient or
  unavailable) keeps the run "waiting", asked again by each resume (without `within`, as a
  step of another flow: after the backoff, up to the bound); at the deadline the
  gather decides in its own transaction (fanin.py): a branch whose transition is committed
  by then counts, the rest time out (also in a process started after a crash). A branch
  still running then goes on, its effect stands and a StepLate entry records it, in the
  reply's own transaction (fanin._late_fold; `drain` waits for it).
- await: the run is stored as "waiting" until the machine is in one of the states; governor
  timers move the machine meanwhile (nothing is held in memory). `resume_all` (after
  `fire_due` / `deliver_outbox`, or in a new process) checks again; past `within` it fails,
  and at once in one of its `unless` states (the step's `fails`: the outcome is known).
- compute: calls the registered pure function with the inputs and earlier results; its
  result is stored, so a resumed run never calls it with other results in mind.
- A driver that finds another driving the same run hands over instead of failing: when a
  step's outside-call claim was taken over while its calls ran (OutsideClaimLost: this
  process stalled past its lease, another resumed the run and claimed the step's event id)
  or the run's own version-checked write finds the run moved on, the step is neither failed
  nor recorded. The driver drops what it holds in memory, reads the run again and drives on
  from what is stored: the step's send is repeated with the same event id, so it waits at
  the claim while the other holds it and then gets the committed result as a repeat, calling
  nothing (or, if the other stored nothing, claims and sends the same payload, its
  idempotency key included, so the outside service deduplicates). `start`/`resume` return
  the run as it ends, whoever drove it there. The calls the stalled driver made are not
  stored: the step's idempotency key is what keeps the outside effect single.
- The asyncio API runs the same plan (`_plan`, one generator for both) and commits a send as
  the sync API does (one unit: the run's write, the dispatch, its outcome, and for the last
  step the run's end), queued in the asyncio group commit it shares with every other
  coroutine's units; a send that calls the outside world goes through
  `Governor.dispatch_async` (claim and calls in the action threads), the run's write queued
  ahead of it. No threads of the runner's own. A cancelled start_async / resume_async /
  resume_all_async leaves the run to be resumed: the outside calls already handed to the
  action threads are committed and their claims let go there (preflight.dispatch_async).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar, cast

from ..commit import AsyncBatcher
from ..errors import (
    ConcurrentUpdateDetected,
    OutsideClaimLost,
    StoreIntegrityError,
)
from ..results import _dumps, derive_event_id
from ..runtime import Runtime
from ..store.base import FLOW_FINISHED, FlowRecord, WorkOutcome, new_flow_record
from ..store.sqlite import SQLiteStore
from ..tables import FlowSpec, FlowStepSpec
from .async_driver import _AsyncDriver
from .errors import FlowInputsInvalid, UnknownFlow, UnregisteredFunction
from .inputs import check_inputs
from .run import (
    FlowResult,
    NoReply,
    StepContext,
    StepFailed,
    _next_steps,
    _result,
    _Run,
    _start_notes,
)
from .steps import _started_detail
from .sync_driver import _SyncDriver

__all__ = ["FlowResult", "FlowRunner", "NoReply", "StepContext", "StepFailed"]

T = TypeVar("T")

FLOW_ACTOR = "flow"
# `_off_loop`'s answer from a store whose lock is held: read in an action thread then.
_BUSY = object()


def _read_each(reads: Sequence[Callable[[], Any]]) -> list[WorkOutcome[Any]]:
    """Each read's value, or its error: a batch of the reads of stored runs that found the
    SQLite store's lock held (`FlowRunner._off_loop`), made in one hand-off to an action
    thread once the lock is free. A hand-off costs the loop's thread about what a read does,
    and of 200 sagas started at once three in four found the lock held at their open. A
    cancelled coroutine's read is made and its answer dropped."""
    answers: list[WorkOutcome[Any]] = []
    for read in reads:
        try:
            answers.append(WorkOutcome(read(), None))
        except Exception as error:
            answers.append(WorkOutcome(None, error))
    return answers


class FlowRunner(_SyncDriver, _AsyncDriver):
    """Runs flows on a Runtime whose governors are loaded.

    `functions` are the pure functions compute steps name, called with a mapping of the
    inputs and earlier results. `before_step` is called before every step and compensation:
    raising StepFailed there fails it, NoReply leaves it unanswered (tests and the demo inject
    failures so)."""

    def __init__(
        self,
        runtime: Runtime,
        flows: Iterable[FlowSpec],
        *,
        functions: Mapping[str, Callable[[Mapping[str, Any]], Any]] | None = None,
        before_step: Callable[[StepContext], None] | None = None,
        actor: str = FLOW_ACTOR,
    ) -> None:
        self.runtime = runtime
        self.specs = {spec.name: spec for spec in flows}
        self.functions = dict(functions or {})
        self.before_step = before_step
        self.actor = actor
        self._late_futures = set()
        self._late_tasks = set()
        self._sends = {}
        # Per event loop, the reads of stored runs that found the SQLite store's lock held.
        self._reads: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncBatcher[Callable[[], Any]]
        ] = weakref.WeakKeyDictionary()
        missing = tuple(
            (spec.name, step.name, step.function)
            for spec in self.specs.values()
            for step in _all_steps(spec)
            if step.function is not None and step.function not in self.functions
        )
        if missing:
            raise UnregisteredFunction(missing)

    def close(self) -> None:
        """Wait for fanout branches that outlived their gather (`drain`): the runner holds
        no threads or connections of its own."""
        self.drain()

    def drain(self) -> None:
        """Wait until every fanout branch still running after its gather (sync API) has
        answered and its late reply is recorded."""
        while self._late_futures:
            future = self._late_futures.pop()
            with contextlib.suppress(Exception):
                future.result()

    async def drain_async(self) -> None:
        """`drain` for the asyncio API: await the branches still running after their
        gather (call it before the event loop closes, which would cancel them)."""
        while self._late_tasks:
            task = self._late_tasks.pop()
            with contextlib.suppress(Exception):
                await task

    # ------------------------------------------------------------------ the sync API

    def start(
        self,
        flow: str,
        instance: str,
        inputs: Mapping[str, Any],
        *,
        flow_id: str | None = None,
    ) -> FlowResult:
        """Start (or resume, if this run exists) and drive the run as far as it goes now."""
        run = self._open(flow, instance, inputs, flow_id)
        return self._drive_on(run)

    def resume(self, flow_id: str) -> FlowResult:
        run = self._load(flow_id)
        return _result(run) if run.record.status in FLOW_FINISHED else self._drive_on(run)

    def resume_all(self, *, limit: int = 1000) -> list[FlowResult]:
        """Drive every unfinished run of a loaded flow: after a restart, or after timers
        fired and the outbox was delivered (waiting runs check their wait again)."""
        return [
            self.resume(record.flow_id)
            for record in self.runtime.store.unfinished_flows(limit)
            if record.flow in self.specs
        ]

    def due_runs(self, *, stale_ms: int, limit: int = 1000) -> list[str]:
        """The runs a worker drives (`autonomic worker`): every waiting run of a loaded flow
        (its await or fanout is asked again, and times out past its deadline; a step that did
        not answer is sent again once its retry time has come), every
        compensating one whose compensation that did not answer is due again (its wake_ms),
        and every running or compensating one that nobody has written for `stale_ms` (its
        process died, or stalled: driving it is safe either way, see the module docstring)."""
        now = self.runtime.clock.now_ms()
        horizon = now - stale_ms
        return [
            record.flow_id
            for record in self.runtime.store.unfinished_flows(limit)
            if record.flow in self.specs
            and (
                record.status == "waiting"
                or record.updated_ms <= horizon
                or (
                    record.status == "compensating"
                    and record.wake_ms is not None
                    and record.wake_ms <= now
                )
            )
        ]

    def result(self, flow_id: str) -> FlowResult:
        return _result(self._load(flow_id))

    def next_wake(self) -> int | None:
        """The earliest time a waiting run times out (an await's or a fanout's `within`) or
        a step or compensation that did not answer is tried again: call `resume_all` then
        (after `fire_due`), as for the governors' timers."""
        wakes = [
            r.wake_ms
            for r in self.runtime.store.unfinished_flows()
            if r.wake_ms is not None and r.flow in self.specs
        ]
        return min(wakes, default=None)

    # ------------------------------------------------------------------ the asyncio API

    async def start_async(
        self,
        flow: str,
        instance: str,
        inputs: Mapping[str, Any],
        *,
        flow_id: str | None = None,
    ) -> FlowResult:
        """`start`, awaited: each step's dispatch goes through `Governor.dispatch_async` and
        the run's own writes through the same asyncio group commit, so concurrent runs (and a
        parallel flow's branches, run in an asyncio.TaskGroup) share commits."""
        run = await self._off_loop(self._open, flow, instance, inputs, flow_id)
        return await self._drive_on_async(run)

    async def resume_async(self, flow_id: str) -> FlowResult:
        run = await self._off_loop(self._load, flow_id)
        if run.record.status in FLOW_FINISHED:
            return _result(run)
        return await self._drive_on_async(run)

    async def resume_all_async(self, *, limit: int = 1000) -> list[FlowResult]:
        records = await self._off_loop(self.runtime.store.unfinished_flows, limit)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self.resume_async(r.flow_id))
                for r in records
                if r.flow in self.specs
            ]
        return [task.result() for task in tasks]

    async def _off_loop(self, read: Callable[..., T], *arguments: Any) -> T:
        """`read(*arguments)` in an action thread, as the asyncio path's other reads: a
        store read waits for the store's lock (SQLite: held by a group commit through its
        fsync; PostgreSQL: a round trip), which on the loop's thread would stall every
        coroutine (tests/test_flow_concurrency.py). On SQLite with the lock free it reads
        here, holding the lock: the hop to a thread and back costs more than the read
        (about 0.2 M instructions of a 6 M asyncio saga); with the lock held, it waits in
        an action thread with the other coroutines' reads meanwhile (one `AsyncBatcher`)."""
        store = self.runtime.store
        loop = asyncio.get_running_loop()
        if isinstance(store, SQLiteStore):
            bound = partial(read, *arguments)
            value = store.unless_busy(bound, _BUSY)
            if value is not _BUSY:
                return cast(T, value)
            reads = self._reads.get(loop)
            if reads is None:
                reads = self._reads[loop] = AsyncBatcher(_read_each, self.runtime._action_threads())
            return cast(T, await reads.queue(bound))
        return await loop.run_in_executor(self.runtime._action_threads(), read, *arguments)

    # ------------------------------------------------------------------ handing over

    def _drive_on(self, run: _Run) -> FlowResult:
        """`_drive`, driving on from the stored run whenever another driver took it over
        (`_taken_over`; see the module docstring). Each turn follows another driver's
        progress (a claim it took, a write it made), so the turns end."""
        while run.record.status not in FLOW_FINISHED:
            try:
                return self._drive(run)
            except Exception as error:
                run = self._reread(run, error)
        return _result(run)

    async def _drive_on_async(self, run: _Run) -> FlowResult:
        """`_drive_on` for the asyncio API."""
        while run.record.status not in FLOW_FINISHED:
            try:
                return await self._drive_async(run)
            except Exception as error:
                run = self._reread(run, error)
        return _result(run)

    def _reread(self, run: _Run, error: Exception) -> _Run:
        """The run as stored, if `error` says another driver took it over; else `error`."""
        if not _taken_over(error, run.record):
            raise error
        return self._load(run.record.flow_id)

    # ------------------------------------------------------------------ opening a run

    def _spec(self, flow: str) -> FlowSpec:
        spec = self.specs.get(flow)
        if spec is None:
            raise UnknownFlow(flow, tuple(sorted(self.specs)))
        return spec

    def flow_id(self, flow: str, instance: str, inputs: Mapping[str, Any]) -> str:
        """The id `start` gives a run of `flow` on `instance` with `inputs`."""
        return _flow_id(flow, instance, _dumps(json.loads(_dumps(dict(inputs)))))

    def _open(
        self, flow: str, instance: str, inputs: Mapping[str, Any], flow_id: str | None
    ) -> _Run:
        spec = self._spec(flow)
        plain = _plain(inputs)
        if plain:
            # JSON gives these back as they are: their round trip (`flow_id`'s) is a copy.
            given = dict(inputs)
            text = _dumps(given)
        else:
            # A value not JSON's own (a tuple, a Decimal, a float): its round trip's text.
            given = json.loads(_dumps(dict(inputs)))
            text = _dumps(given)
        if flow_id is None:
            flow_id = _flow_id(flow, instance, text)
        stored = self.runtime.store.get_flow(flow_id)
        if stored is not None:
            return _Run(spec, stored, _stored_data(stored))
        check_inputs(spec, given)  # before anything is written
        data: dict[str, Any] = {"inputs": given, "values": {}, "steps": {}, "order": []}
        if spec.kind == "conditional":
            assert spec.on is not None
            branch = given.get(spec.on)
            if branch not in spec.branches:
                problem = f"not one of {', '.join(spec.branches)}"
                raise FlowInputsInvalid(flow, ((spec.on, problem),))
            data["branch"] = branch
        record = new_flow_record(flow_id, flow, instance, "running", 0, "", 0)
        # Inputs of JSON's own kinds only (`_plain`) stay as they are: the run's writes keep
        # their text.
        run = _Run(spec, record, data, inputs_text=(given, text) if plain else None)
        # Written with the first step's dispatch (or the parallel branches' results).
        started = _started_detail(given, text) if plain else {"inputs": given}
        run.pending.append(("FlowStarted", "", started, "running"))
        if spec.kind in ("parallel", "fanout"):
            run.note(_start_notes(run, _next_steps(run)))
        return run

    def _load(self, flow_id: str) -> _Run:
        record = self.runtime.store.get_flow(flow_id)
        if record is None:
            raise KeyError(f"no flow run {flow_id!r}")
        return _Run(self._spec(record.flow), record, _stored_data(record))


def _flow_id(flow: str, instance: str, inputs: str) -> str:
    """A run's id from its flow, instance and the canonical JSON text of its inputs."""
    return "flw_" + derive_event_id(flow, instance, inputs)[4:]


def _plain(inputs: Mapping[str, Any]) -> bool:
    """Whether every input is named by a str and is a str, int, bool or None, which JSON
    gives back as they were (so their JSON text is that of their round trip)."""
    for name, value in inputs.items():
        if type(name) is not str or type(value) not in _PLAIN:
            return False
    return True


_PLAIN = (str, int, bool, type(None))


def _stored_data(record: FlowRecord) -> dict[str, Any]:
    """A stored run's data, decoded; StoreIntegrityError (not a bare JSON or key error) if it
    is not a run's: a row sealed by this runtime always is, so only a store without a key
    (nothing sealed) or one changed outside it gets here."""
    try:
        data = json.loads(record.data)
    except ValueError:
        data = None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("inputs"), dict)
        and isinstance(data.get("values"), dict)
        and isinstance(data.get("steps"), dict)
        and isinstance(data.get("order"), list)
    ):
        raise StoreIntegrityError(
            f"the flows row {record.flow_id!r} ({record.flow} on '{record.instance}') holds "
            "data that is not a flow run's",
            hint="the store was changed outside autonomic: restore it from a backup",
        )
    return data


def _taken_over(error: BaseException, record: FlowRecord) -> bool:
    """Whether `error` says another driver has the run: a step's claim taken over (R026), or
    the run's own record moved (R020 on its flow id, not a receiver's), alone or as every
    error of a parallel flow's branches (an asyncio TaskGroup's group)."""
    if isinstance(error, BaseExceptionGroup):
        _, rest = error.split(
            lambda e: not isinstance(e, BaseExceptionGroup) and _taken_over(e, record)
        )
        return rest is None
    if isinstance(error, OutsideClaimLost):
        return True
    return (
        isinstance(error, ConcurrentUpdateDetected)
        and error.machine == record.flow
        and error.instance == record.flow_id
    )


def _all_steps(spec: FlowSpec) -> Iterable[FlowStepSpec]:
    yield from spec.steps
    for steps in spec.branches.values():
        yield from steps
