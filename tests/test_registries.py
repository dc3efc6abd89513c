"""Every registered solver and every registered calculator method, through the shared checks.

The parameters come from the registries themselves (``registered_solvers()``, ``registered_methods()``), so a new
solver or method is tested here as soon as it registers; the checks are those of :mod:`engine_checks`.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from engine_checks import check_calculator_invariants
from helpers import FLOAT, dataset, sparse_ce

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.hessian import (
    CURVATURE_REGISTRY,
    SOLVER_REGISTRY,
    InverseHessianVectorProduct,
    registered_solvers,
    resolve_solver,
)
from influenciae.influence.registry import CalculatorOptions, CalculatorSetup, build_calculator, registered_methods

NUM_TRAIN, NUM_TEST, NUM_FEATURES, NUM_CLASSES = 24, 6, 3, 3
DAMPING = 0.5
# options making each solver an exact inverse of its own operator on this small problem (P = 31); every solver
# inverts the Gauss-Newton matrix here (the Hessian of the untrained MLP is indefinite, which Nyström and LiSSA refuse)
SOLVER_OPTIONS = {
    "cg": {"tolerance": 1e-12},
    "lissa": {"tolerance": 1e-12},
    "arnoldi": {"subspace_dim": None, "k_largest_eig_vals": None},  # k = P
    "nystrom": {"rank": 10_000},  # clipped to P
}
# how close ``hvp(solve(v))`` comes back to ``v`` (the iterative solvers stop at their tolerance)
SOLVER_TOLERANCE = {"cg": 1e-8, "lissa": 1e-6}
# options keeping each method cheap here, and the relative tolerance of its score comparisons
METHOD_OPTIONS = {
    "arnoldi": CalculatorOptions(damping=DAMPING, subspace_dim=12, rank=6),  # P = 15: the last layer's weights
    "trak": CalculatorOptions(damping=DAMPING, projection_dim=8),
}
METHOD_RTOL = {"trak": 1e-6, "similarity": 1e-6}


@pytest.fixture(scope="module")
def problem():
    """A small softmax MLP in float64 (3 -> 4 tanh -> 3, P = 31) with training and test batches, shared."""
    rng = np.random.default_rng(3)
    model = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,), dtype=FLOAT),
            keras.layers.Dense(4, activation="tanh", dtype=FLOAT),
            keras.layers.Dense(NUM_CLASSES, dtype=FLOAT),
        ]
    )
    for weight in model.weights:
        weight.assign(0.7 * rng.standard_normal(weight.shape))
    x = rng.standard_normal((NUM_TRAIN + NUM_TEST, NUM_FEATURES))
    y = rng.integers(0, NUM_CLASSES, NUM_TRAIN + NUM_TEST).astype("int64")
    train = dataset(x[:NUM_TRAIN], y[:NUM_TRAIN], batch_size=7)
    test = dataset(x[NUM_TRAIN:], y[NUM_TRAIN:], batch_size=4)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=sparse_ce())
    return model, influence_model, train, test


def test_the_registries_list_what_is_registered():
    assert registered_solvers() == sorted(SOLVER_REGISTRY.names())
    assert set(registered_solvers(operator_only=True)) < set(registered_solvers())
    assert {"kfac", "ekfac", "diagonal", "identity"}.isdisjoint(registered_solvers(operator_only=True))
    assert CURVATURE_REGISTRY.names()[0] == "hessian" and "ggn" in CURVATURE_REGISTRY
    with pytest.raises(ValueError, match="Unknown inverse-HVP solver 'newton'; choose one of"):
        resolve_solver("newton", None, None)


@pytest.mark.parametrize("name", registered_solvers())
def test_every_registered_solver_inverts_its_own_operator(problem, name):
    """``hvp(solve(v)) = v`` with the solver's own (damped) operator, whatever it approximates; same configuration
    whether built by name or resolved from the instance."""
    _, influence_model, train, _ = problem
    solver = resolve_solver(
        name, influence_model, train, damping=DAMPING, curvature="ggn", **SOLVER_OPTIONS.get(name, {})
    )
    assert solver.nb_params == influence_model.nb_params and solver.configuration()["name"] == name
    vectors = np.random.default_rng(7).standard_normal((3, influence_model.nb_params))
    solutions = solver.solve(vectors)
    assert solutions.shape == vectors.shape
    error = np.linalg.norm(solver.hvp(solutions).numpy() - vectors) / np.linalg.norm(vectors)
    assert error <= SOLVER_TOLERANCE.get(name, 1e-10)
    state = solver.export_state()  # its own fitted state, solved with again without the data
    assert state.kind == solver.fitted_state
    if state.kind != "none":
        restored = InverseHessianVectorProduct.from_state(state)
        np.testing.assert_allclose(restored.solve(vectors).numpy(), solutions.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(restored.hvp(solutions).numpy(), vectors, rtol=1e-7, atol=1e-7)
    assert resolve_solver(solver, influence_model, train, damping=0.0) is solver  # an instance keeps its damping
    with pytest.raises(ValueError, match="cannot be applied to an already built solver"):
        resolve_solver(solver, influence_model, train, damping=0.1)


@pytest.mark.parametrize("name", registered_solvers())
def test_every_registered_solver_is_built_the_same_way(problem, name):
    """One constructor for every solver: its settings as keywords or as one options dataclass give the same solver;
    both at once, an unknown keyword or another options class are refused with what to do; ``curvature=`` given to
    the class is the curvature ``resolve_solver`` builds."""
    _, influence_model, train, _ = problem
    solver_class = SOLVER_REGISTRY.get(name)
    settings = dict(SOLVER_OPTIONS.get(name, {}))
    by_keywords = solver_class(influence_model, train, damping=DAMPING, curvature="ggn", **settings)
    resolved = resolve_solver(name, influence_model, train, damping=DAMPING, curvature="ggn", **settings)
    assert by_keywords.configuration() == resolved.configuration()
    assert set(solver_class.setting_names()) >= set(settings)
    if solver_class.options_class is None:
        assert solver_class.setting_names() == () and by_keywords.options is None
    else:
        options = solver_class.options_class(**settings)
        by_options = solver_class(influence_model, train, options, damping=DAMPING, curvature="ggn")
        assert by_options.configuration() == by_keywords.configuration() and by_options.options == options
        if settings:
            with pytest.raises(ValueError, match="either as options="):
                solver_class(influence_model, train, options, damping=DAMPING, **settings)
        with pytest.raises(TypeError, match="options must be a"):
            solver_class(influence_model, train, {"tolerance": 1.0}, damping=DAMPING)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['n_opt_iters'\]"):
        solver_class(influence_model, train, damping=DAMPING, n_opt_iters=10)


def _engine_representatives() -> list[str]:
    """One registered solver per way the engine treats solvers: the engine sees a solver only through ``solve``, its
    ``iterative`` flag (block sizes) and whether it works on an explicit operator; the solve itself is checked for
    every solver by ``test_every_registered_solver_inverts_its_own_operator``."""
    kinds: dict[tuple[bool, bool], str] = {}
    for name in registered_solvers():
        solver_class = SOLVER_REGISTRY.get(name)
        kinds.setdefault((solver_class.iterative, solver_class.takes_operator), name)
    return sorted(kinds.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", _engine_representatives())
def test_registered_solvers_pass_the_engine_checks(problem, name):
    _, influence_model, train, test = problem
    calculator = FirstOrderInfluenceCalculator(
        influence_model, train, name, damping=DAMPING, ihvp_options=SOLVER_OPTIONS.get(name), curvature="ggn"
    )
    check_calculator_invariants(calculator, train, test, rtol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", registered_methods("top_k"))
def test_every_registered_method_passes_the_engine_checks(problem, name, tmp_path):
    model, _, train, test = problem
    options = METHOD_OPTIONS.get(name, CalculatorOptions(damping=DAMPING))
    calculator = build_calculator(name, CalculatorSetup(model, train, sparse_ce(), options))
    check_calculator_invariants(calculator, train, test, rtol=METHOD_RTOL.get(name, 1e-8), cache_dir=str(tmp_path))


@pytest.mark.parametrize("name", sorted(set(registered_methods()) - set(registered_methods("top_k"))))
def test_every_self_influence_only_method_streams_what_it_returns(problem, name):
    model, _, train, _ = problem
    calculator = build_calculator(name, CalculatorSetup(model, train, sparse_ce(), CalculatorOptions()))
    values = calculator.self_influence(train)
    assert values.shape == (NUM_TRAIN,) and np.all(np.isfinite(values))
    streamed = np.concatenate([batch_values.numpy() for _, batch_values in calculator.compute_influence_values(train)])
    np.testing.assert_allclose(streamed, values, rtol=1e-10)
    indices, top = calculator.compute_top_k_from_training_dataset(train, 3)
    np.testing.assert_allclose(top.numpy(), np.sort(values)[::-1][:3], rtol=1e-10)
    np.testing.assert_allclose(values[indices.numpy()], top.numpy(), rtol=1e-10)
