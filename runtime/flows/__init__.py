"""Flows: durable composition of governors (see engine.py for the semantics)."""

from .engine import FlowResult, FlowRunner, StepContext, StepFailed

__all__ = ["FlowResult", "FlowRunner", "StepContext", "StepFailed"]
