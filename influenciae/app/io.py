"""Loading what the console commands work on: a saved Keras model, its loss, and data from files or tfds.

The data come from ``.npz`` files, TFRecord files or TensorFlow Datasets (:func:`load_npz`, :func:`load_tfrecords`,
:func:`load_tfds`, :func:`load_data`; defined in :mod:`influenciae.app.sources`, which describes the formats, and
re-exported here), each as a batched ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])`` in file order.

The model is a ``.keras`` (or legacy ``.h5``) file (:func:`load_model`, through
:func:`influenciae.model.loading.load_model`); the loss comes from a name
(:data:`LOSSES`) or from the compiled model (:func:`resolve_loss`). :func:`scan_dataset` checks that the targets fit
the model's outputs for that loss, example by example, and records each example's label, predicted label and loss.

Every problem with the user's files or data raises :class:`InputError`, whose message is one line naming the file or
the mismatch (the console script prints it and exits with code 1).

Example:
    >>> model = load_model("model.keras")
    >>> loss = resolve_loss(model, "sparse_categorical_crossentropy", from_logits=True)
    >>> train = load_npz("train.npz", batch_size=64)
    >>> train = prepare_dataset(model, train, loss)
    >>> scan = scan_dataset(model, train, loss)  # labels, predictions and losses, checked
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from influenciae.app.sources import (
    DataSpec,
    InputError,
    _first_line,
    load_data,
    load_npz,
    load_tfds,
    load_tfrecords,
    require_file,
    write_tfrecords,
)
from influenciae.data import unpack_batch
from influenciae.model import loading
from influenciae.model._backend import keras, tf

__all__ = [
    "InputError",
    "LOSSES",
    "LossSpec",
    "DataSpec",
    "ScanResult",
    "require_file",
    "load_model",
    "resolve_loss",
    "load_npz",
    "load_tfrecords",
    "write_tfrecords",
    "load_tfds",
    "load_data",
    "prepare_dataset",
    "scan_dataset",
    "gather_inputs",
]


def load_model(path: str | os.PathLike[str]) -> Any:
    """Load a saved Keras model (``.keras``, or a legacy ``.h5``/``.hdf5`` file) with its compiled loss.

    Raises:
        InputError: If the file is missing, has another suffix or cannot be read as a Keras model.
    """
    return loading.load_model(path, single_output=True, error=InputError)


LOSSES: dict[str, str] = {
    "sparse_categorical_crossentropy": "sparse",
    "categorical_crossentropy": "categorical",
    "binary_crossentropy": "binary",
    "mse": "regression",
}
"""Loss names accepted by :func:`resolve_loss` (and the ``--loss`` flag), with the kind of targets they expect."""


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A per-example loss and what it expects.

    Attributes:
        function: The loss ``(y_true, y_pred) -> [batch]`` (reduction none for Keras loss objects).
        name: A readable name, e.g. ``"sparse_categorical_crossentropy"`` or the compiled loss' class name.
        kind: ``"sparse"`` (class indices), ``"categorical"`` (one-hot), ``"binary"`` (targets in ``[0, 1]``),
            ``"regression"`` (targets shaped like the outputs) or ``"other"`` (not checked).
        from_logits: Whether the model outputs logits (decides the predicted class of a single binary output).
        compiled: Whether the loss is the model's compiled loss.
    """

    function: Any
    name: str
    kind: str
    from_logits: bool
    compiled: bool


