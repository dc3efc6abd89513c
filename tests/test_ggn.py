"""Gauss-Newton and Fisher curvatures, the Nyström solver, query batching and mixed-precision gradients.

Curvature products are checked against dense ``Jᵀ M J`` built here from output Jacobians in float64.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import FLOAT, ExactL2, dataset, logistic_problem, pearson, ridge_problem, sparse_ce

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel, NystromIHVP
from influenciae.hessian import (
    CURVATURES,
    EmpiricalFisherOperator,
    FisherOperator,
    GaussNewtonOperator,
    HessianOperator,
    InverseHessianVectorProduct,
    get_ihvp,
    registered_solvers,
)
from influenciae.hessian.ggn import _sample_classes
from influenciae.influence.first_order import compress_factors

NUM_EXAMPLES = 24


def _mlp(outputs: int, *, seed: int = 0, features: int = 4, hidden: int = 4, regularization: float = 0.0):
    keras.utils.set_random_seed(seed)
    regularizer = ExactL2(regularization) if regularization else None
    return keras.Sequential(
        [
            keras.Input((features,), dtype=FLOAT),
            keras.layers.Dense(hidden, activation="tanh", dtype=FLOAT, kernel_regularizer=regularizer),
            keras.layers.Dense(outputs, dtype=FLOAT),
        ]
    )


def _data(kind: str, *, seed: int = 0, features: int = 4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((NUM_EXAMPLES, features))
    if kind == "softmax":
        return x, rng.integers(0, 3, NUM_EXAMPLES)
    if kind == "onehot":
        return x, np.eye(3)[rng.integers(0, 3, NUM_EXAMPLES)]
    if kind == "sigmoid":
        return x, rng.integers(0, 2, (NUM_EXAMPLES, 1)).astype(FLOAT)
    return x, rng.standard_normal((NUM_EXAMPLES, 2))  # squared error


def _output_jacobians(model, x) -> np.ndarray:
    """``J [N, O, P]`` in the watched-weights order, by a dense ``tape.jacobian``."""
    watched = [w.value for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        outputs = model(tf.constant(x))
    blocks = tape.jacobian(outputs, watched)
    return np.concatenate([b.numpy().reshape(len(x), outputs.shape[-1], -1) for b in blocks], axis=2)


def _output_hessians(kind: str, outputs: np.ndarray) -> np.ndarray:
    """Closed-form ``H_out [N, O, O]`` of the Keras losses used here."""
    if kind in ("softmax", "onehot"):
        p = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return np.stack([np.diag(row) - np.outer(row, row) for row in p])
    if kind == "sigmoid":
        s = 1 / (1 + np.exp(-outputs))
        return (s * (1 - s))[:, :, None] * np.eye(1)[None]
    return np.broadcast_to(np.eye(outputs.shape[1]) * 2.0 / outputs.shape[1], (len(outputs),) + (outputs.shape[1],) * 2)


LOSSES = {
    "softmax": (3, lambda: sparse_ce()),
    "onehot": (3, lambda: keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")),
    "sigmoid": (1, lambda: keras.losses.BinaryCrossentropy(from_logits=True, reduction="none")),
    "squared": (2, lambda: keras.losses.MeanSquaredError(reduction="none")),
}


@functools.cache  # one model per kind, shared by the tests: tracing its functions dominates their time
def _problem(kind: str, *, regularization: float = 1e-2, seed: int = 0):
    outputs, loss = LOSSES[kind]
    model = _mlp(outputs, seed=seed, regularization=regularization)
    x, y = _data(kind, seed=seed)
    # one vector chunk for every product here: each new shape would trace the products again
    return InfluenceModel(model, loss_function=loss(), hvp_chunk_size=64), model, x, y


@pytest.fixture(scope="module")
def softmax_problem():
    """An untrained (hence indefinite-Hessian) MLP with softmax cross-entropy and an L2 regularizer, shared."""
    return _problem("softmax", seed=12)


def _regularization_hessian(model, factor: float) -> np.ndarray:
    """``∇²(factor Σ w²)`` of the first kernel, in the flattened order: ``2·factor`` on its entries."""
    sizes = [int(np.prod(w.shape)) for w in model.trainable_weights]
    diagonal = np.zeros(sum(sizes))
    diagonal[: sizes[0]] = 2.0 * factor
    return np.diag(diagonal)


# ---------------------------------------------------------------------- Gauss-Newton


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "squared"])
def test_ggn_vector_products_equal_dense_jt_h_j(kind, softmax_problem):
    influence_model, model, x, y = softmax_problem if kind == "softmax" else _problem(kind)
    weights = np.random.default_rng(1).uniform(0.2, 2.0, NUM_EXAMPLES)
    jacobians = _output_jacobians(model, x)
    hessians = _output_hessians(kind, model(tf.constant(x)).numpy())
    expected = np.einsum("i,iop,ioq,iqr->pr", weights, jacobians, hessians, jacobians) / NUM_EXAMPLES
    expected += _regularization_hessian(model, 1e-2)
    ds = dataset(x, y, batch_size=7, sample_weight=weights)  # a partial last batch
    for output_hessian in ("auto", "autodiff"):  # closed form, and the loss differentiated twice
        operator = GaussNewtonOperator(influence_model, ds, output_hessian=output_hessian)
        np.testing.assert_allclose(operator.to_dense().numpy(), expected, rtol=1e-10, atol=1e-12)
    assert (
        influence_model.loss_family
        == {
            "softmax": "softmax_cross_entropy",
            "sigmoid": "sigmoid_cross_entropy",
            "squared": "squared_error",
        }[kind]
    )
    assert np.linalg.eigvalsh(operator.to_dense().numpy()).min() > -1e-12  # positive semi-definite


def test_ggn_equals_the_hessian_for_a_linear_model_with_cross_entropy():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,), dtype=FLOAT), keras.layers.Dense(3, dtype=FLOAT)])
    x, y = _data("softmax", seed=3)
    influence_model = InfluenceModel(model, loss_function=sparse_ce())
    ds = dataset(x, y, batch_size=10)
    ggn = GaussNewtonOperator(influence_model, ds).to_dense().numpy()
    np.testing.assert_allclose(ggn, HessianOperator(influence_model, ds).to_dense().numpy(), atol=1e-12)


def test_ggn_is_psd_where_the_hessian_of_a_network_is_not(softmax_problem):
    influence_model, _, x, y = softmax_problem
    ds = dataset(x, y, batch_size=12)
    hessian = HessianOperator(influence_model, ds).to_dense().numpy()
    ggn = GaussNewtonOperator(influence_model, ds).to_dense().numpy()
    assert np.linalg.eigvalsh(hessian).min() < -1e-6  # a random network is not at a minimum
    assert np.linalg.eigvalsh(ggn).min() > -1e-12


# ---------------------------------------------------------------------- Fisher


def _per_class_gradients(influence_model, x, y_template, classes: int) -> np.ndarray:
    """``g_c [C, N, P]``: per-sample gradients with every example's label set to ``c``."""
    gradients = []
    for label in range(classes):
        if y_template.ndim == 2 and y_template.shape[1] == classes:
            labels = np.tile(np.eye(classes)[label], (len(x), 1))
        else:
            labels = np.full(y_template.shape, label, dtype=y_template.dtype)
        gradients.append(influence_model.batch_jacobian_tensor((x, labels)).numpy())
    return np.stack(gradients)


