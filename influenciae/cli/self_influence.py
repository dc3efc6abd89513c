"""``influenciae self-influence``: the self-influence of every training example of a saved model, as a CSV file and
an HTML report."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from influenciae.app.arguments import integer_at_least
from influenciae.app.progress import timed
from influenciae.cli.common import EXIT_OK, _finish_timings, _write_json
from influenciae.cli.options import _add_run_arguments, _add_saved_model_arguments
from influenciae.cli.saved_model import _build_calculator, _describe_setup, _gather, _prepare, _ranking, _score_summary


def _add_self_influence_arguments(parser: argparse.ArgumentParser) -> None:
    _add_saved_model_arguments(parser, pairwise=False)
    group = parser.add_argument_group("ranking")
    group.add_argument(
        "-k", type=integer_at_least(1), default=24, help="examples shown in the report's ranking (default: 24)"
    )
    group.add_argument(
        "--order",
        choices=("descending", "ascending"),
        default="descending",
        help="rank by highest (descending, default) or lowest self-influence",
    )
    _add_run_arguments(parser, default_output="runs/self-influence")


def _run_self_influence(args: argparse.Namespace) -> int:
    from influenciae.app import report

    start = time.perf_counter()
    setup = _prepare(args, command="self-influence")
    calculator = _build_calculator(setup)
    setup.log("computing self-influence")
    with timed(setup.timings, "self_influence"):
        scores = np.asarray(calculator.self_influence(setup.train), dtype=np.float64)
    scan = setup.train_scan
    order = _ranking(scores, args.order)
    ranks = np.empty(scores.size, dtype=np.int64)
    ranks[order] = np.arange(1, scores.size + 1)
    write = report.write_csv(
        setup.output / "self_influence.csv",
        ["index", "score", "label", "predicted", "loss", "rank"],
        (
            [i, float(scores[i]), scan.labels[i], scan.predicted[i], float(scan.losses[i]), int(ranks[i])]
            for i in range(scores.size)
        ),
    )
    shown = order[: min(args.k, scores.size)]
    metrics: dict[str, Any] = {"command": "self-influence", **_describe_setup(setup, calculator)}
    metrics["summary"] = _score_summary(scores, scan.losses)
    metrics["ranking"] = {
        "order": args.order,
        "indices": [int(i) for i in shown],
        "scores": [float(scores[i]) for i in shown],
    }
    setup.log("writing the report")
    with timed(setup.timings, "report"):
        inputs = _gather(setup.train, shown)
        files = report.self_influence_report(
            setup.output, metrics, scores, scan, shown, inputs, title=f"Self-influence ({args.method})"
        )
    metrics["timings_seconds"] = _finish_timings(setup.timings, start)
    metrics["files"] = ["self_influence.csv", *files, "metrics.json"]
    _write_json(setup.output / "metrics.json", metrics)
    summary = metrics["summary"]
    watched = metrics["model"]["num_watched_params"]
    print(
        f"Self-influence of {write} training examples ({args.method}"
        + (f", {watched} watched parameters" if watched else "")
        + f"): min {summary['min']:.4g}, median {summary['median']:.4g}, max {summary['max']:.4g}."
    )
    best = ", ".join(f"#{int(i)} ({scores[i]:.4g})" for i in shown[:5])
    print(f"{'Highest' if args.order == 'descending' else 'Lowest'}: {best}")
    print(f"Results: {setup.output / 'self_influence.csv'}, {setup.output / 'report.html'}")
    return EXIT_OK
