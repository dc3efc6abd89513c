"""Robustness wing: FGSM/PGD equal hand-written numpy attacks on linear models (float64), minimal perturbations hit
the analytic flip points of a linear classifier, the comparator's numbers equal hand counts, bad input is refused."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import dataset

from influenciae import InfluenceModel
from influenciae.influence.boundary import SampleBoundaryCalculator
from influenciae.robustness import FGSM, PGD, AttackComparator, MinParamPerturbation

FLOAT = "float64"


def softmax_regression(classes: int = 3, num_features: int = 5, num_examples: int = 8, seed: int = 0, activation=None):
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [keras.Input((num_features,), dtype=FLOAT), keras.layers.Dense(classes, activation=activation, dtype=FLOAT)]
    )
    model.layers[0].kernel.assign(rng.standard_normal((num_features, classes)))
    model.layers[0].bias.assign(rng.standard_normal(classes))
    x = rng.standard_normal((num_examples, num_features))
    y = rng.integers(0, classes, num_examples)
    return model, x, y


def softmax_gradient(model, x, labels):
    """∇_x of the cross-entropy of a softmax regression: (p - e_y) Wᵀ, by hand."""
    kernel, bias = model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()
    logits = x @ kernel + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return (probabilities - np.eye(kernel.shape[1])[labels]) @ kernel.T


def numpy_pgd(model, x, labels, epsilon, step_size, num_steps, norm, sign=1.0, bounds=(-np.inf, np.inf)):
    """Projected gradient ascent on the softmax-regression loss, written out in numpy; returns every iterate."""
    epsilon = np.broadcast_to(np.asarray(epsilon, float), (len(x),))[:, None]
    current, iterates = x.copy(), []
    for _ in range(num_steps):
        gradient = softmax_gradient(model, current, labels)
        length = np.linalg.norm(gradient, axis=1, keepdims=True)
        direction = np.sign(gradient) if norm == "linf" else gradient / length
        offset = current + sign * step_size * direction - x
        if norm == "linf":
            offset = np.clip(offset, -epsilon, epsilon)
        else:
            offset *= np.minimum(1.0, epsilon / np.linalg.norm(offset, axis=1, keepdims=True))
        current = np.clip(x + offset, *bounds)
        iterates.append(current)
    return iterates


# ---------------------------------------------------------------------- FGSM


@pytest.mark.parametrize("activation", [None, "softmax"])
def test_fgsm_equals_the_analytic_sign_step_on_softmax_regression(activation):
    model, x, y = softmax_regression(activation=activation)
    expected = x + 0.1 * np.sign(softmax_gradient(model, x, y))
    np.testing.assert_allclose(FGSM(model).perturb(x, y, 0.1).numpy(), expected, rtol=0, atol=1e-12)


def test_fgsm_targeted_descends_the_loss_of_the_target():
    model, x, y = softmax_regression(seed=1)
    target = (y + 1) % 3
    targeted = FGSM(model).perturb(x, target, 0.2, targeted=True).numpy()
    np.testing.assert_allclose(targeted, x - 0.2 * np.sign(softmax_gradient(model, x, target)), atol=1e-12)
    untargeted = FGSM(model).perturb(x, target, 0.2).numpy()
    np.testing.assert_allclose(untargeted - x, x - targeted, atol=1e-12)  # opposite signs, same size
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    assert np.all(loss(target, model(targeted)).numpy() < loss(target, model(x)).numpy())
    assert np.all(loss(target, model(untargeted)).numpy() > loss(target, model(x)).numpy())


def test_fgsm_on_binary_logistic_regression():
    """One logit s = w·x + b: ∇_x ℓ = (σ(s) - y) w, so x' = x + ε sign((σ(s) - y) w)."""
    rng = np.random.default_rng(3)
    model = keras.Sequential([keras.Input((4,), dtype=FLOAT), keras.layers.Dense(1, dtype=FLOAT)])
    w, b = rng.standard_normal(4), 0.3
    model.layers[0].kernel.assign(w[:, None])
    model.layers[0].bias.assign([b])
    x, y = rng.standard_normal((7, 4)), rng.integers(0, 2, 7)
    residual = 1 / (1 + np.exp(-(x @ w + b))) - y
    expected = x + 0.05 * np.sign(residual[:, None] * w)
    np.testing.assert_allclose(FGSM(model).perturb(x, y, 0.05).numpy(), expected, atol=1e-12)


