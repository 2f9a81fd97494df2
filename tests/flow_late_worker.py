"""A process killed by SIGKILL right after a fanout's late reply commits:
`python flow_late_worker.py DB KEYS API` (API: sync or async).

The noisy-neighbour fanout for customer "late": the notification's outside call moves the
virtual clock past the 30 s deadline once the other two replies are committed, then waits
until the gather has ended the run. Its transition then commits after the gather (a late
reply), and the process kills itself as soon as the branch hears it is late, before
anything else runs: what the late reply's commit holds is all there is.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from autonomic.runtime.flows import async_driver, fanin, sync_driver
from autonomic.runtime.keys import load_signer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from flow_world import START_MS, marketplace

CUSTOMER = "late"
NOISY = {
    "customer_id": CUSTOMER,
    "tenant_id": "t",
    "resource": "cpu",
    "severity": "high",
    "violation_id": "v1",
    "window_start": "2026-01-01T00:00:00+00:00",
}
PROFILE = {
    "customer_id": CUSTOMER,
    "email": "ops@late.example",
    "country": "DE",
    "product_id": "analytics",
    "tier": "starter",
}


class _DiesWhenLate(fanin._FanIn):
    """A reply after the gather: the process dies the moment its branch learns it is late."""

    def put(self, index: int, outcome: tuple[str, Any]) -> bool:
        if super().put(index, outcome):
            return True
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("not reached")


def main() -> None:
    db, keys, api = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    clock = VirtualClock(START_MS)
    gathered = threading.Event()
    holder: list[Runtime] = []

    def notify(ctx: Any) -> None:
        governors = holder[0].governors
        for _ in range(2000):  # until the other two branches' transitions are committed
            billing = governors["Billing"].get(CUSTOMER)
            entitlement = governors["Entitlement"].get(CUSTOMER)
            if billing and entitlement and billing.version > 1 and entitlement.version > 1:
                break
            threading.Event().wait(0.005)
        clock.advance("31s")
        gathered.wait(30)

    runtime, runner, _ = marketplace(
        SQLiteStore(db),
        clock=clock,
        signer=load_signer(keys),
        actions={"CustomerAccount": {"send_notification": notify}},
    )
    holder.append(runtime)
    for driver in (sync_driver, async_driver):  # their gathers collect replies in these
        vars(driver)["_FanIn"] = _DiesWhenLate
    for machine in ("Billing", "Entitlement", "CustomerAccount"):
        runtime.governor(machine).create(CUSTOMER)
    runtime.governor("Entitlement").dispatch(CUSTOMER, "Approve", {"approver": "vendor-admin"})
    runtime.governor("CustomerAccount").dispatch(CUSTOMER, "CreateProfile", PROFILE)

    async def run_async() -> None:
        result = await runner.start_async("NoisyNeighbour", CUSTOMER, NOISY)
        print(result.flow_id, result.status, flush=True)
        gathered.set()
        await runner.drain_async()

    if api == "sync":
        result = runner.start("NoisyNeighbour", CUSTOMER, NOISY)
        print(result.flow_id, result.status, flush=True)
        gathered.set()
        runner.drain()
    else:
        asyncio.run(run_async())
    raise SystemExit("the late reply never came")


if __name__ == "__main__":
    main()
