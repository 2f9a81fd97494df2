"""Time for the runtime: an injectable Clock, durations, armed deadlines and the Scheduler.

Every instant is an integer count of milliseconds since the Unix epoch (UTC); every duration
is an integer count of milliseconds. Deadlines are stored absolute, so a process that was down
finds them due when it comes back, and a virtual clock moves them in tests without sleeping.
"""

from __future__ import annotations

import datetime as _dt
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import SettingsError
from .tables import MachineSpec, Payload, TimerSpec

__all__ = [
    "ArmedTimer",
    "Clock",
    "DueTimerFirer",
    "Scheduler",
    "SystemClock",
    "TimerPlan",
    "VirtualClock",
    "arm_timers",
    "format_duration",
    "format_instant",
    "parse_duration",
    "resolve_settings",
]

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

_UNIT_MS = {"ms": 1, "s": SECOND_MS, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS, "w": 7 * DAY_MS}
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")


class Clock(Protocol):
    """Where the runtime reads the time; inject a VirtualClock to test deadlines."""

    def now_ms(self) -> int: ...


class SystemClock:
    """Wall-clock UTC time."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class VirtualClock:
    """A clock that moves only when told to (tests, simulations, the demo).

    It starts at the wall-clock time unless given `start_ms`, so entries it stamps fall inside
    the validity window of a signing key generated just before.
    """

    def __init__(self, start_ms: int | None = None) -> None:
        self._now = SystemClock().now_ms() if start_ms is None else start_ms
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        return self._now

    def advance(self, by: int | str | _dt.timedelta) -> int:
        """Move forward by milliseconds, a duration text such as "24h", or a timedelta."""
        step = to_millis(by)
        if step < 0:
            raise ValueError(f"a clock only moves forward; cannot advance by {step} ms")
        with self._lock:
            self._now += step
            return self._now

    def set(self, instant_ms: int) -> None:
        """Jump to an absolute instant that is not earlier than now."""
        with self._lock:
            if instant_ms < self._now:
                raise ValueError(
                    f"a clock only moves forward; {instant_ms} is before {self._now} ms"
                )
            self._now = instant_ms


def parse_duration(text: str) -> int:
    """Milliseconds in a duration written like the machine language: 90s, 24h, 1d12h, 500ms."""
    compact = text.strip().replace(" ", "")
    if not compact:
        raise ValueError("empty duration")
    position = 0
    total = 0
    for match in _PART.finditer(compact):
        if match.start() != position:
            break
        total += int(match.group(1)) * _UNIT_MS[match.group(2)]
        position = match.end()
    if position != len(compact):
        raise ValueError(
            f"invalid duration {text!r}: write a number and a unit (ms, s, m, h, d, w), e.g. 24h"
        )
    return total


def to_millis(value: int | str | _dt.timedelta) -> int:
    """A duration as milliseconds, from an int (ms), a text such as "4h" or a timedelta."""
    if isinstance(value, bool):
        raise TypeError("a duration cannot be a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return parse_duration(value)
    return int(value / _dt.timedelta(milliseconds=1))


def format_duration(ms: int) -> str:
    """The shortest exact text for a duration: 90m -> "1h30m", 86400000 -> "1d"."""
    if ms == 0:
        return "0s"
    sign = "-" if ms < 0 else ""
    rest = abs(ms)
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        size = _UNIT_MS[unit]
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts)


def format_instant(ms: int) -> str:
    """ISO 8601 UTC with milliseconds when they are not zero: 2026-01-02T03:04:05Z."""
    moment = _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if ms % 1000:
        text += f".{ms % 1000:03d}"
    return text + "Z"


@dataclass(frozen=True, slots=True)
class ArmedTimer:
    """A deadline of one instance: fire `timer_id` at `due_ms` if still in `state`.

    `armed_version` is the instance version whose entry into `state` armed it; together with
    the timer id it names this one arming, so a firing has a stable id across restarts.
    """

    machine: str
    instance: str
    timer_id: str
    state: str
    due_ms: int
    armed_version: int

    def arming(self) -> tuple[str, str, str, int]:
        """(machine, instance, timer id, armed version): this arming, whatever its due time."""
        return (self.machine, self.instance, self.timer_id, self.armed_version)

    def row(self) -> tuple[str, str, str, str, int, int]:
        """The timers row's columns, in the stores' column order: the key a store finds this
        one arming by."""
        return (
            self.machine,
            self.instance,
            self.timer_id,
            self.state,
            self.due_ms,
            self.armed_version,
        )


def arm_timers(
    machine: str,
    instance: str,
    specs: Sequence[TimerSpec],
    entered_ms: int,
    version: int,
    payload: Payload | None = None,
    settings: Mapping[str, int] | None = None,
) -> tuple[ArmedTimer, ...]:
    """The deadlines armed by entering a state at `entered_ms` (all measured from entry).
    A timer whose delay is a duration field takes it from `payload`, the entering event's;
    one whose delay is a setting takes it from `settings` (milliseconds, as resolved)."""
    return tuple(
        ArmedTimer(
            machine,
            instance,
            spec.id,
            spec.state,
            entered_ms + _delay_ms(spec, payload, settings),
            version,
        )
        for spec in specs
    )


def _delay_ms(spec: TimerSpec, payload: Payload | None, settings: Mapping[str, int] | None) -> int:
    if spec.after_setting is not None:
        if settings is None or spec.after_setting not in settings:
            raise KeyError(f"setting {spec.after_setting!r} of timer {spec.id} was not supplied")
        return settings[spec.after_setting]
    if spec.after_field is not None:
        # The compiler checked that every event entering the state carries this field.
        value = getattr(payload, spec.after_field, None)
        if not isinstance(value, _dt.timedelta):
            raise ValueError(f"timer {spec.id} needs a duration in field {spec.after_field!r}")
        return max(0, to_millis(value))
    return spec.after_ms


def resolve_settings(
    spec: MachineSpec, given: Mapping[str, int | str | _dt.timedelta] | None
) -> dict[str, int]:
    """The machine's settings in milliseconds, each checked against its declared bounds;
    SettingsError lists every missing, unknown, malformed or out-of-bounds one."""
    given = dict(given or {})
    problems: list[str] = []
    resolved: dict[str, int] = {}
    for name, declared in spec.settings.items():
        where = str(declared.ref)
        bounds = f"{format_duration(declared.min_ms)} to {format_duration(declared.max_ms)}"
        if name not in given:
            problems.append(f"{where}: R015 setting '{name}' ({bounds}) was not supplied")
            continue
        try:
            value = to_millis(given.pop(name))
        except (TypeError, ValueError) as exc:
            problems.append(f"{where}: R016 setting '{name}' is not a duration: {exc}")
            continue
        if not declared.min_ms <= value <= declared.max_ms:
            problems.append(
                f"{where}: R016 setting '{name}' is {format_duration(value)}, outside {bounds}"
            )
            continue
        resolved[name] = value
    for name in sorted(given):
        problems.append(f"{spec.source_path}:1:1: R017 setting '{name}' is not declared")
    if problems:
        raise SettingsError(spec.name, tuple(problems))
    return resolved


class TimerPlan:
    """Which timers a machine arms and keeps as instances are created and move.

    - A state's timers are armed on every entry into it (self-transitions too) and cancelled
      when it is left.
    - A group's timers are armed when the instance enters the group from outside it, kept
      while it moves between the group's states (a self-transition inside stays inside), and
      cancelled when it leaves the group.
    - Creation timers are armed at creation and kept until the instance reaches a final state.
    - Entry actions (timers of kind "entry") are never armed: they run in the transaction that
      enters their state (`on_entry`), with its actions and emits.
    """

    def __init__(self, spec: MachineSpec) -> None:
        self.state_timers = {
            str(state): tuple(t for t in specs if t.kind != "entry")
            for state, specs in spec.timers.items()
        }
        self.entries = {
            str(state): tuple(t for t in specs if t.kind == "entry")
            for state, specs in spec.timers.items()
        }
        self.groups = {
            name: frozenset(str(s) for s in states) for name, states in spec.groups.items()
        }
        self.group_timers = dict(spec.group_timers)
        self.creation_timers = tuple(spec.creation_timers)
        self.finals = frozenset(str(s) for s in spec.finals)
        self._creation_ids = frozenset(t.id for t in self.creation_timers)
        self._member_of: dict[str, tuple[str, ...]] = {}
        for group in sorted(self.group_timers):
            for state in self.groups.get(group, ()):
                self._member_of[state] = (*self._member_of.get(state, ()), group)
        self.specs = {t.id: t for specs in spec.timers.values() for t in specs}
        self.specs.update((t.id, t) for specs in self.group_timers.values() for t in specs)
        self.specs.update((t.id, t) for t in self.creation_timers)
        self._moves: dict[tuple[str, str], tuple[tuple[TimerSpec, ...], frozenset[str], bool]] = {}

    @property
    def has_lasting_timers(self) -> bool:
        """Whether any timer outlives a state (group or creation timers)."""
        return bool(self.group_timers or self.creation_timers)

    def on_create(self, initial: str) -> tuple[TimerSpec, ...]:
        """What creating an instance arms: the initial state's, its groups', creation's."""
        specs = list(self.state_timers.get(initial, ()))
        for group in self._member_of.get(initial, ()):
            specs.extend(self.group_timers[group])
        specs.extend(self.creation_timers)
        return tuple(specs)

    def on_move(
        self, source: str, target: str
    ) -> tuple[tuple[TimerSpec, ...], frozenset[str], bool]:
        """(timers to arm, ids of armed timers to keep, whether to cancel the others) for a
        move from `source` into `target`."""
        key = (source, target)
        found = self._moves.get(key)
        if found is not None:
            return found
        arms = list(self.state_timers.get(target, ()))
        keep: set[str] = set()
        before = set(self._member_of.get(source, ()))
        for group in self._member_of.get(target, ()):
            if group in before:
                keep.update(t.id for t in self.group_timers[group])
            else:
                arms.extend(self.group_timers[group])
        if target not in self.finals:
            keep |= self._creation_ids
        lasting = bool(before) or bool(self._creation_ids)
        cancels = bool(self.state_timers.get(source)) or (
            lasting
            and (bool(before - set(self._member_of.get(target, ()))) or target in self.finals)
        )
        found = (tuple(arms), frozenset(keep), cancels)
        self._moves[key] = found
        return found

    def on_entry(self, state: str) -> tuple[TimerSpec, ...]:
        """The entry actions of `state`, run by whatever enters it, in the same transaction."""
        return self.entries.get(state, ())

    def holds(self, spec: TimerSpec, state: str) -> bool:
        """Whether an armed timer still applies to an instance in `state`."""
        if spec.scope == "group":
            return state in self.groups.get(spec.group or "", frozenset())
        if spec.scope == "creation":
            return state not in self.finals
        return state == spec.state


class DueTimerFirer(Protocol):
    """What the Scheduler drives: the runtime's `fire_due`."""

    def fire_due(self, now: int | None = None) -> Sequence[object]: ...


class Scheduler:
    """A daemon thread that fires due timers every `interval_s` seconds until stopped.

    Timers fire exactly once whoever calls `fire_due` (this thread, another process, a test),
    because firing deletes the timer row in the same transaction that records the firing.
    Errors in one round are kept in `errors` and the next round runs anyway.
    """

    def __init__(self, runtime: DueTimerFirer, *, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._runtime = runtime
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []
        self.fired = 0

    def start(self) -> Scheduler:
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._thread = threading.Thread(target=self._run, name="autonomic-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fired += len(self._runtime.fire_due())
            except Exception as exc:  # keep the scheduler alive; the caller inspects errors
                self.errors.append(exc)
            self._stop.wait(self._interval_s)
