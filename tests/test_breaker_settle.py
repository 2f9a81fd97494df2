"""Breaker changes are stored before the caller hears of the outcome that made them: also
when another dispatch's unit of work took the change into its own transaction and has not
committed yet, and on a partitioned PostgreSQL store whose breaker chain is not the
dispatch's (a SIGKILL right after the dispatch's commit keeps the change)."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from autonomic.generated.billing import MACHINE as BILLING
from autonomic.runtime.errors import ActionFailed
from autonomic.runtime.keys import load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.resilience import ServiceFailure
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.sealing import _Chain
from autonomic.runtime.store.base import Transaction, WorkOutcome
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.tables import ActionPolicy
from autonomic.runtime.timers import VirtualClock
from billing_world import CHARGE, START, Processor, noop, open_billing, yes
from conftest import Stores

CRASH_WORKER = Path(__file__).with_name("breaker_crash_worker.py")
PAYLOAD = CHARGE


def failed(ctx: Any) -> None:
    raise ServiceFailure("the processor answered 500")


def test_a_failure_is_told_only_after_its_breaker_change_is_stored(
    tmp_path: Path, keys: Path
) -> None:
    """A's charge fails (one breaker failure, no retry, no fallback) and, before A answers,
    B's unrelated unit of work takes that change into its transaction, whose commit is held.
    A must not answer before B's commit has stored it."""
    policy = ActionPolicy("Processor", ("submit_charge",), tolerated_failures=10)
    spec = dataclasses.replace(BILLING, policies=MappingProxyType({"Processor": policy}))
    store = SQLiteStore(tmp_path / "s.db")
    runtime = Runtime(
        store, clock=VirtualClock(START), sealer=LedgerSealer(load_signer(keys), "sign-each")
    )
    actions: dict[str, Callable[[Any], object]] = {name: noop for name in spec.actions}
    actions["submit_charge"] = failed
    billing = runtime.load(spec, {name: yes for name in spec.guards}, actions)
    billing.create("c1")
    journal = runtime._breakers
    noted, took, progress, commit_b, committed_b = (threading.Event() for _ in range(5))

    note, take = journal.note, journal.take

    def noting(*args: Any) -> None:
        note(*args)
        noted.set()
        assert took.wait(30)  # B's unit has taken the change

    def taking(*args: Any) -> Any:
        taken = take(*args)
        if taken:
            took.set()
        return taken

    settle = getattr(journal, "settle", None)

    def settling(*args: Any) -> None:
        progress.set()  # A waits for the change to be stored
        assert settle is not None
        settle(*args)

    journal.note = noting  # type: ignore[method-assign]
    journal.take = taking  # type: ignore[method-assign]
    journal.settle = settling  # type: ignore[method-assign]
    run = store.run

    def held_commit(
        works: Sequence[Callable[[Transaction], object]],
        before_commit: Callable[[Transaction], None] | None = None,
    ) -> list[WorkOutcome[object]]:
        if threading.current_thread().name != "B":
            return run(works, before_commit)

        def hold(txn: Transaction) -> None:
            assert commit_b.wait(30)
            if before_commit is not None:
                before_commit(txn)

        outcomes = run(works, hold)
        committed_b.set()
        return outcomes

    store.run = held_commit  # type: ignore[method-assign]

    def unrelated(txn: Transaction, chain: _Chain) -> None:
        return None  # its batch takes A's change into its transaction

    told_before_b_committed: list[bool] = []

    def charge() -> None:
        try:
            billing.dispatch("c1", "ChargeRequested", PAYLOAD)
        except ActionFailed:
            told_before_b_committed.append(not committed_b.is_set())
        progress.set()

    a = threading.Thread(target=charge, name="A")
    b = threading.Thread(target=runtime._submit, args=(unrelated,), name="B")
    a.start()
    try:
        assert noted.wait(30)
        b.start()
        assert progress.wait(30)
    finally:
        commit_b.set()
        a.join(30)
        b.join(30)
    assert told_before_b_committed == [False]
    stored = store.get_breaker("Billing", "Processor")
    assert stored is not None and stored.failures == 1
    runtime.close()


def test_a_breaker_change_on_another_ledger_chain_survives_a_kill_after_the_charge(
    postgres_stores: Stores, keys: Path
) -> None:
    """A partitioned PostgreSQL store where the breaker's entries go to another ledger chain
    than the charge's: the breaker's change is stored before the charge commits, so a
    SIGKILL right after the charge's commit keeps it (3 charges, 3 failures)."""
    store = postgres_stores.open("s", partitions=4)
    breaker_chain = store.partition_of("policy:PaymentProcessor")  # type: ignore[attr-defined]
    prefix = next(
        p
        for p in "cdefgh"
        if store.partition_of(f"{p}2") != breaker_chain  # type: ignore[attr-defined]
    )
    store.close()
    done = subprocess.run(
        [sys.executable, str(CRASH_WORKER), postgres_stores.location("s"), str(keys), "3", prefix],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    runtime = open_billing(postgres_stores.open("s"), keys, VirtualClock(START), Processor())
    last = runtime.governor("Billing").get(f"{prefix}2")
    assert last is not None and last.state == "AwaitingPayment"  # the charge committed
    stored = runtime.store.get_breaker("Billing", "PaymentProcessor")
    assert stored is not None and (stored.state, stored.failures) == ("closed", 3)
    runtime.close()
