"""Migration from the original Influenciae (deel-ai 0.3): docs/migration.md runs, and its tests' closed forms hold.

The ported tests keep the original test names (``tests/common/test_model_wrapper.py``,
``tests/influence/test_first_order_influence_calculator.py``, ``tests/influence/test_second_order_influence.py`` of
deel-ai/influenciae) and their ground truth, written here in float64 numpy for the two-layer network they use:
``f(x) = w₂ᵀ(W₁ᵀx)``, squared error, last layer watched, so ``∇ℓ = 2(f(x) − y)h`` and ``∇²ℓ = 2hhᵀ`` with
``h = W₁ᵀx``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from influenciae import (
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    SecondOrderInfluenceCalculator,
    compat,
)
from influenciae.model import MigrationWarning

DOC = Path(__file__).resolve().parents[1] / "docs" / "migration.md"
_BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def doc_blocks() -> list[str]:
    """The runnable python blocks of docs/migration.md: every one not titled as the original's code."""
    return [code for info, code in _BLOCK.findall(DOC.read_text(encoding="utf-8")) if "Influenciae 0.3" not in info]


def test_every_example_of_the_migration_page_runs(tmp_path, monkeypatch):
    blocks = doc_blocks()
    assert len(blocks) == 9  # setup, side by side, seven tried differences: a block lost from the page fails here
    monkeypatch.chdir(tmp_path)  # the side-by-side example writes its disk cache to "vecs"
    namespace: dict = {}
    for number, code in enumerate(blocks):
        try:
            exec(compile(code, f"docs/migration.md block {number}", "exec"), namespace)  # noqa: S102
        except Exception as error:  # pragma: no cover - the message names the failing block
            raise AssertionError(f"docs/migration.md python block {number} failed: {error!r}\n{code}") from error
    assert os.path.isdir(tmp_path / "vecs")
    assert namespace["indices"].shape == (20,) and namespace["relatif"].normalize is True


def test_the_table_lists_every_original_name_the_shims_cover():
    text = DOC.read_text(encoding="utf-8")
    for name in compat.__all__ + [
        "BatchSort",
        "batch_gradient_tensor",
        "MigrationWarning",
        "process_batch_for_loss_fn",
    ]:
        if name not in ("CACHE", "ORDER"):
            assert name in text, name


# ---------------------------------------------------------------------- the original's two-layer test network


def two_layer_problem(num_examples: int = 25, seed: int = 0):
    """The original tests' network ``Dense(2, no bias) -> Dense(1, no bias)`` with its closed forms, in float64."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(2, use_bias=False, dtype="float64"),
            keras.layers.Dense(1, use_bias=False, dtype="float64"),
        ]
    )
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((num_examples, 3)), rng.standard_normal((num_examples, 1))
    hidden = x @ model.layers[0].kernel.numpy()  # [N, 2]
    residual = hidden @ model.layers[1].kernel.numpy()[:, 0] - y[:, 0]
    gradients = 2.0 * residual[:, None] * hidden  # [N, 2]: ∇ℓ of the last layer
    hessians = 2.0 * hidden[:, :, None] * hidden[:, None, :]  # [N, 2, 2]
    return model, x, y, gradients, hessians


def mse():
    return keras.losses.MeanSquaredError(reduction="none")


def test_compute_influence_vector():
    """The original's test: influence vectors ``H⁻¹∇ℓ(z)``, with and without RelatIF normalization."""
    model, x, y, gradients, hessians = two_layer_problem()
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=mse())
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    ground_truth = gradients @ np.linalg.inv(hessians.mean(0))  # H is symmetric: rows H⁻¹∇ℓ(z)
    for normalize in (False, True):
        calculator = FirstOrderInfluenceCalculator(
            influence_model, train_set, ExactIHVP(influence_model, train_set, damping=0.0), normalize=normalize
        )
        vectors = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(train_set)])
        expected = ground_truth / np.linalg.norm(ground_truth, axis=1, keepdims=True) if normalize else ground_truth
        assert vectors.shape == (25, 2)
        np.testing.assert_allclose(vectors, expected, rtol=1e-9, atol=1e-12)


def test_compute_influence_values():
    """The original's test: self-influence ``∇ℓ(z)ᵀH⁻¹∇ℓ(z)``."""
    model, x, y, gradients, hessians = two_layer_problem()
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=mse())
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    calculator = FirstOrderInfluenceCalculator(influence_model, train_set, "exact", damping=0.0)
    expected = np.einsum("np,pq,nq->n", gradients, np.linalg.inv(hessians.mean(0)), gradients)
    np.testing.assert_allclose(calculator.self_influence(train_set), expected, rtol=1e-9)


