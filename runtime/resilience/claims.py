"""Claims on the event ids and idempotency keys whose dispatch calls the outside world.

A dispatch whose row runs a policy's actions (they call the outside world: Billing's charge)
runs them before its write transaction (runtime/dispatch.py). So that two dispatches of one
event id or idempotency key never both call, the dispatch claims its id and key from before
the calls until its unit of work has committed or failed, in two layers:
1. in this runtime (`try_local`): threads and coroutines wait on an event, at no store cost;
2. in the store (`Store.claim_outside`), seen by every runtime and process on it: a row per
   key with its holder and a lease on the store's clock (the database's on PostgreSQL, the
   wall clock on an SQLite file), written in a short transaction of its own without an fsync
   (a claim need not survive the machine: its holder does not either).
The holder lets go of its claim in the store in the unit of work that records the result of
its calls (`let_go`, `Transaction.release_outside`): the rows go with that commit, so a
dispatch that commits costs no write of its own to release; only one whose unit does not
commit (it failed, was refused, or its batch's commit failed) lets go on its own, afterwards
(`Store.release_outside`).
A second dispatcher waits: it polls the store until the holder lets go or its result is
committed, then finds that result and returns it as a repeat, calling nothing. A holder that
crashed lets go when its lease runs out (`Runtime(claim_lease_ms=...)`, 60 s by default):
then the next dispatcher claims and calls, as a first dispatch would. A live holder's lease
does not run out while it calls: a thread of the runtime renews every held claim each third
of the lease (`Store.renew_outside`), so a call longer than the lease, retries and backoff
included, is not made twice. Only a holder that cannot renew in time (its process stopped,
or the store out of reach, for longer than the lease) can be taken over; its unit of work
then finds the claim gone (`Transaction.holds_outside`, inside the write transaction) and
refuses to commit: OutsideClaimLost (R026), nothing written, the taker's result stands, and
the calls it made are in the error for the caller to settle. `dispatch_many` does not wait inside a
batch: a request whose id or key is held elsewhere fails in its slot with
OutsideCallInProgress (R025), which says to send it again.
Timer firings whose actions call the outside world claim the timer's arming the same way,
without waiting: another runtime firing it keeps it (runtime/timer_firing.py). Events whose
rows call no outside action claim nothing and cost nothing here.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ..errors import NestedDispatch, OutsideCallInProgress, OutsideClaimLost
from ..store.base import ClaimKey, Store, Transaction

__all__ = ["DEFAULT_CLAIM_LEASE_MS", "ClaimKey", "OutsideClaims", "Release"]

DEFAULT_CLAIM_LEASE_MS = 60_000
# Polling a holder in another process: from 1 ms, doubling, to at most 50 ms between looks.
_FIRST_POLL_S = 0.001
_LAST_POLL_S = 0.05

Local = Callable[[], None]


class Release(Protocol):
    """Lets go of a claim (a second call does nothing). `committed=True`: the unit of work
    that let go of it in the store (`OutsideClaims.let_go`) committed, so the store holds
    nothing of it any more: only the renewal and the hold in this runtime end."""

    def __call__(self, *, committed: bool = False) -> None: ...


class _Hold:
    """A hold in this runtime: the thread holding it (None: a coroutine), and the event its
    release sets, made only when another caller waits (most holds end with none waiting, and
    an Event costs a Condition and its lock to make and to set)."""

    __slots__ = ("done", "thread")

    def __init__(self, thread: int | None) -> None:
        self.thread = thread
        self.done: threading.Event | None = None


class OutsideClaims:
    """The claims of one runtime (see the module docstring): held locally by thread or
    coroutine, and in the store under this runtime's holder name."""

    def __init__(self, store: Store, lease_ms: int = DEFAULT_CLAIM_LEASE_MS) -> None:
        self._store = store
        self.lease_ms = lease_ms
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._held: dict[ClaimKey, _Hold] = {}
        # The claims held in the store, by a token per hold, renewed by `_renewer` while any
        # is held (it ends at a turn that finds none, or at close).
        self._renewing: dict[object, tuple[ClaimKey, ...]] = {}
        # Guards `_renewing` and `_renewer`; the renewer waits on it as a condition. Held
        # directly where nothing waits or is woken (a claim's hold and release): a Condition's
        # `with` goes through two Python-level methods.
        self._renew_lock = threading.Lock()
        self._renew = threading.Condition(self._renew_lock)
        self._renewer: threading.Thread | None = None
        self._closed = False

    def try_local(
        self, keys: Sequence[ClaimKey], thread: int | None = None
    ) -> tuple[Local | None, threading.Event | None]:
        """(release, None) if this caller now holds every key in this runtime, else (None, an
        event set when the holder lets go). `thread`: the thread that will hold them (None: a
        coroutine). Raises NestedDispatch if that thread holds one already: an action
        dispatching its own event would wait for itself."""
        with self._lock:
            for key in keys:
                held = self._held.get(key)
                if held is not None:
                    if thread is not None and held.thread == thread:
                        raise NestedDispatch()
                    if held.done is None:
                        held.done = threading.Event()
                    return None, held.done
            hold = _Hold(thread)
            for key in keys:
                self._held[key] = hold

        def release() -> None:
            with self._lock:
                for key in keys:
                    if self._held.get(key) is hold:
                        del self._held[key]
                done = hold.done
            if done is not None:
                done.set()

        return release, None

    def hold(
        self, keys: Sequence[ClaimKey], committed: Callable[[], bool], *, wait: bool = True
    ) -> Release | None:
        """Claim `keys` in the store (the caller holds them locally): the release, or None
        when `committed()` says the result they name is stored already (nothing to call).
        While another holder's lease is live: wait for it, or with `wait=False` raise
        OutsideCallInProgress."""
        store, holder, lease_ms = self._store, self.holder, self.lease_ms
        pause = _FIRST_POLL_S
        while not store.claim_outside(keys, holder, lease_ms):
            if committed():
                return None
            if not wait:
                raise OutsideCallInProgress(*keys[0])
            time.sleep(pause)
            pause = min(pause * 2, _LAST_POLL_S)
        token = object()
        self._renew_while_held(token, tuple(keys))
        held = [True]

        def release(*, committed: bool = False) -> None:
            with self._renew_lock:
                if not held[0]:
                    return
                held[0] = False
                self._renewing.pop(token, None)
            if not committed:
                store.release_outside(keys, holder)

        return release

    def _renew_while_held(self, token: object, keys: tuple[ClaimKey, ...]) -> None:
        with self._renew_lock:
            self._renewing[token] = keys
            if self._renewer is None and not self._closed:
                self._renewer = threading.Thread(
                    target=self._renew_loop, name="autonomic-claim-renewal", daemon=True
                )
                self._renewer.start()

    def _renew_loop(self) -> None:
        """Renew every held claim each third of the lease, until a turn finds none held (a
        hold that finds no renewer starts one: a stream of dispatches keeps one thread). A
        renewal that finds a claim taken over stops renewing it: its unit of work will
        refuse to commit. One that fails (the store out of reach) is tried again at the next
        turn; the lease leaves two turns of slack."""
        interval = self.lease_ms / 3000
        store, holder, lease_ms = self._store, self.holder, self.lease_ms
        while True:
            with self._renew:
                if not self._renewing or self._closed:
                    self._renewer = None
                    return
                self._renew.wait(interval)
                held = list(self._renewing.items())
            for token, keys in held:
                try:
                    kept = store.renew_outside(keys, holder, lease_ms)
                except Exception:  # the store out of reach: the next turn tries again
                    continue
                if not kept:
                    with self._renew_lock:
                        self._renewing.pop(token, None)

    def check(self, txn: Transaction, keys: Sequence[ClaimKey], results: object) -> None:
        """Inside a unit of work whose outside actions ran under the claim of `keys`: raise
        OutsideClaimLost (the unit writes nothing) if another holder took one over meanwhile.
        `results`: what the calls returned, for the error."""
        if not txn.holds_outside(keys, self.holder):
            raise OutsideClaimLost(*keys[0], self.lease_ms, results)

    def let_go(self, txn: Transaction, keys: Sequence[ClaimKey]) -> None:
        """At the end of that unit of work (after `check`, once it has written its result):
        let go of the claim of `keys` in its transaction, so that its commit releases them
        (then call the release with `committed=True`)."""
        txn.release_outside(keys, self.holder)

    def close(self) -> None:
        """Stop renewing (the runtime closes): claims still held run out with their lease."""
        with self._renew:
            self._closed = True
            self._renew.notify()
        renewer = self._renewer
        if renewer is not None:
            renewer.join()

    def claim(
        self, keys: Sequence[ClaimKey], committed: Callable[[], bool], *, wait: bool = True
    ) -> Release | None:
        """Hold `keys` in this thread and in the store until the returned function is called,
        first waiting until no other dispatch, here or in another process, holds any of them;
        None when `committed()` says their result is stored already (nothing to call). With
        `wait=False` a held key raises OutsideCallInProgress instead."""
        me = threading.get_ident()
        while True:
            local, busy = self.try_local(keys, me)
            if local is not None:
                break
            if not wait:
                if committed():
                    return None
                raise OutsideCallInProgress(*keys[0])
            assert busy is not None
            busy.wait()
        try:
            durable = self.hold(keys, committed, wait=wait)
        except BaseException:
            local()
            raise
        if durable is None:
            local()
            return None
        return _both(durable, local)


def _both(durable: Release, local: Local) -> Release:
    def release(*, committed: bool = False) -> None:
        try:
            durable(committed=committed)
        finally:
            local()

    return release
