"""tf.data helpers: batch structure, validation, sample indices, numpy adapters and held batches.

Every dataset the library consumes yields batches ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``.
Nothing here reads private dataset attributes or trusts ``cardinality()``: datasets after ``map``, ``filter``,
``prefetch`` or ``cache``, with a partial last batch or an unknown length all behave the same.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from influenciae._backend import tf

__all__ = [
    "Batch",
    "unpack_batch",
    "check_dataset",
    "batch_size_of",
    "split_batch",
    "from_numpy",
    "with_indices",
    "iterate_batches",
    "check_stable_order",
    "with_checks",
    "checked_iteration",
    "CheckedBatches",
    "sparse_classes",
    "TensorBatches",
    "batch_checks",
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
    if not isinstance(dataset, (tf.data.Dataset, TensorBatches)):
        raise TypeError(
            f"{name} must be a tf.data.Dataset, got {type(dataset).__name__}. Build one with "
            "`influenciae.data.from_numpy(x, y, batch_size=...)` or `tf.data.Dataset.from_tensor_slices((x, y))"
            ".batch(...)`."
        )
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"{name} is infinite (it repeats forever, e.g. `.repeat()` without a count), so a pass over it never "
            f"ends. Pass the finite dataset: drop `.repeat()` or use `{name}.take(number_of_batches)`."
        )
    spec = dataset.element_spec
    structure = unpack_batch(spec)  # raises the structural TypeError
    for part, specs in (("inputs", structure.inputs), ("targets", structure.targets)):
        for leaf in tf.nest.flatten(specs):
            if getattr(leaf, "dtype", None) == tf.string:
                raise TypeError(
                    f"{name} has string {part}: the model needs numbers. Encode them first, e.g. with "
                    "`keras.layers.StringLookup` or `keras.layers.TextVectorization` in a `dataset.map`."
                )
    if structure.sample_weight is not None and getattr(structure.sample_weight, "dtype", None) == tf.string:
        raise TypeError(f"{name} has string sample weights: pass float weights of shape [batch].")
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


def split_batch(batch: Any, dtype: tf.DType) -> tuple[Any, Any, tf.Tensor]:
    """``(inputs, targets, weights [B])`` of a batch: targets as tensors, unit weights when it has none.

    Args:
        batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``.
        dtype: The dtype of the weights.
    """
    structure = unpack_batch(batch)
    targets = tf.nest.map_structure(tf.convert_to_tensor, structure.targets)
    if structure.sample_weight is None:
        weights = tf.ones([tf.shape(tf.nest.flatten(targets)[0])[0]], dtype)
    else:
        weights = tf.cast(tf.reshape(structure.sample_weight, [-1]), dtype)
    return structure.inputs, targets, weights


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

    return dataset.scan(tf.constant(0, tf.int64), _attach_indices)


@tf.function(reduce_retracing=True, autograph=False)
def _attach_indices(start: tf.Tensor, batch: Any) -> tuple[tf.Tensor, tuple[tf.Tensor, Any]]:
    # one traced function for every pipeline: a new dataset's scan calls it instead of tracing its ops again
    count = tf.cast(batch_size_of(batch), tf.int64)
    return start + count, (tf.range(start, start + count), batch)


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
    from influenciae.cache.fingerprint import hash_batch

    first = [hash_batch(batch) for batch in dataset.take(num_batches)]
    second = [hash_batch(batch) for batch in dataset.take(num_batches)]
    if first != second:
        raise ValueError(
            f"{name} yields its examples in another order on every iteration (a `.shuffle()` that reshuffles each "
            "iteration?). Results name training examples by their position, so the order must be fixed: shuffle once "
            "with `.shuffle(buffer, seed=0, reshuffle_each_iteration=False)`, or do not shuffle after caching."
        )


def with_checks(dataset: tf.data.Dataset, *, num_classes: int | None = None) -> tf.data.Dataset:
    """Add cheap in-graph checks to every batch: finite values, and sparse labels that are class indices.

    The checks are ``tf.debugging`` assertions inside a ``dataset.map`` (no Python per batch). A failing batch
    raises ``tf.errors.InvalidArgumentError`` when it is fetched; iterate with :func:`checked_iteration` to turn it
    into a ``ValueError`` naming the batch.

    Args:
        dataset: A batched dataset of ``(inputs, targets[, sample_weight])``.
        num_classes: When the targets are sparse class labels (one rank below a ``[B, C]`` output), ``C``: the
            labels must then be whole numbers in ``[0, C)``.

    Returns:
        The same batches, checked.
    """
    spec = dataset.element_spec
    return dataset.map(_traced_checks(num_classes, len(spec) if isinstance(spec, tuple) else 1))


@functools.cache
def _traced_checks(num_classes: int | None, parts: int) -> Callable[..., Any]:
    """:func:`batch_checks` as one ``tf.function`` per class count and number of batch parts (2 or 3), shared by
    every pipeline: a new dataset's ``map`` calls the traced checks instead of tracing them again."""
    return tf.function(batch_checks(num_classes), reduce_retracing=True, autograph=False)


