"""SimilarityInfluence: scores equal numpy on hand-computed activations; engine invariants; activation disk cache."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from engine_checks import check_calculator_invariants
from helpers import classification_data, dataset, small_mlp, sparse_ce

from influenciae import CACHE, ORDER, InfluenceModel
from influenciae.influence.similarity import SimilarityInfluence


def rbf(a, b):
    """A user similarity: Gaussian kernel of the squared distance."""
    squared = tf.reduce_sum(tf.square(a[:, None, :] - b[None, :, :]), axis=-1)
    return tf.exp(-0.5 * squared)


@pytest.fixture(scope="module")
def problem():
    model = small_mlp(seed=3)
    x, y = classification_data(num_examples=30, seed=4)
    kernel, bias = (w.numpy() for w in model.layers[0].weights)
    hidden = np.tanh(x @ kernel + bias)
    logits = hidden @ model.layers[1].kernel.numpy() + model.layers[1].bias.numpy()
    train, test = dataset(x[:20], y[:20], batch_size=6), dataset(x[20:], y[20:], batch_size=4)
    return model, train, test, hidden, logits


def expected_scores(similarity: str, test: np.ndarray, train: np.ndarray) -> np.ndarray:
    if similarity == "cosine":
        return (test / np.linalg.norm(test, axis=1, keepdims=True)) @ (
            train / np.linalg.norm(train, axis=1, keepdims=True)
        ).T
    if similarity == "dot":
        return test @ train.T
    return -np.linalg.norm(test[:, None, :] - train[None, :, :], axis=-1)


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean", rbf])
def test_engine_invariants(problem, similarity):
    model, train, test, *_ = problem
    check_calculator_invariants(SimilarityInfluence(model, 0, similarity), train, test, rtol=1e-9, extended=False)


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
def test_scores_and_self_influence_equal_numpy(problem, similarity):
    model, train, test, hidden, _ = problem
    calculator = SimilarityInfluence(model, 0, similarity)
    expected = expected_scores(similarity, hidden[20:], hidden[:20])
    np.testing.assert_allclose(calculator.influence_matrix(test, train), expected, rtol=1e-12, atol=1e-12)
    self_expected = {"cosine": np.ones(20), "dot": np.sum(hidden[:20] ** 2, axis=1), "euclidean": np.zeros(20)}
    np.testing.assert_allclose(calculator.self_influence(train), self_expected[similarity], rtol=1e-12)


@pytest.mark.parametrize("strategy", ["linear", "streaming"])
@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_cosine_top_k_equals_numpy_brute_force(problem, strategy, order):
    model, train, test, hidden, _ = problem
    cosine = expected_scores("cosine", hidden[20:], hidden[:20])
    ranking = np.argsort(-cosine if order is ORDER.DESCENDING else cosine, axis=1, kind="stable")[:, :4]
    calculator = SimilarityInfluence(model, 0)
    indices, values = calculator.most_influential(test, train, k=4, order=order, nearest_neighbors=strategy)
    np.testing.assert_array_equal(indices, ranking)
    np.testing.assert_allclose(values, np.take_along_axis(cosine, ranking, axis=1), rtol=1e-12)
    streamed = np.concatenate([i.numpy() for _, _, i in calculator.top_k(test, train, k=4, order=order)])
    np.testing.assert_array_equal(streamed, ranking)


def test_euclidean_top_k_lists_nearest_first(problem):
    model, train, test, hidden, _ = problem
    distances = np.linalg.norm(hidden[20:, None] - hidden[None, :20], axis=-1)
    indices, values = SimilarityInfluence(model, 0, "euclidean").most_influential(test, train, k=3)
    np.testing.assert_array_equal(indices, np.argsort(distances, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(values, -np.sort(distances, axis=1)[:, :3], rtol=1e-12)


def test_layers_by_name_concatenate_and_accept_an_influence_model(problem):
    model, train, test, hidden, logits = problem
    wrapped = InfluenceModel(model, loss_function=sparse_ce())
    calculator = SimilarityInfluence(wrapped, [0, model.layers[1].name], "dot")
    assert calculator.layer_indices == [0, 1]
    both = np.hstack([hidden, logits])
    np.testing.assert_allclose(calculator.influence_matrix(test, train), both[20:] @ both[:20].T, rtol=1e-12)
    vectors = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(train)])
    np.testing.assert_allclose(vectors, both[:20], rtol=1e-12)


def test_multi_dimensional_activations_are_flattened():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4, 3), dtype="float64"), keras.layers.Dense(2, dtype="float64", name="per_step")]
    )
    x = np.random.default_rng(0).standard_normal((7, 4, 3))
    train = dataset(x, np.zeros(7, "int64"), batch_size=3)
    kernel, bias = (w.numpy() for w in model.layers[0].weights)
    flat = (x @ kernel + bias).reshape(7, -1)
    scores = SimilarityInfluence(model, "per_step", "dot").influence_matrix(train, train)
    np.testing.assert_allclose(scores, flat @ flat.T, rtol=1e-12)


def test_disk_cache_of_activations_is_reused_and_refused_for_other_settings(problem, tmp_path):
    model, train, test, hidden, _ = problem
    calls = []

    def counting(calculator):
        original = calculator._influence_vectors

        def wrapper(batch):
            values = original(batch)
            calls.append(int(values.shape[0]))  # rows computed
            return values

        calculator._influence_vectors = wrapper
        return calculator

    first = counting(SimilarityInfluence(model, 0, cache_dir=tmp_path / "activations"))
    vectors = np.concatenate([v.numpy() for _, v in first.compute_influence_vector(train)])  # path = cache_dir
    np.testing.assert_allclose(vectors, hidden[:20] / np.linalg.norm(hidden[:20], axis=1, keepdims=True))
    assert sum(calls) == 20  # each of the 20 examples once (in blocks of batches of 6)

    calls.clear()
    second = counting(SimilarityInfluence(model, 0, cache_dir=tmp_path / "activations"))
    reread = np.concatenate([v.numpy() for _, v in second.compute_influence_vector(train)])
    matrix = second.influence_matrix(test, train, influence_vector_in_cache=CACHE.DISK)
    indices, _ = second.most_influential(test, train, k=2, influence_vector_in_cache=CACHE.DISK)
    assert calls == []
    np.testing.assert_array_equal(reread, vectors)
    np.testing.assert_allclose(matrix, expected_scores("cosine", hidden[20:], hidden[:20]), rtol=1e-12)
    np.testing.assert_array_equal(indices, np.argsort(-matrix, axis=1, kind="stable")[:, :2])

    for other in (
        SimilarityInfluence(model, 1, cache_dir=tmp_path / "activations"),
        SimilarityInfluence(model, 0, "dot"),
    ):
        with pytest.raises(ValueError, match="other settings"):
            other.compute_influence_vector(train, str(tmp_path / "activations"))
    # the memory cache (the default) never touches cache_dir
    stored = [path for path in (tmp_path / "activations").iterdir() if path.name != ".influenciae.lock"]
    assert len(stored) == 2  # manifest + one shard (the writers' lock file aside)
    SimilarityInfluence(model, 1, cache_dir=tmp_path / "unused").influence_matrix(test, train)
    assert not (tmp_path / "unused").exists()


def test_bad_arguments_are_refused(problem):
    model, train, *_ = problem
    with pytest.raises(ValueError, match="similarity must be one of"):
        SimilarityInfluence(model, 0, "manhattan")
    with pytest.raises(TypeError, match="similarity must be"):
        SimilarityInfluence(model, 0, 3)
    with pytest.raises(ValueError, match="not a layer"):
        SimilarityInfluence(model, "missing")
    with pytest.raises(ValueError, match="layers is empty"):
        SimilarityInfluence(model, [])
    with pytest.raises(ValueError, match=r"must return \[m, n\]"):
        SimilarityInfluence(model, 0, lambda a, b: tf.zeros([3])).influence_matrix(train, train)
    with pytest.raises(ValueError, match="dot product"):
        SimilarityInfluence(model, 0, "euclidean").most_influential(train, train, nearest_neighbors="linear")
    unbatched = tf.data.Dataset.from_tensor_slices((np.zeros((4, 6)), np.zeros((4, 1)))).map(lambda a, b: (a, b[0]))
    with pytest.raises(ValueError, match="unbatched"):
        SimilarityInfluence(model, 0).self_influence(unbatched)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed"):
        SimilarityInfluence(subclassed, 0)
