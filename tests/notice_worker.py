"""`autonomic worker --app` loaders for the refusal-notice takeover tests
(tests/test_notice_takeover.py): the marketplace's seven governors with the demo's bindings.
`victim` also stops its own process (SIGSTOP) right after the unit of work that released a
refusal notice (`outbox.mark_many`) commits, printing "released EVENT_ID" first, so the test
kills it -9 there: the notice is pending (and, on PostgreSQL, leased to this worker) and not
yet delivered."""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Sequence

from autonomic.generated import MODULES
from autonomic.runtime import outbox
from autonomic.runtime.demo import _Bindings, _Payments
from autonomic.runtime.results import Delivery
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import OutboxMessage, OutboxStatus


def load(runtime: Runtime) -> None:
    bindings = _Bindings(_Payments())
    for module in MODULES:
        spec = importlib.import_module(f"autonomic.generated.{module}").MACHINE
        runtime.load(spec, *bindings.of(spec))


def victim(runtime: Runtime) -> None:
    load(runtime)
    release = outbox.mark_many

    def mark_many(
        runtime: Runtime, outcomes: Sequence[tuple[OutboxMessage, OutboxStatus, str]]
    ) -> list[tuple[Delivery, OutboxMessage | None]]:
        settled = release(runtime, outcomes)
        for _, notice in settled:
            if notice is not None:
                print(f"released {notice.event_id}", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
        return settled

    outbox.mark_many = mark_many