def resolve_loss(model: Any, name: str | None, *, from_logits: bool = False) -> LossSpec:
    """The loss of the commands: a named one (:data:`LOSSES`) or, when ``name`` is None, the model's compiled loss.

    Args:
        model: The loaded Keras model.
        name: One of :data:`LOSSES`, or None for the compiled loss.
        from_logits: For a named cross-entropy: whether the model outputs logits (ignored by ``"mse"``).

    Raises:
        InputError: If ``name`` is None and the model was saved without a compiled loss.
        ValueError: For an unknown name.
    """
    if name is not None:
        if name not in LOSSES:
            raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.")
        kind = LOSSES[name]
        if kind == "sparse":
            function: Any = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction="none")
        elif kind == "categorical":
            function = keras.losses.CategoricalCrossentropy(from_logits=from_logits, reduction="none")
        elif kind == "binary":
            function = keras.losses.BinaryCrossentropy(from_logits=from_logits, reduction="none")
        else:
            function = keras.losses.MeanSquaredError(reduction="none")
        return LossSpec(function, name, kind, from_logits and kind != "regression", compiled=False)
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise InputError(
            "the model was saved without a compiled loss: choose one with --loss "
            f"({'|'.join(LOSSES)}) and --from-logits if it outputs logits"
        )
    if isinstance(compiled, (dict, list, tuple)):
        raise InputError("the model is compiled with several losses; choose one with --loss")
    config = compiled.get_config() if hasattr(compiled, "get_config") else {}
    raw_name = compiled if isinstance(compiled, str) else getattr(compiled, "__name__", type(compiled).__name__)
    key = str(raw_name).lower()
    canonical = {
        "sparsecategoricalcrossentropy": "sparse_categorical_crossentropy",
        "categoricalcrossentropy": "categorical_crossentropy",
        "binarycrossentropy": "binary_crossentropy",
        "meansquarederror": "mse",
        "mean_squared_error": "mse",
    }.get(key, key)
    kind = LOSSES.get(canonical, "other")
    return LossSpec(_per_example(compiled), canonical, kind, bool(config.get("from_logits", False)), compiled=True)


def _per_example(loss: Any) -> Any:
    """The compiled loss with one value per example: loss objects rebuilt with reduction none, names resolved."""
    if isinstance(loss, str):
        return keras.losses.get(loss)  # Keras' loss functions return one value per example
    if isinstance(loss, keras.losses.Loss) and getattr(loss, "reduction", None) not in (None, "none"):
        config = dict(loss.get_config())
        config["reduction"] = "none"
        return type(loss).from_config(config)
    return loss


def _single_output(outputs: Any) -> tf.Tensor:
    flat = tf.nest.flatten(outputs)
    if len(flat) != 1:
        raise InputError(f"the model returns {len(flat)} outputs; the commands need a single output")
    return tf.convert_to_tensor(flat[0])


def prepare_dataset(model: Any, dataset: tf.data.Dataset, loss: LossSpec) -> tf.data.Dataset:
    """Adapt a dataset to the model: integer inputs of a float model are cast, and one-value targets ``[B]`` become
    ``[B, 1]`` for a single-output model with a binary or regression loss (what Keras' ``fit`` does implicitly).

    Args:
        model: The Keras model.
        dataset: Batched ``(inputs, targets[, sample_weight])``.
        loss: The loss (its kind decides the target reshaping).

    Returns:
        The mapped dataset (the same object when nothing needs changing).
    """
    spec = unpack_batch(dataset.element_spec)
    cast_to = None
    model_inputs = getattr(model, "inputs", None) or []
    if len(model_inputs) == 1 and not isinstance(spec.inputs, (tuple, list, dict)):
        wanted = tf.as_dtype(model_inputs[0].dtype)
        if wanted.is_floating and not spec.inputs.dtype.is_floating:
            cast_to = wanted
    reshape = False
    output_shape = _output_shape(model)
    targets = spec.targets
    if (
        loss.kind in ("binary", "regression")
        and isinstance(targets, tf.TensorSpec)
        and targets.shape.rank == 1
        and output_shape is not None
        and len(output_shape) == 2
        and output_shape[-1] == 1
    ):
        reshape = True
    if cast_to is None and not reshape:
        return dataset

    def adapt(*parts: Any) -> tuple[Any, ...]:
        inputs, targets, *rest = parts
        if cast_to is not None:
            inputs = tf.cast(inputs, cast_to)
        if reshape:
            targets = tf.reshape(targets, [-1, 1])
        return (inputs, targets, *rest)

    return dataset.map(adapt)


def _output_shape(model: Any) -> tuple[Any, ...] | None:
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) == 1:
        return tuple(outputs[0].shape)
    return None


