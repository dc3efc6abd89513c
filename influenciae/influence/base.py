"""The shared engine: three hooks turned into every public method once.

A calculator defines

* ``_influence_vectors(batch) -> [B, D]``: the influence vector of each training example (what caches store),
* ``_transforms(batch) -> [B, D]``: the transform of each test example,
* ``_inner(transforms [m, D], vectors [n, D]) -> [m, n]``: the score between them (a dot product by default),

and :class:`BaseInfluenceCalculator` derives self-influence, influence matrices, streaming batches of scores, caching
(memory, disk, none) and top-k through pluggable neighbour strategies. Training examples are always named by their
index in the training dataset's iteration order. Nothing here holds ``N_test × N_train`` scores except the eager
:meth:`~BaseInfluenceCalculator.influence_matrix`, whose result is that matrix.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from influenciae._backend import tf
from influenciae.cache import DiskCache, ShardInput, combine_hashes, fill_cache, fingerprint_arrays, hash_batch
from influenciae.data import (
    check_dataset,
    check_stable_order,
    checked_iteration,
    sparse_classes,
    with_checks,
    with_indices,
)
from influenciae.cache.fingerprint import model_identity
from influenciae.model import InfluenceModel
from influenciae.search import NearestNeighbors, get_nearest_neighbors, merge_top_k
from influenciae.types import CACHE, ORDER

__all__ = ["BaseInfluenceCalculator"]

Block = tuple[tf.Tensor, tf.Tensor]  # (training indices [n] int64, vectors [n, D])


class BaseInfluenceCalculator(abc.ABC):
    """Everything a calculator offers, built on three hooks.

    Args:
        model: The wrapped model.
        show_progress: Show a tqdm bar (batches, examples and rates) on every pass over a dataset.
        batches_per_shard: Training batches per shard of the disk cache (the unit of resumption).

    Subclasses implement :meth:`_influence_vectors` and :meth:`_transforms`, may override :meth:`_inner` and
    :meth:`_self_influence`, and describe their settings in :meth:`_configuration` (stored in disk-cache manifests).
    """

    method_name: ClassVar[str] = "base"
    #: Whether ``±inf`` is a meaningful result (e.g. a decision boundary that cannot be reached); NaN never is.
    infinite_results_allowed: ClassVar[bool] = False
    #: Default directory of the disk cache, used when ``CACHE.DISK`` or ``compute_influence_vector`` get no path.
    cache_dir: str | None = None

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
        """How many examples the engine hands to one hook call (consecutive batches merged), or 1: batch by batch.

        Calculators whose per-call cost does not shrink with the block (an iterative solve: its passes over the
        Hessian dataset cost the same for 50 right-hand sides as for 1,000) return a larger block. Results do not
        depend on it: values are handed back per batch and in order.
        """
        return 1

    # ------------------------------------------------------------------ eager conveniences (numpy, dataset order)

    def self_influence(self, train_set: tf.data.Dataset) -> np.ndarray:
        """Self-influence of every training example, in dataset order.

        Args:
            train_set: Batched ``(inputs, targets[, sample_weight])`` dataset.

        Returns:
            Array ``[N_train]``.
        """
        values = [values.numpy() for _, values in self._self_influence_stream(train_set)]
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
        source = self._vector_source(train_set, influence_vector_in_cache, save_influence_vector_ds_path)
        rows = []
        for _, transforms in self._transform_stream(test_set):
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
        search = self._build_search(
            train_set, nearest_neighbors, influence_vector_in_cache, save_influence_vector_ds_path
        )
        indices, values = [], []
        for _, transforms in self._transform_stream(test_set):
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
        check_dataset(train_set, name="train_set")
        self._validate_first_batch(train_set)
        signature = (train_set.element_spec, tf.TensorSpec([None], self.model.dtype))
        return tf.data.Dataset.from_generator(
            lambda: ((batch, values) for batch, values in self._self_influence_stream(train_set, validate=False)),
            output_signature=signature,
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
            A dataset of ``(indices [B] int64, vectors [B, D])`` in training order.
        """
        path = self.cache_dir if save_influence_vector_ds_path is None else save_influence_vector_ds_path
        mode = CACHE.NO_CACHE if path is None else CACHE.DISK
        source = self._vector_source(train_set, mode, path, overwrite=overwrite)
        signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, None], self.model.dtype))
        return tf.data.Dataset.from_generator(source, output_signature=signature)

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
        source = self._vector_source(train_set, influence_vector_in_cache, save_influence_vector_ds_path)
        check_dataset(dataset_to_evaluate, name="dataset_to_evaluate")
        self._validate_first_batch(dataset_to_evaluate)

        def generate() -> Iterator[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
            for test_indices, transforms in self._transform_stream(dataset_to_evaluate, validate=False):
                for train_indices, vectors in source():
                    yield test_indices, train_indices, self._inner(transforms, vectors)

        signature = (
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([None, None], self.model.dtype),
        )
        return tf.data.Dataset.from_generator(generate, output_signature=signature)

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
        search = self._build_search(
            train_set, nearest_neighbors, influence_vector_in_cache, save_influence_vector_ds_path
        )
        check_dataset(dataset_to_evaluate, name="dataset_to_evaluate")
        self._validate_first_batch(dataset_to_evaluate)

        def generate() -> Iterator[tuple[Any, tf.Tensor, tf.Tensor]]:
            batches = self._progress(dataset_to_evaluate, "top-k")
            for batch in batches:
                indices, values = search(self._transforms(batch), k, order)
                yield batch, values, indices

        signature = (
            dataset_to_evaluate.element_spec,
            tf.TensorSpec([None, None], self.model.dtype),
            tf.TensorSpec([None, None], tf.int64),
        )
        return tf.data.Dataset.from_generator(generate, output_signature=signature)

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
        best: Block | None = None
        for indices, values in self._self_influence_stream(train_set, with_index=True):
            candidate = (indices[None], values[None])
            best = candidate if best is None else merge_top_k(*best, *candidate, k=k, order=order)
            best = merge_top_k(*best, indices[:0][None], values[:0][None], k=k, order=order)
        if best is None:
            raise ValueError("train_set is empty.")
        return best[0][0], best[1][0]

    # ------------------------------------------------------------------ configuration and caches

    def configuration(self) -> dict[str, Any]:
        """Everything that determines the influence vectors, as stored in disk-cache manifests."""
        return {
            "method": self.method_name,
            "calculator": type(self).__name__,
            "nb_params": self.model.nb_params,
            # shapes, not names: Keras names layers per session ("dense_5"), so names would refuse a valid cache
            "weight_shapes": [list(shape) for shape in self.model.weight_shapes],
            # loss configuration, watched weights (position, shape, values), gradient_dtype: see fingerprint.py
            "model": model_identity(self.model),
            **self._configuration(),
        }

    def weights_fingerprint(self) -> str:
        """A hash of all the Keras model's weights (a cache made with other weights is refused)."""
        return fingerprint_arrays(weight.numpy() for weight in self.model.model.weights)

    # ------------------------------------------------------------------ internals

    @property
    def _uses_dot_product(self) -> bool:
        return type(self)._inner is BaseInfluenceCalculator._inner

    def _progress(self, iterable: Iterable[Any], description: str) -> Iterable[Any]:
        if not self.show_progress:
            return iterable
        return tqdm(iterable, desc=f"{type(self).__name__}: {description}", unit="batch", dynamic_ncols=True)

    def _validate_first_batch(self, dataset: tf.data.Dataset) -> None:
        for batch in dataset.take(1):
            self.model.validate_batch(batch)

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

    def _indexed(self, dataset: tf.data.Dataset, name: str, description: str) -> Iterator[tuple[tf.Tensor, Any]]:
        check_dataset(dataset, name=name)
        yield from checked_iteration(self._progress(self._checked(dataset), description), name=name)

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

    def _self_influence_stream(
        self, train_set: tf.data.Dataset, *, validate: bool = True, with_index: bool = False
    ) -> Iterator[tuple[Any, tf.Tensor]]:
        check_dataset(train_set, name="train_set")
        if validate:
            self._validate_first_batch(train_set)
        stream = self._indexed(train_set, "train_set", "self-influence")
        for group in _row_groups(stream, self._solve_block_rows()):
            if len(group) == 1:
                indices, batch = group[0]
                yield (indices if with_index else batch), self._self_influence(batch)
                continue
            # one solve for the whole block (iterative solvers pay per call), values handed back per batch
            values = self._self_influence(_concat_structures([batch for _, batch in group]))
            sizes = [int(tf.shape(indices)[0]) for indices, _ in group]
            for (indices, batch), part in zip(group, tf.split(values, sizes), strict=True):
                yield (indices if with_index else batch), part

    def _transform_stream(
        self, test_set: tf.data.Dataset, *, validate: bool = True
    ) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        check_dataset(test_set, name="test_set")
        if validate:
            self._validate_first_batch(test_set)
        for indices, batch in _merged_rows(
            self._indexed(test_set, "test_set", "test transforms"), self._solve_block_rows()
        ):
            yield indices, self._transforms(batch)

    def _compute_vectors(self, train_set: tf.data.Dataset) -> Iterator[Block]:
        stream = self._indexed(train_set, "train_set", "influence vectors")
        for indices, batch in _merged_rows(stream, self._solve_block_rows()):
            yield indices, self._influence_vectors(batch)

    def _vector_source(
        self,
        train_set: tf.data.Dataset,
        mode: CACHE,
        path: str | None,
        *,
        overwrite: bool = False,
    ) -> Callable[[], Iterator[Block]]:
        """A re-iterable over the training vectors, per the cache mode (the work is done here, eagerly)."""
        check_dataset(train_set, name="train_set")
        if not isinstance(mode, CACHE):
            raise TypeError(f"influence_vector_in_cache must be a CACHE member, got {mode!r}.")
        self._validate_first_batch(train_set)
        if mode is CACHE.NO_CACHE:
            return lambda: self._compute_vectors(train_set)
        if mode is CACHE.MEMORY:
            blocks = list(self._compute_vectors(train_set))
            return lambda: iter(blocks)
        path = self.cache_dir if path is None else path
        if path is None:
            raise ValueError("CACHE.DISK needs a directory: pass save_influence_vector_ds_path=...")
        configuration, fingerprint = self.configuration(), self.weights_fingerprint()
        cache = DiskCache(path, configuration=configuration, weights_fingerprint=fingerprint, overwrite=overwrite)
        self._fill_disk_cache(cache, train_set)

        def read() -> Iterator[Block]:
            for _, arrays in cache.iter_shards():
                yield tf.constant(arrays["indices"]), tf.constant(arrays["vectors"])

        return read

    def _fill_disk_cache(self, cache: DiskCache, train_set: tf.data.Dataset) -> None:
        """Compute the missing shards; every cached shard's input hash, rows and file checksum is checked."""
        check_stable_order(train_set, name="train_set")

        def shards() -> Iterator[ShardInput]:
            checked = self._checked(train_set)
            groups = _shard_groups(checked_iteration(checked, name="train_set"), self.batches_per_shard)
            for shard_id, group in self._progress(
                groups, f"influence vectors ({self.batches_per_shard} batches/shard)"
            ):
                indices = np.concatenate([index.numpy() for index, _ in group])

                def compute(group: list[tuple[Any, Any]] = group, indices: np.ndarray = indices) -> dict[str, Any]:
                    return {"indices": indices, "vectors": self._shard_influence_vectors(group)}

                input_hash = combine_hashes(hash_batch(batch) for _, batch in group)
                yield ShardInput(shard_id, int(indices[0]), int(indices.size), input_hash, compute)

        fill_cache(cache, shards())

    def _shard_influence_vectors(self, group: list[tuple[tf.Tensor, Any]]) -> np.ndarray:
        """Influence vectors ``[rows, D]`` of one disk-cache shard (a list of ``(indices, batch)``).

        Calculators whose per-batch work has an expensive set-up (e.g. loading checkpoints) override this to do the
        set-up once per shard instead of once per batch.
        """
        blocks = _merged_rows(group, self._solve_block_rows())  # the same blocks as the in-memory path
        return np.concatenate([self._influence_vectors(batch).numpy() for _, batch in blocks])

    def _build_search(
        self,
        train_set: tf.data.Dataset,
        nearest_neighbors: str | NearestNeighbors | None,
        mode: CACHE,
        path: str | None,
    ) -> Callable[[tf.Tensor, int, ORDER], Block]:
        """A function ``(transforms [m, D], k, order) -> (indices [m, k], values [m, k])`` over the training set."""
        source = self._vector_source(train_set, mode, path)
        if not self._uses_dot_product:
            if nearest_neighbors is not None:
                raise ValueError(
                    f"{type(self).__name__} scores with its own similarity, so neighbour strategies (which rank by "
                    "dot product) do not apply; leave nearest_neighbors=None."
                )
            return lambda transforms, k, order: self._brute_force_top_k(source, transforms, k, order)
        if nearest_neighbors is None:
            nearest_neighbors = "linear" if mode is CACHE.MEMORY else "streaming"
        strategy = get_nearest_neighbors(nearest_neighbors)
        strategy.build(source)
        return lambda transforms, k, order: strategy.query(transforms, k, order)

    def _brute_force_top_k(
        self, source: Callable[[], Iterator[Block]], transforms: tf.Tensor, k: int, order: ORDER
    ) -> Block:
        best: Block | None = None
        for indices, vectors in source():
            scores = self._inner(transforms, vectors)
            candidate = (tf.tile(indices[None], [tf.shape(scores)[0], 1]), scores)
            best = candidate if best is None else merge_top_k(*best, *candidate, k=k, order=order)
        if best is None:
            raise ValueError("train_set is empty.")
        return merge_top_k(*best, best[0][:, :0], best[1][:, :0], k=k, order=order)


_CHECKED_PIPELINES = 4  # datasets whose checked pipeline a calculator keeps (see _checked)


def _row_groups(stream: Iterable[tuple[tf.Tensor, Any]], rows: int) -> Iterator[list[tuple[tf.Tensor, Any]]]:
    """Consecutive ``(indices, batch)`` pairs grouped until a group holds at least ``rows`` examples (1: one each)."""
    group: list[tuple[tf.Tensor, Any]] = []
    count = 0
    for indices, batch in stream:
        group.append((indices, batch))
        count += int(tf.shape(indices)[0])
        if count >= rows:
            yield group
            group, count = [], 0
    if group:
        yield group


def _merged_rows(stream: Iterable[tuple[tf.Tensor, Any]], rows: int) -> Iterator[tuple[tf.Tensor, Any]]:
    """:func:`_row_groups` with each group concatenated into one ``(indices, batch)``."""
    for group in _row_groups(stream, rows):
        if len(group) == 1:
            yield group[0]
        else:
            yield tf.concat([indices for indices, _ in group], axis=0), _concat_structures([b for _, b in group])


def _concat_structures(batches: list[Any]) -> Any:
    """Batches of one dataset (same nested structure) concatenated along the example axis."""
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *batches)


def _shard_groups(indexed: tf.data.Dataset, batches_per_shard: int) -> Iterator[tuple[int, list[tuple[Any, Any]]]]:
    group: list[tuple[Any, Any]] = []
    shard_id = 0
    for indices, batch in indexed:
        group.append((indices, batch))
        if len(group) == batches_per_shard:
            yield shard_id, group
            shard_id, group = shard_id + 1, []
    if group:
        yield shard_id, group


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
