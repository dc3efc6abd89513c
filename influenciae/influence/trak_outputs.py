"""TRAK's model output functions ``f(z; θ)``: what it linearizes, and the loss's derivatives through it."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from influenciae._backend import tf

__all__ = ["ModelOutputFunction", "MarginOutput", "RegressionOutput", "resolve_output_function"]


class ModelOutputFunction(abc.ABC):
    """The model output function ``f(z; θ)`` TRAK linearizes, and the loss's derivatives through it.

    Subclasses implement :meth:`output` (differentiable, one value per example) and :meth:`out_to_loss`
    (``Q = -∂ℓ/∂f``); :meth:`curvature` (``∂²ℓ/∂f²``) is needed by ``kernel="gauss_newton"`` only.
    """

    @abc.abstractmethod
    def output(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        """``f(z; θ)`` ``[B]`` from the model's outputs and the targets."""

    @abc.abstractmethod
    def out_to_loss(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        """``Q = -∂ℓ/∂f`` ``[B]``: how much the loss decreases when ``f`` increases."""

    def curvature(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        """``∂²ℓ/∂f²`` ``[B]`` (for ``kernel="gauss_newton"``)."""
        raise ValueError(f"{type(self).__name__} defines no curvature; use kernel='trak' or implement curvature().")

    def configuration(self) -> dict[str, Any]:
        """Settings stored in cache manifests."""
        return {"name": type(self).__name__}


class MarginOutput(ModelOutputFunction):
    """TRAK's classification output: the margin ``f = log(p / (1 - p))`` of the correct class.

    Multi-class logits ``z`` ``[B, C]`` with sparse (``[B]`` or ``[B, 1]``) or one-hot targets:
    ``f = z_y - logsumexp_{c≠y} z_c``. One logit ``s`` ``[B, 1]`` with ``{0, 1}`` targets: ``f = ±s``. For a
    cross-entropy loss ``ℓ = log(1 + e^{-f})``, so ``Q = 1 - p = σ(-f)`` and ``∂²ℓ/∂f² = p(1 - p)``.

    Args:
        from_logits: The model outputs logits (True) or probabilities (softmax or sigmoid, False).
    """

    def __init__(self, from_logits: bool = True) -> None:
        self.from_logits = bool(from_logits)

    def output(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        logits = self._logits(predictions)
        labels = tf.convert_to_tensor(tf.nest.flatten(targets)[0])
        classes = logits.shape[-1]
        if classes == 1:
            sign = tf.where(tf.reshape(tf.cast(labels, logits.dtype), [-1]) > 0.5, 1.0, -1.0)
            return tf.cast(sign, logits.dtype) * logits[:, 0]
        if labels.shape.rank == 2 and labels.shape[-1] == classes and classes > 1:
            labels = tf.argmax(labels, axis=1)
        correct = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), classes, on_value=True, off_value=False)
        others = tf.where(correct, tf.constant(-np.inf, logits.dtype), logits)
        return tf.reduce_sum(tf.where(correct, logits, tf.zeros_like(logits)), axis=1) - tf.reduce_logsumexp(
            others, axis=1
        )

    def out_to_loss(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        return tf.sigmoid(-self.output(predictions, targets))

    def curvature(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        margin = self.output(predictions, targets)
        return tf.sigmoid(margin) * tf.sigmoid(-margin)

    def configuration(self) -> dict[str, Any]:
        return {"name": "margin", "from_logits": self.from_logits}

    def _logits(self, predictions: tf.Tensor) -> tf.Tensor:
        predictions = tf.convert_to_tensor(predictions)
        if predictions.shape.rank == 1:
            predictions = predictions[:, None]
        if self.from_logits:
            return predictions
        epsilon = np.finfo(predictions.dtype.as_numpy_dtype).eps
        probabilities = tf.clip_by_value(predictions, epsilon, 1 - epsilon)
        if predictions.shape[-1] == 1:
            return tf.math.log(probabilities) - tf.math.log1p(-probabilities)
        return tf.math.log(probabilities)  # the margin ignores the log-normalizer


class RegressionOutput(ModelOutputFunction):
    """The model's single output ``f(z) = ŷ``, for a squared loss ``ℓ = ½(ŷ - y)²``: ``Q = y - ŷ``, curvature 1."""

    def output(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        predictions = tf.convert_to_tensor(predictions)
        if predictions.shape.rank is not None and predictions.shape.rank > 1 and predictions.shape[-1] != 1:
            raise ValueError(
                f"RegressionOutput needs one output per example, got outputs of shape {tuple(predictions.shape)}; "
                "subclass ModelOutputFunction for several outputs."
            )
        return tf.reshape(predictions, [-1])

    def out_to_loss(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        labels = tf.reshape(tf.convert_to_tensor(tf.nest.flatten(targets)[0]), [-1])
        outputs = self.output(predictions, targets)
        return tf.cast(labels, outputs.dtype) - outputs

    def curvature(self, predictions: tf.Tensor, targets: Any) -> tf.Tensor:
        return tf.ones_like(self.output(predictions, targets))

    def configuration(self) -> dict[str, Any]:
        return {"name": "regression"}


_OUTPUT_FUNCTIONS = {"margin": MarginOutput, "output": RegressionOutput, "regression": RegressionOutput}


def resolve_output_function(output_function: Any) -> ModelOutputFunction:
    """The output function named by ``"margin"`` or ``"output"``, or ``output_function`` itself if it is one.

    Args:
        output_function: ``"margin"`` (:class:`MarginOutput`), ``"output"`` (:class:`RegressionOutput`) or a
            :class:`ModelOutputFunction` instance.

    Returns:
        A :class:`ModelOutputFunction`.

    Raises:
        ValueError: For any other value.
    """
    if isinstance(output_function, ModelOutputFunction):
        return output_function
    if isinstance(output_function, str) and output_function in _OUTPUT_FUNCTIONS:
        return _OUTPUT_FUNCTIONS[output_function]()
    raise ValueError(
        f"output_function must be 'margin', 'output' or a ModelOutputFunction instance, got {output_function!r}."
    )
