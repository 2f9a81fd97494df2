"""Flow benchmark: flow overhead against dispatching the same steps directly, signups per second
with the parallel flow on asyncio and SQLite, sagas per second with one injected failure, the
cancellation saga against DBOS Transact on SQLite, and the cost of one durable step against raw
SQLite commits of the same rows, all measured in the same run.

Run: `python benchmarks/flows.py [--quick]` (needs `pip install -e '.[bench]'` for DBOS).

Every figure runs on SQLite files in a fresh temporary folder (WAL, synchronous=FULL, the
store's defaults), the subject with the seven generated governors and a signed ledger at the
library's defaults (`LedgerSealer(signer)`: checkpoint mode, one signed checkpoint per commit
batch), at the FlowRunner's defaults. The durable step and the asyncio sagas (and so the
ratios to DBOS) are measured again with a ledger that signs every entry (sign-each, the demo's
setting and the costliest mode), each row labelled. Customers are made active before the clock
starts (by a runtime at synchronous=NORMAL, closed before a new one at the defaults is timed:
see `prepared`); only the flows (or their baselines) are timed. The machine is shared, so
compare ratios within a run: the durable step is timed in STEP_ROUNDS rounds alternating with
its baseline, and the asyncio sagas and DBOS's in RUNS rounds taken in turn, each figure the
median of its rounds with their range. The asyncio figures also print how many commits their
units of work took (dispatch_async and the runs' writes share the group commit). No figure
here counts duplicate effects: "0 under kill -9" (tests/test_flow_crash.py) counts ledger
effects, and an outside call killed before its commit is made again, deduplicated by the
processor on its idempotency key.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

from autonomic.generated import FLOWS, MODULES
from autonomic.runtime.demo import _Bindings, _Payments
from autonomic.runtime.flows import FlowRunner, StepContext, StepFailed
from autonomic.runtime.keys import Signer
from autonomic.runtime.ledger import (
    INSERT_CHECKPOINT_SQL,
    INSERT_ENTRY_SQL,
    LedgerMode,
    LedgerSealer,
)
from autonomic.runtime.resilience.proration import prorate_upgrade
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore, Synchronous
from autonomic.runtime.timers import VirtualClock
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import raw_copy, timed

SIGNER = Signer.from_private_key(Ed25519PrivateKey.generate())
CONCURRENCY = 32
# The ledger modes measured: first the library's default (`LedgerSealer(signer)`, one signed
# checkpoint per commit batch on SQLite), the headline figures; then sign-each, every entry
# signed, the demo's setting and the costliest mode.
MODES: tuple[tuple[LedgerMode, str], ...] = (
    ("checkpoint", "defaults: checkpoint per commit"),
    ("sign-each", "sign-each"),
)


def refund_due(values: Any) -> str:
    return "15.00"


class Marketplace:
    """The seven governors and the five flows on one SQLite file."""

    def __init__(
        self,
        path: Path,
        before_step: Callable[[StepContext], None] | None = None,
        mode: LedgerMode = "checkpoint",
        synchronous: Synchronous = "FULL",
        bindings: _Bindings | None = None,
    ):
        self.runtime = Runtime(
            SQLiteStore(path, synchronous=synchronous),
            clock=VirtualClock(1_767_225_600_000),
            sealer=LedgerSealer(SIGNER, mode),
        )
        self.bindings = bindings or _Bindings(_Payments())
        for module in MODULES:
            spec = importlib.import_module(f"autonomic.generated.{module}").MACHINE
            self.runtime.load(spec, *self.bindings.of(spec))
        flows = [importlib.import_module(f"autonomic.generated.{m}").FLOW for m in FLOWS]
        self.runner = FlowRunner(
            self.runtime,
            flows,
            functions={"refund_due": refund_due, "prorate_upgrade": prorate_upgrade},
            before_step=before_step,
        )

    def active(self, customer: str) -> None:
        """Signed up, paid, entitlement approved: ready to cancel (raw dispatches, untimed)."""
        g = self.runtime.governor
        for machine in ("CustomerAccount", "Subscription", "QuotaSla", "Compliance"):
            g(machine).create(customer)
        g("Subscription").dispatch(
            customer,
            "CreateTrialSubscription",
            {"customer_id": customer, "product_id": "p", "tier": "professional"},
        )
        g("Billing").create(customer)
        g("Entitlement").create(customer)
        g("Entitlement").dispatch(customer, "Approve", {"approver": "vendor-admin"})
        g("Subscription").dispatch(
            customer,
            "ConvertTrial",
            {
                "customer_id": customer,
                "payment_method_id": "pm",
                "invoice_id": f"i-{customer}",
                "amount": "30",
            },
        )
        self.runtime.deliver_outbox()
        self.bindings.payments.invoices[customer] = Decimal("30")
        paid = {
            "customer_id": customer,
            "transaction_id": f"t-{customer}",
            "amount": "30",
            "idempotency_key": f"i-{customer}",
        }
        g("Billing").dispatch(customer, "PaymentSucceeded", paid)
        self.runtime.deliver_outbox()

    def close(self) -> None:
        self.runtime.close()


def prepared(
    path: Path,
    customers: list[str],
    before_step: Callable[[StepContext], None] | None = None,
    mode: LedgerMode = "checkpoint",
) -> Marketplace:
    """A Marketplace at the defaults (synchronous=FULL) on a file where `customers` were made
    active beforehand (untimed) by a runtime at synchronous=NORMAL, then closed: the file is
    the one a FULL runtime would leave (NORMAL skips only the fsyncs; closing checkpoints the
    log), in a third of the time. The timed runtime is a new one on that file, as after a
    restart, with the same payment processor."""
    setup = Marketplace(path, mode=mode, synchronous="NORMAL")
    for customer in customers:
        setup.active(customer)
    setup.close()
    return Marketplace(path, before_step, mode, bindings=setup.bindings)


def cancel_inputs(customer: str) -> dict[str, str]:
    return {"customer_id": customer, "request_id": f"cx-{customer}", "reason": "bench"}


def direct_cancel(market: Marketplace, customer: str) -> None:
    """The saga's three sends as plain dispatches, no flow: the overhead baseline."""
    g = market.runtime.governor
    refund = refund_due({})
    g("Billing").dispatch(
        customer,
        "IssueCancellationRefund",
        {
            "customer_id": customer,
            "amount": refund,
            "idempotency_key": f"cx-{customer}",
        },
    )
    g("Entitlement").dispatch(customer, "SuspendForCancellation", {"customer_id": customer})
    g("Subscription").dispatch(
        customer, "CancelRequested", {"customer_id": customer, "reason": "b"}
    )


