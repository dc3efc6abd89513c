"""K-FAC/EK-FAC layer coverage for sequence models: EinsumDense, Dense on [B, T, D], Conv1D, Embedding on sequences,
MultiHeadAttention and (when installed) a KerasHub BERT backbone.

Models with MultiHeadAttention or KerasHub run in a subprocess: TensorFlow's pfor can abort the interpreter on
attention models, and a crash must fail the test, not kill pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import FLOAT, dataset, exact_softmax_ggn, kron_basis, sparse_ce

from influenciae import EKFACIHVP, InfluenceModel
from influenciae.hessian import DiagonalIHVP
from influenciae.model.capture import LayerCapture

CLASSES = 3
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------- models (in process: no attention)


def _einsum():
    """EinsumDense alone: MHA's two equations, an ellipsis, and a bias broadcast over a column axis (uncovered)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3), dtype=FLOAT)
    hidden = keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de", activation="tanh", dtype=FLOAT)(
        inputs
    )
    hidden = keras.layers.EinsumDense("abcd,cde->abe", (4, 3), bias_axes="e", activation="tanh", dtype=FLOAT)(hidden)
    hidden = keras.layers.EinsumDense("...b,bc->...c", 5, bias_axes="c", dtype=FLOAT)(hidden)
    hidden = keras.layers.EinsumDense("abc,dc->abd", (4, 3), bias_axes="d", activation="tanh", dtype=FLOAT)(hidden)
    hidden = keras.layers.EinsumDense("abc,cde->abde", (4, 2, 2), bias_axes="e", dtype=FLOAT)(hidden)
    hidden = keras.layers.Flatten(dtype=FLOAT)(hidden)
    outputs = keras.layers.EinsumDense("ab,bc->ac", CLASSES, bias_axes="c", dtype=FLOAT)(hidden)
    rng = np.random.default_rng(0)
    return keras.Model(inputs, outputs), rng.standard_normal((7, 4, 3)), rng.integers(0, CLASSES, 7)


def _sequence_dense():
    """Dense on [B, T, D] and on [B, T, S, D], a LayerNormalization (diagonal block), pooling, Dense head."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3, 2, 4), dtype=FLOAT)
    hidden = keras.layers.Dense(5, activation="tanh", dtype=FLOAT)(inputs)  # [B, 3, 2, 5]
    hidden = keras.layers.Reshape((6, 5), dtype=FLOAT)(hidden)
    hidden = keras.layers.LayerNormalization(dtype=FLOAT)(hidden)
    hidden = keras.layers.Dense(4, activation="relu", dtype=FLOAT)(hidden)  # [B, 6, 4]
    hidden = keras.layers.GlobalAveragePooling1D(dtype=FLOAT)(hidden)
    outputs = keras.layers.Dense(CLASSES, dtype=FLOAT)(hidden)
    rng = np.random.default_rng(1)
    return keras.Model(inputs, outputs), rng.standard_normal((7, 3, 2, 4)), rng.integers(0, CLASSES, 7)


def _conv1d():
    """Conv1D same (dilated), valid with stride, causal without bias, same with stride."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((9, 2), dtype=FLOAT)
    hidden = keras.layers.Conv1D(3, 3, padding="same", dilation_rate=2, activation="relu", dtype=FLOAT)(inputs)
    hidden = keras.layers.Conv1D(3, 2, strides=2, padding="valid", activation="tanh", dtype=FLOAT)(hidden)
    hidden = keras.layers.Conv1D(2, 3, padding="causal", use_bias=False, dtype=FLOAT)(hidden)
    hidden = keras.layers.Conv1D(2, 3, strides=2, padding="same", dtype=FLOAT)(hidden)
    hidden = keras.layers.Flatten(dtype=FLOAT)(hidden)
    outputs = keras.layers.Dense(CLASSES, dtype=FLOAT)(hidden)
    rng = np.random.default_rng(2)
    return keras.Model(inputs, outputs), rng.standard_normal((7, 9, 2)), rng.integers(0, CLASSES, 7)


