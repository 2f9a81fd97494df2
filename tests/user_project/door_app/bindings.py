"""The door's guards and actions, typed against the generated Bindings protocol."""

from autonomic.runtime import TransitionContext

from door_app.governors.door import BadgePayload


class DoorBindings:
    def __init__(self) -> None:
        self.events: list[str] = []

    def badge_ok(self, context: TransitionContext[BadgePayload]) -> bool:
        return context.payload.level >= 2

    def unlock(self, context: TransitionContext[BadgePayload]) -> None:
        self.events.append(f"unlocked for {context.payload.holder}")

    def refuse(self, context: TransitionContext[BadgePayload]) -> None:
        self.events.append(f"refused {context.payload.holder}")

    def lock(self, context: TransitionContext[None]) -> None:
        self.events.append("locked by timer" if context.timer else "locked")
