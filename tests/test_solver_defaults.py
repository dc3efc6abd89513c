"""Defaults that work: auto damping, pseudo-inverse, dtype-aware CG tolerance, LiSSA/Arnoldi warnings."""

from __future__ import annotations

import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import classification_data, dataset, fit, ridge_problem, sparse_ce

from influenciae import InfluenceModel
from influenciae.hessian import ArnoldiIHVP, ConjugateGradientDescentIHVP, ExactIHVP, LissaIHVP, get_ihvp
from influenciae.hessian.exact import AUTO_DAMPING_FRACTION
from influenciae.influence.first_order import FirstOrderInfluenceCalculator


def softmax_mlp(dtype: str = "float64"):
    """A trained softmax MLP without regularization: its Hessian has the exact null direction of the logits' shift."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(5, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )
    x, y = classification_data(num_examples=32, num_features=4)
    fit(model, x.astype(dtype), y, steps=1000)
    return InfluenceModel(model, loss_function=sparse_ce()), dataset(x.astype(dtype), y)


def test_exact_auto_damping_on_softmax_mlp():
    im, ds = softmax_mlp()
    dense = ExactIHVP(im, ds, damping=0.0).operator.to_dense().numpy()
    dense = (dense + dense.T) / 2
    with pytest.raises(ValueError, match="damping"):
        ExactIHVP(im, ds, damping=0.0).solve(np.ones(im.nb_params))  # damping=0.0 still means exactly zero
    solver = ExactIHVP(im, ds)  # the default: "auto"
    vectors = np.random.default_rng(0).standard_normal((3, im.nb_params))
    solution = solver.solve(vectors).numpy()
    smallest = np.linalg.eigvalsh(dense)[0]
    expected_damping = max(AUTO_DAMPING_FRACTION * np.trace(dense) / im.nb_params, -2 * smallest)
    assert solver.info["auto_damping"] is True
    np.testing.assert_allclose(solver.damping, expected_damping, rtol=1e-10)
    expected = np.linalg.solve(dense + expected_damping * np.eye(im.nb_params), vectors.T).T
    np.testing.assert_allclose(solution, expected, rtol=1e-6, atol=1e-8)
    assert solver.configuration()["damping"] == pytest.approx(expected_damping)


def test_auto_damping_is_zero_on_a_positive_definite_hessian():
    im, x, y, hessian = ridge_problem()
    solver = ExactIHVP(im, dataset(x, y))
    vectors = np.eye(hessian.shape[0])
    np.testing.assert_allclose(solver.solve(vectors).numpy(), np.linalg.inv(hessian), rtol=1e-9, atol=1e-12)
    assert solver.damping == 0.0 and solver.info["auto_damping"] is False


def test_pseudo_inverse_by_name_and_option():
    im, ds = softmax_mlp()
    dense = ExactIHVP(im, ds, damping=0.0).operator.to_dense().numpy()
    dense = (dense + dense.T) / 2
    values, vectors = np.linalg.eigh(dense)
    keep = np.abs(values) > np.finfo(np.float64).eps * im.nb_params * np.abs(values).max()
    pinv = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
    rhs = np.random.default_rng(1).standard_normal((2, im.nb_params))
    for solver in (get_ihvp("pinv", im, ds), ExactIHVP(im, ds, pseudo_inverse=True)):
        np.testing.assert_allclose(solver.solve(rhs).numpy(), rhs @ pinv, rtol=1e-6, atol=1e-8)
        assert solver.info["dropped_eigenvalues"] == int((~keep).sum()) >= 3  # logit-shift null space


def test_first_order_calculator_default_works_on_softmax_mlp_and_logs_damping(caplog):
    im, ds = softmax_mlp()
    with caplog.at_level(logging.INFO, logger="influenciae"):
        calculator = FirstOrderInfluenceCalculator(im, ds)  # the quick start: nothing passed
        values = calculator.self_influence(ds)
    assert values.shape == (32,) and np.all(np.isfinite(values)) and np.all(values > 0)
    assert calculator.ihvp.info["auto_damping"] is True
    assert any("damping='auto' chose damping=" in record.getMessage() for record in caplog.records)


def test_cg_default_tolerance_reachable_in_float32():
    im, x, y, hessian = ridge_problem()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="float32"), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.ones((5, 1), "float32"))
    from helpers import half_squared_error

    im32 = InfluenceModel(model, loss_function=half_squared_error)
    ds = dataset(x.astype("float32"), y.astype("float32"))
    solver = ConjugateGradientDescentIHVP(im32, ds, damping=0.1)
    assert solver.tolerance == pytest.approx(100 * np.finfo(np.float32).eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        solution = solver.solve(np.eye(5, dtype="float32")).numpy()
    np.testing.assert_allclose(solution, np.linalg.inv(x.T @ x / len(x) + 0.1 * np.eye(5)), rtol=1e-4, atol=1e-5)
    assert ConjugateGradientDescentIHVP(im, dataset(x, y)).tolerance == 1e-8  # float64 keeps 1e-8


def test_lissa_warns_when_not_converged_on_indefinite_hessian():
    im, ds = softmax_mlp()
    rhs = np.random.default_rng(2).standard_normal((1, im.nb_params))
    solver = LissaIHVP(im, ds, damping=0.0, depth=30)
    with pytest.warns(RuntimeWarning, match="LiSSA did not converge.*damping"):
        solver.solve(rhs)
    assert not solver.info.converged.any()


def test_arnoldi_default_keeps_half_and_warns_on_full_subspace():
    im, ds = softmax_mlp()
    solver = ArnoldiIHVP(im, ds, subspace_dim=20, damping=1e-3)
    assert solver.k_largest_eig_vals == 10
    with pytest.warns(RuntimeWarning, match="Ritz values"):
        ArnoldiIHVP(im, ds, subspace_dim=20, k_largest_eig_vals=20, damping=1e-3)
    assert ArnoldiIHVP(im, ds, subspace_dim=im.nb_params, damping=1e-3).k_largest_eig_vals == im.nb_params


@pytest.mark.parametrize(
    "solve",
    [
        pytest.param(lambda im, ds: ExactIHVP(im, ds).solve(np.ones(im.nb_params, "float16")), id="exact"),
        pytest.param(lambda im, ds: ArnoldiIHVP(im, ds, subspace_dim=3, damping=1e-3), id="arnoldi"),
        pytest.param(lambda im, ds: get_ihvp("diagonal", im, ds, damping=1e-3), id="diagonal"),
        pytest.param(lambda im, ds: get_ihvp("ekfac", im, ds, damping=1e-3), id="ekfac"),
    ],
)
def test_factorizing_solvers_refuse_float16_clearly(solve):
    """Cholesky, eigh and NumPy's linalg have no (accurate) half-precision kernels: a TypeError saying what to do."""
    model = keras.Sequential([keras.Input((3,), dtype="float16"), keras.layers.Dense(1, dtype="float16")])
    from helpers import half_squared_error

    im = InfluenceModel(model, loss_function=half_squared_error)
    x = np.random.default_rng(0).standard_normal((8, 3)).astype("float16")
    ds = tf.data.Dataset.from_tensor_slices((x, x[:, 0])).batch(4)
    with pytest.raises(TypeError, match="float16.*cast the model to float32"):
        solve(im, ds)


