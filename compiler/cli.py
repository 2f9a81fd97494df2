"""The `autonomic` command: argument parsing and exit codes only (0 ok, 1 findings, 2 usage)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


def _cmd_check(args: argparse.Namespace) -> int:
    from .checks import check_paths
    from .report import render_json, render_sarif, render_text

    report = check_paths(args.paths)
    renderers = {"text": render_text, "json": render_json, "sarif": render_sarif}
    text = renderers[args.format](report)
    _emit(text, args.output)
    return EXIT_FINDINGS if report.failed(strict=args.strict) else EXIT_OK


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import build
    from .report import render_text

    result = build(
        args.paths, Path(args.out), check_only=args.check, svg=not args.no_svg, strict=args.strict
    )
    if result.report.failed(strict=args.strict):
        sys.stderr.write(render_text(result.report) + "\n")
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
        print(f"{args.out} is up to date ({len(result.report.machines)} machines)")
        return EXIT_OK
    changed = len(result.written)
    print(
        f"built {len(result.report.machines)} machines into {args.out} "
        f"({changed} file{'s' if changed != 1 else ''} written)"
    )
    return EXIT_OK


def _cmd_graph(args: argparse.Namespace) -> int:
    from .checks import check_paths
    from .diagram import render_diagram
    from .report import render_text

    target = Path(args.machine)
    paths: list[str | Path] = [target] if target.suffix == ".fsm" else [Path(args.machines)]
    report = check_paths(paths)
    wanted = [
        m
        for m in report.machines
        if target.suffix == ".fsm" or args.machine in (m.name.value, Path(m.path).stem)
    ]
    if report.errors() or not wanted:
        if not wanted and not report.errors():
            names = sorted(m.name.value for m in report.machines)
            sys.stderr.write(
                f"{args.machines}:1:1: E003 no machine named '{args.machine}'\n"
                f"  = hint: machines here: {', '.join(names) or 'none'}\n"
            )
        else:
            sys.stderr.write(render_text(report) + "\n")
        return EXIT_FINDINGS
    rendered = render_diagram(wanted[0], args.format)
    if isinstance(rendered, bytes):
        if args.output:
            Path(args.output).write_bytes(rendered)
        else:
            sys.stdout.buffer.write(rendered)
        return EXIT_OK
    _emit(rendered, args.output)
    return EXIT_OK


def _emit(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autonomic",
        description="Write, check, generate and run governor state machines.",
    )
    parser.add_argument("--version", action="version", version=f"autonomic {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    check = sub.add_parser("check", help="check machine files and report every problem")
    check.add_argument("paths", nargs="+", metavar="PATH", help=".fsm files or folders of them")
    check.add_argument("--strict", action="store_true", help="warnings fail too")
    check.add_argument("--format", choices=("text", "json", "sarif"), default="text")
    check.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE")
    check.set_defaults(func=_cmd_check)

    build = sub.add_parser("build", help="check, then generate Python modules and diagrams")
    build.add_argument(
        "paths", nargs="*", metavar="PATH", default=["machines"], help="default: machines"
    )
    build.add_argument("--out", default="generated", metavar="DIR", help="default: generated")
    build.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if DIR is out of date"
    )
    build.add_argument("--strict", action="store_true", help="warnings fail the build too")
    build.add_argument("--no-svg", action="store_true", help="skip SVG rendering")
    build.set_defaults(func=_cmd_build)

    graph = sub.add_parser("graph", help="print one machine's diagram")
    graph.add_argument("machine", metavar="MACHINE", help="machine name, module name or .fsm path")
    graph.add_argument("--format", choices=("dot", "mermaid", "svg"), default="dot")
    graph.add_argument("--machines", default="machines", metavar="DIR", help="default: machines")
    graph.add_argument("--output", "-o", metavar="FILE")
    graph.set_defaults(func=_cmd_graph)

    _register_runtime(sub)
    return parser


def _register_runtime(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The runtime owns its commands; the compiler only hosts the one console script.
    from autonomic.runtime import audit_cli
    from autonomic.runtime import cli as runtime_cli

    audit_cli.register(sub)
    runtime_cli.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except BrokenPipeError:
        # `autonomic graph X | head`: stop quietly, like other command-line tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        where = exc.filename or "autonomic"
        sys.stderr.write(
            f"{where}:1:1: E003 {exc.strerror or exc}\n  = hint: check the path and its permissions\n"
        )
        return EXIT_FINDINGS


if __name__ == "__main__":
    sys.exit(main())
