"""Top-k strategies against a numpy brute force, exact merging of shard results, and input validation."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

from influenciae.search import (
    FaissNearestNeighbors,
    LinearNearestNeighbors,
    NearestNeighbors,
    StreamingTopK,
    get_nearest_neighbors,
    merge_top_k,
)
from influenciae.types import ORDER

NUM_TRAIN = 53
DIMENSION = 6
BOTH_ORDERS = [ORDER.DESCENDING, ORDER.ASCENDING]


def _faiss(**options: object) -> Callable[[], NearestNeighbors]:
    def make() -> NearestNeighbors:
        pytest.importorskip("faiss")
        return FaissNearestNeighbors(**options)  # type: ignore[arg-type]

    return make


EXACT_STRATEGIES: dict[str, Callable[[], NearestNeighbors]] = {
    "streaming": StreamingTopK,
    "linear-block1": lambda: LinearNearestNeighbors(block_size=1),
    "linear-block7": lambda: LinearNearestNeighbors(block_size=7),
    "linear-default": LinearNearestNeighbors,
}
STRATEGIES: dict[str, Callable[[], NearestNeighbors]] = {
    **EXACT_STRATEGIES,
    "faiss-flat": _faiss(),
    # Probing every cell makes IVF exact, so it can be held to the brute force too.
    "faiss-ivf-all-cells": _faiss(index_type="ivf", nlist=4, nprobe=4),
}


def _training_set(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled, offset, non-contiguous indices ``[N]`` and continuous vectors ``[N, dim]``, without ties."""
    rng = np.random.default_rng(seed)
    indices = (rng.permutation(NUM_TRAIN) * 3 + 1000).astype(np.int64)
    vectors = rng.normal(size=(NUM_TRAIN, DIMENSION))
    return indices, vectors


