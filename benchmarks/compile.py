"""Compile benchmark: synthetic machines of n states, timed per stage (parse, check, generate).

Run: `python benchmarks/compile.py [--quick] [--json] [--sizes N ...]`. Each machine has n
states with 5 transitions each (plain rows, `when`/`else` pairs, actions), a timer on every
10th state and a reachable final state; it checks clean, so every stage does its full work.
Sizes up to 20k take the best of 3 runs, larger ones a single run. The baseline (a regex
tokenizing the same text) is measured in the same run, so that numbers from different machines
can be compared through it.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autonomic.compiler.checks import check_machines
from autonomic.compiler.model import Machine
from autonomic.compiler.parser import parse_source, read_source

EVENTS = 20
TRANSITIONS_PER_STATE = 5
DEFAULT_SIZES = (1000, 10_000, 50_000)
QUICK_SIZES = (1000, 10_000)
GROWTH_BASE = 10_000  # t(2n)/t(n) is measured at n = GROWTH_BASE
BEST_OF = 3
BEST_OF_UP_TO = 20_000
GOAL_SECONDS = 2.0
GOAL_RATIO = 2.3
STAGES = ("parse", "check", "generate")

# Roughly what lark's lexer matches: keywords, names, durations, strings, punctuation.
_BASELINE_TOKEN = re.compile(r'[A-Za-z_][A-Za-z0-9_]*|[0-9]+[a-z]+|"[^"\n]*"|->|@allow|[{}(),:.?]')


def synthetic_machine(n: int) -> str:
    """A clean machine of `n` states S0..S{n-1}; S{n-1} is final and every state reaches it
    along the chain S_i -> S_i+1, so the checker has nothing to report."""
    if n < 3:
        raise ValueError("n must be at least 3")
    last = n - 1
    lines = [f'machine Bench{n} "Synthetic machine of {n} states." {{']
    lines.extend(f"  event E{k}" for k in range(EVENTS))
    for i in range(last):
        head = "initial state" if i == 0 else "state"
        doc = f' "State number {i}."' if i % 5 == 0 else ""
        lines.append(f"  {head} S{i}{doc} {{")
        events = [(i + k) % EVENTS for k in range(TRANSITIONS_PER_STATE)]
        targets = [(i + 1 + (k * 7919 + i * 31) % 97) % n for k in range(TRANSITIONS_PER_STATE)]
        targets[0] = i + 1  # the chain that makes every state reach the final one
        for k in range(TRANSITIONS_PER_STATE):
            row = f"    on E{events[k]} -> S{targets[k]}"
            if i % 4 == 1 and k == 3:
                row += f" when ok_{i % 7}"
            elif i % 4 == 1 and k == 4:
                events[4] = events[3]
                row = f"    on E{events[4]} -> S{targets[4]} else"
            if k == 1 and i % 3 == 0:
                row += f" do act_{i % 11}"
            if k == 2 and i % 6 == 0:
                row += f" do act_{i % 5}, act_{5 + i % 6}"
            lines.append(row)
        if i % 10 == 0:
            lines.append(f"    after {1 + i % 23}h -> S{min(i + 2, last)}")
        lines.append("  }")
    lines.append(f'  final state S{last} "The end."')
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- stages


@dataclass
class Timing:
    n: int
    transitions: int
    baseline: float
    stages: dict[str, float | None] = field(default_factory=dict)
    runs: int = 1

    @property
    def total(self) -> float:
        return sum(t for t in self.stages.values() if t is not None)


def _timed(work: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def _generator() -> Callable[[Machine], object] | None:
    """What `autonomic build` does after checking, but drawing SVG (Graphviz's time, not
    ours) and writing files: `render_outputs`, i.e. lower, the formatted module, the DOT and
    Mermaid text, README.md and __init__.py. None if the code generator is absent."""
    try:
        from autonomic.compiler.build import render_outputs
    except ImportError:
        return None

    def generate(machine: Machine) -> object:
        return render_outputs([machine], draw_svg=False)

    return generate


def run_once(path: Path, generate: Callable[[Machine], object] | None) -> dict[str, float | None]:
    gc.collect()
    parse_time, (machine, diagnostics) = _timed(lambda: parse_source(read_source(path)))
    if machine is None or diagnostics:
        raise SystemExit(f"synthetic machine did not parse: {diagnostics[:3]}")
    check_time, findings = _timed(lambda: check_machines([machine]))
    if findings:
        raise SystemExit(f"synthetic machine is not clean: {findings[:3]}")
    stages: dict[str, float | None] = {"parse": parse_time, "check": check_time}
    stages["generate"] = _timed(lambda: generate(machine))[0] if generate is not None else None
    return stages


def baseline(text: str) -> float:
    return min(_timed(lambda: _BASELINE_TOKEN.findall(text))[0] for _ in range(BEST_OF))


def measure(n: int, folder: Path, generate: Callable[[Machine], object] | None) -> Timing:
    text = synthetic_machine(n)
    path = folder / f"bench{n}.fsm"
    path.write_text(text, encoding="utf-8")
    runs = BEST_OF if n <= BEST_OF_UP_TO else 1
    best: dict[str, float | None] = {}
    for _ in range(runs):
        for stage, seconds in run_once(path, generate).items():
            kept = best.get(stage)
            best[stage] = seconds if kept is None or seconds is None else min(kept, seconds)
    transitions = text.count("\n    on ")
    return Timing(n, transitions, baseline(text), best, runs)


# ---------------------------------------------------------------- report


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(after: float | None, before: float | None) -> float | None:
    if after is None or before is None or before <= 0:
        return None
    return after / before


def parser_setup(folder: Path) -> float:
    """The first parse in a process also builds the parser (grammar, LALR table): timed on
    a tiny machine, once, and left out of the per-size numbers."""
    path = folder / "tiny.fsm"
    path.write_text(synthetic_machine(3), encoding="utf-8")
    return _timed(lambda: parse_source(read_source(path)))[0]


def report(
    timings: dict[int, Timing], sizes: list[int], growth: tuple[int, int], setup: float
) -> list[str]:
    lines = [
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{BEST_OF} runs best-of up to {BEST_OF_UP_TO} states, else 1 run; "
        f"building the parser once per process: {setup:.3f} s",
        "",
        "| states | transitions | parse s | check s | generate s | total s | baseline s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(timings):
        t = timings[n]
        cells = [f"{n}", f"{t.transitions}", *(_seconds(t.stages.get(s)) for s in STAGES)]
        cells += [f"{t.total:.3f}", f"{t.baseline:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    small, double = growth
    lines += ["", f"growth t({double})/t({small}), goal < {GOAL_RATIO}:"]
    for stage in (*STAGES, "total", "baseline"):
        ratio = _ratio(_stage(timings[double], stage), _stage(timings[small], stage))
        lines.append(f"  {stage:<9} {'n/a' if ratio is None else f'{ratio:.2f}'}")
    per_state = [
        f"{n}: {1e6 * timings[n].total / n:.1f} us/state" for n in sorted(timings) if n in sizes
    ]
    lines += ["", "total per state: " + ", ".join(per_state)]
    if GROWTH_BASE in timings:
        total = timings[GROWTH_BASE].total
        verdict = "met" if total < GOAL_SECONDS else "missed"
        lines.append(f"goal: {GROWTH_BASE} states in < {GOAL_SECONDS} s: {verdict} ({total:.3f} s)")
    return lines


def _stage(timing: Timing, stage: str) -> float | None:
    if stage == "total":
        return timing.total
    if stage == "baseline":
        return timing.baseline
    return timing.stages.get(stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="sizes 1000 and 10000 only")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--sizes", type=int, nargs="+", help="state counts to time")
    args = parser.parse_args(argv)
    sizes = list(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    growth = (GROWTH_BASE, 2 * GROWTH_BASE)
    generate = _generator()
    if generate is None:
        print("generate: n/a (compiler.codegen is not present)")
    timings: dict[int, Timing] = {}
    with tempfile.TemporaryDirectory() as tmp:
        setup = parser_setup(Path(tmp))
        for n in sorted({*sizes, *growth}):
            timings[n] = measure(n, Path(tmp), generate)
            print(f"measured {n} states", file=sys.stderr, flush=True)
    for line in report(timings, sizes, growth, setup):
        print(line)
    if args.json:
        small, double = growth
        summary = {
            "parser_setup": setup,
            "sizes": {
                str(n): {
                    "transitions": t.transitions,
                    **{s: t.stages.get(s) for s in STAGES},
                    "total": t.total,
                    "baseline": t.baseline,
                    "runs": t.runs,
                }
                for n, t in sorted(timings.items())
            },
            "growth": {
                "n": small,
                **{
                    s: _ratio(_stage(timings[double], s), _stage(timings[small], s))
                    for s in (*STAGES, "total", "baseline")
                },
            },
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
