"""Resilience benchmark: a billing cycle committed per chunk, and the cost of a policy.

Run: `python benchmarks/resilience.py [--quick] [--json]` (about a minute; `--quick` a few
seconds). Every figure is a ratio of two timings taken in the same run; "higher is better"
ratios read baseline time / subject time.

1. Billing cycle on SQLite (WAL, synchronous=FULL, the store's defaults; checkpoint-mode
   ledger, the Runtime's default): one ChargeRequested per customer through the generated
   Billing governor, its PaymentProcessor policy applied.
   - subject: `dispatch_in_chunks(billing, charges)` at its default chunk of 256;
   - one by one: `billing.dispatch(...)` per customer, one commit each;
   - baseline: raw sqlite3 writing the same number of rows of the same shapes (an instance
     update, a ledger row, an idempotency row per charge) with one commit per chunk of 256.
2. Policy overhead (memory store, no ledger): a Billing instance cycling ChargeRequested /
   PaymentSucceeded, with Billing's policies applied (subject) and with them removed from the
   same tables (baseline), so the difference is the wrapper: bulkhead, fallback, breaker, retry.
3. Claim cost (SQLite defaults, checkpoint-mode ledger): ChargeRequested with an event id, one
   dispatch at a time, each to its own instance, so each claims its event id in the store
   before its charge is called (runtime/resilience/claims.py) and lets go after its commit
   (subject), against the same dispatches with the claim switched off (baseline: the
   governor claims no keys). Dispatches whose rows call no outside action never claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sqlite3
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Any

from autonomic.generated.billing import MACHINE as BILLING
from autonomic.runtime.dispatch import DispatchRequest, Governor
from autonomic.runtime.keys import generate_keypair, load_signer
from autonomic.runtime.ledger import INSERT_ENTRY_SQL, SCHEMA_SQL, LedgerSealer
from autonomic.runtime.resilience import dispatch_in_chunks
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import SQLiteStore
from autonomic.runtime.tables import MachineSpec

CHUNK = 256


def _charge(customer: str) -> dict[str, str]:
    return {
        "customer_id": customer,
        "invoice_id": "2026-12",
        "amount": "99.00",
        "idempotency_key": customer,
    }


def _billing(runtime: Runtime, spec: MachineSpec = BILLING) -> Governor:
    return runtime.load(
        spec,
        {name: lambda ctx: True for name in spec.guards},
        {name: lambda ctx: None for name in spec.actions},
    )


def _billing_on_sqlite(folder: Path, customers: list[str]) -> tuple[Runtime, Governor]:
    """A new SQLite store in `folder` (defaults, checkpoint-mode ledger) with Billing loaded
    and an instance per customer."""
    keys = folder / "keys"
    if not keys.exists():
        generate_keypair(keys)
    path = folder / f"store-{time.perf_counter_ns()}.db"
    runtime = Runtime(SQLiteStore(path), sealer=LedgerSealer(load_signer(keys)))
    billing = _billing(runtime)
    # Setup, not measured: concurrent creates share commits through the group committer.
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(billing.create, customers))
    return runtime, billing


def _cycle_round(folder: Path, customers: list[str], chunked: bool) -> tuple[float, int]:
    """Seconds for the cycle (instances created beforehand), and the commits it took."""
    runtime, billing = _billing_on_sqlite(folder, customers)
    charges = [DispatchRequest(c, "ChargeRequested", _charge(c)) for c in customers]
    before = runtime.commit_batches
    gc.disable()
    start = time.perf_counter()
    if chunked:
        results = dispatch_in_chunks(billing, charges)
        assert not any(isinstance(r, Exception) for r in results)
    else:
        for request in charges:
            billing.dispatch(request.instance_id, request.event, request.payload)
    elapsed = time.perf_counter() - start
    gc.enable()
    commits = runtime.commit_batches - before
    runtime.close()
    return elapsed, commits


def _raw_round(folder: Path, count: int) -> tuple[float, int]:
    path = folder / f"raw-{time.perf_counter_ns()}.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.executescript(SCHEMA_SQL)
    db.execute(
        "CREATE TABLE instances (machine TEXT, instance TEXT, state TEXT, version INT, "
        "PRIMARY KEY (machine, instance))"
    )
    db.execute(
        "CREATE TABLE idempotency (machine TEXT, key TEXT, request BLOB, result TEXT, "
        "PRIMARY KEY (machine, key))"
    )
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO instances VALUES ('Billing', ?, 'Current', 1)",
        [(f"c{n}",) for n in range(count)],
    )
    db.execute("COMMIT")
    row = (
        0,
        0,
        "transition",
        "Billing",
        "",
        "Current",
        "AwaitingPayment",
        "ChargeRequested",
        "system",
        "",
        bytes(32),
        bytes(32),
        bytes(32),
        "",
        b"",
    )
    commits = 0
    start = time.perf_counter()
    for first in range(0, count, CHUNK):
        db.execute("BEGIN IMMEDIATE")
        for n in range(first, min(first + CHUNK, count)):
            db.execute(
                "UPDATE instances SET state = 'AwaitingPayment', version = 2 "
                "WHERE machine = 'Billing' AND instance = ? AND version = 1",
                (f"c{n}",),
            )
            db.execute(INSERT_ENTRY_SQL, (n, *row[1:4], f"c{n}", *row[5:]))
            db.execute(
                "INSERT INTO idempotency VALUES ('Billing', ?, ?, '{}')", (f"c{n}", bytes(32))
            )
        db.execute("COMMIT")
        commits += 1
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed, commits


def billing_cycle(count: int, rounds: int) -> dict[str, Any]:
    customers = [f"cust-{n:06}" for n in range(count)]
    best: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(rounds):
            for name, run in (
                ("chunked", lambda: _cycle_round(Path(folder), customers, True)),
                ("one by one", lambda: _cycle_round(Path(folder), customers, False)),
                ("raw sqlite3", lambda: _raw_round(Path(folder), count)),
            ):
                seconds, commits = run()
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, commits)
    return {
        name: {"charges_per_s": count / seconds, "commits": commits, "seconds": seconds}
        for name, (seconds, commits) in best.items()
    }


def _policy_round(spec: MachineSpec, cycles: int) -> float:
    runtime = Runtime()
    billing = _billing(runtime, spec)
    billing.create("cust")
    charge = _charge("cust")
    paid = {
        "customer_id": "cust",
        "transaction_id": "t",
        "amount": "99.00",
        "idempotency_key": "cust",
    }
    dispatch: Callable[..., object] = billing.dispatch
    gc.disable()
    start = time.perf_counter()
    for _ in range(cycles):
        dispatch("cust", "ChargeRequested", charge)
        dispatch("cust", "PaymentSucceeded", paid)
    elapsed = time.perf_counter() - start
    gc.enable()
    return elapsed


def policy_overhead(cycles: int, rounds: int) -> dict[str, Any]:
    bare = dataclasses.replace(BILLING, policies=MappingProxyType({}))
    with_policy = min(_policy_round(BILLING, cycles) for _ in range(rounds))
    without = min(_policy_round(bare, cycles) for _ in range(rounds))
    per_dispatch = lambda seconds: seconds / (2 * cycles) * 1e6  # noqa: E731
    return {
        "us_per_dispatch_with_policies": per_dispatch(with_policy),
        "us_per_dispatch_without": per_dispatch(without),
        "ratio": without / with_policy,
    }


def _claim_round(folder: Path, count: int, claims: bool) -> float:
    customers = [f"cust-{n:06}" for n in range(count)]
    runtime, billing = _billing_on_sqlite(folder, customers)
    if not claims:
        billing._claim_keys = lambda work: ()  # type: ignore[method-assign]
    gc.disable()
    start = time.perf_counter()
    for customer in customers:
        billing.dispatch(customer, "ChargeRequested", _charge(customer), event_id=customer)
    elapsed = time.perf_counter() - start
    gc.enable()
    runtime.close()
    return elapsed


def claim_cost(count: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        timings: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):  # interleaved: the disk's moods fall on both alike
            for claims in (False, True):
                timings[claims].append(_claim_round(Path(folder), count, claims))
    with_claims, without = min(timings[True]), min(timings[False])
    return {
        "us_per_dispatch_with_claims": with_claims / count * 1e6,
        "us_per_dispatch_without": without / count * 1e6,
        "ratio": without / with_claims,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    count, rounds, cycles = (512, 2, 2000) if args.quick else (4096, 3, 10000)
    cycle = billing_cycle(count, rounds)
    policy = policy_overhead(cycles, rounds)
    claimed = claim_cost(count // 2, rounds + 1)
    raw = cycle["raw sqlite3"]["seconds"]
    print(f"Billing cycle, {count} charges on SQLite (best of {rounds}):")
    print(f"| {'way':<12} | {'charges/s':>10} | {'commits':>7} | {'raw/subject':>11} |")
    print(f"|{'-' * 14}|{'-' * 12}:|{'-' * 8}:|{'-' * 12}:|")
    for name, figures in cycle.items():
        print(
            f"| {name:<12} | {figures['charges_per_s']:>10.0f} | {figures['commits']:>7} | "
            f"{raw / figures['seconds']:>11.3f} |"
        )
    print()
    print(
        f"Policy overhead (memory store, {2 * cycles} dispatches, best of {rounds}): "
        f"{policy['us_per_dispatch_with_policies']:.1f} us with Billing's policies, "
        f"{policy['us_per_dispatch_without']:.1f} us without; ratio {policy['ratio']:.3f}"
    )
    print(
        f"Claim cost (SQLite, {count // 2} charges with event ids one at a time, best of "
        f"{rounds + 1}): {claimed['us_per_dispatch_with_claims']:.0f} us per dispatch with "
        f"the claim, {claimed['us_per_dispatch_without']:.0f} us without; "
        f"ratio {claimed['ratio']:.3f}"
    )
    if args.json:
        print(
            json.dumps({"billing_cycle": cycle, "policy_overhead": policy, "claim_cost": claimed})
        )


if __name__ == "__main__":
    main()