@dataclasses.dataclass(frozen=True)
class ScanResult:
    """What one pass of the model over a dataset found.

    Attributes:
        labels: One label per example ``[N]`` (class index, or the target value, or a short text for vectors).
        predicted: The model's predicted label ``[N]`` in the same form.
        losses: Per-example losses ``[N]`` (times the sample weights), as in the training objective.
        num_outputs: The model's outputs per example.
        num_examples: ``N``.
    """

    labels: np.ndarray
    predicted: np.ndarray
    losses: np.ndarray
    num_outputs: int
    num_examples: int


def scan_dataset(model: Any, dataset: tf.data.Dataset, loss: LossSpec, *, what: str = "training") -> ScanResult:
    """Run the model over a dataset, checking that the targets fit its outputs for ``loss``.

    Checks (for the known loss kinds): class indices within ``[0, outputs)`` and integer-valued for a sparse loss,
    one-hot targets as wide as the outputs for a categorical loss, targets in ``[0, 1]`` and shaped like the outputs
    for a binary loss, targets shaped like the outputs for a regression loss.

    Args:
        model: The Keras model.
        dataset: The prepared (see :func:`prepare_dataset`) batched dataset.
        loss: The loss.
        what: ``"training"`` or ``"test"``: names the examples in error messages.

    Returns:
        The labels, predictions and losses of every example.

    Raises:
        InputError: At the first example whose target does not fit (its index and what mismatched).
    """
    labels, predicted, losses = [], [], []
    offset, num_outputs = 0, 0
    for batch in dataset:
        structure = unpack_batch(batch)
        outputs = _single_output(model(structure.inputs, training=False))
        targets = np.asarray(tf.nest.flatten(structure.targets)[0])
        prediction = outputs.numpy()
        num_outputs = int(np.prod(prediction.shape[1:])) if prediction.ndim > 1 else 1
        _check_targets(targets, prediction, loss, offset, what)
        try:
            values = tf.convert_to_tensor(loss.function(structure.targets, outputs))
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise InputError(
                f"the loss {loss.name} failed on {what} examples {offset}-{offset + len(targets) - 1} "
                f"(targets {targets.shape[1:]}, outputs {prediction.shape[1:]}): {_first_line(error)}"
            ) from error
        values = np.asarray(values, dtype=np.float64).reshape(len(targets), -1).mean(axis=1)
        if structure.sample_weight is not None:
            values = values * np.asarray(structure.sample_weight, dtype=np.float64).reshape(-1)
        labels.append(_label_column(targets, loss.kind))
        predicted.append(_predicted_column(prediction, loss))
        losses.append(values)
        offset += len(targets)
    if offset == 0:
        raise InputError(f"the {what} data holds no example")
    return ScanResult(
        labels=np.concatenate(labels),
        predicted=np.concatenate(predicted),
        losses=np.concatenate(losses),
        num_outputs=num_outputs,
        num_examples=offset,
    )


