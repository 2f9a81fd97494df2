"""A fleet worker: fires due timers and delivers the outbox of a shared store until stopped.

Run as many as the load needs, on any hosts, against one PostgreSQL store: each claims due
timers and pending messages with a lease (`SELECT ... FOR UPDATE SKIP LOCKED`), so workers
never wait for each other and never fire a timer twice (see runtime/store/postgres.py). A
worker killed mid-claim leaves its leased work to the others once the lease runs out.

Governors come from the application: `--app module:function` names a callable that receives
the Runtime and loads the governors with their guards and actions (`runtime.load(spec,
guards, actions)`), the same code the application runs with, whatever the store.
If it returns a FlowRunner, the worker drives its flows too: each round it resumes the
waiting runs (an await whose machine moved, a fanout's deadline, a step whose receiver did
not answer, at its retry time), the compensating runs whose compensation is due again, and
the runs nobody has written for `--lease` (their process was killed), each step exactly once
(engine.py).

SIGTERM and SIGINT stop the loop after the round in flight commits; the worker then signs
the remaining checkpoints and a root over the partition heads, closes the store, and exits 0.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

from .errors import ActionFailed, RuntimeFailure, StoreConfigError
from .flows import FlowRunner
from .keys import load_signer, load_trusted_root
from .ledger import LedgerMode, LedgerSealer, RootLike
from .runtime import Runtime
from .store.locate import open_store, redact

__all__ = ["WorkerOptions", "load_app", "run_worker"]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    store: str
    keys: str
    app: str
    mode: LedgerMode | None = None
    poll_ms: int = 1000
    root_every_ms: int = 60_000
    batch: int = 500
    lease_ms: int = 30_000
    # The ledger root pinned (None: the one the key folder records, else the signing key).
    root: RootLike | None = None


def load_app(target: str) -> Callable[[Runtime], Any]:
    """The `module:function` that loads governors into a runtime (the current folder is
    importable, as for `python -m`)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise StoreConfigError(
            f"--app {target!r} is not module:function",
            hint="for example --app myapp.governors:load",
        )
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StoreConfigError(
            f"--app: cannot import {module_name!r}: {exc}", hint="run from the project folder"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise StoreConfigError(
            f"--app: {module_name} has no function {attribute!r}",
            hint="the function takes the Runtime and loads the governors",
        )
    return function  # type: ignore[no-any-return]


def run_worker(options: WorkerOptions, out: IO[str], *, stop: threading.Event | None = None) -> int:
    """Work until `stop` is set (SIGTERM/SIGINT set it when this is the main thread)."""
    stop = stop or threading.Event()
    app = load_app(options.app)
    store = open_store(options.store, lease_ms=options.lease_ms)
    try:
        mode = options.mode or store.ledger_mode() or "checkpoint"
        runtime = Runtime(
            store,
            sealer=LedgerSealer(load_signer(options.keys), mode),
            trusted_root=load_trusted_root(options.keys) if options.root is None else options.root,
        )
        loaded = app(runtime)
    except BaseException:
        store.close()
        raise
    if threading.current_thread() is threading.main_thread():

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    flows = loaded if isinstance(loaded, FlowRunner) else None
    machines = ", ".join(sorted(runtime.governors))
    if flows is not None:
        machines += "; flows " + ", ".join(sorted(flows.specs))
    out.write(f"worker on {redact(options.store)}: {machines}; {runtime.partitions} partitions\n")
    out.flush()
    fired = delivered = finished = 0
    next_root = time.monotonic() + options.root_every_ms / 1000
    transient = _transient_errors()
    try:
        while not stop.is_set():
            try:
                round_fired, round_delivered = _round(runtime, options.batch, out)
                round_finished = 0 if flows is None else _drive_flows(flows, options, out)
                if time.monotonic() >= next_root:
                    runtime.checkpoint() if mode == "checkpoint" else runtime.sign_root()
                    next_root = time.monotonic() + options.root_every_ms / 1000
            except transient as exc:
                # The database went away (restart, failover, network): what this round
                # claimed stays leased and returns to the fleet when the lease runs out.
                out.write(f"store unavailable, retrying: {' '.join(str(exc).split())}\n")
                out.flush()
                round_fired = round_delivered = round_finished = 0
            fired += round_fired
            delivered += round_delivered
            finished += round_finished
            if not round_fired and not round_delivered and not round_finished:
                stop.wait(options.poll_ms / 1000)
    finally:
        try:
            if flows is not None:
                flows.close()
        finally:
            runtime.close()
    done = f", {finished} flow runs finished" if flows is not None else ""
    out.write(f"worker stopped: {fired} timers fired, {delivered} messages delivered{done}\n")
    out.flush()
    return 0


def _round(runtime: Runtime, batch: int, out: IO[str]) -> tuple[int, int]:
    """Fire what is due, then deliver what is pending; how many of each."""
    try:
        fired = len(runtime.fire_due(limit=batch))
    except RuntimeFailure as failure:
        # A timer whose action failed stays armed and is tried again after its backoff
        # (timer_firing.py), not at the next poll; the rest fired. The hint says when.
        when = f" ({failure.hint})" if isinstance(failure, ActionFailed) and failure.hint else ""
        out.write(f"timer failed: {failure.code} {failure.message}{when}\n")
        fired = 0
    deliveries = runtime.deliver_outbox(limit=batch)
    return fired, sum(1 for d in deliveries if d.status == "delivered")


def _drive_flows(flows: FlowRunner, options: WorkerOptions, out: IO[str]) -> int:
    """Resume the runs due (`FlowRunner.due_runs`); how many finished. One run's failure
    is reported and leaves it for the next round."""
    finished = 0
    for flow_id in flows.due_runs(stale_ms=options.lease_ms, limit=options.batch):
        try:
            result = flows.resume(flow_id)
        except RuntimeFailure as failure:
            out.write(f"flow {flow_id} failed: {failure.code} {failure.message}\n")
            continue
        if result.finished:
            finished += 1
            # A refused compensation leaves its step's effect in place: say which.
            left = result.uncompensated
            look = f", uncompensated {', '.join(left)}: a person must look" if left else ""
            out.write(
                f"flow {flow_id} ({result.flow} on {result.instance}): {result.status}{look}\n"
            )
            out.flush()
    return finished


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors of a store that is unreachable for now, not broken: the worker waits them out."""
    try:
        import psycopg
    except ImportError:
        return (ConnectionError,)
    return (ConnectionError, psycopg.OperationalError)