def test_per_example_epsilon_bounds_and_mask():
    model, x, y = softmax_regression(seed=2)
    epsilon = np.linspace(0.0, 0.7, len(x))
    steps = np.sign(softmax_gradient(model, x, y))
    np.testing.assert_allclose(FGSM(model).perturb(x, y, epsilon).numpy(), x + epsilon[:, None] * steps, atol=1e-12)
    clipped = FGSM(model, lower_bound=-0.5, upper_bound=0.5).perturb(x, y, 0.3).numpy()
    np.testing.assert_allclose(clipped, np.clip(x + 0.3 * steps, -0.5, 0.5), atol=1e-12)
    lower = np.array([-1.0, -0.2, -3.0, 0.0, -0.1])  # per-feature bounds broadcast over the batch
    clipped = FGSM(model, lower_bound=lower, upper_bound=lower + 1.0).perturb(x, y, 0.3).numpy()
    np.testing.assert_allclose(clipped, np.clip(x + 0.3 * steps, lower, lower + 1.0), atol=1e-12)
    mask = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    masked = FGSM(model).perturb(x, y, 0.3, mask=mask).numpy()
    np.testing.assert_allclose(masked, x + 0.3 * steps * mask, atol=1e-12)


def test_attacks_accept_an_influence_model_and_a_compiled_loss():
    model, x, y = softmax_regression(seed=4)
    expected = x + 0.1 * np.sign(softmax_gradient(model, x, y))
    wrapped = InfluenceModel(
        model, loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    )
    np.testing.assert_allclose(FGSM(wrapped).perturb(x, y, 0.1).numpy(), expected, atol=1e-12)
    model.compile(loss="mse")  # the compiled loss wins over the inferred cross-entropy: MSE on one-hot targets
    one_hot = np.eye(3)[y]
    mse_gradient = 2 * (model(x).numpy() - one_hot) @ model.layers[0].kernel.numpy().T
    np.testing.assert_allclose(FGSM(model).perturb(x, one_hot, 0.1).numpy(), x + 0.1 * np.sign(mse_gradient))


def test_dataset_in_dataset_out_with_the_same_batches():
    model, x, y = softmax_regression(num_examples=11, seed=5)
    weights = np.arange(11.0)
    epsilon = np.linspace(0.1, 0.5, 11)
    train = dataset(x, y, batch_size=4, sample_weight=weights)
    perturbed = FGSM(model).perturb(train, None, epsilon, show_progress=True)
    batches = list(perturbed)
    assert [len(batch[0]) for batch in batches] == [4, 4, 3]
    np.testing.assert_allclose(np.concatenate([b[0] for b in batches]), FGSM(model).perturb(x, y, epsilon).numpy())
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), weights)
    again = np.concatenate([b[0] for b in perturbed])  # computed once: iterating again gives the same values
    np.testing.assert_array_equal(again, np.concatenate([b[0] for b in batches]))


# ---------------------------------------------------------------------- PGD


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_matches_a_numpy_projected_gradient_loop_and_stays_in_the_ball(norm, targeted):
    model, x, y = softmax_regression(seed=6)
    epsilon = np.linspace(0.2, 0.9, len(x))
    iterates = numpy_pgd(model, x, y, epsilon, 0.15, 6, norm, sign=-1.0 if targeted else 1.0)
    pgd = PGD(model)
    for steps, expected in enumerate(iterates, start=1):
        result = pgd.perturb(x, y, epsilon, 0.15, steps, norm=norm, targeted=targeted).numpy()
        np.testing.assert_allclose(result, expected, atol=1e-10)
        distance = np.abs(result - x).max(axis=1) if norm == "linf" else np.linalg.norm(result - x, axis=1)
        assert np.all(distance <= epsilon + 1e-12)
    assert np.any(distance > epsilon - 1e-9)  # the ball is reached, so the projection did something


