"""The ``influenciae`` console script.

Each subcommand is a :class:`Command`: a name, a one-line help, a function adding its arguments and a function running
it. Adding one (``self-influence``, ``top-k``...) means writing those two functions and listing it in
:data:`COMMANDS`; heavy imports (the demo's scikit-learn, matplotlib) happen inside the run function only.

Exit codes: 0 success, 2 usage error (argparse's convention), 1 failure (the error is printed on one line, or with a
traceback under ``--traceback``), 130 interrupted.

Example:
    $ influenciae demo --output runs/demo --seed 1
    $ python -m influenciae.cli demo --solver cg
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["Command", "COMMANDS", "build_parser", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args) -> exit code`` does the work."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------- argument types (errors become exit code 2)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text!r}")
    return value


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse


# ---------------------------------------------------------------------- demo


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from influenciae.hessian import registered_solvers  # the package (and TensorFlow) is imported already

    parser.add_argument("--output", "-o", default="runs/demo", help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=_integer_at_least(0), default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--flip-fraction",
        type=_fraction,
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
    parser.add_argument("--damping", type=_non_negative_float, default=1e-3, help="Hessian damping (default: 1e-3)")
    parser.add_argument("--epochs", type=_integer_at_least(1), default=30, help="training epochs (default: 30)")
    parser.add_argument(
        "--num-test-images", type=_integer_at_least(1), default=4, help="test images explained (default: 4)"
    )
    parser.add_argument(
        "-k", type=_integer_at_least(1), default=8, help="proponents and opponents per test image (default: 8)"
    )
    parser.add_argument(
        "--train-size", type=_integer_at_least(20), default=None, help="use a random subset of the training set"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or step messages")


def _run_demo(args: argparse.Namespace) -> int:
    from influenciae.demo import format_summary, run_demo

    if args.method == "arnoldi" and args.solver is not None:
        raise _UsageError("--solver applies to --method first_order; arnoldi has its own low-rank solver")
    metrics = run_demo(
        args.output,
        seed=args.seed,
        flip_fraction=args.flip_fraction,
        epochs=args.epochs,
        num_test_images=args.num_test_images,
        k=args.k,
        method=args.method,
        ihvp=args.solver,
        damping=args.damping,
        train_size=args.train_size,
        show_progress=not args.no_progress,
    )
    print(format_summary(metrics))
    print(f"Report: {Path(args.output) / 'report.html'} ({metrics['timings_seconds']['total']:.0f} s)")
    return EXIT_OK


COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "find flipped labels in digits with self-influence and write an HTML report",
        _add_demo_arguments,
        _run_demo,
    ),
)


# ---------------------------------------------------------------------- entry point


class _UsageError(Exception):
    """A combination of arguments argparse cannot check by itself (exit code 2)."""


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="influenciae", description="Influence functions and training-data attribution for TensorFlow/Keras."
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on failure")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse exits 2 on usage errors and 0 after --help
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    try:
        return int(args.run(args))
    except _UsageError as error:
        parser.print_usage(sys.stderr)
        print(f"influenciae {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"influenciae {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the console script's last line of defence
        if args.traceback:
            traceback.print_exc()
        else:
            print(
                f"influenciae {args.command}: error: {type(error).__name__}: {error}\n"
                "(run with --traceback for details)",
                file=sys.stderr,
            )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
