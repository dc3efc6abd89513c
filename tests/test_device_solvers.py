"""Block CG and LiSSA with their loops on the device (issue 15 §2): the graph path of traceable operators, the
Python path of dataset operators, preconditioners, and traces reused across solves. Float64 closed forms."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import tensorflow as tf
from helpers import classification_data, dataset, fit, small_mlp, sparse_ce

from influenciae import ConjugateGradientDescentIHVP, ExactIHVP, InfluenceModel, LissaIHVP
from influenciae.hessian import HessianOperator
from influenciae.hessian import base as base_module
from influenciae.hessian import conjugate_gradient as cg_module
from influenciae.hessian.operator import RowOperator, as_row_operator

NON_PD = "non-positive curvature"


class Opaque(RowOperator):
    """The same operator, declared not traceable: the solvers take their Python loop."""

    def __init__(self, operator):
        self.inner = as_row_operator(operator)
        super().__init__(self.inner.num_params, self.inner.dtype, "Opaque", parameters={})

    def _matmul_rows(self, vectors):
        return self.inner.matmul_rows(vectors)


def spd(eigenvalues, seed=0):
    """``Q diag(eigenvalues) Qᵀ`` with a random orthogonal ``Q``; returns the matrix and ``Q``."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues), len(eigenvalues))))
    return basis @ np.diag(eigenvalues) @ basis.T, basis


def right_hand_sides(basis):
    """Seven rows of increasing difficulty: zero, 1, 2 and 4 eigen-directions, then three dense random rows."""
    rng = np.random.default_rng(1)
    rows = [np.zeros(basis.shape[0]), basis[:, 3], basis[:, 0] + basis[:, -1], basis[:, [1, 5, 9, 20]].sum(axis=1)]
    rows += list(rng.standard_normal((3, basis.shape[0])) * [[1.0], [10.0], [0.1]])
    return np.stack(rows)


@pytest.fixture(scope="module")
def conditioned():
    matrix, basis = spd(np.logspace(0, 3, 40))  # condition number 1e3
    return matrix, basis, right_hand_sides(basis)


@pytest.mark.parametrize("path", ["graph", "python"])
def test_block_cg_agrees_with_numpy_and_reports_each_row(conditioned, path):
    matrix, _, right = conditioned
    operator = matrix if path == "graph" else Opaque(matrix)
    solver = ConjugateGradientDescentIHVP(None, operator=operator, tolerance=1e-12, max_iterations=400)
    solution = solver.solve(right).numpy()
    expected = np.linalg.solve(matrix, right.T).T
    np.testing.assert_allclose(solution, expected, atol=1e-8 * np.abs(expected).max(), rtol=0)
    info = solver.info
    # a right-hand side spanned by k eigenvectors converges in k products in exact arithmetic (zero rows in none;
    # round-off adds a few for k = 4 at this condition number), dense rows need more than P
    np.testing.assert_array_equal(info.row_iterations[:3], [0, 1, 2])
    assert 4 <= info.row_iterations[3] < 20
    assert np.all(info.row_iterations[4:] > 40) and info.iterations == info.row_iterations.max()
    assert info.converged.all() and np.all(info.residual_norms <= 1e-12)
    true_residuals = np.linalg.norm(right - solution @ matrix, axis=1) / np.maximum(np.linalg.norm(right, axis=1), 1)
    assert np.all(true_residuals <= 1e-10)
    np.testing.assert_array_equal(solution[0], 0.0)
    assert (bool(solver._graph_solves)) == (path == "graph")


