"""The failures a flow's caller gets before any step runs (codes R033-R035)."""

from __future__ import annotations

from ..errors import RuntimeFailure


class FlowInputsInvalid(RuntimeFailure):
    """A flow was started with inputs its declaration does not take: missing, unknown or of
    the wrong type; nothing was stored."""

    code = "R033"

    def __init__(self, flow: str, problems: tuple[tuple[str, str], ...]) -> None:
        described = "; ".join(f"input '{name}': {why}" for name, why in problems)
        super().__init__(
            f"invalid inputs for flow {flow}: {described}",
            hint="nothing was stored; the flow's `input { ... }` block declares what it takes",
        )
        self.flow = flow
        self.problems = problems


class UnknownFlow(RuntimeFailure):
    """No flow of that name is loaded in the FlowRunner."""

    code = "R034"

    def __init__(self, flow: str, loaded: tuple[str, ...]) -> None:
        super().__init__(
            f"no flow '{flow}' is loaded",
            hint=f"loaded flows: {', '.join(loaded) or 'none'}; pass its FLOW to FlowRunner",
        )
        self.flow = flow


class UnregisteredFunction(RuntimeFailure):
    """A compute step names a function the FlowRunner was not given."""

    code = "R035"

    def __init__(self, missing: tuple[tuple[str, str, str], ...]) -> None:
        named = ", ".join(
            f"{flow}.{step} computes with '{function}'" for flow, step, function in missing
        )
        functions = ", ".join(
            f"{function!r}: ..." for function in sorted({f for _, _, f in missing})
        )
        super().__init__(
            f"compute steps name unregistered functions: {named}",
            hint=f"give them to the runner: FlowRunner(..., functions={{{functions}}})",
        )
        self.missing = missing
