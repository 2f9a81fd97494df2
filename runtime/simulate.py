"""`autonomic simulate`: run one generated governor through a scripted sequence, print the trace.

A script is YAML (or JSON, which YAML reads too):

    instance: ent-1                  # default sim-1
    actor: alice                     # default actor of every step (default: system)
    start: 2026-01-01T00:00:00Z      # virtual clock start (default: this fixed instant)
    guards:                          # fixed guard outcomes (a guard not listed holds)
      is_authorized_approver: true
    settings:                        # the machine's settings, if it declares any
      grace_period: 7d
    steps:
      - dispatch: Approve            # an event ...
        payload: {approver: bob}
        actor: bob
        event_id: evt-1              # optional, like idempotency_key
        guards: {is_authorized_approver: false}   # outcomes for this step only
        expect: Rejected             # optional: the state after the step, or `rejected`
      - advance: 24h                 # ... or a clock advance, which fires due timers
        expect: PendingApproval

The trace shows each step's transition, guards consulted, actions run, timers armed,
cancelled and fired, emitted events, escalation notifications and ledger entries, then
verifies the (in-memory, freshly signed) ledger. Problems in the script are diagnostics
`script.yaml:7:15: S004 [error] unknown event 'Aprove'` with a hint; exit 1, no traceback.
Payloads are checked against the event's model before anything runs, unless the step says
`expect: rejected` (a deliberately bad payload); the virtual clock stays within 1970-9000.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import yaml
from autonomic.diagnostics import printable, render
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from .dispatch import Governor
from .errors import (
    InvalidTransition,
    PayloadEncodingError,
    PayloadInvalid,
    RuntimeFailure,
    StoreConfigError,
    failure_diagnostic,
)
from .inputs import payload_error_message
from .keys import Signer
from .ledger import LedgerEntry, LedgerSealer
from .notice_deadlines import parse_notice_id
from .resilience.deadlines import DAY_MS
from .results import DispatchResult, TimerFiring
from .runtime import Runtime
from .store.base import Store
from .store.locate import open_store, redact
from .store.memory import MemoryStore
from .tables import MachineSpec, TransitionContext
from .timers import ArmedTimer, VirtualClock, format_duration, format_instant, parse_duration

__all__ = ["ScriptError", "load_machine", "run_simulation"]

DEFAULT_START = "2026-01-01T00:00:00Z"
GENERATED_PACKAGE = "autonomic.generated"
_SIMULATION_SEED = hashlib.sha256(b"autonomic simulate: a throwaway, public key").digest()
STEP_KEYS = frozenset(
    {"dispatch", "advance", "payload", "actor", "event_id", "idempotency_key", "guards", "expect"}
)
SCRIPT_KEYS = frozenset({"machine", "instance", "actor", "start", "guards", "settings", "steps"})
REJECTED = "rejected"
# The virtual clock stays where timestamps print and encode (ledger, ISO 8601).
EARLIEST_START = "1970-01-01T00:00:00Z"
LATEST_INSTANT = "9000-01-01T00:00:00Z"
MAX_STEPS = 10_000
MAX_SCRIPT_BYTES = 4 << 20
MAX_PAYLOAD_VALUES = 10_000  # YAML aliases can make a short text into a huge payload
MAX_NESTING = 50
PLAIN_VALUES = "write plain YAML values: text, numbers, true/false, dates, lists and mappings"

# Every code a script problem can have, with the hint given when the problem has no better one.
SCRIPT_HINTS: dict[str, str] = {
    "S001": "pass a YAML or JSON script file saved as UTF-8",
    "S002": "fix the YAML (or JSON) syntax at this position",
    "S003": "a script is a mapping with `steps:`, a list of `dispatch: Event` (with optional "
    "payload, actor, event_id, idempotency_key, guards, expect) or `advance: 24h` steps",
    "S004": "use an event the machine declares",
    "S005": "use a guard the machine names",
    "S006": "write a duration such as 90s, 24h or 1d12h",
    "S007": "the trace above shows the state after each step",
    "S008": "fix the payload, or add `expect: rejected` to a step that sends a bad one on purpose",
    "S010": "pass a machine name after `autonomic build` (e.g. entitlement), or the path of a "
    "generated .py file",
}


# ---------------------------------------------------------------------------------------------
# Diagnostics.


class ScriptError(Exception):
    """A problem with the simulation's input, at a position in a file (1-based)."""

    def __init__(
        self, path: str, line: int, column: int, code: str, message: str, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.path, self.line, self.column = path, line, column
        self.code, self.message, self.hint = code, message, hint
        self.source: str | None = None  # the file's text, when it could be read

    def render(self, source: str | None = None) -> str:
        """`path:line:col: CODE [error] message`, the source line with a caret, the hint."""
        source = self.source if source is None else source
        return render(
            self.path,
            self.code,
            self.message,
            self.hint or SCRIPT_HINTS.get(self.code),
            line=self.line,
            column=self.column,
            source_lines=None if source is None else source.splitlines(),
        )


def _did_you_mean(name: str, pool: list[str]) -> str | None:
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


# ---------------------------------------------------------------------------------------------
# Finding the machine.


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _spec_of(module: ModuleType, where: str) -> MachineSpec:
    spec = getattr(module, "MACHINE", None)
    if not isinstance(spec, MachineSpec):
        raise ScriptError(
            where,
            1,
            1,
            "S010",
            "not a generated governor module (it has no MACHINE)",
            "pass a module written by `autonomic build`",
        )
    return spec


def _import_failure(target: str, exc: BaseException) -> ScriptError:
    return ScriptError(
        target,
        1,
        1,
        "S010",
        f"the module fails to import: {type(exc).__name__}: {exc}",
        "rebuild it with `autonomic build`, or pass another generated module",
    )


def load_machine(target: str) -> MachineSpec:
    """A MachineSpec from a generated module: a .py path, a dotted module name, or a module
    name (`quota_sla`) or machine name (`QuotaSla`), looked up first in ./generated (what
    `autonomic build` just wrote) and then in the installed autonomic.generated package."""
    if target.endswith(".fsm"):
        raise ScriptError(
            target,
            1,
            1,
            "S010",
            "is a machine file; simulate runs the module `autonomic build` generates from it",
            f"run `autonomic build`, then pass the machine name: {Path(target).stem}",
        )
    if not target.endswith(".py") and "." not in target and "/" not in target:
        built = Path("generated") / f"{_snake(target)}.py"
        if built.is_file():
            target = str(built)
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ScriptError(target, 1, 1, "S010", "no such generated module file")
        loader_spec = importlib.util.spec_from_file_location(f"_simulated_{path.stem}", path)
        if loader_spec is None or loader_spec.loader is None:
            raise ScriptError(target, 1, 1, "S010", "cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # also SystemExit: the file is not a generated module
            raise _import_failure(target, exc) from None
        return _spec_of(module, target)
    name = target if "." in target else f"{GENERATED_PACKAGE}.{_snake(target)}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        available = _generated_modules()
        hint = _did_you_mean(_snake(target), available) or (
            f"generated modules: {', '.join(available)}"
            if available
            else "run `autonomic build` first, or pass the path of a generated .py file"
        )
        raise ScriptError(target, 1, 1, "S010", f"no generated module '{name}'", hint) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise _import_failure(target, exc) from None
    return _spec_of(module, target)


def _generated_modules() -> list[str]:
    try:
        package = importlib.import_module(GENERATED_PACKAGE)
    except ModuleNotFoundError:
        return []
    return sorted(getattr(package, "MODULES", ()))


# ---------------------------------------------------------------------------------------------
# Reading the script (YAML nodes keep their positions for diagnostics).


@dataclass(frozen=True)
class Step:
    index: int
    line: int
    column: int
    dispatch: str | None = None
    advance_ms: int | None = None
    advance_text: str | None = None
    payload: dict[str, Any] | None = None
    actor: str | None = None
    event_id: str | None = None
    idempotency_key: str | None = None
    guards: Mapping[str, bool] = field(default_factory=dict)
    expect: str | None = None


@dataclass(frozen=True)
class Script:
    path: str
    source: str
    instance: str
    actor: str
    start_ms: int
    guards: Mapping[str, bool]
    steps: tuple[Step, ...]
    settings: Mapping[str, str] = field(default_factory=dict)


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(
        self, node: yaml.Node, code: str, message: str, hint: str | None = None
    ) -> ScriptError:
        mark = node.start_mark
        return ScriptError(self.path, mark.line + 1, mark.column + 1, code, message, hint)

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, "S003", f"{what} must be a mapping")
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise self.fail(key, "S003", f"keys of {what} must be names")
            name = str(key.value)
            if name in found:
                raise self.fail(key, "S003", f"'{name}' is given twice in {what}")
            found[name] = (key, value)
        return found

    def value(self, node: yaml.Node) -> Any:
        """The node's value (safe tags only), with YAML dates as ISO text and no alias cycles."""
        try:
            # A fresh constructor each time: one that failed keeps half-built state.
            value = yaml.constructor.SafeConstructor().construct_document(node)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise self.fail(
                node, "S003", f"cannot read this value: {problem}", PLAIN_VALUES
            ) from None
        except (ValueError, TypeError, OverflowError) as exc:  # 2026-13-45 is a YAML date
            raise self.fail(node, "S003", f"cannot read this value: {exc}", PLAIN_VALUES) from None
        try:
            return _jsonable(value, [MAX_PAYLOAD_VALUES], ())
        except ValueError as exc:
            raise self.fail(node, "S003", str(exc), PLAIN_VALUES) from None

    def text(self, node: yaml.Node, what: str) -> str:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.fail(node, "S003", f"{what} must be text")
        return str(value)

    def flag(self, node: yaml.Node, what: str) -> bool:
        value = self.value(node)
        if not isinstance(value, bool):
            raise self.fail(node, "S003", f"{what} must be true or false", "write true or false")
        return value

    def unknown_keys(
        self, found: Mapping[str, tuple[yaml.Node, yaml.Node]], allowed: frozenset[str], what: str
    ) -> None:
        for name, (key, _) in found.items():
            if name not in allowed:
                raise self.fail(
                    key,
                    "S003",
                    f"unknown key '{name}' in {what}",
                    _did_you_mean(name, sorted(allowed)) or f"keys: {', '.join(sorted(allowed))}",
                )


def _jsonable(value: Any, budget: list[int], ancestors: tuple[int, ...]) -> Any:
    """YAML dates and times as ISO text, so payload models parse them as JSON input would.

    `budget` counts the values still allowed (YAML aliases can expand a few lines into
    millions of values); a value that contains itself is refused.
    """
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"the value is too large (over {MAX_PAYLOAD_VALUES} items)")
    if len(ancestors) > MAX_NESTING:
        raise ValueError(f"the value is nested more than {MAX_NESTING} levels deep")
    if isinstance(value, _dt.datetime | _dt.date):
        return value.isoformat()
    if isinstance(value, dict | list):
        if id(value) in ancestors:
            raise ValueError("the value contains itself (a YAML alias cycle)")
        inner = (*ancestors, id(value))
        if isinstance(value, dict):
            return {k: _jsonable(v, budget, inner) for k, v in value.items()}
        return [_jsonable(v, budget, inner) for v in value]
    return value