def concurrently(count: int, one: Callable[[int], object]) -> None:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(count)))


# ---------------------------------------------------------------- the figures


def saga_rates(folder: Path, count: int, failing: bool) -> tuple[float, float]:
    """(flow sagas/s, direct dispatch sagas/s) sequentially, and concurrently below."""

    def inject(ctx: StepContext) -> None:
        if failing and ctx.step == "archive_subscription" and ctx.phase == "do":
            raise StepFailed("injected")

    market = prepared(folder / f"saga-{failing}.db", [f"c{i}" for i in range(2 * count)], inject)
    flow_time = timed(
        lambda: [
            market.runner.start("SubscriptionCancellation", f"c{i}", cancel_inputs(f"c{i}"))
            for i in range(count)
        ]
    )

    def direct() -> None:
        for i in range(count, 2 * count):
            direct_cancel(market, f"c{i}")

    direct_time = timed(direct)
    market.close()
    return count / flow_time, count / direct_time


class Commits:
    """Counts the commit batches and units of work of a runtime's group committer."""

    def __init__(self, runtime: Runtime) -> None:
        self.committer = runtime._committer
        self.batches = self.committer.batches
        self.units = self.committer.committed_units

    def since(self) -> tuple[int, int]:
        """(units, commits) since this was made."""
        units = self.committer.committed_units - self.units
        return units, self.committer.batches - self.batches


# Each asyncio figure (and DBOS's) is the median of this many runs, each on a new file: one
# run lasts about a second, and a burst of the neighbours' disk load can halve it.
RUNS = 3