def test_pgd_with_bounds_progress_and_a_dataset():
    model, x, y = softmax_regression(seed=7, num_examples=9)
    expected = numpy_pgd(model, x, y, 0.4, 0.1, 5, "l2", bounds=(-0.6, 0.8))[-1]
    pgd = PGD(model, lower_bound=-0.6, upper_bound=0.8)
    np.testing.assert_allclose(pgd.perturb(x, y, 0.4, 0.1, 5, norm="L2").numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(pgd.perturb(x, y, 0.4, 0.1, 5, norm="l2", show_progress=True).numpy(), expected)
    batches = pgd.perturb(dataset(x, y, batch_size=4), None, 0.4, 0.1, 5, norm="l2", show_progress=True)
    np.testing.assert_allclose(np.concatenate([b[0] for b in batches]), expected, atol=1e-10)


def test_pgd_single_step_equals_fgsm_and_random_start_is_seeded_and_in_the_ball():
    model, x, y = softmax_regression(seed=8)
    np.testing.assert_allclose(PGD(model).perturb(x, y, 0.3, 0.3, 1).numpy(), FGSM(model).perturb(x, y, 0.3).numpy())
    pgd = PGD(model, lower_bound=-1.5, upper_bound=1.5)
    x = np.clip(x, -1.5, 1.5)  # clean inputs within bounds: clipping then keeps the iterates in the ball
    for norm in ("linf", "l2"):
        first = pgd.perturb(x, y, 0.25, 0.05, 3, norm=norm, random_start=True, seed=3).numpy()
        second = pgd.perturb(x, y, 0.25, 0.05, 3, norm=norm, random_start=True, seed=3).numpy()
        other = pgd.perturb(x, y, 0.25, 0.05, 3, norm=norm, random_start=True, seed=4).numpy()
        np.testing.assert_array_equal(first, second)
        assert not np.allclose(first, other)
        distance = np.abs(first - x).max(axis=1) if norm == "linf" else np.linalg.norm(first - x, axis=1)
        assert np.all(distance <= 0.25 + 1e-12) and np.all(np.abs(first) <= 1.5)


def test_default_step_size_is_madry_rule():
    model, x, y = softmax_regression(seed=9)
    expected = numpy_pgd(model, x, y, 0.2, 2.5 * 0.2 / 4, 4, "linf")[-1]
    np.testing.assert_allclose(PGD(model).perturb(x, y, 0.2, num_steps=4).numpy(), expected, atol=1e-12)


# ---------------------------------------------------------------------- bad input


def test_attacks_refuse_bad_input():
    model, x, y = softmax_regression()
    with pytest.raises(ValueError, match="epsilon must be ≥ 0"):
        FGSM(model).perturb(x, y, -0.1)
    with pytest.raises(ValueError, match="norm must be 'linf' or 'l2'"):
        PGD(model).perturb(x, y, 0.1, 0.01, 3, norm="l3")
    with pytest.raises(ValueError, match="inverted"):
        FGSM(model, lower_bound=1.0, upper_bound=0.0)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        PGD(model).perturb(x, y, 0.1, 0.01, 0)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        PGD(model).perturb(x, y, 0.1, 0.0, 3)
    with pytest.raises(ValueError, match="3 values but the inputs have 8"):
        FGSM(model).perturb(x, y, [0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="floating point"):
        FGSM(model).perturb(np.zeros((2, 5), "int32"), y[:2], 0.1)
    with pytest.raises(ValueError, match="pass targets=None"):
        FGSM(model).perturb(dataset(x, y), y, 0.1)
    relu = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="relu")])
    with pytest.raises(ValueError, match="none could be inferred"):
        FGSM(relu)
    with pytest.raises(ValueError, match="none could be inferred"):
        PGD(lambda inputs: tf.reduce_sum(inputs, axis=1, keepdims=True))


# ---------------------------------------------------------------------- minimal perturbations


