"""TCAV (influenciae.concepts): CAVs, scores, the significance test, the CAV store and concept influence.

The synthetic model's target logit is a known linear direction ``u`` of the layer ``"features"`` (an identity
Dense layer), so every directional derivative is ``u · cav`` exactly and the TCAV answer is known.
"""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import ExactL2
from scipy import optimize, stats

from influenciae import ExactIHVP, InfluenceModel
from influenciae.concepts import (
    TCAV,
    CAVClassifier,
    Concept,
    concept_influence,
    concept_sensitivity_gradient,
    random_concepts,
    tcav_scores,
    train_cav,
)

DIMENSION = 4
U = np.array([1.0, 2.0, 0.0, -1.0])
UNIT_U = U / np.linalg.norm(U)


def linear_direction_model(dtype: str = "float64") -> keras.Model:
    """x -> features = x (identity Dense) -> logits = [-u·f, u·f]: logit 1 grows along u, logit 0 along -u."""
    inputs = keras.Input((DIMENSION,), dtype=dtype, name="x")
    features = keras.layers.Dense(DIMENSION, use_bias=False, name="features", dtype=dtype)(inputs)
    hidden = keras.layers.Dense(3, activation="tanh", name="other", dtype=dtype)(features)
    logits = keras.layers.Dense(2, name="logits", dtype=dtype)(features)
    model = keras.Model(inputs, [logits + 0.0 * keras.ops.sum(hidden, axis=1, keepdims=True)])
    model.get_layer("features").set_weights([np.eye(DIMENSION)])
    model.get_layer("logits").set_weights([np.stack([-U, U], axis=1), np.zeros(2)])
    return model


@pytest.fixture(scope="module")
def setting():
    rng = np.random.default_rng(0)
    model = linear_direction_model()
    concept = Concept("along_u", rng.normal(size=(40, DIMENSION)) + 6.0 * UNIT_U)
    class_inputs = rng.normal(size=(25, DIMENSION))
    pool = np.random.default_rng(1).normal(size=(2000, DIMENSION))
    randoms = random_concepts(pool, 10, 20, seed=1)
    return model, concept, randoms, class_inputs


