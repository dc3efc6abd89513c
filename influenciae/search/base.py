"""Shared pieces of the top-k strategies: exact merging, input validation and the strategy registry.

A top-k strategy answers, for each query vector ``q``, "which training vectors ``v`` have the largest (or
smallest) inner product ``q · v``?". Training vectors are named by their int64 **index** (their position in
dataset order), never by their position inside the strategy, so that results computed on disjoint shards of
the training set merge exactly with :func:`merge_top_k`.

Ties are always broken by the smaller training index first, in both orders, which makes every exact strategy
deterministic and independent of how the training set was split into blocks or shards.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeAlias

import numpy as np
import tensorflow as tf

from influenciae.types import ORDER

Block: TypeAlias = tuple[tf.Tensor, tf.Tensor]
"""A block of training vectors: ``(indices [block] int64, vectors [block, dim])``."""

BlockSource: TypeAlias = Callable[[], Iterator[Block]]
"""A re-iterable stream of validated blocks: each call starts a new pass over the training vectors."""

_UNBATCHED_BLOCK_SIZE = 1024
_REGISTRY: dict[str, type[NearestNeighbors]] = {}


def check_k(k: Any) -> int:
    """Validates the number of neighbours and returns it as a Python ``int``.

    Raises:
        TypeError: if ``k`` is not an integer (``bool`` is refused).
        ValueError: if ``k`` is not positive.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"k must be a positive Python int (the number of neighbours), got {k!r}.")
    if k <= 0:
        raise ValueError(f"k must be a positive int (the number of neighbours), got {k}.")
    return int(k)


def check_order(order: Any) -> ORDER:
    """Validates that ``order`` is a member of :class:`influenciae.types.ORDER`."""
    if not isinstance(order, ORDER):
        raise TypeError(
            f"order must be ORDER.DESCENDING (most positive scores first) or ORDER.ASCENDING (most negative "
            f"first), from influenciae.types; got {order!r}."
        )
    return order


def _static_width(tensor: tf.Tensor) -> int | None:
    width = tensor.shape[-1]
    return None if width is None else int(width)


def _kept_columns(values: tf.Tensor, k: int | tf.Tensor, min_width: int) -> int | tf.Tensor:
    """``min(k, num_columns)``, as a Python int whenever it is known when tracing."""
    if isinstance(k, tf.Tensor):
        return tf.minimum(tf.cast(k, tf.int32), tf.shape(values)[-1])
    width = _static_width(values)
    if width is not None:
        return min(k, width)
    if min_width >= k:
        return k
    return tf.minimum(k, tf.shape(values)[-1])


def _top_k_by_position(
    indices: tf.Tensor, values: tf.Tensor, k: int | tf.Tensor, order: ORDER, min_width: int = 0
) -> Block:
    """Top-k over the last axis of ``values``, ties going to the earlier column.

    Args:
        indices: training indices of the columns, ``[num_columns]`` (shared by all rows) or
            ``[num_rows, num_columns]``, int64.
        values: scores, ``[num_rows, num_columns]``.
        k: number of columns to keep (Python int, or scalar tensor to share one trace between values of k);
            ``min(k, num_columns)`` are returned.
        order: which end of the scores to keep.
        min_width: a lower bound of ``num_columns`` known when tracing, used to keep the output width static.

    Returns:
        ``(indices [num_rows, min(k, num_columns)] int64, values [num_rows, min(k, num_columns)])``.
    """
    k_kept = _kept_columns(values, k, min_width)
    # tf.math.top_k returns the lower position first among equal keys, which is what makes the result exact.
    keys = values if order is ORDER.DESCENDING else -values
    positions = tf.math.top_k(keys, k=k_kept, sorted=True).indices
    top_values = tf.gather(values, positions, batch_dims=1)
    if indices.shape.rank == 1:
        top_indices = tf.gather(indices, positions)
    else:
        top_indices = tf.gather(indices, positions, batch_dims=1)
    return top_indices, top_values


