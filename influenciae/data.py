"""tf.data helpers: batch structure, validation, sample indices and numpy adapters.

Every dataset the library consumes yields batches ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``.
Nothing here reads private dataset attributes or trusts ``cardinality()``: datasets after ``map``, ``filter``,
``prefetch`` or ``cache``, with a partial last batch or an unknown length all behave the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from influenciae._backend import tf

__all__ = [
    "Batch",
    "unpack_batch",
    "check_dataset",
    "batch_size_of",
    "from_numpy",
    "with_indices",
    "iterate_batches",
    "check_stable_order",
]


class Batch(NamedTuple):
    """One batch of examples.

    Attributes:
        inputs: The model inputs: a tensor ``[batch, ...]`` or a nested structure of them.
        targets: The targets ``[batch, ...]``.
        sample_weight: Per-example weights ``[batch]``, or ``None`` for unit weights.
    """

    inputs: Any
    targets: Any
    sample_weight: Any | None


def unpack_batch(batch: Any) -> Batch:
    """Split a dataset element into inputs, targets and optional sample weights.

    Args:
        batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``; a :class:`Batch` passes through.

    Returns:
        The batch as a :class:`Batch`.

    Raises:
        TypeError: If the element is not a tuple/list of two or three parts.
    """
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        sample_weight = batch[2] if len(batch) == 3 else None
        return Batch(batch[0], batch[1], sample_weight)
    raise TypeError(
        "A batch must be a tuple (inputs, targets) or (inputs, targets, sample_weight); got "
        f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}. "
        "Map your dataset to that structure, e.g. `dataset.map(lambda d: (d['image'], d['label']))`."
    )


def check_dataset(dataset: Any, *, name: str = "dataset") -> tf.data.Dataset:
    """Check that ``dataset`` is a batched ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])``.

    Args:
        dataset: The object to check.
        name: The argument name used in error messages.

    Returns:
        The same dataset.

    Raises:
        TypeError: If it is not a ``tf.data.Dataset`` or its elements have the wrong structure.
        ValueError: If it is visibly unbatched (scalar targets or scalar sample weights).
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"{name} must be a tf.data.Dataset, got {type(dataset).__name__}. Build one with "
            "`influenciae.data.from_numpy(x, y, batch_size=...)` or `tf.data.Dataset.from_tensor_slices((x, y))"
            ".batch(...)`."
        )
    spec = dataset.element_spec
    structure = unpack_batch(spec)  # raises the structural TypeError
    target_specs = tf.nest.flatten(structure.targets)
    if any(s.shape.rank == 0 for s in target_specs) or (
        structure.sample_weight is not None and structure.sample_weight.shape.rank == 0
    ):
        raise ValueError(
            f"{name} looks unbatched: its targets are scalars, so there is no batch dimension. "
            f"Call `{name}.batch(batch_size)` before passing it."
        )
    return dataset


def batch_size_of(batch: Any) -> tf.Tensor:
    """The number of examples in a batch (dynamic, so a partial last batch is fine)."""
    structure = unpack_batch(batch)
    return tf.shape(tf.nest.flatten(structure.targets)[0])[0]


def from_numpy(
    inputs: Any,
    targets: Any,
    *,
    sample_weight: Any | None = None,
    batch_size: int = 32,
) -> tf.data.Dataset:
    """A batched dataset from in-memory arrays.

    Args:
        inputs: Array ``[N, ...]`` (or a tuple/dict of them for multi-input models).
        targets: Array ``[N, ...]``.
        sample_weight: Optional array ``[N]``.
        batch_size: Batch size; the last batch may be partial.

    Returns:
        A dataset of ``(inputs, targets[, sample_weight])`` batches in array order.

    Example:
        >>> ds = from_numpy(np.zeros((10, 3)), np.zeros(10), batch_size=4)
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    parts = (inputs, targets) if sample_weight is None else (inputs, targets, sample_weight)
    lengths = {len(p) for p in tf.nest.flatten(parts)}
    if len(lengths) != 1:
        raise ValueError(f"inputs, targets and sample_weight must have the same length, got lengths {lengths}.")
    return tf.data.Dataset.from_tensor_slices(parts).batch(int(batch_size))


def with_indices(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Pair each batch with the dataset-order indices of its examples.

    Args:
        dataset: A batched dataset.

    Returns:
        A dataset of ``(indices [batch] int64, batch)``: indices count examples from 0 in iteration order.
    """

    def attach(start: tf.Tensor, batch: Any) -> tuple[tf.Tensor, tuple[tf.Tensor, Any]]:
        count = tf.cast(batch_size_of(batch), tf.int64)
        return start + count, (tf.range(start, start + count), batch)

    return dataset.scan(tf.constant(0, tf.int64), attach)


def iterate_batches(dataset: tf.data.Dataset) -> Iterator[Batch]:
    """Iterate a checked dataset, yielding :class:`Batch` tuples."""
    for element in check_dataset(dataset):
        yield unpack_batch(element)


def check_stable_order(dataset: tf.data.Dataset, *, name: str = "dataset", num_batches: int = 2) -> None:
    """Refuse a dataset whose order changes from one iteration to the next (e.g. ``.shuffle()`` reshuffling).

    Training examples are named by their position in the iteration order, so a stored result (a cache shard, a
    solver state's test factors) is only meaningful if every pass yields the same examples in the same order. The
    first ``num_batches`` batches of two iterations are hashed and compared (public API only: no graph reading).

    Args:
        dataset: A batched dataset.
        name: The argument's name, for the message.
        num_batches: How many leading batches to compare.

    Raises:
        ValueError: If two iterations start with different batches.
    """
    from influenciae.fingerprint import hash_batch

    first = [hash_batch(batch) for batch in dataset.take(num_batches)]
    second = [hash_batch(batch) for batch in dataset.take(num_batches)]
    if first != second:
        raise ValueError(
            f"{name} yields its examples in another order on every iteration (a `.shuffle()` that reshuffles each "
            "iteration?). Results name training examples by their position, so the order must be fixed: shuffle once "
            "with `.shuffle(buffer, seed=0, reshuffle_each_iteration=False)`, or do not shuffle after caching."
        )
