"""What ``self-influence`` and ``top-k`` share: load and check one saved model and its training data, build the
calculator from the registry (:mod:`influenciae.influence.registry`), and describe the run."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from influenciae.app.progress import StepLogger, timed
from influenciae.cli.common import _UsageError
from influenciae.cli.options import _METHOD_OPTIONS, _check_method_options, _check_start_layer, _data_spec
from influenciae.influence.registry import METHODS, CalculatorOptions, CalculatorSetup


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
    from influenciae.app import io

    solver_options = _check_method_options(args)
    train_spec = _data_spec(args, test=False)
    test_spec = _data_spec(args, test=True) if command == "top-k" else None
    # Missing files are reported before anything is loaded or created.
    io.require_file(args.model, "model file")
    train_spec.check_exists("training data")
    if test_spec is not None:
        test_spec.check_exists("test data")
    output = _make_output(args.output)

    log = StepLogger(command, enabled=not args.no_progress)
    timings: dict[str, float] = {}
    with timed(timings, "loading"):
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
    with timed(setup.timings, "setup"):
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


def _gather(dataset: Any, indices: Any) -> np.ndarray | None:
    from influenciae.app.io import gather_inputs

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
