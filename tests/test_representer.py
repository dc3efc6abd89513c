"""Representer points (RPS-L2 and RPS-LJE): exact decompositions in float64, closed forms, engine checks, errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from engine_checks import check_calculator_invariants
from helpers import FLOAT, ExactL2, classification_data, dataset, logistic_loss, sparse_ce

from influenciae import InfluenceModel
from influenciae.influence.representer import RepresenterPointL2, RepresenterPointLJE

LAMBDA = 0.05


def mlp(use_bias: bool = True, classes: int = 3, seed: int = 0, regularization: float | None = None):
    """Two Dense layers in float64; optionally ``regularization·‖·‖²`` on the last kernel and bias."""
    keras.utils.set_random_seed(seed)
    penalty = None if regularization is None else ExactL2(regularization)
    return keras.Sequential(
        [
            keras.Input((6,), dtype=FLOAT),
            keras.layers.Dense(8, activation="tanh", dtype=FLOAT),
            keras.layers.Dense(
                classes,
                use_bias=use_bias,
                dtype=FLOAT,
                kernel_regularizer=penalty,
                bias_regularizer=penalty if use_bias else None,
            ),
        ]
    )


def features(model, x):
    """``f̃`` computed independently of the calculators: the last layer's inputs, plus 1 with a bias."""
    extracted = keras.Model(model.inputs[0], model.layers[-1].input)(x).numpy()
    return np.hstack([extracted, np.ones((len(x), 1))]) if model.layers[-1].use_bias else extracted


def assign_last_layer(model, weights):
    """Write a flat ``[kernel; bias]`` vector into the model's last Dense layer."""
    layer = model.layers[-1]
    kernel_size = int(np.prod(layer.kernel.shape))
    layer.kernel.assign(np.reshape(weights[:kernel_size], layer.kernel.shape))
    if layer.use_bias:
        layer.bias.assign(weights[kernel_size:])


@pytest.mark.parametrize("use_bias", [True, False])
def test_l2_decomposition_reproduces_the_models_logits(use_bias):
    x, y = classification_data(num_examples=30)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, 30)
    model = mlp(use_bias=use_bias)
    train = dataset(x, y, batch_size=8, sample_weight=weights)
    refit = RepresenterPointL2(model, train, sparse_ce(), LAMBDA)
    assert refit.fit_info["converged"] and refit.fit_info["iterations"] > 0
    # the refit layer is stationary for R(Θ) = mean w ℓ + λ‖Θ‖²: written into the model, nothing changes any more
    assign_last_layer(model, refit.fitted_weights.numpy())
    rps = RepresenterPointL2(model, train, sparse_ce(), LAMBDA)
    assert rps.fit_info["iterations"] == 0
    logits = model(x).numpy()  # the last layer is linear: these are the pre-activation outputs
    scores = rps.influence_matrix(dataset(x, y), train)
    predicted = logits[np.arange(len(x)), logits.argmax(axis=1)]
    np.testing.assert_allclose(scores.sum(axis=1), predicted, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rps.surrogate_logits(dataset(x, y)), logits, rtol=1e-10, atol=1e-12)
    # Θ = Σ_i f̃_i α_iᵀ, bias included, and a fixed output unit decomposes too
    alpha = rps.global_importance(train)
    last = model.layers[-1]
    expected = np.vstack([last.kernel.numpy(), last.bias.numpy()[None]]) if use_bias else last.kernel.numpy()
    np.testing.assert_allclose(features(model, x).T @ alpha, expected, rtol=1e-6, atol=1e-9)
    unit = RepresenterPointL2(model, train, sparse_ce(), LAMBDA, explained_class=2)
    np.testing.assert_allclose(unit.influence_matrix(dataset(x, y), train).sum(axis=1), logits[:, 2], rtol=1e-6)


