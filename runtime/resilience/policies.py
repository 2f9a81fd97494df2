"""Machine-file policies applied by the runtime around the bound actions they name.

A `policy` in a machine file becomes an ActionPolicy in the generated tables; when the runtime
loads the machine it wraps each named action once, and every run of the action (transition,
timer, ladder step) goes through the wrapper, outermost first:
1. the tenant's bulkhead (`bulkhead N per tenant`): over N calls in flight the call is
   refused with BulkheadFull; the tenant's own breaker (the policy's breaker settings, else 10
   failures and 30 s) fails it fast while open. The tenant is the model's own where it has
   one: the event's `tenant_id` field, else its `customer_id` (a tenant with many instances,
   several subscriptions' billing accounts, shares one cap), else the instance id (a timer's
   actions have no payload);
2. fallback (`fallback action`): if the primary route fails as unavailable (Unavailable,
   CircuitOpen, a refused connection) the fallback action runs with the same context, and only then;
3. the policy's breaker (`breaker tolerates N failures cooldown D`), one per policy and machine,
   shared by every instance: each attempt goes through it, so an open breaker stops retries;
   it counts only failures that say the service is unhealthy (errors.is_unhealthy), so one
   customer's declined cards never open it for the others. Under a bulkhead it counts each
   tenant's run of failures once, its first (Bulkhead.first_failure): a tenant already
   failing feeds only its own breaker, so more than N tenants failing in a row open the
   shared breaker and one tenant's burst of failures opens only that tenant's;
4. retry (`retry N attempts ...`): transient failures are tried again, up to N calls, waiting
   the deterministic backoff on the runtime's clock (a VirtualClock advances, never sleeps).
Every change of a breaker's status (a move, or only its run of failures) is noted in the
Runtime's BreakerJournal. The unit of work of the dispatch, timer firing or outbox delivery
whose actions made it writes it in its own transaction, and so commits it or not with it:
the breaker's status in the store (`Transaction.save_breaker`), and for each move a "breaker"
entry in the audit ledger (`breaker_entry`). Where that unit does not commit, or there is
none, the Runtime writes what is still noted in a unit of its own at once, before the caller
hears of the outcome: a dispatch whose outside call failed (nothing of the dispatch is
stored; in `dispatch_many` it goes with the batch's commit), a unit that failed or was
refused (a dispatch that fails because the breaker opened still leaves the opening), a timer
whose outside call failed (with the other firings' commit), and the memory store. On a
partitioned store a breaker whose entries belong to another chain than the dispatch's (or a
timer firing's) is written before that unit, in its own chain. Every answer waits for
`Runtime._settle_breakers`: each change noted so far is stored, by its own unit or by
another unit that took it (BreakerJournal.settle waits for that unit's commit).
A breaker made when a machine is loaded (or a tenant's, on first use) takes up its stored
status (`restore`, from `Store.get_breaker`): a restart neither closes an open breaker nor
forgives a closed one's failures.
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
from typing import TYPE_CHECKING, Any

from ..ledger import EntryData, payload_digest
from ..store.base import BreakerRecord, Transaction
from ..tables import ActionPolicy, MachineSpec
from ..timers import Clock
from .backoff import Backoff, jitter_with_cap, throttle_delay_ms
from .breaker import BreakerChange, BreakerState, BreakerStatus, CircuitBreaker
from .bulkhead import TenantBulkheads
from .fallback import call_with_fallback
from .retry import Retry, clock_sleeper

if TYPE_CHECKING:
    from ..sealing import _Chain

__all__ = [
    "BREAKER_ACTOR",
    "BREAKER_KIND",
    "TENANT_FIELDS",
    "ActionPolicies",
    "BreakerJournal",
    "breaker_entry",
    "breaker_record",
    "tenant_of",
]

Action = Callable[[Any], object]
BREAKER_KIND = "breaker"
BREAKER_ACTOR = "resilience"
_DEFAULT_TOLERATED = 10
_DEFAULT_COOLDOWN_MS = 30_000
_DEFAULT_JITTER_MAX_MS = 10_000


# The payload fields that name the tenant a call is made for, first found wins.
TENANT_FIELDS = ("tenant_id", "customer_id")


def tenant_of(context: Any) -> str:
    """The tenant whose bulkhead a call takes a slot of (see the module docstring)."""
    payload = context.payload
    for field in TENANT_FIELDS:
        tenant = getattr(payload, field, None)
        if isinstance(tenant, str) and tenant:
            return tenant
    return str(context.instance)


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


def breaker_record(machine: str, status: BreakerStatus) -> BreakerRecord:
    """The stored form of a breaker's status."""
    return BreakerRecord(
        machine, status.breaker, str(status.state), status.failures, status.opened_ms, status.at_ms
    )


# One breaker's unwritten status: its key, its newest record, the entries of its moves and the
# tickets of the notes they gather (see BreakerJournal).
Noted = tuple[tuple[str, str], BreakerRecord, list[EntryData], list[int]]