def concurrent_saga_rate(
    folder: Path,
    count: int,
    failing: bool,
    mode: LedgerMode = "checkpoint",
    run: int = 0,
) -> tuple[float, int, int]:
    """(sagas/s, units of work, commits) for `count` sagas started at once under asyncio."""

    def inject(ctx: StepContext) -> None:
        if failing and ctx.step == "archive_subscription" and ctx.phase == "do":
            raise StepFailed("injected")

    customers = [f"c{i}" for i in range(count)]
    market = prepared(folder / f"csaga-{failing}-{mode}-{run}.db", customers, inject, mode)

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(count):
                group.create_task(
                    market.runner.start_async(
                        "SubscriptionCancellation", f"c{i}", cancel_inputs(f"c{i}")
                    )
                )

    commits = Commits(market.runtime)
    elapsed = timed(lambda: asyncio.run(main()))
    units, batches = commits.since()
    results = [
        market.runner.start("SubscriptionCancellation", f"c{i}", cancel_inputs(f"c{i}"))
        for i in range(count)
    ]
    expected = "compensated" if failing else "completed"
    assert all(r.status == expected for r in results), {r.status for r in results}
    market.close()
    return count / elapsed, units, batches


def signup_rate(folder: Path, count: int) -> tuple[float, int, int]:
    """(signups/s, units of work, commits) for `count` signups started at once."""
    market = Marketplace(folder / "signup.db")

    def profile(i: int) -> dict[str, str]:
        return {
            "customer_id": f"s{i}",
            "email": f"s{i}@example.com",
            "country": "DE",
            "product_id": "p",
            "tier": "professional",
        }

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(count):
                group.create_task(market.runner.start_async("CustomerSignup", f"s{i}", profile(i)))

    commits = Commits(market.runtime)
    elapsed = timed(lambda: asyncio.run(main()))
    units, batches = commits.since()
    market.close()
    return count / elapsed, units, batches


STEP_ROUNDS = 10


def durable_step_cost(
    folder: Path, count: int, mode: LedgerMode = "checkpoint"
) -> tuple[list[float], list[float], int]:
    """(ms per durable flow step, ms per step of raw SQLite writing the same rows in the same
    commits, each over STEP_ROUNDS rounds; commits per saga). A step here is one of the
    saga's four (the pure refund calculation included); the sagas run one after another. The
    raw baseline is plain sqlite3 on a copy of the runtime's store file (the same tables and
    indexes, an already used file, WAL and synchronous=FULL): per saga, the commits one traced
    saga made, each writing the rows that commit wrote (ledger rows shaped like the saga's
    signed entries, instance updates version-checked as the store writes them, flow rows,
    processed ids, timers, outbox rows), and none of the reads, signatures or validation.
    Each round times `count / STEP_ROUNDS` sagas of both, back to back in alternating order,
    so that a burst of the neighbours' disk or CPU load spoils a round, not the figure."""
    customers = [f"c{i}" for i in range(count + 2)]
    market = prepared(folder / f"step-{mode}.db", customers, mode=mode)
    # One saga first on the reopened runtime, so that the traced one writes what every later
    # saga writes (not a first commit's extras, which the raw writer would repeat).
    market.runner.start("SubscriptionCancellation", f"c{count + 1}", cancel_inputs(f"c{count + 1}"))
    commits = saga_writes(market, f"c{count}")
    raw = RawSagas(folder / f"step-{mode}.db", folder / f"raw-{mode}.db", commits, f"c{count}")
    raw.prepare([f"c{i}" for i in range(count)])
    per_round = count // STEP_ROUNDS
    ours: list[float] = []
    theirs: list[float] = []

    def sagas(first: int) -> None:
        for i in range(first, first + per_round):
            market.runner.start("SubscriptionCancellation", f"c{i}", cancel_inputs(f"c{i}"))

    for number in range(STEP_ROUNDS):
        first = number * per_round
        if number % 2:
            theirs.append(timed(lambda: raw.write(per_round)))
        ours.append(timed(partial(sagas, first)))
        if not number % 2:
            theirs.append(timed(lambda: raw.write(per_round)))
    market.close()
    raw.close()
    steps = per_round * 4 / 1000  # four steps a saga; in ms
    return [t / steps for t in ours], [t / steps for t in theirs], len(commits)


# A saga's writes as its store made them: (SQL, parameters) of each write of each commit.
Commit = list[tuple[str, tuple[Any, ...]]]
_IDS = re.compile(r"\b(evt|flw)_([0-9a-f]{32})\b")
# The writes of outbox and timers rows, whose ids SQLite gives (see RawSagas.prepare).
_ID_WRITES = re.compile(r"(INSERT INTO|UPDATE) (outbox|timers) (\(id,|\(|SET seal)")


