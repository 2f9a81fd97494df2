"""What the dedup anchor costs a durable dispatch (docs/benchmarks.md, Deleted rows).

    python benchmarks/dedup_anchor.py                       # this tree
    PYTHONPATH=OTHER/src python benchmarks/dedup_anchor.py  # another tree, to compare

CPU (`time.thread_time`: the statements, the page writes) per lone durable dispatch of the
Door machine on one SQLite file (synchronous=NORMAL, so no fsync wait blurs it; checkpoint
mode): with no event id (no probe, no index entry), with a new event id each time (a miss of
processed_events: the ledger probe, and the entry in ledger_by_event), and with a new
idempotency key each time (the same, and the key's digest). Best of 5 rounds of 2,000
dispatches after 400 to warm up, each kind on a store of its own.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from autonomic.runtime.keys import generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import SQLiteStore
from harness import compile_machine, load_module

# benchmarks/runtime.py's Door (that module's name is the runtime package's too).
DOOR_MACHINE = """\
machine Door perpetual "A door that opens, closes, locks and unlocks." {
  event Open
  event Close
  event Lock
  event Unlock
  initial state Closed { on Open -> Opened  on Lock -> Locked }
  state Opened { on Close -> Closed }
  state Locked { on Unlock -> Closed }
}
"""
CYCLE = ("Open", "Close", "Lock", "Unlock")
KINDS = ("none", "event_id", "idempotency_key")


def cpu_per_dispatch(kind: str, rounds: int, count: int) -> float:
    """Microseconds of this thread's CPU per dispatch, best of `rounds`."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generate_keypair(root / "keys")
        store = SQLiteStore(root / "store.db", synchronous="NORMAL")
        runtime = Runtime(store, sealer=LedgerSealer(load_signer(root / "keys"), "checkpoint"))
        try:
            door = runtime.load(load_module(compile_machine(root, "door", DOOR_MACHINE)).MACHINE)
            door.create("d")
            sent = 0

            def dispatch(n: int) -> None:
                nonlocal sent
                for _ in range(n):
                    event = CYCLE[sent % len(CYCLE)]
                    sent += 1
                    if kind == "event_id":
                        door.dispatch("d", event, event_id=f"e-{sent}")
                    elif kind == "idempotency_key":
                        door.dispatch("d", event, idempotency_key=f"k-{sent}")
                    else:
                        door.dispatch("d", event)

            dispatch(400)
            best = float("inf")
            for _ in range(rounds):
                start = time.thread_time()
                dispatch(count)
                best = min(best, (time.thread_time() - start) / count * 1e6)
            return best
        finally:
            runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    for kind in KINDS:
        print(f"{kind:16} {cpu_per_dispatch(kind, args.rounds, args.count):7.1f} us a dispatch")


if __name__ == "__main__":
    main()
