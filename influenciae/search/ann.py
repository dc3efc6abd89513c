"""Approximate (or exact, with a flat index) top-k with a faiss index, for millions of training vectors.

faiss is an optional dependency (``pip install 'influenciae[ann]'``) imported only when a
:class:`FaissNearestNeighbors` is created, never when :mod:`influenciae.search` is imported.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import tensorflow as tf

from influenciae.search.base import Block, BlockSource, NearestNeighbors
from influenciae.types import ORDER

_INDEX_TYPES = ("flat", "ivf")


def _import_faiss() -> ModuleType:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "FaissNearestNeighbors needs faiss, an optional dependency: install it with "
            "`pip install 'influenciae[ann]'` (or `pip install faiss-cpu`), "
            "or use the 'linear' or 'streaming' strategy instead."
        ) from error
    return faiss


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


class FaissNearestNeighbors(NearestNeighbors, name="faiss"):
    """Top-k over inner products with a faiss index (float32).

    ``index_type="flat"`` is an exact ``IndexFlatIP`` (ties are not guaranteed to go to the smaller index);
    ``"ivf"`` is an ``IndexIVFFlat`` with ``nlist`` k-means cells of which ``nprobe`` are searched per query:
    approximate, much faster for millions of rows, and exact when ``nprobe == nlist``. ``ORDER.ASCENDING``
    searches with ``-q`` and negates the scores back. Results name training examples by the indices given to
    ``build``.

    With ``"ivf"``, a query can find fewer than ``k`` vectors in its probed cells; the missing entries have
    index ``-1`` and score ``-inf`` (``+inf`` in ascending order).

    Example:
        >>> strategy = FaissNearestNeighbors()
        >>> strategy.build((np.array([4, 8]), np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)))
        >>> strategy.query(np.array([[0.2, 0.9]], dtype=np.float32), k=1)[0].numpy().tolist()
        [[8]]

    Args:
        index_type: ``"flat"`` (exact) or ``"ivf"`` (approximate).
        nlist: number of IVF cells (``"ivf"`` only); the training set needs at least ``nlist`` vectors.
        nprobe: number of cells searched per query (``"ivf"`` only), at most ``nlist``.

    Raises:
        ImportError: if faiss is not installed.
    """

    def __init__(self, *, index_type: str = "flat", nlist: int = 100, nprobe: int = 8) -> None:
        super().__init__()
        if index_type not in _INDEX_TYPES:
            raise ValueError(f"index_type must be one of {list(_INDEX_TYPES)}, got {index_type!r}.")
        self.index_type = index_type
        self.nlist = _check_positive_int("nlist", nlist)
        self.nprobe = min(_check_positive_int("nprobe", nprobe), self.nlist)
        self._faiss = _import_faiss()
        self._index: Any = None
        self._indices = np.zeros([0], dtype=np.int64)

    def _build(self, blocks: BlockSource) -> None:
        all_indices, all_vectors = [], []
        for indices, vectors in blocks():
            all_indices.append(indices.numpy())
            all_vectors.append(vectors.numpy().astype(np.float32, copy=False))
        dimension = self._dimension or 0
        self._indices = np.concatenate(all_indices) if all_indices else np.zeros([0], dtype=np.int64)
        vectors = np.concatenate(all_vectors) if all_vectors else np.zeros([0, dimension], dtype=np.float32)
        vectors = np.ascontiguousarray(vectors)
        if self.index_type == "flat":
            index = self._faiss.IndexFlatIP(dimension)
        else:
            if len(vectors) < self.nlist:
                raise ValueError(
                    f"an 'ivf' index with nlist={self.nlist} cells needs at least {self.nlist} training "
                    f"vectors, got {len(vectors)}: lower nlist or use index_type='flat'."
                )
            quantizer = self._faiss.IndexFlatIP(dimension)
            index = self._faiss.IndexIVFFlat(quantizer, dimension, self.nlist, self._faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = self.nprobe
            # The index keeps using the quantizer: hold a reference so Python does not free it first.
            self._quantizer = quantizer
        index.add(vectors)
        self._index = index

    def _query(self, queries: tf.Tensor, k: int, order: ORDER) -> Block:
        k = min(k, len(self._indices))
        search_queries = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
        if order is ORDER.ASCENDING:
            search_queries = -search_queries
        if k == 0:
            return tf.zeros([len(search_queries), 0], tf.int64), tf.zeros([len(search_queries), 0], tf.float32)
        scores, positions = self._index.search(search_queries, k)
        missing = positions < 0
        indices = np.where(missing, -1, self._indices[np.where(missing, 0, positions)])
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        if order is ORDER.ASCENDING:
            scores = -scores
        return tf.constant(indices, dtype=tf.int64), tf.constant(scores, dtype=tf.float32)
