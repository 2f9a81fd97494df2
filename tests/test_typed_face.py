"""The typed face of a generated module: its Bindings protocol and Governor handle, run for
real and checked by mypy (a correct user module passes --strict, each kind of mistake fails)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from autonomic.compiler.build import build
from autonomic.runtime.errors import BindingError, PayloadInvalid
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.tables import Outcome, TransitionContext
from autonomic.runtime.timers import VirtualClock
from strategies import import_path

ROOT = Path(__file__).resolve().parents[1]

DOOR = """\
machine Door "A door with a badge reader." {
  event Badge { holder: str, level: int }
  event Close
  event Note { text: str? }

  initial state Closed {
    on Badge -> Open when badge_ok do unlock
    on Badge -> Closed else
    on Note -> Closed do remember
  }
  state Open {
    on Close -> Closed do lock
    after 30s -> Closed do lock
    on Note -> Open do remember
  }
}
"""

GOOD_USER = """\
from autonomic.runtime import Runtime, TransitionContext

from door_governors import door
from door_governors.door import BadgePayload, ClosePayload, Event, NotePayload, State


class DoorBindings:
    def badge_ok(self, context: TransitionContext[BadgePayload]) -> bool:
        return context.payload.level >= 2

    def unlock(self, context: TransitionContext[BadgePayload]) -> None:
        print("unlock for", context.payload.holder)

    def lock(self, context: TransitionContext[None]) -> None:
        print("lock", context.timer)

    def remember(self, context: TransitionContext[NotePayload | None]) -> str:
        return "" if context.payload is None else context.payload.text or ""


governor = door.load(Runtime(), DoorBindings())
governor.create("front")
opened: State = governor.dispatch("front", Event.Badge, BadgePayload(holder="ann", level=2)).state
governor.dispatch("front", Event.Close, ClosePayload(), actor="ann")
governor.dispatch("front", Event.Close)
governor.dispatch("front", Event.Note)
governor.dispatch("front", Event.Note, NotePayload(text="hi"), idempotency_key="k1")
"""

# Each mistake a user can make, and the mypy error code it must raise on its line.
BAD_USER = """\
from autonomic.runtime import Runtime, TransitionContext

from door_governors import door
from door_governors.door import BadgePayload, Event, NotePayload, State


class Missing:  # no `remember`
    def badge_ok(self, context: TransitionContext[BadgePayload]) -> bool: return True
    def unlock(self, context: TransitionContext[BadgePayload]) -> None: ...
    def lock(self, context: TransitionContext[None]) -> None: ...


class Misspelt:  # `unlok`
    def badge_ok(self, context: TransitionContext[BadgePayload]) -> bool: return True
    def unlok(self, context: TransitionContext[BadgePayload]) -> None: ...
    def lock(self, context: TransitionContext[None]) -> None: ...
    def remember(self, context: TransitionContext[NotePayload | None]) -> None: ...


class WrongPayload:  # `lock` also runs on a timer, whose context carries no payload
    def badge_ok(self, context: TransitionContext[BadgePayload]) -> bool: return True
    def unlock(self, context: TransitionContext[BadgePayload]) -> None: ...
    def lock(self, context: TransitionContext[BadgePayload]) -> None: ...
    def remember(self, context: TransitionContext[NotePayload | None]) -> None: ...


class WrongReturn:  # a guard returns bool
    def badge_ok(self, context: TransitionContext[BadgePayload]) -> str: return "yes"
    def unlock(self, context: TransitionContext[BadgePayload]) -> None: ...
    def lock(self, context: TransitionContext[None]) -> None: ...
    def remember(self, context: TransitionContext[NotePayload | None]) -> None: ...


runtime = Runtime()
door.load(runtime, Missing())  # E: arg-type
door.load(runtime, Misspelt())  # E: arg-type
door.load(runtime, WrongPayload())  # E: arg-type
door.load(runtime, WrongReturn())  # E: arg-type
governor = door.Governor(runtime.governor("Door"))
governor.dispatch("front", Event.Badge)  # E: call-overload
governor.dispatch("front", Event.Badge, NotePayload(text="x"))  # E: call-overload
governor.dispatch("front", "Badge", BadgePayload(holder="a", level=1))  # E: call-overload
governor.dispatch("front", Event.Close, actr="ann")  # E: call-overload
wrong: str = governor.dispatch("front", Event.Close).state.nope  # E: attr-defined
state: State = governor.dispatch("front", Event.Close).result.to_state  # E: assignment
"""


@pytest.fixture(scope="module")
def door_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Door machine built into a package `door_governors`, as a user's project holds it."""
    root = tmp_path_factory.mktemp("door")
    (root / "door.fsm").write_text(DOOR)
    result = build([root / "door.fsm"], root / "door_governors", svg=False)
    assert not result.report.errors(), result.report.errors()
    return root


@pytest.fixture
def door(door_package: Path) -> ModuleType:
    return import_path(door_package / "door_governors" / "door.py")


