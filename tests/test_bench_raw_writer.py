"""The flows benchmark's raw baseline (benchmarks/flows.py) writes what the saga wrote: a
trace that missed a statement method of the store's transaction would make the raw writer
replay part of the saga, and every per-step ratio against it meaningless."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import flows  # noqa: E402


def test_the_raw_writer_adds_the_rows_a_traced_saga_added(tmp_path: Path) -> None:
    market = flows.prepared(tmp_path / "store.db", ["c0", "c1", "c2"])
    try:
        market.runner.start("SubscriptionCancellation", "c2", flows.cancel_inputs("c2"))
        connection = market.runtime.store._connection  # type: ignore[attr-defined]
        before = flows.table_rows(connection)
        commits = flows.saga_writes(market, "c1")
        ours = {t: n - before[t] for t, n in flows.table_rows(connection).items()}
    finally:
        market.close()
    raw = flows.RawSagas(tmp_path / "store.db", tmp_path / "raw.db", commits, "c1")
    try:
        raw.prepare(["c0"])
        before = flows.table_rows(raw.connection)
        raw.write(1)
        theirs = {t: n - before[t] for t, n in flows.table_rows(raw.connection).items()}
    finally:
        raw.close()
    assert len(commits) == 3
    assert ours["ledger"] >= 10 and ours["flows"] == 1 and ours["outbox"] == 4
    assert theirs == ours