def test_rows_that_converge_early_stop_moving(conditioned):
    matrix, basis, right = conditioned
    block = ConjugateGradientDescentIHVP(None, operator=matrix, tolerance=1e-12, max_iterations=400)
    solution = block.solve(right).numpy()
    # an eigenvector row is solved exactly by its one step; had it kept moving (a 0/0 step on its zero residual) it
    # would be NaN or drift while the dense rows took their 40+ products
    eigenvalue = float(basis[:, 3] @ matrix @ basis[:, 3])
    np.testing.assert_allclose(solution[1], basis[:, 3] / eigenvalue, rtol=0, atol=1e-15)
    for row in range(1, len(right)):
        alone = ConjugateGradientDescentIHVP(None, operator=matrix, tolerance=1e-12, max_iterations=400)
        single = alone.solve(right[row : row + 1]).numpy()[0]
        # the same recursion: the same number of products (one more or less for the dense rows, whose last residuals
        # sit at the tolerance and differ in round-off between a block and a single-row matmul) and the same answer
        assert abs(alone.info.iterations - block.info.row_iterations[row]) <= (0 if row < 4 else 1)
        np.testing.assert_allclose(solution[row], single, rtol=0, atol=1e-10 * np.abs(single).max())


def test_non_positive_curvature_is_refused_on_both_paths():
    indefinite = np.diag([2.0, 1.0, -0.5])
    for operator in (indefinite, Opaque(indefinite)):
        solver = ConjugateGradientDescentIHVP(None, operator=operator)
        with pytest.raises(ValueError, match=f"{NON_PD}.*damping 0.0.*ExactIHVP"):
            solver.solve(np.ones((2, 3)))
    # damping that makes it positive definite is accepted
    damped = ConjugateGradientDescentIHVP(None, operator=indefinite, damping=1.0)
    np.testing.assert_allclose(damped.solve(np.ones(3)).numpy()[0], [1 / 3, 1 / 2, 2.0], atol=1e-12)


def test_stopping_at_max_iterations_warns_on_the_graph_path(conditioned):
    matrix, _, right = conditioned
    solver = ConjugateGradientDescentIHVP(None, operator=matrix, tolerance=1e-12, max_iterations=3)
    with pytest.warns(RuntimeWarning, match="stopped after 3 iterations"):
        solver.solve(right)
    assert solver.info.iterations == 3
    np.testing.assert_array_equal(solver.info.converged, [True, True, True, False, False, False, False])


@pytest.fixture(scope="module")
def tiny_model():
    model = small_mlp(num_features=3, hidden=3, classes=2)  # P = 20
    x, y = classification_data(num_examples=24, num_features=3, classes=2)
    fit(model, x, y, steps=100)
    return InfluenceModel(model, last_layer=-1, loss_function=sparse_ce()), dataset(x, y, batch_size=24)


def test_cg_on_a_hessian_operator_matches_exact_on_both_paths(tiny_model):
    im, ds = tiny_model
    vectors = np.random.default_rng(2).standard_normal((5, im.nb_params))
    exact = ExactIHVP(im, ds, damping=0.1)
    expected = exact.solve(vectors).numpy()
    hessian = HessianOperator(im, ds)
    for solver in (
        ConjugateGradientDescentIHVP(im, ds, damping=0.1, dense=False),  # whichever path the Hessian allows
        ConjugateGradientDescentIHVP(im, ds, damping=0.1),  # CG on the dense matrix (P small, several rows)
        ConjugateGradientDescentIHVP(None, operator=Opaque(hessian), damping=0.1),  # the Python loop
        ConjugateGradientDescentIHVP(im, ds, damping=0.1, preconditioner="diagonal"),
        # a Python callable preconditioner: applied eagerly between the two traced halves of the step
        ConjugateGradientDescentIHVP(im, ds, damping=0.1, preconditioner=lambda rows: rows.numpy() * 0.5),
    ):
        solution = solver.solve(vectors).numpy()
        np.testing.assert_allclose(solution, expected, atol=1e-6 * np.abs(expected).max(), rtol=0)
        assert solver.info.converged.all()
        # the graph path exactly when operator and preconditioner can be traced (a held dataset operator can)
        traceable = solver.operator.traceable and solver._prepared_preconditioner().traceable
        assert (bool(solver._graph_solves)) == traceable
    exact_inverse = np.linalg.inv(exact.operator.to_dense().numpy())
    perfect = ConjugateGradientDescentIHVP(im, ds, damping=0.1, preconditioner=exact_inverse)
    np.testing.assert_allclose(perfect.solve(vectors).numpy(), expected, atol=1e-8 * np.abs(expected).max())
    assert perfect.info.iterations == 1


