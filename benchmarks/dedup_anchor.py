"""What the ledger-anchored dedup check costs a durable dispatch, as a ratio in one run.

    python benchmarks/dedup_anchor.py                 # 9 rounds of 500, about a minute
    python benchmarks/dedup_anchor.py --quick         # 3 rounds of 200
    python benchmarks/dedup_anchor.py --synchronous NORMAL   # no fsync in the commit

The subject is a lone durable dispatch of the Door machine at the defaults a user gets: a
SQLiteStore (WAL, synchronous=FULL) and a checkpoint-mode ledger (LedgerSealer's default),
whose dedup check, when an event id or idempotency key is not found, probes the ledger
(LedgerAnchor.missing, through the partial index `ledger_by_event`) and whose every ledger
row with an event id has an entry in that index. The baseline is the same dispatch on a
store of the same code without the anchor: its probe switched off (a LedgerAnchor whose
`missing` finds nothing, as before the anchor existed) and its index dropped, so it neither
probes nor maintains the index. Three kinds of dispatch: no event id (neither store probes),
a new event id each time, a new idempotency key each time; each kind and side on a store of
its own. The figure is CPU per dispatch (`time.thread_time`: the statements, the page
writes, not the wait for the disk), best of the rounds; the ratio is the median of the
rounds' ratios, each of a round of the two sides measured one right after the other (in
turn first), so that load on the machine falls on both alike.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autonomic.runtime.dispatch import Governor
from autonomic.runtime.keys import generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import SQLiteStore
from autonomic.runtime.store.row_seals import LedgerAnchor
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
KINDS = ("no event id", "new event id", "new idempotency key")
# LedgerAnchor.missing's statement, as the trace callback shows it (its values bound).
PROBE = re.compile(r"FROM ledger WHERE machine = '[^']*' AND event_id = '[^']*' AND event_id <> ''")


class _Unanchored(LedgerAnchor):
    """The baseline's anchor: a missing dedup row is taken as never written, unchecked."""

    __slots__ = ()

    def missing(self, execute: Callable[..., Any], machine: str, event_id: str) -> int | None:
        return None


class _Side:
    """One store and runtime dispatching one kind, with or without the anchor."""

    def __init__(self, root: Path, kind: str, anchored: bool, synchronous: str) -> None:
        folder = root / f"{KINDS.index(kind)}-{anchored}"
        folder.mkdir()
        generate_keypair(folder / "keys")
        self.store = SQLiteStore(folder / "store.db", synchronous=synchronous)  # type: ignore[arg-type]
        self.runtime = Runtime(self.store, sealer=LedgerSealer(load_signer(folder / "keys")))
        module = load_module(compile_machine(folder, "door", DOOR_MACHINE))
        self.door: Governor = self.runtime.load(module.MACHINE)
        self.door.create("d")
        connection: sqlite3.Connection = self.store._connection
        if not anchored:
            self.store._txn._anchor.__class__ = _Unanchored
            connection.execute("DROP INDEX ledger_by_event")
        self.kind, self.sent, self.probes = kind, 0, 0
        connection.set_trace_callback(self._trace)
        self.dispatch(1)
        connection.set_trace_callback(None)

    def _trace(self, statement: str) -> None:
        self.probes += PROBE.search(statement) is not None

    def dispatch(self, count: int) -> None:
        door, kind = self.door, self.kind
        for _ in range(count):
            event = CYCLE[self.sent % len(CYCLE)]
            self.sent += 1
            if kind == "new event id":
                door.dispatch("d", event, event_id=f"e-{self.sent}")
            elif kind == "new idempotency key":
                door.dispatch("d", event, idempotency_key=f"k-{self.sent}")
            else:
                door.dispatch("d", event)

    def cpu_us(self, count: int) -> float:
        start = time.thread_time()
        self.dispatch(count)
        return (time.thread_time() - start) / count * 1e6

    def close(self) -> None:
        self.runtime.close()


def measure(
    kind: str, rounds: int, count: int, synchronous: str
) -> tuple[float, float, list[float]]:
    """Best CPU per dispatch (us) without and with the anchor, and each round's ratio
    (anchored over without, the two measured one right after the other, in turn first)."""
    with tempfile.TemporaryDirectory() as folder:
        sides = [_Side(Path(folder), kind, anchored, synchronous) for anchored in (False, True)]
        try:
            probed = [side.probes for side in sides]
            if probed[0] or (kind != "no event id") != bool(probed[1]):
                raise SystemExit(f"{kind}: ledger probes {probed}, not what the sides should do")
            for side in sides:
                side.dispatch(count // 4)  # warm up: caches, the WAL file's first pages
            best = [float("inf"), float("inf")]
            ratios: list[float] = []
            for number in range(rounds):
                figures = [0.0, 0.0]
                for index in (0, 1) if number % 2 == 0 else (1, 0):
                    figures[index] = sides[index].cpu_us(count)
                    best[index] = min(best[index], figures[index])
                ratios.append(figures[1] / figures[0])
            return best[0], best[1], sorted(ratios)
        finally:
            for side in sides:
                side.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 200")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--count", type=int, default=None, help="dispatches per round")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    count = args.count or (200 if args.quick else 500)
    print(
        f"CPU per lone durable dispatch, SQLite synchronous={args.synchronous}, checkpoint "
        f"mode, best of {rounds} rounds of {count}"
    )
    print(f"{'dispatch':<22}{'no anchor':>12}{'anchored':>12}{'ratio':>8}  rounds' ratios")
    for kind in KINDS:
        without, anchored, ratios = measure(kind, rounds, count, args.synchronous)
        print(
            f"{kind:<22}{without:>9.1f} us{anchored:>9.1f} us{statistics.median(ratios):>7.2f}x"
            f"  {ratios[0]:.2f}x-{ratios[-1]:.2f}x"
        )


if __name__ == "__main__":
    main()
