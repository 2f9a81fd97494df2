"""What the benchmarks share: timing with the garbage collector off, and a machine compiled by
`autonomic build` into a folder and imported from there, as a user's project would."""

from __future__ import annotations

import gc
import importlib.util
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from autonomic.compiler.build import build


def timed(work: Callable[[], object]) -> float:
    """Seconds one call of `work` takes, with the garbage collector off (as timeit does)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def raw_copy(store: Path, path: Path) -> sqlite3.Connection:
    """A raw sqlite3 connection (autocommit) to a copy of the store at `store` written to
    `path`: the same tables and indexes, already used; WAL and synchronous=FULL, the store's
    defaults, and sub-journals in memory as the store keeps them. What the durable baselines
    write their rows into."""
    source = sqlite3.connect(store)
    connection = sqlite3.connect(path, isolation_level=None)
    source.backup(connection)
    source.close()
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA temp_store = MEMORY")
    return connection


def compile_machine(folder: Path, stem: str, source: str) -> Path:
    """Write `source` to FOLDER/STEM.fsm, build it, and return the generated module's path."""
    path = folder / f"{stem}.fsm"
    path.write_text(source, encoding="utf-8")
    out = folder / "generated"
    result = build([path], out, svg=False)
    if result.report.failed(False):
        raise SystemExit(f"the {stem} machine does not compile: {result.report}")
    return out / f"{stem}.py"


def load_module(path: Path) -> ModuleType:
    """Import a generated module from its file."""
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import the generated module {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
