"""A flow run as the runner drives it: its stored record and data, what a caller sees of it
(FlowResult, StepContext, the errors a hook raises), and how a step's outcome is recorded in
the data."""

from __future__ import annotations

import hashlib
from _json import encode_basestring_ascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import (
    ActionFailed,
    IdempotencyConflict,
    InvalidTransition,
    PayloadEncodingError,
    PayloadInvalid,
    RuntimeFailure,
    UnknownEvent,
)
from ..resilience.errors import is_unanswered
from ..results import DispatchResult, _dumps, event_id_prefix
from ..store.base import FLOW_FINISHED, FlowRecord, FlowStatus
from ..tables import FlowSpec, FlowStepSpec

StepStatus = Literal["started", "succeeded", "failed", "timed_out", "compensated", "uncompensated"]
# What a step's dispatch may answer with that fails the step rather than the process.
_STEP_FAILURES = (
    InvalidTransition,
    ActionFailed,
    PayloadEncodingError,
    PayloadInvalid,
    UnknownEvent,
    IdempotencyConflict,
)


class StepFailed(RuntimeFailure):
    """Raised by a `before_step` hook (or a compute function) to fail a step on purpose."""

    code = "R030"


class NoReply(StepFailed):
    """Raised by a `before_step` hook: the step's receiver does not answer (yet). A fanout
    branch without a reply is tried again by each resume until the fanout's deadline; any
    other step or compensation is tried again from the store after a backoff (compensation.py). The
    receiver's action failing transiently or as unavailable, its breaker open or its bulkhead
    full (see runtime/resilience/errors.py) counts the same."""

    code = "R032"


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a `before_step` hook sees: `phase` is "do" for the step, "undo" for its
    compensation."""

    flow: str
    flow_id: str
    instance: str
    step: str
    phase: Literal["do", "undo"]


@dataclass(frozen=True, slots=True)
class FlowResult:
    """A run as stored: its status, each step's status, the failed step and why, computed
    values and (fanout) the gathered replies."""

    flow_id: str
    flow: str
    instance: str
    status: FlowStatus
    steps: Mapping[str, str]
    failed_step: str | None = None
    reason: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    gathered: Mapping[str, str] | None = None

    @property
    def finished(self) -> bool:
        return self.status in FLOW_FINISHED

    @property
    def uncompensated(self) -> tuple[str, ...]:
        """The steps whose compensation the receiver refused (the run ended "failed" with
        their effect in place: a person must look)."""
        return tuple(name for name, status in self.steps.items() if status == "uncompensated")


_Note = tuple[str, str, Mapping[str, Any]]


class _Detail(dict[str, Any]):
    """An entry's detail whose payload digest is known already (`steps._detail_digest`):
    a run's FlowStarted, whose start has its inputs' JSON text (`steps._started_detail`)."""

    __slots__ = ("digest",)
    digest: bytes


# The same with the run's status when it happened (the entry's to_state).
_Entry = tuple[str, str, Mapping[str, Any], FlowStatus]


@dataclass
class _Run:
    """A run being driven: the stored record and its decoded data."""

    spec: FlowSpec
    record: FlowRecord
    data: dict[str, Any]
    # Ledger notes not yet written: the next write carries them (a result is written with
    # the next step's dispatch, in one commit; lost in a crash, it is found again by
    # repeating the step, whose dispatch its event id deduplicates).
    # Each with the run's status when it happened, the entry's to_state.
    pending: list[_Entry] = field(default_factory=list)
    # The hash its event ids start from ("flow" and its id): its sends' and its writes' ids
    # are derived from copies of it (results.derive_from), those two parts hashed once.
    ids: hashlib._Hash = field(init=False, repr=False, compare=False)
    # Parts of `data` as a write found them, with their JSON text (`data_text`): the inputs;
    # the computed values, a copy and the text; per step name, its entry, a copy of it and
    # the text of the pair.
    inputs_text: tuple[object, str] | None = field(default=None, repr=False, compare=False)
    _values: tuple[object, dict[str, Any], str] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _entries: dict[str, tuple[object, dict[str, Any], str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.ids = event_id_prefix(self.record.flow_id, after=_FLOW_IDS)

    def data_text(self) -> str:
        """`_dumps(self.data)`, the run's data as its record holds it, written whole at each
        write: a step's entry equal to what an earlier write encoded is not encoded again
        (nor the inputs and the computed values), when what it holds cannot have changed in
        place (a str, int, float, bool or None; a send's result: a compute function is handed
        the inputs and the computed values, a result only once decoded from the store, apart
        from the values). Nothing here puts an equal value of another type (True for 1) in
        another's place. Keys in `_dumps`'s order: sorted, each a str."""
        data = self.data
        if len(data) != 4:  # a failure's, a branch's, a fanout's: as it is
            return _dumps(data)
        inputs, steps, values = data["inputs"], data["steps"], data["values"]
        held = self.inputs_text
        if held is None or held[0] is not inputs:
            held = (inputs, _dumps(inputs))
            if _flat(inputs):  # nothing changes a run's inputs
                self.inputs_text = held
        inputs_text = held[1]
        kept = self._values
        if kept is not None and kept[0] is values and kept[1] == values:
            values_text = kept[2]
        else:
            values_text = _dumps(values)
            if _flat(values):
                self._values = (values, dict(values), values_text)
        entries = self._entries
        pairs = []
        for name in sorted(steps):
            entry = steps[name]
            known = entries.get(name)
            if known is not None and known[0] is entry and known[1] == entry:
                pairs.append(known[2])
                continue
            pair = _pair_text(name, entry)
            pairs.append(pair)
            if type(entry) is dict and _unshared(entry.get("result"), name, values):
                entries[name] = (entry, dict(entry), pair)
        return (
            f'{{"inputs":{inputs_text},"order":{_dumps(data["order"])},'
            f'"steps":{{{",".join(pairs)}}},"values":{values_text}}}'
        )

    def note(self, notes: Iterable[_Note], status: FlowStatus = "running") -> None:
        self.pending += [(event, step, detail, status) for event, step, detail in notes]

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        steps: dict[str, dict[str, Any]] = self.data["steps"]
        return steps

    def status_of(self, step: str) -> str | None:
        entry = self.steps.get(step)
        return None if entry is None else str(entry["status"])

    def plan(self) -> tuple[FlowStepSpec, ...]:
        spec = self.spec
        if spec.kind == "conditional":
            return spec.branches.get(str(self.data.get("branch")), ())
        return spec.steps


_string = encode_basestring_ascii  # a str's JSON text, as `_dumps` writes it
_SCALARS = (str, int, float, bool, type(None))


def _flat(value: object) -> bool:
    """Whether `value` is a dict of str, int, float, bool or None values only."""
    return type(value) is dict and all(type(v) in _SCALARS for v in value.values())


def _unshared(result: object, name: str, values: object) -> bool:
    """Whether a step's result is one nothing changes in place: not a container that is
    also the step's computed value (which compute functions are handed)."""
    return type(result) in _SCALARS or not (isinstance(values, dict) and values.get(name) is result)


