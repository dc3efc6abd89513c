"""LRP and attribution metrics against closed forms (float64): gradient × input, conservation, bookkeeping of the
relevance a bias absorbs, BatchNorm folding, residual blocks, pooling, and the infidelity / sensitivity formulas."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from influenciae.relevance import (
    LRP,
    AlphaBetaRule,
    EpsilonRule,
    GammaRule,
    IdentityRule,
    LayerLRP,
    ZPlusRule,
    infidelity,
    sensitivity_max,
)

F = "float64"


def dense(units, name, activation=None, use_bias=True):
    return keras.layers.Dense(units, activation=activation, use_bias=use_bias, name=name, dtype=F)


def randomize(model, seed=0):
    """Random weights (biases included, so that they really absorb relevance)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "moving_variance" in variable.path:
            variable.assign(rng.uniform(0.5, 2.0, variable.shape))
        else:
            variable.assign(rng.normal(size=variable.shape) * 0.7)
    return model


def mlp(use_bias=True, seed=0):
    inputs = keras.Input((5,), dtype=F, name="x")
    h1 = dense(7, "h1", "relu", use_bias)(inputs)
    h2 = dense(6, "h2", "relu", use_bias)(h1)
    outputs = dense(3, "out", None, use_bias)(h2)
    return randomize(keras.Model(inputs, outputs), seed)


def gradient_times_input(model, x, target):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = tf.gather(model(x), target, axis=1, batch_dims=1)
    return (tape.gradient(score, x) * x).numpy()


def sums(tensor):
    return tf.reduce_sum(tf.reshape(tensor, [tensor.shape[0], -1]), axis=1).numpy()


X = np.random.default_rng(1).normal(size=(6, 5))
TARGET = np.array([0, 1, 2, 0, 1, 2])


# ---------------------------------------------------------------------------------------------- LRP-0 / ε


@pytest.mark.parametrize("epsilon", [0.0, 1e-9])
def test_lrp0_without_bias_is_gradient_times_input(epsilon):
    model = mlp(use_bias=False)
    relevance = LRP(model, rules=EpsilonRule(epsilon)).attribute(X, TARGET)
    assert relevance.shape == X.shape and relevance.dtype == tf.float64
    np.testing.assert_allclose(relevance.numpy(), gradient_times_input(model, X, TARGET), atol=1e-6)


@pytest.mark.parametrize(
    "rule", [EpsilonRule(1e-9), EpsilonRule(0.3), ZPlusRule(), GammaRule(0.5, set_bias_to_zero=True)]
)
def test_conservation_layer_to_layer_without_bias(rule):
    model = mlp(use_bias=False)
    layers = ["x", "h1", "h2", "out"]
    per_layer, output = LayerLRP(model, layers, rules=rule).attribute(X, TARGET, return_output=True)
    np.testing.assert_allclose(output, model(X).numpy()[np.arange(6), TARGET], rtol=1e-12)
    np.testing.assert_allclose(sums(per_layer[-1]), output, rtol=1e-12)
    if isinstance(rule, EpsilonRule) and rule.epsilon > 1e-6:
        # ε absorbs a share, so the totals shrink in magnitude but are not conserved: bookkeeping test below.
        return
    for relevance in per_layer:
        np.testing.assert_allclose(sums(relevance), output, rtol=1e-7, atol=1e-9)


