"""The runtime's commands `simulate` and `demo`, registered on the one `autonomic` command.

Exit codes: 0 ok, 1 a problem in the input or a failed expectation or verification (printed as
a diagnostic `path:line:col: CODE [error] message` with a hint, by autonomic.diagnostics, never
a traceback), 2 usage. The command modules are imported when their command runs, so other
commands start fast; they never import this module back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]

DEMO_DIR = Path("autonomic-demo")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import run_simulation

    return run_simulation(args.machine, args.script, sys.stdout, sys.stderr, store=args.store)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .ledger import LedgerMode
    from .store.locate import is_postgres_url, store_location

    mode: LedgerMode = "checkpoint" if args.checkpoint else "sign-each"
    location = store_location(args.store)
    db: Path | str = args.db
    if location is not None:
        db = location if is_postgres_url(location) else Path(location)
    return run_demo(db, args.keys, sys.stdout, sys.stderr, generated=args.generated, mode=mode)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `simulate` and `demo` to the `autonomic` command."""
    simulate = subparsers.add_parser(
        "simulate",
        help="run a governor through a scripted sequence of events and clock advances",
        description="Run one generated governor in memory with a virtual clock and print the "
        "trace: states, guards, actions, timers armed and fired, emitted events, notifications "
        "and ledger entries. The script is YAML or JSON (see autonomic.runtime.simulate). "
        "Exit 1 on a problem in the script or a failed `expect`.",
    )
    simulate.add_argument(
        "machine",
        metavar="MACHINE",
        help="module or machine name (entitlement, QuotaSla: ./generated first, then the "
        "installed autonomic.generated), a dotted module name, or a generated .py file",
    )
    simulate.add_argument("--script", required=True, metavar="FILE", help="YAML or JSON script")
    simulate.add_argument(
        "--store",
        metavar="URL",
        help="run on this store instead of in memory: a new SQLite file or an empty "
        "postgresql:// database (the simulation signs a fresh ledger)",
    )
    simulate.set_defaults(func=_cmd_simulate)

    demo = subparsers.add_parser(
        "demo",
        help="run the seven governors on SQLite with a signed ledger, then verify it",
        description="The seed's flows and patterns under a virtual clock: signup (parallel), "
        "escalation, idempotent charges, payment outcomes (conditional, with a durable wait on "
        "the retry ladder), upgrade (sequence), noisy neighbour (fanout), a cancellation saga "
        "with a failure and its compensation, refund, breaker and bulkhead, on an SQLite "
        "store with an Ed25519-signed audit ledger; ends with an offline verification. Running it "
        "again on the same store adds another customer. Exit 0 only if the ledger verifies.",
    )
    demo.add_argument(
        "--db",
        type=Path,
        default=DEMO_DIR / "store.db",
        metavar="FILE",
        help=f"SQLite store to write (default: {DEMO_DIR / 'store.db'}); an existing store is "
        "reused if its ledger verifies with the key; any other file is left untouched",
    )
    demo.add_argument(
        "--keys",
        type=Path,
        default=DEMO_DIR / "keys",
        metavar="DIR",
        help="signing key: a directory holding one <key_id>.private.pem (a key pair is "
        "generated if it holds none) or the .private.pem file itself "
        f"(default: {DEMO_DIR / 'keys'})",
    )
    demo.add_argument(
        "--checkpoint",
        action="store_true",
        help="sign checkpoints over batches of ledger entries instead of every entry "
        "(the default signs every entry, as the seed's audit trail describes)",
    )
    demo.add_argument(
        "--generated",
        metavar="DIR",
        help="load the seven generated modules from DIR (default: ./generated if it holds "
        "them, else the installed autonomic.generated package)",
    )
    demo.add_argument(
        "--store",
        metavar="URL",
        help="the store to write instead of --db: an SQLite file or a postgresql:// URL "
        "(default: $AUTONOMIC_STORE, else --db)",
    )
    demo.set_defaults(func=_cmd_demo)