def saga_writes(market: Marketplace, customer: str) -> list[Commit]:
    """The writes of each commit of one saga on `customer` (untimed), in order, with their
    parameters, as the store's transaction executed them (through any of its statement
    methods). Raises if a table gained rows the trace did not see: a raw writer replaying
    part of the saga would be no baseline."""
    store = market.runtime.store
    connection = store._connection  # type: ignore[attr-defined]
    txn = store._txn  # type: ignore[attr-defined]
    one, several = ("_execute", "_write"), ("_executemany", "_write_many")
    originals = {name: getattr(txn, name) for name in (*one, *several)}
    commits: list[Commit] = []
    current: Commit = []

    def writes(execute: Callable[..., Any], sql: str, parameters: Any = ()) -> Any:
        # Not the outside call's claim, let go in the unit that records the call: the raw
        # writer takes no claim (as its claim's own commit is not one of the saga's, below).
        if (
            sql.startswith(("INSERT", "UPDATE", "DELETE", "REPLACE"))
            and "outside_claims" not in sql
        ):
            current.append((sql, tuple(parameters)))
        return execute(sql, parameters)

    def many(executemany: Callable[..., Any], sql: str, rows: Any) -> Any:
        rows = [tuple(row) for row in rows]
        current.extend((sql, row) for row in rows)
        return executemany(sql, rows)

    def trace(sql: str) -> None:
        # A commit that wrote no row is an outside call's claim (the same connection, rows
        # the raw writer does not write): not a commit of the saga's rows.
        if sql == "COMMIT" and current:
            commits.append(current[:])
            current.clear()

    before = table_rows(connection)
    for name in one:
        setattr(txn, name, partial(writes, originals[name]))
    for name in several:
        setattr(txn, name, partial(many, originals[name]))
    connection.set_trace_callback(trace)
    try:
        market.runner.start("SubscriptionCancellation", customer, cancel_inputs(customer))
    finally:
        connection.set_trace_callback(None)
        for name, method in originals.items():
            setattr(txn, name, method)
    gained = {table: rows - before[table] for table, rows in table_rows(connection).items()}
    inserted = dict.fromkeys(gained, 0)
    for sql, _ in (write for commit in commits for write in commit):
        if sql.startswith("INSERT INTO "):
            table = sql.split()[2]
            inserted[table] = inserted.get(table, 0) + 1
    if gained != inserted:
        raise RuntimeError(f"the trace saw {inserted} rows inserted, the tables gained {gained}")
    return commits


# The tables a saga adds rows to, counted around the traced saga and the raw writer's.
_SAGA_TABLES = ("ledger", "ledger_checkpoints", "processed_events", "flows", "outbox", "timers")


def table_rows(connection: sqlite3.Connection) -> dict[str, int]:
    """The row count of each table a saga adds rows to."""
    return {
        table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in _SAGA_TABLES
    }


