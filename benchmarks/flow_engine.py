"""What the flow engine adds above the store: CPU per sequential cancellation saga against the
same three sends as plain dispatches, and the SQL statements a saga runs, by kind.

Run: `python benchmarks/flow_engine.py [--quick]`.

Both sides run in one process on one SQLite file with synchronous=NORMAL (no fsync, so only
CPU is measured: `time.process_time`, the garbage collector off), at the library's defaults
otherwise (checkpoint-mode signed ledger, row seals), the seven governors and the five flows
of `benchmarks/flows.py`. Rounds of each side alternate, so a neighbour's load spoils a round,
not the figure; the medians and ranges of the rounds are printed. The statements are those of
one saga after the others (sqlite3's trace of the store's connection), grouped by their first
words.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flows import Marketplace, cancel_inputs, direct_cancel

SAGA = "SubscriptionCancellation"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds of 30 sagas a side")
    args = parser.parse_args(argv)
    rounds, per_round = (4, 30) if args.quick else (8, 60)
    with tempfile.TemporaryDirectory() as folder:
        market = Marketplace(Path(folder) / "engine.db", synchronous="NORMAL")
        customers = 2 * rounds * per_round + 2
        for i in range(customers):
            market.active(f"c{i}")
        flow_ms: list[float] = []
        direct_ms: list[float] = []
        runner = market.runner
        first = 0
        gc.collect()
        gc.disable()
        try:
            for number in range(rounds):
                for flow in (True, False) if number % 2 else (False, True):
                    start = time.process_time()
                    for i in range(first, first + per_round):
                        if flow:
                            runner.start(
                                "SubscriptionCancellation", f"c{i}", cancel_inputs(f"c{i}")
                            )
                        else:
                            direct_cancel(market, f"c{i}")
                    spent = (time.process_time() - start) / per_round * 1000
                    (flow_ms if flow else direct_ms).append(spent)
                    first += per_round
        finally:
            gc.enable()
        statements: list[str] = []
        connection = market.runtime.store._connection  # type: ignore[attr-defined]
        connection.set_trace_callback(statements.append)
        last = f"c{customers - 1}"
        runner.start(SAGA, last, cancel_inputs(last))
        connection.set_trace_callback(None)
        market.close()
    for label, values in (("flow saga", flow_ms), ("the same 3 dispatches", direct_ms)):
        print(
            f"CPU per sequential saga, {label:22} {statistics.median(values):.3f} ms "
            f"(rounds {min(values):.3f}-{max(values):.3f})"
        )
    print(f"what the flow adds: {statistics.median(flow_ms) - statistics.median(direct_ms):.3f} ms")
    kinds = collections.Counter(" ".join(s.split()[:3]).rstrip(",") for s in statements)
    print(f"SQL statements of one saga on the store's connection: {len(statements)}")
    for kind, count in sorted(kinds.items()):
        print(f"  {count:3}  {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
