"""Small Keras classifiers trained from NumPy arrays, for the evaluation harnesses' reference problems.

The harnesses measure influence methods on models they train themselves; building and fitting those Keras models
is Keras code, so it lives here: :func:`train_mlp`, :func:`sparse_cross_entropy`, the mislabeled-detection MLP
(:func:`train_digits_mlp`, :func:`digits_loss`) and the faithfulness models (:func:`build_model`,
:func:`per_example_loss`, :class:`FullBatchTrainer`, float64 models trained to a real optimum).
:mod:`influenciae.evaluation.problems` re-exports them next to the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from influenciae.model._backend import keras, tf

__all__ = [
    "REGULARIZATION",
    "FullBatchTrainer",
    "build_model",
    "digits_loss",
    "per_example_loss",
    "sparse_cross_entropy",
    "train_digits_mlp",
    "train_mlp",
]


def sparse_cross_entropy(*, from_logits: bool = True, reduction: str = "none") -> Any:
    """Keras' sparse categorical cross-entropy (class indices ``[B]`` against outputs ``[B, C]``), per example."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction=reduction)


def train_mlp(
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    epochs: int,
    hidden_units: int = 32,
    activation: str = "tanh",
    num_classes: int = 10,
    learning_rate: float = 1e-2,
    batch_size: int = 128,
    l2: float = 0.0,
) -> tuple[Any, float]:
    """Fit ``inputs [N, d] -> Dense(hidden_units, activation) -> Dense(num_classes)`` logits with Adam.

    The loss is the sparse softmax cross-entropy on the logits; the Keras seed is set to ``seed`` first, so a
    call is reproducible.

    Args:
        inputs: Features ``[N, d]``.
        labels: Class indices ``[N]``.
        seed: Seed of the initialization and of the batch order.
        epochs: Passes over the data.
        hidden_units: Width of the hidden layer.
        activation: Its activation.
        num_classes: Number of logits.
        learning_rate: Adam's step size.
        batch_size: Examples per step.
        l2: Factor ``c`` of an L2 penalty ``c‖W‖²`` on both kernels (0: none).

    Returns:
        ``(model, final training loss)``.
    """
    keras.utils.set_random_seed(seed)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    model = keras.Sequential(
        [
            keras.Input((inputs.shape[1],)),
            keras.layers.Dense(hidden_units, activation=activation, kernel_regularizer=regularizer),
            keras.layers.Dense(num_classes, kernel_regularizer=regularizer),
        ]
    )
    model.compile(keras.optimizers.Adam(learning_rate), sparse_cross_entropy(reduction="sum_over_batch_size"))
    history = model.fit(inputs, labels, epochs=epochs, batch_size=batch_size, verbose=0)
    return model, float(history.history["loss"][-1])


