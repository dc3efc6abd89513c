"""Language-model influence: token losses with masks, query measurements, per-token and per-layer breakdowns."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel, TracIn, TracInCP, TrakCalculator
from influenciae.influence.breakdown import layer_blocks, per_layer_influence, per_token_influence
from influenciae.influence.trak import MarginOutput
from influenciae.language import (
    Measurement,
    completion_log_probability,
    logit_margin,
    mask_in_targets,
    target_logit,
    token_cross_entropy,
)

VOCAB, LENGTH, PAD = 6, 5, 0
DAMP = 1.0  # above the most negative Hessian eigenvalue of the untrained tiny LM


def tiny_lm(seed: int = 0) -> keras.Model:
    """Embedding -> tanh Dense -> Dense logits [B, T, V], float64 (57 parameters)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 3, dtype="float64", name="embed"),
            keras.layers.Dense(3, activation="tanh", dtype="float64", name="hidden"),
            keras.layers.Dense(VOCAB, dtype="float64", name="head"),
        ]
    )
    return model


def sequences(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(count, LENGTH + 1)).astype("int32")
    targets = tokens[:, 1:].copy()
    for row in range(count):  # ragged sequences: the last positions are padding
        cut = rng.integers(2, LENGTH + 1)
        targets[row, cut:] = PAD
    return tokens[:, :-1], targets


@pytest.fixture(scope="module")
def problem():
    model = tiny_lm()
    x, y = sequences(6, seed=1)
    qx, qy = sequences(2, seed=2)
    qy[:, :-1] = PAD  # the query measures the last token only: its "completion"
    qy[:, -1] = [3, 4]
    im = InfluenceModel(model, loss_function=token_cross_entropy(pad_id=PAD))
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    test = tf.data.Dataset.from_tensor_slices((qx, qy)).batch(2)
    return model, im, train, test, (x, y, qx, qy)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_token_cross_entropy_masked_mean_and_sum_match_numpy(problem):
    model, _, _, _, (x, y, _, _) = problem
    logits = model(x).numpy()
    log_probabilities = np.take_along_axis(_log_softmax(logits), y[..., None], axis=-1)[..., 0]
    mask = (y != PAD).astype(float)
    expected_sum = -(log_probabilities * mask).sum(1)
    np.testing.assert_allclose(token_cross_entropy(pad_id=PAD, reduction="sum")(y, logits), expected_sum, rtol=1e-12)
    np.testing.assert_allclose(token_cross_entropy(pad_id=PAD)(y, logits), expected_sum / mask.sum(1), rtol=1e-12)
    # an explicit mask in the targets gives the same loss as the pad id
    np.testing.assert_allclose(token_cross_entropy()((y, mask), logits), expected_sum / mask.sum(1), rtol=1e-12)
    # Keras's fit hands the loss float targets
    np.testing.assert_allclose(
        token_cross_entropy(pad_id=PAD, reduction="sum")(y.astype("float32"), logits), expected_sum
    )
    terms = token_cross_entropy(pad_id=PAD).token_losses(y, logits).numpy()
    assert np.all(terms[mask == 0] == 0)
    np.testing.assert_allclose(terms.sum(1), expected_sum / mask.sum(1), rtol=1e-12)


def test_mask_in_targets_moves_the_mask(problem):
    _, im, _, _, (x, y, _, _) = problem
    mask = (y != PAD).astype("float64")
    dataset = mask_in_targets(tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(3))
    explicit = InfluenceModel(im.model, loss_function=token_cross_entropy())
    losses = np.concatenate([explicit.batch_loss(batch).numpy() for batch in dataset])
    np.testing.assert_allclose(losses, im.batch_loss((x, y)).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="third"):
        mask_in_targets(tf.data.Dataset.from_tensor_slices((x, y)).batch(3))


def test_measurements_match_numpy(problem):
    model, _, _, _, (_, _, qx, qy) = problem
    logits = model(qx).numpy()
    rows = np.arange(len(qy))
    last = logits[:, -1]
    log_probability = _log_softmax(last)[rows, qy[:, -1]]
    np.testing.assert_allclose(completion_log_probability(pad_id=PAD)(logits, qy), log_probability, rtol=1e-12)
    others = last.copy()
    others[rows, qy[:, -1]] = -np.inf
    margin = last[rows, qy[:, -1]] - others.max(1)
    np.testing.assert_allclose(logit_margin(pad_id=PAD)(logits, qy), margin, rtol=1e-12)
    np.testing.assert_allclose(target_logit(pad_id=PAD)(logits, qy), last[rows, qy[:, -1]], rtol=1e-12)
    assert completion_log_probability().higher_is_better and Measurement(np.sum, higher_is_better=False).sign == 1.0


def _loss_as_measurement(im):
    return lambda outputs, targets: im.loss_function(targets, outputs)


