"""Machine-file policies applied by the runtime around the bound actions they name.

A `policy` in a machine file becomes an ActionPolicy in the generated tables; when the runtime
loads the machine it wraps each named action once, and every run of the action (transition,
timer, ladder step) goes through the wrapper, outermost first:
1. the tenant's bulkhead (`bulkhead N per tenant`; the tenant is the instance id): over N
   calls in flight the call is refused with BulkheadFull; the tenant's own breaker (the
   policy's breaker settings, else 10 failures and 30 s) fails it fast while open;
2. fallback (`fallback action`): if the primary route fails as unavailable (Unavailable,
   CircuitOpen) the fallback action runs with the same context, and only then;
3. the policy's breaker (`breaker tolerates N failures cooldown D`), one per policy and machine,
   shared by every instance: each attempt goes through it, so an open breaker stops retries;
4. retry (`retry N attempts ...`): transient failures are tried again, up to N calls, waiting
   the deterministic backoff on the runtime's clock (a VirtualClock advances, never sleeps).
Every breaker move is handed to `on_move` with the machine name; the Runtime writes it, after
the dispatch's own transaction (so a dispatch that fails because the breaker opened still
leaves the opening), in one unit of work: the breaker's new state in the store
(`Transaction.save_breaker`) and its "breaker" entry in the audit ledger (`breaker_entry`).
A breaker made when a machine is loaded (or a tenant's, on first use) takes up the state its
last recorded move left (`restore`, from `Store.get_breaker`): a restart does not close an
open breaker. A closed breaker's run of failures is not stored: a restart forgives it.
A dispatch runs these actions before its write transaction (runtime/dispatch.py): retries
wait without holding the write lock, and the unit of work takes the results. `dispatch_async`
runs them in the runtime's action threads, so the calls of concurrent dispatches overlap and
each tenant's bulkhead caps its share of them: a tenant whose calls hang holds at most its cap
of threads and is refused beyond it, while other tenants' calls go on. Timer firings (a retry
ladder's `retry_charge`) run a timer's own policy actions before the firing's transaction
too (runtime/timer_firing.py); entry actions of the state a timer enters run inside it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..ledger import EntryData, payload_digest
from ..store.base import BreakerRecord
from ..tables import ActionPolicy, MachineSpec
from ..timers import Clock
from .backoff import Backoff, jitter_with_cap, throttle_delay_ms
from .breaker import BreakerChange, BreakerState, CircuitBreaker
from .bulkhead import TenantBulkheads
from .fallback import call_with_fallback
from .retry import Retry, clock_sleeper

__all__ = ["BREAKER_ACTOR", "BREAKER_KIND", "ActionPolicies", "breaker_entry", "breaker_record"]

Action = Callable[[Any], object]
BREAKER_KIND = "breaker"
BREAKER_ACTOR = "resilience"
_DEFAULT_TOLERATED = 10
_DEFAULT_COOLDOWN_MS = 30_000
_DEFAULT_JITTER_MAX_MS = 10_000


def breaker_entry(machine: str, change: BreakerChange) -> EntryData:
    """The ledger entry of one breaker move: instance `policy:<breaker name>`, the move as
    from/to state, the event BreakerOpened / BreakerHalfOpened / BreakerClosed."""
    payload = {"failures": change.failures, "reason": change.reason}
    return EntryData(
        change.at_ms,
        BREAKER_KIND,
        machine,
        f"policy:{change.breaker}",
        str(change.from_state),
        str(change.to_state),
        change.event,
        BREAKER_ACTOR,
        "",
        payload_digest(payload),
    )


def breaker_record(machine: str, change: BreakerChange) -> BreakerRecord:
    """The stored state a breaker move leaves."""
    return BreakerRecord(
        machine,
        change.breaker,
        str(change.to_state),
        change.failures,
        change.opened_ms,
        change.at_ms,
    )


# Looks up a breaker's stored state: (machine, breaker name) -> its record, or None.
BreakerLookup = Callable[[str, str], BreakerRecord | None]


def _restorer(machine: str, lookup: BreakerLookup | None) -> Callable[[CircuitBreaker], None]:
    def restore(breaker: CircuitBreaker) -> None:
        stored = None if lookup is None else lookup(machine, breaker.name)
        if stored is not None:
            breaker.restore(BreakerState(stored.state), stored.failures, stored.opened_ms)

    return restore


class _Applied:
    """One policy's live parts: its breaker, its tenants' bulkheads, its retry rule."""

    def __init__(
        self,
        machine: str,
        policy: ActionPolicy,
        clock: Clock,
        on_move: Callable[[str, BreakerChange], None],
        lookup: BreakerLookup | None,
    ) -> None:
        def moved(change: BreakerChange) -> None:
            on_move(machine, change)

        restore = _restorer(machine, lookup)

        tolerated = policy.tolerated_failures
        cooldown = policy.cooldown_ms or _DEFAULT_COOLDOWN_MS
        self.breaker = (
            None
            if tolerated is None
            else CircuitBreaker(
                policy.name,
                clock=clock,
                tolerated_failures=tolerated,
                cooldown_ms=cooldown,
                on_change=moved,
            )
        )
        if self.breaker is not None:
            restore(self.breaker)
        self.bulkheads = (
            None
            if policy.bulkhead is None
            else TenantBulkheads(
                policy.name,
                clock=clock,
                max_concurrent=policy.bulkhead,
                tolerated_failures=_DEFAULT_TOLERATED if tolerated is None else tolerated,
                cooldown_ms=cooldown,
                on_change=moved,
                restore=restore,
            )
        )
        backoff: Backoff = (
            throttle_delay_ms
            if policy.backoff == "exponential"
            else jitter_with_cap(policy.backoff_max_ms or _DEFAULT_JITTER_MAX_MS)
        )
        self.retry = Retry(policy.attempts, backoff, sleep_ms=clock_sleeper(clock))
        self.fallback = policy.fallback

    def wrap(self, action: Action, backup: Action | None) -> Action:
        breaker, bulkheads, retry = self.breaker, self.bulkheads, self.retry

        def run(context: Any) -> object:
            def once() -> object:
                return action(context) if breaker is None else breaker.call(lambda: action(context))

            def primary() -> object:
                return retry.call(once)

            def routed() -> object:
                if backup is None:
                    return primary()
                return call_with_fallback(primary, lambda: backup(context))

            if bulkheads is None:
                return routed()
            return bulkheads.call(str(context.instance), routed)

        run.__name__ = getattr(action, "__name__", "action")
        return run


class ActionPolicies:
    """The policies of every machine a Runtime loaded, with their breakers' live state."""

    def __init__(
        self,
        clock: Clock,
        on_move: Callable[[str, BreakerChange], None],
        lookup: BreakerLookup | None = None,
    ) -> None:
        self._clock = clock
        self._on_move = on_move
        self._lookup = lookup
        self._lock = threading.Lock()
        self._applied: dict[tuple[str, str], _Applied] = {}

    def wrap(self, spec: MachineSpec, actions: Mapping[str, Action]) -> dict[str, Action]:
        """`actions` with every action a policy of `spec` names wrapped in that policy."""
        wrapped = dict(actions)
        for policy in spec.policies.values():
            applied = _Applied(spec.name, policy, self._clock, self._on_move, self._lookup)
            with self._lock:
                self._applied[(spec.name, policy.name)] = applied
            backup = None if policy.fallback is None else actions[policy.fallback]
            for name in policy.actions:
                wrapped[name] = applied.wrap(actions[name], backup)
        return wrapped

    def breaker(self, machine: str, policy: str) -> CircuitBreaker | None:
        """The shared breaker of a machine's policy (None: the policy has no `breaker`)."""
        return self._applied[(machine, policy)].breaker

    def bulkheads(self, machine: str, policy: str) -> TenantBulkheads | None:
        """The tenants' bulkheads of a machine's policy (None: no `bulkhead` clause)."""
        return self._applied[(machine, policy)].bulkheads
