"""The `keygen` and `audit` commands: argument parsing, exit codes and messages only.

Exit codes: 0 ok, 1 a failed verification or an unusable input (printed as a diagnostic
`path:1:1: CODE [error] message` with a hint, never a traceback), 2 usage, 70 internal error.
An output file (--out) is replaced only by a file of its own kind: an export never replaces
the ledger, a database or a key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from autonomic.diagnostics import printable

from .errors import (
    FlowRunContradicted,
    InstanceNotInLedger,
    KeyFileError,
    KeyWindowError,
    LedgerFormatError,
    LedgerReadError,
    LedgerWriteError,
    RuntimeFailure,
    failure_diagnostic,
)
from .fleet_cli import STORE_HINT, add_store_argument
from .instance_audit import InstanceProblem, verify_sqlite_store
from .keychain import fingerprint
from .keys import (
    PRIVATE_SUFFIX,
    PublicKeyInfo,
    Signer,
    generate_keypair,
    load_public_key,
    load_signer,
    load_trusted_root,
    now_ms,
    retire_key,
    write_trusted_root,
)
from .ledger import (
    CHECKPOINT_FORMAT,
    JSONL_FORMAT,
    Checkpoint,
    LedgerEntry,
    LedgerSealer,
    MalformedRecord,
    format_timestamp,
    read_ledger,
    write_jsonl,
)
from .ledger_ranges import verify_source
from .root_options import KEY_HINT
from .root_options import load_root as _load_root
from .root_options import root_of as _root_of
from .store.locate import STORE_ENV, is_postgres_url, redact, store_location
from .store.row_seals import row_key as store_row_key
from .witness import read_witness_file

if TYPE_CHECKING:
    from .seal_audit import SealReport
    from .store.base import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 70

LEDGER_ARG_HELP = (
    "SQLite store file or JSON Lines export (or --store URL; default: $AUTONOMIC_STORE)"
)
# Hints for failures that carry none, by the argument the failing file came from.
LEDGER_HINT = "pass the runtime's SQLite store file or a file written by `autonomic audit export`"
KEY_DIR_HINT = "pass a new folder, for example keys/2026 (keygen never overwrites a key)"
RETIRE_HINT = "pass the older key's <key_id>.public.json, which records its validity window"
CHECKPOINT_HINT = "pass a file written by `autonomic audit checkpoint LEDGER --out FILE`"
WITNESS_HINT = "pass the witness file the runtime publishes to (Runtime(witnesses=...))"
OUT_HINT = "pass a new file path in an existing, writable folder"
PRIVATE_KEY_HINT = (
    "pass the <key_id>.private.pem (or its folder) of the runtime that writes this store"
)
MAX_SEAL_PROBLEMS = 20  # rows reported one by one; the rest are counted
# An existing --out file is replaced only when it holds this kind of document.
MAX_REPLACEABLE_HEAD = 1 << 16

Handler = Callable[[argparse.Namespace], int]
T = TypeVar("T")


def _iso_to_ms(text: str) -> int:
    """An argparse type: ISO 8601 date or time (UTC when no offset is given) to epoch ms."""
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (for example 2025-01-31T00:00:00Z)"
        ) from None


def _diagnostic(path: str | os.PathLike[str], failure: RuntimeFailure, hint: str) -> int:
    sys.stderr.write(failure_diagnostic(path, failure, hint) + "\n")
    return EXIT_FAILED


def _printable(text: object) -> str:
    """Stored text shown on a terminal: control and bidi characters are escaped."""
    shown = str(text)
    return shown if shown.isprintable() else repr(shown)[1:-1]


def _head_format(path: Path) -> object:
    """The `format` field of the JSON document that `path` starts with, or None."""
    try:
        with path.open("rb") as handle:
            head = handle.read(MAX_REPLACEABLE_HEAD)
    except OSError:
        return None
    for candidate in (head, head.split(b"\n", 1)[0]):
        try:
            document = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(document, dict):
            return document.get("format")
    return None


def _check_replaceable(path: Path, kind: str, what: str) -> None:
    """Refuse to replace anything but an empty file or an earlier output of the same kind."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise LedgerWriteError(f"{path} is a directory", hint=OUT_HINT)
    if not path.is_file():
        raise LedgerWriteError(f"{path} is not a regular file", hint=OUT_HINT)
    if path.stat().st_size and _head_format(path) != kind:
        raise LedgerWriteError(
            f"refusing to replace {path}: it is not {what}",
            hint="pass a new file path, or delete the file first if it really is to go",
        )


