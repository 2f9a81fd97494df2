"""One dispatcher process for the outside-call claim tests:
`python claim_worker.py STORE KEYS LEASE_MS [fire]`.

It charges Billing instance c1 with event id charge-c1 on STORE (an SQLite path or a
PostgreSQL URL), with a claim lease of LEASE_MS. It tells its parent on stdout, one line
each: "ready" once loaded (it then waits for a line on stdin before it sends), "waiting"
when it finds the event id claimed by another dispatcher, "calling" when its processor is
called (it then waits for a line on stdin: the processor's answer), "charged" when that
call returns, and at the end "result VERSION SEQ", or "error CODE" and the diagnostic's hint
when the dispatch fails with a runtime failure.

With `fire` it charges nothing: it fires the timers due an hour after billing_world.START
(c1's retry ladder step, whose `retry_charge` is the processor) and ends with "result fired
N" (N firings) or the error and its hint; with `fire-until` it fires again every 20 ms until
one fires (a timer claimed or leased by another process is left to it meanwhile). On
PostgreSQL LEASE_MS is also its worker lease on due timers. With CLAIM_WORKER_KEYS set to a
file, the processor appends each call's `ctx.event_id` and `ctx.idempotency_key` to it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from autonomic.generated.billing import MACHINE as BILLING
from autonomic.runtime.errors import RuntimeFailure
from autonomic.runtime.keys import load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import ClaimKey, Store
from autonomic.runtime.store.locate import open_store
from autonomic.runtime.timers import VirtualClock
from billing_world import START, noop, yes


def say(line: str) -> None:
    print(line, flush=True)


def tell_waiting(store: Store) -> None:
    """Say "waiting" the first time `store` finds a claim held by another holder."""
    claim = store.claim_outside
    told: list[bool] = []

    def observed(keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        taken = claim(keys, holder, lease_ms)
        if not taken and not told:
            told.append(True)
            say("waiting")
        return taken

    store.claim_outside = observed  # type: ignore[method-assign]


def processor(ctx: Any) -> dict[str, str]:
    sent = os.environ.get("CLAIM_WORKER_KEYS")
    if sent:  # the key the call sends, as a processor that deduplicates sees it
        with open(sent, "a", encoding="utf-8") as keys:
            keys.write(f"{ctx.event_id} {ctx.idempotency_key}\n")
    say("calling")
    sys.stdin.readline()
    say("charged")
    return {"captured": ctx.instance}


def main(location: str, keys: str, lease_ms: int, mode: str = "charge") -> None:
    store = open_store(location, lease_ms=None if mode == "charge" else lease_ms)
    tell_waiting(store)
    runtime = Runtime(
        store,
        clock=VirtualClock(START),
        sealer=LedgerSealer(load_signer(Path(keys)), "sign-each"),
        claim_lease_ms=lease_ms,
    )
    actions: dict[str, Any] = {name: noop for name in BILLING.actions}
    actions["submit_charge"] = actions["retry_charge"] = processor
    runtime.load(BILLING, {name: yes for name in BILLING.guards}, actions)
    say("ready")
    sys.stdin.readline()
    if mode != "charge":
        fire(runtime, until=mode == "fire-until")
        return
    payload = {"customer_id": "c1", "invoice_id": "i1", "amount": "99.00", "idempotency_key": "k1"}
    try:
        result = runtime.governor("Billing").dispatch(
            "c1", "ChargeRequested", payload, event_id="charge-c1"
        )
    except RuntimeFailure as failure:
        say(f"error {failure.code}")
        say(f"hint {failure.hint}")
    else:
        say(f"result {result.version} {result.seq}")
    runtime.close()


def fire(runtime: Runtime, *, until: bool) -> None:
    """Fire what is due an hour after START (`until`: until something fires, at most 60 s)."""
    fired: list[object] = []
    try:
        for _ in range(3000 if until else 1):
            fired = list(runtime.fire_due(START + 3_600_000))
            if fired:
                break
            time.sleep(0.02)
    except RuntimeFailure as failure:
        say(f"error {failure.code}")
        say(f"hint {failure.hint}")
    else:
        say(f"result fired {len(fired)}")
    runtime.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