@pytest.mark.slow
def test_measurement_equal_to_training_loss_reproduces_scores(problem):
    _, im, train, test, _ = problem
    plain = FirstOrderInfluenceCalculator(im, train, damping=DAMP)
    measured = FirstOrderInfluenceCalculator(im, train, damping=DAMP, measurement=_loss_as_measurement(im))
    expected = plain.influence_matrix(test, train)
    np.testing.assert_allclose(measured.influence_matrix(test, train), expected, rtol=1e-10, atol=1e-12)
    tracin = TracIn([im], 0.5).influence_matrix(test, train)
    tracin_measured = TracIn([im], 0.5, measurement=_loss_as_measurement(im)).influence_matrix(test, train)
    np.testing.assert_allclose(tracin_measured, tracin, rtol=1e-10, atol=1e-12)


def classifier_problem():
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="float64", name="dense")])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)), rng.integers(0, 3, size=20)
    return classifier, tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


@pytest.mark.slow
def test_trak_measurement_reproduces_its_output_function():
    classifier, data = classifier_problem()
    margin = MarginOutput()
    default = TrakCalculator(classifier, data, projection_dim=None, damping=1e-3)
    measured = TrakCalculator(
        classifier,
        data,
        projection_dim=None,
        damping=1e-3,
        measurement=Measurement(lambda o, t: margin.output(o, t), higher_is_better=True),
    )
    expected = default.influence_matrix(data.take(1), data)
    np.testing.assert_allclose(measured.influence_matrix(data.take(1), data), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_higher_is_better_flips_the_sign_and_matches_a_closed_form(problem):
    _, im, train, test, (x, y, qx, qy) = problem
    measurement = completion_log_probability(pad_id=PAD)
    calculator = FirstOrderInfluenceCalculator(im, train, damping=DAMP, measurement=measurement)
    scores = calculator.influence_matrix(test, train)
    as_loss = FirstOrderInfluenceCalculator(im, train, damping=DAMP, measurement=measurement.function)
    np.testing.assert_allclose(as_loss.influence_matrix(test, train), -scores, rtol=1e-10, atol=1e-12)
    # closed form: -∇f(x)ᵀ (H + λI)⁻¹ ∇ℓ(z) with H from tape.hessians of the mean training loss
    weights = [w.value for w in im.weights]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(im.loss_function(y, im.model(x)))
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, weights)], 0)
    hessian = tf.concat(
        [tf.reshape(block, [im.nb_params, -1]) for block in outer.jacobian(gradient, weights)], axis=1
    ).numpy()
    train_gradients = im.batch_jacobian_tensor((x, y)).numpy()
    query_gradients = np.stack(
        [
            InfluenceModel(im.model, loss_function=lambda t, o: measurement(o, t))
            .batch_jacobian_tensor((qx[i : i + 1], qy[i : i + 1]))
            .numpy()[0]
            for i in range(len(qx))
        ]
    )
    expected = -query_gradients @ np.linalg.solve(hessian + DAMP * np.eye(im.nb_params), train_gradients.T)
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["first_order", "tracin"])
def test_per_token_influence_sums_to_the_scores(problem, family):
    model, im, train, test, (_, y, _, _) = problem
    measurement = completion_log_probability(pad_id=PAD)
    if family == "first_order":
        calculator = FirstOrderInfluenceCalculator(im, train, damping=DAMP, measurement=measurement)
    else:
        other = keras.models.clone_model(model)
        other.set_weights([w * 0.9 for w in model.get_weights()])
        second = InfluenceModel(other, loss_function=token_cross_entropy(pad_id=PAD))
        calculator = TracIn([im, second], [0.5, 0.25], measurement=measurement)
    tokens = per_token_influence(calculator, test, train)
    assert tokens.shape == (2, 6, LENGTH)
    np.testing.assert_allclose(tokens.sum(-1), calculator.influence_matrix(test, train), rtol=1e-6, atol=1e-10)
    assert np.all(tokens[:, y == PAD] == 0), "padding tokens carry no influence"
    assert np.abs(tokens[:, y != PAD]).min() > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["first_order", "tracin"])
def test_per_layer_influence_sums_to_the_scores(problem, family):
    _, im, train, test, _ = problem
    measurement = logit_margin(pad_id=PAD)
    if family == "first_order":
        calculator = FirstOrderInfluenceCalculator(im, train, damping=DAMP, measurement=measurement)
    else:
        calculator = TracIn([im], 0.3, measurement=measurement)
    layers = per_layer_influence(calculator, test, train)
    assert [name.split("/")[-1] for name in layers] == ["embed", "hidden", "head"]
    total = np.sum(list(layers.values()), axis=0)
    np.testing.assert_allclose(total, calculator.influence_matrix(test, train), rtol=1e-6, atol=1e-10)
    by_weight = per_layer_influence(calculator, test, train, by="weight")
    assert len(by_weight) == 5
    head = [name for name in layers if name.endswith("head")][0]
    np.testing.assert_allclose(by_weight[f"{head}/kernel"] + by_weight[f"{head}/bias"], layers[head], rtol=1e-10)


