"""The `autonomic` command: argument parsing and exit codes only.

Exit codes: 0 ok; 1 findings, a failed check or verification, or bad input (a diagnostic
`path:line:col: CODE [error] message` with a hint); 2 usage (argparse); 70 an internal error,
that is a bug in autonomic (one line and a hint to report it, never a traceback); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
EXIT_INTERNAL = 70  # EX_SOFTWARE in sysexits.h
EXIT_INTERRUPTED = 130

MIGRATION = "E170"
# Problems with a command's arguments rather than with a machine file. They are not in
# errors.CODES (those are the checker's findings, listed as SARIF rules).
OUTPUT_UNWRITABLE = "E006"
NO_SUCH_MACHINE = "E007"

# What `autonomic build` writes first into README.md and __init__.py: an output folder that
# holds these files without these beginnings was not written by autonomic, so it is left alone.
GENERATED_MARKERS = {
    "README.md": b"# Generated governors",
    "__init__.py": b'"""Generated governor modules',
}
IGNORED_IN_OUTPUT = frozenset({"py.typed", "__pycache__"})
MAX_INTERNAL_MESSAGE = 300
TRACEBACK_VARIABLE = "AUTONOMIC_TRACEBACK"

Handler = Callable[[argparse.Namespace], int]


def _count(number: int, word: str) -> str:
    """`1 machine`, `2 machines`, `0 files`."""
    return f"{number} {word}" if number == 1 else f"{number} {word}s"


class CommandProblem(Exception):
    """A command's argument cannot be used: reported as a diagnostic, exit 1."""

    def __init__(self, where: str | os.PathLike[str], code: str, message: str, hint: str) -> None:
        super().__init__(message)
        self.where, self.code, self.message, self.hint = str(where), code, message, hint

    def render(self) -> str:
        from .errors import Diagnostic, Severity, SourceSpan, format_text

        diagnostic = Diagnostic.model_construct(
            code=self.code,
            severity=Severity.ERROR,
            message=self.message,
            span=SourceSpan.point(self.where),
            hint=self.hint,
        )
        return format_text(diagnostic, None)


# ---------------------------------------------------------------------------------------------
# Writing outputs without ever damaging what is there.


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def write_output(
    path: str, data: bytes, inputs: Sequence[str | Path] = (), *, allow_machine: bool = False
) -> None:
    """Write a report or diagram to `path` atomically; a machine file is never overwritten
    (except by `fmt`, with `allow_machine`).

    A special file (/dev/stdout, a FIFO) is written in place: replacing it would remove it.
    """
    target = Path(path)
    if target.is_dir():
        raise CommandProblem(
            path, OUTPUT_UNWRITABLE, "is a directory", "pass the path of a file to write"
        )
    folder = target.parent
    if not folder.is_dir():
        raise CommandProblem(
            path,
            OUTPUT_UNWRITABLE,
            f"cannot write here: folder {folder} does not exist",
            "create the folder first, or pass another path",
        )
    if (target.suffix == ".fsm" and not allow_machine) or any(
        _same_file(target, Path(i)) for i in inputs
    ):
        raise CommandProblem(
            path,
            OUTPUT_UNWRITABLE,
            "refusing to write the output over an input or into a .fsm machine file",
            "pass another output file",
        )
    try:
        if target.exists() and not stat.S_ISREG(target.stat().st_mode):
            with target.open("wb") as handle:
                handle.write(data)
            return
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
    except OSError as exc:
        raise CommandProblem(
            path,
            OUTPUT_UNWRITABLE,
            f"cannot write: {exc.strerror or exc}",
            "check the path, its permissions and the free space",
        ) from None


def _emit(text: str, output: str | None, inputs: Sequence[str | Path] = ()) -> None:
    text = text if text.endswith("\n") else text + "\n"
    if output:
        # As on stdout: a path given as undecodable bytes is written escaped, never a crash.
        write_output(output, text.encode("utf-8", "backslashreplace"), inputs)
    else:
        sys.stdout.write(text)


