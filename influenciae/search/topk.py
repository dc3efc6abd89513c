"""The one top-k accumulator: running top-k results over blocks of candidates, merged exactly."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from influenciae.search.base import Block, block_top_k, check_k, check_order, merge_top_k_unchecked
from influenciae.types import ORDER

__all__ = ["TopK"]


class TopK:
    """The one top-k accumulator: candidate blocks merged exactly, in constant memory (``k`` per query).

    Every place that keeps "the best ``k`` so far" (the streaming strategy, the engine's self-influence top-k, the
    distributed merges) adds its candidates here; ties go to the smaller training index, so the result does not
    depend on how the candidates were split into blocks or in which order they came.

    Example:
        >>> best = TopK(2)
        >>> best.add([4, 1], [[0.5, 0.2]])
        >>> best.add([7], [[0.5]])
        >>> [t.numpy().tolist() for t in best.result()]
        [[[4, 7]], [[0.5, 0.5]]]

    Args:
        k: Number of candidates kept per query (positive int).
        order: ``ORDER.DESCENDING`` keeps the largest scores, ``ORDER.ASCENDING`` the smallest.
        empty_message: The message of the ``ValueError`` :meth:`result` raises when nothing was added.
    """

    def __init__(self, k: int, order: ORDER = ORDER.DESCENDING, *, empty_message: str = "no candidates") -> None:
        self.k = check_k(k)
        self.order = check_order(order)
        self.empty_message = empty_message
        self._k_tensor = tf.constant(self.k, tf.int32)
        self._best: Block | None = None

    def add(self, indices: Any, values: Any) -> None:
        """Merge candidates: ``indices [n]`` (shared by every query) or ``[m, n]``, their scores ``values [m, n]``."""
        values = tf.convert_to_tensor(values)
        indices = tf.cast(tf.convert_to_tensor(indices), tf.int64)
        if indices.shape.rank == 1:
            indices = tf.tile(indices[None], [tf.shape(values)[0], 1])
        if self._best is None:
            self._best = indices[:, :0], values[:, :0]
        self._best = _merge(*self._best, indices, values, self._k_tensor, self.order)

    def add_scores(self, queries: tf.Tensor, indices: tf.Tensor, vectors: tf.Tensor) -> None:
        """Merge the dot-product scores ``queries [m, dim] · vectors [n, dim]`` of a block of training vectors."""
        if self._best is None:
            self._best = tf.zeros_like(queries[:, :0], dtype=tf.int64), tf.cast(queries[:, :0], vectors.dtype)
        self._best = _merge_block(*self._best, queries, indices, vectors, self._k_tensor, self.order)

    @property
    def is_empty(self) -> bool:
        """Whether no candidate was added yet."""
        return self._best is None

    def result(self) -> Block:
        """``(indices [m, min(k, candidates)] int64, values [m, min(k, candidates)])``, best first."""
        if self._best is None:
            raise ValueError(self.empty_message)
        return self._best


@tf.function(reduce_retracing=True, autograph=False)
def _merge(
    best_indices: tf.Tensor, best_values: tf.Tensor, indices: tf.Tensor, values: tf.Tensor, k: tf.Tensor, order: ORDER
) -> Block:
    return merge_top_k_unchecked(best_indices, best_values, indices, tf.cast(values, best_values.dtype), k, order)


@tf.function(reduce_retracing=True, autograph=False)
def _merge_block(
    best_indices: tf.Tensor,
    best_values: tf.Tensor,
    queries: tf.Tensor,
    indices: tf.Tensor,
    vectors: tf.Tensor,
    k: tf.Tensor,
    order: ORDER,
) -> Block:
    """Merges a block ``(indices [block], vectors [block, dim])`` into the running top-k ``[queries, ≤k]``."""
    block_indices, block_values = block_top_k(tf.cast(queries, vectors.dtype), indices, vectors, k, order)
    best_values = tf.cast(best_values, vectors.dtype)
    return merge_top_k_unchecked(best_indices, best_values, block_indices, block_values, k, order)