@pytest.mark.parametrize("kind", ["softmax", "onehot", "sigmoid"])
def test_exact_fisher_is_the_expectation_over_classes(kind, softmax_problem):
    influence_model, model, x, y = softmax_problem if kind == "softmax" else _problem(kind)
    weights = np.random.default_rng(5).uniform(0.5, 2.0, NUM_EXAMPLES)
    operator = FisherOperator(influence_model, dataset(x, y, batch_size=12, sample_weight=weights))
    classes = 2 if kind == "sigmoid" else 3
    gradients = _per_class_gradients(influence_model, x, y, classes)  # [C, N, P]
    losses = np.stack([influence_model.batch_loss((x, g_labels)).numpy() for g_labels in _labels(y, classes)])
    probabilities = np.exp(-losses)  # [C, N]
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-12)
    expected = np.einsum("n,cn,cnp,cnq->pq", weights, probabilities, gradients, gradients) / NUM_EXAMPLES
    expected += _regularization_hessian(model, 1e-2)
    np.testing.assert_allclose(operator.to_dense().numpy(), expected, atol=1e-12)
    ggn = GaussNewtonOperator(influence_model, dataset(x, y, batch_size=12, sample_weight=weights))
    np.testing.assert_allclose(ggn.to_dense().numpy(), expected, atol=1e-12)  # logits: Fisher = GGN