def test_bias_and_epsilon_bookkeeping():
    """Σ R_in = Σ_j R_j (z_j − b_j) / (z_j + ε sign z_j): the bias and ε absorb exactly the rest."""
    epsilon = 0.05
    model = mlp(use_bias=True)
    lrp = LayerLRP(model, ["x", "h1", "h2", "out"], rules=EpsilonRule(epsilon))
    relevances, output = lrp.attribute(X, TARGET, return_output=True)
    relevances = [r.numpy() for r in relevances]
    activations = [X]
    for name in ["h1", "h2", "out"]:
        layer = model.get_layer(name)
        kernel, bias = (w.numpy() for w in layer.weights)
        z = activations[-1] @ kernel + bias
        received = relevances[len(activations)]
        denominator = z + epsilon * np.where(z >= 0, 1.0, -1.0)
        expected = (received * (z - bias) / denominator).sum(axis=1)
        np.testing.assert_allclose(relevances[len(activations) - 1].sum(axis=1), expected, rtol=1e-10)
        # and the element-wise closed form of LRP-ε: R_i = a_i Σ_j w_ij R_j / (z_j + ε sign z_j)
        np.testing.assert_allclose(
            relevances[len(activations) - 1],
            activations[-1] * ((received / denominator) @ kernel.T),
            rtol=1e-10,
            atol=1e-14,
        )
        activations.append(np.maximum(z, 0) if layer.activation is keras.activations.relu else z)
    np.testing.assert_allclose(output, activations[-1][np.arange(6), TARGET], rtol=1e-12)
    absorbed = output - relevances[0].sum(axis=1)
    assert np.all(np.abs(absorbed) > 1e-6)  # the biases really took a share


def test_gamma_rule_closed_form_on_one_layer():
    gamma = 0.4
    inputs = keras.Input((4,), dtype=F)
    model = randomize(keras.Model(inputs, dense(3, "d")(inputs)), seed=3)
    kernel, bias = (w.numpy() for w in model.get_layer("d").weights)
    x = np.abs(np.random.default_rng(2).normal(size=(5, 4)))
    relevance = LRP(model, rules={"d": GammaRule(gamma)}).attribute(x, 1).numpy()
    modified = kernel + gamma * np.maximum(kernel, 0)
    z = x @ modified + bias
    r_out = np.zeros((5, 3))
    r_out[:, 1] = (x @ kernel + bias)[:, 1]
    expected = x * ((r_out / (z + 1e-9 * np.where(z >= 0, 1, -1))) @ modified.T)
    np.testing.assert_allclose(relevance, expected, rtol=1e-10)


def test_alpha1_beta0_equals_zplus_on_positive_inputs_and_alpha2_beta1_conserves():
    model = mlp(use_bias=True, seed=4)
    x = np.abs(X)
    zplus = LRP(model, rules=ZPlusRule()).attribute(x, TARGET).numpy()
    alpha_beta = LRP(model, rules=AlphaBetaRule(alpha=1, beta=0)).attribute(x, TARGET).numpy()
    np.testing.assert_allclose(alpha_beta, zplus, rtol=1e-10, atol=1e-14)
    # on mixed-sign inputs α1β0 differs from z⁺ (negative inputs times negative weights count as positive)
    assert not np.allclose(
        LRP(model, rules=AlphaBetaRule()).attribute(X, TARGET), LRP(model, rules=ZPlusRule()).attribute(X, TARGET)
    )


def test_alpha2_beta1_closed_form_and_conservation_on_one_layer():
    inputs = keras.Input((5,), dtype=F)
    model = randomize(keras.Model(inputs, dense(3, "d")(inputs)), seed=11)
    kernel, bias = (w.numpy() for w in model.get_layer("d").weights)
    relevance, output = LRP(model, rules=AlphaBetaRule(alpha=2, beta=1)).attribute(X, 1, return_output=True)
    contributions = X[:, :, None] * kernel[None]  # [batch, in, out]
    positive, negative = np.maximum(contributions, 0), np.minimum(contributions, 0)
    assert np.all(positive.sum(1) > 0) and np.all(negative.sum(1) < 0)  # both parts exist: α − β = 1 is conserved
    r_out = np.zeros((6, 3))
    r_out[:, 1] = output
    expected = 2 * positive / (positive.sum(1, keepdims=True) + 1e-9) - negative / (
        negative.sum(1, keepdims=True) - 1e-9
    )
    np.testing.assert_allclose(relevance, (expected * r_out[:, None, :]).sum(2), rtol=1e-10)
    np.testing.assert_allclose(sums(relevance), output, rtol=1e-7)


# ---------------------------------------------------------------------------------------------- layers