def test_compute_influence_group():
    """The original's second-order group test; our vector is N times the original's ground truth."""
    model, x, y, gradients, hessians = two_layer_problem()
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=mse())
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    group = train_set.unbatch().take(5).batch(5)
    n_samples, fraction = 25, 0.2
    inverse = np.linalg.inv(hessians.mean(0))
    ihvp = inverse @ gradients[:5].sum(0)
    additive = (1.0 - 2.0 * fraction) / ((1 - fraction) ** 2 * n_samples) * ihvp
    pairwise = inverse @ (hessians[:5].sum(0) @ ihvp) / (n_samples**2 * (1.0 - fraction) ** 2)
    original = additive + pairwise
    calculator = SecondOrderInfluenceCalculator(influence_model, train_set, "exact", damping=0.0)
    vector = calculator.compute_influence_vector_group(group)
    np.testing.assert_allclose(vector.numpy(), n_samples * original, rtol=1e-9)
    np.testing.assert_allclose(compat.original_group_values(vector, calculator).numpy(), original, rtol=1e-9)


# ---------------------------------------------------------------------- the original's model-wrapper tests


def test_loss_calculation():
    """The original's test: ``f(x) = x² + x`` through an identity Dense, absolute error: losses [1, 1, 7]."""
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="identity"),
            keras.layers.Lambda(lambda t: t**2 + t),
        ]
    )
    x, y = np.array([[1.0], [0.0], [2.0]], "float32"), np.array([[1.0], [1.0], [-1.0]], "float32")
    influence_model = InfluenceModel(
        model, weights_to_watch=model.layers[0].weights, loss_function=keras.losses.MeanAbsoluteError(reduction="none")
    )
    losses = influence_model.batch_loss(tf.data.Dataset.from_tensor_slices((x, y)).batch(3))
    np.testing.assert_allclose(losses.numpy(), [1.0, 1.0, 7.0])


def _doubling_model():
    return keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="identity"),
            keras.layers.Lambda(lambda t: t * 2),
        ]
    )


