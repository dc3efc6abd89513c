"""``influenciae top-k``: the proponents and opponents of test examples among the training examples."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from typing import Any

import numpy as np

from influenciae.app.arguments import integer_at_least
from influenciae.app.progress import timed
from influenciae.cli.common import EXIT_OK, _finish_timings, _UsageError, _write_json
from influenciae.cli.options import _add_run_arguments, _add_saved_model_arguments, _data_spec
from influenciae.cli.saved_model import _build_calculator, _describe_setup, _inputs_by_index, _prepare


def _add_top_k_arguments(parser: argparse.ArgumentParser) -> None:
    _add_saved_model_arguments(parser, pairwise=True)
    group = parser.add_argument_group("ranking")
    group.add_argument("-k", type=integer_at_least(1), default=5, help="training examples per test example (5)")
    group.add_argument(
        "--order",
        choices=("both", "descending", "ascending"),
        default="both",
        help="proponents (descending), opponents (ascending) or both (default)",
    )
    group.add_argument(
        "--report-examples",
        type=integer_at_least(1),
        default=8,
        help="test examples shown in the report (all are in top_k.csv; default: 8)",
    )
    group.add_argument(
        "--search",
        choices=("streaming", "linear", "faiss"),
        help="top-k strategy over dot-product scores (default: streaming; faiss needs influenciae[ann])",
    )
    group.add_argument(
        "--cache-dir",
        help="keep the training influence vectors in this directory: reruns with the same model, data and settings "
        "reuse them, interrupted runs resume (default: a temporary directory)",
    )
    _add_run_arguments(parser, default_output="runs/top-k")


def _run_top_k(args: argparse.Namespace) -> int:
    from influenciae.app import io, report
    from influenciae.types import CACHE, ORDER

    start = time.perf_counter()
    setup = _prepare(args, command="top-k")
    test_spec = _data_spec(args, test=True)
    with timed(setup.timings, "loading"):
        setup.log(f"reading the test data: {test_spec.describe()}")
        test = io.prepare_dataset(
            setup.model, io.load_data(test_spec, batch_size=args.batch_size, what="test data"), setup.loss
        )
        test_scan = io.scan_dataset(setup.model, test, setup.loss, what="test")
    num_train = setup.train_scan.num_examples
    if args.k > num_train:
        raise _UsageError(f"-k {args.k} is larger than the {num_train} training examples")
    calculator = _build_calculator(setup)
    kinds = {"both": ("proponent", "opponent"), "descending": ("proponent",), "ascending": ("opponent",)}[args.order]
    orders = {"proponent": ORDER.DESCENDING, "opponent": ORDER.ASCENDING}
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="influenciae-top-k-"))
        for kind in kinds:
            setup.log(f"finding the {args.k} {kind}s of {test_scan.num_examples} test examples")
            with timed(setup.timings, f"top_k_{kind}s"):
                indices, values = calculator.most_influential(
                    test,
                    setup.train,
                    k=args.k,
                    order=orders[kind],
                    nearest_neighbors=args.search,
                    influence_vector_in_cache=CACHE.DISK,
                    save_influence_vector_ds_path=cache_dir,
                )
            results[kind] = (np.asarray(indices, dtype=np.int64), np.asarray(values, dtype=np.float64))
    rows = report.write_csv(
        setup.output / "top_k.csv",
        ["test_index", "rank", "kind", "train_index", "score"],
        (
            [
                test_index,
                rank + 1,
                kind,
                int(results[kind][0][test_index, rank]),
                float(results[kind][1][test_index, rank]),
            ]
            for test_index in range(test_scan.num_examples)
            for kind in kinds
            for rank in range(args.k)
        ),
    )
    metrics: dict[str, Any] = {"command": "top-k", **_describe_setup(setup, calculator)}
    metrics["test_data"] = {"source": test_spec.describe(), "num_examples": test_scan.num_examples}
    metrics["top_k"] = {"k": args.k, "order": args.order, "kinds": list(kinds), "rows": rows}
    if args.cache_dir:
        metrics["cache_dir"] = str(args.cache_dir)
    setup.log("writing the report")
    with timed(setup.timings, "report"):
        shown = np.arange(min(args.report_examples, test_scan.num_examples))
        train_needed = np.unique(np.concatenate([results[kind][0][shown].reshape(-1) for kind in kinds]))
        files = report.top_k_report(
            setup.output,
            metrics,
            results,
            setup.train_scan,
            test_scan,
            shown,
            train_inputs=_inputs_by_index(setup.train, train_needed),
            test_inputs=_inputs_by_index(test, shown),
            title=f"Top-{args.k} training examples ({args.method})",
        )
    metrics["timings_seconds"] = _finish_timings(setup.timings, start)
    metrics["files"] = ["top_k.csv", *files, "metrics.json"]
    _write_json(setup.output / "metrics.json", metrics)
    print(
        f"Top-{args.k} {' and '.join(f'{kind}s' for kind in kinds)} of {test_scan.num_examples} test examples among "
        f"{num_train} training examples ({args.method}): {rows} rows."
    )
    print(f"Results: {setup.output / 'top_k.csv'}, {setup.output / 'report.html'}")
    return EXIT_OK