def _labels(y, classes):
    for label in range(classes):
        if y.ndim == 2 and y.shape[1] == classes:
            yield np.tile(np.eye(classes)[label], (len(y), 1))
        else:
            yield np.full(y.shape, label, dtype=y.dtype)


def test_sampled_fisher_is_the_empirical_fisher_of_labels_drawn_from_the_model(softmax_problem):
    influence_model, model, x, y = softmax_problem
    operator = FisherOperator(influence_model, dataset(x, y, batch_size=5), estimator="sampled", seed=11)
    logits = model(tf.constant(x))
    log_probabilities = tf.transpose(tf.nn.log_softmax(logits))  # [C, N]
    drawn = _sample_classes(log_probabilities, tf.range(NUM_EXAMPLES, dtype=tf.int64), 1, 11).numpy()[0]
    empirical = EmpiricalFisherOperator(influence_model, dataset(x, drawn, batch_size=12))
    np.testing.assert_allclose(operator.to_dense().numpy(), empirical.to_dense().numpy(), atol=1e-12)
    # seeded per example: the same for any batching, different for another seed
    rebatched = FisherOperator(influence_model, dataset(x, y, batch_size=24), estimator="sampled", seed=11)
    np.testing.assert_allclose(rebatched.to_dense().numpy(), operator.to_dense().numpy(), atol=1e-12)
    other = FisherOperator(influence_model, dataset(x, y, batch_size=5), estimator="sampled", seed=12)
    assert np.abs(other.to_dense().numpy() - operator.to_dense().numpy()).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["softmax", "squared"])
def test_sampled_fisher_converges_to_the_exact_fisher(kind):
    influence_model, _, x, y = _problem("softmax", seed=12) if kind == "softmax" else _problem(kind)
    ds = dataset(x, y, batch_size=NUM_EXAMPLES)
    exact = FisherOperator(influence_model, ds).to_dense().numpy()
    errors = []
    for samples in (1, 256):
        sampled = FisherOperator(influence_model, ds, estimator="sampled", num_samples=samples, seed=1)
        errors.append(np.linalg.norm(sampled.to_dense().numpy() - exact) / np.linalg.norm(exact))
    assert errors[1] < 0.15 and errors[1] < errors[0] / 4  # Monte Carlo error ~ 1/√K


def test_gaussian_fisher_of_a_regression_is_the_ggn():
    influence_model, _, x, y = _problem("squared")
    ds = dataset(x, y, batch_size=9)
    fisher = FisherOperator(influence_model, ds)
    np.testing.assert_allclose(
        fisher.to_dense().numpy(), GaussNewtonOperator(influence_model, ds).to_dense().numpy(), atol=1e-12
    )
    assert fisher.configuration() == {"curvature": "fisher", "estimator": "exact", "likelihood": "auto"}


def test_empirical_fisher_is_the_mean_outer_product_of_weighted_gradients(softmax_problem):
    influence_model, model, x, y = softmax_problem
    weights = np.random.default_rng(9).uniform(0.2, 2.0, NUM_EXAMPLES)
    operator = EmpiricalFisherOperator(influence_model, dataset(x, y, batch_size=7, sample_weight=weights))
    gradients = influence_model.batch_jacobian_tensor((x, y)).numpy()  # unweighted ∇ℓ
    expected = np.einsum("n,np,nq->pq", weights, gradients, gradients) / NUM_EXAMPLES
    expected += _regularization_hessian(model, 1e-2)
    np.testing.assert_allclose(operator.to_dense().numpy(), expected, atol=1e-12)


