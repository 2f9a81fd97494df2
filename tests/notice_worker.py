"""`autonomic worker --app` loaders for the refusal-notice takeover tests
(tests/test_notice_takeover.py): the marketplace's seven governors with the demo's bindings.
`victim` also stops its own process (SIGSTOP) right after a unit of work that released a
refusal notice commits, printing "released EVENT_ID" first, so the test kills it -9 there:
the notice is pending (and, on PostgreSQL, leased to this worker) and not yet delivered."""

from __future__ import annotations

import importlib
import os
import signal

from autonomic.generated import MODULES
from autonomic.runtime import outbox
from autonomic.runtime.demo import _Bindings, _Payments
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import OutboxMessage, OutboxStatus


def load(runtime: Runtime) -> None:
    bindings = _Bindings(_Payments())
    for module in MODULES:
        spec = importlib.import_module(f"autonomic.generated.{module}").MACHINE
        runtime.load(spec, *bindings.of(spec))


def victim(runtime: Runtime) -> None:
    load(runtime)
    release = outbox.mark

    def mark(
        runtime: Runtime, message: OutboxMessage, status: OutboxStatus, error: str | None
    ) -> OutboxMessage | None:
        notice = release(runtime, message, status, error)
        if notice is not None:
            print(f"released {notice.event_id}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return notice

    outbox.mark = mark