def _check_build_folder(out: Path) -> None:
    """Refuse an output folder that holds files autonomic did not write (a project root, a
    folder of notes): `build` would overwrite its README.md and __init__.py."""
    if out.exists() and not out.is_dir():
        raise CommandProblem(
            out,
            OUTPUT_UNWRITABLE,
            "is a file, not a folder",
            "pass --out a folder for the generated modules (default: generated)",
        )
    if not out.is_dir():
        return
    try:
        entries = [
            entry
            for entry in out.iterdir()
            if not entry.name.startswith(".") and entry.name not in IGNORED_IN_OUTPUT
        ]
    except OSError as exc:
        raise CommandProblem(
            out,
            OUTPUT_UNWRITABLE,
            f"cannot list the folder: {exc.strerror or exc}",
            "check its permissions",
        ) from None
    if not entries:
        return
    generated = False
    for name, marker in GENERATED_MARKERS.items():
        file = out / name
        if not file.exists():
            continue
        try:
            with file.open("rb") as handle:
                head = handle.read(len(marker))
        except OSError:
            head = b""
        if head != marker:
            raise CommandProblem(
                file,
                OUTPUT_UNWRITABLE,
                "was not written by `autonomic build`; refusing to overwrite it",
                "pass --out a new folder, or the folder an earlier build wrote",
            )
        generated = True
    if not generated:
        raise CommandProblem(
            out,
            OUTPUT_UNWRITABLE,
            "holds files, but none written by `autonomic build`; refusing to write into it",
            "pass --out a new or empty folder, or the folder an earlier build wrote",
        )


def _check_build_inputs(paths: Sequence[str]) -> None:
    """A folder without machine files would build an empty index over the generated modules
    (the checker only warns, W207): refuse before anything is written."""
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            continue
        found = any(
            not any(part.startswith(".") for part in file.relative_to(folder).parts)
            for file in folder.rglob("*.fsm")
        )
        if not found:
            raise CommandProblem(
                path,
                NO_SUCH_MACHINE,
                "holds no .fsm files: nothing to build",
                "pass the folder of the machine files (default: machines)",
            )


# ---------------------------------------------------------------------------------------------
# Commands.


def _cmd_check(args: argparse.Namespace) -> int:
    from .checks import check_paths
    from .report import render_json, render_sarif, render_text

    paths = [_machine_path(p) for p in args.paths] if args.explain else args.paths
    report = check_paths(paths)
    if args.format == "text":
        text = render_text(report, colour=_colour(args, None if args.output else sys.stdout))
        if args.explain and not report.errors():
            text = _explanations(report) + "\n" + text
    else:
        text = {"json": render_json, "sarif": render_sarif}[args.format](report)
    _emit(text, args.output, paths)
    return EXIT_FINDINGS if report.failed(strict=args.strict) else EXIT_OK


def _machine_path(arg: str) -> str:
    """`--explain Billing`: a name that is no path is looked up in machines/ by module."""
    from .model import snake_case

    if os.path.exists(arg) or arg.endswith(".fsm") or os.sep in arg or "/" in arg:
        return arg
    candidate = Path("machines") / f"{snake_case(arg)}.fsm"
    return str(candidate) if candidate.exists() else arg


def _explanations(report: Any) -> str:
    from .explain import explain, render_explanation
    from .lower import lower

    return "\n".join(
        render_explanation(explain(lower(machine, others=None)), machine.path)
        for machine in report.machines
    )


def _paths_after_dashes(argv: list[str]) -> list[str]:
    """`autonomic diff main -- machines/`: what follows `--` is the paths to compare, which
    argparse would otherwise mix into the revisions."""
    if argv[:1] == ["diff"] and "--" in argv:
        cut = argv.index("--")
        return [*argv[:cut], "--paths", *argv[cut + 1 :]] if argv[cut + 1 :] else argv[:cut]
    return argv


