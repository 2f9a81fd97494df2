"""CPU-bound verification spread over forked processes (ledger partitions, ledger ranges)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

__all__ = ["available_cpus", "map_in_processes"]

T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def map_in_processes(
    function: Callable[[T], R],
    tasks: Sequence[T],
    processes: int,
    meanwhile: Callable[[], object] | None = None,
) -> list[R]:
    """`function(task)` for every task, in up to `processes` processes; results in task order.
    `meanwhile` runs in this process while they work (after them when there is one process).

    Verification is CPU-bound (hashing, Ed25519) and holds the GIL, so it needs processes, not
    threads. They are forked: a worker starts in milliseconds with every module already
    imported. A child never uses its parent's open database connections or pools (each task
    opens its own): it inherits them unused and leaves with os._exit, closing none of them.
    """
    processes = min(processes, len(tasks))
    if processes <= 1:
        results = [function(task) for task in tasks]
        if meanwhile is not None:
            meanwhile()
        return results
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        # With the fork context every worker is forked at the first submit, before the pool
        # starts a thread of its own and before `meanwhile` runs.
        futures = [pool.submit(function, task) for task in tasks]
        if meanwhile is not None:
            meanwhile()
        return [future.result() for future in futures]