def _pair_text(name: str, entry: object) -> str:
    """A step's name and entry in the run's data as `_dumps` writes them; a send's result,
    {"status": "succeeded", "result": {"state": ..., "seq": ...}}, without the encoder's walk
    (about 14k instructions)."""
    if type(entry) is dict and len(entry) == 2 and entry.get("status") == "succeeded":
        result = entry.get("result")
        if type(result) is dict and len(result) == 2:
            state, seq = result.get("state"), result.get("seq")
            if type(state) is str and type(seq) is int:
                return (
                    f'{_string(name)}:{{"result":{{"seq":{seq},"state":{_string(state)}}},'
                    '"status":"succeeded"}'
                )
    return _dumps({name: entry})[1:-1]


# The hash after a run's ids' first part, "flow" (`_Run.ids`).
_FLOW_IDS = event_id_prefix("flow")


# What a step's dispatch answers with, as _step_outcome takes it (anything else is raised).
_OUTCOMES = (DispatchResult, StepFailed, *_STEP_FAILURES)


def _step_outcome(answer: object) -> tuple[str, Any]:
    """A step's outcome from what its dispatch answered (a result, or the error it raised)."""
    if isinstance(answer, DispatchResult):
        return "succeeded", {"state": answer.to_state, "seq": answer.seq}
    if isinstance(answer, NoReply):
        return "no_reply", answer.message
    if isinstance(answer, StepFailed):
        return "failed", answer.message
    if isinstance(answer, ActionFailed) and is_unanswered(answer.cause):
        return "no_reply", f"{answer.code}: {answer.message}"
    if isinstance(answer, _STEP_FAILURES):
        return "failed", f"{answer.code}: {answer.message}"
    if isinstance(answer, BaseException):
        raise answer
    raise TypeError(f"unexpected dispatch outcome {answer!r}")