def _instant(text: str) -> int:
    moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return int(moment.timestamp() * 1000)


def _compose(path: str, source: str) -> yaml.Node | None:
    try:
        return yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise ScriptError(path, line, column, "S002", f"syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise ScriptError(path, 1, 1, "S002", f"syntax error: {exc}") from None
    except RecursionError:
        raise ScriptError(path, 1, 1, "S002", "the script is nested too deeply") from None


def _payload_problem(
    reader: _Reader,
    spec: MachineSpec,
    event: str,
    payload: dict[str, Any] | None,
    step: yaml.Node,
    payload_node: yaml.Node | None,
) -> ScriptError | None:
    """The first way `payload` does not fit the event's generated model, at its position."""
    model = spec.payloads.get(event)
    if model is None:
        if not payload:
            return None
        assert payload_node is not None
        return reader.fail(
            payload_node,
            "S008",
            f"{spec.name}.{event} takes no payload",
            "remove the payload, or add `expect: rejected` to send it on purpose",
        )
    try:
        model.model_validate(payload or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(payload)"
        where = payload_node if payload_node is not None else step
        if isinstance(payload_node, yaml.MappingNode) and error["loc"]:
            for key, value in payload_node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(error["loc"][0]):
                    where = key if error["type"] == "extra_forbidden" else value
        fields = ", ".join(
            f"{name}{'' if info.is_required() else '?'}"
            for name, info in model.model_fields.items()
        )
        return reader.fail(
            where,
            "S008",
            f"invalid payload for {spec.name}.{event}: field '{field}': "
            f"{payload_error_message(error)}",
            f"{event} takes: {fields}; add `expect: rejected` to send a bad payload on purpose",
        )
    return None


def _script_text(path: str) -> str:
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_SCRIPT_BYTES + 1)  # bounded: /dev/zero never ends
        source = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScriptError(path, 1, 1, "S001", "the script is not UTF-8 text") from None
    except OSError as exc:
        raise ScriptError(
            path, 1, 1, "S001", f"cannot read the script: {exc.strerror or exc}"
        ) from None
    if len(data) > MAX_SCRIPT_BYTES:
        raise ScriptError(
            path,
            1,
            1,
            "S001",
            f"the script is larger than {MAX_SCRIPT_BYTES >> 20} MiB",
            "a script lists steps by hand: split a long one into several",
        )
    return source


def read_script(path: str, spec: MachineSpec) -> Script:
    """Parse and check a script against the machine: events, guards, states, durations,
    payloads, and that the virtual clock stays in range."""
    source = _script_text(path)
    try:
        return _parse_script(path, source, spec)
    except ScriptError as problem:
        problem.source = source  # so the diagnostic can show the line
        raise


def _parse_script(path: str, source: str, spec: MachineSpec) -> Script:
    reader = _Reader(path)
    root = _compose(path, source)
    if root is None:
        raise ScriptError(path, 1, 1, "S003", "the script is empty", "give at least `steps:`")
    top = reader.mapping(root, "the script")
    reader.unknown_keys(top, SCRIPT_KEYS, "the script")
    guard_names = sorted(spec.guards)
    event_names = sorted(str(e) for e in spec.event_type)
    state_names = sorted(str(s) for s in spec.state_type)

    def guards_of(node: yaml.Node, what: str) -> dict[str, bool]:
        outcomes: dict[str, bool] = {}
        for name, (key, value) in reader.mapping(node, what).items():
            if name not in spec.guards:
                raise reader.fail(
                    key,
                    "S005",
                    f"{spec.name} has no guard '{name}'",
                    _did_you_mean(name, guard_names)
                    or f"guards: {', '.join(guard_names) or 'none'}",
                )
            outcomes[name] = reader.flag(value, f"guard '{name}'")
        return outcomes

    def name_of(node: yaml.Node, what: str) -> str:
        text = reader.text(node, what)
        if not text:
            raise reader.fail(node, "S003", f"{what} must not be empty", f"give the {what} a name")
        return text

    instance = name_of(top["instance"][1], "instance") if "instance" in top else "sim-1"
    actor = name_of(top["actor"][1], "actor") if "actor" in top else "system"
    start_text = DEFAULT_START
    if "start" in top:
        raw = reader.value(top["start"][1])
        start_text = str(raw)
    latest_ms = _instant(LATEST_INSTANT)
    try:
        start_ms = _instant(start_text)
    except (ValueError, OverflowError, OSError):
        start_ms = None
    if start_ms is None or not _instant(EARLIEST_START) <= start_ms < latest_ms:
        raise reader.fail(
            top["start"][1],
            "S003",
            f"start {start_text!r} is not an ISO 8601 time from {EARLIEST_START[:4]} "
            f"to {LATEST_INSTANT[:4]}",
            "for example 2026-01-01T00:00:00Z",
        )
    guards = guards_of(top["guards"][1], "guards") if "guards" in top else {}
    settings: dict[str, str] = {}
    if "settings" in top:
        for name, (_, value) in reader.mapping(top["settings"][1], "settings").items():
            if not isinstance(value, yaml.ScalarNode):
                raise reader.fail(value, "S003", f"setting '{name}' must be a duration", "e.g. 7d")
            settings[name] = str(value.value)
    if "steps" not in top:
        raise reader.fail(root, "S003", "the script has no steps", "add `steps:` with a list")
    steps_node = top["steps"][1]
    if not isinstance(steps_node, yaml.SequenceNode):
        raise reader.fail(steps_node, "S003", "steps must be a list")
    if len(steps_node.value) > MAX_STEPS:
        raise reader.fail(steps_node, "S003", f"more than {MAX_STEPS} steps")
    steps: list[Step] = []
    clock_ms = start_ms
    for index, node in enumerate(steps_node.value, 1):
        found = reader.mapping(node, f"step {index}")
        reader.unknown_keys(found, STEP_KEYS, f"step {index}")
        kinds = [k for k in ("dispatch", "advance") if k in found]
        if len(kinds) != 1:
            raise reader.fail(
                node, "S003", f"step {index} must have exactly one of `dispatch` and `advance`"
            )
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        values: dict[str, Any] = {}
        if "dispatch" in found:
            value = found["dispatch"][1]
            event = reader.text(value, "dispatch")
            if event not in event_names:
                raise reader.fail(
                    value,
                    "S004",
                    f"{spec.name} has no event '{event}'",
                    _did_you_mean(event, event_names) or f"events: {', '.join(event_names)}",
                )
            values["dispatch"] = event
        else:
            value = found["advance"][1]
            text = reader.text(value, "advance")
            try:
                advance_ms = parse_duration(text)
            except ValueError as exc:
                raise reader.fail(value, "S006", str(exc)) from None
            clock_ms += advance_ms
            if clock_ms >= latest_ms:
                raise reader.fail(
                    value,
                    "S006",
                    f"advancing by {text} takes the virtual clock past {LATEST_INSTANT}",
                    f"advance by less: the clock starts at `start` (default {DEFAULT_START})",
                )
            values["advance_ms"] = advance_ms
            values["advance_text"] = text
            for extra in ("payload", "actor", "event_id", "idempotency_key", "guards"):
                if extra in found:
                    raise reader.fail(
                        found[extra][0], "S003", f"`{extra}` belongs to a dispatch step"
                    )
        if "payload" in found:
            payload = reader.value(found["payload"][1])
            if payload is not None and not isinstance(payload, dict):
                raise reader.fail(found["payload"][1], "S003", "payload must be a mapping")
            values["payload"] = payload or None
        for name in ("actor", "event_id", "idempotency_key"):
            if name in found:
                values[name] = name_of(found[name][1], name)
        if "guards" in found:
            values["guards"] = guards_of(found["guards"][1], f"guards of step {index}")
        if "expect" in found:
            expected = reader.text(found["expect"][1], "expect")
            if expected == REJECTED and "dispatch" not in found:
                raise reader.fail(
                    found["expect"][1],
                    "S003",
                    f"only a dispatch step can expect `{REJECTED}`",
                    "expect the state the clock advance leads to",
                )
            if expected != REJECTED and expected not in state_names:
                raise reader.fail(
                    found["expect"][1],
                    "S003",
                    f"{spec.name} has no state '{expected}'",
                    _did_you_mean(expected, state_names) or f"expect a state or `{REJECTED}`",
                )
            values["expect"] = expected
        if "dispatch" in values and values.get("expect") != REJECTED:
            problem = _payload_problem(
                reader,
                spec,
                values["dispatch"],
                values.get("payload"),
                node,
                found["payload"][1] if "payload" in found else None,
            )
            if problem is not None:
                raise problem
        steps.append(Step(index, line, column, **values))
    return Script(path, source, instance, actor, start_ms, guards, tuple(steps), settings)


# ---------------------------------------------------------------------------------------------
# Running it.


@dataclass
class _Recorder:
    """Scripted guard outcomes, and a log of guard and action calls: (timer id or None, text)."""

    outcomes: dict[str, bool]
    step_outcomes: dict[str, bool] = field(default_factory=dict)
    calls: list[tuple[str | None, str]] = field(default_factory=list)

    def guard(self, name: str) -> Callable[[TransitionContext], bool]:
        def check(ctx: TransitionContext) -> bool:
            if name in self.step_outcomes:
                held, source = self.step_outcomes[name], "step"
            elif name in self.outcomes:
                held, source = self.outcomes[name], "script"
            else:
                held, source = True, "default"
            self.calls.append((ctx.timer, f"guard {name} -> {str(held).lower()} ({source})"))
            return held

        return check

    def action(self, name: str) -> Callable[[TransitionContext], None]:
        def run(ctx: TransitionContext) -> None:
            self.calls.append((ctx.timer, f"do {name}"))

        return run

    def take(self, timer: str | None) -> list[str]:
        """The calls made for one dispatch (timer None) or one timer firing, in order."""
        mine = [text for owner, text in self.calls if owner == timer]
        self.calls = [(owner, text) for owner, text in self.calls if owner != timer]
        return mine


class _Trace:
    def __init__(self, out: IO[str], start_ms: int) -> None:
        self.out = out
        self.start_ms = start_ms

    def when(self, ms: int) -> str:
        return f"T+{format_duration(ms - self.start_ms)}"

    def line(self, text: str, indent: int = 0) -> None:
        # Names and payload text come from the script: never let them drive the terminal.
        self.out.write("  " * indent + printable(text) + "\n")

    def result(self, result: DispatchResult, head: str, calls: list[str], indent: int) -> None:
        seq = "" if result.seq is None else f", ledger #{result.seq}"
        self.line(
            f"{head}: {result.from_state or '(new)'} -> {result.to_state} (v{result.version}{seq})",
            indent,
        )
        for call in calls:
            self.line(call, indent + 2)
        for emitted in result.emitted:
            self.line(
                f"emit {emitted.machine}.{emitted.event} to '{emitted.instance}' "
                f"(event id {emitted.event_id})",
                indent + 2,
            )
        for notice in result.notifications:
            by = (
                ""
                if notice.deadline_ms is None
                else f" by {self.when(notice.deadline_ms)} ({format_instant(notice.deadline_ms)})"
            )
            message = f' "{notice.message}"' if notice.message else ""
            self.line(f"notify {notice.kind} {notice.recipient}{message}{by}", indent + 2)

    def timers(
        self, before: list[ArmedTimer], after: list[ArmedTimer], fired: set[ArmedTimer]
    ) -> None:
        for timer in before:
            if timer not in after and timer not in fired:
                self.line(f"cancelled {timer.timer_id}", 2)
        for timer in after:
            if timer not in before:
                self.line(
                    f"armed {timer.timer_id} due {self.when(timer.due_ms)} "
                    f"({format_instant(timer.due_ms)})",
                    2,
                )


def _entry_line(entry: LedgerEntry) -> str:
    return (
        f"#{entry.seq} {entry.kind:<10} {entry.from_state or '(new)'} -> {entry.to_state} "
        f"on {entry.event} by {entry.actor} hash {entry.entry_hash.hex()[:16]}"
    )


def _run_dispatch(
    governor: Governor, script: Script, step: Step, trace: _Trace, recorder: _Recorder
) -> RuntimeFailure | None:
    assert step.dispatch is not None
    actor = step.actor or script.actor
    head = f"[{trace.when(governor.runtime.clock.now_ms())}] step {step.index} "
    head += f"dispatch {step.dispatch} by {actor}"
    try:
        result = governor.dispatch(
            script.instance,
            step.dispatch,
            step.payload,
            actor,
            event_id=step.event_id,
            idempotency_key=step.idempotency_key,
        )
    except RuntimeFailure as failure:
        trace.line(f"{head}: rejected: {failure.code} {failure.message}")
        for call in recorder.take(None):
            trace.line(call, 2)
        if failure.hint and not isinstance(failure, InvalidTransition):
            trace.line(f"hint: {failure.hint}", 2)
        return failure
    if result.ignored:
        trace.line(f"{head}: ignored in {result.from_state} (nothing recorded)")
    elif result.duplicate:
        trace.result(result, f"{head} (duplicate: the stored result)", recorder.take(None), 0)
    else:
        trace.result(result, head, recorder.take(None), 0)
    return None


def _run_advance(
    runtime: Runtime, step: Step, trace: _Trace, recorder: _Recorder
) -> tuple[RuntimeFailure | None, set[ArmedTimer]]:
    assert step.advance_ms is not None
    clock = runtime.clock
    assert isinstance(clock, VirtualClock)
    clock.advance(step.advance_ms)
    trace.line(f"[{trace.when(clock.now_ms())}] step {step.index} advance {step.advance_text}")
    failed: RuntimeFailure | None = None
    before = max((e.seq for e in runtime.store.ledger_entries()), default=-1)
    sent = len(runtime.notifications(status=None))
    try:
        firings: list[TimerFiring] = runtime.fire_due()
    except RuntimeFailure as failure:
        failed = failure
        trace.line(f"timer failed: {failure.code} {failure.message}", 1)
        firings = []
    # The notices' missed deadlines escalate among the firings, in the order they fell due;
    # each with its notification, written in the same unit and in the same order.
    bodies = [json.loads(m.body) for m in runtime.notifications(status=None)[sent:]]
    passed = [b for b in bodies if (b["message"] or "").startswith("deadline passed")]
    missed = [
        (e, n)
        for e, n in zip(
            (
                e
                for e in runtime.store.ledger_entries(after_seq=before)
                if e.kind == "escalation" and e.event == "DeadlineMissed"
            ),
            passed,
            strict=False,
        )
    ]
    for firing in firings:
        while missed and (firing.result.seq is None or missed[0][0].seq < firing.result.seq):
            _missed_deadline(trace, *missed.pop(0))
        timer = firing.timer
        head = f"[{trace.when(timer.due_ms)}] {firing.kind} {timer.timer_id} fired"
        trace.result(firing.result, head, recorder.take(timer.timer_id), 1)
    for entry, notice in missed:
        _missed_deadline(trace, entry, notice)
    return failed, {firing.timer for firing in firings}


def _missed_deadline(trace: _Trace, entry: LedgerEntry, notice: Mapping[str, Any]) -> None:
    """A notice's deadline, missed at the time shown (a notice is due again a day after its
    miss), escalated by the due work."""
    parsed = parse_notice_id(entry.instance.removeprefix("deadline:"))
    what = entry.instance if parsed is None else f"notice {parsed[1]}"
    level = entry.to_state.removeprefix("level")
    again = notice["deadline_ms"]
    trace.line(
        f"[{trace.when(again - DAY_MS)}] deadline of {what} missed: escalated to level {level} "
        f"(ledger #{entry.seq}), due again {trace.when(again)}",
        1,
    )


def _simulate(
    spec: MachineSpec, script: Script, out: IO[str], err: IO[str], store: Store | None = None
) -> int:
    """Run the steps (in memory, or on `store`); returns the number of failed expectations
    (each also reported)."""
    # A fixed, publicly known key: the trace (whose hashes the genesis entry's key feeds) is
    # deterministic, and a simulation's ledger is never evidence of anything.
    signer = Signer.from_private_key(Ed25519PrivateKey.from_private_bytes(_SIMULATION_SEED))
    clock = VirtualClock(script.start_ms)
    sealer = LedgerSealer(signer, "checkpoint")
    runtime = Runtime(MemoryStore() if store is None else store, clock=clock, sealer=sealer)
    recorder = _Recorder(dict(script.guards))
    governor = runtime.load(
        spec,
        {name: recorder.guard(name) for name in spec.guards},
        {name: recorder.action(name) for name in spec.actions},
        dict(script.settings),
    )
    trace = _Trace(out, script.start_ms)
    trace.line(
        f"simulate {spec.name} ({spec.source_path}) instance '{script.instance}' "
        f"from {format_instant(script.start_ms)}"
    )
    created = governor.create(script.instance, script.actor)
    trace.result(created, f"[T+0s] create '{script.instance}'", recorder.take(None), 0)
    armed = governor.timers(script.instance)
    trace.timers([], armed, set())
    failures = 0
    for step in script.steps:
        recorder.step_outcomes = dict(step.guards)
        fired: set[ArmedTimer] = set()
        if step.dispatch is not None:
            rejected = _run_dispatch(governor, script, step, trace, recorder)
        else:
            rejected, fired = _run_advance(runtime, step, trace, recorder)
        if isinstance(rejected, PayloadInvalid | PayloadEncodingError) and step.expect is None:
            # The payload passed its model but not the ledger's encoding (a lone surrogate):
            # still the script's mistake, not an outcome to explore.
            failures += 1
            problem = ScriptError(
                script.path,
                step.line,
                step.column,
                "S008",
                f"step {step.index}: {rejected.message}",
            )
            err.write(problem.render(script.source) + "\n")
        after = governor.timers(script.instance)
        trace.timers(armed, after, fired)
        armed = after
        if step.expect is not None:
            record = governor.get(script.instance)
            state = record.state if record is not None else "(none)"
            actual = REJECTED if rejected is not None and step.dispatch is not None else state
            if step.expect != actual:
                failures += 1
                problem = ScriptError(
                    script.path,
                    step.line,
                    step.column,
                    "S007",
                    f"step {step.index} expected {step.expect}, got {actual}",
                )
                trace.line(f"expectation failed: {problem.message}", 1)
                err.write(problem.render(script.source) + "\n")
    runtime.checkpoint()
    trace.line("ledger:")
    for entry in runtime.ledger():
        trace.line(_entry_line(entry), 1)
    outbox = runtime.store.outbox()
    if outbox:
        trace.line("outbox (pending):")
        for message in outbox:
            target = (
                f"{message.target_machine}.{message.event} to '{message.target_instance}'"
                if message.kind == "event"
                else f"{message.target_machine} {message.target_instance}"
            )
            trace.line(f"{message.kind} {target}", 1)
    report = runtime.verify(signer.public_info())
    if not report.ok:
        trace.line(f"ledger verification FAILED at seq {report.index}: {report.reason}")
        return failures + 1
    record = governor.get(script.instance)
    if record is not None:
        trace.line(f"final state: {record.state} (v{record.version})")
    trace.line(f"ledger verified: {report.count} entries")
    return failures


def run_simulation(
    machine: str, script_path: str, out: IO[str], err: IO[str], *, store: str | None = None
) -> int:
    """The command: 0 when every expectation held, 1 on a script problem or failed expectation.
    `store`: run on this SQLite file or postgresql:// URL instead of in memory; it must hold
    no ledger yet (the simulation signs with a key of its own and verifies what it wrote)."""
    try:
        spec = load_machine(machine)
        script = read_script(script_path, spec)
    except ScriptError as problem:
        err.write(problem.render() + "\n")
        return 1
    opened: Store | None = None
    if store is not None:
        try:
            opened = open_store(store)
            if opened.ledger_mode() is not None:
                opened.close()
                raise StoreConfigError(
                    "the store already holds a ledger; simulate signs a fresh one",
                    hint="pass a new SQLite file or an empty PostgreSQL database or schema",
                )
        except RuntimeFailure as failure:
            err.write(failure_diagnostic(redact(store), failure, "pass a new store") + "\n")
            return 1
    try:
        failures = _simulate(spec, script, out, err, opened)
    except ScriptError as problem:
        err.write(problem.render() + "\n")
        return 1
    except RuntimeFailure as failure:
        # Only the script's own values reach the runtime outside a step (the instance id, the
        # actor of `create`): the script is where to look.
        hint = "check the script's instance and actor"
        err.write(failure_diagnostic(script_path, failure, hint) + "\n")
        return 1
    finally:
        if opened is not None:
            opened.close()
    return 1 if failures else 0