def test_grad_calculation():
    """The original's test: per-batch gradient sums ``Σ (8x² − 4xy)`` (``batch_gradient_tensor`` here)."""
    influence_model = InfluenceModel(_doubling_model(), loss_function=mse())
    x, y = np.array([[1.0], [0.0], [0.0]], "float32"), np.array([[10.0], [0.0], [0.0]], "float32")
    expected = 8 * x[:, 0] ** 2 - 4 * x[:, 0] * y[:, 0]  # [-32, 0, 0]
    one_batch = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    per_example = tf.data.Dataset.from_tensor_slices((x, y)).batch(1)
    sums = tf.stack([influence_model.batch_gradient_tensor(batch) for batch in one_batch])
    np.testing.assert_allclose(sums.numpy(), [[expected.sum()]], rtol=1e-6)
    singles = tf.stack([influence_model.batch_gradient_tensor(batch) for batch in per_example])
    np.testing.assert_allclose(singles.numpy()[:, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(influence_model.batch_gradient((x, y)).numpy(), [expected.mean()], rtol=1e-6)
    with pytest.raises(TypeError, match="batch_gradient_tensor"):
        influence_model.batch_gradient(one_batch)


def test_jacobian_calculation():
    """The original's test: per-sample gradients ``8x² − 4xy`` whatever the batching."""
    influence_model = InfluenceModel(_doubling_model(), loss_function=mse())
    x, y = np.array([[1.0], [0.0], [0.0]], "float32"), np.array([[10.0], [0.0], [0.0]], "float32")
    expected = (8 * x**2 - 4 * x * y).astype("float64")
    for batch_size in (3, 1):
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        np.testing.assert_allclose(influence_model.batch_jacobian(dataset).numpy(), expected, rtol=1e-6)
    with pytest.raises(TypeError, match="batch_jacobian_tensor"):
        influence_model.batch_jacobian((x, y))


def _cnn(flatten_last: bool):
    layers = [keras.Input((5, 5, 1)), keras.layers.Conv2D(4, 2, activation="relu"), keras.layers.Flatten()]
    if flatten_last:
        layers += [keras.layers.Dense(20), keras.layers.Dense(10), keras.layers.Flatten()]
    else:
        layers += [keras.layers.Dense(20), keras.layers.Flatten(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def test_weights_default_targeting():
    """The original's test: by default the last layer with weights before the output layer (the output skipped)."""
    model = _cnn(flatten_last=True)
    assert compat.original_weights(model) == model.layers[-2].trainable_weights
    model2 = _cnn(flatten_last=False)
    assert compat.original_weights(model2) == model2.layers[-3].trainable_weights
    old = compat.original_influence_model(model2)
    assert old.nb_params == 64 * 20 + 20
    assert InfluenceModel(model2, loss_function=mse()).nb_params == 20 + 1300 + 210  # here: every weight
    y = keras.utils.to_categorical(np.arange(2) % 10, 10)
    assert old.batch_loss((np.ones((2, 5, 5, 1), "float32"), y)).shape == (2,)  # the original's default loss


def test_weights_targeting():
    """The original's test: ``start_layer`` by name."""
    model = keras.Sequential(
        [
            keras.Input((5, 5, 1)),
            keras.layers.Conv2D(4, 2, name="target"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    assert compat.original_weights(model, start_layer="target") == model.get_layer("target").trainable_weights
    only = InfluenceModel(model, start_layer="target", last_layer="target", loss_function=mse())
    assert only.weights == model.get_layer("target").trainable_weights


def test_targeting_multiple_layers():
    """The original's test: start_layer alone is one layer there; here it warns and ``last_layer=k`` is that layer."""
    layers = [
        keras.layers.Dense(2, name="d_test_0"),
        keras.layers.Dense(2, use_bias=False, name="d_test_1"),
        keras.layers.Dense(1, name="d_test_2"),
    ]
    model = keras.Sequential([keras.Input((2,)), *layers])
    for index, layer in enumerate(layers):
        for key in (index, layer.name):
            assert compat.original_weights(model, start_layer=key) == layer.trainable_weights
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # giving last_layer never warns
                single = InfluenceModel(model, start_layer=key, last_layer=key, loss_function=mse())
            assert single.weights == layer.trainable_weights
    with pytest.raises(ValueError, match="whatev"):
        compat.original_weights(model, start_layer="whatev")
    # only last_layer: from the default start (the layer before the output) to it
    assert compat.original_weights(model, last_layer=2) == layers[1].trainable_weights + layers[2].trainable_weights
    assert compat.original_weights(model, start_layer=0, last_layer=1) == [
        *layers[0].trainable_weights,
        layers[1].kernel,
    ]


# ---------------------------------------------------------------------- items (b), (c), (f), (g) of the migration


def test_start_layer_alone_warns_exactly_when_the_original_watched_less():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    with pytest.warns(MigrationWarning, match=r"layers 0 to the end \(9 parameters\).*layer 0 only \(6 parameters\)"):
        wide = InfluenceModel(model, start_layer=0, loss_function=mse())
    assert wide.nb_params == 9  # unchanged meaning: layers 0..end
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert InfluenceModel(model, start_layer=-1, loss_function=mse()).nb_params == 3  # one layer either way
        assert InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=mse()).nb_params == 9
        assert InfluenceModel(model, start_layer=0, last_layer=0, loss_function=mse()).nb_params == 6
        assert InfluenceModel(model, last_layer=-1, loss_function=mse()).nb_params == 9


def test_default_selection_warns_once_with_both_counts(monkeypatch):
    """``InfluenceModel(model)`` watches everything; the original watched the last weighted layer before the output."""
    from influenciae.model import migration as model_module

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5, 5, 1)), keras.layers.Conv2D(4, 2), keras.layers.Flatten(), keras.layers.Dense(3),
         keras.layers.Dense(2)]
    )  # fmt: skip
    monkeypatch.setattr(model_module, "_DEFAULT_WATCH_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        everything = InfluenceModel(model, loss_function=mse())
        InfluenceModel(model, loss_function=mse())  # once per process, not once per model
    said = [str(w.message) for w in caught if w.category is MigrationWarning]
    original = compat.original_influence_model(model, loss_function=mse())
    assert (everything.nb_params, original.nb_params) == (20 + 195 + 8, 195)
    assert len(said) == 1 and "(223 parameters)" in said[0] and f"layer 2 ('{model.layers[2].name}', 195" in said[0]
    monkeypatch.setattr(model_module, "_DEFAULT_WATCH_WARNED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice, or a model where both rules agree, says nothing
        assert InfluenceModel(model, last_layer=-1, loss_function=mse()).nb_params == 223
        one_layer = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        assert InfluenceModel(one_layer, loss_function=mse()).nb_params == 8


def test_relatif_takes_only_a_bool():
    model, x, y, _, _ = two_layer_problem(num_examples=10)
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=mse())
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    with pytest.raises(TypeError, match="shuffle_buffer_size.*normalize="):
        FirstOrderInfluenceCalculator(influence_model, train_set, "exact", 10, 10)  # the original's positional call
    for value in (1, "yes", None):
        with pytest.raises(TypeError, match="normalize"):
            FirstOrderInfluenceCalculator(influence_model, train_set, "exact", normalize=value)
    assert FirstOrderInfluenceCalculator(influence_model, train_set, "exact", 10, np.bool_(True)).normalize is True
    with pytest.raises(TypeError):
        SecondOrderInfluenceCalculator(influence_model, train_set, "exact", 10, 10)  # no shuffle_buffer_size either


def test_removed_attributes_say_what_replaced_them():
    model, *_ = two_layer_problem(num_examples=4)
    influence_model = InfluenceModel(model, loss_function=mse())
    assert influence_model.layers == model.layers
    for name in ("process_batch_for_loss_fn", "weights_processed", "start_layer"):
        with pytest.raises(AttributeError, match="is gone"):
            getattr(influence_model, name)
        assert not hasattr(influence_model, name)
    with pytest.raises(AttributeError, match="StreamingTopK"):
        compat.BatchSort([1, 2])
    with pytest.raises(AttributeError, match="ConjugateGradientDescentIHVP"):
        compat.conjugate_gradients_solve.anything  # noqa: B018


@pytest.mark.parametrize(
    ("loss", "closed_form"),
    [
        (tf_keras.losses.BinaryCrossentropy, lambda p, y: -(y * np.log(p) + (1 - y) * np.log(1 - p))),
        (tf_keras.losses.MeanSquaredError, lambda p, y: (p - y) ** 2),
    ],
)
def test_legacy_losses_with_rank_one_targets(loss, closed_form):
    legacy = tf_keras.Sequential([tf_keras.layers.Dense(1, activation="sigmoid", input_shape=(3,))])
    x = np.random.default_rng(0).standard_normal((6, 3)).astype("float32")
    y = np.array([0, 1, 1, 0, 1, 0], "float32")
    influence_model = InfluenceModel(legacy, loss_function=loss(reduction=tf_keras.losses.Reduction.NONE))
    expected = closed_form(legacy(x).numpy()[:, 0].astype("float64"), y)
    np.testing.assert_allclose(influence_model.batch_loss((x, y)).numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(influence_model.batch_loss((x, y[:, None])).numpy(), expected, rtol=1e-4)
    per_sample = influence_model.batch_jacobian_tensor((x, y)).numpy()
    np.testing.assert_allclose(per_sample, influence_model.batch_jacobian_tensor((x, y[:, None])).numpy(), rtol=1e-5)


def test_legacy_sparse_losses_are_left_alone():
    legacy = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(2,))])
    x = np.random.default_rng(1).standard_normal((4, 2)).astype("float32")
    y = np.array([0, 2, 1, 2])
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=tf_keras.losses.Reduction.NONE)
    logits = legacy(x).numpy().astype("float64")
    expected = np.log(np.exp(logits).sum(1)) - logits[np.arange(4), y]
    np.testing.assert_allclose(
        InfluenceModel(legacy, loss_function=loss).batch_loss((x, y)).numpy(), expected, rtol=1e-5
    )