def digits_loss() -> Any:
    """The digits MLP's per-example loss: sparse cross-entropy on logits, reduction none (``[B]``)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def train_digits_mlp(
    inputs: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 200, batch_size: int = 128
) -> Any:
    """A 64-32-10 tanh MLP with a small L2 penalty (1e-4), trained with Adam (the model every method scores)."""
    return train_mlp(inputs, labels, seed=seed, epochs=epochs, batch_size=batch_size, l2=1e-4)[0]


REGULARIZATION = 1e-3
"""The L2 factor c of c‖w‖² on every kernel and bias of the faithfulness models."""


def build_model(kind: str, num_features: int, num_outputs: int, hidden_units: int) -> Any:
    """A float64 ``"logistic"`` regression or tanh ``"mlp"``, every kernel and bias L2-regularized."""
    regularizer = keras.regularizers.L2(REGULARIZATION)
    layers = [keras.Input((num_features,), dtype="float64")]
    if kind == "mlp":
        layers.append(
            keras.layers.Dense(
                hidden_units,
                activation="tanh",
                dtype="float64",
                kernel_regularizer=regularizer,
                bias_regularizer=regularizer,
            )
        )
    elif kind != "logistic":
        raise ValueError(f"Unknown model kind {kind!r}: choose 'logistic' or 'mlp'.")
    layers.append(
        keras.layers.Dense(num_outputs, dtype="float64", kernel_regularizer=regularizer, bias_regularizer=regularizer)
    )
    return keras.Sequential(layers)


def per_example_loss(num_outputs: int) -> Any:
    """Cross-entropy on logits, per example, in float64: sigmoid for one output, softmax otherwise."""
    if num_outputs == 1:
        return keras.losses.BinaryCrossentropy(from_logits=True, reduction="none", dtype="float64")
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", dtype="float64")


class FullBatchTrainer:
    """``train(inputs, labels, *, seed, initial_weights=None) -> model`` that trains to a real optimum.

    The objective is the full-batch ``mean loss + Σ model.losses`` in float64. From scratch, a network is first fit
    by L-BFGS; then (and always for warm starts and convex models) scipy's Newton trust-region method with exact
    Hessian-vector products runs until the gradient norm is below ``gradient_tolerance``. The graph functions are
    traced once, on a work copy of the model, and every call returns a new model holding the solution.
    """

    def __init__(self, kind: str, num_features: int, num_outputs: int, hidden_units: int, *, gradient_tolerance: float):
        self.kind = kind
        self.build = lambda: build_model(kind, num_features, num_outputs, hidden_units)
        self.gradient_tolerance = gradient_tolerance
        self.num_outputs = num_outputs
        self.work = self.build()
        variables = list(self.work.trainable_variables)
        shapes = [tuple(variable.shape) for variable in variables]
        sizes = [int(np.prod(shape)) for shape in shapes]
        loss = per_example_loss(num_outputs)
        signature = [
            tf.TensorSpec([None, num_features], tf.float64),
            tf.TensorSpec([None], tf.float64 if num_outputs == 1 else tf.int64),
        ]

        def assign(theta: tf.Tensor) -> None:
            for variable, part, shape in zip(variables, tf.split(theta, sizes), shapes, strict=True):
                variable.assign(tf.reshape(part, shape))

        def value_and_gradient(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                value = tf.reduce_mean(loss(y, self.work(x))) + tf.add_n(self.work.losses)
            gradients = tape.gradient(value, variables)
            return value, tf.concat([tf.reshape(gradient, [-1]) for gradient in gradients], 0)

        @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], tf.float64), *signature], autograph=False)
        def objective(theta: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            assign(theta)
            return value_and_gradient(x, y)

        @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], tf.float64)] * 2 + signature, autograph=False)
        def hvp(theta: tf.Tensor, vector: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            assign(theta)
            with tf.GradientTape() as tape:
                _, gradient = value_and_gradient(x, y)
                directional = tf.reduce_sum(gradient * vector)
            return tf.concat([tf.reshape(part, [-1]) for part in tape.gradient(directional, variables)], 0)

        self._objective, self._hvp = objective, hvp

    def __call__(self, inputs: np.ndarray, labels: np.ndarray, *, seed: int, initial_weights: Any = None) -> Any:
        import scipy.optimize

        keras.utils.set_random_seed(seed)
        model = self.build()
        weights = model.get_weights() if initial_weights is None else initial_weights
        theta = np.concatenate([np.asarray(weight, dtype=np.float64).ravel() for weight in weights])
        x = tf.constant(inputs, tf.float64)
        y = tf.constant(labels, tf.float64 if self.num_outputs == 1 else tf.int64)

        def objective(point: np.ndarray) -> tuple[float, np.ndarray]:
            value, gradient = self._objective(tf.constant(point), x, y)
            return float(value), gradient.numpy()

        def hvp(point: np.ndarray, vector: np.ndarray) -> np.ndarray:
            return self._hvp(tf.constant(point), tf.constant(vector), x, y).numpy()

        if initial_weights is None and self.kind == "mlp":
            theta = scipy.optimize.minimize(
                objective, theta, jac=True, method="L-BFGS-B", options={"gtol": 1e-6, "maxiter": 5000, "maxcor": 30}
            ).x
        result = scipy.optimize.minimize(
            objective,
            theta,
            jac=True,
            hessp=hvp,
            method="trust-ncg",
            options={"gtol": self.gradient_tolerance, "maxiter": 200},
        )
        gradient_norm = float(np.linalg.norm(result.jac))
        if gradient_norm > 100 * self.gradient_tolerance:
            raise RuntimeError(f"Training stopped at gradient norm {gradient_norm:.2e}: {result.message}")
        shapes = [np.shape(weight) for weight in weights]
        offsets = np.cumsum([0] + [int(np.prod(shape)) for shape in shapes])
        model.set_weights(
            [
                result.x[start:end].reshape(shape)
                for start, end, shape in zip(offsets[:-1], offsets[1:], shapes, strict=True)
            ]
        )
        return model