def _write_atomically(path: Path, write: Callable[[IO[str]], T]) -> T:
    """Write a file through a temporary sibling, so a failure never leaves half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("x", encoding="utf-8") as handle:
            result = write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise LedgerWriteError(
            f"cannot write {path}: {exc.strerror or exc}",
            hint="check that the directory exists and is writable",
        ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return result


# ---------------------------------------------------------------------------------------------
# Handlers.


def _outgoing_signer(public_json: str) -> Signer:
    """The private key beside the outgoing key's public JSON file: it signs the rotation."""
    info = load_public_key(public_json)
    private = Path(public_json).with_name(info.key_id + PRIVATE_SUFFIX)
    if not private.exists():
        raise KeyFileError(
            f"the outgoing key's private key {private} is not beside {public_json}",
            hint="a rotation entry is signed by the outgoing key: keep its key folder whole",
        )
    return load_signer(private)


def rotate_store(path: str, outgoing: Signer, incoming: Signer, root: str) -> LedgerEntry:
    """Write a rotation entry into a store's ledger (see Runtime.rotate_key): an SQLite file,
    or a PostgreSQL store's every partition; its chain of keys followed from `root` (the
    fingerprint of the ledger's root key)."""
    # Loaded here: `audit verify` starts faster without the runtime, its stores and tables.
    from .runtime import Runtime
    from .store.sqlite import SQLiteStore

    store: Store
    if is_postgres_url(path):
        from .store.postgres import PostgresStore

        store = PostgresStore(path, create=False)
    elif not Path(path).is_file():
        raise LedgerReadError(f"{path}: no such store file")
    else:
        store = SQLiteStore(path)
    mode = store.ledger_mode()
    if mode is None:
        store.close()
        raise LedgerFormatError(f"{path} keeps no ledger: there is nothing to rotate")
    try:
        runtime = Runtime(store, sealer=LedgerSealer(outgoing, mode), trusted_root=root)
    except BaseException:
        store.close()
        raise
    try:
        return runtime.rotate_key(incoming)
    finally:
        runtime.close()


def _retiring(path: str, valid_from_ms: int) -> int | None:
    """Check the key to retire before a new key is written: None if it can be retired."""
    try:
        if not path.endswith(".json"):
            raise KeyFileError(f"{path} is not a <key_id>.public.json file")
        info = load_public_key(path)
        if info.valid_from_ms is not None and valid_from_ms <= info.valid_from_ms:
            raise KeyWindowError(
                f"key {info.key_id} becomes valid at {format_timestamp(info.valid_from_ms)}, "
                f"not before the new key's start {format_timestamp(valid_from_ms)}",
                hint="the new key's --valid-from must be later than the old key's",
            )
    except RuntimeFailure as failure:
        return _diagnostic(path, failure, RETIRE_HINT)
    return None


