"""``influenciae demo``: the end-to-end digits demo (:mod:`influenciae.app.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from influenciae.app.arguments import fraction, integer_at_least, non_negative_float
from influenciae.cli.common import EXIT_OK, _UsageError


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from influenciae.hessian.registry import registered_solvers  # TensorFlow is imported already

    parser.add_argument("--output", "-o", default="runs/demo", help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=integer_at_least(0), default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--flip-fraction",
        type=fraction,
        default=0.1,
        help="fraction of training labels flipped to another class (default: %(default)s)",
    )
    parser.add_argument(
        "--solver",
        choices=registered_solvers(),
        default=None,
        help="inverse-HVP solver of the first-order method (default: exact)",
    )
    parser.add_argument("--method", choices=("first_order", "arnoldi"), default="first_order", help="influence method")
    parser.add_argument("--damping", type=non_negative_float, default=1e-3, help="Hessian damping (default: 1e-3)")
    parser.add_argument("--epochs", type=integer_at_least(1), default=30, help="training epochs (default: 30)")
    parser.add_argument(
        "--num-test-images", type=integer_at_least(1), default=4, help="test images explained (default: 4)"
    )
    parser.add_argument(
        "-k", type=integer_at_least(1), default=8, help="proponents and opponents per test image (default: 8)"
    )
    parser.add_argument(
        "--train-size", type=integer_at_least(20), default=None, help="use a random subset of the training set"
    )

    def budgets(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
        if not all(0.0 < value <= 1.0 for value in values) or any(
            b <= a for a, b in zip(values, values[1:], strict=False)
        ):
            raise argparse.ArgumentTypeError(
                f"expected increasing fractions in (0, 1], e.g. 0.05,0.1,0.2, got {text!r}"
            )
        return values

    budgets.__name__ = "comma-separated fractions"  # argparse names the type in some messages
    parser.add_argument(
        "--budgets",
        type=budgets,
        default=(0.05, 0.1, 0.2),
        help="fractions of the training set cleaned in the cleaning experiment (default: 0.05,0.1,0.2)",
    )
    parser.add_argument(
        "--cleaning-seeds",
        type=integer_at_least(1),
        default=3,
        help="retraining seeds of the cleaning experiment, one random pick per seed (default: %(default)s)",
    )
    parser.add_argument(
        "--cleaning-action",
        choices=("fix", "drop"),
        default="fix",
        help="fix the picked labels (set the true label) or drop the picked examples (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or step messages")


_RUN_DEMO_OPTIONS = (
    "seed",
    "flip_fraction",
    "epochs",
    "num_test_images",
    "k",
    "method",
    "damping",
    "train_size",
    "budgets",
    "cleaning_seeds",
    "cleaning_action",
)
"""The options passed to :func:`~influenciae.app.demo.run_demo` under their own names."""


def _run_demo(args: argparse.Namespace) -> int:
    from influenciae.app.demo import format_summary, run_demo

    if args.method == "arnoldi" and args.solver is not None:
        raise _UsageError("--solver applies to --method first_order; arnoldi has its own low-rank solver")
    passed = {name: getattr(args, name) for name in _RUN_DEMO_OPTIONS}
    metrics = run_demo(args.output, ihvp=args.solver, show_progress=not args.no_progress, **passed)
    print(format_summary(metrics))
    print(f"Report: {Path(args.output) / 'report.html'} ({metrics['timings_seconds']['total']:.0f} s)")
    return EXIT_OK