def merge_top_k(
    indices_a: tf.Tensor | np.ndarray,
    values_a: tf.Tensor | np.ndarray,
    indices_b: tf.Tensor | np.ndarray,
    values_b: tf.Tensor | np.ndarray,
    k: int,
    order: ORDER = ORDER.DESCENDING,
) -> Block:
    """Exactly merges two partial top-k results computed on disjoint parts of the training set.

    The result is the top-k of the union of the candidates, with ties broken by the smaller training index, so
    it does not depend on which side a candidate came from: merging shard results in any order or grouping
    gives identical output. Candidates do not need to be sorted on entry.

    Example:
        >>> indices, values = merge_top_k([[4, 1]], [[0.5, 0.2]], [[7]], [[0.5]], k=2)
        >>> indices.numpy().tolist(), values.numpy().tolist()
        ([[4, 7]], [[0.5, 0.5]])

    Args:
        indices_a: training indices of the first result, ``[num_queries, k_a]`` (integer).
        values_a: their scores, ``[num_queries, k_a]``.
        indices_b: training indices of the second result, ``[num_queries, k_b]``; disjoint from ``indices_a``.
        values_b: their scores, ``[num_queries, k_b]``, same dtype as ``values_a``.
        k: number of neighbours to keep (positive int).
        order: ``ORDER.DESCENDING`` keeps the largest scores, ``ORDER.ASCENDING`` the smallest.

    Returns:
        ``(indices [num_queries, min(k, k_a + k_b)] int64, values [num_queries, min(k, k_a + k_b)])``, best
        first.

    Raises:
        ValueError: if the inputs are not rank 2, or an argument is invalid.
        TypeError: if ``k`` or ``order`` have the wrong type.
    """
    k = check_k(k)
    order = check_order(order)
    values_a = tf.convert_to_tensor(values_a)
    values_b = tf.convert_to_tensor(values_b, dtype_hint=values_a.dtype)
    indices_a = tf.cast(tf.convert_to_tensor(indices_a), tf.int64)
    indices_b = tf.cast(tf.convert_to_tensor(indices_b), tf.int64)
    for name, tensor in (("indices_a", indices_a), ("values_a", values_a), ("indices_b", indices_b)):
        if tensor.shape.rank != 2:
            raise ValueError(f"{name} must have shape [num_queries, num_candidates], got {tensor.shape}.")
    if values_b.shape.rank != 2:
        raise ValueError(f"values_b must have shape [num_queries, num_candidates], got {values_b.shape}.")
    if values_a.dtype != values_b.dtype:
        raise TypeError(f"values_a and values_b must share a dtype, got {values_a.dtype} and {values_b.dtype}.")
    return merge_top_k_unchecked(indices_a, values_a, indices_b, values_b, k, order)


def merge_top_k_unchecked(
    indices_a: tf.Tensor,
    values_a: tf.Tensor,
    indices_b: tf.Tensor,
    values_b: tf.Tensor,
    k: int | tf.Tensor,
    order: ORDER,
) -> Block:
    """:func:`merge_top_k` on validated tensors; ``k`` may also be a scalar tensor (in ``tf.function``)."""
    indices = tf.concat([indices_a, indices_b], axis=1)
    values = tf.concat([values_a, values_b], axis=1)
    # Putting the candidates in index order turns top_k's "earlier column wins" into "smaller index wins".
    by_index = tf.argsort(indices, axis=-1, stable=True)
    indices = tf.gather(indices, by_index, batch_dims=1)
    values = tf.gather(values, by_index, batch_dims=1)
    min_width = (_static_width(values_a) or 0) + (_static_width(values_b) or 0)
    return _top_k_by_position(indices, values, k, order, min_width=min_width)


def block_top_k(
    queries: tf.Tensor,
    indices: tf.Tensor,
    vectors: tf.Tensor,
    k: int | tf.Tensor,
    order: ORDER,
    *,
    indices_are_sorted: bool = False,
) -> Block:
    """Exact top-k of ``queries @ vectorsᵀ`` over one block of training vectors.

    Args:
        queries: ``[num_queries, dim]``, same dtype as ``vectors``.
        indices: training indices of the block, ``[block]`` int64.
        vectors: training vectors of the block, ``[block, dim]``.
        k: number of neighbours to keep (Python int or scalar tensor).
        order: which end of the scores to keep.
        indices_are_sorted: skip sorting the block by index when the caller guarantees it already is.

    Returns:
        ``(indices [num_queries, min(k, block)] int64, values [num_queries, min(k, block)])``, best first,
        ties broken by the smaller index.
    """
    if not indices_are_sorted:
        by_index = tf.argsort(indices, stable=True)
        indices = tf.gather(indices, by_index)
        vectors = tf.gather(vectors, by_index)
    scores = tf.matmul(queries, vectors, transpose_b=True)
    return _top_k_by_position(indices, scores, k, order)