def _cmd_keygen(args: argparse.Namespace) -> int:
    now = now_ms()
    valid_from = now if args.valid_from is None else args.valid_from
    if bool(args.retire) != bool(args.ledger):
        args.usage_error(
            "a rotation needs both --retire OLD.public.json and --ledger STORE (repeat "
            "--ledger for every store the old key signs): the ledger records the rotation, "
            "signed by the outgoing key"
        )  # exits with status 2
        return EXIT_USAGE
    if args.retire and (refused := _retiring(args.retire, valid_from)) is not None:
        return refused
    if args.retire and valid_from > now:
        return _diagnostic(
            args.retire,
            KeyWindowError(
                f"the new key becomes valid at {format_timestamp(valid_from)}, later than now: "
                "the rotation entry would hand the ledger to a key that cannot sign yet",
                hint="run the rotation when the new key's window opens (omit --valid-from)",
            ),
            RETIRE_HINT,
        )
    outgoing = None
    root = ""
    if args.retire:
        try:
            outgoing = _outgoing_signer(args.retire)
            # The ledger's root: the one the outgoing key's folder records, or that key itself.
            root = load_trusted_root(Path(args.retire).parent)
        except RuntimeFailure as failure:
            return _diagnostic(args.retire, failure, RETIRE_HINT)
    try:
        info = generate_keypair(args.directory, valid_from_ms=valid_from)
    except RuntimeFailure as failure:
        return _diagnostic(args.directory, failure, KEY_DIR_HINT)
    print(f"key {info.key_id} valid from {format_timestamp(info.valid_from_ms)}")
    print(f"  fingerprint (pin it: audit verify --root): {fingerprint(info.public_key)}")
    print(f"  private key (mode 0600, keep secret): {printable(info.private_path)}")
    print(f"  public key: {printable(info.public_json_path)}")
    print(f"  public key (PEM): {printable(info.public_pem_path)}")
    retire_at = info.valid_from_ms
    if outgoing is not None:
        try:
            write_trusted_root(args.directory, root)
        except RuntimeFailure as failure:
            return _diagnostic(args.directory, failure, KEY_DIR_HINT)
        print(f"  ledger root (pinned by runtimes signing with it): {root}")
        incoming = load_signer(args.directory)
        for ledger in args.ledger:
            try:
                entry = rotate_store(ledger, outgoing, incoming, root)
            except RuntimeFailure as failure:
                return _diagnostic(redact(ledger), failure, LEDGER_HINT)
            # The outgoing key signed the rotation entry: its window closes just after it.
            retire_at = max(retire_at, entry.ts_ms + 1)
            print(
                f"{printable(redact(ledger))}: rotation entry seq {entry.seq} introduces key "
                f"{incoming.key_id}, signed by the outgoing key {outgoing.key_id}"
            )
    if args.retire:
        try:
            retired = retire_key(args.retire, retire_at)
        except RuntimeFailure as failure:
            return _diagnostic(args.retire, failure, RETIRE_HINT)
        until = retired.valid_until_ms
        shown = "never" if until is None else format_timestamp(until)
        print(f"key {retired.key_id} retired: valid until {shown}")
    return EXIT_OK


def _row_key_of(args: argparse.Namespace) -> bytes | int | None:
    """The row-seal key derived from `--private-key` (None without it), or the exit code
    after its diagnostic."""
    if not args.private_key:
        return None
    try:
        return store_row_key(load_signer(args.private_key).private_key)
    except RuntimeFailure as failure:
        return _diagnostic(args.private_key, failure, PRIVATE_KEY_HINT)


def _cmd_verify(args: argparse.Namespace) -> int:
    root = _root_of(args)
    if isinstance(root, int):
        return root
    row_key = _row_key_of(args)
    if isinstance(row_key, int):
        return row_key
    external: Checkpoint | None = None
    witnessed = ""
    if args.checkpoint:
        try:
            external = Checkpoint.load(args.checkpoint)
        except RuntimeFailure as failure:
            return _diagnostic(args.checkpoint, failure, CHECKPOINT_HINT)
    for witness in args.witness or ():
        try:
            newest, count = read_witness_file(witness)
        except RuntimeFailure as failure:
            return _diagnostic(witness, failure, WITNESS_HINT)
        if external is None or newest.size > external.size:
            external = newest
            plural = "s" if count != 1 else ""
            witnessed = f"witness {printable(witness)} ({count} publication{plural})"
    label = "newest witnessed checkpoint" if witnessed else "external checkpoint"
    # The ledger is verified and the store's instances audited against it in one read
    # transaction; the verifier tallies each instance as it reads its entries.
    try:
        with read_ledger(args.ledger) as source:
            report, audit = verify_sqlite_store(
                source, root, external_checkpoint=external, external_label=label
            )
    except RuntimeFailure as failure:
        return _diagnostic(args.ledger, failure, LEDGER_HINT)
    except sqlite3.Error as exc:
        unread = LedgerReadError(f"{args.ledger}: cannot read the instances: {exc}")
        return _diagnostic(args.ledger, unread, LEDGER_HINT)
    if not report.ok:
        print(f"{printable(args.ledger)}: seq {report.index}: {report.reason}")
        return EXIT_FAILED
    if audit is not None and audit.problem is not None:
        return _audit_problem(args.ledger, audit.problem)
    sealed = None if row_key is None else _check_seals(args.ledger, args.private_key, row_key)
    if isinstance(sealed, int):
        return sealed
    details = [f"mode {report.mode}"]
    if report.checkpoints:
        plural = "s" if report.checkpoints != 1 else ""
        details.append(f"{report.checkpoints} signed checkpoint{plural}")
    details.append("keys " + " -> ".join(report.keys))
    plural = "y" if report.count == 1 else "ies"
    print(f"verified {report.count} entr{plural} ({', '.join(details)})")
    if audit is not None:
        print(audit.summary())
    if sealed is not None:
        print(sealed)
    if external is None:
        print(
            "truncation not checked: without a witness (--witness FILE) or a checkpoint kept "
            "elsewhere (--checkpoint FILE), entries cut off the end together with their "
            "checkpoints cannot be detected"
        )
    else:
        source_text = witnessed or f"external checkpoint {printable(args.checkpoint)}"
        print(
            f"not truncated: the ledger holds all {external.size} entries of the newest "
            f"checkpoint from {source_text}"
        )
    return EXIT_OK


