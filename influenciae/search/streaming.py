"""Streaming top-k: a sorted buffer of ``k`` candidates per query, merged with each training block."""

from __future__ import annotations

import tensorflow as tf

from influenciae.search.base import Block, BlockSource, NearestNeighbors, block_top_k, merge_top_k_unchecked
from influenciae.types import ORDER


@tf.function(reduce_retracing=True)
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
    return merge_top_k_unchecked(best_indices, best_values, block_indices, block_values, k, order)


class StreamingTopK(NearestNeighbors, name="streaming"):
    """Exact top-k in constant memory in the number of training vectors.

    ``build`` only keeps the re-iterable stream; every ``query`` makes one pass over it, computing ``queries @
    blockᵀ`` for each block and merging the block's top-k into a running ``[num_queries, k]`` buffer with
    :func:`~influenciae.search.base.merge_top_k`. Memory is ``O(num_queries × (k + block))``, whatever the
    number of training vectors, at the price of recomputing (or re-reading) the training vectors for each
    query batch: use it when they are streamed from disk or recomputed on the fly. Scores are in the dtype of
    the training vectors.

    Example:
        >>> strategy = StreamingTopK()
        >>> blocks = tf.data.Dataset.from_tensor_slices((tf.range(4, dtype=tf.int64), tf.eye(4))).batch(2)
        >>> strategy.build(blocks)
        >>> strategy.query(tf.constant([[0.0, 3.0, 1.0, 2.0]]), k=2)[0].numpy().tolist()
        [[1, 3]]
    """

    def _build(self, blocks: BlockSource) -> None:
        self._stream = blocks

    def _query(self, queries: tf.Tensor, k: int, order: ORDER) -> Block:
        best_indices = tf.zeros_like(queries[:, :0], dtype=tf.int64)
        best_values = queries[:, :0]
        # A tensor k lets every k share the traces of _merge_block.
        k_tensor = tf.constant(k, tf.int32)
        for indices, vectors in self._stream():
            # The dimension of a callable stream is only known once its first block is seen.
            self._check_query_dimension(int(queries.shape[1]))
            if best_values.dtype != vectors.dtype:
                best_values = tf.cast(best_values, vectors.dtype)
            best_indices, best_values = _merge_block(
                best_indices, best_values, queries, indices, vectors, k_tensor, order
            )
        return best_indices, best_values