class BreakerJournal:
    """Breaker statuses noted but not yet written, each breaker's newest with the ledger
    entries of every move since its last write, in order (see the module docstring).

    Each note gets a ticket. A ticket is unstored from its note until the commit of the unit
    of work that wrote it: `settle` is how a caller makes sure nothing noted before it answers
    is still unstored, whichever unit took it."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        # Read without the lock by every unit of work: empty but while breakers change.
        self.pending: dict[tuple[str, str], tuple[BreakerRecord, list[EntryData], list[int]]] = {}
        # Read without the lock by every caller: empty but while breakers change.
        self.unstored: set[int] = set()
        self._taken: set[int] = set()  # tickets a unit took and has not committed yet
        self.last = 0  # the newest ticket

    def note(self, machine: str, status: BreakerStatus, moves: tuple[BreakerChange, ...]) -> None:
        """Called by the breaker under its lock, so each breaker's statuses come in order."""
        record = breaker_record(machine, status)
        entries = [breaker_entry(machine, move) for move in moves]
        key = (machine, status.breaker)
        with self._lock:
            self.last = ticket = self.last + 1
            self.unstored.add(ticket)
            held = self.pending.get(key)
            self.pending[key] = (
                (record, entries, [ticket])
                if held is None
                else (record, held[1] + entries, [*held[2], ticket])
            )

    def take(self, wanted: Callable[[tuple[str, str]], bool] | None = None) -> list[Noted]:
        """Remove and return what is noted (with `wanted`: only those breakers)."""
        with self._lock:
            keys = [key for key in self.pending if wanted is None or wanted(key)]
            taken = [(key, *self.pending.pop(key)) for key in keys]
            for noted in taken:
                self._taken.update(noted[3])
            return taken

    def put_back(self, taken: list[Noted]) -> None:
        """Note again what a unit took but did not commit, before anything noted since."""
        with self._lock:
            for key, record, entries, tickets in taken:
                newer = self.pending.get(key)
                self.pending[key] = (
                    (record, entries, tickets)
                    if newer is None
                    else (newer[0], entries + newer[1], tickets + newer[2])
                )
                self._taken.difference_update(tickets)
            self._lock.notify_all()

    def stored(self, taken: list[Noted]) -> None:
        """What a unit took is committed."""
        with self._lock:
            for noted in taken:
                self._taken.difference_update(noted[3])
                self.unstored.difference_update(noted[3])
            self._lock.notify_all()

    def settle(self, upto: int, write: Callable[[], None]) -> None:
        """Return once every status noted up to ticket `upto` is stored: `write` writes those
        still pending; for those a unit took, wait until it commits (or gives them back)."""
        while True:
            with self._lock:
                while True:
                    unstored = [t for t in self.unstored if t <= upto]
                    if not unstored:
                        return
                    if not self._taken.issuperset(unstored):
                        break
                    self._lock.wait()
            write()


def write_noted(txn: Transaction, chain: _Chain | None, taken: list[Noted]) -> None:
    """Write taken statuses in `txn`: each breaker's record, and its moves' ledger entries
    when there is a ledger (`chain`)."""
    for _, record, entries, _ in taken:
        txn.save_breaker(record)
        if chain is not None:
            for data in entries:
                chain.append(txn, data)


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
        journal: BreakerJournal,
        lookup: BreakerLookup | None,
    ) -> None:
        def changed(status: BreakerStatus, moves: tuple[BreakerChange, ...]) -> None:
            journal.note(machine, status, moves)

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
                on_status=changed,
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
                restore=restore,
                on_status=changed,
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
            # The tenant's first failure in a row joins the shared breaker's run, no other.
            in_run: Callable[[], bool] | None = None

            def once() -> object:
                if breaker is None:
                    return action(context)
                return breaker.call(lambda: action(context), in_run=in_run)

            def primary() -> object:
                return retry.call(once)

            def routed() -> object:
                if backup is None:
                    return primary()
                return call_with_fallback(primary, lambda: backup(context))

            if bulkheads is None:
                return routed()
            bulkhead = bulkheads.for_tenant(tenant_of(context))
            in_run = bulkhead.first_failure
            return bulkhead.call(routed)

        run.__name__ = getattr(action, "__name__", "action")
        return run


class ActionPolicies:
    """The policies of every machine a Runtime loaded, with their breakers' live state."""

    def __init__(
        self, clock: Clock, journal: BreakerJournal, lookup: BreakerLookup | None = None
    ) -> None:
        self._clock = clock
        self.journal = journal
        self._lookup = lookup
        self._lock = threading.Lock()
        self._applied: dict[tuple[str, str], _Applied] = {}

    def wrap(self, spec: MachineSpec, actions: Mapping[str, Action]) -> dict[str, Action]:
        """`actions` with every action a policy of `spec` names wrapped in that policy."""
        wrapped = dict(actions)
        for policy in spec.policies.values():
            applied = _Applied(spec.name, policy, self._clock, self.journal, self._lookup)
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
