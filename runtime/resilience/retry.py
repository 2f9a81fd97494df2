"""Retry with deterministic backoff: repeat a call that failed transiently, up to a maximum.

Semantics:
- `attempts` counts every call, the first included: `attempts=1` never retries.
- Only failures `transient(error)` accepts are retried (default: `errors.is_transient`); any
  other failure, and the last transient one, propagates unchanged (never wrapped).
- After attempt k fails (k = 1 for the first call) the caller waits `backoff(k)` ms, the seed's
  `compute_backoff_delay(attempt)`, so with the jitter backoff the first wait is 217 ms.
- Waiting goes through `sleep_ms` (async: `sleep_ms_async`): pass `clock_sleeper(clock)` to
  wait on a VirtualClock, so tests never sleep for real.

Built on tenacity, which owns the loop, the stop rule and the exception bookkeeping from the
second attempt on; this module adapts our millisecond backoffs and injectable sleeps to it, and
makes the first attempt itself, so that a call that succeeds at once pays nothing for retrying.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from ..timers import Clock
from .backoff import Backoff, jitter_with_cap
from .errors import is_transient

__all__ = ["Retry", "SleepMs", "clock_sleeper", "real_sleep_ms", "retry_call"]

T = TypeVar("T")

# The default: the seed's jitter backoff, capped at the throttle's 10 s.
DEFAULT_BACKOFF = jitter_with_cap(10_000)

SleepMs = Callable[[int], None]
AsyncSleepMs = Callable[[int], Awaitable[None]]


def real_sleep_ms(ms: int) -> None:
    time.sleep(ms / 1000)


async def _real_sleep_ms_async(ms: int) -> None:
    await asyncio.sleep(ms / 1000)


def clock_sleeper(clock: Clock) -> SleepMs:
    """Wait on `clock`: a clock that can `advance` (VirtualClock) moves, any other sleeps."""
    advance = getattr(clock, "advance", None)
    if callable(advance):

        def move(ms: int) -> None:
            advance(ms)

        return move
    return real_sleep_ms


@dataclass(frozen=True, slots=True)
class Retry:
    """A retry rule: at most `attempts` calls, waiting `backoff(k)` ms after failure k."""

    attempts: int
    backoff: Backoff = DEFAULT_BACKOFF
    transient: Callable[[BaseException], bool] = is_transient
    sleep_ms: SleepMs = real_sleep_ms
    sleep_ms_async: AsyncSleepMs = _real_sleep_ms_async

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"a retry makes at least 1 attempt, not {self.attempts}")

    def _options(self) -> dict[str, object]:
        """tenacity's settings for attempts 2..n: the first runs before tenacity is involved."""
        backoff = self.backoff

        def wait(state: tenacity.RetryCallState) -> float:
            # tenacity's attempt 1 is our attempt 2: it failed as failure k = number + 1.
            return backoff(state.attempt_number + 1) / 1000

        return {
            "stop": tenacity.stop_after_attempt(self.attempts - 1),
            "wait": wait,
            "retry": tenacity.retry_if_exception(self.transient),
            "reraise": True,
        }

    def _retries(self, error: Exception) -> bool:
        return self.attempts > 1 and self.transient(error)

    def call(self, function: Callable[[], T]) -> T:
        """Call `function` until it returns, fails for good, or the attempts are spent."""
        # The first attempt runs bare: a call that succeeds (the usual case) costs nothing
        # more, where building tenacity's loop state costs ~50 us.
        try:
            return function()
        except Exception as error:
            if not self._retries(error):
                raise
        self.sleep_ms(self.backoff(1))
        sleep_ms = self.sleep_ms
        retrying = tenacity.Retrying(
            sleep=lambda seconds: sleep_ms(round(seconds * 1000)),
            **self._options(),  # type: ignore[arg-type]
        )
        return retrying(function)

    async def call_async(self, function: Callable[[], Awaitable[T]]) -> T:
        """`call` for a coroutine function; waits with `sleep_ms_async`."""
        try:
            return await function()
        except Exception as error:
            if not self._retries(error):
                raise
        await self.sleep_ms_async(self.backoff(1))
        sleep_ms_async = self.sleep_ms_async

        async def sleep(seconds: float) -> None:
            await sleep_ms_async(round(seconds * 1000))

        retrying = tenacity.AsyncRetrying(sleep=sleep, **self._options())  # type: ignore[arg-type]
        return await retrying(function)


def retry_call(
    function: Callable[[], T],
    *,
    attempts: int,
    backoff: Backoff | None = None,
    sleep_ms: SleepMs = real_sleep_ms,
) -> T:
    """`Retry(attempts, backoff, sleep_ms=sleep_ms).call(function)`; backoff defaults to the
    jitter backoff capped at 10 s."""
    rule = (
        Retry(attempts, sleep_ms=sleep_ms)
        if backoff is None
        else Retry(attempts, backoff, sleep_ms=sleep_ms)
    )
    return rule.call(function)
