"""How an outside call fails, as the resilience patterns classify it.

Three questions, the first two as in the seed (`e.is_transient()`, `e.is_unavailable()`):
- transient: the same call may succeed if repeated; retries repeat only these;
- unavailable: the service cannot be reached at all; fallback routes only these to the backup;
- unhealthy: the failure says the service is in trouble, not that it refused this request;
  breakers count only these. Every transient or unavailable failure is unhealthy, and so is a
  ServiceFailure (the service answered with an error of its own, a 5xx).
Anything else is a business refusal (a declined card, an unknown account): the service is up
and answered; it is the caller's to handle (the customer's charge fails, the governor hears it
as its failure event) and no breaker counts it, so one customer's declines cannot send another
customer's charge to the backup.

An exception says what it is with a `transient`, `unavailable` or `unhealthy` attribute (the
classes below set them; exceptions of other libraries may too): an attribute that is present
and not None decides. Without one, Python's standard exceptions are mapped:
- TimeoutError (also asyncio's and socket's timeouts): transient. Not unavailable: the request
  may have reached the service, so only a retry under the same idempotency key is safe, not a
  second processor;
- ConnectionError (reset, aborted, broken pipe): transient, for the same reason;
- ConnectionRefusedError and socket.gaierror (name resolution failed): transient and
  unavailable: the request never reached the service, so the backup may take it.
"""

from __future__ import annotations

import socket

__all__ = [
    "BulkheadFull",
    "CircuitOpen",
    "ServiceFailure",
    "TransientFailure",
    "Unavailable",
    "is_transient",
    "is_unanswered",
    "is_unavailable",
    "is_unhealthy",
]


class TransientFailure(Exception):
    """A failure that may go away if the same call is made again (timeouts, 503s, throttling)."""

    transient = True


class Unavailable(Exception):
    """The service cannot be reached; a fallback may route to its backup."""

    unavailable = True


class ServiceFailure(Exception):
    """The service failed on its side (a 500, a malformed answer): its breaker counts it, but
    it is neither retried nor routed to the backup unless it also says it is transient or
    unavailable."""

    unhealthy = True


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


# The request never reached the service: a backup may take it.
_UNREACHED = (ConnectionRefusedError, socket.gaierror)
# The service may not have answered: a repeat (same idempotency key) may succeed.
_TRANSIENT = (TimeoutError, ConnectionError, socket.gaierror)


def _said(error: BaseException, flag: str) -> bool | None:
    value = getattr(error, flag, None)
    return None if value is None else bool(value)


def is_transient(error: BaseException) -> bool:
    """True when repeating the call may succeed."""
    said = _said(error, "transient")
    return isinstance(error, _TRANSIENT) if said is None else said


def is_unavailable(error: BaseException) -> bool:
    """True when the service could not be reached (also: its breaker is open)."""
    said = _said(error, "unavailable")
    return isinstance(error, _UNREACHED) if said is None else said


def is_unhealthy(error: BaseException) -> bool:
    """True when the failure counts against the service's health (what breakers count):
    transient, unavailable or a ServiceFailure; a business refusal does not."""
    said = _said(error, "unhealthy")
    if said is not None:
        return said
    return is_transient(error) or is_unavailable(error)


def is_unanswered(error: BaseException) -> bool:
    """True when the service gave no answer to the call (yet): it failed transiently, could not
    be reached (also: its breaker is open), or the call was not started (the tenant's bulkhead
    was full). Work waiting on such a call is tried again later (a compensation, an outbox
    delivery); any other failure is the service's answer."""
    return is_transient(error) or is_unavailable(error) or isinstance(error, BulkheadFull)
