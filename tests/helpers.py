"""Shared closed-form problems and small models for the tests (all float64 unless stated)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from influenciae import InfluenceModel
from influenciae.data import from_numpy

FLOAT = "float64"


class ExactL2(keras.regularizers.Regularizer):
    """``factor · Σ w²`` computed in the weight's dtype (keras.regularizers.L2 rounds its factor to float32)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, weights):
        return self.factor * tf.reduce_sum(tf.square(weights))

    def get_config(self):
        return {"factor": self.factor}


def half_squared_error(y_true, y_pred):
    """Per-example ``0.5 (f(x) - y)²`` so that the ridge Hessian is exactly ``XᵀX/n + λI``."""
    y_true = tf.cast(tf.reshape(y_true, [-1]), y_pred.dtype)
    return 0.5 * tf.square(tf.reshape(y_pred, [-1]) - y_true)


def ridge_problem(num_examples: int = 40, num_features: int = 5, regularization: float = 0.1, seed: int = 0):
    """Linear model without bias, loss 0.5(xᵀw - y)², regularizer (λ/2)‖w‖²: H = XᵀX/n + λI exactly."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, num_features))
    y = x @ rng.standard_normal(num_features) + 0.1 * rng.standard_normal(num_examples)
    model = keras.Sequential(
        [
            keras.Input((num_features,), dtype=FLOAT),
            keras.layers.Dense(1, use_bias=False, dtype=FLOAT, kernel_regularizer=ExactL2(regularization / 2)),
        ]
    )
    model.layers[0].kernel.assign(rng.standard_normal((num_features, 1)))
    influence_model = InfluenceModel(model, loss_function=half_squared_error)
    hessian = x.T @ x / num_examples + regularization * np.eye(num_features)
    return influence_model, x, y, hessian


def logistic_problem(num_examples: int = 60, num_features: int = 4, regularization: float = 0.05, seed: int = 1):
    """Logistic regression with bias; kernel regularized by (λ/2)‖w‖². Returns the closed-form Hessian too."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, num_features))
    y = (x @ rng.standard_normal(num_features) + 0.5 * rng.standard_normal(num_examples) > 0).astype("float64")
    model = keras.Sequential(
        [
            keras.Input((num_features,), dtype=FLOAT),
            keras.layers.Dense(1, dtype=FLOAT, kernel_regularizer=ExactL2(regularization / 2)),
        ]
    )
    model.layers[0].kernel.assign(0.5 * rng.standard_normal((num_features, 1)))
    model.layers[0].bias.assign([0.2])
    influence_model = InfluenceModel(model, loss_function=logistic_loss)
    kernel = model.layers[0].kernel.numpy()[:, 0]
    bias = float(model.layers[0].bias.numpy()[0])
    probabilities = 1 / (1 + np.exp(-(x @ kernel + bias)))
    augmented = np.hstack([x, np.ones((num_examples, 1))])
    hessian = (augmented * (probabilities * (1 - probabilities))[:, None]).T @ augmented / num_examples
    hessian[:num_features, :num_features] += regularization * np.eye(num_features)
    gradients = augmented * (probabilities - y)[:, None]  # per-example gradients of the loss
    return influence_model, x, y, hessian, gradients


def logistic_loss(y_true, y_pred):
    """Per-example binary cross-entropy on logits ``[batch, 1]``."""
    y_true = tf.cast(tf.reshape(y_true, [-1, 1]), y_pred.dtype)
    return tf.reshape(tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=y_pred), [-1])


def small_mlp(seed: int = 0, dtype: str = FLOAT, num_features: int = 6, hidden: int = 8, classes: int = 3):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((num_features,), dtype=dtype),
            keras.layers.Dense(hidden, activation="tanh", dtype=dtype, kernel_regularizer=ExactL2(1e-3)),
            keras.layers.Dense(classes, dtype=dtype, kernel_regularizer=ExactL2(1e-3)),
        ]
    )
    return model


def classification_data(num_examples: int = 48, num_features: int = 6, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, num_features))
    y = rng.integers(0, classes, num_examples)
    return x, y


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def dataset(x, y, batch_size: int = 16, sample_weight=None) -> tf.data.Dataset:
    return from_numpy(x, y, sample_weight=sample_weight, batch_size=batch_size)


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def fit(model, x, y, loss=None, steps: int = 200, learning_rate: float = 0.05):
    """Full-batch Adam on ``mean loss + regularization`` (works in float64, where ``model.fit`` mixes dtypes)."""
    loss = loss or sparse_ce()
    optimizer = keras.optimizers.Adam(learning_rate)
    x = tf.convert_to_tensor(x)
    y = tf.convert_to_tensor(y)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(loss(y, model(x, training=True)))
            value += tf.add_n([tf.cast(t, value.dtype) for t in model.losses]) if model.losses else 0.0
        gradients = tape.gradient(value, model.trainable_weights)
        optimizer.apply(gradients, model.trainable_weights)
        return value

    for _ in range(steps):
        value = step()
    return float(value)


def exact_softmax_ggn(im: Any, x: Any, num_classes: int) -> np.ndarray:
    """``(1/N) Σ_i J_iᵀ (diag(p_i) - p_i p_iᵀ) J_i`` from per-example logit Jacobians (softmax CE) ``[P, P]``."""
    with tf.GradientTape() as tape:
        logits = im.model(x, training=False)  # [N, C]: example i's logits depend on example i only
    jacobians = tape.jacobian(logits, im.weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    jacobian = np.concatenate([tf.reshape(j, [len(x), num_classes, -1]).numpy() for j in jacobians], axis=2)
    probabilities = tf.nn.softmax(logits).numpy()
    output_hessians = np.stack([np.diag(p) - np.outer(p, p) for p in probabilities])
    return np.einsum("ncp,ncd,ndq->pq", jacobian, output_hessians, jacobian) / len(x)


def kron_basis(block: Any) -> np.ndarray:
    """The dense eigenbasis of a Kronecker block (row-major vec of ``[rows, columns]``, the flat parameter order)."""
    rows = np.eye(block.rows) if block.row_basis is None else block.row_basis
    columns = np.eye(block.columns) if block.column_basis is None else block.column_basis
    return np.kron(rows, columns)