def _git(args: Sequence[str], where: str) -> bytes:
    import subprocess

    try:
        done = subprocess.run(["git", *args], capture_output=True, check=False, timeout=120)
    except OSError as exc:
        raise CommandProblem(
            where, NO_SUCH_MACHINE, f"cannot run git: {exc}", "install git"
        ) from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise CommandProblem(
            where,
            NO_SUCH_MACHINE,
            f"is neither a file nor a git revision ({message[-1] if message else 'git failed'})",
            "pass two .fsm files or folders, or a revision: `autonomic diff main -- machines/`",
        )
    return done.stdout


def _version_at(revision: str, paths: Sequence[str]) -> tuple[list[Any], list[Any]]:
    """The machines and flows of the .fsm files under `paths` at a git revision."""
    from .parser import decode_source, parse_file

    listing = _git(
        ["ls-tree", "-r", "-z", "--name-only", "--full-name", revision, "--", *paths], revision
    )
    machines: list[Any] = []
    flows: list[Any] = []
    for name in sorted(n for n in listing.decode("utf-8", "surrogateescape").split("\0") if n):
        if not name.endswith(".fsm"):
            continue
        data = _git(["show", f"{revision}:{name}"], revision)
        parsed = parse_file(decode_source(f"{revision}:{name}", data))
        if parsed.machine is not None:
            machines.append(parsed.machine)
        flows.extend(parsed.flows)
    return machines, flows


def _version_on_disk(paths: Sequence[str]) -> tuple[list[Any], list[Any]]:
    """The machines and flows of the .fsm files under `paths`, read as `_version_at` reads a
    revision: parsed, not checked (a diff compares models; `check` judges them)."""
    from .checks import expand_paths
    from .errors import Severity, format_text
    from .parser import parse_file, read_source

    files, findings = expand_paths(paths)
    machines: list[Any] = []
    flows: list[Any] = []
    problems = [format_text(d, None) for d in findings if d.severity is Severity.ERROR]
    for file in files:
        source = read_source(file)
        parsed = parse_file(source)
        errors = [d for d in parsed.diagnostics if d.severity is Severity.ERROR]
        problems.extend(format_text(d, source.lines) for d in errors)
        if parsed.machine is not None and not errors:
            machines.append(parsed.machine)
        flows.extend(parsed.flows)
    if problems:
        sys.stderr.write("\n\n".join(problems) + "\n")
        raise CommandProblem(
            paths[0], NO_SUCH_MACHINE, "does not parse: fix it to compare", "run `autonomic check`"
        )
    return machines, flows


def _cmd_diff(args: argparse.Namespace) -> int:
    """The semantic change between two versions, and (--store) whether live data survives it."""
    from .diff import (
        compare,
        migration_problems,
        render_diff_dot,
        render_diff_mermaid,
        render_markdown,
    )
    from .diff import render_text as render_diff_text

    specs = list(args.versions)
    if len(specs) not in (1, 2):
        raise CommandProblem(
            "autonomic diff",
            NO_SUCH_MACHINE,
            "needs OLD NEW (files or folders) or REVISION [REVISION] [-- PATH...]",
            "for example `autonomic diff main -- machines/`",
        )
    if len(specs) == 2 and all(os.path.exists(spec) for spec in specs) and not args.paths:
        old_machines, old_flows = _version_on_disk([specs[0]])
        new_machines, new_flows = _version_on_disk([specs[1]])
    else:
        paths = args.paths or ["machines"]
        old_machines, old_flows = _version_at(specs[0], paths)
        if len(specs) == 2:
            new_machines, new_flows = _version_at(specs[1], paths)
        else:
            new_machines, new_flows = _version_on_disk(paths)
    difference = compare(old_machines, new_machines, old_flows, new_flows)
    if args.format in ("dot", "mermaid"):
        render = render_diff_dot if args.format == "dot" else render_diff_mermaid
        chosen = [
            m
            for m in difference.machines
            if (m.changes if args.machine is None else m.name == args.machine)
        ]
        if args.machine is not None and not chosen:
            raise CommandProblem(
                args.machine, NO_SUCH_MACHINE, "no such machine in either version", "check the name"
            )
        text = "\n".join(render(machine) for machine in chosen)
    elif args.format == "markdown":
        text = render_markdown(difference)
    else:
        text = render_diff_text(difference)
    _emit(text, args.output)
    if args.store is None:
        return EXIT_OK
    return _migration_check(difference, args.store, migration_problems)