def _check_seals(ledger: str, key_file: str, key: bytes) -> str | int:
    """The row seals of the SQLite store `ledger` under `key`: a line saying so, or the exit
    code after a diagnostic for each row whose seal is wrong (at most MAX_SEAL_PROBLEMS)."""
    from .seal_audit import check_row_seals

    path = Path(ledger)
    try:
        with path.open("rb") as handle:
            is_sqlite = handle.read(16) == b"SQLite format 3\x00"
    except OSError as exc:
        unread = LedgerReadError(f"{ledger}: cannot be read: {exc.strerror}")
        return _diagnostic(ledger, unread, LEDGER_HINT)
    if not is_sqlite:
        export = LedgerFormatError(
            f"{ledger} is a ledger export: it holds no store rows whose seals could be checked"
        )
        return _diagnostic(ledger, export, "pass the runtime's SQLite store file")
    try:
        # Read-only: checking a store never writes to it, not even a journal.
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as connection:
            report = check_row_seals(connection.execute, key)
    except RuntimeFailure as failure:
        return _diagnostic(ledger, failure, PRIVATE_KEY_HINT)
    except sqlite3.Error as exc:
        unread = LedgerReadError(f"{ledger}: cannot read the store's rows: {exc}")
        return _diagnostic(ledger, unread, LEDGER_HINT)
    return _seal_outcome(ledger, key_file, report)


def _seal_outcome(where: str, key_file: str, report: SealReport) -> str | int:
    """What `audit verify` says of a store's row seals: a line, or (after one diagnostic per
    row whose seal is wrong, at most MAX_SEAL_PROBLEMS) the exit code."""
    from .seal_audit import ROW_HINT

    for problem in report.problems[:MAX_SEAL_PROBLEMS]:
        _diagnostic(where, problem.failure(), ROW_HINT)
    if report.problems:
        more = len(report.problems) - MAX_SEAL_PROBLEMS
        if more > 0:
            sys.stderr.write(f"... and {more} more rows with wrong seals\n")
        return EXIT_FAILED
    plural = "" if report.rows == 1 else "s"
    return (
        f"row seals: {report.rows} row{plural} checked, each sealed under the row key of "
        f"{printable(key_file)}"
    )


FLOW_AUDIT_HINT = (
    "the store's flows table was changed outside autonomic (or the row lost): restore the "
    "store from a backup; `autonomic audit show STORE FLOW_ID` lists the run's entries"
)


def _audit_problem(where: str, problem: InstanceProblem) -> int:
    """A row the verified ledger contradicts: an instance's on stdout (as before), a flow
    run's as a diagnostic."""
    if problem.kind == "flow":
        return _diagnostic(
            where, FlowRunContradicted(printable(problem.describe())), FLOW_AUDIT_HINT
        )
    print(f"{printable(where)}: {printable(problem.describe())}")
    return EXIT_FAILED