def test_fisher_refuses_a_loss_that_is_not_a_log_likelihood(softmax_problem):
    _, model, x, y = softmax_problem
    doubled = InfluenceModel(model, loss_function=lambda t, p: 2.0 * sparse_ce()(t, p))
    operator = FisherOperator(doubled, dataset(x, y))
    with pytest.raises(ValueError, match="not a negative log-likelihood"):
        operator.matmul_rows(np.ones((1, doubled.nb_params)))
    with pytest.raises(ValueError, match="estimator"):
        FisherOperator(doubled, dataset(x, y), estimator="mc")
    with pytest.raises(ValueError, match="Unknown curvature"):
        get_ihvp("cg", doubled, dataset(x, y), curvature="newton")


# ---------------------------------------------------------------------- every solver with every curvature

SOLVER_OPTIONS = {
    "exact": ({}, 1e-9),
    "cg": ({"tolerance": 1e-10}, 1e-7),
    "lissa": ({"tolerance": 1e-8}, 1e-5),
    "arnoldi": ({"subspace_dim": None, "k_largest_eig_vals": None}, 1e-8),  # k = P
    "nystrom": ({"rank": 10_000}, 1e-8),  # clipped to P
    "pinv": ({}, 1e-9),
    # approximations of the curvature: their error here is 0.10 (K-FAC), 0.10 (EK-FAC), 0.19 (diagonal) and 0.65
    # (the identity, which ignores the curvature), for each curvature
    "kfac": ({}, 0.15),
    "ekfac": ({}, 0.15),
    "diagonal": ({}, 0.25),
    "identity": ({}, 0.7),
}
DAMPING = 0.5  # keeps LiSSA's series short


@pytest.fixture(scope="module")
def curvature_problem(softmax_problem):
    influence_model, _, x, y = softmax_problem
    ds = dataset(x, y, batch_size=NUM_EXAMPLES)  # one batch: iterative solvers make one call per product
    dense = {
        name: get_ihvp("exact", influence_model, ds, curvature=name).hessian.to_dense().numpy()
        for name in ("ggn", "fisher", "empirical_fisher")
    }
    return influence_model, ds, dense


def test_every_registered_solver_is_covered():
    assert set(registered_solvers()) <= set(SOLVER_OPTIONS)
    assert CURVATURES == ("hessian", "ggn", "fisher", "empirical_fisher")


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["ggn", "fisher", "empirical_fisher"])
@pytest.mark.parametrize("name", sorted(SOLVER_OPTIONS))
def test_every_solver_runs_with_every_curvature(curvature_problem, name, curvature):
    influence_model, ds, dense = curvature_problem
    options, tolerance = SOLVER_OPTIONS[name]
    solver = get_ihvp(name, influence_model, ds, damping=DAMPING, curvature=curvature, **options)
    vectors = np.random.default_rng(13).standard_normal((3, influence_model.nb_params))
    matrix = dense[curvature] + DAMPING * np.eye(influence_model.nb_params)
    expected = np.linalg.solve(matrix, vectors.T).T
    error = np.linalg.norm(solver.solve(vectors).numpy() - expected) / np.linalg.norm(expected)
    assert error <= tolerance
    configuration = solver.configuration()
    assert configuration["curvature"] == curvature and configuration["name"] == name


@pytest.mark.parametrize("name", ["exact", "cg", "lissa", "arnoldi"])
def test_solver_constructors_take_the_curvature_directly(curvature_problem, name):
    influence_model, ds, dense = curvature_problem
    options, tolerance = SOLVER_OPTIONS[name]
    solver_class = InverseHessianVectorProduct._registry[name]
    solver = solver_class(influence_model, ds, damping=DAMPING, curvature="ggn", **options)
    vectors = np.random.default_rng(5).standard_normal((2, influence_model.nb_params))
    expected = np.linalg.solve(dense["ggn"] + DAMPING * np.eye(influence_model.nb_params), vectors.T).T
    error = np.linalg.norm(solver.solve(vectors).numpy() - expected) / np.linalg.norm(expected)
    assert error <= tolerance
    assert solver.configuration()["curvature"] == "ggn"