def _masked_embedding():
    """Embedding(mask_zero=True) on padded sequences: the mask reaches the pooling, padded tokens get no gradient."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Embedding(9, 4, mask_zero=True, dtype=FLOAT)(inputs)
    hidden = keras.layers.Dense(5, activation="tanh", dtype=FLOAT)(hidden)
    hidden = keras.layers.GlobalAveragePooling1D(dtype=FLOAT)(hidden)
    outputs = keras.layers.Dense(CLASSES, dtype=FLOAT)(hidden)
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 9, (7, 6)).astype("int32")
    for row, length in enumerate([6, 4, 2, 5, 1, 3, 6]):
        tokens[row, length:] = 0
    return keras.Model(inputs, outputs), tokens, rng.integers(0, CLASSES, 7)


MODELS = {
    "einsum": _einsum,
    "sequence_dense": _sequence_dense,
    "conv1d": _conv1d,
    "masked_embedding": _masked_embedding,
}
KINDS = {
    "einsum": ({"einsum_dense"}, ["bias"]),
    "sequence_dense": ({"dense"}, ["gamma", "beta"]),
    "conv1d": ({"conv1d", "dense"}, []),
    "masked_embedding": ({"embedding", "dense"}, []),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def problem(request):
    model, x, y = MODELS[request.param]()
    return request.param, InfluenceModel(model, loss_function=sparse_ce()), x, y


# ---------------------------------------------------------------------- capture = per-sample gradients


def test_rebuilt_per_example_gradients_equal_the_jacobian(problem):
    name, im, x, y = problem
    capture = LayerCapture(im, chunk_size=3)  # 7 examples: chunks of 3, 3 and a padded 1
    kinds, uncovered = KINDS[name]
    assert {layer.kind for layer in capture.layers} == kinds
    assert [weight.split("/")[-1] for weight in capture.uncovered_weight_names] == uncovered
    covered = sum(layer.num_params for layer in capture.layers) + capture.uncovered_parameter_indices.size
    assert covered == im.nb_params
    reference = im.batch_jacobian_tensor((x, y)).numpy()
    assert np.abs(reference).max() > 1e-3
    np.testing.assert_allclose(capture.per_example_gradients((x, y)).numpy(), reference, rtol=1e-10, atol=1e-10)


def test_einsum_blocks_are_the_contracted_axes():
    model, _, _ = _einsum()
    im = InfluenceModel(model, loss_function=sparse_ce())
    capture = LayerCapture(im)
    shapes = [(layer.num_rows, layer.num_columns, layer.has_bias) for layer in capture.layers]
    # abc,cde->abde: rows c (+bias), columns d·e; abcd,cde->abe: rows c·d (+bias); abc,dc->abd: rows c, columns d;
    # the bias "e" of the last abde layer is broadcast over d, so it is no column bias
    assert shapes == [(4, 6, True), (7, 3, True), (4, 5, True), (6, 3, True), (3, 4, False), (17, 3, True)]
    flat = im.get_weights_vector().numpy()
    for block, matrix in (
        (capture.layers[1], model.layers[2].kernel.numpy().reshape(6, 3)),
        (capture.layers[3], model.layers[4].kernel.numpy().T),
    ):  # dc: W[c, d] = kernel[d, c]
        rows = block.num_rows - 1
        np.testing.assert_array_equal(flat[block.parameter_indices].reshape(block.num_rows, -1)[:rows], matrix)


def test_padding_tokens_get_no_gradient():
    model, x, y = _masked_embedding()
    im = InfluenceModel(model, loss_function=sparse_ce())
    capture = LayerCapture(im)
    gradients = capture.per_example_gradients((x, y)).numpy()
    embedding = capture.layers[0]
    assert embedding.kind == "embedding" and embedding.num_rows == 9
    rows = gradients[:, embedding.parameter_indices].reshape(len(x), 9, 4)
    np.testing.assert_array_equal(rows[:, 0], 0.0)  # token 0 is masked out of the pooling
    assert np.abs(rows[:, 1:]).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["einsum", "conv1d", "sequence_dense"])
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_eigenbasis(name):
    model, x, y = MODELS[name]()
    im = InfluenceModel(model, loss_function=sparse_ce())
    ggn = exact_softmax_ggn(im, x, CLASSES)
    ekfac = EKFACIHVP(im, dataset(x, y, batch_size=4)).fit()  # batches 4 + 3: the second one is padded
    diagonal = DiagonalIHVP(im, dataset(x, y, batch_size=5)).fit()
    assert {block.kind for block in ekfac.blocks} == KINDS[name][0] | ({"diagonal"} if KINDS[name][1] else set())
    for block, plain in zip(ekfac.blocks, diagonal.blocks, strict=True):
        indices = block.parameter_indices
        basis = kron_basis(block)
        in_basis = np.diag(basis.T @ ggn[np.ix_(indices, indices)] @ basis).reshape(block.rows, block.columns)
        np.testing.assert_allclose(block.eigenvalues, in_basis, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(plain.eigenvalues.ravel(), np.diag(ggn)[plain.parameter_indices], atol=1e-14)


def test_capture_rejects_a_bad_chunk_size():
    model, _, _ = _conv1d()
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        LayerCapture(InfluenceModel(model, loss_function=sparse_ce()), chunk_size=0)


# ---------------------------------------------------------------------- attention and KerasHub, in a subprocess


def _run(code: str, timeout: float = 600.0) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one ``RESULT <json>`` line. A crash fails the test."""
    environment = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), TF_CPP_MIN_LOG_LEVEL="2"
    )
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=TESTS.parent,
    )
    assert completed.returncode == 0, f"exit code {completed.returncode}\n{completed.stderr[-4000:]}"
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, completed.stdout[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


MHA_CODE = """
import json
import keras
import numpy as np
import tensorflow as tf
from helpers import FLOAT, dataset, fit, sparse_ce
from scipy.stats import spearmanr
from influenciae import EKFACIHVP, InfluenceModel
from influenciae.model.capture import LayerCapture

keras.utils.set_random_seed(0)
inputs = keras.Input((6,), dtype="int32")
embedded = keras.layers.Embedding(12, 4, mask_zero=True, dtype=FLOAT)(inputs)
attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, dtype=FLOAT)(embedded, embedded)
hidden = keras.layers.LayerNormalization(dtype=FLOAT)(attended + embedded)
pooled = keras.layers.GlobalAveragePooling1D(dtype=FLOAT)(hidden)
outputs = keras.layers.Dense(3, dtype=FLOAT)(pooled)
model = keras.Model(inputs, outputs)
rng = np.random.default_rng(0)
size = 120  # N (C - 1) = 240 > P = 151: the GGN is not rank-deficient
x = rng.integers(1, 12, (size, 6)).astype("int32")
for row in range(size):
    x[row, rng.integers(2, 7):] = 0
y = (x[:, 0] % 3).astype("int64")
fit(model, x, y, steps=60)
im = InfluenceModel(model, loss_function=sparse_ce())
capture = LayerCapture(im, chunk_size=4)
rebuilt = capture.per_example_gradients((x[:10], y[:10])).numpy()
reference = im.batch_jacobian_tensor((x[:10], y[:10])).numpy()
error = float(np.abs(rebuilt - reference).max())

damping = 0.1
ekfac = EKFACIHVP(im, dataset(x, y, batch_size=32), damping=damping)
gradients = im.batch_jacobian_tensor((x, y)).numpy()
solved = ekfac.solve(gradients).numpy()
influence = gradients[:10] @ solved[10:].T
self_influence = (gradients * solved).sum(axis=1)

with tf.GradientTape() as tape:
    logits = model(x, training=False)
jacobians = tape.jacobian(logits, im.weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
jacobian = np.concatenate([tf.reshape(j, [len(x), 3, -1]).numpy() for j in jacobians], axis=2)
p = tf.nn.softmax(logits).numpy()
hessians = np.stack([np.diag(q) - np.outer(q, q) for q in p])
ggn = np.einsum("ncp,ncd,ndq->pq", jacobian, hessians, jacobian) / len(x)
inverse = np.linalg.inv(ggn + damping * np.eye(len(ggn)))
exact = gradients[:10] @ inverse @ gradients[10:].T
exact_self = np.einsum("ip,pq,iq->i", gradients, inverse, gradients)
block_diagonal = np.zeros_like(ggn)
for block in ekfac.blocks:
    block_diagonal[np.ix_(block.parameter_indices, block.parameter_indices)] = ggn[
        np.ix_(block.parameter_indices, block.parameter_indices)
    ]
exact_blocks = gradients[:10] @ np.linalg.solve(block_diagonal + damping * np.eye(len(ggn)), gradients[10:].T)
print("RESULT " + json.dumps({
    "error": error,
    "scale": float(np.abs(reference).max()),
    "kinds": sorted({layer.kind for layer in capture.layers}),
    "kronecker": sorted(layer.name for layer in capture.layers),
    "diagonal": capture.uncovered_weight_names,
    "spearman": float(spearmanr(influence.ravel(), exact.ravel())[0]),
    "spearman_self": float(spearmanr(self_influence, exact_self)[0]),
    "spearman_blocks": float(spearmanr(influence.ravel(), exact_blocks.ravel())[0]),
    "spearman_exact_blocks": float(spearmanr(exact_blocks.ravel(), exact.ravel())[0]),
    "finite": bool(np.isfinite(influence).all()),
}))
"""


@pytest.mark.slow
def test_multi_head_attention_capture_and_ekfac_influence():
    result = _run(MHA_CODE)
    print(json.dumps(result))
    assert result["scale"] > 1e-3
    assert result["error"] < 1e-10
    assert result["kinds"] == ["dense", "einsum_dense", "embedding"]
    assert {"query", "key", "value", "attention_output"} <= set(result["kronecker"])
    assert [name.split("/")[-1] for name in result["diagonal"]] == ["gamma", "beta"]
    assert result["finite"]
    # measured (damping 0.1): 0.54 on the influence matrix against the exact GGN (the exact block-diagonal GGN
    # itself gets 0.69: the residual couples the layers), 0.88 against the exact block-diagonal GGN, 0.99 on
    # self-influence
    assert result["spearman"] > 0.45, result
    assert result["spearman_blocks"] > 0.8, result
    assert result["spearman_self"] > 0.95, result


KERAS_HUB_CODE = """
import json
import keras
import keras_hub
import numpy as np
from helpers import dataset, sparse_ce
from influenciae import EKFACIHVP, InfluenceModel

keras.utils.set_random_seed(0)
backbone = keras_hub.models.BertBackbone(
    vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_sequence_length=16
)
token_ids = keras.Input((16,), dtype="int32", name="token_ids")
segment_ids = keras.Input((16,), dtype="int32", name="segment_ids")
padding_mask = keras.Input((16,), dtype="int32", name="padding_mask")
features = backbone({"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask})
logits = keras.layers.Dense(3, name="head")(features["pooled_output"])
model = keras.Model([token_ids, segment_ids, padding_mask], logits)
rng = np.random.default_rng(0)
size = 12
tokens = rng.integers(1, 100, (size, 16)).astype("int32")
mask = np.ones((size, 16), "int32")
for row in range(size):
    length = rng.integers(4, 17)
    tokens[row, length:] = 0
    mask[row, length:] = 0
inputs = (tokens, np.zeros_like(tokens), mask)
labels = rng.integers(0, 3, size)
im = InfluenceModel(model, loss_function=sparse_ce())
ekfac = EKFACIHVP(im, dataset(inputs, labels, batch_size=5), relative_damping=0.1)
blocks = ekfac.blocks
gradients = im.batch_jacobian_tensor((inputs, labels)).numpy()
solved = ekfac.solve(gradients[:4]).numpy()
print("RESULT " + json.dumps({
    "kronecker": [[block.name, block.kind] for block in blocks if block.kind != "diagonal"],
    "diagonal": ekfac.capture.uncovered_weight_names,
    "finite": bool(np.isfinite(solved).all() and all(np.isfinite(b.eigenvalues).all() for b in blocks)),
    "num_params": im.nb_params,
    "self_influence": (gradients[:4] * solved).sum(axis=1).tolist(),
}))
"""


@pytest.mark.slow
def test_keras_hub_bert_backbone_ekfac():
    pytest.importorskip("keras_hub")
    result = _run(KERAS_HUB_CODE)
    assert result["finite"]
    assert all(value > 0 for value in result["self_influence"])
    kinds = [kind for _, kind in result["kronecker"]]
    # per transformer layer: query, key, value, attention_output (EinsumDense) and the two feed-forward Dense layers;
    # then the pooler, the head and the segment Embedding. KerasHub's ReversibleEmbedding (token ids, overrides
    # call) and PositionEmbedding (a custom layer) and every LayerNormalization get diagonal blocks.
    assert kinds.count("einsum_dense") == 8 and kinds.count("dense") == 6 and kinds.count("embedding") == 1
    diagonal = {name.split("/")[-2] for name in result["diagonal"]}
    assert {"token_embedding", "position_embedding", "embeddings_layer_norm"} <= diagonal
    assert all(name.split("/")[-1] in ("embeddings", "gamma", "beta") for name in result["diagonal"])
    print(json.dumps(result, indent=1))
