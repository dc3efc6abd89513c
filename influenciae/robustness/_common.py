"""Shared pieces of the robustness wing: argument checks, batch iteration over tensors or datasets, and progress
bars. The model front (forward pass, default loss, predicted labels) is :mod:`influenciae.model.classifier`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from influenciae._backend import tf
from influenciae.data import Batch, check_dataset, unpack_batch

# ---------------------------------------------------------------------- argument checks


def check_non_negative(value: Any, name: str, *, allow_zero: bool = True) -> np.ndarray:
    """``value`` (scalar or ``[B]``) as a float64 array after checking it is finite and ``≥ 0`` (``> 0``)."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{name} must be a number or an array of numbers, got {value!r}.")
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float64)
    if array.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a [batch] vector (one per example), got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if np.any(array < 0) or (not allow_zero and np.any(array == 0)):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound} (a {'radius' if allow_zero else 'step'}), got {value!r}.")
    return array


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_bounds(lower: Any, upper: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Input bounds as float64 arrays (broadcastable to one example or the batch), ``lower ≤ upper`` everywhere."""
    arrays: list[np.ndarray | None] = []
    for name, bound in (("lower_bound", lower), ("upper_bound", upper)):
        if bound is None:
            arrays.append(None)
            continue
        array = np.asarray(bound.numpy() if hasattr(bound, "numpy") else bound, dtype=np.float64)
        if np.any(np.isnan(array)):
            raise ValueError(f"{name} must not contain NaN.")
        arrays.append(array)
    low, high = arrays
    if low is not None and high is not None:
        try:
            inverted = np.any(low > high)
        except ValueError as error:
            raise ValueError(f"lower_bound {low.shape} and upper_bound {high.shape} do not broadcast.") from error
        if inverted:
            raise ValueError("lower_bound must be ≤ upper_bound everywhere; the bounds are inverted.")
    return low, high


def per_example(values: np.ndarray, batch_size: int, name: str) -> np.ndarray:
    """A scalar or ``[B]`` array as ``[B]``."""
    if values.ndim == 0:
        return np.full(batch_size, float(values))
    if values.shape[0] != batch_size:
        raise ValueError(f"{name} has {values.shape[0]} values but the inputs have {batch_size} examples.")
    return values


# ---------------------------------------------------------------------- data


def is_dataset(inputs: Any) -> bool:
    return isinstance(inputs, tf.data.Dataset)


def as_batch(inputs: Any, targets: Any, owner: str, *, targets_required: bool = True) -> Batch:
    """One in-memory batch: inputs converted to floating tensors, targets to a tensor."""
    if targets is None and targets_required:
        raise ValueError(f"{owner} needs targets with a tensor batch (or pass a tf.data.Dataset of (inputs, targets)).")
    tensors = tf.nest.map_structure(tf.convert_to_tensor, inputs)
    for leaf in tf.nest.flatten(tensors):
        if not leaf.dtype.is_floating:
            raise TypeError(
                f"{owner} moves the inputs, so they must be floating point; got dtype {leaf.dtype.name}. "
                "Cast them (e.g. tf.cast(x, 'float32')) or perturb an embedding model instead."
            )
    return Batch(tensors, None if targets is None else tf.convert_to_tensor(targets), None)


def iterate(inputs: Any, targets: Any, owner: str, *, targets_required: bool = True) -> Iterator[Batch]:
    """The batches of a ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])``, or one ``(inputs, targets)``."""
    if is_dataset(inputs):
        if targets is not None:
            raise ValueError(f"{owner}: a dataset carries its own targets; pass targets=None with a tf.data.Dataset.")
        for element in check_dataset(inputs, name="inputs"):
            batch = unpack_batch(element)
            yield as_batch(batch.inputs, batch.targets, owner)._replace(sample_weight=batch.sample_weight)
        return
    yield as_batch(inputs, targets, owner, targets_required=targets_required)


def batch_size(inputs: Any) -> int:
    return int(tf.nest.flatten(inputs)[0].shape[0])


def progress(
    iterable: Iterable[Any], show: bool, description: str, total: int | None = None, unit: str = "batch"
) -> Any:
    if not show:
        return iterable
    return tqdm(iterable, desc=description, total=total, unit=unit, dynamic_ncols=True)


def known_cardinality(dataset: Any) -> int | None:
    if not is_dataset(dataset):
        return None
    count = int(dataset.cardinality())
    return count if count >= 0 else None


def rebuild_dataset(batches: list[tuple[Any, ...]], spec: Any) -> tf.data.Dataset:
    """A dataset that yields these in-memory batches, with the element spec of the dataset they came from."""
    signature = tf.nest.map_structure(lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), spec)
    return tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=signature)
