"""Hessian operator and every inverse-HVP solver through one shared list of checks (closed forms in float64)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    FLOAT,
    ExactL2,
    classification_data,
    dataset,
    fit,
    logistic_problem,
    pearson,
    ridge_problem,
    small_mlp,
    sparse_ce,
)

from influenciae import ArnoldiIHVP, ConjugateGradientDescentIHVP, ExactIHVP, InfluenceModel, LissaIHVP
from influenciae.hessian import HessianOperator, get_ihvp, largest_eigenvalue, registered_solvers

# name -> (constructor options, relative tolerance against np.linalg.solve)
SOLVERS = {
    "exact": ({}, 1e-8),
    "cg": ({}, 1e-6),
    "lissa": ({}, 5e-2),
    "arnoldi": ({"subspace_dim": None, "k_largest_eig_vals": None}, 1e-8),  # None -> k = P here
}


def _relative_error(actual, expected) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module", params=["ridge", "logistic"])
def problem(request):
    if request.param == "ridge":
        influence_model, x, y, hessian = ridge_problem()
    else:
        influence_model, x, y, hessian, _ = logistic_problem()
    return influence_model, dataset(x, y, batch_size=7), hessian  # 7 does not divide N: partial last batch


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_matches_closed_form(problem, name):
    influence_model, ds, hessian = problem
    options, tolerance = SOLVERS[name]
    solver = get_ihvp(name, influence_model, ds, **options)
    vectors = np.random.default_rng(0).standard_normal((4, influence_model.nb_params))
    expected = np.linalg.solve(hessian, vectors.T).T
    assert _relative_error(solver.solve(vectors).numpy(), expected) <= tolerance
    np.testing.assert_allclose(solver.hvp(vectors).numpy(), vectors @ hessian, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_damping_is_added_to_the_diagonal(problem, name):
    influence_model, ds, hessian = problem
    options, tolerance = SOLVERS[name]
    solver = get_ihvp(name, influence_model, ds, damping=0.3, **options)
    vectors = np.random.default_rng(1).standard_normal((2, influence_model.nb_params))
    damped = hessian + 0.3 * np.eye(len(hessian))
    assert _relative_error(solver.solve(vectors).numpy(), np.linalg.solve(damped, vectors.T).T) <= tolerance
    np.testing.assert_allclose(solver.hvp(vectors).numpy(), vectors @ damped, atol=1e-8)


def test_hessian_operator_is_a_linear_operator(problem):
    influence_model, ds, hessian = problem
    operator = HessianOperator(influence_model, ds)
    np.testing.assert_allclose(operator.to_dense().numpy(), hessian, atol=1e-12)
    vector = np.random.default_rng(2).standard_normal(len(hessian))
    np.testing.assert_allclose(operator.matvec(vector).numpy(), hessian @ vector, atol=1e-12)
    columns = np.random.default_rng(3).standard_normal((len(hessian), 3))
    np.testing.assert_allclose(operator.matmul(columns).numpy(), hessian @ columns, atol=1e-12)
    assert operator.is_self_adjoint and operator.num_examples == sum(1 for _ in ds.unbatch())


def test_hessian_does_not_depend_on_batching_or_pipeline():
    influence_model, x, y, hessian, _ = logistic_problem()
    vectors = np.random.default_rng(4).standard_normal((3, influence_model.nb_params))
    pipelines = [
        dataset(x, y, batch_size=len(x)),
        dataset(x, y, batch_size=1),
        dataset(x, y, batch_size=13),
        dataset(x, y, batch_size=8).map(lambda a, b: (a * 1.0, b)).prefetch(2).cache(),
        tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(9),  # unknown cardinality
    ]
    for pipeline in pipelines:
        product = HessianOperator(influence_model, pipeline).matmul_rows(vectors).numpy()
        np.testing.assert_allclose(product, vectors @ hessian, atol=1e-12)


def test_sample_weights_enter_the_hessian():
    influence_model, x, y, _, _ = logistic_problem()
    weights = np.random.default_rng(5).uniform(0.2, 3.0, len(x))
    kernel = influence_model.model.layers[0].kernel.numpy()[:, 0]
    bias = influence_model.model.layers[0].bias.numpy()[0]
    probabilities = 1 / (1 + np.exp(-(x @ kernel + bias)))
    augmented = np.hstack([x, np.ones((len(x), 1))])
    expected = (augmented * (weights * probabilities * (1 - probabilities))[:, None]).T @ augmented / len(x)
    expected[:-1, :-1] += 0.05 * np.eye(len(kernel))
    operator = HessianOperator(influence_model, dataset(x, y, batch_size=11, sample_weight=weights))
    np.testing.assert_allclose(operator.to_dense().numpy(), expected, atol=1e-12)


def _mlp_problem():
    x, y = classification_data(num_examples=64)
    model = small_mlp(seed=2)
    fit(model, x, y, steps=500)
    return InfluenceModel(model, loss_function=sparse_ce()), dataset(x, y, batch_size=64)


def _cnn_problem():
    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, 6, 6, 1))
    y = (x[:, :3].sum(axis=(1, 2, 3)) > 0).astype("int64")
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1), dtype=FLOAT),
            keras.layers.Conv2D(2, 3, activation="tanh", dtype=FLOAT, kernel_regularizer=ExactL2(5e-3)),
            keras.layers.Flatten(dtype=FLOAT),
            keras.layers.Dense(2, dtype=FLOAT, kernel_regularizer=ExactL2(5e-3)),
        ]
    )
    fit(model, x, y, steps=500)
    return InfluenceModel(model, loss_function=sparse_ce()), dataset(x, y, batch_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("build", [_mlp_problem, _cnn_problem], ids=["mlp", "cnn"])
def test_solvers_agree_with_exact_on_networks(build):
    influence_model, ds = build()
    damping = 1e-2  # a trained network's Hessian can be slightly indefinite; damping makes every solver apply
    gradients = np.concatenate([influence_model.batch_jacobian_tensor(batch).numpy() for batch in ds])[:6]
    exact = ExactIHVP(influence_model, ds, damping=damping).solve(gradients).numpy()
    cg = ConjugateGradientDescentIHVP(influence_model, ds, damping=damping).solve(gradients).numpy()
    arnoldi = ArnoldiIHVP(influence_model, ds, subspace_dim=influence_model.nb_params, damping=damping)
    assert pearson(cg, exact) >= 0.99
    assert pearson(arnoldi.solve(gradients).numpy(), exact) >= 0.99
    lissa = LissaIHVP(influence_model, ds, damping=damping).solve(gradients).numpy()  # default settings
    assert pearson(lissa, exact) >= 0.95


def test_arnoldi_keeps_largest_magnitude_eigenpairs():
    rng = np.random.default_rng(6)
    basis, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    values = np.array([-9.0, 7.0, 5.0, -3.0, 2.0, 1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1])
    matrix = basis @ np.diag(values) @ basis.T
    solver = ArnoldiIHVP(None, None, subspace_dim=12, k_largest_eig_vals=4, operator=matrix)
    np.testing.assert_allclose(solver.eigenvalues.numpy(), [-9.0, 7.0, 5.0, -3.0], atol=1e-10)
    # eigenvectors match up to sign
    overlaps = np.abs(solver.eigenvectors.numpy() @ basis[:, :4])
    np.testing.assert_allclose(np.diag(overlaps), np.ones(4), atol=1e-8)
    # the solve inverts on the kept subspace only
    vector = basis[:, 1] + basis[:, 10]
    np.testing.assert_allclose(solver.solve(vector).numpy()[0], basis[:, 1] / 7.0, atol=1e-10)


def test_arnoldi_survives_an_invariant_krylov_subspace():
    matrix = np.diag([3.0, 3.0, 3.0, 1.0, 1.0, 2.0])  # three distinct eigenvalues: Krylov space of dimension 3
    solver = ArnoldiIHVP(None, None, subspace_dim=6, k_largest_eig_vals=6, operator=matrix)
    vectors = np.random.default_rng(7).standard_normal((2, 6))
    np.testing.assert_allclose(solver.solve(vectors).numpy(), vectors / np.diag(matrix), atol=1e-10)


def test_cg_reports_convergence_and_accepts_a_preconditioner():
    influence_model, x, y, hessian = ridge_problem(num_features=8)
    ds = dataset(x, y)
    vectors = np.random.default_rng(8).standard_normal((3, 8))
    plain = ConjugateGradientDescentIHVP(influence_model, ds, tolerance=1e-10)
    plain.solve(vectors)
    assert plain.info.converged.all() and plain.info.iterations <= 8
    assert np.all(plain.info.residual_norms <= 1e-10)
    exact_inverse = np.linalg.inv(hessian)
    preconditioned = ConjugateGradientDescentIHVP(influence_model, ds, preconditioner=exact_inverse)
    solution = preconditioned.solve(vectors).numpy()
    assert preconditioned.info.iterations == 1  # a perfect preconditioner converges in one step
    np.testing.assert_allclose(solution, vectors @ exact_inverse, atol=1e-10)
    capped = ConjugateGradientDescentIHVP(influence_model, ds, max_iterations=2, tolerance=1e-14)
    with pytest.warns(RuntimeWarning, match="max_iterations"):
        capped.solve(vectors)
    assert not capped.info.converged.any()


def test_stochastic_lissa_is_close_on_average():
    influence_model, x, y, hessian = ridge_problem(num_examples=80, regularization=0.5)
    solver = LissaIHVP(influence_model, dataset(x, y, batch_size=40), batches_per_step=1, depth=200, num_repeats=3)
    vector = np.random.default_rng(9).standard_normal((1, 5))
    assert _relative_error(solver.solve(vector).numpy(), np.linalg.solve(hessian, vector.T).T) <= 0.15


def test_power_iteration_finds_the_largest_eigenvalue():
    _, _, _, hessian = ridge_problem()
    assert (
        abs(largest_eigenvalue(HessianOperator(*_ridge_operator_args()), 100) - np.linalg.eigvalsh(hessian)[-1]) < 1e-6
    )


def _ridge_operator_args():
    influence_model, x, y, _ = ridge_problem()
    return influence_model, dataset(x, y)


# ---------------------------------------------------------------------- failures that explain themselves

INDEFINITE = np.diag([2.0, 1.0, -0.5])
SINGULAR = np.diag([2.0, 1.0, 0.0])


def test_exact_refuses_singular_and_indefinite_hessians():
    with pytest.raises(ValueError, match="not positive definite.*damping >= "):
        ExactIHVP(None, operator=INDEFINITE, damping=0.0).solve(np.ones(3))
    with pytest.raises(ValueError, match="singular"):  # damping=0.0: the default "auto" would damp it (issue 14)
        ExactIHVP(None, operator=SINGULAR, method="eigh", damping=0.0).solve(np.ones(3))
    with pytest.raises(ValueError, match="not positive definite"):
        ExactIHVP(None, operator=INDEFINITE, method="eigh", damping=0.0).solve(np.ones(3))
    solution = ExactIHVP(None, operator=INDEFINITE, method="eigh", allow_indefinite=True).solve(np.ones(3))
    np.testing.assert_allclose(solution.numpy()[0], [0.5, 1.0, -2.0])
    np.testing.assert_allclose(
        ExactIHVP(None, operator=SINGULAR, damping=1.0).solve(np.ones(3)).numpy()[0], [1 / 3, 0.5, 1.0]
    )
    np.testing.assert_allclose(  # NumPy scalars (e.g. a damping computed from eigenvalues) are numbers too
        ExactIHVP(None, operator=SINGULAR, damping=np.float32(1.0)).solve(np.ones(3)).numpy()[0], [1 / 3, 0.5, 1.0]
    )


def test_iterative_solvers_refuse_indefinite_hessians():
    with pytest.raises(ValueError, match="non-positive curvature"):
        ConjugateGradientDescentIHVP(None, operator=INDEFINITE).solve(np.ones(3))
    with pytest.raises(ValueError, match="diverged"):
        LissaIHVP(None, operator=INDEFINITE).solve(np.ones(3))
    with pytest.raises(ValueError, match="diverged"):
        LissaIHVP(None, operator=np.diag([2.0, 1.0]), scale=0.5).solve(np.ones(2))
    with pytest.raises(ValueError, match="singular"):
        ArnoldiIHVP(None, operator=SINGULAR, subspace_dim=3).solve(np.ones(3))


def test_bad_arguments_are_refused():
    influence_model, x, y, _ = ridge_problem()
    ds = dataset(x, y)
    with pytest.raises(ValueError, match="Unknown inverse-HVP solver"):
        get_ihvp("newton", influence_model, ds)
    with pytest.raises(TypeError, match="solver name"):
        get_ihvp(3, influence_model, ds)
    with pytest.raises(ValueError, match="damping"):
        ExactIHVP(influence_model, ds, damping=-1.0)
    with pytest.raises(ValueError, match=r"shape \[n, 5\]"):
        ExactIHVP(influence_model, ds).solve(np.ones((2, 4)))
    with pytest.raises(ValueError, match="max_params"):
        ExactIHVP(influence_model, ds, max_params=3)
    with pytest.raises(ValueError, match="subspace_dim"):
        ArnoldiIHVP(influence_model, ds, subspace_dim=6)
    with pytest.raises(ValueError, match="k_largest_eig_vals"):
        ArnoldiIHVP(influence_model, ds, subspace_dim=3, k_largest_eig_vals=4)
    with pytest.raises(ValueError, match="needs a model and a dataset"):
        ConjugateGradientDescentIHVP(influence_model)
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        ExactIHVP(influence_model, (x, y))
    assert registered_solvers() == [
        "arnoldi",
        "cg",
        "diagonal",
        "ekfac",
        "exact",
        "identity",
        "kfac",
        "lissa",
        "nystrom",
        "pinv",
    ]


def test_hvp_modes_agree_on_a_cnn():
    influence_model, ds = _cnn_problem()
    forward = InfluenceModel(influence_model.model, loss_function=sparse_ce(), hvp_mode="forward_over_backward")
    vectors = np.random.default_rng(10).standard_normal((5, influence_model.nb_params))
    batch = next(iter(ds))
    np.testing.assert_allclose(
        influence_model.batch_hvp_sum(batch, vectors).numpy(), forward.batch_hvp_sum(batch, vectors).numpy(), atol=1e-12
    )
    with pytest.raises(ValueError, match="hvp_mode"):
        InfluenceModel(influence_model.model, loss_function=sparse_ce(), hvp_mode="finite_differences")