def batch_checks(num_classes: int | None = None) -> Callable[..., Any]:
    """The checks of :func:`with_checks` as a function of one batch (the same batch back, behind the assertions)."""

    def check(*element: Any) -> Any:
        batch = unpack_batch(element if len(element) > 1 else element[0])
        deps = []
        for part, tensors in (
            ("inputs", batch.inputs),
            ("targets", batch.targets),
            ("sample weights", batch.sample_weight),
        ):
            for tensor in tf.nest.flatten(tensors):
                if tensor is not None and tensor.dtype.is_floating:
                    deps.append(tf.debugging.assert_all_finite(tensor, f"influenciae-check{{non-finite {part}}}"))
        if num_classes is not None:
            for labels in tf.nest.flatten(batch.targets):
                values = tf.cast(labels, tf.float64)
                deps.append(
                    tf.debugging.assert_equal(
                        values, tf.round(values), message="influenciae-check{fractional sparse labels}"
                    )
                )
                deps.append(
                    tf.debugging.assert_non_negative(values, message="influenciae-check{negative sparse labels}")
                )
                deps.append(
                    tf.debugging.assert_less(
                        values,
                        tf.constant(num_classes, tf.float64),
                        message=f"influenciae-check{{sparse labels >= the {num_classes} classes of the model output}}",
                    )
                )
        with tf.control_dependencies(deps):
            return tf.nest.map_structure(tf.identity, element if len(element) > 1 else element[0])

    return check


def sparse_classes(keras_model: Any, dataset: tf.data.Dataset) -> int | None:
    """``C`` when ``dataset``'s targets are sparse class labels for ``keras_model``'s ``[B, C]`` output, else None.

    Args:
        keras_model: The wrapped Keras model (one output of shape ``[B, C]`` with ``C > 1`` for a class count).
        dataset: A batched dataset of ``(inputs, targets[, sample_weight])`` with targets ``[B]`` or ``[B, 1]``.

    Returns:
        The number of classes the labels must lie in, or ``None`` when the targets are not sparse labels.
    """
    try:
        outputs = keras_model.outputs
    except (AttributeError, ValueError):
        return None
    targets = tf.nest.flatten(check_dataset(dataset).element_spec[1])
    if not outputs or len(outputs) != 1 or len(targets) != 1:
        return None
    output_shape, target_shape = tf.TensorShape(outputs[0].shape), tf.TensorShape(targets[0].shape)
    if output_shape.rank != 2 or output_shape[-1] is None or output_shape[-1] < 2 or target_shape.rank is None:
        return None
    if target_shape.rank == 1 or (target_shape.rank == 2 and target_shape[-1] == 1):
        return int(output_shape[-1])
    return None


class CheckedBatches:
    """A dataset's batches behind the per-batch checks, re-iterable: what solvers read to build a curvature.

    The first complete pass runs the in-graph checks; once every batch has passed, later passes (an iterative
    solver reads the data at every iteration) iterate the dataset itself: a checked pipeline costs about 20 ms per
    pass to instantiate, twenty times a small dataset's pass. A batch that fails a check raises the ``ValueError``
    of :func:`checked_iteration`, naming the batch and the fix. (A pipeline that produces other values on every
    pass, e.g. random augmentation, is checked on its first pass only.)

    Args:
        dataset: A batched dataset of ``(inputs, targets[, sample_weight])`` (may be infinite, e.g. ``.repeat()``
            for stochastic solvers).
        num_classes: See :func:`with_checks`.
        name: The argument's name, for the message.

    Example:
        >>> for batch in CheckedBatches(train_ds, num_classes=10, name="dataset"):
        ...     total += model.batch_hvp_sum(batch, vectors)
    """

    def __init__(self, dataset: tf.data.Dataset, *, num_classes: int | None, name: str) -> None:
        self.name = name
        self._dataset = dataset
        self._checked = with_checks(dataset, num_classes=num_classes)
        self._verified = False

    def __iter__(self) -> Iterator[Any]:
        if self._verified:  # every batch passed on a complete pass: later passes read the same data unchecked
            yield from self._dataset
            return
        yield from checked_iteration(self._checked, name=self.name, indexed=False)
        self._verified = True  # reached only when the pass ran to its end


