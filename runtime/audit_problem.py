"""What `autonomic audit verify` reports of a row its verified ledger contradicts."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InstanceProblem"]


@dataclass(frozen=True, slots=True)
class InstanceProblem:
    """The first instance whose row or kept data the ledger contradicts, and why; `seq` the
    ledger entry it contradicts (None: there is none)."""

    machine: str
    instance: str
    seq: int | None
    reason: str
    kind: str = "instance"  # or "flow": a flow run's row (runtime/flow_audit.py)

    def describe(self) -> str:
        at = "" if self.seq is None else f" (ledger seq {self.seq})"
        return f"{self.machine} '{self.instance}': {self.reason}{at}"