class RawSagas:
    """Raw sqlite3 writing, for each saga, the very rows the traced saga's commits wrote, in
    its commits, as that saga would have written them for another customer: the customer's
    name and the ids derived from it (flow id, event ids, here a hash of the traced id and the
    customer) replaced, the ledger's seq and each checkpoint's size numbered on, and every
    other value (hashes and signatures included: the raw writer computes none) copied. The
    customers' rows in the copy are where the traced customer's were before its saga, so the
    version-checked updates match, and their row counts are checked as the store checks them.
    Every row's parameters are built before the clock starts; consecutive rows of one
    statement go to one `executemany`, as a raw writer would send them (see durable_step_cost).
    """

    def __init__(self, store: Path, path: Path, commits: list[Commit], traced: str) -> None:
        self.connection = raw_copy(store, path)
        self.commits = commits
        self.traced = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(traced)}(?![0-9])")
        self.seq = int(self.connection.execute("SELECT max(seq) FROM ledger").fetchone()[0]) + 1
        # Outbox and timers rows: the ids SQLite gives them (AUTOINCREMENT), numbered on here,
        # for rows inserted with the id the store chose and for the UPDATE that seals a row.
        self.ids = {
            table: max(
                self.connection.execute(
                    "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = ?",
                    (table,),
                ).fetchone()[0],
                self.connection.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0],
            )
            for table in ("outbox", "timers")
        }
        self.plans: list[list[list[tuple[str, list[tuple[Any, ...]]]]]] = []
        self.sagas = 0

    def _value(self, value: Any, customer: str) -> Any:
        if not isinstance(value, str):
            return value
        value = self.traced.sub(customer, value)
        return _IDS.sub(
            lambda m: f"{m[1]}_" + hashlib.sha256(f"{m[0]}/{customer}".encode()).hexdigest()[:32],
            value,
        )

    def prepare(self, customers: list[str]) -> None:
        """Build the parameters of every row of a saga per customer, in order (untimed)."""
        for customer in customers:
            plan = []
            for commit in self.commits:
                batches: list[tuple[str, list[tuple[Any, ...]]]] = []
                for sql, parameters in commit:
                    row = tuple(self._value(v, customer) for v in parameters)
                    if sql == INSERT_ENTRY_SQL:
                        row = (self.seq, *row[1:])
                        self.seq += 1
                    elif sql == INSERT_CHECKPOINT_SQL:
                        row = (self.seq, *row[1:])
                    elif match := _ID_WRITES.match(sql):
                        verb, table, first = match.groups()
                        if verb == "INSERT INTO":
                            self.ids[table] += 1
                        if first == "(id,":
                            row = (self.ids[table], *row[1:])
                        elif verb == "UPDATE":  # seals the row just inserted, by its id
                            row = (*row[:-1], self.ids[table])
                    if batches and batches[-1][0] == sql and sql.startswith("INSERT"):
                        batches[-1][1].append(row)
                    else:
                        batches.append((sql, [row]))
                plan.append(batches)
            self.plans.append(plan)

    def write(self, sagas: int) -> None:
        connection = self.connection
        execute, executemany = connection.execute, connection.executemany
        for plan in self.plans[self.sagas : self.sagas + sagas]:
            for batches in plan:
                execute("BEGIN IMMEDIATE")
                for sql, rows in batches:
                    if len(rows) > 1:
                        executemany(sql, rows)
                    elif execute(sql, rows[0]).rowcount != 1 and sql.startswith("UPDATE"):
                        raise RuntimeError(f"a version-checked update missed: {sql[:60]}")
                execute("COMMIT")
        self.sagas += sagas

    def close(self) -> None:
        self.connection.close()


