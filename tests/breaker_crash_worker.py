"""A process that dies at a commit point: `python breaker_crash_worker.py DB KEYS N`.

It charges customers c0..c{N-1} on Billing, whose primary processor is unavailable: each
charge is made by the backup and counts one failure on the PaymentProcessor breaker (the
11th in a row opens it). Right after the commit that holds the N-th charge it kills itself
with SIGKILL, before it writes anything else.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from autonomic.runtime.resilience import Unavailable
from autonomic.runtime.store.base import Transaction, WorkOutcome
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from billing_world import START, Processor, charge, open_billing


def main(db: str, keys: str, charges: int) -> None:
    store = SQLiteStore(db)
    primary = Processor()
    primary.failing = Unavailable
    runtime = open_billing(store, Path(keys), VirtualClock(START), primary)
    for n in range(charges - 1):
        charge(runtime, f"c{n}")
    last = f"c{charges - 1}"
    runtime.governor("Billing").create(last)
    commit = store.run

    def die_after_commit(
        works: Sequence[Callable[[Transaction], object]],
        before_commit: Callable[[Transaction], None] | None = None,
    ) -> list[WorkOutcome[object]]:
        outcomes = commit(works, before_commit)
        os.kill(os.getpid(), signal.SIGKILL)
        return outcomes

    store.run = die_after_commit  # type: ignore[method-assign,assignment]
    charge(runtime, last)
    raise SystemExit("still alive after the charge's commit")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
