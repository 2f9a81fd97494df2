"""Flows: durable composition of governors (see engine.py for the semantics)."""

from .engine import FlowResult, FlowRunner, NoReply, StepContext, StepFailed

__all__ = ["FlowResult", "FlowRunner", "NoReply", "StepContext", "StepFailed"]
