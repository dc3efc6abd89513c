"""The calculator engine: closed forms in float64, solver agreement, invariances, streaming, caches and top-k."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import classification_data, dataset, fit, logistic_problem, pearson, small_mlp, sparse_ce

from influenciae import (
    CACHE,
    ORDER,
    ArnoldiInfluenceCalculator,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
)


@pytest.fixture(scope="module")
def logistic():
    influence_model, x, y, hessian, gradients = logistic_problem()
    train = dataset(x[:45], y[:45], batch_size=7)
    # H over the full 60 examples (the helper's closed form); train = first 45 examples, test = last 15
    calculator = FirstOrderInfluenceCalculator(influence_model, dataset(x, y, batch_size=11))
    expected = gradients[45:] @ np.linalg.solve(hessian, gradients[:45].T)
    return calculator, train, dataset(x[45:], y[45:], batch_size=4), expected, hessian, gradients


def test_exact_influence_equals_the_closed_form(logistic):
    calculator, train, test, expected, hessian, gradients = logistic
    np.testing.assert_allclose(calculator.influence_matrix(test, train), expected, rtol=1e-10, atol=1e-12)
    self_expected = np.einsum("ij,ji->i", gradients[:45], np.linalg.solve(hessian, gradients[:45].T))
    np.testing.assert_allclose(calculator.self_influence(train), self_expected, rtol=1e-10)
    assert np.all(self_expected > 0)


def test_self_influence_is_the_diagonal_of_the_matrix(logistic):
    calculator, train, *_ = logistic
    np.testing.assert_allclose(
        calculator.self_influence(train), np.diag(calculator.influence_matrix(train, train)), rtol=1e-12
    )


@pytest.mark.parametrize("strategy", ["linear", "streaming", "faiss"])
@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_most_influential_equals_argsort(logistic, strategy, order):
    if strategy == "faiss":
        pytest.importorskip("faiss")
    calculator, train, test, expected, *_ = logistic
    indices, values = calculator.most_influential(test, train, k=6, order=order, nearest_neighbors=strategy)
    ranking = np.argsort(-expected if order is ORDER.DESCENDING else expected, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(indices, ranking)
    tolerance = 1e-5 if strategy == "faiss" else 1e-12  # faiss works in float32
    np.testing.assert_allclose(values, np.take_along_axis(expected, ranking, axis=1), rtol=tolerance, atol=tolerance)


def test_relatif_normalizes_the_training_side(logistic):
    calculator, train, test, _, hessian, gradients = logistic
    relatif = FirstOrderInfluenceCalculator(calculator.model, calculator.train_dataset, normalize=True)
    solved = np.linalg.solve(hessian, gradients[:45].T)
    expected = gradients[45:] @ solved / np.linalg.norm(solved, axis=0)
    np.testing.assert_allclose(relatif.influence_matrix(test, train), expected, rtol=1e-10)
    np.testing.assert_allclose(relatif.self_influence(train), np.diag(relatif.influence_matrix(train, train)))
    with pytest.raises(ValueError, match="RelatIF"):
        relatif.compute_influence_factors(test)


def test_influence_factors_are_reusable_and_saved_safely(logistic, tmp_path):
    calculator, train, test, expected, *_ = logistic
    factors = calculator.compute_influence_factors(test)
    np.testing.assert_allclose(calculator.influence_from_factors(factors, train), expected, rtol=1e-10)
    subset = train.unbatch().skip(10).take(12).batch(5)  # another training subset, other batching
    np.testing.assert_allclose(calculator.influence_from_factors(factors, subset), expected[:, 10:22], rtol=1e-10)
    calculator.save_influence_factors(factors, str(tmp_path / "factors"), test)
    np.testing.assert_array_equal(calculator.load_influence_factors(str(tmp_path / "factors")), factors)
    damped = FirstOrderInfluenceCalculator(calculator.model, calculator.train_dataset, damping=0.1)
    with pytest.raises(ValueError, match="overwrite=True"):
        damped.load_influence_factors(str(tmp_path / "factors"))


def test_perturbation_influence_matches_finite_differences(logistic):
    calculator, train, test, *_ = logistic
    perturbation = calculator.perturbation_influence(test.take(1), train.take(1))  # [4, 7, 4]
    assert perturbation.shape == (4, 7, 4)
    x_train, y_train = next(iter(train))
    step = 1e-6
    for feature in range(4):
        shift = np.zeros(x_train.shape)
        shift[2, feature] = step
        plus = calculator.influence_matrix(test.take(1), tf.data.Dataset.from_tensors((x_train + shift, y_train)))
        minus = calculator.influence_matrix(test.take(1), tf.data.Dataset.from_tensors((x_train - shift, y_train)))
        np.testing.assert_allclose(perturbation[:, 2, feature], (plus - minus)[:, 2] / (2 * step), rtol=1e-5, atol=1e-8)


def test_arnoldi_calculator_with_full_rank_equals_exact(logistic):
    calculator, train, test, expected, *_ = logistic
    arnoldi = ArnoldiInfluenceCalculator(calculator.model, calculator.train_dataset, 5, True, 5)
    np.testing.assert_allclose(arnoldi.influence_matrix(test, train), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(arnoldi.self_influence(train), calculator.self_influence(train), rtol=1e-8)
    low_rank = ArnoldiInfluenceCalculator(calculator.model, calculator.train_dataset, 5, True, 2)
    assert low_rank.ihvp.eigenvalues.shape == (2,)
    assert abs(float(low_rank.ihvp.eigenvalues[0])) >= abs(float(low_rank.ihvp.eigenvalues[1]))


@pytest.fixture(scope="module")
def trained_mlp():
    x, y = classification_data(num_examples=80)
    model = small_mlp(seed=4)
    fit(model, x[:64], y[:64], steps=600)
    influence_model = InfluenceModel(model, loss_function=sparse_ce())
    return influence_model, dataset(x[:64], y[:64], batch_size=64), dataset(x[64:], y[64:], batch_size=16)


@pytest.mark.slow
def test_iterative_calculators_agree_with_exact_on_an_mlp(trained_mlp):
    influence_model, train, test = trained_mlp
    damping = 1e-2
    exact = FirstOrderInfluenceCalculator(influence_model, train, "exact", damping=damping)
    reference = exact.influence_matrix(test, train)
    factors = {}
    for name, threshold in (("cg", 0.98), ("lissa", 0.95), ("arnoldi", 0.95)):
        calculator = FirstOrderInfluenceCalculator(influence_model, train, name, damping=damping)
        factors[name] = calculator.compute_influence_factors(test)  # one solve per test example: cheap
        scores = calculator.influence_from_factors(factors[name], train)
        assert pearson(scores, reference) >= threshold, name
    arnoldi = ArnoldiInfluenceCalculator(influence_model, train, damping=damping)
    assert pearson(arnoldi.influence_matrix(test, train), reference) >= 0.95


def _pipelines(x, y):
    return {
        "one batch": dataset(x, y, batch_size=len(x)),
        "partial last batch": dataset(x, y, batch_size=7),
        "map/prefetch": dataset(x, y, batch_size=5).map(lambda a, b: (a + 0.0, b)).prefetch(2),
        "unknown cardinality": tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(6),
    }


def test_results_do_not_depend_on_batching_or_pipeline(logistic):
    calculator, _, _, expected, *_ = logistic
    influence_model, x, y, _, _ = logistic_problem()
    for name, train in _pipelines(x[:45], y[:45]).items():
        for test_name, test in _pipelines(x[45:], y[45:]).items():
            matrix = calculator.influence_matrix(test, train)
            np.testing.assert_allclose(matrix, expected, rtol=1e-10, atol=1e-12, err_msg=f"{name} / {test_name}")
        indices, _ = calculator.most_influential(dataset(x[45:], y[45:]), train, k=3)
        np.testing.assert_array_equal(indices, np.argsort(-expected, axis=1, kind="stable")[:, :3])


def test_streaming_methods_agree_with_the_eager_ones(logistic):
    calculator, train, test, expected, *_ = logistic
    values = np.concatenate([v.numpy() for _, v in calculator.compute_influence_values(train)])
    np.testing.assert_allclose(values, calculator.self_influence(train), rtol=1e-12)
    assembled = np.zeros_like(expected)
    for test_indices, train_indices, block in calculator.estimate_influence_values_in_batches(test, train):
        assembled[np.ix_(test_indices.numpy(), train_indices.numpy())] = block.numpy()
    np.testing.assert_allclose(assembled, expected, rtol=1e-10)
    rows = list(calculator.top_k(test, train, k=4, order=ORDER.ASCENDING))
    indices = np.concatenate([i.numpy() for _, _, i in rows])
    np.testing.assert_array_equal(indices, np.argsort(expected, axis=1, kind="stable")[:, :4])
    assert rows[0][0][0].shape == (4, 4)  # the test batch itself comes first
    top_indices, top_values = calculator.compute_top_k_from_training_dataset(train, 5)
    self_values = calculator.self_influence(train)
    np.testing.assert_array_equal(top_indices.numpy(), np.argsort(-self_values, kind="stable")[:5])
    np.testing.assert_allclose(top_values.numpy(), np.sort(self_values)[::-1][:5])


@pytest.mark.parametrize("mode", [CACHE.MEMORY, CACHE.DISK, CACHE.NO_CACHE])
def test_cache_modes_give_the_same_results(logistic, mode, tmp_path):
    calculator, train, test, expected, *_ = logistic
    path = str(tmp_path / "vectors") if mode is CACHE.DISK else None
    matrix = calculator.influence_matrix(
        test, train, influence_vector_in_cache=mode, save_influence_vector_ds_path=path
    )
    np.testing.assert_allclose(matrix, expected, rtol=1e-10)
    indices, _ = calculator.most_influential(
        test, train, k=3, influence_vector_in_cache=mode, save_influence_vector_ds_path=path
    )
    np.testing.assert_array_equal(indices, np.argsort(-expected, axis=1, kind="stable")[:, :3])


def test_disk_cache_refuses_another_configuration_or_model(logistic, tmp_path):
    calculator, train, *_ = logistic
    path = str(tmp_path / "vectors")
    vectors = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(train, path)])
    again = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(train, path)])
    np.testing.assert_array_equal(vectors, again)
    damped = FirstOrderInfluenceCalculator(calculator.model, calculator.train_dataset, damping=0.5)
    with pytest.raises(ValueError, match="overwrite=True"):
        damped.compute_influence_vector(train, path)
    other_model, x, y, _, _ = logistic_problem(seed=3)
    other = FirstOrderInfluenceCalculator(other_model, dataset(x, y))
    with pytest.raises(ValueError, match="weights_fingerprint"):
        other.compute_influence_vector(train, path)
    with pytest.raises(ValueError, match="differs from the one this cache was built from"):
        calculator.influence_matrix(
            train,
            train.map(lambda a, b: (a * 2.0, b)),
            influence_vector_in_cache=CACHE.DISK,
            save_influence_vector_ds_path=path,
        )
    replaced = np.concatenate([v.numpy() for _, v in damped.compute_influence_vector(train, path, overwrite=True)])
    assert not np.allclose(replaced, vectors)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import dataset, logistic_problem
    from influenciae import FirstOrderInfluenceCalculator
    import influenciae.cache as cache_module

    writes = []
    original = cache_module.DiskCache.write_shard

    def write_shard(self, shard_id, *args, **kwargs):
        original(self, shard_id, *args, **kwargs)
        writes.append(shard_id)
        print("wrote", shard_id, flush=True)
        if {stop_after} is not None and shard_id == {stop_after}:
            import time
            time.sleep(60)  # the parent kills us here

    cache_module.DiskCache.write_shard = write_shard
    influence_model, x, y, _, _ = logistic_problem()
    calculator = FirstOrderInfluenceCalculator(influence_model, dataset(x, y, batch_size=11), batches_per_shard=1)
    calculator.compute_influence_vector(dataset(x, y, batch_size=6), {path!r})
    print("computed", writes, flush=True)
    """
)


