"""InfluenceModel: per-sample gradients against a loop in float64, weight selection, losses and input errors."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import FLOAT, ExactL2, classification_data, dataset, logistic_problem, small_mlp, sparse_ce

from influenciae import InfluenceModel


def loop_gradients(influence_model: InfluenceModel, inputs, targets, weights=None) -> np.ndarray:
    """Reference: one eager GradientTape per example."""
    rows = []
    size = len(tf.nest.flatten(targets)[0])
    for index in range(size):
        single = tf.nest.map_structure(lambda t, i=index: tf.convert_to_tensor(t)[i : i + 1], (inputs, targets))
        with tf.GradientTape() as tape:
            predictions = influence_model.model(single[0], training=False)
            loss = tf.reduce_sum(influence_model.loss_function(single[1], predictions))
            if weights is not None:
                loss = loss * weights[index]
        gradients = tape.gradient(loss, influence_model._watched)
        rows.append(influence_model.flatten(gradients).numpy())
    return np.stack(rows)


def _cnn():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((7, 7, 2), dtype=FLOAT),
            keras.layers.Conv2D(3, 3, activation="relu", dtype=FLOAT),
            keras.layers.Conv2D(2, 2, strides=2, padding="same", activation="tanh", dtype=FLOAT),
            keras.layers.Flatten(dtype=FLOAT),
            keras.layers.Dense(4, dtype=FLOAT),
        ]
    )


def _embedding():
    keras.utils.set_random_seed(4)
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(11, 3, dtype=FLOAT),
            keras.layers.GlobalAveragePooling1D(dtype=FLOAT),
            keras.layers.Dense(4, dtype=FLOAT),
        ]
    )


def _batch_norm():
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((6,), dtype=FLOAT),
            keras.layers.Dense(5, dtype=FLOAT),
            keras.layers.BatchNormalization(dtype=FLOAT),
            keras.layers.Activation("relu", dtype=FLOAT),
            keras.layers.Dense(4, dtype=FLOAT),
        ]
    )
    batch_norm = model.layers[1]
    batch_norm.moving_mean.assign(np.linspace(-0.5, 0.5, 5))
    batch_norm.moving_variance.assign(np.linspace(0.5, 2.0, 5))
    return model


def _layer_norm():
    keras.utils.set_random_seed(6)
    return keras.Sequential(
        [
            keras.Input((6,), dtype=FLOAT),
            keras.layers.Dense(5, activation="gelu", dtype=FLOAT),
            keras.layers.LayerNormalization(dtype=FLOAT),
            keras.layers.Dense(4, dtype=FLOAT),
        ]
    )


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(dtype=FLOAT)
        self.hidden = keras.layers.Dense(5, activation="tanh", dtype=FLOAT)
        self.out = keras.layers.Dense(4, dtype=FLOAT)

    def call(self, inputs, training=False):
        return self.out(self.hidden(inputs))


def _subclassed():
    keras.utils.set_random_seed(7)
    model = _Subclassed()
    model(np.zeros((1, 6)))
    return model


def _rng_inputs(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


CASES = {
    "dense": (lambda: small_mlp(classes=4), lambda: _rng_inputs((9, 6))),
    "conv2d": (_cnn, lambda: _rng_inputs((9, 7, 7, 2))),
    "embedding": (_embedding, lambda: np.random.default_rng(0).integers(0, 11, (9, 5)).astype("int32")),
    "batch_norm_inference": (_batch_norm, lambda: _rng_inputs((9, 6))),
    "layer_norm": (_layer_norm, lambda: _rng_inputs((9, 6))),
    "subclassed": (_subclassed, lambda: _rng_inputs((9, 6))),
}


LAYERED = {"dense", "conv2d", "subclassed"}  # every weight in a Dense or Conv layer: per_example_gradients="layers"


@pytest.mark.parametrize("mode", ["auto", "vectorized", "layers"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_per_sample_gradients_equal_a_loop(case, mode):
    build_model, build_inputs = CASES[case]
    model = build_model()
    inputs = build_inputs()
    targets = np.random.default_rng(1).integers(0, 4, len(inputs))
    if mode == "layers" and case not in LAYERED:
        with pytest.raises(ValueError, match="per_example_gradients='layers' needs every watched weight"):
            InfluenceModel(model, loss_function=sparse_ce(), per_example_gradients=mode)
        return
    # 3 chunks, the last one partial
    influence_model = InfluenceModel(model, loss_function=sparse_ce(), max_chunk_size=4, per_example_gradients=mode)
    layered = mode == "layers" or (mode == "auto" and case == "conv2d")  # auto: the layers where a conv is
    assert (influence_model._layer_capture is not None) == layered
    if case == "subclassed" and mode == "layers":  # the capture cannot patch this model's call: it says so
        with pytest.warns(RuntimeWarning, match="using the vectorized map instead"):
            vectorized = influence_model.batch_jacobian_tensor((inputs, targets)).numpy()
        assert influence_model._layer_capture is None
    else:
        vectorized = influence_model.batch_jacobian_tensor((inputs, targets)).numpy()
    reference = loop_gradients(influence_model, inputs, targets)
    assert vectorized.shape == (9, influence_model.nb_params)
    assert np.abs(reference).max() > 1e-3
    np.testing.assert_allclose(vectorized, reference, rtol=0, atol=1e-10)


def test_layer_gradients_weigh_examples_and_change_the_model_identity():
    from influenciae.model.identity import model_identity

    inputs, targets = _rng_inputs((9, 7, 7, 2)), np.random.default_rng(1).integers(0, 4, 9)
    weights = np.linspace(0.0, 2.0, 9)
    layered = InfluenceModel(_cnn(), loss_function=sparse_ce())
    vectorized = InfluenceModel(_cnn(), loss_function=sparse_ce(), per_example_gradients="vectorized")
    expected = loop_gradients(vectorized, inputs, targets, weights)
    for influence_model in (layered, vectorized):
        gradients = influence_model.batch_jacobian_tensor((inputs, targets, weights)).numpy()
        np.testing.assert_allclose(gradients, expected, rtol=0, atol=1e-10)
    assert not np.any(expected[0]) and np.abs(expected[1:]).max() > 1e-3  # weight 0: a zero row
    # a disk cache records the method (rounding differs), and the vectorized map's identity is the earlier one
    assert model_identity(layered) != model_identity(vectorized)
    assert "per_example_gradients" not in model_identity(vectorized)
    with pytest.raises(ValueError, match="per_example_gradients must be"):
        InfluenceModel(_cnn(), loss_function=sparse_ce(), per_example_gradients="capture")


def test_functional_two_input_model():
    keras.utils.set_random_seed(8)
    first = keras.Input((3,), dtype=FLOAT, name="first")
    second = keras.Input((4,), dtype=FLOAT, name="second")
    merged = keras.layers.Concatenate(dtype=FLOAT)(
        [keras.layers.Dense(5, activation="tanh", dtype=FLOAT)(first), second]
    )
    model = keras.Model([first, second], keras.layers.Dense(3, dtype=FLOAT)(merged))
    rng = np.random.default_rng(2)
    inputs = (rng.standard_normal((7, 3)), rng.standard_normal((7, 4)))
    targets = rng.integers(0, 3, 7)
    influence_model = InfluenceModel(model, loss_function=sparse_ce())
    vectorized = influence_model.batch_jacobian_tensor((inputs, targets)).numpy()
    np.testing.assert_allclose(vectorized, loop_gradients(influence_model, inputs, targets), rtol=0, atol=1e-10)
    ds = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(3)
    streamed = np.concatenate([influence_model.batch_jacobian_tensor(batch).numpy() for batch in ds])
    np.testing.assert_allclose(streamed, vectorized, rtol=0, atol=1e-12)


def test_closed_form_logistic_gradients_loss_and_batch_gradient():
    influence_model, x, y, _, gradients = logistic_problem()
    np.testing.assert_allclose(influence_model.batch_jacobian_tensor((x, y)).numpy(), gradients, atol=1e-12)
    np.testing.assert_allclose(influence_model.batch_gradient((x, y)).numpy(), gradients.mean(0), atol=1e-12)
    kernel = influence_model.model.layers[0].kernel.numpy()[:, 0]
    bias = influence_model.model.layers[0].bias.numpy()[0]
    logits = x @ kernel + bias
    expected = np.logaddexp(0, logits) - y * logits
    np.testing.assert_allclose(influence_model.batch_loss((x, y)).numpy(), expected, atol=1e-12)
    # the regularizer (λ/2)‖w‖² with λ = 0.05 enters through regularization_loss/gradient, not per-sample terms
    np.testing.assert_allclose(float(influence_model.regularization_loss()), 0.025 * np.sum(kernel**2), rtol=1e-12)
    np.testing.assert_allclose(
        influence_model.regularization_gradient().numpy(), np.append(0.05 * kernel, 0.0), atol=1e-14
    )


def test_sample_weights_scale_losses_and_gradients():
    influence_model, x, y, _, gradients = logistic_problem()
    weights = np.random.default_rng(0).uniform(0.5, 2.0, len(x))
    weighted = influence_model.batch_jacobian_tensor((x, y, weights)).numpy()
    np.testing.assert_allclose(weighted, gradients * weights[:, None], atol=1e-12)
    np.testing.assert_allclose(
        influence_model.batch_gradient((x, y, weights)).numpy(),
        (gradients * weights[:, None]).mean(0),
        atol=1e-12,
    )


def test_weight_selection_by_layer_range_name_and_explicit_list():
    model = small_mlp()
    full = InfluenceModel(model, loss_function=sparse_ce())
    assert full.nb_params == 6 * 8 + 8 + 8 * 3 + 3
    last = InfluenceModel(model, start_layer=-1, loss_function=sparse_ce())
    by_name = InfluenceModel(model, start_layer=model.layers[1].name, loss_function=sparse_ce())
    explicit = InfluenceModel(model, weights_to_watch=[model.layers[1].kernel], loss_function=sparse_ce())
    first = InfluenceModel(model, last_layer=0, loss_function=sparse_ce())
    assert last.nb_params == by_name.nb_params == 27
    assert explicit.nb_params == 24 and first.nb_params == 56
    x, y = classification_data()
    full_grads = full.batch_jacobian_tensor((x[:5], y[:5])).numpy()
    np.testing.assert_allclose(last.batch_jacobian_tensor((x[:5], y[:5])).numpy(), full_grads[:, 56:], atol=1e-12)
    np.testing.assert_allclose(explicit.batch_jacobian_tensor((x[:5], y[:5])).numpy(), full_grads[:, 56:80])
    assert full.weight_names[0].endswith("kernel")


def test_compiled_loss_is_turned_into_reduction_none():
    model = small_mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    compiled = InfluenceModel(model)
    explicit = InfluenceModel(model, loss_function=sparse_ce())
    x, y = classification_data()
    np.testing.assert_allclose(compiled.batch_loss((x, y)).numpy(), explicit.batch_loss((x, y)).numpy())
    model.compile(loss="sparse_categorical_crossentropy")  # a string: probabilities expected; still per example
    assert InfluenceModel(model).batch_loss((x, y)).shape == (len(x),)


def test_chunking_does_not_change_results():
    model = small_mlp()
    x, y = classification_data()
    whole = InfluenceModel(model, loss_function=sparse_ce()).batch_jacobian_tensor((x, y)).numpy()
    chunked = InfluenceModel(model, loss_function=sparse_ce(), max_chunk_size=5).batch_jacobian_tensor((x, y))
    np.testing.assert_allclose(chunked.numpy(), whole, atol=1e-13)
    tiny_budget = InfluenceModel(model, loss_function=sparse_ce(), memory_budget=1)
    assert tiny_budget.chunk_size == 1


def test_graph_mode_equals_eager():
    model = small_mlp()
    x, y = classification_data()
    influence_model = InfluenceModel(model, loss_function=sparse_ce())
    eager = influence_model.batch_jacobian_tensor((x, y)).numpy()
    graph = tf.function(lambda a, b: influence_model.batch_jacobian_tensor((a, b)))(x, y).numpy()
    np.testing.assert_allclose(graph, eager, atol=1e-13)
    tf.config.run_functions_eagerly(True)
    try:
        fully_eager = InfluenceModel(model, loss_function=sparse_ce()).batch_jacobian_tensor((x, y)).numpy()
    finally:
        tf.config.run_functions_eagerly(False)
    np.testing.assert_allclose(fully_eager, eager, atol=1e-13)


def test_legacy_tf_keras_model():
    tf_keras = pytest.importorskip("tf_keras")
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Dense(
                4,
                activation="tanh",
                input_shape=(3,),
                dtype=FLOAT,
                kernel_regularizer=tf_keras.regularizers.L2(0.5),
            ),
            tf_keras.layers.Dense(2, dtype=FLOAT),
        ]
    )
    model.compile(loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    influence_model = InfluenceModel(model)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.integers(0, 2, 6)
    vectorized = influence_model.batch_jacobian_tensor((x, y)).numpy()
    np.testing.assert_allclose(vectorized, loop_gradients(influence_model, x, y), atol=1e-10)
    kernel = model.layers[0].kernel.numpy()
    np.testing.assert_allclose(float(influence_model.regularization_loss()), 0.5 * np.sum(kernel**2), rtol=1e-6)
    assert influence_model.weight_names[0].endswith("kernel:0")


# ---------------------------------------------------------------------- errors that name the fix


def test_loss_with_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction='none'"):
        InfluenceModel(small_mlp(), loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def test_missing_loss_is_refused():
    with pytest.raises(ValueError, match="not compiled"):
        InfluenceModel(small_mlp())


def test_unbatched_inputs_are_refused():
    influence_model = InfluenceModel(small_mlp(), loss_function=sparse_ce())
    x, y = classification_data()
    with pytest.raises(ValueError, match=r"\.batch\("):
        influence_model.batch_loss((x[0], y[0]))
    with pytest.raises(ValueError, match=r"unbatched"):
        influence_model.batch_jacobian_tensor((x[0], y[:1]))
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    from influenciae.data import check_dataset

    with pytest.raises(ValueError, match=r"\.batch\("):
        check_dataset(unbatched)


def test_targets_that_do_not_fit_outputs_are_refused():
    influence_model = InfluenceModel(small_mlp(), loss_function=sparse_ce())
    x, _ = classification_data()
    with pytest.raises(ValueError, match="targets fit"):
        influence_model.batch_loss((x, np.zeros((len(x), 3))))
    regression = keras.Sequential([keras.Input((6,), dtype=FLOAT), keras.layers.Dense(1, dtype=FLOAT)])

    def broadcasting_mse(y_true, y_pred):  # [B] - [B, 1] broadcasts to [B, B]: a classic silent bug
        return tf.reduce_mean(tf.square(tf.cast(y_true, y_pred.dtype) - y_pred), axis=-1)

    with pytest.raises(ValueError, match=r"do not fit model outputs"):
        InfluenceModel(regression, loss_function=broadcasting_mse).batch_loss((x, np.arange(len(x), dtype=float)))
    with pytest.raises(ValueError, match="batch size"):
        influence_model.batch_loss((x, np.zeros(len(x) - 1, dtype="int64")))


def test_non_finite_loss_is_refused():
    influence_model = InfluenceModel(small_mlp(), loss_function=sparse_ce())
    x, y = classification_data()
    x = x.copy()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        influence_model.batch_loss((x, y))


def test_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"model.build"):
        InfluenceModel(model, loss_function=sparse_ce())


def test_unknown_layer_name_and_bad_ranges():
    model = small_mlp()
    with pytest.raises(ValueError, match="not a layer of the model"):
        InfluenceModel(model, start_layer="nope", loss_function=sparse_ce())
    with pytest.raises(ValueError, match="out of range"):
        InfluenceModel(model, last_layer=7, loss_function=sparse_ce())
    with pytest.raises(ValueError, match="comes after"):
        InfluenceModel(model, start_layer=1, last_layer=0, loss_function=sparse_ce())
    with pytest.raises(ValueError, match="not both"):
        InfluenceModel(model, start_layer=1, weights_to_watch=[model.layers[1].kernel], loss_function=sparse_ce())


def test_empty_watched_weights_are_refused():
    model = keras.Sequential(
        [keras.Input((6,), dtype=FLOAT), keras.layers.Dense(3, dtype=FLOAT), keras.layers.Activation("relu")]
    )
    with pytest.raises(ValueError, match="no weights to watch"):
        InfluenceModel(model, start_layer=1, loss_function=sparse_ce())
    with pytest.raises(ValueError, match="no weights to watch"):
        InfluenceModel(model, weights_to_watch=[], loss_function=sparse_ce())


def test_integer_and_foreign_weights_are_refused():
    class Counting(keras.layers.Layer):
        def build(self, input_shape):
            self.count = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False)

        def call(self, inputs):
            return inputs

    model = keras.Sequential(
        [keras.Input((6,), dtype=FLOAT), Counting(dtype=FLOAT), keras.layers.Dense(3, dtype=FLOAT)]
    )
    with pytest.raises(TypeError, match="floating-point"):
        InfluenceModel(model, weights_to_watch=[model.layers[0].count], loss_function=sparse_ce())
    other = small_mlp(seed=1)
    with pytest.raises(ValueError, match="not the model's"):
        InfluenceModel(model, weights_to_watch=[other.layers[0].kernel], loss_function=sparse_ce())


def test_non_differentiable_path_is_refused():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype=FLOAT)
    hidden = keras.layers.Dense(4, dtype=FLOAT)(inputs)
    rounded = keras.layers.Lambda(lambda t: tf.stop_gradient(t), dtype=FLOAT)(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, dtype=FLOAT)(rounded))
    influence_model = InfluenceModel(model, loss_function=sparse_ce())
    x, y = classification_data()
    with pytest.raises(ValueError, match="No gradient flows"):
        influence_model.batch_jacobian_tensor((x, y))


def test_not_a_keras_model_and_bad_batches():
    with pytest.raises(TypeError, match="Keras model"):
        InfluenceModel(object())
    influence_model = InfluenceModel(small_mlp(), loss_function=sparse_ce())
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        influence_model.batch_loss(np.zeros((3, 6)))
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        from influenciae.data import check_dataset

        check_dataset([1, 2, 3])


def test_dataset_helpers_index_examples_in_order():
    from influenciae.data import with_indices

    x, y = classification_data(num_examples=11)
    ds = dataset(x, y, batch_size=4).filter(lambda a, b: True).prefetch(2)
    indices = np.concatenate([index.numpy() for index, _ in with_indices(ds)])
    np.testing.assert_array_equal(indices, np.arange(11))
    assert ExactL2(0.5).get_config() == {"factor": 0.5}


LEGACY_SCRIPT = """
import os, sys
import numpy as np
import tensorflow as tf
assert tf.keras.__name__.startswith("tf_keras"), tf.keras.__name__
from influenciae import InfluenceModel, FirstOrderInfluenceCalculator
from influenciae.data import from_numpy
tf.keras.utils.set_random_seed(0)
model = tf.keras.Sequential([tf.keras.layers.Dense(3, activation="tanh", input_shape=(4,)), tf.keras.layers.Dense(2)])
model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
x, y = rng.standard_normal((20, 4)).astype("float32"), rng.integers(0, 2, 20)
im = InfluenceModel(model)
train = from_numpy(x, y, batch_size=8)
values = FirstOrderInfluenceCalculator(im, train, damping=1.0).self_influence(train)
print("ok", values.shape, bool(np.all(values > 0)))
"""


@pytest.mark.slow
def test_tf_keras_through_the_legacy_environment_variable():
    pytest.importorskip("tf_keras")
    import subprocess
    import sys

    environment = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LEGACY_SCRIPT], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok (20,) True" in result.stdout