def test_curvature_is_part_of_the_configuration_and_of_the_calculators(curvature_problem):
    influence_model, ds, dense = curvature_problem
    hessian_solver = get_ihvp("exact", influence_model, ds, damping=DAMPING)
    assert hessian_solver.configuration()["curvature"] == "hessian"
    sampled = get_ihvp(
        "exact",
        influence_model,
        ds,
        damping=DAMPING,
        curvature="fisher",
        curvature_options={"estimator": "sampled", "num_samples": 2},
    )
    assert sampled.configuration()["curvature_options"] == {
        "estimator": "sampled",
        "likelihood": "auto",
        "num_samples": 2,
        "seed": 0,
    }
    calculator = FirstOrderInfluenceCalculator(influence_model, ds, "exact", damping=DAMPING, curvature="ggn")
    assert calculator.configuration()["ihvp"]["curvature"] == "ggn"
    x, y = next(iter(ds))
    gradients = influence_model.batch_jacobian_tensor((x, y)).numpy()
    expected = gradients @ np.linalg.solve(dense["ggn"] + DAMPING * np.eye(len(dense["ggn"])), gradients.T)
    scores = calculator.influence_matrix(dataset(x.numpy(), y.numpy()), dataset(x.numpy(), y.numpy()))
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="operator"):
        get_ihvp("cg", influence_model, ds, curvature="ggn", operator=np.eye(influence_model.nb_params))
    with pytest.raises(ValueError, match="curvature"):
        FirstOrderInfluenceCalculator(influence_model, ds, hessian_solver, curvature="ggn")


# ---------------------------------------------------------------------- Nyström


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_nystrom_is_exact_at_full_rank_on_ridge_regression(damping):
    influence_model, x, y, hessian = ridge_problem(num_features=6)
    solver = NystromIHVP(influence_model, dataset(x, y, batch_size=7), rank=6, damping=damping, seed=3)
    vectors = np.random.default_rng(14).standard_normal((4, 6))
    matrix = hessian + damping * np.eye(6)
    np.testing.assert_allclose(solver.solve(vectors).numpy(), np.linalg.solve(matrix, vectors.T).T, atol=1e-10)
    np.testing.assert_allclose(solver.eigenvalues.numpy(), np.linalg.eigvalsh(hessian)[::-1], atol=1e-10)
    assert solver.configuration()["rank"] == 6 and "nystrom" in registered_solvers()


def test_nystrom_error_decreases_with_rank_on_an_mlp(curvature_problem):
    influence_model, ds, dense = curvature_problem
    damping = 1e-2
    ggn = dense["ggn"]
    vectors = np.random.default_rng(15).standard_normal((4, influence_model.nb_params))
    expected = np.linalg.solve(ggn + damping * np.eye(len(ggn)), vectors.T).T
    errors = []
    for rank in (2, 8, 16, influence_model.nb_params):
        solver = NystromIHVP(influence_model, ds, rank=rank, damping=damping, curvature="ggn")
        errors.append(np.linalg.norm(solver.solve(vectors).numpy() - expected) / np.linalg.norm(expected))
    assert errors[-1] < 1e-8
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors


def test_nystrom_refuses_an_indefinite_hessian(softmax_problem):
    influence_model, _, x, y = softmax_problem  # indefinite: see the GGN test above
    solver = NystromIHVP(influence_model, dataset(x, y, batch_size=12), rank=influence_model.nb_params)
    with pytest.raises(ValueError, match="curvature='ggn'"):
        solver.solve(np.ones(influence_model.nb_params))
    with pytest.raises(ValueError, match="rank"):
        NystromIHVP(influence_model, dataset(x, y), rank=0)


# ---------------------------------------------------------------------- query batching