def _run_resume_script(path: str, stop_after: int | None) -> subprocess.Popen:
    tests = os.path.dirname(__file__)
    script = RESUME_SCRIPT.format(tests=tests, path=path, stop_after=stop_after)
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


@pytest.mark.slow
def test_a_killed_computation_resumes_from_the_last_complete_shard(tmp_path):
    path = str(tmp_path / "vectors")
    process = _run_resume_script(path, stop_after=3)
    for line in process.stdout:
        if line.strip() == "wrote 3":
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resumed = _run_resume_script(path, stop_after=None)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    assert "computed [4, 5, 6, 7, 8, 9]" in output  # shards 0-3 were kept, only the rest recomputed
    influence_model, x, y, _, _ = logistic_problem()
    calculator = FirstOrderInfluenceCalculator(influence_model, dataset(x, y, batch_size=11), batches_per_shard=1)
    cached = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(dataset(x, y, 6), path)])
    fresh = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(dataset(x, y, 6))])
    np.testing.assert_array_equal(cached, fresh)


def _newton_logistic(x, y, regularization, start, iterations=30):
    """Minimize mean BCE + (λ/2)‖w‖² (bias unregularized) to machine precision."""
    augmented = np.hstack([x, np.ones((len(x), 1))])
    theta = start.copy()
    penalty = regularization * np.diag(np.append(np.ones(x.shape[1]), 0.0))
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-augmented @ theta))
        gradient = augmented.T @ (p - y) / len(x) + penalty @ theta
        hessian = (augmented * (p * (1 - p))[:, None]).T @ augmented / len(x) + penalty
        theta -= np.linalg.solve(hessian, gradient)
    return theta


