"""Group influence (first order and Basu et al.'s second order) against closed forms and retraining, in float64."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import FLOAT, ExactL2, dataset, half_squared_error, logistic_problem

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.influence.group import GroupInfluenceMixin, SecondOrderInfluenceCalculator


def FirstOrderGroup(model, train_set, **options):  # noqa: N802 - reads like the class it builds
    """First-order group influence through the public calculator (GroupInfluenceMixin on the shared engine)."""
    calculator = FirstOrderInfluenceCalculator(model, train_set, "exact", **options)
    assert isinstance(calculator, GroupInfluenceMixin)
    return calculator


def second_order_closed_form(hessian, gradients, hessians, group, num_train):
    """Basu et al.'s vector at the library's scale (N × parameter change), in numpy."""
    fraction = len(group) / num_train
    first = np.linalg.solve(hessian, gradients[group].sum(axis=0))
    second = np.linalg.solve(hessian, hessians[group].sum(axis=0) @ first)
    return ((1 - 2 * fraction) * first + second / num_train) / (1 - fraction) ** 2


def logistic_per_example_hessians(influence_model, x):
    """``σ(1-σ) x̃ x̃ᵀ`` for each example (x̃ = [x, 1]), regularizer excluded: ``[N, P, P]``."""
    kernel = influence_model.model.layers[0].kernel.numpy()[:, 0]
    bias = float(influence_model.model.layers[0].bias.numpy()[0])
    probabilities = 1 / (1 + np.exp(-(x @ kernel + bias)))
    augmented = np.hstack([x, np.ones((len(x), 1))])
    return (probabilities * (1 - probabilities))[:, None, None] * augmented[:, :, None] * augmented[:, None, :]


@pytest.fixture(scope="module")
def logistic():
    influence_model, x, y, hessian, gradients = logistic_problem(num_examples=60)
    return influence_model, x, y, hessian, gradients, dataset(x, y, batch_size=7)


def test_single_example_group_equals_pairwise_influence(logistic):
    influence_model, x, y, hessian, gradients, train = logistic
    calculator = FirstOrderGroup(influence_model, train)
    train_index, test_index = 3, 41
    group = dataset(x[[train_index]], y[[train_index]], batch_size=1)
    expected_vector = np.linalg.solve(hessian, gradients[train_index])
    np.testing.assert_allclose(
        calculator.compute_influence_vector_group(group).numpy(), expected_vector, rtol=1e-9, atol=1e-12
    )
    expected = gradients[test_index] @ expected_vector  # ∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z)
    value = calculator.estimate_influence_values_group(group, dataset(x[[test_index]], y[[test_index]], batch_size=1))
    assert isinstance(value, float)
    assert abs(expected) > 1e-3  # a real number, not a vanishing one
    np.testing.assert_allclose(value, expected, rtol=1e-9)


def test_first_order_group_value_is_the_sum_of_pairwise_influences(logistic):
    influence_model, x, y, hessian, gradients, train = logistic
    calculator = FirstOrderGroup(influence_model, train)
    group, evaluated = [0, 5, 11, 17, 58], [2, 30, 44]  # different sizes, partial batches below
    pairwise = gradients[evaluated] @ np.linalg.solve(hessian, gradients[group].T)  # [3, 5]
    value = calculator.estimate_influence_values_group(
        dataset(x[group], y[group], batch_size=2), dataset(x[evaluated], y[evaluated], batch_size=2)
    )
    np.testing.assert_allclose(value, pairwise.sum(), rtol=1e-9)
    self_value = calculator.estimate_influence_values_group(dataset(x[group], y[group], batch_size=3))
    self_pairwise = gradients[group] @ np.linalg.solve(hessian, gradients[group].T)
    np.testing.assert_allclose(self_value, self_pairwise.sum(), rtol=1e-9)
    assert self_value > 0  # H is positive definite: a group always helps itself


def test_second_order_matches_the_closed_form_of_basu_et_al(logistic):
    influence_model, x, y, hessian, gradients, train = logistic
    hessians = logistic_per_example_hessians(influence_model, x)
    np.testing.assert_allclose(hessians.mean(axis=0) + np.diag([0.05] * 4 + [0.0]), hessian, atol=1e-12)
    calculator = SecondOrderInfluenceCalculator(influence_model, train)
    group, evaluated = list(range(0, 60, 5)), [1, 2, 3, 4]  # p = 12/60 = 0.2
    expected = second_order_closed_form(hessian, gradients, hessians, group, num_train=60)
    vector = calculator.compute_influence_vector_group(dataset(x[group], y[group], batch_size=5)).numpy()
    np.testing.assert_allclose(vector, expected, rtol=1e-9, atol=1e-12)
    first_order = np.linalg.solve(hessian, gradients[group].sum(axis=0))
    assert np.linalg.norm(vector - first_order) > 0.05 * np.linalg.norm(first_order)  # the correction is real
    value = calculator.estimate_influence_values_group(
        dataset(x[group], y[group], batch_size=5), dataset(x[evaluated], y[evaluated], batch_size=3)
    )
    np.testing.assert_allclose(value, gradients[evaluated].sum(axis=0) @ expected, rtol=1e-9)


def test_second_order_with_a_hessian_sample_and_damping(logistic):
    influence_model, x, y, hessian, gradients, train = logistic
    hessians = logistic_per_example_hessians(influence_model, x)
    calculator = SecondOrderInfluenceCalculator(
        influence_model, train, "cg", n_samples_for_hessian=30, damping=0.1, ihvp_options={"tolerance": 1e-12}
    )
    assert calculator.train_size == 60  # N is the whole training set, H only its first 30 examples
    sample_hessian = hessians[:30].mean(axis=0) + np.diag([0.05] * 4 + [0.0]) + 0.1 * np.eye(5)
    group = [7, 8, 9]
    expected = second_order_closed_form(sample_hessian, gradients, hessians, group, num_train=60)
    vector = calculator.compute_influence_vector_group(dataset(x[group], y[group], batch_size=2)).numpy()
    np.testing.assert_allclose(vector, expected, rtol=1e-6)


def test_second_order_tends_to_first_order_as_the_group_fraction_vanishes(logistic):
    influence_model, x, y, hessian, gradients, train = logistic
    group = [10, 20]
    group_set = dataset(x[group], y[group], batch_size=2)
    first_order = np.linalg.solve(hessian, gradients[group].sum(axis=0))
    gaps = []
    for copies in (1, 10, 100):  # repeating the training set keeps H but divides p = 2 / (60·copies)
        calculator = SecondOrderInfluenceCalculator(influence_model, dataset(x, y, batch_size=60).repeat(copies))
        vector = calculator.compute_influence_vector_group(group_set).numpy()
        gaps.append(np.linalg.norm(vector - first_order) / np.linalg.norm(first_order))
    assert gaps[0] > 1e-2
    assert gaps[1] < gaps[0] / 5 and gaps[2] < gaps[1] / 5  # the gap is O(p)
    assert gaps[2] < 1e-3


def ridge_case(regularization, num_examples=100, num_features=5, group_size=10, seed=0):
    """An exactly trained ridge regression, eight groups of 10% of it, and a test group.

    Noisy targets (std 1, std 3 for the test group) keep the residuals, hence the linear term of the loss change,
    large against its curvature term ``½ Δθᵀ (Σ x xᵀ) Δθ``, which no influence estimate (first or second order) models.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, num_features))
    weights = rng.standard_normal(num_features)
    y = x @ weights + rng.standard_normal(num_examples)
    regularizer = ExactL2(regularization / 2) if regularization else None
    model = keras.Sequential(
        [
            keras.Input((num_features,), dtype=FLOAT),
            keras.layers.Dense(1, use_bias=False, dtype=FLOAT, kernel_regularizer=regularizer),
        ]
    )
    optimum = np.linalg.solve(x.T @ x / num_examples + regularization * np.eye(num_features), x.T @ y / num_examples)
    model.layers[0].kernel.assign(optimum[:, None])
    random_groups = [rng.choice(num_examples, group_size, replace=False) for _ in range(4)]
    # The examples furthest along one feature: coherent groups that move θ̂ a lot.
    coherent_groups = [np.argsort(-x[:, feature])[:group_size] for feature in range(4)]
    x_test = rng.standard_normal((4, num_features))
    y_test = x_test @ weights + 3 * rng.standard_normal(4)
    influence_model = InfluenceModel(model, loss_function=half_squared_error)
    return influence_model, x, y, optimum, random_groups + coherent_groups, x_test, y_test


