"""Bulkheads per tenant: each tenant gets a cap on calls in flight and a breaker of its own.

Semantics:
- A call first takes a slot of its tenant's bulkhead; when the tenant already has
  `max_concurrent` calls in flight the call is refused at once with BulkheadFull (never queued,
  so a flood from one tenant cannot pile up behind the others).
- Then it goes through the tenant's own CircuitBreaker: a tenant whose calls keep failing opens
  only its own breaker and fails fast, while other tenants' breakers stay closed.
- The slot is released when the call ends, however it ends.
- A tenant is failing from its first failure that says the service is unhealthy (an attempt
  of any of its calls; `first_failure`) until one of its calls succeeds. `first_failure`
  answers True for that first failure only: a breaker shared by the tenants (the runtime's
  policy breaker) asks it (`CircuitBreaker.call(..., in_run=bulkhead.first_failure)`), so
  each tenant's run of failures counts once there, and only the tenant's own breaker counts
  the rest. The shared breaker then opens when more than its tolerated number of tenants fail
  in a row (no success between), never for one tenant's burst. A tenant whose breaker holds
  failures (restored after a restart too) is failing.
Slots are counted under a threading.Lock that is never held while a call runs, so threads and
asyncio tasks (`call_async`) may share one TenantBulkheads.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..timers import Clock
from .breaker import BreakerChange, BreakerStatus, CircuitBreaker
from .errors import BulkheadFull

__all__ = ["Bulkhead", "TenantBulkheads"]

T = TypeVar("T")


class Bulkhead:
    """One tenant's compartment: a cap on calls in flight and the tenant's breaker."""

    def __init__(self, tenant: str, *, max_concurrent: int, breaker: CircuitBreaker) -> None:
        if max_concurrent < 1:
            raise ValueError(f"a bulkhead admits at least 1 call, not {max_concurrent}")
        self.tenant = tenant
        self.max_concurrent = max_concurrent
        self.breaker = breaker
        self._lock = threading.Lock()
        self._in_flight = 0
        self._failing = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def first_failure(self) -> bool:
        """Note an unhealthy failure of one of the tenant's calls: True if it is the first
        since the tenant's last success (see the module docstring)."""
        with self._lock:
            first = not self._failing and self.breaker.failures == 0
            self._failing = True
            return first

    def _succeeded(self) -> None:
        with self._lock:
            self._failing = False

    def _enter(self) -> None:
        with self._lock:
            if self._in_flight >= self.max_concurrent:
                raise BulkheadFull(self.tenant, self.max_concurrent)
            self._in_flight += 1

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def call(self, function: Callable[[], T]) -> T:
        self._enter()
        try:
            value = self.breaker.call(function)
        finally:
            self._leave()
        self._succeeded()
        return value

    async def call_async(self, function: Callable[[], Awaitable[T]]) -> T:
        self._enter()
        try:
            value = await self.breaker.call_async(function)
        finally:
            self._leave()
        self._succeeded()
        return value


class TenantBulkheads:
    """The bulkheads of one service, one per tenant, made on first use.

    Each tenant's breaker is named "<name>[<tenant>]" and reports to `on_change` and
    `on_status` (see CircuitBreaker); `restore`
    is called with each new breaker before its first use (the runtime restores its stored
    state there).
    """

    def __init__(
        self,
        name: str,
        *,
        clock: Clock,
        max_concurrent: int,
        tolerated_failures: int = 10,
        cooldown_ms: int = 30_000,
        on_change: Callable[[BreakerChange], None] | None = None,
        restore: Callable[[CircuitBreaker], None] | None = None,
        on_status: Callable[[BreakerStatus, tuple[BreakerChange, ...]], None] | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"a bulkhead admits at least 1 call, not {max_concurrent}")
        self._restore = restore
        self.name = name
        self.max_concurrent = max_concurrent
        self._clock = clock
        self._tolerated = tolerated_failures
        self._cooldown_ms = cooldown_ms
        self._on_change = on_change
        self._on_status = on_status
        self._lock = threading.Lock()
        self._tenants: dict[str, Bulkhead] = {}

    def for_tenant(self, tenant: str) -> Bulkhead:
        with self._lock:
            found = self._tenants.get(tenant)
            if found is None:
                breaker = CircuitBreaker(
                    f"{self.name}[{tenant}]",
                    clock=self._clock,
                    tolerated_failures=self._tolerated,
                    cooldown_ms=self._cooldown_ms,
                    on_change=self._on_change,
                    on_status=self._on_status,
                )
                if self._restore is not None:
                    self._restore(breaker)
                found = Bulkhead(tenant, max_concurrent=self.max_concurrent, breaker=breaker)
                self._tenants[tenant] = found
            return found

    def call(self, tenant: str, function: Callable[[], T]) -> T:
        return self.for_tenant(tenant).call(function)

    async def call_async(self, tenant: str, function: Callable[[], Awaitable[T]]) -> T:
        return await self.for_tenant(tenant).call_async(function)