def _brute_force(
    queries: np.ndarray, indices: np.ndarray, vectors: np.ndarray, k: int, order: ORDER
) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k by a full sort: best score first, ties to the smaller index."""
    scores = queries @ vectors.T
    keys = -scores if order is ORDER.DESCENDING else scores
    expected = np.empty(scores.shape, dtype=np.int64)
    for row in range(scores.shape[0]):
        expected[row] = np.lexsort((indices, keys[row]))
    expected = expected[:, :k]
    return indices[expected], np.take_along_axis(scores, expected, axis=1)


def _check_against_brute_force(
    strategy: NearestNeighbors,
    queries: np.ndarray,
    indices: np.ndarray,
    vectors: np.ndarray,
    k: int,
    order: ORDER,
) -> None:
    found_indices, found_values = strategy.query(queries, k=k, order=order)
    expected_indices, expected_values = _brute_force(queries, indices, vectors, k, order)
    assert found_indices.dtype == tf.int64
    assert found_indices.shape == expected_indices.shape == (len(queries), min(k, len(indices)))
    np.testing.assert_array_equal(found_indices.numpy(), expected_indices)
    tolerance = 1e-5 if found_values.dtype == tf.float32 else 1e-12
    np.testing.assert_allclose(found_values.numpy(), expected_values, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
@pytest.mark.parametrize("order", BOTH_ORDERS, ids=lambda order: order.value)
@pytest.mark.parametrize("num_queries", [1, 9])
def test_matches_brute_force(strategy_name: str, order: ORDER, num_queries: int) -> None:
    indices, vectors = _training_set()
    queries = np.random.default_rng(1).normal(size=(num_queries, DIMENSION))
    strategy = STRATEGIES[strategy_name]()
    strategy.build((indices, vectors))
    for k in (1, 5, NUM_TRAIN + 10):
        _check_against_brute_force(strategy, queries, indices, vectors, k, order)


def _dataset_source(indices: np.ndarray, vectors: np.ndarray, block_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((indices, vectors)).batch(block_size)


def _callable_source(indices: np.ndarray, vectors: np.ndarray, block_size: int) -> Callable[[], object]:
    def blocks() -> object:
        for start in range(0, len(indices), block_size):
            yield indices[start : start + block_size], vectors[start : start + block_size]

    return blocks


def _unbatched_dataset_source(indices: np.ndarray, vectors: np.ndarray, block_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((indices, vectors))


# How the stream is blocked matters to the streaming strategy; the others only read it once in build.
@pytest.mark.parametrize("strategy_name", ["streaming", "linear-block7", "faiss-flat"])
@pytest.mark.parametrize("make_source", [_dataset_source, _callable_source, _unbatched_dataset_source])
@pytest.mark.parametrize("source_block_size", [1, 7, 64])
def test_block_sources_match_brute_force(
    strategy_name: str, make_source: Callable[..., object], source_block_size: int
) -> None:
    indices, vectors = _training_set(seed=2)
    queries = np.random.default_rng(3).normal(size=(4, DIMENSION))
    strategy = STRATEGIES[strategy_name]()
    strategy.build(make_source(indices, vectors, source_block_size))
    for order in BOTH_ORDERS:
        _check_against_brute_force(strategy, queries, indices, vectors, 6, order)


@pytest.mark.parametrize("strategy_name", list(EXACT_STRATEGIES))
@pytest.mark.parametrize("order", BOTH_ORDERS, ids=lambda order: order.value)
def test_exact_strategies_break_ties_by_smaller_index(strategy_name: str, order: ORDER) -> None:
    rng = np.random.default_rng(4)
    indices = rng.permutation(40).astype(np.int64) + 7
    # Small integer vectors and queries give many equal scores, all exact in float64.
    vectors = rng.integers(-1, 2, size=(40, 3)).astype(np.float64)
    queries = rng.integers(-1, 2, size=(5, 3)).astype(np.float64)
    strategy = EXACT_STRATEGIES[strategy_name]()
    strategy.build(_callable_source(indices, vectors, 6))
    for k in (3, 17):
        _check_against_brute_force(strategy, queries, indices, vectors, k, order)


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_rebuild_replaces_the_training_vectors(strategy_name: str) -> None:
    queries = np.random.default_rng(5).normal(size=(3, DIMENSION))
    strategy = STRATEGIES[strategy_name]()
    first_indices, first_vectors = _training_set(seed=6)
    strategy.build((first_indices, first_vectors))
    _check_against_brute_force(strategy, queries, first_indices, first_vectors, 4, ORDER.DESCENDING)
    second_indices, second_vectors = first_indices + 5000, -first_vectors
    strategy.build((second_indices, second_vectors))
    _check_against_brute_force(strategy, queries, second_indices, second_vectors, 4, ORDER.DESCENDING)


@pytest.mark.parametrize("strategy_name", list(EXACT_STRATEGIES))
def test_array_of_vectors_uses_positions_as_indices_and_keeps_dtype(strategy_name: str) -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.5]], dtype=np.float32)
    strategy = EXACT_STRATEGIES[strategy_name]()
    strategy.build(vectors)
    found_indices, found_values = strategy.query(np.array([[1.0, -1.0]]), k=3)
    assert found_values.dtype == tf.float32
    np.testing.assert_array_equal(found_indices.numpy(), [[0, 2, 1]])
    np.testing.assert_allclose(found_values.numpy(), [[1.0, 0.0, -1.0]])


@pytest.mark.parametrize("strategy_name", list(EXACT_STRATEGIES))
def test_empty_training_set_and_no_queries(strategy_name: str) -> None:
    strategy = EXACT_STRATEGIES[strategy_name]()
    strategy.build(lambda: iter(()))
    found_indices, found_values = strategy.query(np.ones((2, 3)), k=4)
    assert found_indices.shape == found_values.shape == (2, 0)
    indices, vectors = _training_set()
    strategy.build((indices, vectors))
    found_indices, found_values = strategy.query(np.zeros((0, DIMENSION)), k=4)
    assert found_indices.shape == found_values.shape == (0, 4)


def _lexsort_top_k(indices: np.ndarray, values: np.ndarray, k: int, order: ORDER) -> tuple[np.ndarray, np.ndarray]:
    keys = -values if order is ORDER.DESCENDING else values
    positions = np.stack([np.lexsort((indices[row], keys[row])) for row in range(len(values))])[:, :k]
    return np.take_along_axis(indices, positions, 1), np.take_along_axis(values, positions, 1)


@pytest.mark.parametrize("order", BOTH_ORDERS, ids=lambda order: order.value)
@pytest.mark.parametrize("seed", range(4))
def test_merge_top_k_is_exact_and_independent_of_shards_and_merge_order(order: ORDER, seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_queries, num_candidates, k = 3, 60, 8
    candidates = rng.permutation(1000)[:num_candidates].astype(np.int64)
    indices = np.tile(candidates, (num_queries, 1))
    # Few distinct values so that many candidates tie, including across shards.
    values = rng.integers(0, 5, size=(num_queries, num_candidates)).astype(np.float32)
    expected_indices, expected_values = _lexsort_top_k(indices, values, k, order)

    cuts = np.sort(rng.choice(np.arange(1, num_candidates), size=5, replace=False))
    shards = []
    for shard_columns in np.split(rng.permutation(num_candidates), cuts):
        empty_indices, empty_values = indices[:, :0], values[:, :0]
        shard_indices, shard_values = indices[:, shard_columns], values[:, shard_columns]
        shards.append(merge_top_k(shard_indices, shard_values, empty_indices, empty_values, k, order))

    results = []
    for _ in range(4):
        permutation = rng.permutation(len(shards))
        merged = shards[permutation[0]]
        for position in permutation[1:]:
            merged = merge_top_k(*merged, *shards[position], k, order)
        results.append(merged)
    # A balanced tree of merges, as several workers would do.
    level = shards
    while len(level) > 1:
        level = [merge_top_k(*level[i], *level[i + 1], k, order) for i in range(0, len(level) - 1, 2)] + (
            [level[-1]] if len(level) % 2 else []
        )
    results.append(level[0])

    for merged_indices, merged_values in results:
        np.testing.assert_array_equal(merged_indices.numpy(), expected_indices)
        np.testing.assert_array_equal(merged_values.numpy(), expected_values)


@pytest.mark.parametrize(
    ("order", "expected_indices", "expected_values"),
    [
        (ORDER.DESCENDING, [[2, 5, 9, 3]], [[1.0, 1.0, 1.0, 0.0]]),
        (ORDER.ASCENDING, [[0, 4, 3, 2]], [[-2.0, -2.0, 0.0, 1.0]]),
    ],
)
def test_merge_top_k_breaks_ties_by_smaller_index(
    order: ORDER, expected_indices: list[list[int]], expected_values: list[list[float]]
) -> None:
    indices_a, values_a = [[9, 5, 4]], [[1.0, 1.0, -2.0]]
    indices_b, values_b = [[2, 0, 3]], [[1.0, -2.0, 0.0]]
    for merged in (
        merge_top_k(indices_a, values_a, indices_b, values_b, 4, order),
        merge_top_k(indices_b, values_b, indices_a, values_a, 4, order),
    ):
        np.testing.assert_array_equal(merged[0].numpy(), expected_indices)
        np.testing.assert_array_equal(merged[1].numpy(), expected_values)


def test_merge_top_k_with_fewer_than_k_candidates() -> None:
    merged_indices, merged_values = merge_top_k([[3], [4]], [[0.5], [-0.5]], [[1], [2]], [[0.25], [0.75]], k=10)
    assert merged_indices.dtype == tf.int64
    np.testing.assert_array_equal(merged_indices.numpy(), [[3, 1], [2, 4]])
    np.testing.assert_allclose(merged_values.numpy(), [[0.5, 0.25], [0.75, -0.5]])
    empty = merge_top_k(np.zeros((2, 0), np.int64), np.zeros((2, 0)), np.zeros((2, 0), np.int64), np.zeros((2, 0)), 3)
    assert empty[0].shape == empty[1].shape == (2, 0)


def test_merge_top_k_inside_tf_function_keeps_a_static_width() -> None:
    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.int64), tf.TensorSpec([None, 4], tf.float32)] * 2)
    def merge(indices_a: tf.Tensor, values_a: tf.Tensor, indices_b: tf.Tensor, values_b: tf.Tensor) -> tf.Tensor:
        merged_indices, _ = merge_top_k(indices_a, values_a, indices_b, values_b, 3)
        assert merged_indices.shape.as_list() == [None, 3]
        return merged_indices

    result = merge(
        tf.constant([[0, 1, 2, 3]], tf.int64),
        tf.constant([[0.0, 3.0, 1.0, 2.0]]),
        tf.constant([[4, 5, 6, 7]], tf.int64),
        tf.constant([[2.5, 0.0, 9.0, 3.0]]),
    )
    np.testing.assert_array_equal(result.numpy(), [[6, 1, 7]])


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_invalid_queries_raise(strategy_name: str) -> None:
    strategy = STRATEGIES[strategy_name]()
    queries = np.ones((2, DIMENSION))
    with pytest.raises(ValueError, match="before build"):
        strategy.query(queries, k=1)
    strategy.build(_training_set())
    for bad_k in (0, -3):
        with pytest.raises(ValueError, match="k must be a positive"):
            strategy.query(queries, k=bad_k)
    for bad_k in (1.5, True, "3"):
        with pytest.raises(TypeError, match="k must be a positive"):
            strategy.query(queries, k=bad_k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"dimension {DIMENSION + 1} but the training vectors have dimension"):
        strategy.query(np.ones((2, DIMENSION + 1)), k=1)
    with pytest.raises(ValueError, match="shape"):
        strategy.query(np.ones(DIMENSION), k=1)
    with pytest.raises(TypeError, match="ORDER.DESCENDING"):
        strategy.query(queries, k=1, order="descending")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating point"):
        strategy.query(np.ones((2, DIMENSION), dtype=np.int32), k=1)


def test_streaming_detects_a_wrong_dimension_on_the_first_block() -> None:
    indices, vectors = _training_set()
    strategy = StreamingTopK()
    strategy.build(_callable_source(indices, vectors, 10))
    assert strategy.dimension is None
    with pytest.raises(ValueError, match="queries have dimension 2 but the training vectors have dimension 6"):
        strategy.query(np.ones((1, 2)), k=1)


def test_inconsistent_blocks_raise() -> None:
    def blocks() -> object:
        yield np.arange(2), np.ones((2, 3))
        yield np.arange(2, 4), np.ones((2, 4))

    with pytest.raises(ValueError, match="dimension 4, expected 3"):
        LinearNearestNeighbors().build(blocks)
    with pytest.raises(ValueError, match="3 indices but 2 vectors"):
        StreamingTopK().build((np.arange(3), np.ones((2, 3))))
    with pytest.raises(TypeError, match="indices must be integers"):
        StreamingTopK().build((np.arange(2.0), np.ones((2, 3))))
    with pytest.raises(TypeError, match="train_vectors must be"):
        StreamingTopK().build(42)


def test_get_nearest_neighbors_resolves_names_classes_and_instances() -> None:
    first, second = get_nearest_neighbors("linear"), get_nearest_neighbors("linear")
    assert isinstance(first, LinearNearestNeighbors) and first is not second
    assert isinstance(get_nearest_neighbors("Streaming"), StreamingTopK)
    assert get_nearest_neighbors(LinearNearestNeighbors, block_size=3).block_size == 3  # type: ignore[attr-defined]
    instance = StreamingTopK()
    assert get_nearest_neighbors(instance) is instance
    with pytest.raises(ValueError, match=r"valid names are \['faiss', 'linear', 'streaming'\]"):
        get_nearest_neighbors("kd-tree")
    with pytest.raises(ValueError, match="cannot be applied"):
        get_nearest_neighbors(instance, block_size=3)
    with pytest.raises(TypeError, match="NearestNeighbors instance"):
        get_nearest_neighbors(3)  # type: ignore[arg-type]


def test_faiss_options_and_missing_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'influenciae\[ann\]'"):
        get_nearest_neighbors("faiss")
    monkeypatch.undo()
    pytest.importorskip("faiss")
    with pytest.raises(ValueError, match="index_type"):
        FaissNearestNeighbors(index_type="hnsw")
    strategy = FaissNearestNeighbors(index_type="ivf", nlist=100)
    with pytest.raises(ValueError, match="at least 100 training vectors"):
        strategy.build(_training_set())
    assert not strategy.is_built


@pytest.mark.parametrize("order", BOTH_ORDERS, ids=lambda order: order.value)
def test_faiss_ivf_marks_neighbours_missing_from_the_probed_cells(order: ORDER) -> None:
    pytest.importorskip("faiss")
    strategy = FaissNearestNeighbors(index_type="ivf", nlist=8, nprobe=1)
    indices, vectors = _training_set()
    strategy.build((indices, vectors))
    found_indices, found_values = strategy.query(np.random.default_rng(7).normal(size=(3, DIMENSION)), NUM_TRAIN, order)
    found_indices, found_values = found_indices.numpy(), found_values.numpy()
    missing = found_indices == -1
    # One cell of eight cannot hold all 53 vectors; what is found is real and the rest is marked.
    assert missing.any() and not missing.all()
    assert set(found_indices[~missing]) <= set(indices)
    assert np.all(found_values[missing] == (-np.inf if order is ORDER.DESCENDING else np.inf))
    assert np.all(np.isfinite(found_values[~missing]))


def test_importing_the_package_does_not_import_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh import of the package, undone by monkeypatch so that the other tests keep their classes.
    for module_name in [name for name in sys.modules if name == "faiss" or name.startswith("influenciae.search")]:
        monkeypatch.delitem(sys.modules, module_name)
    fresh_package = importlib.import_module("influenciae.search")
    assert "faiss" not in sys.modules
    assert fresh_package.get_nearest_neighbors("linear") is not None
    assert "faiss" not in sys.modules
