"""The timed loop of benchmarks/saga_instructions.sh: N cancellation sagas (sequential,
asyncio, or the raw writer's) after their setup, with callgrind's instrumentation switched on
around the loop only. usage: saga_instructions.py REPO MODE WHAT N (WHAT: flow | async | raw)"""

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

repo, mode, what, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, f"{repo}/benchmarks")
import flows  # noqa: E402


def toggle(on: bool) -> None:
    if os.environ.get("IC_UNDER_VALGRIND"):
        subprocess.run(
            ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
            check=True,
            stdout=subprocess.DEVNULL,
        )


with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    m = flows.prepared(folder / "p.db", [f"c{i}" for i in range(n + 2)], mode=mode)
    m.runner.start("SubscriptionCancellation", f"c{n + 1}", flows.cancel_inputs(f"c{n + 1}"))
    if what == "raw":
        commits = flows.saga_writes(m, f"c{n}")
        raw = flows.RawSagas(folder / "p.db", folder / "raw.db", commits, f"c{n}")
        raw.prepare([f"c{i}" for i in range(n)])
        toggle(True)
        raw.write(n)
        toggle(False)
    elif what == "async":

        async def main() -> None:
            async with asyncio.TaskGroup() as g:
                for i in range(n):
                    g.create_task(
                        m.runner.start_async(
                            "SubscriptionCancellation", f"c{i}", flows.cancel_inputs(f"c{i}")
                        )
                    )

        toggle(True)
        asyncio.run(main())
        toggle(False)
    else:
        toggle(True)
        for i in range(n):
            m.runner.start("SubscriptionCancellation", f"c{i}", flows.cancel_inputs(f"c{i}"))
        toggle(False)
    m.close()