def test_cav_of_separable_concept_is_accurate_and_points_toward_it(setting):
    model, concept, randoms, _ = setting
    cav = TCAV(model, "features").cav([concept, randoms[0]])
    assert cav.accuracies == pytest.approx([1.0, 1.0])
    np.testing.assert_allclose(np.linalg.norm(cav.vectors, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(cav.vectors[1], -cav.vectors[0])
    # The concept is the random distribution shifted along u: the boundary normal is close to u.
    assert cav.vector @ UNIT_U > 0.9
    # It points toward the concept: the concept's mean activation is on its positive side.
    mean_gap = concept.activations(model, "features")["features"].mean(0) - randoms[0].activations(model, "features")[
        "features"
    ].mean(0)
    assert cav.vector @ mean_gap > 0


def test_directional_derivative_is_u_dot_cav(setting):
    model, concept, randoms, class_inputs = setting
    tcav = TCAV(model, ["features"])
    derivatives = tcav.directional_derivatives(class_inputs, 1, [concept, randoms[0]])
    cav = tcav.cav([concept, randoms[0]])
    assert derivatives.shape == (len(class_inputs), 2)
    np.testing.assert_allclose(derivatives[:, 0], U @ cav.vector, rtol=1e-12)
    np.testing.assert_allclose(derivatives[:, 1], -(U @ cav.vector), rtol=1e-12)
    # Target 0 is the logit along -u.
    np.testing.assert_allclose(tcav.directional_derivatives(class_inputs, 0, [concept, randoms[0]]), -derivatives)


def test_interpret_scores_concept_along_u_one(setting):
    model, concept, randoms, class_inputs = setting
    scores = TCAV(model, "features").interpret(class_inputs, 1, [[concept, randoms[0]], [concept, randoms[1]]])
    assert set(scores) == {"along_u-random_0", "along_u-random_1"}
    for key in scores:
        result = scores[key]["features"]
        np.testing.assert_array_equal(result["sign_count"], [1.0, 0.0])
        np.testing.assert_array_equal(result["magnitude"], [1.0, 0.0])
        assert result["mean_derivative"][0] > 0
    # The other class's logit decreases along the concept.
    opposite = TCAV(model, "features").interpret(class_inputs, 0, [[concept, randoms[0]]])
    np.testing.assert_array_equal(opposite["along_u-random_0"]["features"]["sign_count"], [0.0, 1.0])


def test_significance_concept_significant_random_not(setting):
    model, concept, randoms, class_inputs = setting
    # Large counterpart and null concept: their own sampling noise hardly moves the CAVs, so the scores against
    # the small random concepts are independent draws, as the t-test assumes.
    pool = np.random.default_rng(2).normal(size=(2000, DIMENSION))
    counterpart, null_concept = random_concepts(pool, 2, 600, seed=101, prefix="large_random")
    tcav = TCAV(model, "features")
    result = tcav.significance(class_inputs, 1, concept, randoms, random_counterpart=counterpart)["features"]
    assert result["concept_scores"].shape == (10,) and result["random_scores"].shape == (10,)
    np.testing.assert_array_equal(result["concept_scores"], 1.0)
    assert 0.2 < result["random_mean"] < 0.8
    assert result["p_value"] < 0.05 and result["significant"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a constant sample: scipy warns, the value is exact
        expected = stats.ttest_ind(result["concept_scores"], result["random_scores"]).pvalue
    assert result["p_value"] == pytest.approx(expected)
    null = tcav.significance(class_inputs, 1, null_concept, randoms, random_counterpart=counterpart)["features"]
    assert null["p_value"] > 0.05 and not null["significant"]
    # Default counterpart: the first random concept, compared against the nine others.
    default = tcav.significance(class_inputs, 1, concept, randoms)["features"]
    assert default["concept_scores"].shape == (9,)


def test_significance_cyclic_null(setting):
    model, concept, randoms, class_inputs = setting
    tcav = TCAV(model, "features")
    result = tcav.significance(class_inputs, 1, concept, randoms, null="cyclic")["features"]
    assert result["random_scores"].shape == (10,)
    expected = [tcav.interpret(class_inputs, 1, [[randoms[i], randoms[(i + 1) % 10]]]) for i in range(10)]
    np.testing.assert_array_equal(
        result["random_scores"],
        [e[f"random_{i}-random_{(i + 1) % 10}"]["features"]["sign_count"][0] for i, e in enumerate(expected)],
    )
    assert result["p_value"] < 0.05
    [null_concept] = random_concepts(np.random.default_rng(3).normal(size=(400, DIMENSION)), 1, 20, prefix="null")
    assert tcav.significance(class_inputs, 1, null_concept, randoms, null="cyclic")["features"]["p_value"] > 0.05
    with pytest.raises(ValueError, match="no random counterpart"):
        tcav.significance(class_inputs, 1, concept, randoms[1:], random_counterpart=randoms[0], null="cyclic")


def test_tcav_scores_formulas():
    derivatives = np.array([[2.0, -1.0], [-1.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    scores = tcav_scores(derivatives)
    np.testing.assert_allclose(scores["sign_count"], [0.5, 0.0])
    np.testing.assert_allclose(scores["magnitude"], [5.0 / 6.0, 0.0])
    np.testing.assert_allclose(scores["mean_derivative"], [1.0, -0.25])


def test_three_concept_set_one_vs_rest(setting):
    model, concept, randoms, class_inputs = setting
    opposite = Concept("against_u", np.random.default_rng(3).normal(size=(40, DIMENSION)) - 6.0 * UNIT_U)
    tcav = TCAV(model, "features")
    result = tcav.interpret(class_inputs, 1, [[concept, opposite, randoms[0]]])["along_u-against_u-random_0"]
    np.testing.assert_array_equal(result["features"]["sign_count"][:2], [1.0, 0.0])
    cav = tcav.cav([concept, opposite, randoms[0]])
    assert cav.vectors.shape == (3, DIMENSION)
    np.testing.assert_allclose(np.linalg.norm(cav.vectors, axis=1), 1.0)


def test_dataset_examples_and_batch_size_give_the_same_cav(setting):
    model, concept, randoms, _ = setting
    rng = np.random.default_rng(0)
    examples = rng.normal(size=(30, DIMENSION)) + 6.0 * UNIT_U
    reference = TCAV(model, "features").cav([Concept("c", examples), randoms[0]])
    from_dataset = Concept("c", tf.data.Dataset.from_tensor_slices(examples).batch(7))
    other = TCAV(model, "features").cav([from_dataset, randoms[0]])
    np.testing.assert_allclose(other.vectors, reference.vectors, atol=1e-10)
    assert from_dataset.num_examples == 30
    assert from_dataset.fingerprint != Concept("c", examples[:29]).fingerprint


def test_influence_model_and_layer_index_accepted(setting):
    model, concept, randoms, class_inputs = setting
    im = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    index = [layer.name for layer in model.layers].index("features")
    by_index = TCAV(im, index).interpret(class_inputs, 1, [[concept, randoms[0]]])
    assert list(by_index["along_u-random_0"]) == ["features"]


def test_changed_weights_are_not_served_from_memory(setting):
    _, concept, randoms, _ = setting
    model = linear_direction_model()
    tcav = TCAV(model, "features")
    before = tcav.cav([concept, randoms[0]])
    assert tcav.cav([concept, randoms[0]]) is before  # memoized while the weights stay
    rotation = np.linalg.qr(np.random.default_rng(4).normal(size=(DIMENSION, DIMENSION)))[0]
    model.get_layer("features").set_weights([rotation])
    after = tcav.cav([concept, randoms[0]])
    # Activations are rotated, so the CAV rotates with them: the same as a fresh TCAV's.
    np.testing.assert_allclose(after.vectors, TCAV(model, "features").cav([concept, randoms[0]]).vectors)
    np.testing.assert_allclose(after.vector, before.vector @ rotation, atol=1e-6)


def test_sgd_classifier_matches_captum_default(setting):
    pytest.importorskip("sklearn")
    model, concept, randoms, _ = setting
    cav = TCAV(model, "features", classifier=CAVClassifier(kind="sgd")).cav([concept, randoms[0]])
    assert cav.accuracy == pytest.approx(1.0)
    assert cav.vector @ UNIT_U > 0.8


# ---------------------------------------------------------------------------------------------- the CAV store


def test_store_reuses_and_refuses(setting, tmp_path):
    model, concept, randoms, _ = setting
    first = TCAV(model, "features", save_path=tmp_path).cav([concept, randoms[0]])
    manifests = sorted(tmp_path.glob("*.json"))
    assert len(manifests) == 1
    metadata = json.loads(manifests[0].read_text())["metadata"]
    assert metadata["layer"] == "features" and metadata["concepts"] == ["along_u", "random_0"]
    assert metadata["classifier"]["seed"] == 0
    # Reopened: loaded, not retrained (a different seed would give another split, hence another vector).
    loaded = TCAV(model, "features", save_path=tmp_path).cav([concept, randoms[0]])
    np.testing.assert_array_equal(loaded.vectors, first.vectors)

    # Other examples under the same name are refused.
    impostor = Concept("along_u", np.asarray(randoms[1].dataset.unbatch().batch(1000).get_single_element()))
    with pytest.raises(ValueError, match="concept_fingerprints.*overwrite=True"):
        TCAV(model, "features", save_path=tmp_path).cav([impostor, randoms[0]])
    # Other classifier settings are refused.
    with pytest.raises(ValueError, match="classifier"):
        TCAV(model, "features", save_path=tmp_path, classifier=CAVClassifier(seed=1)).cav([concept, randoms[0]])
    # Other weights up to the layer are refused; weights after the layer do not matter.
    changed = linear_direction_model()
    changed.get_layer("logits").set_weights([np.ones((DIMENSION, 2)), np.ones(2)])
    np.testing.assert_array_equal(
        TCAV(changed, "features", save_path=tmp_path).cav([concept, randoms[0]]).vectors, first.vectors
    )
    changed.get_layer("features").set_weights([2.0 * np.eye(DIMENSION)])
    with pytest.raises(ValueError, match="weights_fingerprint"):
        TCAV(changed, "features", save_path=tmp_path).cav([concept, randoms[0]])
    # overwrite=True retrains and replaces: activations doubled, same direction, the old array file is gone.
    rebuilt = TCAV(changed, "features", save_path=tmp_path, overwrite=True).cav([concept, randoms[0]])
    assert rebuilt.vector @ first.vector > 0.99
    assert len(list(tmp_path.glob("*.npz"))) == 1
    TCAV(changed, "features", save_path=tmp_path).cav([concept, randoms[0]])  # now consistent


def test_store_detects_modified_arrays(setting, tmp_path):
    model, concept, randoms, _ = setting
    TCAV(model, "features", save_path=tmp_path).cav([concept, randoms[0]])
    [array_file] = tmp_path.glob("*.npz")
    with np.load(array_file) as archive:
        arrays = dict(archive)
    arrays["vectors"] = -arrays["vectors"]
    np.savez(array_file, **arrays)
    with pytest.raises(ValueError, match="modified"):
        TCAV(model, "features", save_path=tmp_path).cav([concept, randoms[0]])


# ---------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs(setting):
    model, concept, randoms, class_inputs = setting
    with pytest.raises(ValueError, match="not a layer of the model"):
        TCAV(model, "nope")
    with pytest.raises(ValueError, match="out of range"):
        TCAV(model, 99)
    with pytest.raises(ValueError, match="empty"):
        Concept("empty", np.zeros((0, DIMENSION)))
    with pytest.raises(ValueError, match="different numbers of examples"):
        Concept("ragged", (np.zeros((3, 2)), np.zeros((4, 2))))
    with pytest.raises(ValueError, match="non-empty string"):
        Concept("", np.zeros((3, DIMENSION)))
    tcav = TCAV(model, "features")
    with pytest.raises(ValueError, match="do not match the model's input"):
        tcav.cav([Concept("wide", np.zeros((5, DIMENSION + 1))), randoms[0]])
    with pytest.raises(ValueError, match="do not match the model's input"):
        tcav.interpret(np.zeros((3, DIMENSION + 2)), 1, [[concept, randoms[0]]])
    labelled = tf.data.Dataset.from_tensor_slices((np.zeros((4, DIMENSION)), np.zeros(4))).batch(2)
    with pytest.raises(ValueError, match="inputs only"):
        tcav.cav([Concept("labelled", labelled), randoms[0]])
    with pytest.raises(ValueError, match="at least two concepts"):
        tcav.interpret(class_inputs, 1, [[concept]])
    with pytest.raises(ValueError, match="list of lists"):
        tcav.interpret(class_inputs, 1, [concept, randoms[0]])
    with pytest.raises(ValueError, match="out of range"):
        tcav.interpret(class_inputs, 5, [[concept, randoms[0]]])
    with pytest.raises(ValueError, match="target=None"):
        tcav.interpret(class_inputs, None, [[concept, randoms[0]]])
    with pytest.raises(ValueError, match="unique"):
        tcav.cav([Concept("along_u", np.ones((4, DIMENSION))), randoms[0]])
    with pytest.raises(ValueError, match="at least three random"):
        tcav.significance(class_inputs, 1, concept, randoms[:2])
    with pytest.raises(ValueError, match="at least two per concept"):
        train_cav([np.ones((1, 2)), np.zeros((3, 2))], concepts=["a", "b"], layer="l")
    with pytest.raises(ValueError, match="indistinguishable"):
        train_cav([np.ones((6, 2)), np.ones((6, 2))], concepts=["a", "b"], layer="l")
    with pytest.raises(ValueError, match="kind"):
        CAVClassifier(kind="svm")

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="functional or Sequential"):
        TCAV(Subclassed(), 0)


# ---------------------------------------------------------------------------------------------- concept influence


def _mlp(seed: int = 0) -> keras.Model:
    inputs = keras.Input((3,), dtype="float64")
    pre = keras.layers.Dense(4, name="pre", dtype="float64")(inputs)
    hidden = keras.layers.Activation("tanh", name="act", dtype="float64")(pre)
    logits = keras.layers.Dense(2, name="logits", dtype="float64")(hidden)
    model = keras.Model(inputs, logits)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape) * 0.7 for w in model.get_weights()])
    return model


def _closed_form_sensitivity_gradient(weights, class_inputs, target, vector):
    """∇_θ of mean_x ∇_pre logit_t · v for logits = tanh(x W1 + b1) W2 + b2 (by hand, numpy)."""
    kernel1, bias1, kernel2, _ = weights
    s = np.tanh(class_inputs @ kernel1 + bias1)  # [N, 4]
    w = kernel2[:, target]
    # S = Σ_j (1 - s_j²) w_j v_j
    d_w = ((1 - s**2) * vector).mean(0)  # ∂S/∂W2[:, t]
    d_pre = -2 * s * (1 - s**2) * w * vector  # ∂S/∂pre  [N, 4]
    d_kernel1 = class_inputs.T @ d_pre / len(class_inputs)
    d_bias1 = d_pre.mean(0)
    d_kernel2 = np.zeros_like(kernel2)
    d_kernel2[:, target] = d_w
    return np.concatenate([d_kernel1.ravel(), d_bias1, d_kernel2.ravel(), np.zeros(2)])


def _dense_hessian_and_gradients(model, x, y):
    """Hessian of the mean cross-entropy and per-example gradients over the flat (W1, b1, W2, b2), by tf.hessians."""
    shapes = [w.shape for w in model.get_weights()]
    theta = tf.constant(np.concatenate([w.ravel() for w in model.get_weights()]))

    def losses(flat):
        parts, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(tf.reshape(flat[start : start + size], shape))
            start += size
        logits = tf.tanh(x @ parts[0] + parts[1]) @ parts[2] + parts[3]
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    @tf.function
    def hessian(flat):
        return tf.hessians(tf.reduce_mean(losses(flat)), flat)[0]

    with tf.GradientTape() as tape:
        tape.watch(theta)
        per_example = losses(theta)
    return hessian(theta).numpy(), tape.jacobian(per_example, theta).numpy()


@pytest.mark.slow
def test_concept_influence_matches_closed_form():
    model = _mlp()
    rng = np.random.default_rng(1)
    x_train = rng.normal(size=(20, 3))
    y_train = (x_train[:, 0] > 0).astype(np.int64)
    class_inputs = rng.normal(size=(7, 3))
    concept = Concept("c", rng.normal(size=(12, 3)) + np.array([2.0, 0.0, -1.0]))
    other = Concept("r", rng.normal(size=(12, 3)))
    tcav = TCAV(model, "pre")
    cav = tcav.cav([concept, other])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    im = InfluenceModel(model, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(6)
    damping = 1.0

    value, gradient = concept_sensitivity_gradient(cav, im, class_inputs, 1)
    expected_gradient = _closed_form_sensitivity_gradient(model.get_weights(), class_inputs, 1, cav.vector)
    np.testing.assert_allclose(gradient.numpy(), expected_gradient, atol=1e-12)
    s = np.tanh(class_inputs @ model.get_weights()[0] + model.get_weights()[1])
    expected_value = (((1 - s**2) * model.get_weights()[2][:, 1]) @ cav.vector).mean()
    np.testing.assert_allclose(float(value), expected_value, rtol=1e-12)
    np.testing.assert_allclose(
        float(value), tcav.directional_derivatives(class_inputs, 1, [concept, other])[:, 0].mean(), rtol=1e-12
    )

    hessian, per_example = _dense_hessian_and_gradients(model, tf.constant(x_train), tf.constant(y_train))
    damped = hessian + damping * np.eye(len(hessian))
    expected = -per_example @ np.linalg.solve(damped, expected_gradient)
    scores = concept_influence(cav, im, train, class_inputs, 1, ihvp="exact", ihvp_options={"damping": damping})
    assert scores.shape == (20,)
    np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-10)
    # Same numbers from a TCAV and its set, from a built solver and from CG.
    via_tcav = concept_influence(
        tcav, im, train, class_inputs, 1, concepts=[concept, other], ihvp=ExactIHVP(im, train, damping=damping)
    )
    np.testing.assert_allclose(via_tcav, expected, rtol=1e-7, atol=1e-10)
    cg = concept_influence(cav, im, train, class_inputs, 1, ihvp="cg", ihvp_options={"damping": damping})
    assert np.corrcoef(cg, expected)[0, 1] > 0.99


@pytest.mark.slow
def test_concept_influence_sign_matches_upweighting_retraining():
    """Convex softmax regression with L2, CAV at the input layer (f = W[:, t]·v): score(z) = df/dε on retraining."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 3))
    y = (x @ np.array([1.0, -1.0, 0.5]) + 0.5 * rng.normal(size=30) > 0).astype(np.int64)
    regularization = 0.1

    def objective(flat, extra_weight=0.0, index=0):
        kernel, bias = flat[:6].reshape(3, 2), flat[6:]
        z = x @ kernel + bias
        losses = np.logaddexp.reduce(z, axis=1) - z[np.arange(len(y)), y]
        return losses.mean() + extra_weight * losses[index] + 0.5 * regularization * flat[:6] @ flat[:6]

    def fit(extra_weight=0.0, index=0, start=None):
        start = np.zeros(8) if start is None else start
        result = optimize.minimize(objective, start, args=(extra_weight, index), method="BFGS", options={"gtol": 1e-13})
        return result.x

    optimum = fit()
    inputs = keras.Input((3,), dtype="float64", name="x")
    layer = keras.layers.Dense(2, name="logits", dtype="float64", kernel_regularizer=ExactL2(regularization / 2))
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([optimum[:6].reshape(3, 2), optimum[6:]])
    concept = Concept("c", rng.normal(size=(10, 3)) + 2.0)
    cav = TCAV(model, "x").cav([concept, Concept("r", rng.normal(size=(10, 3)))])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    im = InfluenceModel(model, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    scores = concept_influence(cav, im, train, x[:5], 1)

    def f(flat):
        return flat[:6].reshape(3, 2)[:, 1] @ cav.vector

    epsilon = 1e-3
    checked = [0, 1, 2, 3]
    finite_differences = [
        (f(fit(epsilon, index, start=optimum)) - f(fit(-epsilon, index, start=optimum))) / (2 * epsilon)
        for index in checked
    ]
    np.testing.assert_allclose(scores[checked], finite_differences, rtol=1e-3, atol=1e-6)
