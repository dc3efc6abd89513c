"""The command-line options shared by the subcommands: the model / data / method / run option groups and the checks
argparse cannot do by itself. The argument types are in :mod:`influenciae.app.arguments`."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from influenciae.app.arguments import (
    finite_float,
    input_shape,
    integer_at_least,
    key_value,
    layer_reference,
    non_negative_float,
    positive_float,
)
from influenciae.cli.common import _UsageError
from influenciae.influence.registry import METHODS

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


def _add_data_arguments(parser: argparse.ArgumentParser, *, test: bool) -> None:
    train = parser.add_argument_group("training data (one of)")
    sources = train.add_mutually_exclusive_group(required=True)
    sources.add_argument("--npz", metavar="PATH", help="an .npz file with arrays x and y (see --x-key/--y-key)")
    sources.add_argument("--tfrecords", metavar="GLOB", help="TFRecord files (a quoted glob, a file or a directory)")
    sources.add_argument("--tfds", metavar="NAME", help="a TensorFlow Datasets name, e.g. mnist (see --data-dir)")
    train.add_argument("--split", default="train", help="tfds split of the training data (default: %(default)s)")
    train.add_argument("--limit", type=integer_at_least(1), help="use only the first N training examples")
    if test:
        group = parser.add_argument_group("test data (one of; default with --tfds: the same dataset's --test-split)")
        test_sources = group.add_mutually_exclusive_group()
        test_sources.add_argument("--test-npz", metavar="PATH", help="an .npz file of test examples")
        test_sources.add_argument("--test-tfrecords", metavar="GLOB", help="TFRecord files of test examples")
        test_sources.add_argument("--test-tfds", metavar="NAME", help="a TensorFlow Datasets name for test examples")
        group.add_argument("--test-split", default="test", help="tfds split of the test data (default: %(default)s)")
        group.add_argument("--test-limit", type=integer_at_least(1), help="use only the first N test examples")
    decoding = parser.add_argument_group("reading the data")
    decoding.add_argument("--x-key", help="array / feature of the inputs (default: x; tfds: its supervised keys)")
    decoding.add_argument("--y-key", help="array / feature of the targets (default: y; tfds: its supervised keys)")
    decoding.add_argument("--weight-key", help="array / feature of per-example training weights (default: none)")
    decoding.add_argument(
        "--x-shape", type=input_shape, help="shape of one input for TFRecord numeric lists, e.g. 8,8,1"
    )
    decoding.add_argument("--data-dir", help="tfds data directory (default: tfds' own, ~/tensorflow_datasets)")
    decoding.add_argument("--download", action="store_true", help="let tfds download a missing dataset (off)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from influenciae.app.io import LOSSES

    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="PATH", help="a saved Keras model (.keras, or legacy .h5)")
    model.add_argument("--loss", choices=tuple(LOSSES), help="per-example loss (default: the model's compiled loss)")
    model.add_argument(
        "--from-logits", action="store_true", help="with a cross-entropy --loss: the model outputs logits"
    )


def _add_method_arguments(parser: argparse.ArgumentParser, *, pairwise_only: bool) -> None:
    from influenciae.hessian.registry import registered_solvers

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
        type=key_value,
        action="append",
        metavar="KEY=VALUE",
        help="an option of the solver's constructor, e.g. tolerance=1e-6 or max_iterations=200 (repeatable)",
    )
    group.add_argument(
        "--damping", type=non_negative_float, default=1e-3, help="λ added to the Hessian (default: %(default)s)"
    )
    group.add_argument(
        "--start-layer",
        type=layer_reference,
        help="first watched layer (index or name) of gradient methods (default: -1, the last layer's weights)",
    )
    group.add_argument("--subspace-dim", type=integer_at_least(1), help="arnoldi: Krylov dimension (min(P, 200))")
    group.add_argument("--rank", type=integer_at_least(1), help="arnoldi: eigenpairs kept (default: subspace dim)")
    group.add_argument("--learning-rate", type=positive_float, help="tracin: the checkpoint's learning rate (1)")
    group.add_argument("--l2", type=positive_float, help="representer: λ of the last layer's refit λ‖Θ‖² (1e-3)")
    group.add_argument("--step-size", type=finite_float, help="representer_lje: step away from the weights (1e-2)")
    group.add_argument(
        "--projection-dim", type=integer_at_least(1), help="trak: projection dimension (default: no projection)"
    )
    group.add_argument("--layer", type=layer_reference, help="similarity: layer compared (index or name; default: -2)")
    group.add_argument(
        "--similarity", choices=("cosine", "euclidean", "dot"), help="similarity: the measure (default: cosine)"
    )
    group.add_argument("--seed", type=integer_at_least(0), default=0, help="seed of arnoldi and trak (default: 0)")


def _add_saved_model_arguments(parser: argparse.ArgumentParser, *, pairwise: bool) -> None:
    """The options of the commands on one saved model: the model, the data (with test data if ``pairwise``), the
    method."""
    _add_model_arguments(parser)
    _add_data_arguments(parser, test=pairwise)
    _add_method_arguments(parser, pairwise_only=pairwise)


def _add_run_arguments(parser: argparse.ArgumentParser, *, default_output: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--output", "-o", default=default_output, help="output directory (default: %(default)s)")
    group.add_argument("--batch-size", type=integer_at_least(1), default=64, help="batch size (default: 64)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars or step messages")


def _data_spec(args: argparse.Namespace, *, test: bool) -> Any:
    from influenciae.app.io import DataSpec

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
        from influenciae.hessian.registry import SOLVER_REGISTRY

        solver = SOLVER_REGISTRY.get(args.solver or "exact")
        accepted = list(solver.setting_names())
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