def _migration_check(difference: Any, store_path: str, check: Any) -> int:
    from autonomic.runtime.store.base import Store
    from autonomic.runtime.store.urls import is_postgres_url, redact

    from .errors import Diagnostic, Severity, SourceSpan, format_text

    store: Store
    shown = redact(store_path).removeprefix("sqlite:///")
    if is_postgres_url(store_path):
        from autonomic.runtime.errors import StoreConfigError
        from autonomic.runtime.store.postgres import PostgresStore

        try:
            store = PostgresStore(store_path, create=False, pool_size=2)
        except StoreConfigError as failure:
            hint = failure.hint or "pass the URL of the runtime's PostgreSQL store"
            raise CommandProblem(redact(store_path), "E003", failure.message, hint) from None
    else:
        from autonomic.runtime.store.sqlite import SQLiteStore

        path = store_path.removeprefix("sqlite:///")
        if not Path(path).is_file():
            raise CommandProblem(store_path, "E003", "no such store file", "pass the SQLite file")
        store = SQLiteStore(path)
    try:
        problems = check(difference, store)
    finally:
        store.close()
    paths = {m.name: m.path for m in difference.machines}
    for problem in problems:
        diagnostic = Diagnostic.model_construct(
            code=MIGRATION,
            severity=Severity.ERROR,
            message=problem.message,
            span=SourceSpan.point(paths.get(problem.machine, store_path)),
            hint=problem.hint,
            related=(),
        )
        sys.stderr.write(format_text(diagnostic, None) + "\n")
    if not problems:
        sys.stderr.write(
            f"migration check: no live instance or armed timer of {shown} is stranded\n"
        )
    return EXIT_FINDINGS if problems else EXIT_OK


def _cmd_testgen(args: argparse.Namespace) -> int:
    """Write model-based pytest modules for machines, one file per machine."""
    from .checks import check_paths
    from .lower import lower
    from .report import render_text
    from .testgen import render_tests

    report = check_paths([_machine_path(m) for m in args.machines])
    if report.errors():
        sys.stderr.write(render_text(report))
        return EXIT_FINDINGS
    if not report.machines:
        raise CommandProblem(
            args.machines[0], NO_SUCH_MACHINE, "holds no machine", "pass a .fsm file or a name"
        )
    if args.coverage:
        return _transition_coverage(report.machines, args.tests)
    out = Path(args.out)
    if not out.is_dir():
        raise CommandProblem(out, OUTPUT_UNWRITABLE, "is not a folder", "create it first")
    for machine in report.machines:
        tables = lower(machine, others=None)
        target = out / f"test_{tables.module}_model.py"
        write_output(str(target), render_tests(tables).encode("utf-8"), args.machines)
        print(f"wrote {target}")
    return EXIT_OK


def _transition_coverage(machines: Sequence[Any], tests: Sequence[str]) -> int:
    """Run the project's tests with the transition recorder; report what they exercised."""
    import json
    import subprocess
    import tempfile

    from .lower import lower
    from .testgen import coverage_report

    with tempfile.TemporaryDirectory() as folder:
        record = Path(folder) / "taken.json"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["-p", "autonomic.runtime.transition_coverage", *tests]
        environment = {**os.environ, "AUTONOMIC_TRANSITION_COVERAGE": str(record)}
        done = subprocess.run(command, env=environment, capture_output=True, text=True)
        if not record.exists():
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise CommandProblem(
                " ".join(tests), "E003", "the tests did not run", "check the test paths"
            )
        taken = json.loads(record.read_text(encoding="utf-8"))
    if done.returncode != 0:
        sys.stderr.write(f"note: the tests exited with status {done.returncode}\n")
    sys.stdout.write(coverage_report([lower(m, others=None) for m in machines], taken))
    return EXIT_OK


