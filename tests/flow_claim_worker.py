"""One flow driver process for the lost-claim flow tests:
`python flow_claim_worker.py STORE KEYS LEASE_MS`.

It drives customer c1's SubscriptionUpgrade run (tests/test_flows.py's inputs) on STORE (an
SQLite path or a PostgreSQL URL) with a claim lease of LEASE_MS; c1 must be an active
customer there. It tells its parent on stdout, one line each: "ready" once loaded (it then
waits for a line on stdin before it starts the run), "waiting" when it finds a claim of the
run's held by another driver, "calling" when its processor gets the proration charge (it
then waits for a line on stdin: the processor's answer), "charged" when that call returns,
and at the end "result STATUS STEP_STATUS" (the run's status and its charge step's) or
"error CODE" when the run fails with a runtime failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from autonomic.runtime.demo import _Payments
from autonomic.runtime.errors import RuntimeFailure
from autonomic.runtime.keys import load_signer
from autonomic.runtime.store.locate import open_store
from autonomic.runtime.timers import VirtualClock
from billing_world import START
from claim_worker import say, tell_waiting
from flow_world import marketplace
from test_flows import upgrade_inputs


def main(location: str, keys: str, lease_ms: int) -> None:
    submit = _Payments.submit_charge

    def held_submit(self: _Payments, ctx: Any) -> dict[str, str]:
        say("calling")
        sys.stdin.readline()
        answer = submit(self, ctx)
        say("charged")
        return answer

    _Payments.submit_charge = held_submit  # type: ignore[method-assign]
    store = open_store(location)
    tell_waiting(store)
    runtime, runner, _ = marketplace(
        store, signer=load_signer(Path(keys)), clock=VirtualClock(START), claim_lease_ms=lease_ms
    )
    say("ready")
    sys.stdin.readline()
    try:
        result = runner.start("SubscriptionUpgrade", "c1", upgrade_inputs("c1"))
    except RuntimeFailure as failure:
        say(f"error {failure.code}")
    else:
        say(f"result {result.status} {result.steps.get('charge_proration')}")
    runtime.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