def test_l2_scores_are_the_representer_values_in_closed_form():
    x, y = classification_data(num_examples=24)
    model = mlp()
    train, test = dataset(x[:18], y[:18], batch_size=5), dataset(x[18:], y[18:], batch_size=4)
    rps = RepresenterPointL2(model, train, sparse_ce(), LAMBDA, explained_class="label")
    theta = rps.fitted_weights.numpy().reshape(-1, 3)
    train_features, test_features = features(model, x[:18]), features(model, x[18:])
    logits = train_features @ theta
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    alpha = -(probabilities - np.eye(3)[y[:18]]) / (2 * LAMBDA * 18)  # -∂ℓ/∂logits / (2λN)
    np.testing.assert_allclose(rps.global_importance(train), alpha, rtol=1e-10, atol=1e-14)
    expected = alpha[:, y[18:]].T * (test_features @ train_features.T)
    np.testing.assert_allclose(rps.influence_matrix(test, train), expected, rtol=1e-10, atol=1e-14)
    self_expected = alpha[np.arange(18), y[:18]] * (train_features**2).sum(1)
    np.testing.assert_allclose(rps.self_influence(train), self_expected, rtol=1e-10)
    assert np.all(self_expected > 0)  # label class with cross-entropy: (1 - p_y) ‖f̃‖² / (2λN)


def binary_model(seed: int = 0, regularization: float = LAMBDA):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,), dtype=FLOAT),
            keras.layers.Dense(5, activation="tanh", dtype=FLOAT),
            keras.layers.Dense(
                1, dtype=FLOAT, kernel_regularizer=ExactL2(regularization), bias_regularizer=ExactL2(regularization)
            ),
        ]
    )


def test_lje_equals_its_closed_form_and_sums_to_the_newton_step():
    x, labels = classification_data(num_examples=30, classes=2)
    y = labels.astype(FLOAT)
    model = binary_model()
    train, test = dataset(x[:24], y[:24], batch_size=7), dataset(x[24:], y[24:], batch_size=3)
    step, damping, n = 0.3, 1e-3, 24
    lje = RepresenterPointLJE(model, train, logistic_loss, step_size=step, damping=damping)

    train_features, test_features = features(model, x[:24]), features(model, x[24:])
    trained = np.concatenate([model.layers[-1].kernel.numpy()[:, 0], model.layers[-1].bias.numpy()])

    def gradient(theta):  # of mean logistic loss + λ‖θ‖² (kernel and bias regularized)
        p = 1 / (1 + np.exp(-train_features @ theta))
        return train_features.T @ (p - y[:24]) / n + 2 * LAMBDA * theta

    start = trained + step * gradient(trained)
    p = 1 / (1 + np.exp(-train_features @ start))
    hessian = (train_features * (p * (1 - p))[:, None]).T @ train_features / n
    hessian += (2 * LAMBDA + damping) * np.eye(len(start))
    constant = (start - np.linalg.solve(hessian, 2 * LAMBDA * start)) / n
    vectors = constant[None] - np.linalg.solve(hessian, (train_features * (p - y[:24])[:, None]).T).T / n
    signs = np.where(test_features @ trained > 0, 1.0, -1.0)  # explained: the predicted class
    expected = signs[:, None] * (test_features @ vectors.T)
    np.testing.assert_allclose(lje.expansion_point.numpy(), start, rtol=1e-12)
    np.testing.assert_allclose(lje.influence_matrix(test, train), expected, rtol=1e-9, atol=1e-12)
    newton = start - np.linalg.solve(hessian, gradient(start))
    np.testing.assert_allclose(expected.sum(axis=1), signs * (test_features @ newton), rtol=1e-10)
    np.testing.assert_allclose(lje.surrogate_logits(test)[:, 0], test_features @ newton, rtol=1e-10)


def test_lje_at_a_stationary_layer_reproduces_the_models_logits():
    """With the last layer at a minimum of its objective and step_size=0, Newton's step stays there."""
    x, labels = classification_data(num_examples=30, classes=2)
    y = labels.astype(FLOAT)
    model = binary_model(seed=2)
    train = dataset(x, y, batch_size=8)
    refit = RepresenterPointL2(model, train, logistic_loss, LAMBDA)  # same objective: ExactL2(λ) on kernel and bias
    assign_last_layer(model, refit.fitted_weights.numpy())
    lje = RepresenterPointLJE(model, train, logistic_loss, step_size=0.0)
    logits = model(x).numpy()[:, 0]
    scores = lje.influence_matrix(train, train)
    np.testing.assert_allclose(scores.sum(axis=1), np.abs(logits), rtol=1e-6)  # log-odds of the predicted class
    labelled = RepresenterPointLJE(model, train, logistic_loss, step_size=0.0, explained_class=0)
    np.testing.assert_allclose(labelled.influence_matrix(train, train).sum(axis=1), logits, rtol=1e-6)