def binary_logit_model(num_examples: int = 10, seed: int = 11):
    """s = w·x + b with one output column (a logit); class 1 iff s > 0."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((4,), dtype=FLOAT), keras.layers.Dense(1, dtype=FLOAT)])
    w, b = rng.standard_normal(4), 0.2
    model.layers[0].kernel.assign(w[:, None])
    model.layers[0].bias.assign([b])
    x = 0.5 * rng.standard_normal((num_examples, 4))
    return model, x, w, x @ w + b


def shift_towards_boundary(w):
    """x - p · sign(s) w / ‖w‖₂: the L2-shortest move towards the boundary, by hand."""
    unit = w / np.linalg.norm(w)

    def shift(inputs, p):
        logits = inputs.numpy() @ w
        return inputs - p * np.sign(logits)[:, None] * unit

    return shift


@pytest.mark.parametrize("mode", ["linear", "binary"])
def test_min_param_finds_the_analytic_flip_point_of_fgsm_and_pgd_l2(mode):
    model, x, w, logits = binary_logit_model(num_examples=6)
    step = 0.005
    cases = [
        (FGSM(model), {}, np.abs(logits) / np.abs(w).sum()),  # L∞: |w·x+b| / ‖w‖₁
        (PGD(model), {"num_steps": 1, "norm": "l2"}, np.abs(logits) / np.linalg.norm(w)),  # L2: / ‖w‖₂
    ]
    for attack, kwargs, analytic in cases:
        search = MinParamPerturbation(model, attack, 0.0, 0.6, step, mode=mode, attack_kwargs=kwargs)
        result = search.evaluate(x)  # targets None: "the prediction changes"
        assert result.found.all()
        assert np.all(result.values >= analytic - 1e-12) and np.all(result.values < analytic + step + 1e-12)
        flipped = model(result.perturbed_inputs).numpy()[:, 0] > 0
        np.testing.assert_array_equal(flipped, logits <= 0)


@pytest.mark.slow
def test_linear_and_binary_agree_on_a_plain_function_and_report_inf_out_of_range():
    model, x, w, logits = binary_logit_model(num_examples=12, seed=12)
    analytic = np.abs(logits) / np.linalg.norm(w)
    arg_max = float(np.median(analytic))
    results = {}
    for mode in ("linear", "binary"):
        search = MinParamPerturbation(model, shift_towards_boundary(w), 0.0, arg_max, 0.001, mode=mode)
        results[mode] = search.evaluate(x, (logits > 0).astype("int64"), show_progress=True)
    np.testing.assert_array_equal(results["linear"].values, results["binary"].values)
    reachable = analytic <= arg_max - 0.001
    assert np.all(results["binary"].found[reachable]) and not np.any(results["binary"].found[analytic > arg_max])
    assert np.all(np.isinf(results["binary"].values[analytic > arg_max]))
    np.testing.assert_array_equal(
        results["binary"].perturbed_inputs[~reachable & (analytic > arg_max)], x[analytic > arg_max]
    )
    values = results["binary"].values[reachable]
    assert np.all(values >= analytic[reachable]) and np.all(values < analytic[reachable] + 0.001 + 1e-12)


@pytest.mark.slow
def test_min_param_on_a_dataset_with_a_metric_threshold_and_attempts():
    model, x, w, logits = binary_logit_model(num_examples=9, seed=13)
    threshold = np.log(0.7 / 0.3)  # probability of the predicted class ≥ 0.7  ⇔  |s| ≥ logit(0.7)

    def confident(outputs, labels):
        signed = outputs[:, 0] * (2 * tf.cast(labels, outputs.dtype) - 1)
        return signed >= threshold

    labels = (logits > 0).astype("int64")
    search = MinParamPerturbation(model, FGSM(model), 0.0, 2.0, 0.001, mode="binary", correct_fn=confident)
    result = search.evaluate(dataset(x, labels, batch_size=4), show_progress=True)
    analytic = np.maximum(np.abs(logits) - threshold, 0) / np.abs(w).sum()
    assert np.all(result.values >= analytic - 1e-12) and np.all(result.values < analytic + 0.001 + 1e-12)
    assert np.all(result.values[np.abs(logits) < threshold] == 0.0)  # not confident to begin with: arg_min

    calls = []

    def second_attempt_only(inputs, p):  # a "random" perturbation that moves on the second draw of each value only
        calls.append(p)
        return shift_towards_boundary(w)(inputs, p) if calls.count(p) % 2 == 0 else inputs

    single = MinParamPerturbation(model, second_attempt_only, 0.0, 1.0, 0.01).evaluate(x, labels)
    assert not single.found.any()  # one draw per value never moves
    calls.clear()
    double = MinParamPerturbation(model, second_attempt_only, 0.0, 1.0, 0.01, num_attempts=2).evaluate(x, labels)
    expected = np.abs(logits) / np.linalg.norm(w)
    assert double.found.all() and np.all(double.values >= expected) and np.all(double.values < expected + 0.01)


def test_min_param_refuses_bad_arguments():
    model, _, _, _ = binary_logit_model()
    with pytest.raises(ValueError, match="mode must be 'linear' or 'binary'"):
        MinParamPerturbation(model, FGSM(model), 0.0, 1.0, mode="ternary")
    with pytest.raises(ValueError, match="must be larger than arg_min"):
        MinParamPerturbation(model, FGSM(model), 1.0, 0.5)
    with pytest.raises(ValueError, match="arg_step must be a positive number"):
        MinParamPerturbation(model, FGSM(model), 0.0, 1.0, -0.1)
    with pytest.raises(ValueError, match="num_attempts"):
        MinParamPerturbation(model, FGSM(model), 0.0, 1.0, num_attempts=0)
    with pytest.raises(TypeError, match="perturb must be"):
        MinParamPerturbation(model, 3.0, 0.0, 1.0)


# ---------------------------------------------------------------------- comparator


def test_comparator_accuracy_loss_and_flips_equal_hand_counts():
    model, x, y = softmax_regression(num_examples=10, seed=14)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    fgsm_inputs = FGSM(model).perturb(x, y, 0.3).numpy()
    noise = np.random.default_rng(0).standard_normal((3, *x.shape))
    draws = iter(noise)

    comparator = AttackComparator(model)
    comparator.add_attack(FGSM(model), "FGSM 0.3", attack_kwargs={"epsilon": 0.3})
    comparator.add_attack(lambda inputs: inputs + next(draws), "noise", num_attempts=3)
    comparator.add_attack(lambda inputs, scale: inputs * scale, "scale", attack_kwargs={"scale": -1.0})
    results = comparator.evaluate(x, y, show_progress=True)

    clean = model(x).numpy().argmax(axis=1)
    assert list(results) == ["Original", "FGSM 0.3", "noise", "scale"]
    assert results["Original"]["accuracy"]["mean"] == np.mean(clean == y)
    np.testing.assert_allclose(results["Original"]["loss"]["mean"], loss(y, model(x)).numpy().mean())
    attacked = model(fgsm_inputs).numpy().argmax(axis=1)
    assert results["FGSM 0.3"]["accuracy"]["mean"] == np.mean(attacked == y)
    assert results["FGSM 0.3"]["flip_rate"]["mean"] == np.mean(attacked != clean)
    np.testing.assert_allclose(results["FGSM 0.3"]["loss"]["mean"], loss(y, model(fgsm_inputs)).numpy().mean())
    noisy = np.stack([model(x + n).numpy().argmax(axis=1) for n in noise])  # [draws, examples]
    per_draw = (noisy == y).mean(axis=1)
    entry = results["noise"]["accuracy"]
    np.testing.assert_allclose(
        [entry["mean"], entry["min"], entry["max"]], [per_draw.mean(), per_draw.min(), per_draw.max()]
    )
    assert entry["worst"] == np.mean((noisy == y).all(axis=0))  # correct under every draw
    assert results["noise"]["flip_rate"]["worst"] == np.mean((noisy != clean).any(axis=0))
    assert results["scale"]["accuracy"]["mean"] == np.mean(model(-x).numpy().argmax(axis=1) == y)
    rows = comparator.summary()
    assert len(rows) == 4 * 3
    row = next(row for row in rows if row["perturbation"] == "noise" and row["metric"] == "accuracy")
    assert row["attempts"] == 3 and row["worst"] == entry["worst"] and row["mean"] == entry["mean"]


def test_comparator_on_a_dataset_with_a_custom_metric_and_preprocessing():
    model, x, y = softmax_regression(num_examples=11, seed=15)

    def margin(outputs, targets):
        chosen = tf.gather(outputs, tf.cast(targets, tf.int32), batch_dims=1)
        return {"margin": chosen - tf.reduce_max(outputs, axis=1)}

    comparator = AttackComparator(model, metric=margin, preproc_fn=lambda inputs: 2.0 * inputs)
    comparator.add_attack(lambda inputs: inputs + 0.5, "shift before")
    comparator.add_attack(lambda inputs: inputs + 0.5, "shift after", apply_before_preproc=False)
    results = comparator.evaluate(dataset(x, y, batch_size=4))

    def expected(inputs):
        outputs = model(inputs).numpy()
        return np.mean(outputs[np.arange(len(y)), y] - outputs.max(axis=1))

    np.testing.assert_allclose(results["Original"]["margin"]["mean"], expected(2 * x))
    np.testing.assert_allclose(results["shift before"]["margin"]["mean"], expected(2 * (x + 0.5)))
    np.testing.assert_allclose(results["shift after"]["margin"]["mean"], expected(2 * x + 0.5))
    assert "worst" not in results["Original"]["margin"]  # direction of a custom metric unknown
    with pytest.raises(ValueError, match="already registered"):
        comparator.add_attack(lambda inputs: inputs, "shift before")


# ---------------------------------------------------------------------- the boundary calculators


@pytest.mark.slow
def test_sample_boundary_with_attacks_equals_the_analytic_distances():
    model, x, w, logits = binary_logit_model(num_examples=8, seed=16)
    train = dataset(x, np.zeros(8), batch_size=8)
    deepfool = SampleBoundaryCalculator(model).distance_to_boundary(train)
    np.testing.assert_allclose(deepfool, np.abs(logits) / np.linalg.norm(w), rtol=1e-6)
    search = MinParamPerturbation(
        model, PGD(model), 0.0, 1.0, 1e-4, mode="binary", attack_kwargs={"num_steps": 1, "norm": "l2"}
    )
    with_search = SampleBoundaryCalculator(model, attack=search).distance_to_boundary(train)
    assert np.all(with_search >= deepfool - 1e-9) and np.all(with_search <= deepfool + 1e-4 + 1e-9)
    # FGSM moves every coordinate by ε: its L∞ distance is the minimal ε, |s| / ‖w‖₁ (up to the 1/1024 resolution)
    fgsm = SampleBoundaryCalculator(model, norm=np.inf, attack=FGSM(model)).distance_to_boundary(train)
    analytic = np.abs(logits) / np.abs(w).sum()
    assert np.all(fgsm >= analytic - 1e-9) and np.all(fgsm <= analytic + 1 / 1024 + 1e-9)
    never = SampleBoundaryCalculator(model, attack=lambda inputs, labels: inputs).distance_to_boundary(train)
    assert np.all(np.isinf(never))
    with pytest.raises(TypeError, match="attack must be None"):
        SampleBoundaryCalculator(model, attack=3)


def test_legacy_tf_keras_models():
    tf_keras = pytest.importorskip("tf_keras")
    rng = np.random.default_rng(17)
    model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(5,), dtype=FLOAT)])
    model.compile(loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # reduction "auto"
    x, y = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
    expected = x + 0.1 * np.sign(softmax_gradient(model, x, y))
    np.testing.assert_allclose(FGSM(model).perturb(x, y, 0.1).numpy(), expected, atol=1e-12)
    comparator = AttackComparator(model)
    comparator.add_attack(FGSM(model), "FGSM", attack_kwargs={"epsilon": 0.1})
    losses = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")(y, model(expected))
    results = comparator.evaluate(x, y)
    np.testing.assert_allclose(results["FGSM"]["loss"]["worst"], losses.numpy().mean())  # per-example, not reduced