def dbos_rate(folder: Path, count: int, failing: bool, round_: int = 0) -> float | None:
    """The same four-step cancellation saga as DBOS Transact workflows on SQLite: each step a
    @DBOS.step writing its effect row to an SQLite file (WAL, synchronous=FULL), compensations
    in reverse order on a failure, run `CONCURRENCY` at a time with start_workflow."""
    try:
        from dbos import DBOS, DBOSConfig
    except ImportError:
        return None
    effects_path = folder / f"dbos-effects-{failing}-{round_}.db"
    local = threading.local()

    def effects() -> sqlite3.Connection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(effects_path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            local.conn = conn
        return conn

    setup = effects()
    setup.execute("CREATE TABLE IF NOT EXISTS effects (customer TEXT, what TEXT)")

    def write(customer: str, what: str) -> None:
        effects().execute("INSERT INTO effects VALUES (?, ?)", (customer, what))

    config: DBOSConfig = {
        "name": "flows-bench",
        "system_database_url": f"sqlite:///{folder / f'dbos-system-{failing}-{round_}.sqlite'}",
        # DBOS sets its own logging up at launch (INFO by default: ~150 lines a run).
        "log_level": "ERROR",
    }
    DBOS(config=config)

    @DBOS.step()
    def calculate_refund(customer: str) -> str:
        return "15.00"

    @DBOS.step()
    def issue_refund(customer: str, amount: str) -> None:
        write(customer, f"refund {amount}")

    @DBOS.step()
    def suspend_entitlements(customer: str) -> None:
        write(customer, "suspend")

    @DBOS.step()
    def archive_subscription(customer: str) -> None:
        if failing:
            raise RuntimeError("injected")
        write(customer, "archive")

    @DBOS.step()
    def restore_entitlements(customer: str) -> None:
        write(customer, "restore")

    @DBOS.step()
    def reverse_refund(customer: str) -> None:
        write(customer, "reverse refund")

    @DBOS.workflow()
    def cancel(customer: str) -> str:
        amount = calculate_refund(customer)
        issue_refund(customer, amount)
        suspend_entitlements(customer)
        try:
            archive_subscription(customer)
        except RuntimeError:
            restore_entitlements(customer)
            reverse_refund(customer)
            return "compensated"
        return "completed"

    DBOS.launch()
    try:

        def run() -> None:
            handles = [DBOS.start_workflow(cancel, f"c{i}") for i in range(count)]
            outcomes = {h.get_result() for h in handles}
            assert outcomes == {"compensated" if failing else "completed"}, outcomes

        elapsed = timed(run)
    finally:
        DBOS.destroy(destroy_registry=True)
    return count / elapsed


def _runs(values: list[float], shown: str = "{:.0f}") -> str:
    """The median of several runs, and their range."""
    low, high = min(values), max(values)
    median = statistics.median(values)
    return f"{shown.format(median)} (runs {shown.format(low)}-{shown.format(high)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    args = parser.parse_args(argv)
    count = 60 if args.quick else 200
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        flow_rate, direct_rate = saga_rates(folder, count // 2, failing=False)
        rows.append(
            (
                "flow overhead: saga via FlowRunner vs the same dispatches directly",
                f"{flow_rate:.0f} vs {direct_rate:.0f} sagas/s: {flow_rate / direct_rate:.2f}x",
            )
        )
        for mode, label in MODES:
            ours, theirs, commits = durable_step_cost(folder, count, mode)
            ratios = sorted(o / t for o, t in zip(ours, theirs, strict=True))
            rows.append(
                (
                    f"cost per durable step vs raw SQLite, same rows, same {commits} commits a "
                    f"saga ({label})",
                    f"{statistics.median(ours):.2f} ms vs {statistics.median(theirs):.2f} ms: "
                    f"{statistics.median(ratios):.2f}x raw "
                    f"(rounds {ratios[0]:.2f}x-{ratios[-1]:.2f}x)",
                )
            )
        signups, units, batches = signup_rate(folder, count)
        rows.append(("signups/s, parallel flow, asyncio + SQLite", f"{signups:.0f}"))
        rows.append(
            (
                f"  commits for {count} signups at once (dispatch_async + group commit)",
                f"{batches} commits for {units} units of work: {units / batches:.0f} per commit",
            )
        )
        # The asyncio sagas and DBOS's, RUNS rounds of each figure in turn, so that a burst of
        # the neighbours' load hits both sides of a ratio; each figure is the median of its
        # runs, each ratio the median of its rounds' ratios.
        rates: dict[tuple[LedgerMode, bool], list[float]] = {}
        committed: dict[LedgerMode, tuple[int, int]] = {}
        dbos: dict[bool, list[float]] = {False: [], True: []}
        for run in range(RUNS):
            for mode, _ in MODES:
                for failing in (False, True):
                    rate, units, batches = concurrent_saga_rate(folder, count, failing, mode, run)
                    rates.setdefault((mode, failing), []).append(rate)
                    if not failing:
                        committed[mode] = units, batches
            for failing in (False, True):
                dbos_run = dbos_rate(folder, count, failing, run)
                if dbos_run is not None:
                    dbos[failing].append(dbos_run)
        for mode, label in MODES:
            units, batches = committed[mode]
            rows.append((f"sagas/s, asyncio + SQLite ({label})", _runs(rates[mode, False])))
            rows.append(
                (
                    f"  commits for {count} sagas at once ({label})",
                    f"{batches} commits for {units} units of work: "
                    f"{units / batches:.0f} per commit",
                )
            )
            rows.append(
                (
                    f"sagas/s with one injected failure (compensated; {label})",
                    _runs(rates[mode, True]),
                )
            )
        if not dbos[False]:
            rows.append(("DBOS Transact", "not installed: pip install -e '.[bench]'"))
        else:
            rows.append(("DBOS Transact sagas/s, SQLite", _runs(dbos[False])))
            rows.append(("DBOS Transact sagas/s with the failure", _runs(dbos[True])))
            for mode, label in MODES:
                for failing, what in (
                    (False, "cancellation saga"),
                    (True, "saga with a failure"),
                ):
                    ratios = [
                        o / t for o, t in zip(rates[mode, failing], dbos[failing], strict=True)
                    ]
                    rows.append(
                        (
                            f"autonomic / DBOS, {what} ({label})",
                            _runs(ratios, "{:.1f}x"),
                        )
                    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({name: value for name, value in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