@pytest.fixture(scope="module")
def logistic_calculator():
    influence_model, x, y, _, _ = logistic_problem()
    train = dataset(x, y, batch_size=16)
    rng = np.random.default_rng(16)
    test_x, test_y = rng.standard_normal((12, x.shape[1])), rng.integers(0, 2, 12).astype(FLOAT)
    return influence_model, train, dataset(test_x, test_y, batch_size=5)


def test_query_batching_equals_the_uncompressed_scores_at_full_rank(logistic_calculator):
    influence_model, train, test = logistic_calculator
    reference = FirstOrderInfluenceCalculator(influence_model, train).influence_matrix(test, train)
    full = FirstOrderInfluenceCalculator(influence_model, train, query_rank=influence_model.nb_params)
    np.testing.assert_allclose(full.influence_matrix(test, train), reference, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="RelatIF"):
        FirstOrderInfluenceCalculator(influence_model, train, normalize=True, query_rank=2)
    with pytest.raises(ValueError, match="nothing to cache"):
        full.influence_matrix(test, train, save_influence_vector_ds_path="unused")


def test_query_batching_error_decreases_with_rank_and_is_bounded(logistic_calculator):
    influence_model, train, test = logistic_calculator
    calculator = FirstOrderInfluenceCalculator(influence_model, train)
    reference = calculator.influence_matrix(test, train)
    factors = calculator.compute_influence_factors(test)  # [12, 5]
    gradient_norms = np.concatenate([np.linalg.norm(influence_model.batch_jacobian_tensor(b), axis=1) for b in train])
    errors = []
    for rank in (1, 2, 3, 4, 5):
        compressed = compress_factors(factors, rank)
        approximation = compressed.coefficients @ compressed.directions
        actual = np.linalg.norm(approximation - factors) / np.linalg.norm(factors)
        np.testing.assert_allclose(compressed.relative_error, actual, atol=1e-12)
        scores = calculator.influence_from_factors(compressed, train)
        bound = compressed.relative_error * np.linalg.norm(factors) * gradient_norms  # Cauchy-Schwarz, per column
        assert np.all(np.abs(scores - reference) <= bound[None] + 1e-12)
        errors.append(np.linalg.norm(scores - reference) / np.linalg.norm(reference))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-10 and errors[0] > 1e-3


# ---------------------------------------------------------------------- mixed precision


@pytest.fixture(scope="module")
def digits_scores():
    """A digits MLP, its last layer's exact solver and the float32 reference scores, shared by both dtypes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=sparse_ce())
    model.fit(x[:600], y[:600], epochs=15, batch_size=64, verbose=0)
    train, test = dataset(x[:300], y[:300], batch_size=100), dataset(x[1000:1040], y[1000:1040], batch_size=40)
    reference = InfluenceModel(model, start_layer=1, loss_function=sparse_ce())  # the last layer: P = 330
    solver = get_ihvp("exact", reference, train, damping=1e-3)  # shared: only the gradients differ
    scores = FirstOrderInfluenceCalculator(reference, train, solver).influence_matrix(test, train)
    return model, reference, solver, train, test, scores


@pytest.mark.slow
@pytest.mark.parametrize("gradient_dtype", ["bfloat16", "float16"])
def test_low_precision_gradients_keep_the_scores(digits_scores, gradient_dtype):
    model, reference, solver, train, test, expected = digits_scores
    influence_model = InfluenceModel(model, start_layer=1, loss_function=sparse_ce(), gradient_dtype=gradient_dtype)
    scores = FirstOrderInfluenceCalculator(influence_model, train, solver).influence_matrix(test, train)
    batch = next(iter(test))
    gradients = influence_model.batch_jacobian_tensor(batch)
    assert gradients.dtype == tf.float32  # handed back in the accumulation dtype
    rounded = tf.cast(tf.cast(reference.batch_jacobian_tensor(batch), gradient_dtype), tf.float32)
    np.testing.assert_array_equal(gradients.numpy(), rounded.numpy())  # rounded where computed, nothing else
    assert np.abs(scores - expected).max() > 0  # the option does something
    assert pearson(scores, expected) > 0.99
    with pytest.raises(ValueError, match="gradient_dtype"):
        InfluenceModel(model, loss_function=sparse_ce(), gradient_dtype="float64")
