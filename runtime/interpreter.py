"""The names this module held before the runtime was laid out as its parts, re-exported.

New code imports from the part itself: `dispatch` (Governor), `runtime` (Runtime), `results`
(DispatchResult and the other results).
"""

from .dispatch import CREATE_EVENT, Governor
from .results import (
    Delivery,
    DispatchResult,
    EmittedEvent,
    Notification,
    ReplayedState,
    TimerFiring,
    derive_event_id,
)
from .runtime import Runtime
from .tables import TransitionContext

__all__ = [
    "CREATE_EVENT",
    "Delivery",
    "DispatchResult",
    "EmittedEvent",
    "Governor",
    "Notification",
    "ReplayedState",
    "Runtime",
    "TimerFiring",
    "TransitionContext",
    "derive_event_id",
]