@pytest.mark.parametrize("method", ["l2", "lje"])
def test_representer_points_pass_the_shared_engine_checks(method):
    x, y = classification_data(num_examples=20)
    model = mlp(seed=3)
    train, test = dataset(x[:15], y[:15], batch_size=6), dataset(x[15:], y[15:], batch_size=3)
    if method == "l2":
        calculator = RepresenterPointL2(model, train, sparse_ce(), LAMBDA)
    else:  # softmax with an unregularized last layer: its Hessian is singular along "add c to every logit"
        calculator = RepresenterPointLJE(InfluenceModel(model, loss_function=sparse_ce()), train, damping=1e-2)
    check_calculator_invariants(calculator, train, test, rtol=1e-8, extended=False)


def test_mislabeled_examples_get_large_representer_weights():
    rng = np.random.default_rng(0)
    num_examples, num_flipped = 80, 8
    y = rng.integers(0, 2, num_examples)
    x = rng.standard_normal((num_examples, 2)) + np.where(y[:, None] == 1, 2.0, -2.0)
    flipped = rng.choice(num_examples, num_flipped, replace=False)
    noisy = y.copy()
    noisy[flipped] = 1 - noisy[flipped]
    model = keras.Sequential([keras.Input((2,), dtype=FLOAT), keras.layers.Dense(2, dtype=FLOAT)])
    train = dataset(x, noisy, batch_size=16)
    rps = RepresenterPointL2(model, train, sparse_ce(), 1e-2, explained_class="label")
    alpha = np.abs(rps.global_importance(train)[np.arange(num_examples), noisy])
    clean = np.setdiff1d(np.arange(num_examples), flipped)
    assert alpha[flipped].mean() > 4 * alpha[clean].mean()  # about 6 here
    top = set(np.argsort(-alpha)[:num_flipped].tolist())
    assert len(top & set(flipped.tolist())) >= num_flipped - 1
    indices, _ = rps.compute_top_k_from_training_dataset(train, num_flipped)  # self-influence ranks them too
    assert len(set(indices.numpy().tolist()) & set(flipped.tolist())) >= num_flipped - 1


def test_bad_models_and_arguments_are_refused():
    x, y = classification_data(num_examples=12)
    train = dataset(x, y, batch_size=6)
    softmax_last = keras.Sequential(
        [keras.Input((6,), dtype=FLOAT), keras.layers.Dense(3, dtype=FLOAT), keras.layers.Softmax(dtype=FLOAT)]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(reduction="none")
    with pytest.raises(ValueError, match="must be a Dense layer"):
        RepresenterPointL2(softmax_last, train, loss, LAMBDA)
    with pytest.raises(ValueError, match="must be a Dense layer"):
        RepresenterPointLJE(softmax_last, train, loss)
    model = mlp()
    for value in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="lambda_regularization must be a positive"):
            RepresenterPointL2(model, train, sparse_ce(), value)
    for value in ("logits", 3, -1):
        with pytest.raises(ValueError, match="explained_class"):
            RepresenterPointL2(model, train, sparse_ce(), LAMBDA, explained_class=value)
    with pytest.raises(TypeError, match="solver name"):
        RepresenterPointLJE(model, train, sparse_ce(), ihvp_calculator=object())
    with pytest.raises(ValueError, match="step_size"):
        RepresenterPointLJE(model, train, sparse_ce(), step_size=float("nan"))
    with pytest.raises(ValueError, match="empty"):
        RepresenterPointL2(model, train.take(0), sparse_ce(), LAMBDA)
