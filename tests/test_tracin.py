"""TracIn and its variants: closed forms from per-sample gradients in float64, checkpoint loading, the last-layer
identity, the unbiased random projection, the shared engine invariants and input errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from engine_checks import check_calculator_invariants
from helpers import classification_data, dataset, sparse_ce

from influenciae import CACHE, InfluenceModel
from influenciae.influence.tracin import TracIn, TracInCP, TracInCPFast, TracInCPFastRandProj

FLOAT = "float64"
RATES = [0.5, 2.0]
NUM_TRAIN = 16


def mlp(seed: int, activation: str | None = None, classes: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,), dtype=FLOAT),
            keras.layers.Dense(6, activation="tanh", dtype=FLOAT),
            keras.layers.Dense(classes, activation=activation, dtype=FLOAT),
        ]
    )


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(num_examples=24, num_features=4, classes=3)
    models = [mlp(0), mlp(1)]
    train = dataset(x[:NUM_TRAIN], y[:NUM_TRAIN], batch_size=5)  # partial last batch
    test = dataset(x[NUM_TRAIN:], y[NUM_TRAIN:], batch_size=3)
    # InfluenceModels shared by the calculators of this module, so that each traces its gradient function once
    wrapped = [InfluenceModel(model, loss_function=sparse_ce()) for model in models]
    last_layer = [InfluenceModel(model, start_layer=-1, last_layer=-1, loss_function=sparse_ce()) for model in models]
    grads = [model.batch_jacobian_tensor((x, y)).numpy() for model in wrapped]
    expected = sum(rate * g[NUM_TRAIN:] @ g[:NUM_TRAIN].T for rate, g in zip(RATES, grads, strict=True))
    expected_self = sum(rate * np.sum(g[:NUM_TRAIN] ** 2, axis=1) for rate, g in zip(RATES, grads, strict=True))
    return {
        "x": x,
        "y": y,
        "models": models,
        "wrapped": wrapped,
        "last_layer": last_layer,
        "train": train,
        "test": test,
        "grads": grads,
        "expected": expected,
        "expected_self": expected_self,
    }


@pytest.fixture(scope="module")
def saved(problem, tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoints")
    paths = {"keras": [], "weights": []}
    for index, model in enumerate(problem["models"]):
        paths["keras"].append(str(directory / f"epoch_{index}.keras"))
        paths["weights"].append(str(directory / f"epoch_{index}.weights.h5"))
        model.save(paths["keras"][-1])
        model.save_weights(paths["weights"][-1])
    return paths


# ---------------------------------------------------------------------- TracIn closed forms


def test_one_checkpoint_with_unit_rate_is_the_gradient_dot_product(problem):
    tracin = TracIn(problem["wrapped"][:1], 1.0)
    g = problem["grads"][0]
    np.testing.assert_allclose(
        tracin.influence_matrix(problem["test"], problem["train"]), g[NUM_TRAIN:] @ g[:NUM_TRAIN].T, rtol=1e-12
    )
    np.testing.assert_allclose(tracin.self_influence(problem["train"]), np.sum(g[:NUM_TRAIN] ** 2, axis=1), rtol=1e-12)


def test_checkpoints_sum_with_their_learning_rates(problem):
    tracin = TracIn(problem["wrapped"], RATES)
    matrix = tracin.influence_matrix(problem["test"], problem["train"])
    np.testing.assert_allclose(matrix, problem["expected"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(tracin.self_influence(problem["train"]), problem["expected_self"], rtol=1e-12)
    assert np.all(problem["expected_self"] > 0)
    # one float is the rate of every checkpoint; the influence vector is [η_c ∇ℓ_c(z)]_c
    shared = TracIn(problem["wrapped"], 0.3)
    unit = sum(g[NUM_TRAIN:] @ g[:NUM_TRAIN].T for g in problem["grads"])
    np.testing.assert_allclose(shared.influence_matrix(problem["test"], problem["train"]), 0.3 * unit, rtol=1e-12)
    (_, vectors), *_ = shared.compute_influence_vector(problem["train"])
    grads = problem["grads"]
    np.testing.assert_allclose(vectors.numpy(), 0.3 * np.hstack([grads[0][:5], grads[1][:5]]), rtol=1e-12)


# ---------------------------------------------------------------------- TracInCP: checkpoints on disk


def test_tracin_cp_from_keras_files_equals_tracin_loading_once_per_pass(problem, saved):
    tracin = TracInCP(saved["keras"], RATES, loss_function=sparse_ce())
    assert tracin.checkpoint_loads == 1  # checkpoint 0 builds the model
    np.testing.assert_allclose(
        tracin.influence_matrix(problem["test"], problem["train"]), problem["expected"], rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(tracin.self_influence(problem["train"]), problem["expected_self"], rtol=1e-12)
    # three passes (training vectors, test transforms, self-influence) over 4 + 3 + 4 batches, checkpoint by
    # checkpoint: one load per pass and checkpoint other than the one already loaded, never one per batch
    assert tracin.checkpoint_loads == 1 + 3 * (2 - 1)


def test_tracin_cp_top_k_loads_checkpoints_per_pass_not_per_test_batch(problem, saved):
    tracin = TracInCP(saved["keras"], RATES, loss_function=sparse_ce())
    loads = tracin.checkpoint_loads
    rows = list(tracin.top_k(problem["test"], problem["train"], k=3))
    assert len(rows) == 3  # three test batches
    # one pass for the training vectors and one for the test transforms of all three test batches: one load per
    # pass (the other checkpoint), where loading per test batch would make 1 + 3
    assert tracin.checkpoint_loads - loads == 2
    indices = np.concatenate([row[2].numpy() for row in rows])
    values = np.concatenate([row[1].numpy() for row in rows])
    expected = np.argsort(-problem["expected"], axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(values, np.take_along_axis(problem["expected"], expected, axis=1), rtol=1e-12)


def test_tracin_cp_from_weights_files_and_callables_equals_tracin(problem, saved):
    kept = TracInCP(
        saved["weights"], RATES, model_factory=lambda: mlp(seed=123), loss_function=sparse_ce(), keep_in_memory=True
    )
    for _ in range(2):
        np.testing.assert_allclose(
            kept.influence_matrix(problem["test"], problem["train"]), problem["expected"], rtol=1e-12, atol=1e-14
        )
    assert kept.checkpoint_loads == 2  # each file read once, whatever the number of batches and passes
    models = problem["models"]
    before = [weight.copy() for weight in models[0].get_weights()]
    callables = TracInCP([lambda: models[0], lambda: models[1]], RATES, loss_function=sparse_ce())
    np.testing.assert_allclose(callables.self_influence(problem["train"]), problem["expected_self"], rtol=1e-12)
    for old, new in zip(before, models[0].get_weights(), strict=True):  # the user's model is never overwritten
        np.testing.assert_array_equal(old, new)


def test_tracin_cp_disk_cache_loads_once_per_shard_and_is_keyed_by_the_rates(problem, saved, tmp_path):
    path = str(tmp_path / "vectors")
    tracin = TracInCP(saved["keras"], RATES, loss_function=sparse_ce(), batches_per_shard=2)
    loads = tracin.checkpoint_loads
    matrix = tracin.influence_matrix(
        problem["test"], problem["train"], influence_vector_in_cache=CACHE.DISK, save_influence_vector_ds_path=path
    )
    np.testing.assert_allclose(matrix, problem["expected"], rtol=1e-12, atol=1e-14)
    # 2 shards of 2 batches: each checkpoint once per shard (the loaded one first: 1 + 1 loads), then the test
    # transforms (1 load); never one per batch
    assert tracin.checkpoint_loads - loads == 3
    other_rates = TracInCP(saved["keras"], [1.0, 1.0], loss_function=sparse_ce())
    with pytest.raises(ValueError):
        other_rates.influence_matrix(
            problem["test"], problem["train"], influence_vector_in_cache=CACHE.DISK, save_influence_vector_ds_path=path
        )


# ---------------------------------------------------------------------- TracInCPFast: the last Dense layer


def binary_problem():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 4))
    y = (rng.random((24, 1)) > 0.5).astype(FLOAT)
    return x, y


LAST_LAYER_CASES = {
    "softmax": ("softmax", 3, lambda: keras.losses.SparseCategoricalCrossentropy(reduction="none")),
    "sigmoid": ("sigmoid", 1, lambda: keras.losses.BinaryCrossentropy(reduction="none")),
}


def test_fast_equals_tracin_on_the_last_dense_layer(problem):
    """Logits, then activations fused into the last Dense layer (g is taken at the pre-activation)."""
    weights = np.linspace(0.5, 1.5, 24)  # sample weights scale g, as they scale the per-sample gradients
    cases = {"logits": (problem["x"], problem["y"], problem["last_layer"], 3)}
    for case, (activation, classes, loss) in LAST_LAYER_CASES.items():
        x, y = binary_problem() if classes == 1 else (problem["x"], problem["y"])
        models = [mlp(4, activation, classes), mlp(5, activation, classes)]
        last_layer = [InfluenceModel(m, start_layer=-1, last_layer=-1, loss_function=loss()) for m in models]
        cases[case] = (x, y, last_layer, classes)
    for case, (x, y, models, classes) in cases.items():
        # batches of 8 everywhere: one trace per model (the partial batches are the invariants test's business)
        train = dataset(x[:NUM_TRAIN], y[:NUM_TRAIN], batch_size=8, sample_weight=weights[:NUM_TRAIN])
        test = dataset(x[NUM_TRAIN:], y[NUM_TRAIN:], batch_size=8, sample_weight=weights[NUM_TRAIN:])
        last = [  # ∇(w ℓ) of the last Dense layer's kernel and bias
            np.concatenate([model.batch_jacobian_tensor(batch).numpy() for batch in train.concatenate(test)])
            for model in models
        ]
        expected = sum(r * g[NUM_TRAIN:] @ g[:NUM_TRAIN].T for r, g in zip(RATES, last, strict=True))
        expected_self = sum(r * np.sum(g[:NUM_TRAIN] ** 2, axis=1) for r, g in zip(RATES, last, strict=True))
        tracin = TracIn(models, RATES)
        np.testing.assert_allclose(tracin.influence_matrix(test, train), expected, rtol=1e-12, atol=1e-14)
        fast = TracInCPFast(models, RATES)
        np.testing.assert_allclose(fast.influence_matrix(test, train), expected, rtol=1e-9, atol=1e-12, err_msg=case)
        np.testing.assert_allclose(fast.self_influence(train), expected_self, rtol=1e-9, err_msg=case)
        # compact vectors: [ã_c, η_c g_c] per checkpoint, d + 1 + K numbers instead of (d + 1) K
        (_, vectors), *_ = fast.compute_influence_vector(train)
        assert vectors.shape[1] == 2 * (6 + 1 + classes)


def test_fast_from_files_equals_fast_in_memory(problem, saved):
    in_memory = TracInCPFast(problem["last_layer"], RATES)
    from_files = TracInCPFast(saved["weights"], RATES, model_factory=lambda: mlp(7), loss_function=sparse_ce())
    np.testing.assert_allclose(
        from_files.influence_matrix(problem["test"], problem["train"]),
        in_memory.influence_matrix(problem["test"], problem["train"]),
        rtol=1e-12,
    )


# ---------------------------------------------------------------------- TracInCPFastRandProj


def test_random_projection_is_unbiased_and_concentrates(problem):
    x, y = problem["x"], problem["y"]
    models = problem["last_layer"]  # reused by every calculator below, and so is their traced function
    test_batch, train_batch = (x[NUM_TRAIN:], y[NUM_TRAIN:]), (x[:NUM_TRAIN], y[:NUM_TRAIN])
    exact = TracInCPFast(models, RATES).influence_matrix(problem["test"], problem["train"])

    def estimate(dim: int, seed: int) -> np.ndarray:
        sketch = TracInCPFastRandProj(models, RATES, projection_dim=dim, seed=seed)
        # the engine scores are these dot products (the invariants test checks the engine against them)
        return (sketch._transforms(test_batch) @ tf.transpose(sketch._influence_vectors(train_batch))).numpy()

    def relative(error: np.ndarray) -> float:
        return float(np.linalg.norm(error) / np.linalg.norm(exact))

    single_error = {}
    for dim in (4, 16, 64):
        single_error[dim] = np.mean([relative(estimate(dim, seed) - exact) for seed in range(20)])
    assert single_error[4] > single_error[16] > single_error[64]
    assert single_error[64] < 0.6 * single_error[4]  # ~1/√k: a factor 4 expected
    estimates = [estimate(4, seed) for seed in range(200)]
    mean_error = relative(np.mean(estimates, axis=0) - exact)
    # ≈ single_error / √200 for an unbiased estimator (one projection shared by the checkpoints, which is biased,
    # gives ≈ 0.3 single_error and ≈ 0.6 relative error here)
    assert mean_error < 0.2 * single_error[4] and mean_error < 0.2
    np.testing.assert_allclose(estimate(4, 11), estimate(4, 11))  # seeded
    assert not np.allclose(estimate(4, 11), estimate(4, 12))


# ---------------------------------------------------------------------- the shared engine


CALCULATORS = {
    "tracin": lambda p, s: TracIn(p["wrapped"], RATES),
    "tracin_cp_one_at_a_time": lambda p, s: TracInCP(s["keras"], RATES, loss_function=sparse_ce(), batches_per_load=2),
    "tracin_cp_fast": lambda p, s: TracInCPFast(p["last_layer"], RATES),
    "tracin_cp_fast_rand_proj": lambda p, s: TracInCPFastRandProj(p["last_layer"], RATES, projection_dim=8, seed=1),
}


@pytest.mark.parametrize("name", list(CALCULATORS))
def test_every_calculator_passes_the_engine_invariants(problem, saved, name):
    calculator = CALCULATORS[name](problem, saved)
    matrix = check_calculator_invariants(calculator, problem["train"], problem["test"], rtol=1e-9)
    if name in ("tracin", "tracin_cp_one_at_a_time"):
        np.testing.assert_allclose(matrix, problem["expected"], rtol=1e-12, atol=1e-14)


def test_neighbour_indices_apply_to_the_projection_only(problem):
    sketch = TracInCPFastRandProj(problem["last_layer"], RATES, projection_dim=8)
    matrix = sketch.influence_matrix(problem["test"], problem["train"])
    indices, _ = sketch.most_influential(problem["test"], problem["train"], k=3, nearest_neighbors="streaming")
    np.testing.assert_array_equal(indices, np.argsort(-matrix, axis=1, kind="stable")[:, :3])
    fast = TracInCPFast(problem["last_layer"], RATES)
    with pytest.raises(ValueError, match="neighbour strategies"):
        fast.most_influential(problem["test"], problem["train"], k=3, nearest_neighbors="linear")


# ---------------------------------------------------------------------- input errors


def test_clear_errors(problem, saved):
    models = problem["models"]
    for make in (
        lambda rates: TracIn(models, rates, loss_function=sparse_ce()),
        lambda rates: TracInCP(saved["keras"], rates, loss_function=sparse_ce()),
        lambda rates: TracInCPFast(models, rates, loss_function=sparse_ce()),
        lambda rates: TracInCPFastRandProj(models, rates, projection_dim=4, loss_function=sparse_ce()),
    ):
        with pytest.raises(ValueError, match="learning_rates has 3 values for 2 checkpoints"):
            make([0.1, 0.2, 0.3])
        with pytest.raises(ValueError, match="positive"):
            make([0.1, -0.2])
    for make_empty in (
        lambda: TracIn([], 0.1),
        lambda: TracInCP([], 0.1),
        lambda: TracInCPFast([], 0.1),
        lambda: TracInCPFastRandProj([], 0.1, projection_dim=4),
    ):
        with pytest.raises(ValueError, match="at least one checkpoint"):
            make_empty()
    softmax_layer = keras.Sequential(
        [keras.Input((4,), dtype=FLOAT), keras.layers.Dense(3, dtype=FLOAT), keras.layers.Softmax(dtype=FLOAT)]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(reduction="none")
    for fast_class, options in ((TracInCPFast, {}), (TracInCPFastRandProj, {"projection_dim": 4})):
        with pytest.raises(ValueError, match="is not Dense"):
            fast_class([softmax_layer], 0.1, loss_function=loss, **options)
    with pytest.raises(ValueError, match="model_factory"):
        TracInCP(saved["weights"], 0.1, loss_function=sparse_ce())
    with pytest.raises(TypeError, match="TracInCP"):
        TracIn(saved["keras"], 0.1)
    with pytest.raises(ValueError, match="projection_dim"):
        TracInCPFastRandProj(models, 0.1, projection_dim=0)
    with pytest.raises(ValueError, match="does not fit the model"):
        TracInCP(
            [saved["keras"][0], saved["keras"][1]],
            0.1,
            model_factory=lambda: mlp(0, classes=2),
            loss_function=sparse_ce(),
        )
