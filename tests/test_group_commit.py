"""GroupCommit: concurrent callers share commits, each unit fails alone, nobody waits forever.

The committer runs over a real SQLiteStore (its `run` is the batch runner the runtime uses),
and every caller checks through a second connection that its row is committed when its call
returns.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.commit import GroupCommit
from autonomic.runtime.store import InstanceRecord, SQLiteStore, Transaction
from autonomic.runtime.store.base import WorkOutcome

MACHINE = "G"
JOIN_TIMEOUT_S = 30


class UnitFailed(Exception):
    """What a unit meant to fail raises, after it has written its row."""


class CommitRefused(Exception):
    """What the batch runner raises before a commit it is told to refuse."""


@dataclass
class Unit:
    """One unit of work: insert the row `name`; optionally wait first, or fail after."""

    name: str
    fail: bool = False
    wait: threading.Event | None = None
    poison: bool = False  # the batch holding this unit is refused at commit

    def __call__(self, txn: Transaction) -> str:
        if self.wait is not None and not self.wait.wait(JOIN_TIMEOUT_S):
            raise TimeoutError(f"unit {self.name} was never released")
        txn.insert_instance(InstanceRecord(MACHINE, self.name, "Done", 1))
        if self.fail:
            raise UnitFailed(self.name)
        return self.name


@dataclass
class BatchRunner:
    """The committer's `run_batch`: SQLiteStore.run, recording the units of each batch and
    refusing the commit of a batch that holds a poison unit."""

    store: SQLiteStore
    batches: list[list[str]] = field(default_factory=list)

    def __call__(self, units: list[Unit]) -> list[WorkOutcome[Any]]:
        self.batches.append([unit.name for unit in units])
        poisoned = any(unit.poison for unit in units)

        def before_commit(txn: Transaction) -> None:
            if poisoned:
                raise CommitRefused(f"batch {len(self.batches)} refused")

        return self.store.run(units, before_commit=before_commit)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "g.db", synchronous="NORMAL")
    yield opened
    opened.close()


def reader(store: SQLiteStore) -> sqlite3.Connection:
    """A second connection: it sees only what is committed."""
    return sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)


def committed(connection: sqlite3.Connection) -> set[str]:
    rows = connection.execute("SELECT instance FROM instances WHERE machine = ?", (MACHINE,))
    return {row[0] for row in rows}


def is_committed(connection: sqlite3.Connection, name: str) -> bool:
    row = connection.execute(
        "SELECT 1 FROM instances WHERE machine = ? AND instance = ?", (MACHINE, name)
    ).fetchone()
    return row is not None


def queued(committer: GroupCommit[Unit]) -> list[str]:
    """The units waiting for a batch (the committer's own queue, read only to know when every
    thread of a test has queued its work)."""
    return [pending.work.name for pending in list(committer._queue)]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.001)


@dataclass
class Caller:
    """A thread that submits its units, then records what came back and whether each of its
    rows was committed at the moment its call returned."""

    committer: GroupCommit[Unit]
    store: SQLiteStore
    units: Sequence[Unit]
    together: bool = False  # one submit_many call instead of one submit per unit
    values: list[object] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    visible_on_return: list[bool] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        with contextlib.closing(reader(self.store)) as second:
            try:
                if self.together:
                    outcomes = self.committer.submit_many(self.units)
                    for unit, outcome in zip(self.units, outcomes, strict=True):
                        self._record(second, unit, outcome.value, outcome.error)
                else:
                    for unit in self.units:
                        try:
                            value = self.committer.submit(unit)
                        except Exception as exc:
                            self._record(second, unit, None, exc)
                        else:
                            self._record(second, unit, value, None)
            finally:
                self.finished.set()

    def _record(
        self, second: sqlite3.Connection, unit: Unit, value: object, error: BaseException | None
    ) -> None:
        self.visible_on_return.append(is_committed(second, unit.name))
        if error is None:
            self.values.append(value)
        else:
            self.errors.append(error)


def join_all(threads: Sequence[threading.Thread]) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in threads if t.is_alive()], "a caller never returned (deadlock)"


def hold_the_lead(
    committer: GroupCommit[Unit], runner: BatchRunner
) -> tuple[Caller, threading.Thread, threading.Event]:
    """A caller whose unit blocks inside its batch until released: meanwhile every other
    caller queues, so the next batches are known exactly."""
    release = threading.Event()
    leader = Caller(committer, runner.store, [Unit("lead", wait=release)])
    thread = leader.start()
    wait_until(lambda: runner.batches == [["lead"]], "the leader runs its batch alone")
    return leader, thread, release


# -- one caller --------------------------------------------------------------------------------


def test_a_lone_caller_commits_alone(store: SQLiteStore) -> None:
    runner = BatchRunner(store)
    committer: GroupCommit[Unit] = GroupCommit(runner)
    with contextlib.closing(reader(store)) as second:
        for number in range(3):
            assert committer.submit(Unit(f"u{number}")) == f"u{number}"
            assert is_committed(second, f"u{number}")
    assert runner.batches == [["u0"], ["u1"], ["u2"]]
    assert (committer.batches, committer.committed_units) == (3, 3)
    assert committer.submit_many([]) == []
    assert committer.batches == 3


def test_max_batch_must_be_positive(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(BatchRunner(store), max_batch=0)


# -- batches of queued callers -------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 2, 3, 512])
def test_queued_callers_share_batches_of_at_most_max_batch(
    store: SQLiteStore, max_batch: int
) -> None:
    runner = BatchRunner(store)
    committer: GroupCommit[Unit] = GroupCommit(runner, max_batch=max_batch)
    leader, lead_thread, release = hold_the_lead(committer, runner)
    callers = [Caller(committer, store, [Unit(f"c{n}")]) for n in range(7)]
    threads = [caller.start() for caller in callers]
    wait_until(lambda: len(queued(committer)) == 7, "every caller queued")
    order = queued(committer)
    assert not any(caller.finished.is_set() for caller in [leader, *callers])
    release.set()
    join_all([lead_thread, *threads])
    # The leader's batch, then the queue in arrival order, cut every max_batch units.
    expected = [["lead"]] + [order[i : i + max_batch] for i in range(0, 7, max_batch)]
    assert runner.batches == expected
    assert (committer.batches, committer.committed_units) == (len(expected), 8)
    for caller in [leader, *callers]:
        assert caller.errors == [] and caller.values == [caller.units[0].name]
        assert caller.visible_on_return == [True]


@pytest.mark.parametrize("max_batch", [1, 2, 3, 512])
def test_a_failing_unit_rolls_back_only_itself(store: SQLiteStore, max_batch: int) -> None:
    runner = BatchRunner(store)
    committer: GroupCommit[Unit] = GroupCommit(runner, max_batch=max_batch)
    leader, lead_thread, release = hold_the_lead(committer, runner)
    failing = {"c1", "c4", "c5"}
    callers = [Caller(committer, store, [Unit(f"c{n}", fail=f"c{n}" in failing)]) for n in range(6)]
    threads = [caller.start() for caller in callers]
    wait_until(lambda: len(queued(committer)) == 6, "every caller queued")
    release.set()
    join_all([lead_thread, *threads])
    assert max(len(batch) for batch in runner.batches) == min(max_batch, 6)
    for caller in callers:
        name = caller.units[0].name
        if name in failing:
            assert caller.values == [] and len(caller.errors) == 1
            assert isinstance(caller.errors[0], UnitFailed) and str(caller.errors[0]) == name
            assert caller.visible_on_return == [False]
        else:
            assert caller.errors == [] and caller.values == [name]
            assert caller.visible_on_return == [True]
    assert leader.values == ["lead"] and leader.visible_on_return == [True]
    with contextlib.closing(reader(store)) as second:
        assert committed(second) == {"lead", "c0", "c2", "c3"}


def test_submit_many_reports_each_unit_and_commits_the_rest(store: SQLiteStore) -> None:
    committer: GroupCommit[Unit] = GroupCommit(BatchRunner(store), max_batch=2)
    units = [Unit("a"), Unit("b", fail=True), Unit("c"), Unit("d"), Unit("e", fail=True)]
    caller = Caller(committer, store, units, together=True)
    caller.run()
    assert caller.values == ["a", "c", "d"]
    assert [str(e) for e in caller.errors] == ["b", "e"]
    # submit_many returns after its last batch: every unit's fate is final by then.
    assert caller.visible_on_return == [True, False, True, True, False]
    assert committer.batches == 3  # five units, at most two per batch


def test_a_refused_commit_fails_its_whole_batch_and_nothing_else(store: SQLiteStore) -> None:
    runner = BatchRunner(store)
    committer: GroupCommit[Unit] = GroupCommit(runner, max_batch=3)
    leader, lead_thread, release = hold_the_lead(committer, runner)
    names = ["c0", "c1", "c2", "c3", "c4", "c5"]
    callers = [Caller(committer, store, [Unit(n, poison=n == "c1")]) for n in names]
    threads = [caller.start() for caller in callers]
    wait_until(lambda: len(queued(committer)) == 6, "every caller queued")
    order = queued(committer)
    release.set()
    join_all([lead_thread, *threads])
    refused = set(order[:3]) if "c1" in order[:3] else set(order[3:])
    assert runner.batches == [["lead"], order[:3], order[3:]]
    for caller in callers:
        name = caller.units[0].name
        if name in refused:
            assert caller.values == [] and len(caller.errors) == 1, name
            assert isinstance(caller.errors[0], CommitRefused)
            assert caller.visible_on_return == [False]
        else:
            assert caller.errors == [] and caller.values == [name]
            assert caller.visible_on_return == [True]
    assert leader.values == ["lead"] and leader.visible_on_return == [True]
    with contextlib.closing(reader(store)) as second:
        assert committed(second) == {"lead", *names} - refused
    # The committer is not left stuck by the failure.
    assert committer.submit(Unit("after")) == "after"


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda units: [], id="too-few-outcomes"),
        pytest.param(lambda units: 1 / 0, id="runner-raises"),
    ],
)
def test_a_broken_batch_runner_fails_its_units_and_hands_on(
    store: SQLiteStore, broken: Callable[[list[Unit]], Any]
) -> None:
    calls: list[int] = []

    def run_batch(units: list[Unit]) -> list[WorkOutcome[Any]]:
        calls.append(len(units))
        if len(calls) == 1:
            result: list[WorkOutcome[Any]] = broken(units)
            return result
        return store.run(units)

    committer: GroupCommit[Unit] = GroupCommit(run_batch)
    outcomes = committer.submit_many([Unit("x"), Unit("y")])
    assert all(o.value is None and o.error is not None for o in outcomes)
    assert isinstance(outcomes[0].error, RuntimeError | ZeroDivisionError)
    assert committer.submit(Unit("z")) == "z"
    with contextlib.closing(reader(store)) as second:
        assert committed(second) == {"z"}


# -- load -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 3, 512])
def test_many_threads_no_deadlock_every_return_after_its_commit(
    store: SQLiteStore, max_batch: int
) -> None:
    runner = BatchRunner(store)
    committer: GroupCommit[Unit] = GroupCommit(runner, max_batch=max_batch)
    chooser = random.Random(max_batch)
    callers = []
    for t in range(12):
        units = [Unit(f"t{t}-{n}", fail=chooser.random() < 0.2) for n in range(15)]
        callers.append(Caller(committer, store, units, together=chooser.random() < 0.3))
    threads = [caller.start() for caller in callers]
    join_all(threads)
    total = sum(len(caller.units) for caller in callers)
    assert committer.committed_units == total and committer.batches == len(runner.batches)
    assert sorted(n for batch in runner.batches for n in batch) == sorted(
        unit.name for caller in callers for unit in caller.units
    )
    assert max(len(batch) for batch in runner.batches) <= max_batch
    expected_rows = set()
    for caller in callers:
        ok = [unit.name for unit in caller.units if not unit.fail]
        assert caller.values == ok
        assert [str(e) for e in caller.errors] == [u.name for u in caller.units if u.fail]
        assert caller.visible_on_return == [not u.fail for u in caller.units]
        expected_rows.update(ok)
    with contextlib.closing(reader(store)) as second:
        assert committed(second) == expected_rows
