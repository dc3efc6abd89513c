"""The ``influenciae`` console script.

Each subcommand is a :class:`Command`, written in its own module of this package: a name, a one-line help, a function
adding its arguments and a function running it. Adding one means writing those two functions and listing it in
:data:`COMMANDS`; heavy imports (the demo's scikit-learn, matplotlib, tensorflow-datasets) happen inside the run
function only. The options the subcommands share are in :mod:`influenciae.cli.options`.

* ``influenciae demo``: the end-to-end digits demo (:mod:`influenciae.app.demo`, :mod:`influenciae.cli.demo`).
* ``influenciae self-influence``: the self-influence of every training example of a saved model, as a CSV file and an
  HTML report.
* ``influenciae top-k``: the proponents and opponents of test examples among the training examples.
* ``influenciae score``: the same scores over sharded TFRecords on an Apache Beam runner, with tf.distribute for the
  solver (:mod:`influenciae.cli.score`; ``docs/distributed.md``).

Models are ``.keras`` files; data are ``.npz`` files, TFRecord files or a tfds dataset (:mod:`influenciae.app.io`); the
method is chosen from :data:`METHODS`. ``docs/cli.md`` documents every flag and file format.

Exit codes:

* 0: success (also after ``--help``).
* 1: the command line is valid but the run failed: a missing or unreadable file (one line naming the path), data
  that do not fit the model (one line saying what mismatched), or an error of the computation (one line, or the
  traceback under ``--traceback``). Missing files count here, with the run's other input problems, rather than as
  usage errors: the command line itself was well formed.
* 2: usage error: an unknown command, method, solver or option, a malformed or out-of-range number, or options that
  do not go together (argparse's convention; the usage line is printed first).
* 130: interrupted (Ctrl-C).

Example:
    $ influenciae demo --output runs/demo --seed 1
    $ influenciae self-influence --model model.keras --npz train.npz --output runs/si
    $ python -m influenciae.cli top-k --model model.keras --npz train.npz --test-npz test.npz -k 5 --method arnoldi
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from influenciae.app.io import InputError
from influenciae.cli import demo, self_influence, top_k
from influenciae.cli import score as distributed_cli  # standard-library imports only at module level
from influenciae.cli.common import (
    _OVERWRITE_HINT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Command,
    _UsageError,
)
from influenciae.cli.common import EXIT_OK as EXIT_OK  # re-exported: the exit codes are part of the script
from influenciae.influence.registry import METHODS, CalculatorMethod

__all__ = ["Command", "COMMANDS", "METHODS", "Method", "build_parser", "main"]

Method = CalculatorMethod
"""An influence method the commands can run on one saved model (an entry of the calculator registry)."""

COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "find flipped labels in digits with self-influence and write an HTML report",
        demo._add_demo_arguments,
        demo._run_demo,
    ),
    Command(
        "self-influence",
        "score every training example of a saved Keras model by its self-influence; CSV and HTML report",
        self_influence._add_self_influence_arguments,
        self_influence._run_self_influence,
    ),
    Command(
        "top-k",
        "find the most influential training examples (proponents, opponents) of test examples; CSV and HTML report",
        top_k._add_top_k_arguments,
        top_k._run_top_k,
    ),
    Command("score", distributed_cli.HELP, distributed_cli.add_arguments, distributed_cli.run),
)
"""The subcommands of the console script, in ``--help`` order."""


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
        subparser.set_defaults(run=command.run, command_parser=subparser)
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
        getattr(args, "command_parser", parser).print_usage(sys.stderr)
        print(f"influenciae {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as error:  # a missing file or data that do not fit the model: one line, no traceback hint
        if args.traceback:
            traceback.print_exc()
        print(f"influenciae {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"influenciae {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the console script's last line of defence
        if args.traceback:
            traceback.print_exc()
        else:
            # the library's cache hint names a Python argument the command line does not have
            message = str(error).replace(
                _OVERWRITE_HINT, "delete the --cache-dir directory to rebuild the cache, or choose another --cache-dir"
            )
            print(
                f"influenciae {args.command}: error: {type(error).__name__}: {message}\n"
                "(run with --traceback for details)",
                file=sys.stderr,
            )
        return EXIT_FAILURE
