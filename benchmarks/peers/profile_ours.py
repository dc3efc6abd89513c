"""Profile our side of one peer-comparison job: the cold call, then the warm repeat under cProfile.

The same set-up and calls as ``run_peers.py`` (``ours.setup``, ``ours.compute``), for finding where the time goes::

    .venv/bin/python benchmarks/peers/ours.py prepare --directory /tmp/peers --sizes 1000 --hidden 8 32
    .venv/bin/python benchmarks/peers/profile_ours.py /tmp/peers/problem_h8_n1000.npz cg self --rows 40
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ours  # noqa: E402
import problem as spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", help="a problem file written by `ours.py prepare`")
    parser.add_argument("method", choices=spec.METHODS)
    parser.add_argument("task", choices=spec.TASKS)
    parser.add_argument("--rows", type=int, default=40, help="profile rows to print (0: timings only)")
    parser.add_argument("--repeats", type=int, default=0, help="warm repeats timed without the profiler (median)")
    args = parser.parse_args(argv)
    problem = spec.load_problem(args.problem)
    job = spec.Job(args.problem, args.method, args.task, "/dev/null", None)
    state = ours.setup(problem, job)
    start = time.perf_counter()
    ours.compute(state, job)
    print(f"cold {time.perf_counter() - start:.3f} s")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours.compute(state, job)
        times.append(time.perf_counter() - start)
    if times:
        print(f"warm median of {len(times)}: {statistics.median(times):.3f} s (min {min(times):.3f} s)")
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    ours.compute(state, job)
    profile.disable()
    print(f"warm {time.perf_counter() - start:.3f} s")
    if args.rows:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
