"""Small Keras classifiers trained from NumPy arrays, for the evaluation harnesses' reference problems.

The harnesses measure influence methods on models they train themselves; building and fitting those Keras models
is Keras code, so it lives here, and the harnesses call :func:`train_mlp` and :func:`sparse_cross_entropy`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from influenciae.model._backend import keras

__all__ = ["train_mlp", "sparse_cross_entropy"]


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

    Returns:
        ``(model, final training loss)``.
    """
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((inputs.shape[1],)),
            keras.layers.Dense(hidden_units, activation=activation),
            keras.layers.Dense(num_classes),
        ]
    )
    model.compile(keras.optimizers.Adam(learning_rate), sparse_cross_entropy(reduction="sum_over_batch_size"))
    history = model.fit(inputs, labels, epochs=epochs, batch_size=batch_size, verbose=0)
    return model, float(history.history["loss"][-1])