def _cmd_fmt(args: argparse.Namespace) -> int:
    """Format machine files in place, or (--check) list the ones that are not formatted."""
    from .checks import expand_paths
    from .errors import format_text
    from .fmt import format_source

    files, findings = expand_paths(args.paths)
    problems = [format_text(d, None) for d in findings]
    unformatted: list[str] = []
    for file in files:
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise CommandProblem(
                file, "E003", f"cannot read: {exc.strerror or exc}", "check the path"
            ) from None
        result = format_source(file, data)
        if result.text is None:
            problems.extend(format_text(d, None) for d in result.diagnostics)
            continue
        if not result.changed:
            continue
        unformatted.append(file)
        if not args.check:
            write_output(file, result.text.encode("utf-8"), allow_machine=True)
    if problems:
        sys.stderr.write("\n".join(problems) + "\n")
    if args.check:
        for file in unformatted:
            print(f"would reformat {file}")
        state = f"{len(unformatted)} of {len(files)} files would be reformatted"
        print(state if unformatted else f"{len(files)} files already formatted")
        return EXIT_FINDINGS if unformatted or problems else EXIT_OK
    print(f"{len(unformatted)} reformatted, {len(files) - len(unformatted)} unchanged")
    return EXIT_FINDINGS if problems else EXIT_OK


def _colour(args: argparse.Namespace, stream: object | None) -> bool:
    """--color always/never, or auto: a terminal without NO_COLOR (a file never)."""
    from .errors import colour_wanted

    choice = getattr(args, "color", "auto")
    if choice != "auto":
        return bool(choice == "always")
    return stream is not None and colour_wanted(stream, os.environ)


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import build
    from .report import render_text

    out = Path(args.out)
    if not args.check:
        _check_build_inputs(args.paths)
        _check_build_folder(out)
    result = build(args.paths, out, check_only=args.check, svg=not args.no_svg, strict=args.strict)
    if result.report.failed(strict=args.strict):
        sys.stderr.write(render_text(result.report))
        return EXIT_FINDINGS
    for notice in result.notices:
        sys.stderr.write(f"notice: {notice}\n")
    if args.check:
        problems = [
            *(f"stale: {p}" for p in result.stale),
            *(f"missing: {p}" for p in result.missing),
            *(f"orphaned: {p}" for p in result.orphaned),
        ]
        if problems:
            sys.stderr.write("\n".join(problems) + "\n")
            sys.stderr.write(
                f"{args.out} is out of date with {', '.join(map(str, args.paths))}: "
                "run `autonomic build` and commit the result\n"
            )
            return EXIT_FINDINGS
        print(f"{args.out} is up to date ({_built(result.report)})")
        return EXIT_OK
    changed = len(result.written)
    print(f"built {_built(result.report)} into {args.out} ({_count(changed, 'file')} written)")
    return EXIT_OK


def _built(report: Any) -> str:
    """`7 machines and 5 flows`: what a build generates from."""
    machines = _count(len(report.machines), "machine")
    return f"{machines} and {_count(len(report.flows), 'flow')}" if report.flows else machines


