"""The store work a run's plan asks its driver for: write the run, send a step, run the
branches; and the answers that are not a step's outcome."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..store.base import FlowStatus, Transaction
from ..tables import Emit, FlowStepSpec
from .run import _Note


@dataclass(frozen=True, slots=True)
class _Write:
    """Write the run's record with these notes (and the pending ones) in one unit of work.
    `gather`, if given, decides inside that unit's transaction (a fanout's gather looks
    there for replies committed meanwhile): the run's status and more notes."""

    status: FlowStatus
    notes: Sequence[_Note]
    wake_ms: int | None = None
    gather: Callable[[Transaction], tuple[FlowStatus, list[_Note]]] | None = None


@dataclass(frozen=True, slots=True)
class _Send:
    """Run a send step (or compensation) with the run's pending notes, in one commit; the
    answer is ("succeeded", result) or ("failed", reason)."""

    step: FlowStepSpec
    emit: Emit
    phase: Literal["do", "undo"]
    status: FlowStatus
    # What its event id adds to its run's prefix (results.id_part of its name and phase).
    part: bytes
    # The plan's last step (or compensation): the commit that records its outcome (that of
    # its dispatch, where the driver can: the answer is then _SETTLED) ends the run.
    settle: bool = False


@dataclass(frozen=True, slots=True)
class _Branches:
    """Run every branch of a parallel or fanout flow at once; the answer is their outcomes."""

    steps: tuple[FlowStepSpec, ...]
    deadline: int | None


_Op = _Write | _Send | _Branches
_Plan = Generator[_Op, Any, None]
_TIMED_OUT = ("timed_out", "no reply within the fanout's deadline")
_SETTLED = ("settled", None)  # a _Send's answer when its commit recorded its outcome too
