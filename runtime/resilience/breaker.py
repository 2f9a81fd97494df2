"""Circuit breaker: stop calling a service that keeps failing, and probe it again later.

States and moves (each move is reported once to `on_change`, which the runtime writes to the
audit ledger as a "breaker" entry):
- closed: calls go through. Every counted failure adds one to a run of consecutive failures,
  every success ends the run. When the run exceeds `tolerated_failures` (the seed: more than
  10) the breaker opens.
- open: calls fail fast with CircuitOpen ("<name> unavailable"), without being made, until
  `cooldown_ms` has passed since the breaker opened; then the breaker is half-open.
- half-open: exactly one call (the probe) goes through, the others fail fast. The probe's
  success closes the breaker; its failure opens it again for a new cool-down.
Time comes from the injected Clock only, and it is read when a call asks, so a breaker that
nobody calls stays open in its state until the next call notices the cool-down has passed.
`on_status` is told the breaker's whole status (state, run of failures, last opening) every
time it changes, a move or only the count, with the moves that led to it: the runtime stores
it, so a restarted process takes up the count as well as the state. `on_change` and
`on_status` run under the breaker's lock, in order: they must be quick (the runtime queues
what they get for the store and the ledger) and must not call the breaker. Thread-safe;
`call_async` shares the same state, so threads and coroutines may mix.
`counts(error)` decides which failures count (default: `errors.is_unhealthy`, the failures that
say the service is in trouble: timeouts, connection errors, Unavailable, TransientFailure,
ServiceFailure; not a business refusal such as a declined card); others propagate and count as
neither failure nor success. `call(function, in_run=...)` may narrow it for one call: a counted
failure for which `in_run()` says False leaves a closed breaker's run as it was (neither a
failure nor a success); a half-open breaker's probe that fails reopens it whatever `in_run` says.
The runtime's policies use it so that a tenant already failing does not feed a shared breaker
(see bulkhead.Bulkhead.first_failure).
`restore(state, failures, opened_ms)` puts a new breaker in the status last stored (the runtime
keeps every status in its Store, so a restarted process finds an open breaker open, with the
cool-down counted from when it opened, and a closed one with its run of failures).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..timers import Clock
from .errors import CircuitOpen, is_unhealthy

__all__ = ["BreakerChange", "BreakerState", "BreakerStatus", "CircuitBreaker"]

T = TypeVar("T")


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerChange:
    """One move of a breaker, as the audit ledger records it."""

    breaker: str
    from_state: BreakerState
    to_state: BreakerState
    at_ms: int
    failures: int
    reason: str
    opened_ms: int = 0  # when the breaker last opened: its cool-down counts from there

    @property
    def event(self) -> str:
        """The ledger event name: BreakerOpened, BreakerHalfOpened or BreakerClosed."""
        return _EVENTS[self.to_state]


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """What a breaker holds after a change, as the runtime stores it."""

    breaker: str
    state: BreakerState
    failures: int
    opened_ms: int
    at_ms: int


_EVENTS = {
    BreakerState.OPEN: "BreakerOpened",
    BreakerState.HALF_OPEN: "BreakerHalfOpened",
    BreakerState.CLOSED: "BreakerClosed",
}


class CircuitBreaker:
    """A breaker named after the service it guards ("payment processor")."""

    def __init__(
        self,
        name: str,
        *,
        clock: Clock,
        tolerated_failures: int = 10,
        cooldown_ms: int = 30_000,
        on_change: Callable[[BreakerChange], None] | None = None,
        counts: Callable[[BaseException], bool] = is_unhealthy,
        on_status: Callable[[BreakerStatus, tuple[BreakerChange, ...]], None] | None = None,
    ) -> None:
        if tolerated_failures < 0 or cooldown_ms < 1:
            raise ValueError("tolerated_failures must be >= 0 and cooldown_ms >= 1")
        self.name = name
        self.tolerated_failures = tolerated_failures
        self.cooldown_ms = cooldown_ms
        self._clock = clock
        self._on_change = on_change
        self._on_status = on_status
        self._counts = counts
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0
        self._probing = False

    # -- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cool-down has passed reports half-open)."""
        now = self._clock.now_ms()
        with self._lock:
            before = self._held()
            changes = self._cool(now)
            state = self._state
            self._report(changes, before, now)
        return state

    @property
    def failures(self) -> int:
        """The current run of consecutive counted failures."""
        return self._failures

    @property
    def opened_ms(self) -> int:
        """When the breaker last opened (0: never)."""
        return self._opened_at

    def restore(self, state: BreakerState, failures: int, opened_ms: int) -> None:
        """Take up a stored state, without reporting a move (it was reported when made)."""
        with self._lock:
            self._state = BreakerState(state)
            self._failures = failures
            self._opened_at = opened_ms
            self._probing = False

    # -- the protocol around one call ------------------------------------------------------

    def before_call(self) -> None:
        """Admit one call or raise CircuitOpen; an admitted call must end in `record_success`,
        `record_failure` or `record_ignored`."""
        now = self._clock.now_ms()
        with self._lock:
            before = self._held()
            changes = self._cool(now)
            admitted = self._state is BreakerState.CLOSED or (
                self._state is BreakerState.HALF_OPEN and not self._probing
            )
            if admitted and self._state is BreakerState.HALF_OPEN:
                self._probing = True
            retry_at = self._opened_at + self.cooldown_ms
            self._report(changes, before, now)
        if not admitted:
            raise CircuitOpen(self.name, retry_at)

    def record_success(self) -> None:
        with self._lock:
            if self._failures == 0 and self._state is BreakerState.CLOSED:
                return  # the common case: nothing changes, nothing to tell
            now = self._clock.now_ms()
            before = self._held()
            self._failures = 0
            changes = []
            if self._state is BreakerState.HALF_OPEN:
                self._probing = False
                changes.append(self._move(BreakerState.CLOSED, "probe succeeded", now))
            self._report(changes, before, now)

    def record_failure(self, *, in_run: bool = True) -> None:
        """A counted failure; `in_run` False: it says nothing of the service (see `call`), so
        only a probe's failure is recorded."""
        now = self._clock.now_ms()
        with self._lock:
            if not in_run and self._state is not BreakerState.HALF_OPEN:
                return
            before = self._held()
            self._failures += 1
            changes = []
            if self._state is BreakerState.HALF_OPEN:
                self._probing = False
                self._opened_at = now
                changes.append(self._move(BreakerState.OPEN, "probe failed", now))
            elif self._state is BreakerState.CLOSED and self._failures > self.tolerated_failures:
                self._opened_at = now
                reason = f"{self._failures} consecutive failures"
                changes.append(self._move(BreakerState.OPEN, reason, now))
            self._report(changes, before, now)

    def record_ignored(self) -> None:
        """The admitted call ended in a failure that does not count: free a probe slot."""
        with self._lock:
            self._probing = False

    def call(self, function: Callable[[], T], *, in_run: Callable[[], bool] | None = None) -> T:
        """Call `function` through the breaker; `in_run` is asked of each counted failure
        whether it joins the run of failures (see the module docstring)."""
        self.before_call()
        try:
            value = function()
        except BaseException as error:
            self._settle(error, in_run)
            raise
        self.record_success()
        return value

    async def call_async(
        self, function: Callable[[], Awaitable[T]], *, in_run: Callable[[], bool] | None = None
    ) -> T:
        """`call` for a coroutine function."""
        self.before_call()
        try:
            value = await function()
        except BaseException as error:
            self._settle(error, in_run)
            raise
        self.record_success()
        return value

    # -- inside ----------------------------------------------------------------------------

    def _settle(self, error: BaseException, in_run: Callable[[], bool] | None) -> None:
        if isinstance(error, Exception) and self._counts(error):
            self.record_failure(in_run=in_run is None or in_run())
        else:
            self.record_ignored()

    def _cool(self, now: int) -> list[BreakerChange]:
        if self._state is BreakerState.OPEN and now >= self._opened_at + self.cooldown_ms:
            return [self._move(BreakerState.HALF_OPEN, "cool-down passed", now)]
        return []

    def _move(self, to: BreakerState, reason: str, now: int | None = None) -> BreakerChange:
        change = BreakerChange(
            self.name,
            self._state,
            to,
            self._clock.now_ms() if now is None else now,
            self._failures,
            reason,
            self._opened_at,
        )
        self._state = to
        return change

    def _held(self) -> tuple[BreakerState, int, int]:
        return self._state, self._failures, self._opened_at

    def _report(
        self, changes: list[BreakerChange], before: tuple[BreakerState, int, int], now: int
    ) -> None:
        # Under the lock, so that listeners see the changes in the order they happened.
        if self._on_change is not None:
            for change in changes:
                self._on_change(change)
        if self._on_status is not None and self._held() != before:
            status = BreakerStatus(self.name, self._state, self._failures, self._opened_at, now)
            self._on_status(status, tuple(changes))