def test_cg_forms_the_dense_matrix_when_it_is_cheaper_and_solves_the_same_system(tiny_model, monkeypatch):
    """``dense=None`` forms ``H + λI`` once when the rows times the expected iterations reach P (a dataset operator,
    small P) and keeps it for later solves; a single row on a larger P, ``dense=False`` and an explicit matrix stay
    matrix-free. Both give the exact solution."""
    im, ds = tiny_model
    vectors = np.random.default_rng(4).standard_normal((6, im.nb_params))
    expected = ExactIHVP(im, ds, damping=0.1).solve(vectors).numpy()
    formed = []
    original = RowOperator.to_dense

    def counting(operator):
        formed.append(operator.num_params)
        return original(operator)

    monkeypatch.setattr(RowOperator, "to_dense", counting)
    automatic = ConjugateGradientDescentIHVP(im, ds, damping=0.1, tolerance=1e-12)
    free = ConjugateGradientDescentIHVP(im, ds, damping=0.1, tolerance=1e-12, dense=False)
    for solver in (automatic, free):
        np.testing.assert_allclose(solver.solve(vectors).numpy(), expected, atol=1e-7 * np.abs(expected).max())
        assert solver.info.converged.all()
    assert automatic._dense_operator is not None and free._dense_operator is None and formed == [im.nb_params]
    automatic.solve(vectors[:2])
    assert formed == [im.nb_params]  # kept: later solves reuse the matrix
    monkeypatch.setattr(base_module, "DENSE_MAX_PARAMS", im.nb_params - 1)  # too large to form by default
    large = ConjugateGradientDescentIHVP(im, ds, damping=0.1)
    large.solve(vectors)
    assert large._dense_operator is None
    monkeypatch.setattr(base_module, "DENSE_MAX_PARAMS", 4096)
    few = ConjugateGradientDescentIHVP(im, ds, damping=0.1, max_iterations=2)  # 1 row x 2 iterations < P = 20
    few.solve(vectors[:1])
    assert few._dense_operator is None
    explicit = ConjugateGradientDescentIHVP(None, operator=np.eye(im.nb_params) * 2.0)  # already a matrix
    explicit.solve(vectors)
    assert explicit._dense_operator is None
    forced = ConjugateGradientDescentIHVP(None, operator=np.eye(im.nb_params) * 2.0, dense=True)
    np.testing.assert_allclose(forced.solve(vectors).numpy(), vectors / 2.0, rtol=1e-12)
    assert forced._dense_operator is not None


def test_lissa_runs_its_recursion_on_the_dense_matrix_when_cheaper(tiny_model):
    """Deterministic LiSSA with rows x depth ≥ P forms ``H + λI`` once; the recursion (same steps, same scale) gives
    the matrix-free result."""
    im, ds = tiny_model
    vectors = np.random.default_rng(5).standard_normal((4, im.nb_params))
    settings = {"damping": 1.0, "depth": 600, "tolerance": 1e-12}
    automatic, free = LissaIHVP(im, ds, **settings), LissaIHVP(im, ds, dense=False, **settings)
    dense, matrix_free = automatic.solve(vectors).numpy(), free.solve(vectors).numpy()
    assert automatic._dense_operator is not None and free._dense_operator is None
    assert automatic.info.iterations == free.info.iterations
    np.testing.assert_allclose(dense, matrix_free, atol=1e-9 * np.abs(matrix_free).max())
    expected = ExactIHVP(im, ds, damping=1.0).solve(vectors).numpy()
    np.testing.assert_allclose(dense, expected, atol=1e-6 * np.abs(expected).max())


