"""TRAK: exact equivalences with influence functions in float64, seeded block projections, ensembles, engine checks."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
from engine_checks import check_calculator_invariants
from helpers import FLOAT, ExactL2, classification_data, dataset, logistic_loss, ridge_problem, small_mlp

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.influence.trak import MarginOutput, TrakCalculator, TrakOptions

NUM_TRAIN, NUM_FEATURES, REGULARIZATION = 40, 4, 0.05


def logistic_regression(seed: int = 0, scale: float = 0.5):
    """Logistic regression without bias, ``(λ/2)‖w‖²``: its Hessian is ``(1/N) Σ p(1-p) x xᵀ + λI`` exactly."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,), dtype=FLOAT),
            keras.layers.Dense(1, use_bias=False, dtype=FLOAT, kernel_regularizer=ExactL2(REGULARIZATION / 2)),
        ]
    )
    model.layers[0].kernel.assign(scale * rng.standard_normal((NUM_FEATURES, 1)))
    return model


@pytest.fixture(scope="module")
def logistic_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM_TRAIN + 10, NUM_FEATURES))
    y = (x @ rng.standard_normal(NUM_FEATURES) + 0.5 * rng.standard_normal(len(x)) > 0).astype(FLOAT)
    train = dataset(x[:NUM_TRAIN], y[:NUM_TRAIN], batch_size=7)
    test = dataset(x[NUM_TRAIN:], y[NUM_TRAIN:], batch_size=4)
    return x, y, train, test


def margins(model, x, y):
    """``(∇f [n, P], p [n])``: gradients of the margin ``(2y-1) wᵀx`` and the probabilities of the labels."""
    sign = 2 * y - 1
    probabilities = 1 / (1 + np.exp(-sign * (x @ model.layers[0].kernel.numpy()[:, 0])))
    return sign[:, None] * x, probabilities


def test_gauss_newton_trak_equals_the_exact_influence_function(logistic_data):
    """Kernel Σ p(1-p)∇f∇fᵀ + Nλ I = N·H, so TRAK = ∇ℓ(x)ᵀH⁻¹∇ℓ(z) / (N (1 - p_x)) exactly."""
    x, y, train, test = logistic_data
    model = logistic_regression()
    trak = TrakCalculator(model, train, None, kernel="gauss_newton", damping=NUM_TRAIN * REGULARIZATION)
    influence = FirstOrderInfluenceCalculator(InfluenceModel(model, loss_function=logistic_loss), train)
    _, probabilities = margins(model, x, y)
    expected = influence.influence_matrix(test, train) / (NUM_TRAIN * (1 - probabilities[NUM_TRAIN:, None]))
    np.testing.assert_allclose(trak.influence_matrix(test, train), expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        trak.self_influence(train),
        influence.self_influence(train) / (NUM_TRAIN * (1 - probabilities[:NUM_TRAIN])),
        rtol=1e-10,
    )


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_trak_with_a_square_projection_equals_its_closed_form(logistic_data, projection):
    """With k = P and no damping, P(PᵀGP)⁻¹Pᵀ = G⁻¹: TRAK = ∇f(x)ᵀ(Σ∇f_i∇f_iᵀ)⁻¹∇f(z)(1 - p_z), for any seed."""
    x, y, train, test = logistic_data
    model = logistic_regression()
    gradients, probabilities = margins(model, x, y)
    kernel = gradients[:NUM_TRAIN].T @ gradients[:NUM_TRAIN]
    expected = (
        gradients[NUM_TRAIN:] @ np.linalg.solve(kernel, gradients[:NUM_TRAIN].T) * (1 - probabilities[:NUM_TRAIN])
    )
    for seed in (0, 1):
        trak = TrakCalculator(model, train, NUM_FEATURES, seed=seed, projection=projection)
        np.testing.assert_allclose(trak.influence_matrix(test, train), expected, rtol=1e-8, atol=1e-12)
    # = -∇f(x)ᵀ G⁻¹ ∇ℓ(z): the logistic gradient is ∇ℓ = -(1 - p) ∇f
    loss_gradients = -(1 - probabilities[:NUM_TRAIN, None]) * gradients[:NUM_TRAIN]
    np.testing.assert_allclose(expected, -gradients[NUM_TRAIN:] @ np.linalg.solve(kernel, loss_gradients.T))