def _cmd_export(args: argparse.Namespace) -> int:
    if args.out:
        try:
            _check_replaceable(Path(args.out), JSONL_FORMAT, "a ledger export")
        except RuntimeFailure as failure:
            return _diagnostic(args.out, failure, OUT_HINT)
    try:
        with read_ledger(args.ledger) as source:

            def export(out: IO[str]) -> int:
                return write_jsonl(source.entries(), source.checkpoints(), out, mode=source.mode)

            if not args.out:
                export(sys.stdout)
                return EXIT_OK
            count = _write_atomically(Path(args.out), export)
    except LedgerWriteError as failure:
        return _diagnostic(args.out, failure, OUT_HINT)
    except RuntimeFailure as failure:
        return _diagnostic(args.ledger, failure, LEDGER_HINT)
    print(f"exported {count} entries to {printable(args.out)}")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    shown: list[LedgerEntry] = []
    try:
        with read_ledger(args.ledger) as source:
            for position, entry in enumerate(source.entries()):
                if isinstance(entry, MalformedRecord):
                    print(f"{printable(args.ledger)}: seq {position}: {entry.reason}")
                    return EXIT_FAILED
                if entry.instance == args.instance:
                    shown.append(entry)
            row = _sqlite_flow_row(source.connection, args.instance) if shown else None
    except RuntimeFailure as failure:
        return _diagnostic(args.ledger, failure, LEDGER_HINT)
    except sqlite3.Error as exc:
        unread = LedgerReadError(f"{args.ledger}: cannot read the flow run: {exc}")
        return _diagnostic(args.ledger, unread, LEDGER_HINT)
    notes = _flow_notes(args.instance, shown, row, store=source.connection is not None)
    for entry in shown:
        print(
            f"{_printable(entry.seq):>6}  {format_timestamp(entry.ts_ms)}  "
            f"{_printable(entry.kind):<10}  {_printable(entry.from_state)} -> "
            f"{_printable(entry.to_state)}  {_printable(entry.event)}  "
            f"{_printable(entry.actor)}"
        )
        if entry.seq in notes:
            print(f"{'':>8}{_printable(notes[entry.seq])}")
    if not shown:
        return _diagnostic(
            args.ledger,
            InstanceNotInLedger(
                f"no ledger entry for instance {args.instance!r}",
                hint="instance ids are case-sensitive; `autonomic audit export` lists all",
            ),
            LEDGER_HINT,
        )
    return EXIT_OK


def _sqlite_flow_row(
    connection: sqlite3.Connection | None, flow_id: str
) -> tuple[str, str, str] | None:
    """The (flow, instance, data) of a store file's flow run, if it has one."""
    if (
        connection is None
        or not connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'flows'"
        ).fetchone()
    ):
        return None
    row = connection.execute(
        "SELECT flow, instance, data FROM flows WHERE flow_id = ?", (flow_id,)
    ).fetchone()
    if row is None or not all(type(value) is str for value in row):
        return None
    return row[0], row[1], row[2]


