"""Top-k strategies over inner products between test transforms and training influence vectors.

``"streaming"`` (:class:`StreamingTopK`) keeps constant memory in the number of training vectors, ``"linear"``
(:class:`LinearNearestNeighbors`) holds them on the accelerator and searches them with blocked matmuls, and
``"faiss"`` (:class:`FaissNearestNeighbors`, optional ``influenciae[ann]`` extra, imported lazily) builds a
faiss index for millions of rows. Partial results over disjoint shards merge exactly with :func:`merge_top_k`;
:class:`TopK` is the one accumulator of running top-k results.
"""

from __future__ import annotations

from influenciae.search.ann import FaissNearestNeighbors
from influenciae.search.base import NearestNeighbors, get_nearest_neighbors, merge_top_k
from influenciae.search.linear import LinearNearestNeighbors
from influenciae.search.streaming import StreamingTopK
from influenciae.search.topk import TopK

__all__ = [
    "FaissNearestNeighbors",
    "LinearNearestNeighbors",
    "NearestNeighbors",
    "StreamingTopK",
    "TopK",
    "get_nearest_neighbors",
    "merge_top_k",
]