_FIXES = {
    "non-finite": "remove or repair the examples with NaN/inf values (or mask them with a zero sample weight "
    "before building the dataset)",
    "fractional": "sparse losses take whole-number class labels: round or fix the labels, or use a "
    "categorical (one-hot) loss for soft labels",
    "negative": "class labels must be in [0, number of classes): fix the negative labels",
    ">=": "class labels must be in [0, number of classes): fix the labels or give the model more outputs",
}


def checked_iteration(iterable: Iterable[Any], *, name: str, indexed: bool = True) -> Iterator[Any]:
    """Iterate a dataset built with :func:`with_checks`, re-raising a failed check as a ``ValueError``.

    Args:
        iterable: ``(indices, batch)`` elements, as from :func:`with_indices` (possibly behind a progress bar), or
            plain batches with ``indexed=False``.
        name: The argument's name, for the message.
        indexed: Whether the elements are ``(indices, batch)`` pairs (else batches, counted by their targets).

    Yields:
        The elements of ``iterable``.

    Raises:
        ValueError: If a batch fails a check; the message names the batch (position and example range) and the fix.
    """
    iterator = iter(iterable)
    position, examples = 0, 0
    while True:
        try:
            element = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as error:
            raise _check_failure(error, name, position, examples) from None
        position += 1
        examples += int((element[0] if indexed else tf.nest.flatten(unpack_batch(element).targets)[0]).shape[0])
        yield element


def _check_failure(error: tf.errors.InvalidArgumentError, name: str, position: int, examples: int) -> Exception:
    """The ``ValueError`` for a failed in-graph check (naming the batch and the fix), or ``error`` itself."""
    found = re.search(r"influenciae-check\{([^}]*)\}", str(error))
    if found is None:
        return error
    what = found.group(1)
    fix = next((advice for key, advice in _FIXES.items() if key in what), "fix the data")
    return ValueError(f"{name}: batch {position} (examples from index {examples} on) has {what}. Fix: {fix}.")


@dataclasses.dataclass(frozen=True)
class TensorBatches:
    """Batches already held in memory, handed to the engine's public methods in place of a dataset (no ``tf.data``
    pipeline is built or iterated: what a distributed worker does with each shard it scores).

    Every public method of a calculator accepts it where it takes a batched dataset; the same checks run (the
    structure, the first batch against the model once per structure, the in-graph checks on every batch).

    Attributes:
        batches: The batches ``(inputs, targets[, sample_weight])`` as tensors, in order.

    Example:
        >>> calculator.self_influence(TensorBatches.of((x_block, y_block)))  # [B]
    """

    batches: tuple[Any, ...]

    @classmethod
    def of(cls, *batches: Any) -> TensorBatches:
        """Batches of numpy arrays or tensors (each ``(inputs, targets[, sample_weight])``), as tensors."""
        return cls(tuple(tf.nest.map_structure(tf.convert_to_tensor, tuple(batch)) for batch in batches))

    @property
    def element_spec(self) -> Any:
        """The batches' structure, with an unknown batch dimension (as a batched dataset's)."""
        if not self.batches:
            raise ValueError("TensorBatches needs at least one batch.")
        first = tf.nest.map_structure(tf.convert_to_tensor, self.batches[0])
        return tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), first)

    def cardinality(self) -> tf.Tensor:
        """The number of batches."""
        return tf.constant(len(self.batches), tf.int64)

    def take(self, count: int) -> TensorBatches:
        """The first ``count`` batches."""
        return TensorBatches(self.batches[:count])

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)