@pytest.mark.slow
def test_influence_predicts_leave_one_out_retraining():
    influence_model, x, y, _, _ = logistic_problem(num_examples=120, num_features=4, regularization=0.01, seed=5)
    theta = _newton_logistic(x, y, 0.01, np.zeros(5))
    influence_model.model.layers[0].kernel.assign(theta[:4, None])
    influence_model.model.layers[0].bias.assign(theta[4:])
    rng = np.random.default_rng(0)
    x_test = rng.standard_normal((1, 4))
    y_test = np.array([1.0])
    train = dataset(x, y, batch_size=32)
    calculator = FirstOrderInfluenceCalculator(influence_model, train)
    predicted = calculator.influence_matrix(dataset(x_test, y_test), train)[0] / len(x)

    def test_loss(parameters):
        logit = float(x_test[0] @ parameters[:4] + parameters[4])
        return float(np.logaddexp(0.0, logit) - y_test[0] * logit)

    removed = np.argsort(-np.abs(predicted))[:40]  # the 40 largest predicted effects
    actual = []
    for index in removed:
        keep = np.arange(len(x)) != index
        actual.append(test_loss(_newton_logistic(x[keep], y[keep], 0.01, theta, iterations=8)) - test_loss(theta))
    assert pearson(predicted[removed], actual) >= 0.9
    assert np.mean(np.sign(predicted[removed]) == np.sign(actual)) >= 0.9