# ---------------------------------------------------------------------- compat helpers


def test_compute_ihvp_and_hvp_keep_the_original_column_layout():
    model, x, y, gradients, hessians = two_layer_problem(num_examples=12)
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=mse())
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)  # partial last batch
    solver = ExactIHVP(influence_model, train_set, damping=0.0)
    columns = [c.numpy() for c in compat.compute_ihvp(solver, train_set)]
    assert [c.shape for c in columns] == [(2, 5), (2, 5), (2, 2)]
    np.testing.assert_allclose(np.concatenate(columns, 1), np.linalg.inv(hessians.mean(0)) @ gradients.T, rtol=1e-9)
    vectors = tf.data.Dataset.from_tensor_slices((gradients,)).batch(4)
    products = np.concatenate([c.numpy() for c in compat.compute_hvp(solver, vectors, use_gradient=False)], 1)
    np.testing.assert_allclose(products, hessians.mean(0) @ gradients.T, rtol=1e-9)


def test_utils_helpers():
    model = _cnn(flatten_last=False)
    assert compat.from_layer_name_to_layer_idx(model, model.layers[2].name) == 2
    assert compat.find_layer(model, -1) is model.layers[-1]
    x, y = np.arange(14.0).reshape(7, 2), np.arange(7)
    dataset = compat.array_to_dataset((x, y), batch_size=3).filter(lambda a, b: tf.reduce_all(b >= 0))  # unknown size
    assert compat.dataset_size(dataset) == 7
    inputs, targets = compat.dataset_to_tensor(dataset)
    np.testing.assert_array_equal(inputs.numpy(), x)
    np.testing.assert_array_equal(targets.numpy(), y)
    only_inputs = compat.dataset_to_tensor(tf.data.Dataset.from_tensor_slices(x).batch(4))  # not a tuple
    np.testing.assert_array_equal(only_inputs.numpy(), x)
    shuffled = compat.dataset_to_tensor(compat.array_to_dataset((x, y), batch_size=3, shuffle=True))[1].numpy()
    assert sorted(shuffled) == list(y)
