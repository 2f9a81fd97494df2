"""Runs the door on SQLite with a signed ledger, then verifies the ledger."""

import sys
import tempfile
from pathlib import Path

from autonomic.runtime import (
    InvalidTransition,
    Keyring,
    LedgerSealer,
    Runtime,
    SQLiteStore,
    VirtualClock,
    generate_keypair,
    load_public_key,
    load_signer,
    verify_ledger,
)

from door_app.bindings import DoorBindings
from door_app.governors import door
from door_app.governors.door import BadgePayload, Event, State


def main(folder: Path) -> int:
    key = generate_keypair(folder / "keys")
    clock = VirtualClock()
    sealer = LedgerSealer(load_signer(key.private_path), "sign-each")
    bindings = DoorBindings()
    with Runtime(SQLiteStore(folder / "door.db"), clock=clock, sealer=sealer) as runtime:
        front = door.load(runtime, bindings)
        front.create("front")
        refused = front.dispatch("front", Event.Badge, BadgePayload(holder="eve", level=1))
        opened = front.dispatch("front", Event.Badge, BadgePayload(holder="ann", level=3))
        assert refused.state is State.Locked and opened.state is State.Open
        runtime.fire_due(clock.advance("30s"))
        assert front.state("front") is State.Locked
        try:
            front.dispatch("front", Event.Close)
        except InvalidTransition as rejected:
            print(f"{rejected.code}: {rejected.message}")
    report = verify_ledger(folder / "door.db", Keyring([load_public_key(key.public_json_path)]))
    print(", ".join(bindings.events))
    print(f"ledger verified: {report.ok}, {report.count} entries")
    return 0 if report.ok and report.count == 5 else 1  # the genesis entry and four


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        sys.exit(main(Path(folder)))
