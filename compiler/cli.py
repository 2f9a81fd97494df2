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
from .errors import Diagnostic, Severity, SourceSpan, did_you_mean, format_text

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
EXIT_INTERNAL = 70  # EX_SOFTWARE in sysexits.h
EXIT_INTERRUPTED = 130

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


def _cmd_fmt(args: argparse.Namespace) -> int:
    """Format machine files in place, or (--check) list the ones that are not formatted."""
    from .checks import expand_paths
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
        print(f"{args.out} is up to date ({_count(len(result.report.machines), 'machine')})")
        return EXIT_OK
    changed = len(result.written)
    print(
        f"built {_count(len(result.report.machines), 'machine')} into {args.out} "
        f"({_count(changed, 'file')} written)"
    )
    return EXIT_OK


def _cmd_graph(args: argparse.Namespace) -> int:
    from .checks import check_paths
    from .diagram import DiagramToolFailed, DiagramToolMissing, render_diagram
    from .report import render_text

    by_path = args.machine.endswith(".fsm") or "/" in args.machine or os.sep in args.machine
    where = args.machine if by_path else args.machines
    report = check_paths([where])
    if by_path:
        wanted = report.machines
    else:
        wanted = [m for m in report.machines if args.machine in (m.name.value, Path(m.path).stem)]
    if report.errors():
        sys.stderr.write(render_text(report))
        return EXIT_FINDINGS
    if not wanted:
        names = sorted(m.name.value for m in report.machines)
        if by_path:
            message, hint = "holds no machine", "pass a .fsm file that holds one machine"
        else:
            message = f"no machine named '{args.machine}'"
            hint = did_you_mean(args.machine, names) or (
                f"machines here: {', '.join(names)}"
                if names
                else "pass --machines the folder of the .fsm files"
            )
        raise CommandProblem(where, NO_SUCH_MACHINE, message, hint)
    try:
        rendered = render_diagram(wanted[0], args.format)
    except (DiagramToolMissing, DiagramToolFailed) as exc:
        raise CommandProblem(
            wanted[0].path,
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


def build_parser() -> argparse.ArgumentParser:
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

    build = sub.add_parser(
        "build",
        help="check, then generate Python modules and diagrams",
        description="Check every machine; if clean, write generated/<module>.py, .dot, .mmd "
        "and .svg, an index README.md and __init__.py. Only changed files are written.",
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
        help="print one machine's diagram",
        description="Check one machine and print its diagram as DOT, Mermaid or SVG.",
    )
    graph.add_argument("machine", metavar="MACHINE", help="machine name, module name or .fsm path")
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
        help="folder to find MACHINE in by name (default: machines)",
    )
    graph.add_argument(
        "--output", "-o", metavar="FILE", help="write the diagram to FILE (default: stdout)"
    )
    graph.set_defaults(func=_cmd_graph)

    _register_runtime(sub)
    return parser


def _register_runtime(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The runtime owns its commands; the compiler only hosts the one console script.
    from autonomic.runtime import audit_cli
    from autonomic.runtime import cli as runtime_cli

    audit_cli.register(sub)
    runtime_cli.register(sub)


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
    parser = build_parser()
    args = parser.parse_args(argv)
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
