"""What the runtime's checks of the store cost on the dispatch path (docs/benchmarks.md, kept).

    python benchmarks/distrust.py

1. The moved-head check (`_Chain._check_checkpoint`, runtime/sealing.py): two runtimes on one
   SQLite file take turns, so every dispatch finds a head the other wrote and checks it (the
   newest checkpoint's signature and the uncovered tail; in sign-each mode the head's
   signature). Each check is timed; a lone runtime never runs it (its heads are its own).
2. The routing check's walk (`KeptLedger._nothing_kept_since`, runtime/instance_data.py):
   `DisputeDecided` routed by the kept customer id, in alternating rounds of 200 with the walk
   and with it switched off, on SQLite (the memory store runs no walk).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from autonomic.runtime import sealing
from autonomic.runtime.instance_data import KeptLedger
from autonomic.runtime.keys import Signer
from autonomic.runtime.ledger import LedgerMode, LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import marketplace
from runtime_machines import Bindings, counter_spec
from test_emit_routing import disputed

EVIDENCE = {"evidence_ref": "ev-1", "submitted_at": "2026-01-02T00:00:00+00:00"}
ROUNDS, PER_ROUND, TURNS = 12, 200, 400


def moved_heads(mode: LedgerMode) -> str:
    spent: list[float] = []
    check = sealing._Chain._check_checkpoint

    def timed(chain: sealing._Chain, txn: Any, head: Any) -> None:
        start = time.perf_counter()
        check(chain, txn, head)
        spent.append(time.perf_counter() - start)

    sealing._Chain._check_checkpoint = timed  # type: ignore[method-assign]
    try:
        path = Path(tempfile.mkdtemp()) / "s.db"
        signer = Signer.from_private_key(Ed25519PrivateKey.generate())
        runtimes = [Runtime(SQLiteStore(path), sealer=LedgerSealer(signer, mode)) for _ in "ab"]
        spec = counter_spec()
        counters = [runtime.load(spec, *Bindings().for_spec(spec)) for runtime in runtimes]
        start = time.perf_counter()
        for n in range(TURNS):
            counters[n % 2].create(f"c{n}")
        per_dispatch = (time.perf_counter() - start) / TURNS
        for runtime in runtimes:
            runtime.close()
    finally:
        sealing._Chain._check_checkpoint = check  # type: ignore[method-assign]
    return (
        f"| moved-head check, {mode} | {statistics.median(spent) * 1e6:.1f} us | "
        f"{len(spent)} checks; {per_dispatch * 1e6:.0f} us per dispatch, two writers |"
    )


def routed() -> str:
    walk = KeptLedger._nothing_kept_since

    def off(*arguments: object) -> None:
        return None

    runtime, _, _ = marketplace(SQLiteStore(Path(tempfile.mkdtemp()) / "b.db"))
    compliance = runtime.governor("Compliance")
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for number in range(ROUNDS):
            walking = number % 2 == 0
            KeptLedger._nothing_kept_since = walk if walking else off  # type: ignore[method-assign]
            cases = [f"case-{number}-{index}" for index in range(PER_ROUND)]
            for index, case in enumerate(cases):
                disputed(runtime, f"cust-{number}-{index}", case)
                compliance.dispatch(case, "EvidenceSubmitted", EVIDENCE)
            start = time.perf_counter()
            for case in cases:
                compliance.dispatch(case, "DisputeDecided", {"outcome": "customer"})
            times[walking].append((time.perf_counter() - start) / PER_ROUND)
    finally:
        KeptLedger._nothing_kept_since = walk  # type: ignore[method-assign]
        runtime.close()
    with_walk, without = (statistics.median(times[key]) * 1e6 for key in (True, False))
    return (
        f"| routed dispatch, SQLite | {with_walk:.1f} us | without the walk {without:.1f} us "
        f"(medians of {ROUNDS // 2} alternating rounds of {PER_ROUND}) |"
    )


def main() -> None:
    print("| what | median | measured |\n|---|---:|---|")
    for line in (moved_heads("checkpoint"), moved_heads("sign-each"), routed()):
        print(line, flush=True)


if __name__ == "__main__":
    main()