@pytest.mark.slow
def test_per_layer_influence_of_trak_without_projection():
    classifier, data = classifier_problem()
    calculator = TrakCalculator(classifier, data, projection_dim=None, damping=1e-3, measurement=logit_margin())
    layers = per_layer_influence(calculator, data.take(1), data, by="weight")
    assert [name.split("/")[-1] for name in layers] == ["kernel", "bias"]
    kernel, bias = layers.values()
    total = kernel + bias
    np.testing.assert_allclose(total, calculator.influence_matrix(data.take(1), data), rtol=1e-6, atol=1e-10)
    assert np.abs(bias).max() > 0


def test_layer_blocks_tile_the_parameters(problem):
    _, im, _, _, _ = problem
    slices = [s for blocks in layer_blocks(im).values() for s in blocks]
    assert slices[0][0] == 0 and slices[-1][1] == im.nb_params
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))


@pytest.mark.slow
def test_breakdowns_reject_what_they_cannot_split(problem):
    model, im, train, test, _ = problem
    sparse = InfluenceModel(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="float64")]),
        loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"),
    )
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(8, 4)), rng.integers(0, 3, size=8))).batch(4)
    with pytest.raises(ValueError, match="token_cross_entropy"):
        per_token_influence(FirstOrderInfluenceCalculator(sparse, data, damping=DAMP), data, data)
    with pytest.raises(ValueError, match="normalize"):
        per_token_influence(FirstOrderInfluenceCalculator(im, train, damping=DAMP, normalize=True), test, train)
    classifier, classes = classifier_problem()
    with pytest.raises(ValueError, match="projection_dim=None"):
        per_layer_influence(TrakCalculator(classifier, classes, projection_dim=4, damping=DAMP), classes, classes)
    with pytest.raises(TypeError, match="measurement"):
        FirstOrderInfluenceCalculator(im, train, measurement="log_prob")
    with pytest.raises(TypeError, match="integer"):
        token_cross_entropy()(np.array([["a", "b"]]), np.zeros((1, 2, 4)))


@pytest.mark.slow
def test_tracincp_from_files_takes_the_measurement_like_tracin(problem, tmp_path):
    model, im, train, test, _ = problem
    other = keras.models.clone_model(model)
    other.set_weights([w * 0.8 for w in model.get_weights()])
    paths = [str(tmp_path / "a.keras"), str(tmp_path / "b.keras")]
    model.save(paths[0])
    other.save(paths[1])
    measurement = logit_margin(pad_id=PAD)  # (the completion's log-probability would equal the masked query's loss)
    loss = token_cross_entropy(pad_id=PAD)
    stored = TracInCP(paths, [0.5, 0.25], loss_function=loss, measurement=measurement)
    in_memory = TracIn(
        [im, InfluenceModel(other, loss_function=loss)], [0.5, 0.25], measurement=measurement
    ).influence_matrix(test, train)
    np.testing.assert_allclose(stored.influence_matrix(test, train), in_memory, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(per_token_influence(stored, test, train).sum(-1), in_memory, rtol=1e-6, atol=1e-10)
    plain = TracIn([im, InfluenceModel(other, loss_function=loss)], [0.5, 0.25]).influence_matrix(test, train)
    assert not np.allclose(plain, in_memory), "the measurement changes the scores"


GPT2_SCRIPT = """
import numpy as np, tensorflow as tf
from benchmarks.language_model import build_model
from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.influence.breakdown import per_layer_influence, per_token_influence
from influenciae.language import completion_log_probability, token_cross_entropy
V, T = 64, 8
model = build_model(V, 16, 1, 2, T)
rng = np.random.default_rng(0)
tokens = rng.integers(1, V, size=(12, T + 1)).astype("int32")
y = tokens[:, 1:].copy()
y[:3, -2:] = 0
q = rng.integers(1, V, size=(2, T + 1)).astype("int32")
qy = np.zeros([2, T], "int32")
qy[:, -1] = q[:, -1]
im = InfluenceModel(model, loss_function=token_cross_entropy(pad_id=0))
train = tf.data.Dataset.from_tensor_slices((tokens[:, :-1], y)).batch(6)
test = tf.data.Dataset.from_tensor_slices((q[:, :-1], qy)).batch(2)
calculator = FirstOrderInfluenceCalculator(
    im, train, ihvp_calculator="ekfac", damping=1e-3, measurement=completion_log_probability(pad_id=0)
)
total = calculator.influence_matrix(test, train)
per_token = per_token_influence(calculator, test, train)
per_layer = per_layer_influence(calculator, test, train)
scale = np.abs(total).max()
assert scale > 0
assert np.abs(per_token.sum(-1) - total).max() <= 1e-4 * scale
assert np.abs(sum(per_layer.values()) - total).max() <= 1e-4 * scale
assert np.all(per_token[:, y == 0] == 0)
print("ok", len(per_layer))
"""


@pytest.mark.slow
def test_breakdowns_on_a_gpt2_backbone_in_a_subprocess():
    """Attention models go through TF's pfor, which may abort an interpreter: run them in a child process."""
    pytest.importorskip("keras_hub")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", GPT2_SCRIPT], cwd=root, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("ok")