def _to_block(indices: Any, vectors: Any) -> Block:
    """Converts and validates one block of training vectors."""
    indices = tf.convert_to_tensor(indices)
    vectors = tf.convert_to_tensor(vectors)
    if not indices.dtype.is_integer:
        raise TypeError(f"training indices must be integers, got dtype {indices.dtype}.")
    if not vectors.dtype.is_floating:
        raise TypeError(f"training vectors must be floating point, got dtype {vectors.dtype}.")
    if indices.shape.rank != 1 or vectors.shape.rank != 2:
        raise ValueError(
            "each block of training vectors must be a pair (indices [block], vectors [block, dim]); got "
            f"shapes {indices.shape} and {vectors.shape}. Batch datasets of single vectors."
        )
    if indices.shape[0] != vectors.shape[0]:
        raise ValueError(f"a block has {indices.shape[0]} indices but {vectors.shape[0]} vectors; they must match.")
    return tf.cast(indices, tf.int64), vectors


def _as_block_factory(train_vectors: Any) -> tuple[Callable[[], Iterable[Any]], int | None]:
    """Turns the accepted forms of training vectors into a factory of raw blocks, plus the dimension."""
    if isinstance(train_vectors, tf.data.Dataset):
        spec = train_vectors.element_spec
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise ValueError(
                "a dataset of training vectors must yield pairs (indices [block], vectors [block, dim]); got "
                f"elements {spec}."
            )
        indices_spec, vectors_spec = spec
        if indices_spec.shape.rank == 0 and vectors_spec.shape.rank == 1:
            train_vectors = train_vectors.batch(_UNBATCHED_BLOCK_SIZE)
            vectors_spec = train_vectors.element_spec[1]
        dimension = vectors_spec.shape[-1] if vectors_spec.shape.rank == 2 else None
        dataset = train_vectors
        return (lambda: dataset), dimension
    if callable(train_vectors):
        return train_vectors, None
    if isinstance(train_vectors, tuple | list) and len(train_vectors) == 2:
        block = _to_block(*train_vectors)
        return (lambda: (block,)), int(block[1].shape[1])
    if isinstance(train_vectors, np.ndarray | tf.Tensor):
        vectors = tf.convert_to_tensor(train_vectors)
        if vectors.shape.rank != 2:
            raise ValueError(f"training vectors must have shape [num_train, dim], got {vectors.shape}.")
        block = _to_block(tf.range(tf.shape(vectors)[0], dtype=tf.int64), vectors)
        return (lambda: (block,)), int(vectors.shape[1])
    raise TypeError(
        "train_vectors must be a tf.data.Dataset or a callable yielding blocks (indices [block], "
        "vectors [block, dim]), a pair (indices [N], vectors [N, dim]) or an array [N, dim]; "
        f"got {type(train_vectors).__name__}."
    )


