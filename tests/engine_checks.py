"""The shared checks every calculator must pass (one list, run for every method, as optax does for optimizers)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from influenciae import CACHE, ORDER


def rebatch(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """The same examples with another batching, after a map and a filter (unknown cardinality)."""
    return dataset.unbatch().map(lambda *example: example).filter(lambda *example: True).batch(batch_size)


def check_calculator_invariants(calculator, train: tf.data.Dataset, test: tf.data.Dataset, *, rtol: float = 1e-6):
    """Self-influence = diagonal of pairwise scores; rankings = argsort; batching, caching and streaming invariant.

    Args:
        calculator: Any ``BaseInfluenceCalculator``.
        train: A small batched training dataset (tens of examples).
        test: A small batched test dataset.
        rtol: Relative tolerance of score comparisons (float32 models need ~1e-5).
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
    return matrix