def test_batchnorm_folding_equals_the_folded_dense_model():
    inputs = keras.Input((5,), dtype=F)
    z = dense(6, "d1")(inputs)
    z = keras.layers.BatchNormalization(name="bn", dtype=F)(z)
    z = keras.layers.ReLU(dtype=F)(z)
    model = randomize(keras.Model(inputs, dense(3, "d2")(z)), seed=5)
    bn = model.get_layer("bn")
    gamma, beta, mean, variance = (w.numpy() for w in bn.weights)
    scale = gamma / np.sqrt(variance + bn.epsilon)
    kernel, bias = (w.numpy() for w in model.get_layer("d1").weights)
    folded_inputs = keras.Input((5,), dtype=F)
    folded_hidden = dense(6, "d1", "relu")(folded_inputs)
    folded = keras.Model(folded_inputs, dense(3, "d2")(folded_hidden))
    folded.get_layer("d1").set_weights([kernel * scale, (bias - mean) * scale + beta])
    folded.get_layer("d2").set_weights(model.get_layer("d2").get_weights())
    np.testing.assert_allclose(model(X), folded(X), rtol=1e-10)
    for rule in [EpsilonRule(0.1), ZPlusRule(), GammaRule(0.25)]:
        expected = LRP(folded, rules=rule, compile=False).attribute(X, TARGET).numpy()
        np.testing.assert_allclose(
            LRP(model, rules=rule, compile=False).attribute(X, TARGET), expected, rtol=1e-9, atol=1e-12
        )
    # the folded BatchNorm's output carries the Dense layer's relevance (the fold is invisible to LayerLRP)
    layer_relevance = LayerLRP(model, ["d1", "bn"]).attribute(X, TARGET)
    np.testing.assert_allclose(layer_relevance[0], layer_relevance[1])


def test_batchnorm_with_nothing_before_is_an_elementwise_linear_layer():
    inputs = keras.Input((5,), dtype=F)
    z = keras.layers.BatchNormalization(name="bn", dtype=F)(inputs)
    model = randomize(keras.Model(inputs, dense(2, "d", use_bias=False)(z)), seed=6)
    gamma, beta, mean, variance = (w.numpy() for w in model.get_layer("bn").weights)
    scale = gamma / np.sqrt(variance + model.get_layer("bn").epsilon)
    shift = beta - mean * scale
    epsilon = 0.01
    relevance = LRP(model, rules=EpsilonRule(epsilon)).attribute(X, 1).numpy()
    r_bn = LayerLRP(model, "bn", rules=EpsilonRule(epsilon)).attribute(X, 1).numpy()
    z = X * scale + shift
    np.testing.assert_allclose(relevance, X * scale * r_bn / (z + epsilon * np.where(z >= 0, 1, -1)), rtol=1e-10)
    identity = LRP(model, rules={"bn": IdentityRule(), "d": EpsilonRule(epsilon)}).attribute(X, 1)
    np.testing.assert_allclose(identity, r_bn, rtol=1e-12)


def test_residual_add_block_conserves_and_splits_in_proportion():
    inputs = keras.Input((5,), dtype=F, name="x")
    h = dense(5, "h", "relu", use_bias=False)(inputs)
    branch = dense(5, "branch", "relu", use_bias=False)(h)
    merged = keras.layers.Add(name="residual", dtype=F)([h, branch])
    outputs = dense(3, "out", use_bias=False)(merged + inputs)  # an `ops` Add node (x + y) as well
    model = randomize(keras.Model(inputs, outputs), seed=7)
    lrp0 = EpsilonRule(0.0)  # exact conservation (no stabilizer share), as no pre-activation is exactly 0 here
    relevance, output = LRP(model, rules=lrp0).attribute(X, TARGET, return_output=True)
    np.testing.assert_allclose(sums(relevance), output, rtol=1e-9)
    r_add, r_h, r_branch = LayerLRP(model, ["residual", "h", "branch"], rules=lrp0).attribute(X, TARGET)
    h_value = np.maximum(X @ model.get_layer("h").weights[0].numpy(), 0)
    branch_value = np.maximum(h_value @ model.get_layer("branch").weights[0].numpy(), 0)
    share = np.divide(h_value, h_value + branch_value, out=np.zeros_like(h_value), where=h_value + branch_value > 0)
    # h receives its direct share of the Add, plus what the branch passes down to it
    np.testing.assert_allclose(sums(r_h), sums(share * r_add.numpy()) + sums(r_branch), rtol=1e-7)