def _flow_notes(
    flow_id: str, shown: list[LedgerEntry], row: tuple[str, str, str] | None, *, store: bool
) -> dict[int, str]:
    """A flow run's entries: print the line naming its flow and instance, and return the
    notes for its ending entries (runtime/flow_audit.py); nothing for an instance's."""
    if not shown or any(entry.kind != "flow" for entry in shown):
        return {}
    from .flow_audit import run_notes

    header, notes = run_notes(flow_id, shown, row, store=store)
    print(_printable(header))
    return notes


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    try:
        _check_replaceable(Path(args.out), CHECKPOINT_FORMAT, "a checkpoint")
    except RuntimeFailure as failure:
        return _diagnostic(args.out, failure, OUT_HINT)
    keyring: PublicKeyInfo | None = None
    if args.public_key:
        loaded = _load_root(args.public_key)
        if isinstance(loaded, tuple):
            return _diagnostic(*loaded, KEY_HINT)
        keyring = loaded
    try:
        with read_ledger(args.ledger) as source:
            if keyring is not None:
                # In ranges for a large store; the newest checkpoint below is then read from
                # the snapshot the ranges were held to.
                report = verify_source(source, keyring)
                if not report.ok:
                    print(f"{printable(args.ledger)}: seq {report.index}: {report.reason}")
                    return EXIT_FAILED
            checkpoint = source.latest_signed_checkpoint()
    except RuntimeFailure as failure:
        return _diagnostic(args.ledger, failure, LEDGER_HINT)
    try:
        _write_atomically(Path(args.out), lambda out: out.write(checkpoint.to_json()))
    except RuntimeFailure as failure:
        return _diagnostic(args.out, failure, OUT_HINT)
    verified = "verified" if keyring is not None else "not verified: pass --public-key to check"
    print(
        f"checkpoint at size {checkpoint.size} (head {checkpoint.head_hash.hex()[:16]}..., "
        f"key {checkpoint.key_id}, {format_timestamp(checkpoint.ts_ms)}; {verified}) "
        f"written to {printable(args.out)}"
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# `audit verify|export|show` on a store given by --store (or $AUTONOMIC_STORE): an SQLite
# store goes to the file commands unchanged; a PostgreSQL store is read here.


def with_store(parser: argparse.ArgumentParser, handler: Handler, command: str) -> Handler:
    """Add --store to an audit command whose LEDGER became optional, and route the command:
    LEDGER or --store (default $AUTONOMIC_STORE), a postgresql:// URL to the fleet reader."""
    add_store_argument(parser, "the runtime's store instead of LEDGER")
    if command == "export":
        parser.add_argument(
            "--partition",
            type=int,
            metavar="P",
            help="PostgreSQL: the ledger partition to export, a ledger of its own "
            "(required when the store has several)",
        )

    def run(args: argparse.Namespace) -> int:
        if command == "show" and args.instance is None:
            if args.ledger is not None and not args.store and Path(args.ledger).is_file():
                # `show demo/marketplace.db`: the ledger is there, the instance is not.
                parser.error(
                    f"which instance? pass its id after the ledger: "
                    f"autonomic audit show {args.ledger} INSTANCE"
                )
            args.ledger, args.instance = None, args.ledger  # `show --store URL INSTANCE`
        if args.store and args.ledger:
            parser.error("give LEDGER or --store, not both")
        location = args.store or args.ledger or store_location(None)
        if location is None:
            parser.error(f"no ledger: pass LEDGER or --store URL, or set {STORE_ENV}")
        if command == "show" and args.instance is None:
            parser.error("the following arguments are required: INSTANCE")
        if not is_postgres_url(location):
            args.ledger = location
            return handler(args)
        try:
            if command == "verify":
                return _verify_store(parser, args, location)
            if command == "export":
                return _export_store(parser, args, location)
            return _show_store(args, location)
        except RuntimeFailure as failure:
            sys.stderr.write(failure_diagnostic(redact(location), failure, STORE_HINT) + "\n")
            return 1

    return run


def _verify_store(parser: argparse.ArgumentParser, args: argparse.Namespace, url: str) -> int:
    from .audit_store import open_audited, verify_store_url

    if args.checkpoint or args.witness:
        parser.error(
            "--checkpoint and --witness apply to a ledger file; a PostgreSQL store keeps "
            "signed roots over its partitions"
        )
    root = _root_of(args)
    if isinstance(root, int):
        return root
    row_key = _row_key_of(args)
    if isinstance(row_key, int):
        return row_key
    with open_audited(url) as store:
        partitions = store.partitions
    report, audit = verify_store_url(url, root)
    if not report.ok:
        print(f"{redact(url)}: seq {report.index}: {report.reason}")
        return 1
    if audit is not None and audit.problem is not None:
        return _audit_problem(redact(url), audit.problem)
    plural = "y" if report.count == 1 else "ies"
    signed = (
        "signed checkpoint or root" if report.checkpoints == 1 else "signed checkpoints and roots"
    )
    print(
        f"verified {report.count} entr{plural} in {partitions} partition"
        f"{'s' if partitions != 1 else ''} (mode {report.mode}, {report.checkpoints} {signed}, "
        f"keys {' -> '.join(report.keys)})"
    )
    if audit is not None:
        print(audit.summary())
    if row_key is not None:
        sealed = _check_postgres_seals(url, args.private_key, row_key)
        if isinstance(sealed, int):
            return sealed
        print(sealed)
    return 0


def _check_postgres_seals(url: str, key_file: str, key: bytes) -> str | int:
    """`_check_seals` for a PostgreSQL store: its rows read in one read-only snapshot."""
    import psycopg

    from .seal_audit import check_row_seals

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
            connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            report = check_row_seals(
                lambda sql, parameters: connection.execute(cast(Any, sql), parameters),
                key,
                meta_table="autonomic_meta",
                mark="%s",
            )
            connection.rollback()
    except RuntimeFailure as failure:
        return _diagnostic(redact(url), failure, PRIVATE_KEY_HINT)
    except psycopg.Error as exc:
        unread = LedgerReadError(f"cannot read the store's rows: {' '.join(str(exc).split())}")
        return _diagnostic(redact(url), unread, STORE_HINT)
    return _seal_outcome(redact(url), key_file, report)


def _export_store(parser: argparse.ArgumentParser, args: argparse.Namespace, url: str) -> int:
    from .audit_store import open_audited, partition_ledger

    with open_audited(url) as store:
        partition = args.partition
        if partition is None:
            if store.partitions > 1:
                parser.error(
                    f"the store's ledger has {store.partitions} partitions: pass --partition P "
                    "(each exports as a ledger of its own)"
                )
            partition = 0
        if not 0 <= partition < store.partitions:
            parser.error(f"--partition must be 0..{store.partitions - 1}")
        entries, checkpoints = partition_ledger(store, partition)
        mode = store.ledger_mode()

        def export(out: IO[str]) -> int:
            return write_jsonl(entries, checkpoints, out, mode=mode)

        if not args.out:
            export(sys.stdout)
            return 0
        try:
            _check_replaceable(Path(args.out), JSONL_FORMAT, "a ledger export")
            count = _write_atomically(Path(args.out), export)
        except RuntimeFailure as failure:
            sys.stderr.write(failure_diagnostic(args.out, failure, OUT_HINT) + "\n")
            return 1
    print(f"exported {count} entries of partition {partition} to {args.out}")
    return 0


def _show_store(args: argparse.Namespace, url: str) -> int:
    from .audit_store import history, open_audited

    with open_audited(url) as store:
        entries = history(store, args.instance)
        record = store.get_flow(args.instance) if entries else None
    if not entries:
        sys.stderr.write(
            failure_diagnostic(
                redact(url),
                InstanceNotInLedger(
                    f"no ledger entry for instance {args.instance!r}",
                    hint="instance ids are case-sensitive",
                ),
                STORE_HINT,
            )
            + "\n"
        )
        return 1
    row = None if record is None else (record.flow, record.instance, record.data)
    notes = _flow_notes(args.instance, entries, row, store=True)
    for entry in entries:
        print(
            f"{_printable(entry.seq):>6}  {format_timestamp(entry.ts_ms)}  "
            f"{_printable(entry.kind):<10}  {_printable(entry.machine)}  "
            f"{_printable(entry.from_state)} -> {_printable(entry.to_state)}  "
            f"{_printable(entry.event)}  {_printable(entry.actor)}"
        )
        if entry.seq in notes:
            print(f"{'':>8}{_printable(notes[entry.seq])}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parsers.


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `keygen` and `audit` to the `autonomic` command."""
    keygen = subparsers.add_parser(
        "keygen",
        help="write an Ed25519 key pair for signing the audit ledger",
        description="Write <key_id>.private.pem (mode 0600), <key_id>.public.json and "
        "<key_id>.public.pem into DIR. DIR must not already hold a private key.",
    )
    keygen.add_argument(
        "directory", metavar="DIR", help="folder for the key pair (created if missing)"
    )
    keygen.add_argument(
        "--valid-from",
        type=_iso_to_ms,
        metavar="ISO",
        help="start of the key's validity window (default: now; UTC unless an offset is given)",
    )
    keygen.add_argument(
        "--retire",
        metavar="PUBLIC_JSON",
        help="rotation: end this older key's window where the new key's begins, and write "
        "the rotation entry (signed by the older key, whose private key sits beside it) into "
        "each --ledger",
    )
    keygen.add_argument(
        "--ledger",
        action="append",
        metavar="STORE",
        help="with --retire: a store whose ledger the older key signs (repeatable)",
    )
    keygen.set_defaults(func=_cmd_keygen, usage_error=keygen.error)

    audit = subparsers.add_parser(
        "audit",
        help="verify, export and read the audit ledger",
        description="Offline tools for the signed, hash-chained audit ledger: in the "
        "runtime's SQLite store or in a JSON Lines export of it.",
    )
    commands = audit.add_subparsers(dest="audit_command", metavar="COMMAND")
    commands.required = True

    verify = commands.add_parser(
        "verify",
        help="check every entry, signature and checkpoint; name the first bad seq",
        description="Check every entry, hash link, signature and checkpoint. Exit 0 printing "
        "the count verified, or 1 naming the first bad sequence index and why.",
    )
    verify.add_argument("ledger", nargs="?", metavar="LEDGER", help=LEDGER_ARG_HELP)
    pinned = verify.add_mutually_exclusive_group(required=True)
    pinned.add_argument(
        "--public-key",
        metavar="FILE",
        help="the root key (.public.json or .public.pem) the ledger's genesis entry must name; "
        "keys rotated in since are introduced by the ledger itself",
    )
    pinned.add_argument(
        "--root",
        metavar="FINGERPRINT",
        help="the root key's fingerprint (64 hex digits, printed by keygen) instead of its file",
    )
    verify.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="a checkpoint kept elsewhere: detects truncation of the ledger's tail",
    )
    verify.add_argument(
        "--witness",
        action="append",
        metavar="FILE",
        help="a witness file the runtime published checkpoints to: checks the ledger against "
        "its newest checkpoint and names how many entries are missing (repeatable)",
    )
    verify.add_argument(
        "--private-key",
        metavar="FILE",
        help="also check every row's seal: the private key (.private.pem, or "
        "its folder) of the runtime that writes the store, the only key the rows' seal key "
        "derives from; after a key rotation, the newest",
    )
    verify.set_defaults(func=with_store(verify, _cmd_verify, "verify"), usage_error=verify.error)

    export = commands.add_parser(
        "export",
        help="write the ledger as JSON Lines",
        description="Write every entry and checkpoint as JSON Lines (verifiable offline). "
        "An existing --out file is replaced only if it is an earlier export.",
    )
    export.add_argument("ledger", nargs="?", metavar="LEDGER", help=LEDGER_ARG_HELP)
    export.add_argument(
        "--out", metavar="FILE", help="write the export to FILE (default: standard output)"
    )
    export.set_defaults(func=with_store(export, _cmd_export, "export"))

    show = commands.add_parser(
        "show",
        help="print one instance's history",
        description="Print the ledger entries of one instance, oldest first (not verified: "
        "run `autonomic audit verify` for that).",
    )
    show.add_argument("ledger", nargs="?", metavar="LEDGER", help=LEDGER_ARG_HELP)
    show.add_argument(
        "instance", nargs="?", metavar="INSTANCE", help="instance id (case-sensitive)"
    )
    show.set_defaults(func=with_store(show, _cmd_show, "show"))

    checkpoint = commands.add_parser(
        "checkpoint",
        help="export the last signed checkpoint, to keep it elsewhere",
        description="Write the ledger's last signed checkpoint (size and head hash) to FILE; "
        "`audit verify --checkpoint FILE` later detects a truncated tail.",
    )
    checkpoint.add_argument(
        "ledger", metavar="LEDGER", help="SQLite store file or JSON Lines export"
    )
    checkpoint.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="checkpoint file to write (replaced only if it is an earlier checkpoint)",
    )
    checkpoint.add_argument(
        "--public-key",
        metavar="FILE",
        help="verify the whole ledger from this root key before exporting",
    )
    checkpoint.set_defaults(func=_cmd_checkpoint)


def main(argv: Sequence[str] | None = None) -> int:
    """The `keygen` and `audit` commands on their own (`python -m autonomic.runtime.audit_cli`)."""
    parser = argparse.ArgumentParser(prog="autonomic", description="Audit ledger tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    register(subparsers)
    args = parser.parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A bug, not bad input: one line and a hint, never a traceback.
        sys.stderr.write(
            f"autonomic: internal error: {printable(type(exc).__name__)}: {printable(exc)}\n"
            "  = hint: this is a bug in autonomic; please report it with the command you ran\n"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