def _next_steps(run: _Run) -> list[FlowStepSpec]:
    """The steps to run now: all unfinished ones of a parallel or fanout flow, else the
    first step not yet succeeded."""
    plan = run.plan()
    if run.spec.kind in ("parallel", "fanout"):
        return [s for s in plan if run.status_of(s.name) in (None, "started")]
    steps = run.data["steps"]
    for step in plan:
        entry = steps.get(step.name)
        if entry is None or entry["status"] != "succeeded":
            return [step]
    return []


def _start(run: _Run, step: FlowStepSpec) -> None:
    """`run.note(_start_notes(run, [step]))`: a step of a sequence about to run, started in
    the run's data and noted, unless it was already."""
    steps = run.data["steps"]
    if steps.get(step.name) is None:
        steps[step.name] = {"status": "started"}
        run.pending.append(("StepStarted", step.name, {}, "running"))


def _start_notes(run: _Run, steps: Sequence[FlowStepSpec]) -> list[_Note]:
    notes: list[_Note] = []
    entries = run.steps
    for step in steps:
        if entries.get(step.name) is None:
            entries[step.name] = {"status": "started"}
            notes.append(("StepStarted", step.name, {}))
    return notes


def _step_result(
    run: _Run, step: FlowStepSpec, outcome: tuple[str, Any]
) -> tuple[FlowStatus, list[_Note]]:
    """A step's outcome recorded in the run's data: the run's status after it ("running",
    or "compensating" after a failure) and the entries that say so."""
    status, detail = outcome
    if status == "succeeded":
        _succeed(run, step, detail)
        return "running", [("StepSucceeded", step.name, {"result": detail})]
    if status == "no_reply":  # the callers wait for a reply (_step_settled); here it is a failure
        status = "failed"
    run.steps[step.name] = {"status": status, "error": str(detail)}
    run.data["failed"], run.data["reason"] = step.name, str(detail)
    return "compensating", [("StepFailed", step.name, {"error": str(detail)})]


def _succeed(run: _Run, step: FlowStepSpec, detail: Any) -> None:
    run.data["steps"][step.name] = {"status": "succeeded", "result": detail}
    run.data["order"].append(step.name)
    if step.kind == "compute":
        run.data["values"][step.name] = detail


# FlowResult's slots, in field order, set directly (`_result`).
_RESULT_SETTERS = tuple(getattr(FlowResult, name).__set__ for name in FlowResult.__slots__)


def _result(run: _Run) -> FlowResult:
    """FlowResult of the run, its slots set directly: the frozen dataclass __init__ (nine
    object.__setattr__ calls) costs half as much again, once a run."""
    data, record = run.data, run.record
    result = object.__new__(FlowResult)
    set0, set1, set2, set3, set4, set5, set6, set7, set8 = _RESULT_SETTERS
    set0(result, record.flow_id)
    set1(result, record.flow)
    set2(result, record.instance)
    set3(result, record.status)
    set4(result, {name: str(s["status"]) for name, s in data["steps"].items()})
    set5(result, data.get("failed"))
    set6(result, data.get("reason"))
    set7(result, dict(data["values"]))
    set8(result, data.get("gathered"))
    return result
