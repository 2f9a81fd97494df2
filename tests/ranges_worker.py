"""The ledger range verifier in a process of its own:
`python ranges_worker.py LEDGER KEY [all]`.

verify_ledger forks range workers only while its process runs no other thread, and a test
process may run some (a pytest-xdist worker does); this one runs none. It verifies the SQLite
ledger LEDGER from the root public key file KEY at the defaults a user gets and writes to
stdout, pickled, what the tests check: the threads it ran, its pid, and verify_ledger's report
with the CPU time its child processes spent. With `all` also verify_in_ranges' report, and
verify_ledger's again with a `meanwhile`: its report, its children's CPU time, and the entry
count and the pids of the live child processes `meanwhile` was given and saw.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import resource
import sys
import threading
from typing import Any

from autonomic.runtime.keys import load_public_key
from autonomic.runtime.ledger_io import read_ledger
from autonomic.runtime.ledger_ranges import verify_in_ranges, verify_ledger


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(path: str, key_file: str, *options: str) -> dict[str, Any]:
    root = load_public_key(key_file)
    threads = threading.active_count()
    before = children_cpu()
    plain = verify_ledger(path, root)
    result = {"threads": threads, "pid": os.getpid(), "plain": (plain, children_cpu() - before)}
    if "all" not in options:
        return result
    with read_ledger(path) as source:
        result["ranged"] = verify_in_ranges(source, root)
    seen: list[tuple[int, list[int]]] = []

    def meanwhile(count: int) -> None:
        children = [child.pid for child in multiprocessing.active_children()]
        seen.append((count, sorted(pid for pid in children if pid is not None)))

    before = children_cpu()
    during = verify_ledger(path, root, meanwhile=meanwhile)
    result["meanwhile"] = (during, children_cpu() - before, seen)
    return result


if __name__ == "__main__":
    sys.stdout.buffer.write(pickle.dumps(main(*sys.argv[1:])))