def _cmd_graph(args: argparse.Namespace) -> int:
    from .checks import check_paths
    from .diagram import (
        DiagramToolFailed,
        DiagramToolMissing,
        UnknownView,
        render_diagram,
        render_svg,
    )
    from .errors import did_you_mean
    from .flow_checks import flow_module
    from .flow_codegen import flow_dot, flow_mermaid
    from .report import render_text

    by_path = args.machine.endswith(".fsm") or "/" in args.machine or os.sep in args.machine
    where = args.machine if by_path else args.machines
    report = check_paths([where])
    if by_path:
        wanted = report.machines
        flows = [] if wanted or len(report.flows) != 1 else report.flows
    else:
        wanted = [m for m in report.machines if args.machine in (m.name.value, Path(m.path).stem)]
        flows = [f for f in report.flows if args.machine in (f.name.value, flow_module(f))]
    if report.errors():
        sys.stderr.write(render_text(report))
        return EXIT_FINDINGS
    if not wanted and not flows:
        names = sorted(m.name.value for m in report.machines)
        flow_names = sorted(f.name.value for f in report.flows)
        if by_path:
            message = "holds no machine" if not flow_names else "holds several flows, no machine"
            hint = (
                f"name one: autonomic graph {flow_names[0]} (flows: {', '.join(flow_names)})"
                if flow_names
                else "pass a .fsm file that holds one machine or one flow"
            )
        else:
            message = f"no machine or flow named '{args.machine}'"
            hint = did_you_mean(args.machine, [*names, *flow_names]) or (
                f"machines here: {', '.join(names)}; flows: {', '.join(flow_names) or 'none'}"
                if names
                else "pass --machines the folder of the .fsm files"
            )
        raise CommandProblem(where, NO_SUCH_MACHINE, message, hint)
    path = wanted[0].path if wanted else flows[0].path
    try:
        if wanted:
            rendered: str | bytes = render_diagram(wanted[0], args.format, args.view)
        elif args.view:
            raise CommandProblem(
                path,
                NO_SUCH_MACHINE,
                f"flow '{flows[0].name.value}' has no view '{args.view}'",
                "a flow is drawn whole: leave out --view",
            )
        elif args.format == "mermaid":
            rendered = flow_mermaid(flows[0])
        else:
            dot = flow_dot(flows[0])
            rendered = render_svg(dot) if args.format == "svg" else dot
    except UnknownView as exc:
        choices = ["overview", *exc.known] if exc.known else []
        raise CommandProblem(
            wanted[0].path,
            NO_SUCH_MACHINE,
            f"machine '{wanted[0].name.value}' has no view '{exc.view}'",
            did_you_mean(exc.view, choices)
            or (
                f"views: {', '.join(choices)}"
                if choices
                else "it has no groups: declare `group NAME { STATE, ... }` to draw one"
            ),
        ) from None
    except (DiagramToolMissing, DiagramToolFailed) as exc:
        raise CommandProblem(
            path,
            OUTPUT_UNWRITABLE,
            f"cannot draw SVG: {exc}",
            "install graphviz, or use --format dot or --format mermaid",
        ) from None
    if isinstance(rendered, bytes):
        if args.output:
            write_output(args.output, rendered, [where])
        else:
            sys.stdout.flush()
            sys.stdout.buffer.write(rendered)
            sys.stdout.buffer.flush()
        return EXIT_OK
    _emit(rendered, args.output, [where])
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# The parser.


# The commands build_parser defines itself; the others come from the runtime.
COMPILER_COMMANDS = frozenset({"check", "fmt", "diff", "testgen", "build", "graph"})