def _check_targets(targets: np.ndarray, outputs: np.ndarray, loss: LossSpec, offset: int, what: str) -> None:
    per_output = int(np.prod(outputs.shape[1:])) if outputs.ndim > 1 else 1
    per_target = int(np.prod(targets.shape[1:])) if targets.ndim > 1 else 1
    plural = "s" if per_output != 1 else ""
    if loss.kind == "sparse":
        if per_output == 1:
            raise InputError(
                f"the model has 1 output per example (a regression or binary output) but {loss.name} needs one "
                "output per class: use --loss binary_crossentropy for a binary classifier or --loss mse"
            )
        if per_target != 1:
            raise InputError(
                f"{loss.name} needs one class index per example, but the targets have shape {targets.shape[1:]}"
                + (": they look one-hot, use --loss categorical_crossentropy" if per_target == per_output else "")
            )
        flat = targets.reshape(-1)
        if not np.issubdtype(flat.dtype, np.number):
            raise InputError(f"{loss.name} needs numeric class labels, got dtype {flat.dtype}")
        bad = np.flatnonzero((flat != np.round(flat)) | (flat < 0) | (flat >= per_output))
        if bad.size:
            index = int(bad[0])
            label = flat[index]
            largest = flat.max()
            reason = (
                f"has label {label!r}, not a class index"
                if label != np.round(label)
                else f"has label {_number(label)} (labels go up to {_number(largest)} in its batch) but the model "
                f"has {per_output} outputs, classes 0-{per_output - 1}"
            )
            raise InputError(f"the model's outputs do not fit the labels: {what} example {offset + index} {reason}")
    elif loss.kind == "categorical":
        if per_target != per_output:
            detail = (
                "class indices: use --loss sparse_categorical_crossentropy"
                if per_target == 1
                else f"{per_target} columns"
            )
            raise InputError(
                f"the model's outputs do not fit the targets: {loss.name} needs one-hot targets with {per_output} "
                f"column{plural} (one per output), but the {what} targets are {detail}"
            )
    elif loss.kind in ("binary", "regression"):
        if per_target != per_output:
            raise InputError(
                f"the model's outputs do not fit the targets: the model has {per_output} output{plural} per example "
                f"but the {what} targets have {per_target} value{'s' if per_target != 1 else ''}; {loss.name} needs "
                "targets shaped like the outputs"
                + (" (class labels? use --loss sparse_categorical_crossentropy)" if per_target == 1 else "")
            )
        if loss.kind == "binary":
            rows = targets.reshape(len(targets), -1)
            bad = np.flatnonzero(np.any((rows < 0) | (rows > 1), axis=1))
            if bad.size:
                index = int(bad[0])
                raise InputError(
                    f"{loss.name} needs targets in [0, 1], but {what} example {offset + index} has "
                    f"{_number(rows[index].max() if rows[index].max() > 1 else rows[index].min())} (class labels? "
                    "use --loss sparse_categorical_crossentropy with one output per class)"
                )


def _number(value: Any) -> Any:
    value = np.asarray(value).item()
    return int(value) if float(value).is_integer() else value


def _label_column(targets: np.ndarray, kind: str) -> np.ndarray:
    flat = targets.reshape(len(targets), -1)
    if kind == "categorical" or (kind == "other" and flat.shape[1] > 1 and np.all((flat == 0) | (flat == 1))):
        return np.argmax(flat, axis=1)
    if flat.shape[1] == 1:
        values = flat[:, 0]
        if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)) and kind != "regression":
            return values.astype(np.int64)
        return values
    return np.array([" ".join(f"{v:.4g}" for v in row[:8]) + (" …" if len(row) > 8 else "") for row in flat])


def _predicted_column(outputs: np.ndarray, loss: LossSpec) -> np.ndarray:
    flat = outputs.reshape(len(outputs), -1)
    if loss.kind in ("sparse", "categorical") or (loss.kind == "other" and flat.shape[1] > 1):
        return np.argmax(flat, axis=1)
    if loss.kind == "binary":
        threshold = 0.0 if loss.from_logits else 0.5
        decided = (flat > threshold).astype(np.int64)
        return decided[:, 0] if flat.shape[1] == 1 else np.array([" ".join(map(str, row)) for row in decided])
    if flat.shape[1] == 1:
        return flat[:, 0].astype(np.float64)
    return np.array([" ".join(f"{v:.4g}" for v in row[:8]) + (" …" if len(row) > 8 else "") for row in flat])


def gather_inputs(dataset: tf.data.Dataset, indices: Sequence[int]) -> np.ndarray | None:
    """The inputs of the examples at ``indices`` (dataset order), stacked in the order of ``indices``.

    One pass over the dataset that keeps only the wanted examples. Returns None for multi-input models (their inputs
    are not one array), which reports then show without feature values.
    """
    wanted = {int(index): position for position, index in enumerate(indices)}
    if not wanted:
        return None
    found: dict[int, np.ndarray] = {}
    offset = 0
    for batch in dataset:
        inputs = unpack_batch(batch).inputs
        if isinstance(inputs, (tuple, list, dict)):
            return None
        array = np.asarray(inputs)
        for row in range(len(array)):
            if offset + row in wanted:
                found[offset + row] = array[row]
        offset += len(array)
        if len(found) == len(wanted):
            break
    return np.stack([found[int(index)] for index in indices])