class Recorder:
    """Typed bindings that remember the contexts they were given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, TransitionContext]] = []

    def badge_ok(self, context: TransitionContext) -> bool:
        self.seen.append(("badge_ok", context))
        payload = context.payload
        return payload is not None and getattr(payload, "level", 0) >= 2

    def unlock(self, context: TransitionContext) -> None:
        self.seen.append(("unlock", context))

    def lock(self, context: TransitionContext) -> None:
        self.seen.append(("lock", context))

    def remember(self, context: TransitionContext) -> str:
        self.seen.append(("remember", context))
        return "noted"


def test_typed_governor_dispatches_with_enums_and_payload_models(door: ModuleType) -> None:
    clock = VirtualClock(start_ms=1_000_000)
    bindings = Recorder()
    governor = door.load(Runtime(clock=clock), bindings)
    created = governor.create("front")
    assert isinstance(created, Outcome)
    assert created.state is door.State.Closed and created.from_state is None
    assert created.version == 1

    denied = governor.dispatch("front", door.Event.Badge, door.BadgePayload(holder="bo", level=1))
    assert denied.state is door.State.Closed and denied.from_state is door.State.Closed
    opened = governor.dispatch("front", door.Event.Badge, door.BadgePayload(holder="ann", level=3))
    assert opened.state is door.State.Open and opened.version == 3
    assert governor.state("front") is door.State.Open
    assert [t.timer_id for t in governor.timers("front")] == [t.timer_id for t in opened.armed]

    noted = governor.dispatch("front", door.Event.Note)  # no field is required
    assert noted.action_results == {"remember": "noted"}
    assert governor.governor.runtime.fire_due(clock.advance("30s"))
    assert governor.state("front") is door.State.Closed

    names = [name for name, _ in bindings.seen]
    assert names == ["badge_ok", "badge_ok", "unlock", "remember", "lock"]
    contexts = dict(bindings.seen[2:])
    assert contexts["unlock"].payload == door.BadgePayload(holder="ann", level=3)
    assert contexts["remember"].payload == door.NotePayload()  # validated from nothing
    assert contexts["lock"].payload is None and contexts["lock"].timer is not None


def test_typed_dispatch_still_validates_at_run_time(door: ModuleType) -> None:
    governor = door.load(Runtime(), Recorder())
    governor.create("front")
    with pytest.raises(PayloadInvalid) as caught:
        governor.dispatch("front", door.Event.Badge, {"holder": "ann"})
    assert caught.value.code == "R005"


def test_load_time_check_reports_every_missing_binding(door: ModuleType) -> None:
    class Partial:
        def unlock(self, context: TransitionContext) -> None: ...

    with pytest.raises(BindingError) as caught:
        door.load(Runtime(), Partial())
    problems = "\n".join(caught.value.problems)
    for name in ("badge_ok", "lock", "remember"):
        assert f"'{name}' has no binding" in problems
    assert "R010" in problems and "R011" in problems and "door.fsm:" in problems


def test_a_module_of_functions_binds_too(door: ModuleType, tmp_path: Path) -> None:
    functions = tmp_path / "door_functions.py"
    functions.write_text(
        "def badge_ok(context): return True\n"
        "def unlock(context): pass\n"
        "def lock(context): pass\n"
        "def remember(context): return 1\n"
    )
    governor = door.load(Runtime(), import_path(functions))
    governor.create("back")
    opened = governor.dispatch("back", door.Event.Badge, door.BadgePayload(holder="x", level=0))
    assert opened.state is door.State.Open


def test_handle_refuses_another_machines_governor(door: ModuleType) -> None:
    from autonomic.generated import billing

    runtime = Runtime()
    other = runtime.load(billing.MACHINE, *_permissive(billing))
    with pytest.raises(TypeError):
        door.Governor(other)


def _permissive(module: ModuleType) -> tuple[dict[str, object], dict[str, object]]:
    spec = module.MACHINE
    return {n: lambda c: True for n in spec.guards}, {n: lambda c: None for n in spec.actions}


def test_mypy_accepts_correct_bindings_and_rejects_each_mistake(
    door_package: Path, tmp_path: Path
) -> None:
    """One mypy --strict run: the correct module is clean; every line of the wrong one marked
    `# E: code` fails with that code, and no other line does."""
    (door_package / "good_user.py").write_text(GOOD_USER)
    (door_package / "bad_user.py").write_text(BAD_USER)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "good_user.py",
            "bad_user.py",
        ],
        cwd=door_package,
        env={**os.environ, "MYPYPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [line for line in done.stdout.splitlines() if ": error: " in line]
    assert not [e for e in errors if e.startswith("good_user.py")], done.stdout
    expected = {
        (number, line.rsplit("# E: ", 1)[1])
        for number, line in enumerate(BAD_USER.splitlines(), start=1)
        if "# E: " in line
    }
    found = {
        (int(e.split(":")[1]), e.rsplit("[", 1)[1].rstrip("]"))
        for e in errors
        if e.startswith("bad_user.py")
    }
    assert found == expected, textwrap.indent(done.stdout, "  ")
