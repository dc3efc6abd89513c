"""Run every benchmark section and write ``docs/benchmarks.md``.

From the repository root::

    make bench    # = .venv/bin/python benchmarks/run_benchmarks.py --output docs/benchmarks.md

A section module lives in this package and exposes ``run(*, repeats: int) -> list[Section]``; list it in
``SECTION_MODULES`` and the report picks it up. Speed is reported as ratios of medians measured in the same
run (DESIGN.md §5), never as absolute timings to assert: the machine changes, the ratios should not. The block
between ``<!-- peers:begin -->`` and ``<!-- peers:end -->`` of the output file, written by ``make bench-peers``
(``benchmarks/peers/run_peers.py``), is carried over unchanged.

``--only NAME ...`` runs the named sections and replaces just them in an existing ``--output`` file (matched by
title, keeping their numbers; a section not yet there is appended after the last numbered one), with their rows of
the targets summary; the header (date, machine, total time) and every other section are kept as they were::

    .venv/bin/python benchmarks/run_benchmarks.py --only language_model --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Section modules, in report order.
SECTION_MODULES = {
    "core": "benchmarks.core",
    "influence": "benchmarks.influence",
    "curvature": "benchmarks.curvature",
    "curvature_query": "benchmarks.curvature_query",
    "distributed": "benchmarks.distributed",
    "language_model": "benchmarks.language_model",
}
COMMAND = ".venv/bin/python benchmarks/run_benchmarks.py --output docs/benchmarks.md"
DEFAULT_REPEATS = 5
MIN_SECONDS = 2.0  # fast comparisons get more rounds, up to MAX_REPEATS
MAX_REPEATS = 50


@dataclass(frozen=True)
class Check:
    """One DESIGN.md §5 target and what this run measured for it.

    Attributes:
        name: What is compared, e.g. ``"per-sample gradients vs eager loop (CNN)"``.
        measured: The measured ratio.
        goal: The target ratio.
        higher_is_better: ``True`` for speed-ups (``measured ≥ goal``), ``False`` for costs
            (``measured ≤ goal``).
    """

    name: str
    measured: float
    goal: float
    higher_is_better: bool

    @classmethod
    def at_least(cls, name: str, measured: float, goal: float) -> Check:
        return cls(name, measured, goal, higher_is_better=True)

    @classmethod
    def at_most(cls, name: str, measured: float, goal: float) -> Check:
        return cls(name, measured, goal, higher_is_better=False)

    @property
    def met(self) -> bool:
        return self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal

    @property
    def target(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {self.goal:g}×"

    @property
    def verdict(self) -> str:
        if self.met:
            return "met"
        factor = self.goal / self.measured if self.higher_is_better else self.measured / self.goal
        return f"**missed** ({factor:.2f}× short)"


@dataclass(frozen=True)
class Section:
    """One table of the report.

    Attributes:
        title: Section heading.
        intro: What is measured and how (markdown).
        columns: Table header.
        rows: Table cells, already formatted.
        notes: Sentences printed under the table (numerical agreement, conclusions).
        checks: The §5 targets this section measures; they also appear in the summary at the top.
    """

    title: str
    intro: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    notes: Sequence[str] = ()
    checks: Sequence[Check] = field(default_factory=tuple)


# ---------------------------------------------------------------------- timing helpers for the sections


def median_times(
    functions: Sequence[Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    min_seconds: float = MIN_SECONDS,
    max_repeats: int = MAX_REPEATS,
) -> list[float]:
    """Median wall time of each of ``functions``, timed round-robin so that they share the machine's state.

    Each function is first called ``warmup`` times untimed (the first call traces its ``tf.function``), then
    the functions are timed in turn, ``repeats`` rounds at least and more while the rounds so far took less
    than ``min_seconds`` (up to ``max_repeats``), so fast calls get more samples. Interleaving keeps the
    ratios fair when other processes load the machine for a while. Each call waits for its result.
    """
    for function in functions:
        for _ in range(warmup):
            _wait(function())
    times: list[list[float]] = [[] for _ in functions]
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - started < min_seconds and rounds < max_repeats):
        for function, samples in zip(functions, times, strict=True):
            start = time.perf_counter()
            _wait(function())
            samples.append(time.perf_counter() - start)
        rounds += 1
    return [statistics.median(samples) for samples in times]


def _wait(result: Any) -> None:
    import tensorflow as tf

    # Reading one value forces pending work on asynchronous devices; on CPU the eager executor is synchronous.
    for tensor in tf.nest.flatten(result):
        if isinstance(tensor, tf.Tensor):
            tf.reshape(tensor, [-1])[:1].numpy()


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def ratio(value: float) -> str:
    return f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- report


def machine_info() -> list[tuple[str, str]]:
    import keras
    import numpy as np
    import tensorflow as tf

    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 0
    devices = ", ".join(sorted({device.device_type for device in tf.config.list_physical_devices()}))
    return [
        (
            "CPU",
            f"{_cpu_model()}: {available} cores available to the process (os.cpu_count() = {os.cpu_count()})",
        ),
        ("Devices seen by TensorFlow", devices),
        ("Python", platform.python_version()),
        ("TensorFlow / Keras / NumPy", f"{tf.__version__} / {keras.__version__} / {np.__version__}"),
        ("OS", platform.platform()),
    ]


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return float("nan")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or "unknown CPU"


def render(
    sections: Sequence[Section],
    *,
    repeats: int,
    elapsed: float,
    started: datetime.datetime,
    load: tuple[float, float],
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench`, i.e. from the repository root:",
        "",
        "```",
        COMMAND,
        "```",
        "",
        "Do not edit this file by hand: rerun the command. Speeds are **ratios of medians measured in this "
        "run**; absolute times depend on the machine. Every time is the median of at least "
        f"{repeats} timed calls (more for fast calls: rounds continue until {MIN_SECONDS:g} s, at most "
        f"{MAX_REPEATS}), after one untimed warm-up call that traces every `tf.function`. The methods "
        "compared in a table row are timed in turn (round-robin), so that a busy machine slows them alike.",
        "",
        "| Run | |",
        "|---|---|",
        f"| Date | {started:%Y-%m-%d %H:%M} UTC |",
        *(f"| {key} | {value} |" for key, value in machine_info()),
        f"| Total benchmark time | {elapsed:.0f} s |",
        f"| Load average (1 min), start / end | {load[0]:.2f} / {load[1]:.2f} |",
        "",
    ]
    checks = [check for section in sections for check in section.checks]
    if checks:
        lines += [
            "## Targets (DESIGN.md §5)",
            "",
            "| Target | Measured | Goal | Verdict |",
            "|---|---:|---:|---|",
        ]
        lines += [f"| {c.name} | {ratio(c.measured)} | {c.target} | {c.verdict} |" for c in checks]
        lines.append("")
    for number, section in enumerate(sections, start=1):
        lines += render_section(number, section)
    return "\n".join(lines).rstrip() + "\n"


def render_section(number: int, section: Section) -> list[str]:
    """The markdown lines of one numbered section, ending with a blank line."""
    lines = [f"## {number}. {section.title}", "", section.intro.strip(), ""]
    lines.append("| " + " | ".join(section.columns) + " |")
    lines.append("|" + "|".join("---" for _ in section.columns) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in section.rows]
    lines.append("")
    for note in section.notes:
        lines += [note, ""]
    return lines


_HEADING = re.compile(r"^## (\d+)\. (.+)$")


def update_sections(previous: str, sections: Sequence[Section]) -> str:
    """``previous`` (a report) with ``sections`` replacing the numbered sections of the same title.

    A section runs from its ``## N. Title`` heading to the next ``## `` heading or ``<!--`` block marker. A title
    not found is appended, numbered after the last numbered section, before the first block marker (or at the
    end). Rows of the targets summary whose target name a section measures are replaced by its checks.
    """
    lines = previous.rstrip("\n").split("\n")
    for section in sections:
        headings = [(index, _HEADING.match(line)) for index, line in enumerate(lines)]
        numbered = [(index, match) for index, match in headings if match is not None]
        same = [(index, match) for index, match in numbered if match.group(2) == section.title]
        if same:
            start, match = same[0]
            stop = next(
                (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ") or lines[i].startswith("<!--")),
                len(lines),
            )
            lines[start:stop] = render_section(int(match.group(1)), section)
        else:
            number = max((int(match.group(1)) for _, match in numbered), default=0) + 1
            at = next((i for i, line in enumerate(lines) if line.startswith("<!--")), len(lines))
            block = render_section(number, section)
            if at == len(lines):
                block = ["", *block[:-1]]
            lines[at:at] = block
        for check in section.checks:
            row = f"| {check.name} | {ratio(check.measured)} | {check.target} | {check.verdict} |"
            lines = [row if line.startswith(f"| {check.name} |") else line for line in lines]
    return "\n".join(lines).rstrip() + "\n"


def run_sections(names: Sequence[str], *, repeats: int) -> list[Section]:
    sections: list[Section] = []
    for name in names:
        log(f"== section {name}")
        module = importlib.import_module(SECTION_MODULES[name])
        sections.extend(module.run(repeats=repeats))
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="markdown file to write (default: print to stdout)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed calls per measurement (≥ 5)")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=sorted(SECTION_MODULES),
        default=list(SECTION_MODULES),
        help="sections to run (default: all)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(SECTION_MODULES),
        help="run these sections and replace only them in the existing --output file (the rest is kept)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 so that the median means something.")
    if args.only:
        if args.output is None or not args.output.is_file():
            parser.error("--only updates an existing report: give --output with a file written by a full run.")
        updated = update_sections(
            args.output.read_text(encoding="utf-8"), run_sections(args.only, repeats=args.repeats)
        )
        args.output.write_text(updated, encoding="utf-8")
        log(f"updated {', '.join(args.only)} in {args.output}")
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    load_at_start = _load_average()
    sections = run_sections(args.sections, repeats=args.repeats)
    elapsed = time.perf_counter() - clock
    load = (load_at_start, _load_average())
    report = render(sections, repeats=args.repeats, elapsed=elapsed, started=started, load=load)
    if args.output is None:
        print(report)
    else:
        from benchmarks.peers.blocks import preserve_block

        # The peer comparison (`make bench-peers`) owns a delimited block of the same file: keep it.
        previous = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(preserve_block(report, previous), encoding="utf-8")
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    # Run as a script (`python benchmarks/run_benchmarks.py`): make the `benchmarks` package importable and
    # run its copy of this module, so that the sections and the harness share one `Section` class.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.run_benchmarks import main as package_main

    raise SystemExit(package_main())