def test_conv_maxpool_flatten_dense_conserves_with_zplus():
    inputs = keras.Input((8, 8, 2), dtype=F, name="image")
    z = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv", dtype=F)(inputs)
    z = keras.layers.MaxPooling2D(2, name="pool", dtype=F)(z)
    z = keras.layers.AveragePooling2D(2, name="avg", dtype=F)(z)
    z = keras.layers.Flatten(dtype=F)(z)
    z = keras.layers.Dropout(0.5, dtype=F)(z)
    model = randomize(keras.Model(inputs, dense(3, "out")(z)), seed=8)
    images = np.random.default_rng(3).uniform(size=(4, 8, 8, 2))
    target = np.array([0, 1, 2, 1])
    relevance, output = LRP(model, rules=ZPlusRule()).attribute(images, target, return_output=True)
    assert relevance.shape == images.shape
    np.testing.assert_allclose(sums(relevance), output, rtol=1e-7)
    per_layer = LayerLRP(model, ["conv", "pool", "avg"], rules=ZPlusRule()).attribute(images, target)
    for layer_relevance in per_layer:
        np.testing.assert_allclose(sums(layer_relevance), output, rtol=1e-7)
    # max pooling is winner-take-all: relevance of the conv output sits only at each window's maximum
    conv = keras.Model(inputs, model.get_layer("conv").output)(images).numpy()
    windows = conv.reshape(4, 4, 2, 4, 2, 4).transpose(0, 1, 3, 5, 2, 4).reshape(4, 4, 4, 4, 4)
    nonzero = per_layer[0].numpy().reshape(4, 4, 2, 4, 2, 4).transpose(0, 1, 3, 5, 2, 4).reshape(4, 4, 4, 4, 4) != 0
    assert nonzero.sum(axis=-1).max() == 1
    assert np.all(np.take_along_axis(windows, windows.argmax(-1)[..., None], -1)[..., 0][nonzero.any(-1)] > 0)


def test_conv1d_global_average_pooling_and_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((10, 3), dtype=F),
            keras.layers.Conv1D(4, 3, use_bias=False, name="conv", dtype=F),
            keras.layers.Activation("relu", dtype=F),
            keras.layers.GlobalAveragePooling1D(dtype=F),
            dense(2, "out", use_bias=False),
        ]
    )
    randomize(model, seed=9)
    x = np.random.default_rng(4).normal(size=(3, 10, 3))
    relevance = LRP(model).attribute(x, [0, 1, 1])
    np.testing.assert_allclose(relevance.numpy(), gradient_times_input(model, x, np.array([0, 1, 1])), atol=1e-6)


def test_layerlrp_of_the_input_layer_equals_lrp_and_targets_broadcast():
    model = mlp()
    rules = {"h1": GammaRule(0.25), "h2": EpsilonRule(0.1)}
    expected = LRP(model, rules=rules).attribute(X, 2)
    np.testing.assert_allclose(LayerLRP(model, model.layers[0], rules=rules, compile=False).attribute(X, 2), expected)
    np.testing.assert_allclose(LayerLRP(model, "x", rules=rules, compile=False).attribute(X, 2), expected)
    np.testing.assert_allclose(LRP(model, rules=rules, compile=False).attribute(X, np.full(6, 2)), expected)
    relevance_h1 = LayerLRP(model, "h1", rules=rules, compile=False).attribute(X, 2)
    assert relevance_h1.shape == (6, 7)
    np.testing.assert_allclose(
        LayerLRP(model, "h2", rules=rules, compile=False).attribute(X, 2, attribute_to_layer_input=True), relevance_h1
    )
    by_callable = LRP(model, rules=lambda layer: rules.get(layer.name), compile=False).attribute(X, 2)
    np.testing.assert_allclose(by_callable, expected)
    # target=None explains the predicted class
    predicted = np.argmax(model(X), axis=1)
    np.testing.assert_allclose(
        LRP(model, compile=False).attribute(X), LRP(model, compile=False).attribute(X, predicted)
    )