class _Counter:
    def __init__(self) -> None:
        self.steps = 0

    def update(self, count: int = 1) -> None:
        self.steps += count

    def close(self) -> None:
        pass


@pytest.mark.parametrize("name", ["cg", "lissa", "arnoldi"])
def test_show_progress_reaches_the_solver_and_counts_its_steps(name, monkeypatch, caplog):
    im, x, y, hessian = ridge_problem()
    options = {"arnoldi": {"subspace_dim": 5}, "lissa": {"depth": 400}}.get(name, {})
    calculator = FirstOrderInfluenceCalculator(
        im, dataset(x, y), name, damping=0.1, ihvp_options=options, show_progress=True
    )
    assert calculator.ihvp.show_progress is True
    assert FirstOrderInfluenceCalculator(im, dataset(x, y), name, damping=0.1).ihvp.show_progress is False
    assert "show_progress" not in calculator.ihvp.configuration()  # never part of cache manifests
    from tqdm.auto import tqdm

    bar = calculator.ihvp.progress(3, "steps")
    assert isinstance(bar, tqdm)
    bar.close()
    counters: list[_Counter] = []

    def progress(total, description):
        counters.append(_Counter())
        return counters[-1]

    monkeypatch.setattr(calculator.ihvp, "progress", progress)
    with caplog.at_level(logging.INFO, logger="influenciae"):
        solution = calculator.ihvp.solve(np.eye(5)).numpy()
    np.testing.assert_allclose(solution, np.linalg.inv(hessian + 0.1 * np.eye(5)), rtol=1e-4, atol=1e-6)
    steps = sum(counter.steps for counter in counters)
    iterations = 5 if name == "arnoldi" else calculator.ihvp.info.iterations
    assert steps == iterations >= 2
    assert any("damping=1.000e-01" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("name", ["exact", "nystrom"])
def test_the_one_long_pass_of_exact_and_nystrom_shows_a_bar_over_batches(name, monkeypatch):
    """The dense Hessian build and the Nyström sketch are one pass over the data: a bar counts its batches."""
    import tqdm.auto

    im, x, y, hessian = ridge_problem()
    bars: list[dict] = []
    real = tqdm.auto.tqdm

    def recording(iterable=None, **options):
        bars.append({"desc": options.get("desc"), "count": 0})

        def counted():
            for item in iterable:
                bars[-1]["count"] += 1
                yield item

        return counted()

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    options = {"nystrom": {"rank": 5}}.get(name, {})
    calculator = FirstOrderInfluenceCalculator(
        im, dataset(x, y, batch_size=8), name, damping=0.1, ihvp_options=options, show_progress=True
    )
    solution = calculator.ihvp.solve(np.eye(5)).numpy()
    np.testing.assert_allclose(solution, np.linalg.inv(hessian + 0.1 * np.eye(5)), rtol=1e-4, atol=1e-6)
    batches = -(-len(y) // 8)
    passes = [bar for bar in bars if bar["desc"] and ("curvature" in bar["desc"] or "sketch" in bar["desc"])]
    assert [bar["count"] for bar in passes] == [batches], bars
    monkeypatch.setattr(tqdm.auto, "tqdm", real)
    quiet = FirstOrderInfluenceCalculator(im, dataset(x, y, batch_size=8), name, damping=0.1, ihvp_options=options)
    bars.clear()
    quiet.ihvp.solve(np.eye(5))
    assert bars == []
