"""The disk-cache shard protocol of the engine's influence vectors: which batches make a shard, how it is named.

Shard ``s`` holds the influence vectors of ``batches_per_shard`` consecutive training batches; its input hash is
that of its batches, so :func:`~influenciae.cache.fill_cache` can check every cached shard against the data given
now and compute only the missing ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.cache import DiskCache, ShardInput, combine_hashes, fill_cache, hash_batch
from influenciae.data import check_stable_order
from influenciae.data.streams import Stream

__all__ = ["fill_vector_cache", "read_vector_cache"]

Pair = tuple[tf.Tensor, Any]


def fill_vector_cache(
    cache: DiskCache,
    train: Stream,
    compute: Callable[[list[Pair]], np.ndarray],
    batches_per_shard: int,
    wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> None:
    """Compute the missing shards of ``cache``; every cached shard's input hash, rows and file checksum is checked.

    Args:
        cache: The disk cache of the calculator's configuration and weights.
        train: The training stream (its order must be stable: shards are named by position).
        compute: The influence vectors ``[rows, D]`` of a shard's ``(indices, batch)`` pairs.
        batches_per_shard: Training batches per shard.
        wrap: A progress wrapper over the shards.
    """
    check_stable_order(train.dataset, name=train.name)

    def shards() -> Iterator[ShardInput]:
        groups: Iterable[Any] = _shard_groups(train.batches(), batches_per_shard)
        for shard_id, group in groups if wrap is None else wrap(groups):
            indices = np.concatenate([index.numpy() for index, _ in group])

            def vectors(group: list[Pair] = group, indices: np.ndarray = indices) -> dict[str, Any]:
                return {"indices": indices, "vectors": compute(group)}

            input_hash = combine_hashes(hash_batch(batch) for _, batch in group)
            yield ShardInput(shard_id, int(indices[0]), int(indices.size), input_hash, vectors)

    fill_cache(cache, shards())


def read_vector_cache(cache: DiskCache) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
    """The cached ``(indices [n] int64, vectors [n, D])`` blocks, shard by shard, in training order."""
    for _, arrays in cache.iter_shards():
        yield tf.constant(arrays["indices"]), tf.constant(arrays["vectors"])


def _shard_groups(indexed: Iterable[Pair], batches_per_shard: int) -> Iterator[tuple[int, list[Pair]]]:
    group: list[Pair] = []
    shard_id = 0
    for indices, batch in indexed:
        group.append((indices, batch))
        if len(group) == batches_per_shard:
            yield shard_id, group
            shard_id, group = shard_id + 1, []
    if group:
        yield shard_id, group