def test_nested_model_is_inlined():
    inner = keras.Sequential([keras.Input((7,), dtype=F), dense(6, "inner", "relu", use_bias=False)], name="block")
    inputs = keras.Input((5,), dtype=F)
    outputs = dense(3, "out", use_bias=False)(inner(dense(7, "first", "relu", use_bias=False)(inputs)))
    model = randomize(keras.Model(inputs, outputs), seed=10)
    np.testing.assert_allclose(LRP(model).attribute(X, TARGET), gradient_times_input(model, X, TARGET), atol=1e-6)
    assert LayerLRP(model, "inner").attribute(X, TARGET).shape == (6, 6)


# ---------------------------------------------------------------------------------------------- errors


def test_unsupported_layer_is_named():
    inputs = keras.Input((4, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.LSTM(5, name="my_lstm")(inputs)))
    with pytest.raises(ValueError, match=r"'my_lstm' of class LSTM"):
        LRP(model)


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="not in the model"):
        LRP(model, rules={"nope": EpsilonRule()})
    with pytest.raises(TypeError, match="PropagationRule"):
        LRP(model, rules={"h1": 0.1})
    with pytest.raises(ValueError, match="target must lie"):
        LRP(model).attribute(X, 3)
    with pytest.raises(ValueError, match="shape"):
        LRP(model).attribute(X, [0, 1])
    with pytest.raises(ValueError, match="No layer named"):
        LayerLRP(model, "missing")
    with pytest.raises(ValueError, match=">= 0"):
        EpsilonRule(-1.0)
    with pytest.raises(ValueError, match="input and output shapes"):
        LRP(model, rules={"h1": IdentityRule()}).attribute(X, 0)


# ---------------------------------------------------------------------------------------------- metrics


W = np.array([0.5, -1.0, 2.0, 0.25, -0.75])


def linear(x):
    return tf.reduce_sum(x * W, axis=1, keepdims=True) + 3.0


def gaussian(x, generator):
    noise = generator.normal(tf.shape(x), dtype=x.dtype) * 0.3
    return noise, x - noise


def test_infidelity_closed_forms_on_a_linear_model():
    x = X + 1.5  # no zero inputs, so the input-multiplied perturbation is defined
    gradient = np.tile(W, (6, 1))
    assert np.allclose(infidelity(linear, gaussian, x, gradient, target=0, num_samples=7, seed=0), 0, atol=1e-20)

    def relative(inputs, generator):  # Captum's multiply_by_inputs convention for gradient × input
        noise, perturbed = gaussian(inputs, generator)
        return noise / inputs, perturbed

    assert np.allclose(infidelity(linear, relative, x, gradient * x, num_samples=7, seed=0), 0, atol=1e-20)
    # twice the exact attribution: (2 Iᵀw − Iᵀw)² = (Iᵀw)²; normalize rescales by β = 1/2 and recovers 0
    twice = infidelity(linear, gaussian, x, 2 * gradient, num_samples=7, seed=0).numpy()
    noise, _ = gaussian(tf.repeat(tf.constant(x), 7, axis=0), tf.random.Generator.from_seed(0))
    expected = ((noise.numpy() @ W) ** 2).reshape(6, 7).mean(axis=1)
    np.testing.assert_allclose(twice, expected, rtol=1e-12)
    assert np.allclose(
        infidelity(linear, gaussian, x, 2 * gradient, num_samples=7, normalize=True, seed=0), 0, atol=1e-20
    )
    # a one-argument perturbation (deterministic) is accepted too
    fixed = infidelity(linear, lambda inputs: (tf.ones_like(inputs), inputs - 1.0), x, np.zeros_like(x), num_samples=2)
    np.testing.assert_allclose(fixed, np.full(6, W.sum() ** 2), rtol=1e-12)


def test_infidelity_of_lrp_on_a_bias_free_relu_model_under_small_perturbations():
    model = mlp(use_bias=False)
    relevance = LRP(model).attribute(X, 0)

    def tiny(inputs, generator):
        noise = generator.normal(tf.shape(inputs), dtype=inputs.dtype) * 1e-4 * inputs
        return noise / inputs, inputs - noise

    # LRP-0 = gradient × input: exact to first order, so the infidelity is O(noise²) tiny compared to the scale
    score = infidelity(model, tiny, X, relevance, target=0, num_samples=5, seed=1).numpy()
    assert np.all(score < 1e-12) and score.shape == (6,)


