"""Linear search: all training vectors in one tensor, one matmul and one ``tf.math.top_k`` per block."""

from __future__ import annotations

import tensorflow as tf

from influenciae.search.base import Block, BlockSource, NearestNeighbors, block_top_k, merge_top_k_unchecked
from influenciae.types import ORDER

_SCORES_BUDGET = 2**25
"""Default bound on the number of scores (``num_queries × block_size``) held at once: 128 MiB in float32."""

_MIN_BLOCK_SIZE = 64


def _default_device() -> str:
    return "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"


@tf.function(reduce_retracing=True, autograph=False)
def _blocked_top_k(
    queries: tf.Tensor,
    indices: tf.Tensor,
    vectors: tf.Tensor,
    k: tf.Tensor,
    order: ORDER,
    block_size: tf.Tensor,
) -> Block:
    """Top-k of ``queries [num_queries, dim]`` over ``vectors [N, dim]`` sorted by ``indices [N]``.

    Everything but ``order`` is a tensor, so that one trace serves all instances, values of ``k`` and block
    sizes, and a rebuilt strategy never runs a trace holding its previous training tensors.
    """
    num_train = tf.shape(indices)[0]
    best = block_top_k(queries, indices[:block_size], vectors[:block_size], k, order, indices_are_sorted=True)

    def merge_next_block(
        start: tf.Tensor, best_indices: tf.Tensor, best_values: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        end = start + block_size
        block = block_top_k(queries, indices[start:end], vectors[start:end], k, order, indices_are_sorted=True)
        return (start + block_size, *merge_top_k_unchecked(best_indices, best_values, *block, k, order))

    _, best_indices, best_values = tf.while_loop(
        lambda start, *_: start < num_train,
        merge_next_block,
        (block_size, *best),
        # The running result grows from min(k, block_size) to k columns.
        shape_invariants=(block_size.shape, tf.TensorShape([None, None]), tf.TensorShape([None, None])),
    )
    return best_indices, best_values


class LinearNearestNeighbors(NearestNeighbors, name="linear"):
    """Exact top-k over training vectors materialized in one ``[num_train, dim]`` tensor.

    ``build`` reads the stream once, sorts the vectors by training index and places them on ``device``.
    ``query`` walks them in blocks of ``block_size`` rows inside a ``tf.function``: one ``queries @ blockᵀ``
    matmul and one ``tf.math.top_k`` per block, merged into a running top-k with
    :func:`~influenciae.search.base.merge_top_k`. Memory is the training matrix plus ``O(num_queries ×
    block_size)`` scores. Scores are in the dtype of the training vectors.

    Example:
        >>> strategy = LinearNearestNeighbors(block_size=2)
        >>> strategy.build((tf.constant([7, 3, 5]), tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])))
        >>> strategy.query(tf.constant([[1.0, -1.0]]), k=2, order=ORDER.ASCENDING)[0].numpy().tolist()
        [[3, 5]]

    Args:
        block_size: number of training vectors scored at once; ``None`` picks the largest block that holds
            at most ``2**25`` scores (``num_queries * block_size``), and at least 64 rows.
        device: where the training vectors live and the search runs, e.g. ``"/GPU:0"``; ``None`` chooses the
            first GPU if there is one, else the CPU.
    """

    def __init__(self, *, block_size: int | None = None, device: str | None = None) -> None:
        super().__init__()
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)):
            raise TypeError(f"block_size must be a positive int or None, got {block_size!r}.")
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size must be a positive int or None, got {block_size}.")
        self.block_size = block_size
        self.device = device
        self._indices: tf.Tensor | None = None
        self._vectors: tf.Tensor | None = None

    def _build(self, blocks: BlockSource) -> None:
        all_indices, all_vectors = [], []
        for indices, vectors in blocks():
            all_indices.append(indices)
            all_vectors.append(vectors)
        device = self.device or _default_device()
        with tf.device(device):
            if not all_vectors:
                self._indices = tf.zeros([0], dtype=tf.int64)
                self._vectors = tf.zeros([0, self._dimension or 0])
                return
            indices = tf.concat(all_indices, axis=0)
            vectors = tf.concat(all_vectors, axis=0)
            # Index order makes top_k's "earlier row wins" the documented "smaller index wins" tie-break.
            by_index = tf.argsort(indices, stable=True)
            self._indices = tf.gather(indices, by_index)
            self._vectors = tf.gather(vectors, by_index)

    @property
    def num_train(self) -> int:
        """Number of training vectors held (0 before ``build``)."""
        return 0 if self._indices is None else int(self._indices.shape[0])

    def _block_size_for(self, num_queries: int) -> int:
        if self.block_size is not None:
            block_size = self.block_size
        else:
            block_size = max(_MIN_BLOCK_SIZE, _SCORES_BUDGET // max(num_queries, 1))
        return max(1, min(block_size, self.num_train))

    def _query(self, queries: tf.Tensor, k: int, order: ORDER) -> Block:
        if self._indices is None or self._vectors is None or self.num_train == 0:
            return tf.zeros_like(queries[:, :0], dtype=tf.int64), queries[:, :0]
        block_size = self._block_size_for(int(queries.shape[0]))
        with tf.device(self.device or _default_device()):
            return _blocked_top_k(
                tf.cast(queries, self._vectors.dtype),
                self._indices,
                self._vectors,
                tf.constant(k, tf.int32),
                order,
                tf.constant(block_size, tf.int32),
            )
