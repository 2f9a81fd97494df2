"""Flows: durable composition of governors (see engine.py for the semantics)."""

from .engine import FlowResult, FlowRunner, NoReply, StepContext, StepFailed
from .errors import FlowInputsInvalid, UnknownFlow, UnregisteredFunction

__all__ = [
    "FlowInputsInvalid",
    "FlowResult",
    "FlowRunner",
    "NoReply",
    "StepContext",
    "StepFailed",
    "UnknownFlow",
    "UnregisteredFunction",
]