def gradient_times_input_linear(inputs):
    return tf.constant(W) * inputs


def test_sensitivity_max_closed_forms():
    x = tf.constant(X)
    constant = sensitivity_max(lambda inputs: tf.ones_like(inputs), x, num_samples=5, seed=0)
    np.testing.assert_allclose(constant, np.zeros(6), atol=0)
    deltas = np.random.default_rng(5).uniform(-0.1, 0.1, size=(6 * 4, 5))
    score = sensitivity_max(
        gradient_times_input_linear, x, num_samples=4, perturb_fn=lambda inputs: inputs + deltas
    ).numpy()
    ratios = np.linalg.norm((W * deltas).reshape(6, 4, 5), axis=2) / np.linalg.norm(W * X, axis=1)[:, None]
    np.testing.assert_allclose(score, ratios.max(axis=1), rtol=1e-12)
    score_inf = sensitivity_max(
        gradient_times_input_linear, x, num_samples=4, norm="inf", perturb_fn=lambda inputs: inputs + deltas
    ).numpy()
    ratios_inf = np.abs(W * deltas).reshape(6, 4, 5).max(axis=2) / np.abs(W * X).max(axis=1)[:, None]
    np.testing.assert_allclose(score_inf, ratios_inf.max(axis=1), rtol=1e-12)
    # default uniform L∞ ball: reproducible with a seed, positive, and below the bound r‖w‖ / ‖w ⊙ x‖
    first = sensitivity_max(gradient_times_input_linear, x, perturb_radius=0.05, num_samples=8, seed=3).numpy()
    second = sensitivity_max(gradient_times_input_linear, x, perturb_radius=0.05, num_samples=8, seed=3).numpy()
    np.testing.assert_array_equal(first, second)
    assert np.all(first > 0) and np.all(first <= 0.05 * np.linalg.norm(W) / np.linalg.norm(W * X, axis=1))
    with pytest.raises(ValueError, match="norm"):
        sensitivity_max(gradient_times_input_linear, x, norm="nuc")


def test_sensitivity_max_of_lrp_forwards_the_target():
    model = mlp(use_bias=False)
    lrp = LRP(model)
    score = sensitivity_max(lrp.attribute, X, perturb_radius=0.0, num_samples=2, target=TARGET).numpy()
    np.testing.assert_allclose(score, np.zeros(6), atol=1e-12)


def test_compiled_equals_eager_and_unbuilt_sequential_works():
    inputs = keras.Input((6, 6, 1), dtype=F, name="image")
    z = keras.layers.Conv2D(3, 3, activation="relu", name="conv", dtype=F)(inputs)
    z = keras.layers.BatchNormalization(name="bn", dtype=F)(z)
    z = keras.layers.GlobalMaxPooling2D(dtype=F)(z)
    model = randomize(keras.Model(inputs, dense(2, "out")(z)), seed=12)
    images = np.random.default_rng(6).uniform(size=(3, 6, 6, 1))
    rules = {"conv": GammaRule(0.25)}
    eager, compiled = (
        LayerLRP(model, ["image", "conv"], rules, compile=False),
        LayerLRP(model, ["image", "conv"], rules),
    )
    for target in (1, None):
        for got, expected in zip(compiled.attribute(images, target), eager.attribute(images, target), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(LRP(model, rules, compile=False).attribute(images, 1), eager.attribute(images, 1)[0])
    sequential = keras.Sequential([dense(4, "a", "relu", use_bias=False), dense(2, "b", use_bias=False)])
    sequential(X[:1])  # built by a call, without keras.Input: a plain chain of layers
    randomize(sequential, seed=13)
    relevance = LRP(sequential).attribute(X, 1)
    np.testing.assert_allclose(relevance, gradient_times_input(sequential, X, np.ones(6, int)), atol=1e-6)
    with pytest.raises(ValueError, match="target must lie"):
        LRP(sequential).attribute(X, 2)
