"""A process that dies at a commit point: `python breaker_crash_worker.py STORE KEYS N [PREFIX]`.

It charges customers {PREFIX}0..{PREFIX}{N-1} (PREFIX: c) on Billing in STORE (an SQLite path
or a PostgreSQL URL), whose primary processor is unavailable: each charge is made by the
backup and counts one failure on the PaymentProcessor breaker (the 11th in a row opens it).
Right after the commit that holds the N-th charge it kills itself with SIGKILL, before it
writes anything else.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from autonomic.runtime.resilience import Unavailable
from autonomic.runtime.store.base import Transaction, WorkOutcome
from autonomic.runtime.store.locate import open_store
from autonomic.runtime.timers import VirtualClock
from billing_world import START, Processor, charge, open_billing


def main(location: str, keys: str, charges: int, prefix: str = "c") -> None:
    store = open_store(location)
    primary = Processor()
    primary.failing = Unavailable
    runtime = open_billing(store, Path(keys), VirtualClock(START), primary)
    for n in range(charges - 1):
        charge(runtime, f"{prefix}{n}")
    last = f"{prefix}{charges - 1}"
    runtime.governor("Billing").create(last)
    commit = store.run

    def die_after_commit(
        works: Sequence[Callable[[Transaction], object]],
        before_commit: Callable[[Transaction], None] | None = None,
        **partition: Any,
    ) -> list[WorkOutcome[object]]:
        outcomes = commit(works, before_commit, **partition)
        charged = store.get_instance("Billing", last)
        if charged is not None and charged.state == "AwaitingPayment":
            os.kill(os.getpid(), signal.SIGKILL)
        return outcomes

    store.run = die_after_commit  # type: ignore[method-assign,assignment]
    charge(runtime, last)
    raise SystemExit("still alive after the charge's commit")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