def test_bad_arguments_are_refused(logistic):
    calculator, train, test, *_ = logistic
    with pytest.raises(TypeError, match="InfluenceModel"):
        FirstOrderInfluenceCalculator(keras.Sequential(), train)
    with pytest.raises(ValueError, match="save_influence_vector_ds_path"):
        calculator.influence_matrix(test, train, influence_vector_in_cache=CACHE.DISK)
    with pytest.raises(TypeError, match="CACHE member"):
        calculator.influence_matrix(test, train, influence_vector_in_cache="disk")
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        calculator.self_influence(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"\.batch\("):
        calculator.self_influence(train.unbatch())
    with pytest.raises(ValueError, match="k"):
        calculator.most_influential(test, train, k=0)
    with pytest.raises(ValueError, match="Unknown inverse-HVP solver"):
        FirstOrderInfluenceCalculator(calculator.model, train, "newton")
    with pytest.raises(ValueError, match="set them on the instance"):
        FirstOrderInfluenceCalculator(calculator.model, train, ExactIHVP(calculator.model, train), damping=0.1)
    with pytest.raises(ValueError, match="n_samples_for_hessian"):
        FirstOrderInfluenceCalculator(calculator.model, train, n_samples_for_hessian=0)


def test_first_order_and_arnoldi_pass_the_shared_engine_checks(logistic):
    from engine_checks import check_calculator_invariants

    calculator, train, test, expected, *_ = logistic
    matrix = check_calculator_invariants(calculator, train, test, rtol=1e-10, extended=False)
    np.testing.assert_allclose(matrix, expected, rtol=1e-10)
    arnoldi = ArnoldiInfluenceCalculator(calculator.model, calculator.train_dataset, 5, True, 3)
    check_calculator_invariants(arnoldi, train, test, rtol=1e-10, extended=False)


def test_iterative_solvers_get_the_training_gradients_in_one_block_and_values_back_per_batch():
    """CG is handed every training gradient at once (one solve, not one per batch); values stay per batch, in order.
    A direct solver gets blocks of batches that end at the disk cache's shards."""
    influence_model, x, y, _, _ = logistic_problem(num_examples=60)
    train = dataset(x, y, batch_size=11)  # 6 batches, the last one partial
    exact = FirstOrderInfluenceCalculator(influence_model, train, "exact")
    cg = FirstOrderInfluenceCalculator(influence_model, train, "cg", ihvp_options={"tolerance": 1e-12})
    calls = []
    solve = cg.ihvp.solve
    cg.ihvp.solve = lambda vectors: calls.append(int(vectors.shape[0])) or solve(vectors)
    np.testing.assert_allclose(cg.self_influence(train), exact.self_influence(train), rtol=1e-9)
    assert calls == [60]
    sizes = [int(values.shape[0]) for _, values in cg.compute_influence_values(train)]
    assert sizes == [11, 11, 11, 11, 11, 5]
    calls.clear()
    test = dataset(x[:20], y[:20], batch_size=7)
    np.testing.assert_allclose(cg.compute_influence_factors(test), exact.compute_influence_factors(test), rtol=1e-8)
    assert calls == [20]
    indices, values = cg.most_influential(test, train, k=3)
    exact_indices, exact_values = exact.most_influential(test, train, k=3)
    np.testing.assert_array_equal(indices, exact_indices)
    np.testing.assert_allclose(values, exact_values, rtol=1e-8)
    # a direct solver gets blocks too, which end at the disk cache's shards (cached vectors equal fresh ones)
    sharded = FirstOrderInfluenceCalculator(influence_model, train, "exact", batches_per_shard=2)
    calls.clear()
    solve_exact = sharded.ihvp.solve
    sharded.ihvp.solve = lambda vectors: calls.append(int(vectors.shape[0])) or solve_exact(vectors)
    np.testing.assert_allclose(sharded.self_influence(train), exact.self_influence(train), rtol=1e-12)
    assert calls == [22, 22, 16] and cg._blocks_cross_shards() and not sharded._blocks_cross_shards()
