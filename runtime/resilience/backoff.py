"""Deterministic backoff delays, in milliseconds: the same attempt number always waits as long.

The seed's two formulas, with no randomness anywhere:
- `throttle_delay_ms(n)` = 100 ms * 2^min(n, 7), capped at 10 s: 0 -> 100, 1 -> 200, 2 -> 400,
  6 -> 6400, 7 and above -> 10000.
- `jitter_delay_ms(n, max_ms)` = 100 ms * 2^min(n, 10) + (n * 17) % 100 ms, capped at `max_ms`:
  the "jitter" is a fixed offset per attempt number that spreads callers retrying in step
  without making a run unrepeatable.
`n` is a count of failures so far (the retry helpers pass the number of the attempt that just
failed, 1 for the first, as the seed's retry loop does). Negative counts are a caller's bug.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "BASE_MS",
    "NOTE_EVERY",
    "RETRY_LATER_CAP_MS",
    "THROTTLE_CAP_MS",
    "Backoff",
    "jitter_delay_ms",
    "jitter_with_cap",
    "noted_attempt",
    "retry_later_ms",
    "throttle_delay_ms",
]

BASE_MS = 100
THROTTLE_CAP_MS = 10_000
# The longest wait between two tries of stored work whose receiver gave no answer (a
# compensation, an outbox delivery), tried again from the store until it answers.
RETRY_LATER_CAP_MS = 60_000
# The most attempts between two recorded ones of such work failing alike (a power of two;
# about 4 h apart at the cap).
NOTE_EVERY = 256
_THROTTLE_MAX_EXPONENT = 7
_JITTER_MAX_EXPONENT = 10

# A backoff maps a failure count to a delay in milliseconds.
Backoff = Callable[[int], int]


def _check(n: int) -> None:
    if n < 0:
        raise ValueError(f"a backoff is measured from a count of failures >= 0, not {n}")


def throttle_delay_ms(n: int) -> int:
    """100 ms * 2^min(n, 7), capped at 10 s (the seed's `compute_throttle_delay`)."""
    _check(n)
    return min(BASE_MS << min(n, _THROTTLE_MAX_EXPONENT), THROTTLE_CAP_MS)


def jitter_delay_ms(n: int, max_ms: int) -> int:
    """100 ms * 2^min(n, 10) + (n * 17) % 100 ms, capped at `max_ms` (the seed's
    `compute_backoff_delay`)."""
    _check(n)
    if max_ms < 0:
        raise ValueError(f"the cap of a backoff is a duration >= 0, not {max_ms} ms")
    return min((BASE_MS << min(n, _JITTER_MAX_EXPONENT)) + (n * 17) % 100, max_ms)


def jitter_with_cap(max_ms: int) -> Backoff:
    """The jitter backoff with its cap bound, to pass where a `Backoff` is expected."""
    if max_ms < 0:
        raise ValueError(f"the cap of a backoff is a duration >= 0, not {max_ms} ms")

    def delay(n: int) -> int:
        return jitter_delay_ms(n, max_ms)

    return delay


def retry_later_ms(attempts: int) -> int:
    """How long stored work left unanswered `attempts` times waits before its next try: the
    jitter backoff capped at RETRY_LATER_CAP_MS (217 ms, 434 ms, 851 ms, ... 1 min)."""
    return jitter_delay_ms(attempts, RETRY_LATER_CAP_MS)


def noted_attempt(attempt: int) -> bool:
    """Whether the ledger records this failed attempt of stored work tried again later, when
    its error is the previous one's: 1, 2, 4, 8, ... NOTE_EVERY, then each multiple of it (a
    day-long outage at the one-minute cap writes 13 entries, then about six a day)."""
    if attempt <= NOTE_EVERY:
        return attempt & (attempt - 1) == 0
    return attempt % NOTE_EVERY == 0