def build_parser(runtime: bool = True) -> argparse.ArgumentParser:
    """The whole command line; without `runtime`, only the compiler's commands (whose
    runtime modules, the ledger, keys and stores, need not be imported to check a file)."""
    parser = argparse.ArgumentParser(
        prog="autonomic",
        description="Write, check, generate and run governor state machines.",
        epilog="Exit codes: 0 ok, 1 findings or bad input, 2 usage, 70 internal error.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"autonomic {__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    check = sub.add_parser(
        "check",
        help="check machine files and report every problem",
        description="Read, parse and check machine files; report every finding with its "
        "position, the source line and a hint. Exit 1 on errors (with --strict, on warnings).",
    )
    check.add_argument("paths", nargs="+", metavar="PATH", help=".fsm files or folders of them")
    check.add_argument("--strict", action="store_true", help="warnings fail too")
    check.add_argument(
        "--format",
        choices=("text", "json", "sarif"),
        default="text",
        help="report format: text (default), json, or sarif (SARIF 2.1.0 for review tools)",
    )
    check.add_argument(
        "--output", "-o", metavar="FILE", help="write the report to FILE (default: stdout)"
    )
    check.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour text findings: auto (default: on a terminal, unless NO_COLOR is set)",
    )
    check.add_argument(
        "--explain",
        action="store_true",
        help="also print, per machine, the longest time an instance can stay without an "
        "outside event, and the states only an outside event can leave (PATH may be a "
        "machine name)",
    )
    check.set_defaults(func=_cmd_check)

    fmt = sub.add_parser(
        "fmt",
        help="lay machine files out canonically (comments kept)",
        description="Rewrite machine files in the canonical layout; the machines they hold "
        "do not change. With --check, write nothing and exit 1 if a file would change.",
    )
    fmt.add_argument("paths", nargs="+", metavar="PATH", help=".fsm files or folders of them")
    fmt.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is not formatted"
    )
    fmt.set_defaults(func=_cmd_fmt)

    diff = sub.add_parser(
        "diff",
        help="the semantic change between two versions of machine files",
        description="Compare two .fsm files or folders (OLD NEW), or the machines at a git "
        "revision with the working tree (REV -- PATH...) or another revision (REV REV -- "
        "PATH...): states, events, fields, transitions, guards, timers, ladder steps, "
        "ignores and flows added, removed or changed, renames detected. With --store, also "
        "fail (exit 1) if live instances or armed timers in the store would be stranded.",
    )
    diff.add_argument("versions", nargs="+", metavar="OLD|REV", help="two paths, or revisions")
    diff.add_argument(
        "--paths",
        nargs="+",
        default=None,
        metavar="PATH",
        help="with revisions: the files and folders to compare (default: machines); the same "
        "as writing them after `--`",
    )
    diff.add_argument(
        "--format",
        choices=("text", "markdown", "dot", "mermaid"),
        default="text",
        help="text (default), markdown (a pull request comment), or dot/mermaid diagrams with "
        "added parts green, removed red and changed amber",
    )
    diff.add_argument("--machine", default=None, help="the machine to draw (dot/mermaid)")
    diff.add_argument(
        "--store",
        default=None,
        metavar="STORE",
        help="the runtime's store to check: an SQLite file or a postgresql:// URL",
    )
    diff.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: stdout)")
    diff.set_defaults(func=_cmd_diff)

    testgen = sub.add_parser(
        "testgen",
        help="write model-based pytest tests of generated governors",
        description="For each MACHINE (name or .fsm path), write test_<module>_model.py: one "
        "test per transition, timed exit and rejection, and a hypothesis state machine whose "
        "rules are the machine's events and timers and whose invariants are its rules.",
    )
    testgen.add_argument("machines", nargs="+", metavar="MACHINE", help="names or .fsm paths")
    testgen.add_argument(
        "--out", default="tests", metavar="DIR", help="folder to write into (default: tests)"
    )
    testgen.add_argument(
        "--coverage",
        action="store_true",
        help="write nothing: run the project's tests (--tests) and report which transitions "
        "of each MACHINE they exercise",
    )
    testgen.add_argument(
        "--tests",
        nargs="+",
        default=["tests"],
        metavar="PATH",
        help="tests to run (default: tests)",
    )
    testgen.set_defaults(func=_cmd_testgen)

    build = sub.add_parser(
        "build",
        help="check, then generate Python modules and diagrams",
        description="Check every machine; if clean, write generated/<module>.py, .dot, .mmd "
        "and .svg, an index README.md that shows every diagram, and __init__.py. A machine of "
        "16 or more states in groups is drawn as an overview (<module>.dot, ...) and one "
        "diagram per group (<module>.<group>.dot, ...). Only changed files are written.",
    )
    build.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        default=["machines"],
        help=".fsm files or folders of them (default: machines)",
    )
    build.add_argument(
        "--out",
        default="generated",
        metavar="DIR",
        help="output folder: new, empty, or written by an earlier build (default: generated)",
    )
    build.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if DIR is out of date"
    )
    build.add_argument("--strict", action="store_true", help="warnings fail the build too")
    build.add_argument("--no-svg", action="store_true", help="skip SVG rendering")
    build.set_defaults(func=_cmd_build)

    graph = sub.add_parser(
        "graph",
        help="print one machine's or flow's diagram",
        description="Check one machine or flow and print its diagram as DOT, Mermaid or SVG.",
    )
    graph.add_argument(
        "machine",
        metavar="NAME",
        help="machine or flow name, module name, or .fsm path",
    )
    graph.add_argument(
        "--format",
        choices=("dot", "mermaid", "svg"),
        default="dot",
        help="diagram format (default: dot; svg needs Graphviz)",
    )
    graph.add_argument(
        "--machines",
        default="machines",
        metavar="DIR",
        help="folder to find NAME in (default: machines)",
    )
    graph.add_argument(
        "--view",
        metavar="VIEW",
        help="draw 'overview' (one box per group) or one group's diagram, as `build` draws a "
        "large grouped machine (default: the whole machine)",
    )
    graph.add_argument(
        "--output", "-o", metavar="FILE", help="write the diagram to FILE (default: stdout)"
    )
    graph.set_defaults(func=_cmd_graph)

    if runtime:
        _register_runtime(sub)
    return parser