def test_preconditioners_converge_in_fewer_iterations_to_the_same_solution():
    rng = np.random.default_rng(3)
    num_params = 60
    # badly scaled (Jacobi's case, condition 1e3: 135 -> 24 iterations) and with six huge eigenvalues (Nyström's
    # case, condition 2e4: 63 -> 25 iterations with a rank-8 sketch)
    scales = np.logspace(-1.5, 1.5, num_params)
    core, _ = spd(np.concatenate([np.logspace(2, 4, 6), np.linspace(0.5, 2.0, num_params - 6)]), seed=4)
    scaled = np.sqrt(scales)[:, None] * spd(np.linspace(0.5, 2.0, num_params), seed=5)[0] * np.sqrt(scales)[None]
    right = rng.standard_normal((4, num_params))
    for matrix, name in ((scaled, "diagonal"), (core, "nystrom")):
        expected = np.linalg.solve(matrix, right.T).T
        iterations = {}
        for preconditioner in (None, name):
            solver = ConjugateGradientDescentIHVP(
                None,
                operator=matrix,
                tolerance=1e-11,
                max_iterations=1000,
                preconditioner=preconditioner,
                preconditioner_rank=8,
            )
            solution = solver.solve(right).numpy()
            np.testing.assert_allclose(solution, expected, atol=1e-8 * np.abs(expected).max(), rtol=0)
            assert solver.info.converged.all() and bool(solver._graph_solves)  # applied inside the graph
            iterations[preconditioner] = solver.info.iterations
        assert iterations[name] <= iterations[None] / 2, (name, iterations)
    configuration = ConjugateGradientDescentIHVP(
        None, operator=core, preconditioner="nystrom", preconditioner_rank=8
    ).configuration()
    assert configuration["preconditioner"] == "nystrom" and configuration["preconditioner_rank"] == 8
    assert "preconditioner" not in ConjugateGradientDescentIHVP(None, operator=core).configuration()
    with pytest.raises(ValueError, match="Unknown preconditioner 'jacobi'"):
        ConjugateGradientDescentIHVP(None, operator=core, preconditioner="jacobi")


def reference_lissa(matrix, vectors, scale, depth, tolerance):
    """The LiSSA recursion as it was written before the graph path (numpy, same stopping rule)."""
    estimate, change, step = vectors, np.inf, 0
    for step in range(1, depth + 1):  # noqa: B007
        updated = vectors + estimate - (estimate @ matrix.T) / scale
        norm = np.linalg.norm(updated, axis=1).max()
        change = np.linalg.norm(updated - estimate, axis=1).max() / max(norm, 1e-300)
        estimate = updated
        if change < tolerance:
            break
    return estimate / scale, step, change


@contextlib.contextmanager
def warns_unless_converged(converges: bool):
    """LiSSA's RuntimeWarning when it does not converge, and no warning at all when it does."""
    if not converges:
        with pytest.warns(RuntimeWarning, match="did not converge"):
            yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


@pytest.mark.parametrize("depth", [40, 2000])
def test_lissa_graph_path_equals_the_recursion(depth):
    matrix, _ = spd(np.logspace(-0.5, 1, 30), seed=6)
    vectors = np.random.default_rng(7).standard_normal((6, 30))
    graph = LissaIHVP(None, operator=matrix, depth=depth, tolerance=1e-10)
    eager = LissaIHVP(None, operator=Opaque(matrix), depth=depth, tolerance=1e-10)
    with warns_unless_converged(depth == 2000):
        graph_solution = graph.solve(vectors).numpy()
    with warns_unless_converged(depth == 2000):
        eager_solution = eager.solve(vectors).numpy()
    assert graph.scale == eager.scale and bool(graph._graph_recursions) and not eager._graph_recursions
    expected, steps, change = reference_lissa(matrix, vectors, graph.scale, depth, 1e-10)
    np.testing.assert_allclose(graph_solution, eager_solution, atol=1e-10, rtol=0)
    np.testing.assert_allclose(graph_solution, expected, atol=1e-10, rtol=0)
    np.testing.assert_array_equal(graph.info.residual_norms, eager.info.residual_norms)  # the same last change
    for info in (graph.info, eager.info):
        assert info.iterations == steps and (steps < depth) == (depth == 2000)
        np.testing.assert_allclose(info.residual_norms, change, rtol=1e-5)  # numpy's norms round differently
        assert info.converged.all() == (depth == 2000)
    if depth == 2000:
        np.testing.assert_allclose(graph_solution, np.linalg.solve(matrix, vectors.T).T, atol=1e-7)


