"""The shared checks every calculator must pass (one list, run for every method, as optax does for optimizers)."""

from __future__ import annotations

import tempfile

import numpy as np
import tensorflow as tf

from influenciae import CACHE, ORDER


def rebatch(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """The same examples with another batching, after a map and a filter (unknown cardinality)."""
    return dataset.unbatch().map(lambda *example: example).filter(lambda *example: True).batch(batch_size)


def check_calculator_invariants(
    calculator,
    train: tf.data.Dataset,
    test: tf.data.Dataset,
    *,
    rtol: float = 1e-6,
    cache_dir: str | None = None,
    extended: bool = True,
):
    """Self-influence = diagonal of pairwise scores; rankings = argsort; batching, caching and streaming invariant.

    Also: the disk cache (``CACHE.DISK``, written then read back), the streamed ``top_k``, the training influence
    vectors of ``compute_influence_vector`` and the streamed datasets consumed inside a ``tf.function``.

    Args:
        calculator: Any ``BaseInfluenceCalculator``.
        train: A small batched training dataset (tens of examples).
        test: A small batched test dataset.
        rtol: Relative tolerance of score comparisons (float32 models need ~1e-5).
        cache_dir: An empty directory for the disk-cache checks (default: a new temporary directory).
        extended: Also the disk cache, ``top_k``, ``compute_influence_vector`` and ``tf.function`` checks. The
            registry tests (``test_registries.py``) run them for every registered method; the modules that check
            variants of one family (similarities, TracIn variants, ...) leave them to it.

    Returns:
        The influence matrix ``[N_test, N_train]``.
    """
    matrix = calculator.influence_matrix(test, train)
    num_test, num_train = matrix.shape
    assert num_train == sum(1 for _ in train.unbatch()) and num_test == sum(1 for _ in test.unbatch())
    assert np.all(np.isfinite(matrix)) and np.abs(matrix).max() > 0
    scale = np.abs(matrix).max()

    self_values = calculator.self_influence(train)
    diagonal = np.diag(calculator.influence_matrix(train, train))
    np.testing.assert_allclose(self_values, diagonal, rtol=rtol, atol=rtol * np.abs(diagonal).max())

    for batch_size in (1, 3):
        other = calculator.influence_matrix(rebatch(test, batch_size), rebatch(train, batch_size + 4))
        np.testing.assert_allclose(other, matrix, rtol=rtol, atol=rtol * scale)
    for mode in (CACHE.NO_CACHE, CACHE.MEMORY):
        np.testing.assert_allclose(
            calculator.influence_matrix(test, train, influence_vector_in_cache=mode),
            matrix,
            rtol=rtol,
            atol=rtol * scale,
        )

    k = min(3, num_train)
    for order in (ORDER.DESCENDING, ORDER.ASCENDING):
        indices, values = calculator.most_influential(test, train, k=k, order=order)
        expected = (
            np.sort(matrix, axis=1)[:, ::-1][:, :k] if order is ORDER.DESCENDING else np.sort(matrix, axis=1)[:, :k]
        )
        np.testing.assert_allclose(values, expected, rtol=rtol, atol=rtol * scale)
        np.testing.assert_allclose(np.take_along_axis(matrix, indices, axis=1), expected, rtol=rtol, atol=rtol * scale)

    streamed = np.concatenate([values.numpy() for _, values in calculator.compute_influence_values(train)])
    np.testing.assert_allclose(streamed, self_values, rtol=rtol, atol=rtol * np.abs(self_values).max())
    assembled = np.zeros_like(matrix)
    for test_indices, train_indices, block in calculator.estimate_influence_values_in_batches(test, train):
        assembled[np.ix_(test_indices.numpy(), train_indices.numpy())] = block.numpy()
    np.testing.assert_allclose(assembled, matrix, rtol=rtol, atol=rtol * scale)
    top_indices, _ = calculator.compute_top_k_from_training_dataset(train, k)
    np.testing.assert_allclose(self_values[top_indices.numpy()], np.sort(self_values)[::-1][:k], rtol=rtol)
    if not extended:
        return matrix
    with tempfile.TemporaryDirectory() as temporary:
        check_disk_cache_top_k_and_vectors(calculator, train, test, matrix, cache_dir or temporary, rtol=rtol, k=k)
    check_tf_function_pass(calculator, train, test, matrix, self_values, rtol=rtol)
    return matrix


def check_disk_cache_top_k_and_vectors(
    calculator,
    train: tf.data.Dataset,
    test: tf.data.Dataset,
    matrix: np.ndarray,
    directory: str,
    *,
    rtol: float,
    k: int,
) -> None:
    """``CACHE.DISK`` (written, then read back) gives ``matrix``; ``top_k`` ranks its rows; the influence vectors are
    one per training example, in order, the same computed lazily and read from the disk cache."""
    scale = np.abs(matrix).max()
    path = f"{directory}/vectors"
    for _ in range(2):  # the first pass writes the cache, the second reads it
        cached = calculator.influence_matrix(
            test, train, influence_vector_in_cache=CACHE.DISK, save_influence_vector_ds_path=path
        )
        np.testing.assert_allclose(cached, matrix, rtol=rtol, atol=rtol * scale)
    for mode, cache_path in ((CACHE.MEMORY, None), (CACHE.DISK, path)):
        for order in (ORDER.DESCENDING, ORDER.ASCENDING):
            rows = [
                (values.numpy(), indices.numpy())
                for _, values, indices in calculator.top_k(
                    test,
                    train,
                    k=k,
                    influence_vector_in_cache=mode,
                    order=order,
                    save_influence_vector_ds_path=cache_path,
                )
            ]
            values = np.concatenate([value for value, _ in rows])
            indices = np.concatenate([index for _, index in rows])
            ordered = np.sort(matrix, axis=1)
            expected = ordered[:, ::-1][:, :k] if order is ORDER.DESCENDING else ordered[:, :k]
            np.testing.assert_allclose(values, expected, rtol=rtol, atol=rtol * scale)
            np.testing.assert_allclose(
                np.take_along_axis(matrix, indices, axis=1), expected, rtol=rtol, atol=rtol * scale
            )
    lazy = [(indices.numpy(), vectors.numpy()) for indices, vectors in calculator.compute_influence_vector(train)]
    stored = [
        (indices.numpy(), vectors.numpy()) for indices, vectors in calculator.compute_influence_vector(train, path)
    ]
    lazy_indices = np.concatenate([indices for indices, _ in lazy])
    np.testing.assert_array_equal(lazy_indices, np.arange(matrix.shape[1]))
    np.testing.assert_array_equal(np.concatenate([indices for indices, _ in stored]), lazy_indices)
    lazy_vectors = np.concatenate([vectors for _, vectors in lazy])
    np.testing.assert_allclose(
        np.concatenate([vectors for _, vectors in stored]),
        lazy_vectors,
        rtol=rtol,
        atol=rtol * np.abs(lazy_vectors).max(),
    )


def check_tf_function_pass(
    calculator,
    train: tf.data.Dataset,
    test: tf.data.Dataset,
    matrix: np.ndarray,
    self_values: np.ndarray,
    *,
    rtol: float,
) -> None:
    """The streamed datasets are consumed inside a ``tf.function`` (a graph ``reduce``) with the eager results."""

    @tf.function
    def total_scores(blocks: tf.data.Dataset) -> tf.Tensor:
        return blocks.reduce(tf.constant(0.0, matrix.dtype), lambda total, block: total + tf.reduce_sum(block[-1]))

    @tf.function
    def total_self_influence(values: tf.data.Dataset) -> tf.Tensor:
        return values.reduce(tf.constant(0.0, self_values.dtype), lambda total, item: total + tf.reduce_sum(item[1]))

    scale = np.abs(matrix).sum()
    graph_total = float(total_scores(calculator.estimate_influence_values_in_batches(test, train)))
    np.testing.assert_allclose(graph_total, matrix.sum(), rtol=rtol, atol=rtol * scale)
    graph_self = float(total_self_influence(calculator.compute_influence_values(train)))
    np.testing.assert_allclose(graph_self, self_values.sum(), rtol=rtol, atol=rtol * np.abs(self_values).sum())