def ridge_refit(x, y, group, regularization):
    """Removal = dropping the group's terms from ``(1/N) Σ ℓ + Ω``: the closed-form refit keeps 1/N and Ω."""
    num_examples, num_features = x.shape
    kept = np.setdiff1d(np.arange(num_examples), group)
    refit = np.linalg.solve(
        x[kept].T @ x[kept] / num_examples + regularization * np.eye(num_features), x[kept].T @ y[kept] / num_examples
    )
    if regularization == 0:  # ... which, without regularization, is plain least squares on the remaining examples
        np.testing.assert_allclose(refit, np.linalg.lstsq(x[kept], y[kept], rcond=None)[0], rtol=1e-10)
    return refit


@pytest.mark.parametrize("regularization", [0.1, 0.0])
def test_second_order_predicts_retraining_better_than_first_order(regularization):
    influence_model, x, y, optimum, groups, x_test, y_test = ridge_case(regularization)
    num_train = len(x)
    train, test_set = dataset(x, y, batch_size=16), dataset(x_test, y_test, batch_size=3)
    calculators = (FirstOrderGroup(influence_model, train), SecondOrderInfluenceCalculator(influence_model, train))
    test_gradient = (x_test * (x_test @ optimum - y_test)[:, None]).sum(axis=0)

    def test_loss(kernel):
        return 0.5 * np.sum((x_test @ kernel - y_test) ** 2)

    loss_errors = np.zeros((len(groups), 2))
    for row, group in enumerate(groups):
        refit = ridge_refit(x, y, group, regularization)
        actual_change = refit - optimum
        actual_loss_change = test_loss(refit) - test_loss(optimum)
        group_set = dataset(x[group], y[group], batch_size=4)
        parameter_errors, linear_errors = [], []
        for column, calculator in enumerate(calculators):
            predicted_change = calculator.compute_influence_vector_group(group_set).numpy() / num_train
            parameter_errors.append(np.linalg.norm(predicted_change - actual_change) / np.linalg.norm(actual_change))
            predicted_loss_change = calculator.estimate_influence_values_group(group_set, test_set) / num_train
            np.testing.assert_allclose(predicted_loss_change, test_gradient @ predicted_change, rtol=1e-9)
            linear_errors.append(abs(predicted_loss_change - test_gradient @ actual_change))
            loss_errors[row, column] = abs(predicted_loss_change - actual_loss_change)
        assert 0.05 < parameter_errors[0] < 0.5  # first order is visibly off for a 10% group ...
        assert parameter_errors[1] < parameter_errors[0] / 3  # ... second order much closer to the refit
        assert linear_errors[1] < linear_errors[0]  # so is its prediction of the loss change, linearized
    # The actual loss change also has a curvature term that neither order models; on average, second order still wins.
    assert loss_errors[:, 1].mean() < 0.5 * loss_errors[:, 0].mean()


