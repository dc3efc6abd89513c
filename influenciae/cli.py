"""The ``influenciae`` console script.

Each subcommand is a :class:`Command`: a name, a one-line help, a function adding its arguments and a function running
it. Adding one means writing those two functions and listing it in :data:`COMMANDS`; heavy imports (the demo's
scikit-learn, matplotlib, tensorflow-datasets) happen inside the run function only.

* ``influenciae demo``: the end-to-end digits demo (:mod:`influenciae.demo`).
* ``influenciae self-influence``: the self-influence of every training example of a saved model, as a CSV file and an
  HTML report.
* ``influenciae top-k``: the proponents and opponents of test examples among the training examples.
* ``influenciae score``: the same scores over sharded TFRecords on an Apache Beam runner, with tf.distribute for the
  solver (:mod:`influenciae.distributed.cli`; ``docs/distributed.md``).

Models are ``.keras`` files; data are ``.npz`` files, TFRecord files or a tfds dataset (:mod:`influenciae.io`); the
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
import ast
import contextlib
import dataclasses
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from influenciae.distributed import cli as distributed_cli  # standard-library imports only at module level
from influenciae.influence.registry import METHODS as CALCULATOR_METHODS
from influenciae.influence.registry import CalculatorMethod, CalculatorOptions, CalculatorSetup
from influenciae.io import InputError

__all__ = ["Command", "COMMANDS", "METHODS", "Method", "build_parser", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# influenciae.cache's hint (not imported: it loads TensorFlow); tests/test_cli.py checks the two are equal
_OVERWRITE_HINT = "pass overwrite=True to rebuild the cache (this deletes its files) or choose another path"


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
        type=_integer_at_least(1),
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
        budgets=args.budgets,
        cleaning_seeds=args.cleaning_seeds,
        cleaning_action=args.cleaning_action,
        show_progress=not args.no_progress,
    )
    print(format_summary(metrics))
    print(f"Report: {Path(args.output) / 'report.html'} ({metrics['timings_seconds']['total']:.0f} s)")
    return EXIT_OK


# ---------------------------------------------------------------------- influence methods of one saved model


Method = CalculatorMethod
"""An influence method the commands can run on one saved model (the calculator registry's entry)."""
METHODS = CALCULATOR_METHODS
"""The methods the ``self-influence`` and ``top-k`` commands offer, by ``--method`` name (the calculator registry)."""
_METHOD_OPTIONS = {
    "start_layer": "--start-layer",
    "solver": "--solver",
    "solver_options": "--solver-option",
    "subspace_dim": "--subspace-dim",
    "rank": "--rank",
    "learning_rate": "--learning-rate",
    "l2": "--l2",
    "step_size": "--step-size",
    "projection_dim": "--projection-dim",
    "layer": "--layer",
    "similarity": "--similarity",
}


# ---------------------------------------------------------------------- arguments shared by self-influence and top-k


def _layer(text: str) -> int | str:
    """A layer index (``-1`` = last) or a layer name."""
    try:
        return int(text)
    except ValueError:
        if not text:
            raise argparse.ArgumentTypeError("expected a layer index or name, got an empty string") from None
        return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape such as 8,8,1, got {text!r}") from None
    if not dims or any(dim <= 0 for dim in dims):
        raise argparse.ArgumentTypeError(f"expected positive dimensions such as 8,8,1, got {text!r}")
    return dims


def _solver_option(text: str) -> tuple[str, Any]:
    key, separator, raw = text.partition("=")
    if not separator or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as tolerance=1e-6, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def _add_data_arguments(parser: argparse.ArgumentParser, *, test: bool) -> None:
    train = parser.add_argument_group("training data (one of)")
    sources = train.add_mutually_exclusive_group(required=True)
    sources.add_argument("--npz", metavar="PATH", help="an .npz file with arrays x and y (see --x-key/--y-key)")
    sources.add_argument("--tfrecords", metavar="GLOB", help="TFRecord files (a quoted glob, a file or a directory)")
    sources.add_argument("--tfds", metavar="NAME", help="a TensorFlow Datasets name, e.g. mnist (see --data-dir)")
    train.add_argument("--split", default="train", help="tfds split of the training data (default: %(default)s)")
    train.add_argument("--limit", type=_integer_at_least(1), help="use only the first N training examples")
    if test:
        group = parser.add_argument_group("test data (one of; default with --tfds: the same dataset's --test-split)")
        test_sources = group.add_mutually_exclusive_group()
        test_sources.add_argument("--test-npz", metavar="PATH", help="an .npz file of test examples")
        test_sources.add_argument("--test-tfrecords", metavar="GLOB", help="TFRecord files of test examples")
        test_sources.add_argument("--test-tfds", metavar="NAME", help="a TensorFlow Datasets name for test examples")
        group.add_argument("--test-split", default="test", help="tfds split of the test data (default: %(default)s)")
        group.add_argument("--test-limit", type=_integer_at_least(1), help="use only the first N test examples")
    decoding = parser.add_argument_group("reading the data")
    decoding.add_argument("--x-key", help="array / feature of the inputs (default: x; tfds: its supervised keys)")
    decoding.add_argument("--y-key", help="array / feature of the targets (default: y; tfds: its supervised keys)")
    decoding.add_argument("--weight-key", help="array / feature of per-example training weights (default: none)")
    decoding.add_argument("--x-shape", type=_shape, help="shape of one input for TFRecord numeric lists, e.g. 8,8,1")
    decoding.add_argument("--data-dir", help="tfds data directory (default: tfds' own, ~/tensorflow_datasets)")
    decoding.add_argument("--download", action="store_true", help="let tfds download a missing dataset (off)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from influenciae.io import LOSSES

    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="PATH", help="a saved Keras model (.keras, or legacy .h5)")
    model.add_argument("--loss", choices=tuple(LOSSES), help="per-example loss (default: the model's compiled loss)")
    model.add_argument(
        "--from-logits", action="store_true", help="with a cross-entropy --loss: the model outputs logits"
    )


def _add_method_arguments(parser: argparse.ArgumentParser, *, pairwise_only: bool) -> None:
    from influenciae.hessian import registered_solvers

    names = [name for name, method in METHODS.items() if method.pairwise or not pairwise_only]
    group = parser.add_argument_group("method")
    group.add_argument("--method", choices=names, default="first_order", help="influence method (default: %(default)s)")
    group.add_argument(
        "--solver",
        choices=registered_solvers(),
        help="inverse-HVP solver of first_order, relatif and representer_lje (default: exact)",
    )
    group.add_argument(
        "--solver-option",
        dest="solver_options",
        type=_solver_option,
        action="append",
        metavar="KEY=VALUE",
        help="an option of the solver's constructor, e.g. tolerance=1e-6 or max_iterations=200 (repeatable)",
    )
    group.add_argument(
        "--damping", type=_non_negative_float, default=1e-3, help="λ added to the Hessian (default: %(default)s)"
    )
    group.add_argument(
        "--start-layer",
        type=_layer,
        help="first watched layer (index or name) of gradient methods (default: -1, the last layer's weights)",
    )
    group.add_argument("--subspace-dim", type=_integer_at_least(1), help="arnoldi: Krylov dimension (min(P, 200))")
    group.add_argument("--rank", type=_integer_at_least(1), help="arnoldi: eigenpairs kept (default: subspace dim)")
    group.add_argument("--learning-rate", type=_positive_float, help="tracin: the checkpoint's learning rate (1)")
    group.add_argument("--l2", type=_positive_float, help="representer: λ of the last layer's refit λ‖Θ‖² (1e-3)")
    group.add_argument("--step-size", type=_finite_float, help="representer_lje: step away from the weights (1e-2)")
    group.add_argument(
        "--projection-dim", type=_integer_at_least(1), help="trak: projection dimension (default: no projection)"
    )
    group.add_argument("--layer", type=_layer, help="similarity: layer compared (index or name; default: -2)")
    group.add_argument(
        "--similarity", choices=("cosine", "euclidean", "dot"), help="similarity: the measure (default: cosine)"
    )
    group.add_argument("--seed", type=_integer_at_least(0), default=0, help="seed of arnoldi and trak (default: 0)")


def _add_run_arguments(parser: argparse.ArgumentParser, *, default_output: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--output", "-o", default=default_output, help="output directory (default: %(default)s)")
    group.add_argument("--batch-size", type=_integer_at_least(1), default=64, help="batch size (default: 64)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars or step messages")


def _add_self_influence_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_data_arguments(parser, test=False)
    _add_method_arguments(parser, pairwise_only=False)
    group = parser.add_argument_group("ranking")
    group.add_argument(
        "-k", type=_integer_at_least(1), default=24, help="examples shown in the report's ranking (default: 24)"
    )
    group.add_argument(
        "--order",
        choices=("descending", "ascending"),
        default="descending",
        help="rank by highest (descending, default) or lowest self-influence",
    )
    _add_run_arguments(parser, default_output="runs/self-influence")


def _add_top_k_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_data_arguments(parser, test=True)
    _add_method_arguments(parser, pairwise_only=True)
    group = parser.add_argument_group("ranking")
    group.add_argument("-k", type=_integer_at_least(1), default=5, help="training examples per test example (5)")
    group.add_argument(
        "--order",
        choices=("both", "descending", "ascending"),
        default="both",
        help="proponents (descending), opponents (ascending) or both (default)",
    )
    group.add_argument(
        "--report-examples",
        type=_integer_at_least(1),
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


# ---------------------------------------------------------------------- the two jobs


@dataclasses.dataclass
class _Setup:
    """What both jobs share once the model and the training data are loaded and checked."""

    args: argparse.Namespace
    model: Any
    loss: Any
    train: Any
    train_spec: Any
    train_scan: Any
    solver_options: dict[str, Any]
    show_progress: bool
    log: Callable[[str], None]
    timings: dict[str, float]
    output: Path


def _data_spec(args: argparse.Namespace, *, test: bool) -> Any:
    from influenciae.io import DataSpec

    prefix = "test_" if test else ""
    common = {"x_key": args.x_key, "y_key": args.y_key, "x_shape": args.x_shape, "data_dir": args.data_dir}
    common.update(download=args.download, limit=getattr(args, f"{prefix}limit"))
    if not test:
        common["weight_key"] = args.weight_key
    for source, flag in (("npz", "npz"), ("tfrecord", "tfrecords"), ("tfds", "tfds")):
        location = getattr(args, f"{prefix}{flag}")
        if location is not None:
            split = args.test_split if test else args.split
            return DataSpec(source, location, split=split, **common)
    if test and args.tfds is not None:
        return DataSpec("tfds", args.tfds, split=args.test_split, **common)
    raise _UsageError(
        "top-k needs test data: --test-npz, --test-tfrecords or --test-tfds (or --tfds with --test-split)"
    )


def _check_method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Refuse options of another method, check solver options; returns the solver options as a dict."""
    method = METHODS[args.method]
    for dest, flag in _METHOD_OPTIONS.items():
        if getattr(args, dest, None) is not None and dest not in method.options:
            users = [name for name, other in METHODS.items() if dest in other.options]
            raise _UsageError(f"{flag} applies to --method {' or '.join(users)}, not {args.method}")
    if args.loss is None and args.from_logits:
        raise _UsageError("--from-logits goes with --loss (a compiled loss keeps its own from_logits)")
    if args.loss == "mse" and args.from_logits:
        raise _UsageError("--from-logits applies to the cross-entropy losses, not mse")
    if args.tfds is not None and (args.x_key is None) != (args.y_key is None):
        raise _UsageError("for a tfds dataset give both --x-key and --y-key, or neither (the supervised keys)")
    options = dict(args.solver_options or [])
    if options:
        from influenciae.hessian.base import InverseHessianVectorProduct

        solver = InverseHessianVectorProduct._registry[args.solver or "exact"]
        accepted = [
            name
            for name, parameter in inspect.signature(solver.__init__).parameters.items()
            if name not in ("self", "model", "dataset", "damping", "operator")
            and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        ]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise _UsageError(
                f"--solver-option {unknown[0]} is not an option of the {args.solver or 'exact'} solver "
                f"(options: {', '.join(accepted)})"
            )
        for key, value in options.items():
            _check_solver_value(key, value)
    return options


_COUNT_WORDS = ("iter", "dim", "rank", "size", "samples", "steps", "batch", "num_", "depth", "block", "chunk")


def _check_solver_value(key: str, value: Any) -> None:
    """Refuse a solver option whose number cannot be right (a count below 1, a negative or non-finite number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if not np.isfinite(value):
        raise _UsageError(f"--solver-option {key}={value}: expected a finite number")
    if any(word in key for word in _COUNT_WORDS) and (value < 1 or value != int(value)):
        raise _UsageError(f"--solver-option {key}={value}: expected a whole number >= 1")
    if value < 0:
        raise _UsageError(f"--solver-option {key}={value}: expected a number >= 0")


def _check_start_layer(args: argparse.Namespace, model: Any) -> None:
    """Refuse a ``--start-layer`` the model does not have, listing the valid indices and names."""
    layer = getattr(args, "start_layer", None)
    if layer is None or "start_layer" not in METHODS[args.method].options:
        return
    layers = list(getattr(model, "layers", []))
    names = [item.name for item in layers]
    valid = (-len(layers) <= layer < len(layers)) if isinstance(layer, int) else layer in names
    if not valid:
        raise _UsageError(
            f"--start-layer {layer} is not a layer of the model: give an index in [{-len(layers)}, {len(layers) - 1}] "
            f"or one of the names {', '.join(names)}"
        )


def _make_output(path: str) -> Path:
    """Create the output directory, or refuse (usage error) a path under a file or in an unwritable directory."""
    output = Path(path)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _UsageError(
            f"--output {path}: a file is in the way (the path or one of its parents is a file); give a directory"
        ) from None
    except OSError as error:
        raise _UsageError(
            f"--output {path}: cannot create the directory ({error.strerror}); give a writable one"
        ) from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise _UsageError(f"--output {path}: the directory is not writable; give a writable one")
    return output


def _prepare(args: argparse.Namespace, *, command: str) -> _Setup:
    """Check the command line, then load and check the model and the training data (in that order)."""
    from influenciae import io

    solver_options = _check_method_options(args)
    train_spec = _data_spec(args, test=False)
    test_spec = _data_spec(args, test=True) if command == "top-k" else None
    # Missing files are reported before anything is loaded or created.
    io.require_file(args.model, "model file")
    train_spec.check_exists("training data")
    if test_spec is not None:
        test_spec.check_exists("test data")
    output = _make_output(args.output)

    log = _Logger(command, enabled=not args.no_progress)
    timings: dict[str, float] = {}
    with _timer(timings, "loading"):
        log(f"loading the model {args.model}")
        model = io.load_model(args.model)
        _check_start_layer(args, model)
        loss = io.resolve_loss(model, args.loss, from_logits=args.from_logits)
        log(f"reading the training data: {train_spec.describe()}")
        train = io.prepare_dataset(model, io.load_data(train_spec, batch_size=args.batch_size), loss)
        train_scan = io.scan_dataset(model, train, loss, what="training")
    return _Setup(
        args=args,
        model=model,
        loss=loss,
        train=train,
        train_spec=train_spec,
        train_scan=train_scan,
        solver_options=solver_options,
        show_progress=not args.no_progress,
        log=log,
        timings=timings,
        output=output,
    )


def _build_calculator(setup: _Setup) -> Any:
    method = METHODS[setup.args.method]
    setup.log(f"building {method.name} on {setup.train_scan.num_examples} training examples")
    args = setup.args
    options = CalculatorOptions(
        damping=args.damping,
        seed=args.seed,
        solver_options=setup.solver_options or None,
        show_progress=setup.show_progress,
        **{name: getattr(args, name) for name in _METHOD_OPTIONS if name != "solver_options"},
    )
    regression = setup.loss.kind == "regression"
    with _timer(setup.timings, "setup"):
        calculator = method.build(CalculatorSetup(setup.model, setup.train, setup.loss.function, options, regression))
    return calculator


def _describe_setup(setup: _Setup, calculator: Any) -> dict[str, Any]:
    args = setup.args
    watched = getattr(calculator, "model", None) if METHODS[args.method].gradients else None
    return {
        "model": {
            "path": str(args.model),
            "num_params": int(setup.model.count_params()),
            "num_outputs": setup.train_scan.num_outputs,
            "watched_weights": list(getattr(watched, "weight_names", [])),
            "num_watched_params": int(getattr(watched, "nb_params", 0)),
            "loss": setup.loss.name + ("" if not setup.loss.compiled else " (compiled)"),
            "from_logits": setup.loss.from_logits,
        },
        "method": {
            "name": args.method,
            "description": METHODS[args.method].description,
            "solver": (args.solver or "exact") if "solver" in METHODS[args.method].options else None,
            "solver_options": setup.solver_options,
            "damping": args.damping,
            "start_layer": (-1 if args.start_layer is None else args.start_layer)
            if "start_layer" in METHODS[args.method].options
            else None,
            **{
                dest: getattr(args, dest)
                for dest in ("subspace_dim", "rank", "learning_rate", "l2", "step_size", "projection_dim", "layer")
                if getattr(args, dest) is not None
            },
            "seed": args.seed,
        },
        "train_data": {"source": setup.train_spec.describe(), "num_examples": setup.train_scan.num_examples},
    }


def _ranking(scores: np.ndarray, order: str) -> np.ndarray:
    """Indices from first to last in ``order``; non-finite scores last, ties by index (stable)."""
    keys = np.where(np.isfinite(scores), scores, np.inf if order == "ascending" else -np.inf)
    return np.argsort(keys if order == "ascending" else -keys, kind="stable")


def _run_self_influence(args: argparse.Namespace) -> int:
    from influenciae import report

    start = time.perf_counter()
    setup = _prepare(args, command="self-influence")
    calculator = _build_calculator(setup)
    setup.log("computing self-influence")
    with _timer(setup.timings, "self_influence"):
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
    with _timer(setup.timings, "report"):
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


def _run_top_k(args: argparse.Namespace) -> int:
    from influenciae import io, report
    from influenciae.types import CACHE, ORDER

    start = time.perf_counter()
    setup = _prepare(args, command="top-k")
    test_spec = _data_spec(args, test=True)
    with _timer(setup.timings, "loading"):
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
            with _timer(setup.timings, f"top_k_{kind}s"):
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
    with _timer(setup.timings, "report"):
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


def _gather(dataset: Any, indices: Any) -> np.ndarray | None:
    from influenciae.io import gather_inputs

    return gather_inputs(dataset, [int(i) for i in indices])


def _inputs_by_index(dataset: Any, indices: Any) -> dict[int, np.ndarray]:
    """``{index: input}`` for the examples at ``indices``; empty for models with several inputs."""
    inputs = _gather(dataset, indices)
    if inputs is None:
        return {}
    return {int(index): row for index, row in zip(indices, inputs, strict=True)}


def _score_summary(scores: np.ndarray, losses: np.ndarray) -> dict[str, Any]:
    finite = np.isfinite(scores)
    values = scores[finite]
    summary: dict[str, Any] = {
        "num_examples": int(scores.size),
        "num_non_finite": int(scores.size - values.size),
        "min": float(values.min()) if values.size else float("nan"),
        "median": float(np.median(values)) if values.size else float("nan"),
        "mean": float(values.mean()) if values.size else float("nan"),
        "max": float(values.max()) if values.size else float("nan"),
    }
    if values.size > 2 and np.ptp(values) > 0 and np.ptp(losses[finite]) > 0:
        from scipy.stats import spearmanr

        summary["rank_correlation_with_loss"] = float(spearmanr(values, losses[finite]).statistic)
    return summary


def _finish_timings(timings: dict[str, float], start: float) -> dict[str, float]:
    timings["total"] = time.perf_counter() - start
    return {name: round(value, 3) for name, value in timings.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class _Logger:
    def __init__(self, command: str, *, enabled: bool) -> None:
        self.command = command
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.command} {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "find flipped labels in digits with self-influence and write an HTML report",
        _add_demo_arguments,
        _run_demo,
    ),
    Command(
        "self-influence",
        "score every training example of a saved Keras model by its self-influence; CSV and HTML report",
        _add_self_influence_arguments,
        _run_self_influence,
    ),
    Command(
        "top-k",
        "find the most influential training examples (proponents, opponents) of test examples; CSV and HTML report",
        _add_top_k_arguments,
        _run_top_k,
    ),
    Command("score", distributed_cli.HELP, distributed_cli.add_arguments, distributed_cli.run),
)
"""The subcommands of the console script, in ``--help`` order."""


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


if __name__ == "__main__":
    sys.exit(main())
