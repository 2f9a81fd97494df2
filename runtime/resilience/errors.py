"""How an outside call fails, as the resilience patterns classify it.

Two independent questions, as in the seed (`e.is_transient()`, `e.is_unavailable()`):
- transient: the same call may succeed if repeated; retries repeat only these;
- unavailable: the service cannot be reached at all; fallback routes only these to the backup.
An exception may be both (a processor that is down for a moment). Exceptions from other
libraries opt in with a truthy `transient` or `unavailable` attribute instead of a base class.
"""

from __future__ import annotations

__all__ = [
    "BulkheadFull",
    "CircuitOpen",
    "TransientFailure",
    "Unavailable",
    "is_transient",
    "is_unavailable",
]


class TransientFailure(Exception):
    """A failure that may go away if the same call is made again (timeouts, 503s, throttling)."""

    transient = True


class Unavailable(Exception):
    """The service cannot be reached; a fallback may route to its backup."""

    unavailable = True


class CircuitOpen(Unavailable):
    """Failing fast: the breaker is open, the call was not made."""

    def __init__(self, service: str, retry_at_ms: int) -> None:
        super().__init__(f"{service} unavailable (circuit open until {retry_at_ms} ms)")
        self.service = service
        self.retry_at_ms = retry_at_ms


class BulkheadFull(Exception):
    """The tenant already has its maximum of calls in flight; this one was not started."""

    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(f"tenant {tenant!r} has {limit} calls in flight (its bulkhead's cap)")
        self.tenant = tenant
        self.limit = limit


def is_transient(error: BaseException) -> bool:
    """True when repeating the call may succeed."""
    return getattr(error, "transient", False) is True


def is_unavailable(error: BaseException) -> bool:
    """True when the service could not be reached (also: its breaker is open)."""
    return getattr(error, "unavailable", False) is True