def test_regression_output_weights_the_kernel_by_residuals():
    influence_model, x, y, _ = ridge_problem(num_examples=30)
    train, test = dataset(x[:24], y[:24, None], batch_size=5), dataset(x[24:], y[24:, None], batch_size=3)
    damping = 0.5
    trak = TrakCalculator(influence_model, train, None, output_function="output", damping=damping)
    weights = influence_model.model.layers[0].kernel.numpy()[:, 0]
    residuals = y[:24] - x[:24] @ weights  # Q = -∂(½(f - y)²)/∂f
    inverse = np.linalg.inv(x[:24].T @ x[:24] + damping * np.eye(x.shape[1]))
    expected = x[24:] @ inverse @ x[:24].T * residuals
    np.testing.assert_allclose(trak.influence_matrix(test, train), expected, rtol=1e-10, atol=1e-14)


def test_checkpoint_ensembles_average_kernel_terms_and_out_to_loss(logistic_data):
    x, y, train, test = logistic_data
    first, second = logistic_regression(seed=1), logistic_regression(seed=2, scale=1.0)
    gradients, p_first = margins(first, x, y)  # a linear margin has the same gradients for every checkpoint
    _, p_second = margins(second, x, y)
    kernel = gradients[:NUM_TRAIN].T @ gradients[:NUM_TRAIN]
    leverage = gradients[NUM_TRAIN:] @ np.linalg.solve(kernel, gradients[:NUM_TRAIN].T)
    out_to_loss = ((1 - p_first) + (1 - p_second))[:NUM_TRAIN] / 2
    ensemble = TrakCalculator([first, second], train, None)
    assert ensemble.num_checkpoints == 2
    np.testing.assert_allclose(ensemble.influence_matrix(test, train), leverage * out_to_loss, rtol=1e-10)
    single = TrakCalculator(first, train, None).influence_matrix(test, train)
    np.testing.assert_allclose(TrakCalculator([first, first], train, None).influence_matrix(test, train), single)


@pytest.fixture(scope="module")
def mlp_data():
    x, y = classification_data(num_examples=30)
    model = small_mlp(seed=5)  # 83 parameters
    return model, dataset(x[:24], y[:24], batch_size=8), dataset(x[24:], y[24:], batch_size=3)


def test_seeded_block_projection_is_reproducible_and_never_stored(mlp_data):
    model, train, test = mlp_data
    influence_model = InfluenceModel(model, loss_function=lambda y, p: MarginOutput().output(p, y))
    batch = next(iter(train))
    gradients = influence_model.batch_jacobian_tensor(batch).numpy()
    trak = TrakCalculator(model, train, 12, seed=7, projection_block_size=32)  # 83 rows: blocks of 32, 32, 19
    matrix = trak.projection_matrix()
    assert matrix.shape == (83, 12)
    assert abs(matrix.var() * 12 - 1) < 0.3  # entries N(0, 1/k)
    np.testing.assert_allclose(trak.project(gradients).numpy(), gradients @ matrix, rtol=1e-10, atol=1e-12)
    scores = trak.influence_matrix(test, train)
    again = TrakCalculator(model, train, 12, seed=7, projection_block_size=32).influence_matrix(test, train)
    np.testing.assert_array_equal(scores, again)
    other = TrakCalculator(model, train, 12, seed=8, projection_block_size=32)
    assert not np.allclose(other.projection_matrix(), matrix)
    assert np.abs(other.influence_matrix(test, train) - scores).max() > 1e-3 * np.abs(scores).max()
    rademacher = TrakCalculator(model, train, 12, seed=7, projection="rademacher", projection_block_size=32)
    assert set(np.unique(np.round(rademacher.projection_matrix() * np.sqrt(12), 12))) == {-1.0, 1.0}