class NearestNeighbors(abc.ABC):
    """Base class of the top-k strategies over inner products ``score(q, v) = q · v``.

    Public methods validate their inputs once and call private hooks that subclasses implement: ``_build``
    receives a re-iterable stream of validated blocks, ``_query`` validated queries. A subclass registers
    itself under a name with ``class MyStrategy(NearestNeighbors, name="mine")`` so that
    :func:`get_nearest_neighbors` can find it.

    Example:
        >>> strategy = get_nearest_neighbors("linear")
        >>> strategy.build((np.array([10, 11, 12]), np.eye(3)))
        >>> strategy.query(np.array([[0.0, 2.0, 1.0]]), k=2)[0].numpy().tolist()
        [[11, 12]]
    """

    name: ClassVar[str]

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        registered = _REGISTRY.get(name)
        if registered is not None and registered.__qualname__ != cls.__qualname__:
            raise ValueError(f"a nearest-neighbours strategy named {name!r} already exists: {registered}.")
        cls.name = name
        _REGISTRY[name] = cls

    def __init__(self) -> None:
        self._blocks: BlockSource | None = None
        self._dimension: int | None = None

    @property
    def is_built(self) -> bool:
        """Whether :meth:`build` has been called."""
        return self._blocks is not None

    @property
    def dimension(self) -> int | None:
        """Dimension of the training vectors, or ``None`` while no block has been seen."""
        return self._dimension

    def build(self, train_vectors: Any) -> None:
        """Prepares the strategy for queries over a set of training vectors.

        Args:
            train_vectors: a re-iterable stream of blocks ``(indices [block] int64, vectors [block, dim])``: a
                ``tf.data.Dataset`` (unbatched pairs are batched for you) or a callable returning an iterable
                of blocks, called once per pass. A pair of arrays ``(indices [N], vectors [N, dim])`` or a
                single array ``vectors [N, dim]`` (indices ``0..N-1``) are accepted for convenience. Indices
                name the training examples in the results and must be distinct.
        """
        factory, dimension = _as_block_factory(train_vectors)

        def blocks() -> Iterator[Block]:
            return self._validated_blocks(factory)

        self._blocks = None  # stays unbuilt if _build fails
        self._dimension = dimension
        self._build(blocks)
        self._blocks = blocks

    def query(
        self, queries: tf.Tensor | np.ndarray, k: int, order: ORDER = ORDER.DESCENDING
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Finds, for each query, the ``k`` training vectors with the best inner products.

        Args:
            queries: ``[num_queries, dim]`` floating point.
            k: number of neighbours (positive int); ``min(k, num_train)`` columns are returned.
            order: ``ORDER.DESCENDING`` for the most positive scores first, ``ORDER.ASCENDING`` for the most
                negative first.

        Returns:
            ``(indices [num_queries, min(k, num_train)] int64, values [num_queries, min(k, num_train)])``,
            best first; exact strategies break ties by the smaller training index.

        Raises:
            ValueError: if ``build`` was not called, ``k`` is not positive or the queries have the wrong
                shape.
            TypeError: if ``k``, ``order`` or the queries have the wrong type.
        """
        k = check_k(k)
        order = check_order(order)
        if self._blocks is None:
            raise ValueError(f"{type(self).__name__}.query was called before build: call build(train_vectors) first.")
        queries = tf.convert_to_tensor(queries)
        if not queries.dtype.is_floating:
            raise TypeError(f"queries must be floating point, got dtype {queries.dtype}.")
        if queries.shape.rank != 2:
            raise ValueError(f"queries must have shape [num_queries, dim], got {queries.shape}.")
        self._check_query_dimension(int(queries.shape[1]))
        return self._query(queries, k, order)

    def _check_query_dimension(self, query_dimension: int) -> None:
        if self._dimension is not None and query_dimension != self._dimension:
            raise ValueError(
                f"queries have dimension {query_dimension} but the training vectors have dimension "
                f"{self._dimension}: compute both with the same model and transform."
            )

    def _validated_blocks(self, factory: Callable[[], Iterable[Any]]) -> Iterator[Block]:
        for block in factory():
            if not (isinstance(block, tuple | list) and len(block) == 2):
                raise ValueError(
                    f"each block of training vectors must be a pair (indices, vectors), got {type(block).__name__}."
                )
            indices, vectors = _to_block(*block)
            dimension = int(vectors.shape[1])
            if self._dimension is None:
                self._dimension = dimension
            elif dimension != self._dimension:
                raise ValueError(
                    f"a block of training vectors has dimension {dimension}, expected {self._dimension} (the "
                    "dimension of the other blocks, or of the queries)."
                )
            yield indices, vectors

    @abc.abstractmethod
    def _build(self, blocks: BlockSource) -> None:
        """Hook: prepares the strategy; ``blocks()`` starts a new pass over validated training blocks."""

    @abc.abstractmethod
    def _query(self, queries: tf.Tensor, k: int, order: ORDER) -> Block:
        """Hook: answers validated ``queries [num_queries, dim]`` (see :meth:`query`)."""


def available_nearest_neighbors() -> list[str]:
    """Names accepted by :func:`get_nearest_neighbors`, sorted."""
    return sorted(_REGISTRY)


def get_nearest_neighbors(spec: str | NearestNeighbors | type[NearestNeighbors], **options: Any) -> NearestNeighbors:
    """Resolves a top-k strategy from a name, a class or an instance.

    Each call with a name or a class returns a **new** instance, so strategies are never shared by accident.

    Example:
        >>> type(get_nearest_neighbors("streaming")).__name__
        'StreamingTopK'

    Args:
        spec: a registered name (``"streaming"``, ``"linear"``, ``"faiss"``), a ``NearestNeighbors`` subclass
            or instance (returned as is).
        **options: keyword options of the strategy's constructor, when ``spec`` is a name or a class.

    Returns:
        A ``NearestNeighbors`` instance.

    Raises:
        ValueError: if the name is unknown, or options are given with an instance.
        TypeError: if ``spec`` is of another type.
    """
    if isinstance(spec, NearestNeighbors):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be applied to an existing {type(spec).__name__}.")
        return spec
    if isinstance(spec, type) and issubclass(spec, NearestNeighbors):
        return spec(**options)
    if isinstance(spec, str):
        strategy_class = _REGISTRY.get(spec.strip().lower())
        if strategy_class is None:
            raise ValueError(
                f"unknown nearest-neighbours strategy {spec!r}; valid names are "
                f"{available_nearest_neighbors()}, or pass a NearestNeighbors instance."
            )
        return strategy_class(**options)
    raise TypeError(
        f"nearest_neighbors must be a name among {available_nearest_neighbors()} or a NearestNeighbors "
        f"instance, got {type(spec).__name__}."
    )
