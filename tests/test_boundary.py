"""Boundary methods: DeepFool distances equal the closed forms of linear classifiers (float64), weights untouched."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from engine_checks import rebatch
from helpers import classification_data, dataset, small_mlp, sparse_ce

from influenciae import ORDER, InfluenceModel
from influenciae.influence import boundary
from influenciae.influence.boundary import SampleBoundaryCalculator, WeightsBoundaryCalculator

DUAL = {2: 2, np.inf: 1, 1: np.inf}  # q with 1/p + 1/q = 1


def linear_classifier(classes: int, num_features: int = 4, num_examples: int = 13, seed: int = 0):
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [keras.Input((num_features,), dtype="float64"), keras.layers.Dense(classes, dtype="float64")]
    )
    model.layers[0].kernel.assign(rng.standard_normal((num_features, classes)))
    model.layers[0].bias.assign(rng.standard_normal(classes))
    x = rng.standard_normal((num_examples, num_features))
    return model, x, dataset(x, np.zeros(num_examples, "int64"), batch_size=5)


def analytic_input_distance(model, x, norm, candidates=None):
    """min over competing classes l of |(w_k - w_l)·x + b_k - b_l| / ‖w_k - w_l‖_q (one column: scores [0, s])."""
    kernel, bias = model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()
    if kernel.shape[1] == 1:
        kernel, bias = np.hstack([np.zeros_like(kernel), kernel]), np.concatenate([[0.0], bias])
    logits = x @ kernel + bias
    distances = []
    for row, scores in zip(x, logits, strict=True):
        k = int(np.argmax(scores))
        allowed = range(len(scores)) if candidates is None else np.argsort(-scores)[:candidates]
        distances.append(
            min(
                abs((kernel[:, k] - kernel[:, other]) @ row + bias[k] - bias[other])
                / np.linalg.norm(kernel[:, k] - kernel[:, other], ord=DUAL[norm])
                for other in allowed
                if other != k
            )
        )
    return np.array(distances)


@pytest.mark.parametrize(("classes", "norm"), [(1, 2), (2, 2), (3, 2), (3, np.inf), (3, 1)])
def test_sample_boundary_equals_the_distance_to_a_linear_boundary(classes, norm):
    model, x, train = linear_classifier(classes)
    calculator = SampleBoundaryCalculator(model, norm=norm)
    expected = analytic_input_distance(model, x, norm)
    np.testing.assert_allclose(calculator.distance_to_boundary(train), expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(calculator.self_influence(train), -expected, rtol=1e-6, atol=1e-12)


def test_candidate_classes_restrict_the_competitors():
    model, x, train = linear_classifier(5, num_examples=20, seed=2)
    restricted = SampleBoundaryCalculator(model, max_candidate_classes=2).distance_to_boundary(train)
    np.testing.assert_allclose(restricted, analytic_input_distance(model, x, 2, candidates=2), rtol=1e-6)
    full = SampleBoundaryCalculator(model, max_candidate_classes=5).distance_to_boundary(train)
    np.testing.assert_allclose(full, analytic_input_distance(model, x, 2), rtol=1e-6)
    assert np.all(restricted >= full - 1e-12) and np.any(restricted > full)


def test_sample_boundary_lands_on_the_boundary_of_a_network():
    model = small_mlp(seed=1)
    x, _ = classification_data(num_examples=12, seed=5)
    calculator = SampleBoundaryCalculator(model, step_nbr=50)
    inputs = x
    perturbations, unreachable = calculator._runner(inputs).run(calculator._flatten(inputs))
    assert not unreachable.any()
    before, after = model(x).numpy(), model(x + perturbations.numpy()).numpy()
    original = before.argmax(axis=1)
    others = np.where(np.eye(3, dtype=bool)[original], -np.inf, after).max(axis=1)
    margin = after[np.arange(12), original] - others
    assert np.all(margin <= 1e-6 * np.maximum(1, np.abs(after).max(axis=1)))  # on (or just across) the boundary
    distances = np.linalg.norm(perturbations.numpy(), axis=1)
    np.testing.assert_allclose(calculator.distance_to_boundary(dataset(x, np.zeros(12), 5)), distances, rtol=1e-9)


def weight_distance_by_least_squares(features, logits):
    """Minimal ‖Δθ‖₂ over θ = [W; b] making each competitor tie with the predicted class (numpy lstsq)."""
    augmented = np.hstack([features, np.ones((len(features), 1))])
    distances = []
    for row, scores in zip(augmented, logits, strict=True):
        k = int(np.argmax(scores))
        changes = {}
        for other in range(len(scores)):
            if other != k:
                constraint = np.zeros((augmented.shape[1], len(scores)))  # (z_k - z_other)(θ + Δθ) = 0, one row
                constraint[:, k], constraint[:, other] = row, -row
                solution = np.linalg.lstsq(constraint.reshape(1, -1), [scores[other] - scores[k]], rcond=None)[0]
                changes[other] = solution.reshape(constraint.shape)
        best = min(changes, key=lambda other: np.linalg.norm(changes[other]))
        moved = row @ changes[best] + scores  # the cheapest change really ties the prediction with a winner
        assert np.isclose(moved[k], moved[best]) and moved[k] >= moved.max() - 1e-9
        distances.append(np.linalg.norm(changes[best]))
    return np.array(distances)


@pytest.mark.parametrize("classes", [2, 3])
def test_weights_boundary_equals_the_closed_form_on_a_linear_model(classes):
    model, x, train = linear_classifier(classes)
    logits = model(x).numpy()
    top = np.sort(logits, axis=1)
    closed_form = (top[:, -1] - top[:, -2]) / (np.sqrt(2) * np.linalg.norm(np.hstack([x, np.ones((13, 1))]), axis=1))
    np.testing.assert_allclose(weight_distance_by_least_squares(x, logits), closed_form, rtol=1e-10)
    calculator = WeightsBoundaryCalculator(model)
    np.testing.assert_allclose(calculator.distance_to_boundary(train), closed_form, rtol=1e-6)


def test_weights_boundary_of_a_network_moves_the_last_layer_only():
    model = small_mlp(seed=2)
    x, y = classification_data(num_examples=15, seed=6)
    hidden = np.tanh(x @ model.layers[0].kernel.numpy() + model.layers[0].bias.numpy())
    expected = weight_distance_by_least_squares(hidden, model(x).numpy())
    wrapped = InfluenceModel(model, loss_function=sparse_ce())
    for calculator in (WeightsBoundaryCalculator(model), WeightsBoundaryCalculator(wrapped)):
        np.testing.assert_allclose(calculator.distance_to_boundary(dataset(x, y, 4)), expected, rtol=1e-6)


def test_a_single_logit_and_other_norms_in_weight_space():
    model, x, train = linear_classifier(1)
    augmented = np.hstack([x, np.ones((13, 1))])
    logit = np.abs(model(x).numpy()[:, 0])
    for norm in (2, np.inf, 1):
        expected = logit / np.linalg.norm(augmented, ord=DUAL[norm], axis=1)
        np.testing.assert_allclose(WeightsBoundaryCalculator(model, norm=norm).distance_to_boundary(train), expected)


@pytest.mark.parametrize("calculator_class", [SampleBoundaryCalculator, WeightsBoundaryCalculator])
def test_weights_are_untouched_even_when_interrupted(calculator_class, monkeypatch):
    model = small_mlp(seed=4)
    x, y = classification_data(num_examples=10, seed=7)
    train = dataset(x, y, batch_size=4)
    before = [w.numpy().copy() for w in model.weights]
    calculator = calculator_class(model, step_nbr=20)
    calculator.self_influence(train)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights, strict=True))

    original, calls = boundary.DeepFool.step, []

    def interrupted(self, *arguments):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(self, *arguments)

    monkeypatch.setattr(boundary.DeepFool, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calculator.self_influence(train)
    assert len(calls) == 2
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights, strict=True))


@pytest.mark.parametrize("calculator_class", [SampleBoundaryCalculator, WeightsBoundaryCalculator])
def test_self_influence_is_batch_invariant_and_ranks_top_k(calculator_class):
    model = small_mlp(seed=5)
    x, y = classification_data(num_examples=14, seed=8)
    train = dataset(x, y, batch_size=6)
    calculator = calculator_class(model, step_nbr=30)
    scores = calculator.self_influence(train)
    assert np.all(scores < 0) and np.all(np.isfinite(scores))
    for batch_size in (1, 5):
        np.testing.assert_allclose(calculator.self_influence(rebatch(train, batch_size)), scores, rtol=1e-9)
    streamed = np.concatenate([values.numpy() for _, values in calculator.compute_influence_values(train)])
    np.testing.assert_allclose(streamed, scores, rtol=1e-12)
    for order in (ORDER.DESCENDING, ORDER.ASCENDING):
        indices, values = calculator.compute_top_k_from_training_dataset(rebatch(train, 4), 3, order=order)
        ranking = np.argsort(-scores if order is ORDER.DESCENDING else scores, kind="stable")[:3]
        np.testing.assert_array_equal(indices.numpy(), ranking)
        np.testing.assert_allclose(values.numpy(), scores[ranking], rtol=1e-9)


def test_pairwise_methods_explain_the_alternative():
    model, x, train = linear_classifier(3)
    for calculator in (SampleBoundaryCalculator(model), WeightsBoundaryCalculator(model)):
        calls = [
            lambda c=calculator: c.influence_matrix(train, train),
            lambda c=calculator: c.most_influential(train, train, k=2),
            lambda c=calculator: c.top_k(train, train, k=2),
            lambda c=calculator: c.estimate_influence_values_in_batches(train, train),
            lambda c=calculator: c.compute_influence_vector(train),
        ]
        for call in calls:
            with pytest.raises(ValueError, match="compute_top_k_from_training_dataset"):
                call()


def test_unreachable_boundary_and_bad_arguments():
    model, x, train = linear_classifier(3)
    model.layers[0].kernel.assign(np.zeros((4, 3)))  # scores no longer depend on the input
    assert np.all(np.isinf(SampleBoundaryCalculator(model).distance_to_boundary(train)))
    assert np.all(np.isfinite(WeightsBoundaryCalculator(model).distance_to_boundary(train)))
    with pytest.raises(ValueError, match="norm must be"):
        SampleBoundaryCalculator(model, norm=3)
    with pytest.raises(ValueError, match="step_nbr"):
        WeightsBoundaryCalculator(model, step_nbr=0)
    with pytest.raises(ValueError, match="max_candidate_classes"):
        SampleBoundaryCalculator(model, max_candidate_classes=1)
    tokens = dataset(np.zeros((4, 4), "int64"), np.zeros(4, "int64"), batch_size=2)
    with pytest.raises(ValueError, match="floating point"):
        SampleBoundaryCalculator(model).self_influence(tokens)
    followed = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    followed.pop()
    followed.add(keras.layers.BatchNormalization())
    with pytest.raises(ValueError, match="come after the last Dense layer"):
        WeightsBoundaryCalculator(followed)
    with pytest.raises(ValueError, match="no Dense layer"):
        WeightsBoundaryCalculator(keras.Sequential([keras.Input((4, 1)), keras.layers.Conv1D(2, 1)]))
