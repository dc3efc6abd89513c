"""The problems the evaluation harnesses share: the bundled digits (and breast cancer), their splits and models.

:func:`digits` is the one place the digits are loaded (flat pixels, 2×2-pooled pixels or images);
:func:`seeded_split` draws a seeded train/test split; :func:`digits_problem` and :func:`train_digits_mlp` are the
mislabeled-detection problem; :func:`load_problem`, :func:`build_model`, :func:`per_example_loss` and
:class:`FullBatchTrainer` are the faithfulness problems (float64 models trained to a real optimum).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from influenciae.model._backend import keras, tf

__all__ = [
    "BATCH_SIZE",
    "DIGITS_FORMS",
    "FullBatchTrainer",
    "HIDDEN_UNITS",
    "Problem",
    "REGULARIZATION",
    "SPLITS",
    "build_model",
    "digits",
    "digits_loss",
    "digits_problem",
    "load_problem",
    "per_example_loss",
    "seeded_split",
    "train_digits_mlp",
]

BATCH_SIZE = 128
"""Batch size of the evaluation's datasets and training."""
DIGITS_FORMS = ("flat", "pooled", "images")
"""The forms of :func:`digits`."""


def digits(form: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 images, no network): ``(inputs, labels [1797] int64)``.

    Args:
        form: ``"flat"``: inputs ``[1797, 64]`` float32 in ``[0, 1]``; ``"pooled"``: ``[1797, 16]`` float64, the
            8×8 images 2×2 average-pooled to 4×4, in ``[0, 1]``; ``"images"``: ``[1797, 8, 8, 1]`` float32 in
            ``[0, 1]``.

    Raises:
        ValueError: If ``form`` is not one of :data:`DIGITS_FORMS`.
    """
    from sklearn.datasets import load_digits

    if form not in DIGITS_FORMS:
        raise ValueError(f"form must be one of {DIGITS_FORMS}, got {form!r}.")
    data = load_digits()
    labels = data.target.astype(np.int64)
    if form == "pooled":
        # 2×2 average pooling of the 8×8 images: 16 features keep the exact Hessians small (170 and 442 parameters)
        return data.data.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16) / 16.0, labels
    if form == "images":
        return (data.images / 16.0).astype(np.float32)[..., None], labels
    return (data.data / 16.0).astype("float32"), labels


def seeded_split(
    inputs: np.ndarray, labels: np.ndarray, *, seed: int, num_train: int, num_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded random split: ``(inputs, labels, test_inputs, test_labels)`` of ``num_train`` and ``num_test`` rows.

    The rows are a permutation by ``np.random.default_rng(seed)``: the first ``num_train`` train, the next
    ``num_test`` test.
    """
    order = np.random.default_rng(seed).permutation(len(inputs))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    return inputs[train], labels[train], inputs[test], labels[test]


def digits_loss() -> Any:
    """The digits MLP's per-example loss: sparse cross-entropy on logits, reduction none (``[B]``)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def digits_problem() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ``(inputs [1797, 64] float32 in [0, 1], labels [1797])``."""
    return digits("flat")


def train_digits_mlp(inputs: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 200) -> Any:
    """A 64-32-10 tanh MLP with a small L2 penalty, trained with Adam (the model every method scores)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((inputs.shape[1],)),
            keras.layers.Dense(32, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-4)),
            keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(1e-4)),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(inputs, labels, epochs=epochs, batch_size=BATCH_SIZE, verbose=0)
    return model


REGULARIZATION = 1e-3
"""The L2 factor c of c‖w‖² on every kernel and bias of the faithfulness models."""


HIDDEN_UNITS = {"digits": 16, "breast_cancer": 8}
"""Hidden units of the faithfulness MLP, per problem."""


SPLITS = {"digits": (400, 100), "breast_cancer": (400, 100)}
"""``(training, test)`` examples of each faithfulness problem."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A classification problem of the faithfulness section, split into training and test examples."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def num_outputs(self) -> int:
        """One logit for a binary problem (sigmoid), one per class otherwise (softmax)."""
        return 1 if self.num_classes == 2 else self.num_classes


def load_problem(name: str, *, seed: int = 0) -> Problem:
    """``"digits"`` (4×4 pooled pixels in [0, 1]) or ``"breast_cancer"`` (standardized), a seeded split."""
    from sklearn.datasets import load_breast_cancer

    if name == "digits":
        inputs, labels = digits("pooled")
    elif name == "breast_cancer":
        data = load_breast_cancer()
        inputs = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
        labels = data.target.astype(np.int64)
    else:
        raise ValueError(f"Unknown problem {name!r}: choose 'digits' or 'breast_cancer'.")
    num_train, num_test = SPLITS[name]
    split = seeded_split(inputs, labels, seed=seed, num_train=num_train, num_test=num_test)
    return Problem(name, *split, int(labels.max()) + 1)


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

        @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], tf.float64), *signature])
        def objective(theta: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            assign(theta)
            return value_and_gradient(x, y)

        @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], tf.float64)] * 2 + signature)
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
