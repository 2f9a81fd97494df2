"""The `db` and `worker` commands: argument parsing, exit codes and messages only.

Exit codes: 0 ok, 1 an unusable store, key or app (a diagnostic with a hint, never a
traceback), 2 usage. `--store` defaults to $AUTONOMIC_STORE.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .errors import RuntimeFailure, failure_diagnostic
from .store.locate import STORE_ENV, is_postgres_url, redact, store_location

if TYPE_CHECKING:
    from .ledger import RootLike

__all__ = ["add_store_argument", "register", "resolve_store"]

STORE_HINT = f"pass --store postgresql://USER@HOST/DB (or an SQLite file), or set {STORE_ENV}"
# Said instead of the library's hint (which names Runtime(trusted_root=...)) when the store's
# chain of keys does not start at the root the worker pinned: by default, and as given.
WORKER_ROOT_HINT = (
    "the worker pins the ledger root that its --keys folder records (trusted-root.json, "
    "written by `autonomic keygen --retire`), else its own key: pin the ledger's root with "
    "--public-key ROOT.public.json or --root FINGERPRINT (a folder rotated before "
    "trusted-root.json existed records none); `autonomic audit verify` checks the store"
)
GIVEN_ROOT_HINT = (
    "pass the key that started this store's ledger (its genesis entry names it): --public-key "
    "ROOT.public.json or --root FINGERPRINT; `autonomic audit verify` checks the store"
)


def add_store_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        help=f"{what}: an SQLite file or a postgresql:// URL (default: ${STORE_ENV})",
    )


def resolve_store(parser: argparse.ArgumentParser, given: str | None) -> str:
    """The store location, or a usage error (exit 2) naming both ways to give it."""
    location = store_location(given)
    if location is None:
        parser.error(f"no store: {STORE_HINT}")
    return location


def _duration_ms(text: str) -> int:
    from .timers import parse_duration  # on use: it loads the tables, `audit` needs neither

    try:
        return parse_duration(text)
    except (ValueError, RuntimeFailure):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (for example 30s, 5m)"
        ) from None


def _cmd_migrate(args: argparse.Namespace) -> int:
    location = resolve_store(args.parser, args.store)
    if not is_postgres_url(location):
        args.parser.error(
            "db migrate applies to PostgreSQL stores (an SQLite store migrates itself)"
        )
    from .store.postgres import migrate

    try:
        before, after = migrate(location, partitions=args.partitions)
    except RuntimeFailure as failure:
        sys.stderr.write(failure_diagnostic(redact(location), failure, STORE_HINT) + "\n")
        return 1
    if before == after:
        print(f"{redact(location)}: schema version {after}, up to date")
    elif before == 0:
        print(f"{redact(location)}: created the store at schema version {after}")
    else:
        print(f"{redact(location)}: migrated from schema version {before} to {after}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from .checkpointing import ROOT_HINT
    from .worker import WorkerOptions, run_worker

    location = resolve_store(args.parser, args.store)
    root: RootLike | None = None
    if args.root is not None or args.public_key is not None:
        from .root_options import root_of  # as `audit verify` takes its root

        args.usage_error = args.parser.error
        pinned = root_of(args)
        if isinstance(pinned, int):
            return pinned  # a usage error (2) or the key file's diagnostic (1), printed
        root = pinned
    options = WorkerOptions(
        store=location,
        keys=args.keys,
        app=args.app,
        mode=args.mode,
        poll_ms=args.poll,
        root_every_ms=args.root_every,
        batch=args.batch,
        lease_ms=args.lease,
        root=root,
    )
    try:
        return run_worker(options, sys.stdout)
    except RuntimeFailure as failure:
        if failure.hint == ROOT_HINT:
            failure.hint = WORKER_ROOT_HINT if root is None else GIVEN_ROOT_HINT
        sys.stderr.write(failure_diagnostic(redact(location), failure, STORE_HINT) + "\n")
        return 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `db` and `worker` to the `autonomic` command."""
    db = subparsers.add_parser(
        "db",
        help="manage a PostgreSQL store's schema",
        description="Apply the store's versioned migrations. A database that holds anything "
        "but an autonomic store is refused untouched; a store newer than this autonomic is too.",
    )
    commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    migrate = commands.add_parser(
        "migrate",
        help="create the store, or bring it to this version's schema",
        description="Create the store in an empty database (or the first schema of the URL's "
        "search_path), or apply the migrations it lacks, in one transaction.",
    )
    add_store_argument(migrate, "the PostgreSQL store")
    migrate.add_argument(
        "--partitions",
        type=int,
        metavar="N",
        help="ledger chains, fixed at creation (default 1; see docs/scaling.md)",
    )
    migrate.set_defaults(func=_cmd_migrate, parser=migrate)

    worker = subparsers.add_parser(
        "worker",
        help="fire due timers and deliver the outbox of a shared store until stopped",
        description="Claim due timers and pending outbox messages with a lease, fire and "
        "deliver them, and sign checkpoints and a root over the ledger partitions; run any "
        "number of workers on any hosts. SIGTERM or SIGINT stops it after the round in flight.",
    )
    add_store_argument(worker, "the store to work on")
    worker.add_argument(
        "--keys", required=True, metavar="DIR", help="signing key (folder or .private.pem)"
    )
    worker.add_argument(
        "--app",
        required=True,
        metavar="MODULE:FUNCTION",
        help="the function that loads the governors into the runtime it is given; if it "
        "returns a FlowRunner, the worker drives its flows too",
    )
    worker.add_argument(
        "--mode", choices=["checkpoint", "sign-each"], help="ledger mode of a new store"
    )
    pinned = worker.add_mutually_exclusive_group()
    pinned.add_argument(
        "--public-key",
        metavar="FILE",
        help="the ledger's root key (.public.json or .public.pem), as `audit verify` takes it "
        "(default: the root --keys records in trusted-root.json, else the signing key)",
    )
    pinned.add_argument(
        "--root",
        metavar="FINGERPRINT",
        help="the root key's fingerprint (64 hex digits, printed by keygen) instead of its file",
    )
    worker.add_argument(
        "--poll",
        type=_duration_ms,
        default=1000,
        metavar="DURATION",
        help="wait this long when nothing was due (default 1s)",
    )
    worker.add_argument(
        "--root-every",
        type=_duration_ms,
        default=60_000,
        metavar="DURATION",
        help="sign checkpoints and a root this often (default 1m)",
    )
    worker.add_argument(
        "--lease",
        type=_duration_ms,
        default=30_000,
        metavar="DURATION",
        help="how long a claim lasts before another worker may take it over (default 30s): "
        "longer than a round of --batch firings takes; also how long a flow run may go "
        "unwritten before the worker resumes it",
    )
    worker.add_argument(
        "--batch",
        type=int,
        default=500,
        metavar="N",
        help="timers (and messages) claimed at a time (default 500)",
    )
    worker.set_defaults(func=_cmd_worker, parser=worker)