def test_invalid_groups_and_arguments(logistic):
    influence_model, x, y, _, _, train = logistic
    calculator = SecondOrderInfluenceCalculator(influence_model, train)
    empty = dataset(x[:0], y[:0], batch_size=4)
    with pytest.raises(ValueError, match="group_train is empty"):
        calculator.compute_influence_vector_group(empty)
    with pytest.raises(ValueError, match="group_to_evaluate is empty"):
        calculator.estimate_influence_values_group(dataset(x[:2], y[:2]), empty)
    with pytest.raises(ValueError, match="group_train is empty"):
        FirstOrderGroup(influence_model, train).estimate_influence_values_group(empty)
    with pytest.raises(TypeError, match="group_train must be a tf.data.Dataset"):
        calculator.compute_influence_vector_group((x[:2], y[:2]))
    with pytest.raises(TypeError, match="group_to_evaluate must be a tf.data.Dataset"):
        calculator.estimate_influence_values_group(dataset(x[:2], y[:2]), x[:2])
    with pytest.raises(ValueError, match="unbatched"):
        calculator.compute_influence_vector_group(tf.data.Dataset.from_tensor_slices((x[:2], y[:2])))
    with pytest.raises(ValueError, match=re.escape("p = |U|/N must be below 1")):
        calculator.compute_influence_vector_group(train)
    with pytest.raises(TypeError, match="dataset must be a tf.data.Dataset"):
        SecondOrderInfluenceCalculator(influence_model, (x, y))
    with pytest.raises(TypeError, match="InfluenceModel"):
        SecondOrderInfluenceCalculator(influence_model.model, train)
    with pytest.raises(ValueError, match="n_samples_for_hessian"):
        SecondOrderInfluenceCalculator(influence_model, train, n_samples_for_hessian=0)
    with pytest.raises(ValueError, match="cannot be applied to an already built solver"):
        SecondOrderInfluenceCalculator(influence_model, train, calculator.ihvp, damping=0.1)
    shared = SecondOrderInfluenceCalculator(influence_model, train, calculator.ihvp)  # a built solver is reused
    assert shared.ihvp is calculator.ihvp