def test_trak_passes_the_shared_engine_checks(mlp_data):
    model, train, test = mlp_data
    trak = TrakCalculator(model, train, 12, seed=0)
    check_calculator_invariants(trak, train, test, rtol=1e-8, extended=False)
    assert trak.configuration()["projection_dim"] == 12


def test_options_dataclass_equals_the_keyword_arguments(mlp_data):
    model, train, test = mlp_data
    options = TrakOptions(12, seed=7, projection="rademacher", projection_block_size=32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 8  # type: ignore[misc]
    by_options = TrakCalculator(model, train, options=options).influence_matrix(test, train)
    by_keywords = TrakCalculator(model, train, 12, seed=7, projection="rademacher", projection_block_size=32)
    np.testing.assert_array_equal(by_options, by_keywords.influence_matrix(test, train))
    with pytest.raises(ValueError, match="not both"):
        TrakCalculator(model, train, 12, options=options)
    with pytest.raises(ValueError, match="kernel must be"):
        TrakOptions(8, kernel="fisher")
    with pytest.raises(TypeError, match="projection_dim"):
        TrakCalculator(model, train)


def test_bad_arguments_are_refused(mlp_data):
    model, train, test = mlp_data
    for value in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="projection_dim"):
            TrakCalculator(model, train, value)
    with pytest.raises(ValueError, match="damping"):
        TrakCalculator(model, train, 8, damping=-1.0)
    with pytest.raises(ValueError, match="projection must be"):
        TrakCalculator(model, train, 8, projection="sparse")
    with pytest.raises(ValueError, match="kernel must be"):
        TrakCalculator(model, train, 8, kernel="fisher")
    with pytest.raises(ValueError, match="output_function"):
        TrakCalculator(model, train, 8, output_function="loss")
    with pytest.raises(ValueError, match="seed"):
        TrakCalculator(model, train, 8, seed=-1)
    with pytest.raises(ValueError, match="empty list"):
        TrakCalculator([], train, 8)
    singular = TrakCalculator(model, train, 40, damping=0.0)  # k = 40 > 24 training examples: ΦᵀΦ has rank 24
    with pytest.raises(ValueError, match="singular"):
        singular.influence_matrix(test, train)
    damped = TrakCalculator(model, train, 40, damping=1e-3)
    assert np.all(np.isfinite(damped.influence_matrix(test, train)))


def test_default_damping_is_none_on_a_regular_kernel_and_small_on_a_singular_one(mlp_data):
    """damping='auto' (default): exactly 0 when ΦᵀΦ is positive definite, else 1e-3 of its mean eigenvalue."""
    model, train, test = mlp_data
    regular, explicit = TrakCalculator(model, train, 8), TrakCalculator(model, train, 8, damping=0.0)
    np.testing.assert_array_equal(regular.influence_matrix(test, train), explicit.influence_matrix(test, train))
    assert regular.damping_used == [0.0]
    singular = TrakCalculator(model, train, 40)  # rank 24 < k = 40
    scores = singular.influence_matrix(test, train)
    assert np.all(np.isfinite(scores))
    (used,) = singular.damping_used
    kernel = singular._kernel_factors()[0].numpy()  # the Cholesky factor of ΦᵀΦ + δI
    gram = kernel @ kernel.T
    np.testing.assert_allclose(used, 1e-3 * (np.trace(gram) - 40 * used) / 40, rtol=1e-9)
    reference = TrakCalculator(model, train, 40, damping=used).influence_matrix(test, train)
    np.testing.assert_allclose(scores, reference, rtol=1e-10)
