"""Fleet benchmark: dispatches/s and timer firings/s against the number of worker processes, on
PostgreSQL with 1 and 8 ledger partitions and on SQLite beside them.

Run: `python benchmarks/fleet.py --postgres URL [--quick] [--json]` (URL: a database the
benchmark may create schemas in; `--postgres start` starts a throwaway cluster as the tests do).
Every configuration runs the same workload at the defaults a user gets (checkpoint mode, a
signed checkpoint per commit batch, synchronous commits: fsync on both databases):

- dispatch: P processes, each with 8 threads dispatching `Tick` to instances of its own (64
  per process) for a fixed time; throughput is committed dispatches per second of wall time.
- timers: 2 timers armed on each of N instances, all due; P processes fire them (on
  PostgreSQL with leased claims, as `autonomic worker` does; on SQLite each process lists the
  due timers and fires them, the DELETE of the timer row deciding who fires); throughput is
  firings per second from start to the last firing.

Ratios are against SQLite with one process in the same run (the embedded default: the figure
the fleet must beat). The machine is shared and noisy; the figures are medians of --rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autonomic.runtime.keys import generate_keypair, load_signer, now_ms
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.locate import open_store
from autonomic.runtime.timers import VirtualClock
from harness import compile_machine, load_module

LEASE_MACHINE = """\
machine Lease perpetual "A lease that ticks, and is held with a reminder and a timeout." {
  event Tick
  event Hold
  initial state Running {
    on Tick -> Running
    on Hold -> Holding
  }
  state Holding {
    on Tick -> Holding
    escalate HoldLadder {
      after 10m notify queue operators within 5m "held for 10 minutes"
      after 30m -> Running
    }
  }
}
"""
THREADS = 8
INSTANCES_PER_PROCESS = 64
HOUR = 3_600_000


def compile_lease(folder: Path) -> Path:
    return compile_machine(folder, "lease", LEASE_MACHINE)


# ---------------------------------------------------------------------------------------------
# One worker process of a configuration.


def _runtime(location: str, keys: str, module_path: str, clock: VirtualClock | None) -> Runtime:
    spec = load_module(Path(module_path)).MACHINE
    runtime = Runtime(
        open_store(location), clock=clock, sealer=LedgerSealer(load_signer(keys), "checkpoint")
    )
    runtime.load(spec)
    return runtime


def dispatch_process(
    location: str, keys: str, module_path: str, number: int, seconds: float, start: Any, out: Any
) -> None:
    runtime = _runtime(location, keys, module_path, None)
    lease = runtime.governor("Lease")
    names = [f"p{number}-{i}" for i in range(INSTANCES_PER_PROCESS)]
    for name in names:
        lease.create(name)
    counts = [0] * THREADS
    stop = threading.Event()

    def drive(thread: int) -> None:
        mine = names[thread::THREADS]
        index = 0
        while not stop.is_set():
            lease.dispatch(mine[index % len(mine)], "Tick")
            counts[thread] += 1
            index += 1

    start.wait()
    threads = [threading.Thread(target=drive, args=(t,)) for t in range(THREADS)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    runtime.close()
    out.put((sum(counts), elapsed))


def timer_process(location: str, keys: str, module_path: str, start: Any, out: Any) -> None:
    runtime = _runtime(location, keys, module_path, None)
    start.wait()
    fired = 0
    while True:
        done = len(runtime.fire_due(limit=200))
        fired += done
        if not done:
            break
    finished = time.perf_counter()
    runtime.close()
    out.put((fired, finished))


# ---------------------------------------------------------------------------------------------
# Configurations.


class Config:
    def __init__(self, name: str, kind: str, partitions: int) -> None:
        self.name, self.kind, self.partitions = name, kind, partitions

    def new_location(self, folder: Path, server: str | None) -> str:
        if self.kind == "sqlite":
            # Created before the processes start, as `db migrate` creates a PostgreSQL store.
            path = str(folder / f"s-{secrets.token_hex(4)}.db")
            open_store(path).close()
            return path
        import psycopg
        from autonomic.runtime.store.postgres import migrate

        assert server is not None
        schema = f"bench_{secrets.token_hex(4)}"
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}".encode())
        separator = "&" if "?" in server else "?"
        location = f"{server}{separator}options=-csearch_path%3D{schema}"
        migrate(location, partitions=self.partitions)
        return location


def run_processes(
    target: Callable[..., None], count: int, arguments: Callable[[int], tuple[Any, ...]]
) -> tuple[list[Any], float]:
    context = multiprocessing.get_context("fork")
    start, out = context.Event(), context.Queue()
    processes = [
        context.Process(target=target, args=(*arguments(n), start, out)) for n in range(count)
    ]
    for process in processes:
        process.start()
    time.sleep(0.5)  # every process has opened its store and loaded the machine
    began = time.perf_counter()
    start.set()
    results = [out.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode:
            raise SystemExit(f"a benchmark process failed ({process.exitcode})")
    return results, began


def measure_dispatch(
    config: Config,
    folder: Path,
    server: str | None,
    keys: str,
    module: str,
    count: int,
    seconds: float,
) -> float:
    location = config.new_location(folder, server)
    results, _ = run_processes(
        dispatch_process, count, lambda n: (location, keys, module, n, seconds)
    )
    done = sum(int(count) for count, _ in results)
    return done / max(float(elapsed) for _, elapsed in results)


def measure_timers(
    config: Config,
    folder: Path,
    server: str | None,
    keys: str,
    module: str,
    count: int,
    instances: int,
) -> float:
    location = config.new_location(folder, server)
    clock = VirtualClock(now_ms() - 2 * HOUR)  # every timer armed below is already due
    runtime = _runtime(location, keys, module, clock)
    lease = runtime.governor("Lease")
    for n in range(instances):
        lease.create(f"l{n}")
        lease.dispatch(f"l{n}", "Hold")
    runtime.close()
    results, began = run_processes(timer_process, count, lambda n: (location, keys, module))
    fired = sum(int(done) for done, _ in results)
    if fired != 2 * instances:
        raise SystemExit(f"{fired} firings for {2 * instances} timers: not exactly once")
    return fired / (max(float(finished) for _, finished in results) - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", required=True, metavar="URL", help="server URL or 'start'")
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer timers")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure (median)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8], metavar="P")
    args = parser.parse_args(argv)
    seconds = 2.0 if args.quick else 4.0
    instances = 300 if args.quick else 1000
    rounds = args.rounds or (1 if args.quick else 3)
    configs = [
        Config("SQLite", "sqlite", 1),
        Config("PostgreSQL, 1 partition", "postgres", 1),
        Config("PostgreSQL, 8 partitions", "postgres", 8),
    ]
    cluster: Path | None = None
    server = args.postgres
    with tempfile.TemporaryDirectory(prefix="autonomic-fleet-") as temp:
        folder = Path(temp)
        if server == "start":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            import pg_cluster  # type: ignore[import-not-found]

            cluster = Path(tempfile.mkdtemp(prefix="autonomic-pg-"))
            server = pg_cluster.start(cluster)
        try:
            keys = folder / "keys"
            generate_keypair(keys, valid_from_ms=now_ms() - 3 * HOUR)
            module = str(compile_lease(folder))
            figures: dict[str, dict[str, dict[int, float]]] = {}
            for workload in ("dispatch", "timers"):
                for config in configs:
                    row = figures.setdefault(workload, {}).setdefault(config.name, {})
                    for count in args.processes:
                        samples = [
                            measure_dispatch(
                                config, folder, server, str(keys), module, count, seconds
                            )
                            if workload == "dispatch"
                            else measure_timers(
                                config, folder, server, str(keys), module, count, instances
                            )
                            for _ in range(rounds)
                        ]
                        row[count] = statistics.median(samples)
                        print(
                            f"  {workload:<8} {config.name:<26} {count} processes: "
                            f"{row[count]:8.0f}/s",
                            file=sys.stderr,
                        )
        finally:
            if cluster is not None:
                import pg_cluster

                pg_cluster.stop(cluster)
    report(figures, args.processes)
    if args.json:
        print(json.dumps(figures))
    return 0


def report(figures: dict[str, dict[str, dict[int, float]]], processes: list[int]) -> None:
    print(
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for workload, unit in (("dispatch", "dispatches/s"), ("timers", "timer firings/s")):
        rows = figures[workload]
        base = rows["SQLite"][processes[0]]
        print(f"\n{unit} (ratio to SQLite, {processes[0]} process)")
        print("| store | " + " | ".join(f"{p} proc" for p in processes) + " |")
        print("|---|" + "---:|" * len(processes))
        for name, row in rows.items():
            cells = [f"{row[p]:.0f} ({row[p] / base:.2f}x)" for p in processes]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