def test_lissa_divergence_is_refused_at_the_same_step_on_both_paths():
    messages = []
    for operator in (np.diag([2.0, 1.0]), Opaque(np.diag([2.0, 1.0]))):
        with pytest.raises(ValueError, match="LiSSA diverged after") as error:
            LissaIHVP(None, operator=operator, scale=0.5).solve(np.ones(2))
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "after 18 steps" in messages[0]


def test_traced_once_per_solver_and_shared_by_the_python_loop(conditioned, tiny_model):
    matrix, _, right = conditioned
    solver = ConjugateGradientDescentIHVP(None, operator=matrix, tolerance=1e-10, max_iterations=400)
    solver.solve(right)
    solver.solve(right[:3] * 2.0)  # another block of the same width P, fewer rows
    solver.solve(np.random.default_rng(8).standard_normal((11, 40)))
    assert next(iter(solver._graph_solves.values())).experimental_get_tracing_count() == 1
    lissa = LissaIHVP(None, operator=np.diag(np.linspace(1.0, 2.0, 10)), depth=200)
    for rows in (2, 5):
        lissa.solve(np.ones((rows, 10)))
    assert next(iter(lissa._graph_recursions.values())).experimental_get_tracing_count() == 1
    # the Python loop's traced step is shared by every solver of a dtype and preconditioner kind
    im, ds = tiny_model
    vectors = np.random.default_rng(9).standard_normal((4, im.nb_params))
    ConjugateGradientDescentIHVP(None, operator=Opaque(matrix), max_iterations=400).solve(right)
    step = cg_module._loop_functions(tf.float64, "none").step
    ConjugateGradientDescentIHVP(None, operator=Opaque(HessianOperator(im, ds)), damping=0.1).solve(vectors)
    before = step.experimental_get_tracing_count()  # (in a fresh process the first P = 20 solve traces once)
    ConjugateGradientDescentIHVP(None, operator=Opaque(HessianOperator(im, ds)), damping=0.1).solve(vectors[:2])
    ConjugateGradientDescentIHVP(None, operator=Opaque(HessianOperator(im, ds)), damping=0.1).solve(vectors[1:])
    assert step.experimental_get_tracing_count() == before


class FailsInGraph(Opaque):
    """Claims to be traceable but cannot be built inside a graph (as a held product pfor cannot convert)."""

    @property
    def traceable(self):
        return True

    def _matmul_rows(self, vectors):
        if tf.inside_function():
            raise NotImplementedError("pfor cannot convert this op")
        return self.inner.matmul_rows(vectors)


def test_a_product_that_cannot_be_traced_falls_back_to_the_python_loop():
    matrix, _ = spd(np.linspace(1.0, 3.0, 12), seed=10)
    vectors = np.random.default_rng(11).standard_normal((3, 12))
    expected = np.linalg.solve(matrix, vectors.T).T
    cg = ConjugateGradientDescentIHVP(None, operator=FailsInGraph(matrix), tolerance=1e-12)
    lissa = LissaIHVP(None, operator=FailsInGraph(matrix), tolerance=1e-12, depth=2000)
    for solver in (cg, lissa):
        for _ in range(2):  # the second solve goes straight to the Python loop
            np.testing.assert_allclose(solver.solve(vectors).numpy(), expected, atol=1e-9)
        assert solver._graph_failed and solver.info.converged.all()
