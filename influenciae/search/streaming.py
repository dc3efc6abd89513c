"""Streaming top-k: a sorted buffer of ``k`` candidates per query, merged with each training block."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from influenciae.search.base import Block, BlockSource, NearestNeighbors
from influenciae.search.topk import TopK
from influenciae.types import ORDER

Score = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
"""``(queries [m, dim_q], vectors [n, dim_v]) -> scores [m, n]``: a similarity other than the dot product."""


class StreamingTopK(NearestNeighbors, name="streaming"):
    """Exact top-k in constant memory in the number of training vectors.

    ``build`` only keeps the re-iterable stream; every ``query`` makes one pass over it, computing ``queries @
    blockᵀ`` for each block and merging the block's top-k into a running ``[num_queries, k]`` buffer
    (:class:`~influenciae.search.topk.TopK`). Memory is ``O(num_queries × (k + block))``, whatever the
    number of training vectors, at the price of recomputing (or re-reading) the training vectors for each
    query batch: use it when they are streamed from disk or recomputed on the fly. Scores are in the dtype of
    the training vectors.

    Example:
        >>> strategy = StreamingTopK()
        >>> blocks = tf.data.Dataset.from_tensor_slices((tf.range(4, dtype=tf.int64), tf.eye(4))).batch(2)
        >>> strategy.build(blocks)
        >>> strategy.query(tf.constant([[0.0, 3.0, 1.0, 2.0]]), k=2)[0].numpy().tolist()
        [[1, 3]]

    Args:
        score: Scores each block with this function instead of the dot product (brute force over a calculator's
            own similarity, e.g. TracInCPFast's factored products); queries and vectors may then differ in
            dimension.
    """

    def __init__(self, *, score: Score | None = None) -> None:
        super().__init__()
        self.score = score

    def _build(self, blocks: BlockSource) -> None:
        self._stream = blocks

    def _check_query_dimension(self, query_dimension: int) -> None:
        if self.score is None:
            super()._check_query_dimension(query_dimension)

    def _query(self, queries: tf.Tensor, k: int, order: ORDER) -> Block:
        best = TopK(k, order)
        for indices, vectors in self._stream():
            if self.score is not None:
                best.add(indices, self.score(queries, vectors))
                continue
            # The dimension of a callable stream is only known once its first block is seen.
            self._check_query_dimension(int(queries.shape[1]))
            best.add_scores(queries, indices, vectors)
        if best.is_empty:
            return tf.zeros_like(queries[:, :0], dtype=tf.int64), queries[:, :0]
        return best.result()
