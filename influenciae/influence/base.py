"""The shared engine: three hooks turned into every public method once.

A calculator defines

* ``_influence_vectors(batch) -> [B, D]``: the influence vector of each training example (what caches store),
* ``_transforms(batch) -> [B, D]``: the transform of each test example,
* ``_inner(transforms [m, D], vectors [n, D]) -> [m, n]``: the score between them (a dot product by default),

and :class:`BaseInfluenceCalculator` derives self-influence, influence matrices, streaming batches of scores, caching
(memory, disk, none) and top-k through pluggable neighbour strategies. Optional hooks: ``_contexts`` (checkpoints or
ensemble members the scores sum over, :mod:`influenciae.influence._contexts`), ``_test_side_scores`` (the inverse
carried by the test side), ``_batch_check`` (what the first batch of a dataset is checked against).

Each public method validates its datasets once (:meth:`BaseInfluenceCalculator._stream`: structure, first batch)
and hands the internals an :class:`~influenciae.data.IndexedStream`; every pass runs the in-graph checks, and a
failed check is the library's ``ValueError`` naming the batch, also when it is raised while iterating a returned
dataset. Training examples are always named by their index in the training dataset's iteration order. Nothing here
holds ``N_test × N_train`` scores except the eager :meth:`~BaseInfluenceCalculator.influence_matrix`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import numpy as np

from influenciae._backend import tf
from influenciae.cache import DiskCache, fingerprint_arrays
from influenciae.cache.shards import fill_vector_cache, read_vector_cache
from influenciae.data import (
    stream_dataset,
)
from influenciae.data.streams import Stream
from influenciae.influence._contexts import TRANSFORMS, VECTORS, Contexts, context_self_influence, context_values
from influenciae.influence._streams import (
    Streams,
    _check_finite,
    chunks,
    merged_batch,
    merged_indices,
    row_groups,
    split_rows,
)
from influenciae.model import InfluenceModel
from influenciae.model.identity import model_identity
from influenciae.search import NearestNeighbors, StreamingTopK, TopK, get_nearest_neighbors
from influenciae.types import CACHE, ORDER

__all__ = ["BaseInfluenceCalculator"]

_BLOCK_BYTES = 64 * 2**20  # per-example gradients one hook call takes (see _solve_block_rows)

Block = tuple[tf.Tensor, tf.Tensor]  # (training indices [n] int64, vectors [n, D])
Pair = tuple[tf.Tensor, Any]  # (indices [B] int64, batch)


class BaseInfluenceCalculator(Streams, abc.ABC):
    """Everything a calculator offers, built on three hooks.

    Args:
        model: The wrapped model.
        show_progress: Show a tqdm bar (batches, examples and rates) on every pass over a dataset.
        batches_per_shard: Training batches per shard of the disk cache (the unit of resumption).

    Subclasses implement :meth:`_influence_vectors` and :meth:`_transforms`, may override :meth:`_inner`,
    :meth:`_self_influence`, :meth:`_contexts`, :meth:`_test_side_scores` and :meth:`_batch_check`, and describe
    their settings in :meth:`_configuration` (stored in disk-cache manifests).
    """

    method_name: ClassVar[str] = "base"
    #: Whether ``±inf`` is a meaningful result (e.g. a decision boundary that cannot be reached); NaN never is.
    infinite_results_allowed: ClassVar[bool] = False
    #: Default directory of the disk cache, used when ``CACHE.DISK`` or ``compute_influence_vector`` get no path.
    cache_dir: str | None = None
    #: Which side carries ``H⁻¹`` in :meth:`influence_matrix`: ``"training"`` (influence vectors, cacheable) or
    #: ``"test"`` (influence factors through :meth:`_test_side_scores`: one solve per test example).
    inverse_side: str = "training"

    def __init__(self, model: InfluenceModel, *, show_progress: bool = False, batches_per_shard: int = 16) -> None:
        if not isinstance(model, InfluenceModel):
            raise TypeError(
                f"model must be an InfluenceModel, got {type(model).__name__}. Wrap your Keras model first: "
                "InfluenceModel(keras_model, loss_function=...)."
            )
        if not isinstance(batches_per_shard, int) or batches_per_shard <= 0:
            raise ValueError(f"batches_per_shard must be a positive integer, got {batches_per_shard!r}.")
        self.model = model
        self.show_progress = show_progress
        self.batches_per_shard = batches_per_shard

    # ------------------------------------------------------------------ hooks

    @abc.abstractmethod
    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        """Influence vectors ``[B, D]`` of a batch of training examples."""

    @abc.abstractmethod
    def _transforms(self, batch: Any) -> tf.Tensor:
        """Transforms ``[B, D]`` of a batch of test examples."""

    def _inner(self, transforms: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        """Scores ``[m, n]`` between test transforms ``[m, D]`` and training influence vectors ``[n, D]``."""
        return tf.matmul(transforms, vectors, transpose_b=True)

    def _self_influence(self, batch: Any) -> tf.Tensor:
        """Self-influence ``[B]``: the score of each training example with itself."""
        transforms, vectors = self._transforms(batch), self._influence_vectors(batch)
        if self._uses_dot_product:
            return tf.reduce_sum(transforms * vectors, axis=1)
        return tf.linalg.diag_part(self._inner(transforms, vectors))

    def _configuration(self) -> dict[str, Any]:
        """Settings that change the influence vectors (stored in and checked against disk caches)."""
        return {}

    def _solve_block_rows(self) -> int:
        """How many examples the engine hands to one hook call (consecutive batches merged; 1: batch by batch).

        Default: as many as ``_BLOCK_BYTES`` of ``[rows, P]`` per-example gradients allow (about five copies live
        in a hook), so the Python engine dispatches one call per block, not per batch. Values are handed back per
        batch and in order.
        """
        return max(1, _BLOCK_BYTES // (5 * self.model.nb_params * self.model.dtype.size))

    def _blocks_cross_shards(self) -> bool:
        """Whether a block may span two disk-cache shards. ``False`` (default): blocks end at shard boundaries, so
        cached and fresh vectors come from the same blocks and are equal to the bit (an iterative solve, whose
        passes over the Hessian data cost the same for any block, returns ``True``: fewer, larger blocks)."""
        return False

    def _groups(self, pairs: Iterable[Pair], *, whole: bool = False) -> Iterator[list[Pair]]:
        """``pairs`` in consecutive blocks of ``_solve_block_rows()`` examples (see ``_blocks_cross_shards``)."""
        every = None if whole or self._blocks_cross_shards() else self.batches_per_shard
        return row_groups(pairs, self._solve_block_rows(), every)

    def _contexts(self) -> Contexts | None:
        """The contexts the scores sum over (checkpoints, ensemble members), or ``None`` (one model).

        When switching contexts is expensive (``Contexts.expensive``: a checkpoint read from disk), every pass
        goes context by context over blocks of ``Contexts.batches_per_load`` batches (a disk-cache shard, or the
        whole pass for self-influence), so no context is loaded per batch. See :mod:`influenciae.influence._contexts`.
        """
        return None

    def _test_side_scores(self, test: Stream) -> Callable[[Any], tf.Tensor]:
        """With ``inverse_side == "test"`` (query batching, influence factors: one solve per test example, none per
        training example): ``batch -> [N_test, B]``, the scores :meth:`influence_matrix` gets in one training pass."""
        raise NotImplementedError(f"{type(self).__name__} has no test-side scores: keep inverse_side='training'.")

    # ------------------------------------------------------------------ eager conveniences (numpy, dataset order)

    def self_influence(self, train_set: tf.data.Dataset) -> np.ndarray:
        """Self-influence of every training example, in dataset order.

        Args:
            train_set: Batched ``(inputs, targets[, sample_weight])`` dataset.

        Returns:
            Array ``[N_train]``.
        """
        stream = self._stream(train_set, "train_set")
        values = [values.numpy() for _, _, values in self._self_influence_stream(stream)]
        return _check_finite(
            np.concatenate(values) if values else np.zeros([0]),
            "self_influence",
            "training",
            allow_infinite=self.infinite_results_allowed,
        )

    def influence_matrix(
        self,
        test_set: tf.data.Dataset,
        train_set: tf.data.Dataset,
        *,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        save_influence_vector_ds_path: str | None = None,
    ) -> np.ndarray:
        """Pairwise scores of every test example with every training example.

        Args:
            test_set: Batched test dataset (``N_test`` examples).
            train_set: Batched training dataset (``N_train`` examples).
            influence_vector_in_cache: Where training influence vectors live between test batches.
            save_influence_vector_ds_path: Directory of the disk cache (with ``CACHE.DISK``).

        Returns:
            Array ``[N_test, N_train]``; entry ``(i, j)`` is the score of training example ``j`` on test example
            ``i``.
        """
        train = self._stream(train_set, "train_set")
        test = self._stream(test_set, "test_set")
        if self.inverse_side == "test":  # one pass over the training set, nothing to cache
            if save_influence_vector_ds_path is not None or influence_vector_in_cache is CACHE.DISK:
                raise ValueError(
                    "With the inverse on the test side (query_rank) the training side is scored in one pass without "
                    "influence vectors, so there is nothing to cache: drop save_influence_vector_ds_path/CACHE.DISK, "
                    "or use query_rank=None."
                )
            scores = self._test_side_scores(test)
            columns = [scores(batch).numpy() for _, batch in train.batches(self._bar("scores against the test side"))]
            matrix = np.concatenate(columns, axis=1) if columns else np.zeros([0, 0])
            return _check_finite(matrix, "influence_matrix", "test/training")
        source = self._vector_source(train, influence_vector_in_cache, save_influence_vector_ds_path)
        rows = []
        for _, transforms in self._transform_stream(test):
            blocks = [self._inner(transforms, vectors).numpy() for _, vectors in source()]
            rows.append(np.concatenate(blocks, axis=1) if blocks else np.zeros([int(transforms.shape[0]), 0]))
        return _check_finite(
            np.concatenate(rows, axis=0) if rows else np.zeros([0, 0]), "influence_matrix", "test/training"
        )

    def most_influential(
        self,
        test_set: tf.data.Dataset,
        train_set: tf.data.Dataset,
        k: int = 5,
        order: ORDER = ORDER.DESCENDING,
        *,
        nearest_neighbors: str | NearestNeighbors | None = None,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        save_influence_vector_ds_path: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` training examples with the highest (or lowest) score for each test example.

        Args:
            test_set: Batched test dataset.
            train_set: Batched training dataset.
            k: Number of training examples per test example.
            order: ``ORDER.DESCENDING`` for proponents (most positive first), ``ORDER.ASCENDING`` for opponents.
            nearest_neighbors: A strategy name (``"linear"``, ``"streaming"``, ``"faiss"``) or instance.
            influence_vector_in_cache: Where training influence vectors live.
            save_influence_vector_ds_path: Directory of the disk cache (with ``CACHE.DISK``).

        Returns:
            ``(indices [N_test, k] int64, values [N_test, k])`` with training indices in dataset order.
        """
        train = self._stream(train_set, "train_set")
        search = self._build_search(train, nearest_neighbors, influence_vector_in_cache, save_influence_vector_ds_path)
        indices, values = [], []
        for _, transforms in self._transform_stream(self._stream(test_set, "test_set")):
            block_indices, block_values = search(transforms, k, order)
            indices.append(block_indices.numpy())
            values.append(block_values.numpy())
        if not values:
            raise ValueError("test_set is empty: pass a dataset with at least one test example.")
        return np.concatenate(indices), _check_finite(np.concatenate(values), "most_influential", "test")

    # ------------------------------------------------------------------ streaming methods (Influenciae vocabulary)

    def compute_influence_values(self, train_set: tf.data.Dataset) -> tf.data.Dataset:
        """Self-influence, batch by batch.

        Args:
            train_set: Batched training dataset.

        Returns:
            A dataset of ``(batch, self_influence [B])`` in training order.
        """
        stream = self._stream(train_set, "train_set")
        signature = (train_set.element_spec, tf.TensorSpec([None], self.model.dtype))
        return stream_dataset(
            lambda: ((batch, values) for _, batch, values in self._self_influence_stream(stream)), signature
        )

    def compute_influence_vector(
        self,
        train_set: tf.data.Dataset,
        save_influence_vector_ds_path: str | None = None,
        *,
        overwrite: bool = False,
    ) -> tf.data.Dataset:
        """Influence vectors of the training examples, optionally written to (or resumed from) a disk cache.

        With a path, the vectors are computed now, shard by shard, into an atomic resumable cache (an interrupted
        computation resumes from the last complete shard); a cache made by another model or configuration is
        refused unless ``overwrite=True``.

        Args:
            train_set: Batched training dataset.
            save_influence_vector_ds_path: Directory of the disk cache; ``None`` uses ``cache_dir`` when the
                calculator has one and otherwise computes lazily.
            overwrite: Replace a cache made with other settings.

        Returns:
            A dataset of ``(indices [B] int64, vectors [B, D])`` in training order: one element per training batch,
            or per shard when read from a disk cache.
        """
        path = self.cache_dir if save_influence_vector_ds_path is None else save_influence_vector_ds_path
        train = self._stream(train_set, "train_set")
        mode = CACHE.NO_CACHE if path is None else CACHE.DISK
        source = self._vector_source(train, mode, path, overwrite=overwrite, per_batch=True)
        signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, None], self.model.dtype))
        return stream_dataset(source, signature)

    def estimate_influence_values_in_batches(
        self,
        dataset_to_evaluate: tf.data.Dataset,
        train_set: tf.data.Dataset,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        save_influence_vector_ds_path: str | None = None,
    ) -> tf.data.Dataset:
        """Scores of every (test batch, training batch) pair, streamed.

        Args:
            dataset_to_evaluate: Batched test dataset.
            train_set: Batched training dataset.
            influence_vector_in_cache: Where training influence vectors live between test batches.
            save_influence_vector_ds_path: Directory of the disk cache (with ``CACHE.DISK``).

        Returns:
            A dataset of ``(test_indices [Bt], train_indices [Bz], values [Bt, Bz])``, test batches in order and,
            within each, training blocks in order. Memory holds one block of scores at a time.
        """
        train = self._stream(train_set, "train_set")
        source = self._vector_source(train, influence_vector_in_cache, save_influence_vector_ds_path)
        test = self._stream(dataset_to_evaluate, "dataset_to_evaluate")

        def generate() -> Iterator[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
            for test_indices, transforms in self._transform_stream(test):
                for train_indices, vectors in source():
                    yield test_indices, train_indices, self._inner(transforms, vectors)

        signature = (
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([None, None], self.model.dtype),
        )
        return stream_dataset(generate, signature)

    def top_k(
        self,
        dataset_to_evaluate: tf.data.Dataset,
        train_set: tf.data.Dataset,
        k: int = 5,
        nearest_neighbors: str | NearestNeighbors | None = None,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        order: ORDER = ORDER.DESCENDING,
        save_influence_vector_ds_path: str | None = None,
    ) -> tf.data.Dataset:
        """The ``k`` most influential training examples of each test example, batch by batch.

        The training side is built once (vectors computed or read from the cache, then indexed by the neighbour
        strategy); test batches are scored lazily as the returned dataset is iterated.

        Args:
            dataset_to_evaluate: Batched test dataset.
            train_set: Batched training dataset.
            k: Number of training examples per test example.
            nearest_neighbors: Strategy name or instance; ``None`` picks ``"linear"`` for in-memory vectors and
                ``"streaming"`` (constant memory) otherwise.
            influence_vector_in_cache: Where training influence vectors live.
            order: ``ORDER.DESCENDING`` (proponents) or ``ORDER.ASCENDING`` (opponents).
            save_influence_vector_ds_path: Directory of the disk cache (with ``CACHE.DISK``).

        Returns:
            A dataset of ``(test_batch, values [B, k], indices [B, k] int64)``.
        """
        train = self._stream(train_set, "train_set")
        search = self._build_search(train, nearest_neighbors, influence_vector_in_cache, save_influence_vector_ds_path)
        test = self._stream(dataset_to_evaluate, "dataset_to_evaluate")

        def generate() -> Iterator[tuple[Any, tf.Tensor, tf.Tensor]]:
            # the same grouped pass as every other (one load per context and block, not per test batch)
            for group, transforms in self._evaluate(test.batches(self._bar("top-k")), TRANSFORMS):
                for (_, batch), part in zip(group, split_rows(transforms, group), strict=True):
                    indices, values = search(part, k, order)
                    yield batch, values, indices

        signature = (
            dataset_to_evaluate.element_spec,
            tf.TensorSpec([None, None], self.model.dtype),
            tf.TensorSpec([None, None], tf.int64),
        )
        return stream_dataset(generate, signature)

    def compute_top_k_from_training_dataset(
        self, train_set: tf.data.Dataset, k: int, order: ORDER = ORDER.DESCENDING
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """The ``k`` training examples of highest (or lowest) self-influence, streamed in constant memory.

        Args:
            train_set: Batched training dataset.
            k: Number of examples.
            order: ``ORDER.DESCENDING`` for the highest self-influence (likely mislabeled or atypical examples).

        Returns:
            ``(indices [k] int64, values [k])``.
        """
        best = TopK(k, order, empty_message="train_set is empty.")
        for indices, _, values in self._self_influence_stream(self._stream(train_set, "train_set")):
            best.add(indices[None], values[None])
        indices, values = best.result()
        return indices[0], values[0]

    # ------------------------------------------------------------------ configuration and caches

    def configuration(self) -> dict[str, Any]:
        """Everything that determines the influence vectors, as stored in disk-cache manifests."""
        identity = model_identity(self.model)
        if self._contexts() is not None:  # the active context's values; _configuration pins every context's
            identity["watched_weights"] = [{**w, "fingerprint": None} for w in identity["watched_weights"]]
        return {
            "method": self.method_name,
            "calculator": type(self).__name__,
            "nb_params": self.model.nb_params,
            # shapes, not names: Keras names layers per session ("dense_5"), so names would refuse a valid cache
            "weight_shapes": [list(shape) for shape in self.model.weight_shapes],
            # loss configuration, watched weights (position, shape, values), gradient_dtype: see cache/fingerprint.py
            "model": identity,
            **self._configuration(),
        }

    def weights_fingerprint(self) -> str:
        """A hash of all the Keras model's weights (a cache made with other weights is refused)."""
        return fingerprint_arrays(weight.numpy() for weight in self.model.model.weights)

    # ------------------------------------------------------------------ internals: validation once, streams

    @property
    def _uses_dot_product(self) -> bool:
        return type(self)._inner is BaseInfluenceCalculator._inner

    # ------------------------------------------------------------------ internals: passes

    def _evaluate(self, pairs: Iterable[Pair], side: str, *, whole: bool = False) -> Iterator[tuple[list[Pair], Any]]:
        """The side's hook (``VECTORS`` or ``TRANSFORMS``) on consecutive groups: ``(group, values of its rows)``.

        Groups hold ``_solve_block_rows()`` examples, or with expensive contexts ``batches_per_load`` batches (all
        of ``pairs`` when ``whole``), each context activated once per group.
        """
        contexts = self._contexts()
        if contexts is not None and contexts.expensive:
            for group in chunks(pairs, None if whole else contexts.batches_per_load):
                yield group, context_values(self, [batch for _, batch in group], side)
            return
        hook = self._influence_vectors if side == VECTORS else self._transforms
        for group in self._groups(pairs, whole=whole):
            yield group, hook(merged_batch(group))

    def _transform_stream(self, test: Stream) -> Iterator[Block]:
        for group, transforms in self._evaluate(test.batches(self._bar("test transforms")), TRANSFORMS):
            yield merged_indices(group), transforms

    def _compute_vectors(self, train: Stream, *, per_batch: bool = False) -> Iterator[Block]:
        """The training vectors, per block of ``_groups`` (or handed back per batch)."""
        for group, vectors in self._evaluate(train.batches(self._bar("influence vectors")), VECTORS):
            if not per_batch:
                yield merged_indices(group), vectors
                continue
            yield from zip([indices for indices, _ in group], split_rows(vectors, group), strict=True)

    def _self_influence_stream(self, train: Stream) -> Iterator[tuple[tf.Tensor, Any, tf.Tensor]]:
        """``(indices [B], batch, self-influence [B])`` per batch of ``train``."""
        contexts = self._contexts()
        if contexts is not None and contexts.expensive:
            yield from context_self_influence(self, train, self._bar)
            return
        for group in self._groups(train.batches(self._bar("self-influence"))):
            # one solve for the whole block (iterative solvers pay per call), values handed back per batch
            values = self._self_influence(merged_batch(group))
            for (indices, batch), part in zip(group, split_rows(values, group), strict=True):
                yield indices, batch, part

    def _vector_source(
        self,
        train: Stream,
        mode: CACHE,
        path: str | None,
        *,
        overwrite: bool = False,
        per_batch: bool = False,
    ) -> Callable[[], Iterator[Block]]:
        """A re-iterable over the training vectors, per the cache mode (the work is done here, eagerly).

        Without a cache the vectors are computed as read, per block, or per training batch with ``per_batch``.
        """
        if not isinstance(mode, CACHE):
            raise TypeError(f"influence_vector_in_cache must be a CACHE member, got {mode!r}.")
        if mode is CACHE.NO_CACHE:
            return lambda: self._compute_vectors(train, per_batch=per_batch)
        if mode is CACHE.MEMORY:
            blocks = list(self._compute_vectors(train))
            return lambda: iter(blocks)
        path = self.cache_dir if path is None else path
        if path is None:
            raise ValueError("CACHE.DISK needs a directory: pass save_influence_vector_ds_path=...")
        configuration, fingerprint = self.configuration(), self.weights_fingerprint()
        cache = DiskCache(path, configuration=configuration, weights_fingerprint=fingerprint, overwrite=overwrite)
        description = f"influence vectors ({self.batches_per_shard} batches/shard)"
        fill_vector_cache(cache, train, self._shard_vectors, self.batches_per_shard, self._bar(description))
        return lambda: read_vector_cache(cache)

    def _shard_vectors(self, group: list[Pair]) -> np.ndarray:
        """Influence vectors ``[rows, D]`` of one disk-cache shard: the in-memory blocks, one load per context."""
        return np.concatenate([vectors.numpy() for _, vectors in self._evaluate(group, VECTORS, whole=True)])

    def _build_search(
        self,
        train: Stream,
        nearest_neighbors: str | NearestNeighbors | None,
        mode: CACHE,
        path: str | None,
    ) -> Callable[[tf.Tensor, int, ORDER], Block]:
        """A function ``(transforms [m, D], k, order) -> (indices [m, k], values [m, k])`` over the training set."""
        source = self._vector_source(train, mode, path)
        if not self._uses_dot_product:
            if nearest_neighbors is not None:
                raise ValueError(
                    f"{type(self).__name__} scores with its own similarity, so neighbour strategies (which rank by "
                    "dot product) do not apply; leave nearest_neighbors=None."
                )
            strategy: NearestNeighbors = StreamingTopK(score=self._inner)  # brute force over the calculator's score
        else:
            if nearest_neighbors is None:
                nearest_neighbors = "linear" if mode is CACHE.MEMORY else "streaming"
            strategy = get_nearest_neighbors(nearest_neighbors)
        strategy.build(source)
        return strategy.query