def _register_runtime(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The runtime owns its commands; the compiler only hosts the one console script.
    from autonomic.runtime import audit_cli, fleet_cli
    from autonomic.runtime import cli as runtime_cli

    audit_cli.register(sub)
    runtime_cli.register(sub)
    fleet_cli.register(sub)


# ---------------------------------------------------------------------------------------------
# Running a command.


def _tolerant_streams() -> None:
    # Started with stdout or stderr closed (`autonomic check x >&-`): Python sets them to None.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives until exit
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    # A path given as undecodable bytes reaches Python as lone surrogates; printing it must
    # not fail with UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) == "strict":
            with contextlib.suppress(Exception):
                reconfigure(errors="backslashreplace")


def _internal_error(exc: BaseException) -> int:
    message = " ".join(str(exc).split())
    if len(message) > MAX_INTERNAL_MESSAGE:
        message = message[:MAX_INTERNAL_MESSAGE] + "..."
    shown = "".join(c if c.isprintable() else "?" for c in f"{type(exc).__name__}: {message}")
    with contextlib.suppress(Exception):
        sys.stderr.write(
            f"autonomic: internal error: {shown}\n"
            f"  = hint: this is a bug in autonomic {__version__}; please report it with the "
            f"command you ran (set {TRACEBACK_VARIABLE}=1 to see the traceback)\n"
        )
    return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; argparse raises SystemExit(2) on usage errors (0 for --help)."""
    _tolerant_streams()
    arguments = _paths_after_dashes(sys.argv[1:] if argv is None else list(argv))
    # A compiler command parses the same without the runtime's commands registered; anything
    # else (--help, a typo, a runtime command) gets the whole command line.
    parser = build_parser(runtime=not (arguments and arguments[0] in COMPILER_COMMANDS))
    if not arguments:
        # A newcomer's first `autonomic`: the commands, not only "COMMAND is required".
        parser.print_help(sys.stderr)
        parser.exit(EXIT_USAGE, "\nautonomic: error: choose a COMMAND (e.g. autonomic build)\n")
    args = parser.parse_args(arguments)
    handler: Handler = args.func
    try:
        return handler(args)
    except CommandProblem as problem:
        sys.stderr.write(problem.render() + "\n")
        return EXIT_FINDINGS
    except BrokenPipeError:
        # `autonomic graph X | head`: stop quietly, like other command-line tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        # The environment failed us (disk full, a file vanished): not a bug, still no traceback.
        where = exc.filename if isinstance(exc.filename, str) else "autonomic"
        io_problem = CommandProblem(
            where,
            "E003",
            f"input/output failed: {exc.strerror or exc}",
            "check the path, its permissions and the free space",
        )
        sys.stderr.write(io_problem.render() + "\n")
        return EXIT_FINDINGS
    except Exception as exc:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        return _internal_error(exc)


if __name__ == "__main__":
    sys.exit(main())
