"""The engine's streams: each dataset validated once into an :class:`~influenciae.data.IndexedStream`, and the
grouping of its batches into blocks (consecutive batches merged for one hook call, values handed back per batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from influenciae._backend import tf
from influenciae.data import (
    IndexedStream,
    TensorBatches,
    TensorStream,
    batch_checks,
    check_dataset,
    check_first_batch,
    checked_iteration,
    sparse_classes,
    with_checks,
    with_indices,
)
from influenciae.data.streams import Stream
from influenciae.model import InfluenceModel

__all__ = ["Streams", "chunks", "row_groups", "merged_indices", "merged_batch", "split_rows"]

Pair = tuple[tf.Tensor, Any]  # (indices [B] int64, batch)


class Streams:
    """Validation once, at the boundary: what :class:`~influenciae.influence.base.BaseInfluenceCalculator`'s public
    methods call on each dataset before handing its stream to the internals."""

    model: InfluenceModel
    show_progress: bool

    def _batch_check(self) -> tuple[Callable[[Any], Any], str] | None:
        """What the first batch of a dataset is checked against: ``(function, what it computes)``, or ``None``.

        ``None`` (default): :meth:`InfluenceModel.validate_batch`, the model and its loss. Calculators that use no
        loss (activations, decision boundaries) check the part of the model they run (see
        :func:`~influenciae.data.check_first_batch`).
        """
        return None

    def check_batches(self, dataset: tf.data.Dataset, *, name: str = "dataset") -> None:
        """Run the per-batch input checks over a whole dataset without computing anything.

        The same in-graph checks every pass of the engine applies (finite inputs, targets and sample weights;
        sparse labels that are whole numbers in ``[0, C)`` for a ``[B, C]`` output), for datasets that a solver
        reads before the engine does (e.g. the Hessian dataset). Costs one read of the data.

        Args:
            dataset: A batched dataset of ``(inputs, targets[, sample_weight])``.
            name: The argument's name, for the message.

        Raises:
            ValueError: If a batch fails a check; the message names the batch and the fix.
        """
        check_dataset(dataset, name=name)
        for _ in checked_iteration(self._checked(dataset), name=name):
            pass

    def _bar(self, description: str) -> Callable[[Iterable[Any]], Iterable[Any]] | None:
        """A progress-bar wrapper for a pass, or ``None`` without progress bars."""
        if not self.show_progress:
            return None
        name = type(self).__name__
        return lambda items: tqdm(items, desc=f"{name}: {description}", unit="batch", dynamic_ncols=True)

    def _stream(self, dataset: tf.data.Dataset | TensorBatches, name: str) -> Stream:
        """Validate ``dataset`` once (structure, first batch against the model) and return its indexed stream."""
        check_dataset(dataset, name=name)
        if isinstance(dataset, TensorBatches):
            return self._tensor_stream(dataset, name)
        validated: dict[int, tf.data.Dataset] = self.__dict__.setdefault("_validated", {})
        if validated.get(id(dataset)) is not dataset:
            self._validate_first_batch(dataset)
            if len(validated) >= _CHECKED_PIPELINES:
                validated.pop(next(iter(validated)))
            validated[id(dataset)] = dataset
        return IndexedStream(dataset, self._checked(dataset), name)

    def _tensor_stream(self, batches: TensorBatches, name: str) -> TensorStream:
        """The stream of held batches: the first-batch check once per structure, the in-graph checks traced once."""
        spec = batches.element_spec
        key = (repr(spec), self._sparse_classes(batches))
        checks: dict[Any, Any] = self.__dict__.setdefault("_tensor_checks", {})
        if key not in checks:
            self._validate_first_batch(batches)
            checks[key] = tf.function(batch_checks(key[1]), reduce_retracing=True, autograph=False)
        return TensorStream(batches, checks[key], name)

    def _validate_first_batch(self, dataset: tf.data.Dataset) -> None:
        check = self._batch_check()
        if check is not None:
            check_first_batch(dataset, *check)
            return
        for batch in dataset.take(1):
            self.model.validate_batch(batch)

    def _checked(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """The indexed, checked pipeline of ``dataset``, reused for the last few datasets (its map traces once).

        Held strongly for at most ``_CHECKED_PIPELINES`` datasets (a pipeline references its dataset, so a weak
        mapping would never let go of them either).
        """
        pipelines: dict[int, tuple[tf.data.Dataset, tf.data.Dataset]] = self.__dict__.setdefault("_pipelines", {})
        entry = pipelines.get(id(dataset))
        if entry is not None and entry[0] is dataset:
            return entry[1]
        checked = with_indices(with_checks(dataset, num_classes=self._sparse_classes(dataset)))
        if len(pipelines) >= _CHECKED_PIPELINES:
            pipelines.pop(next(iter(pipelines)))
        pipelines[id(dataset)] = (dataset, checked)
        return checked

    def _sparse_classes(self, dataset: tf.data.Dataset) -> int | None:
        """``C`` when the targets are sparse class labels for a ``[B, C]`` output (``C > 1``), else ``None``."""
        return sparse_classes(self.model.model, dataset)


_CHECKED_PIPELINES = 4  # datasets whose checked pipeline (and first-batch check) a calculator keeps


def chunks(items: Iterable[Pair], size: int | None) -> Iterator[list[Pair]]:
    """Consecutive groups of ``size`` items (all of them in one group when ``size`` is None)."""
    group: list[Pair] = []
    for item in items:
        group.append(item)
        if size is not None and len(group) == size:
            yield group
            group = []
    if group:
        yield group


def row_groups(stream: Iterable[Pair], rows: int, every: int | None = None) -> Iterator[list[Pair]]:
    """Consecutive ``(indices, batch)`` pairs grouped until a group holds at least ``rows`` examples (1: one each).

    With ``every``, a group also ends after each ``every``-th batch of the stream, so that grouping the stream's
    runs of ``every`` batches separately (a disk cache's shards) gives the same groups.
    """
    group: list[Pair] = []
    count = 0
    for position, (indices, batch) in enumerate(stream, start=1):
        group.append((indices, batch))
        count += int(indices.shape[0])
        if count >= rows or (every is not None and position % every == 0):
            yield group
            group, count = [], 0
    if group:
        yield group


def merged_indices(group: list[Pair]) -> tf.Tensor:
    return group[0][0] if len(group) == 1 else tf.concat([indices for indices, _ in group], axis=0)


def merged_batch(group: list[Pair]) -> Any:
    """The group's batches (same nested structure) concatenated along the example axis."""
    if len(group) == 1:
        return group[0][1]
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *[batch for _, batch in group])


def split_rows(values: tf.Tensor, group: list[Pair]) -> list[tf.Tensor]:
    """Values of a group's rows handed back per batch."""
    if len(group) == 1:
        return [values]
    return tf.split(values, [int(tf.shape(indices)[0]) for indices, _ in group])


def _check_finite(values: np.ndarray, method: str, kind: str, *, allow_infinite: bool = False) -> np.ndarray:
    """Return ``values`` if all are finite, else raise a ``ValueError`` naming the first offending examples."""
    finite = ~np.isnan(values) if allow_infinite else np.isfinite(values)
    if finite.all():
        return values
    bad = np.argwhere(~finite)
    shown = ", ".join(str(tuple(int(i) for i in row)) if row.size > 1 else str(int(row[0])) for row in bad[:5])
    raise ValueError(
        f"{method} produced {int(bad.shape[0])} non-finite value(s), at {kind} example index(es) {shown}"
        f"{' ...' if bad.shape[0] > 5 else ''}. Check those examples' inputs for huge or invalid values, and if the "
        "inputs are sound the inverse Hessian is ill-conditioned: pass a larger damping to the IHVP solver."
    )
