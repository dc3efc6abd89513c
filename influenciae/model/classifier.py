"""A classifier seen by the robustness attacks: its forward pass, its per-example loss, its predicted labels.

:func:`model_front` accepts a Keras 3 or ``tf_keras`` model, an :class:`~influenciae.model.InfluenceModel` or any
callable, and infers a cross-entropy from the last layer's activation when no loss is given or compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from influenciae.model._backend import is_keras3_object, is_legacy_keras_object, keras, keras_module_of, tf
from influenciae.model.core import InfluenceModel
from influenciae.model.losses import legacy_loss_class, rebuild_loss

__all__ = ["ModelFront", "model_front", "predicted_labels"]

LossFunction = Callable[[Any, Any], tf.Tensor]  # (targets [B, ...], outputs [B, C]) -> [B] or a scalar

_PROBABILITY_FLOOR = 1e-12  # log(p) of a probability output is taken at max(p, floor)


@dataclass(frozen=True)
class ModelFront:
    """A classifier seen by the attacks: its forward pass, its per-example loss and how to read a prediction.

    Attributes:
        model: The Keras model (or callable) that maps inputs ``[B, ...]`` to outputs ``[B, C]``.
        loss_function: ``(targets, outputs) -> [B]`` (or a scalar), or ``None`` when none could be inferred.
        output_kind: ``"logits"``, ``"probabilities"`` or ``None`` (unknown), read from the last activation.
    """

    model: Any
    loss_function: LossFunction | None
    output_kind: str | None
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tf.function(self.graph_forward, reduce_retracing=True, autograph=False))

    def forward(self, inputs: Any) -> tf.Tensor:
        """The model's single output ``[B, C]`` in inference mode (compiled: one trace per input signature)."""
        return self._compiled(inputs)

    def graph_forward(self, inputs: Any) -> tf.Tensor:
        """:meth:`forward` without its own ``tf.function``, to call inside another one."""
        if is_keras3_object(self.model) or is_legacy_keras_object(self.model):
            outputs = self.model(inputs, training=False)
        else:
            outputs = self.model(inputs)
        flat = tf.nest.flatten(outputs)
        if len(flat) != 1:
            raise ValueError(f"The robustness tools need a model with one output [batch, classes]; got {len(flat)}.")
        return flat[0]

    def predicted_labels(self, outputs: tf.Tensor) -> tf.Tensor:
        """Predicted classes ``[B]`` int64: argmax; a single column is a logit (``> 0``), or a probability (``> 0.5``)
        when the last activation is a sigmoid."""
        return predicted_labels(outputs, self.output_kind)

    def require_loss(self, owner: str) -> LossFunction:
        """The loss, or a ``ValueError`` telling the user to pass one."""
        if self.loss_function is None:
            raise ValueError(
                f"{owner} needs a loss to differentiate, and none could be inferred: the model is not compiled with a "
                "loss and its last layer's activation is neither linear (logits), softmax nor sigmoid. Pass "
                "loss_function=..., e.g. keras.losses.SparseCategoricalCrossentropy(from_logits=True, "
                "reduction='none')."
            )
        return self.loss_function


def predicted_labels(outputs: tf.Tensor, output_kind: str | None) -> tf.Tensor:
    """Predicted classes ``[B]`` (int64) of outputs ``[B, C]``; see :meth:`ModelFront.predicted_labels`."""
    outputs = tf.convert_to_tensor(outputs)
    if outputs.shape.rank == 2 and outputs.shape[1] == 1:
        threshold = 0.5 if output_kind == "probabilities" else 0.0
        return tf.cast(outputs[:, 0] > threshold, tf.int64)
    return tf.argmax(outputs, axis=-1, output_type=tf.int64)


def model_front(model: Any, loss_function: Any | None = None) -> ModelFront:
    """Resolve ``model`` (Keras 3 / ``tf_keras`` model, :class:`~influenciae.InfluenceModel` or callable) and its loss.

    The loss is, in order: ``loss_function``; the :class:`~influenciae.InfluenceModel`'s loss; the compiled loss;
    cross-entropy inferred from the last layer's activation (linear → from logits, softmax/sigmoid → from
    probabilities; sparse labels ``[B]`` or one-hot ``[B, C]``; one output column → binary). ``None`` otherwise.
    """
    if isinstance(model, InfluenceModel):
        if loss_function is None:
            loss_function = model.loss_function
        model = model.model
    if not callable(model):
        raise TypeError(f"model must be a Keras model, an InfluenceModel or a callable, got {type(model).__name__}.")
    output_kind = _output_kind(model)
    if loss_function is None:
        loss_function = getattr(model, "loss", None)
    if loss_function is None:
        resolved = None if output_kind is None else _cross_entropy(output_kind)
        return ModelFront(model, resolved, output_kind)
    if isinstance(loss_function, (dict, list, tuple)):
        raise ValueError("Models with several losses are not supported: pass one loss_function(y_true, y_pred).")
    if isinstance(loss_function, str):
        loss_function = keras_module_of(model).losses.get(loss_function)
    legacy_loss = legacy_loss_class()
    if isinstance(loss_function, keras.losses.Loss) or (
        legacy_loss is not None and isinstance(loss_function, legacy_loss)
    ):
        dtype = _weights_dtype(model)
        changes: dict[str, Any] = {}
        if getattr(loss_function, "reduction", None) not in (None, "none"):
            changes["reduction"] = "none"  # one loss per example (the comparator's worst case needs them)
        if isinstance(loss_function, keras.losses.Loss) and dtype is not None and loss_function.dtype != dtype:
            changes["dtype"] = dtype  # Keras 3 losses cast to float32 by default: keep float64 models in float64
        if changes:
            loss_function = rebuild_loss(loss_function, **changes)
    if not callable(loss_function):
        raise TypeError(f"loss_function must be callable (y_true, y_pred) -> [batch], got {type(loss_function)}.")
    return ModelFront(model, loss_function, output_kind)


def _weights_dtype(model: Any) -> str | None:
    for weight in getattr(model, "weights", []):
        dtype = tf.as_dtype(weight.dtype)
        if dtype.is_floating:
            return str(dtype.name)
    return None


def _output_kind(model: Any) -> str | None:
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    last = layers[-1]
    if getattr(last, "layers", None):  # a nested model ends the network
        return _output_kind(last)
    if type(last).__name__ == "Softmax":
        return "probabilities"
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", None)
    if name in ("softmax", "sigmoid"):
        return "probabilities"
    if name == "linear":
        return "logits"
    return None


def _cross_entropy(output_kind: str) -> LossFunction:
    from_logits = output_kind == "logits"

    def loss(targets: Any, outputs: tf.Tensor) -> tf.Tensor:
        outputs = tf.convert_to_tensor(outputs)
        targets = tf.convert_to_tensor(targets)
        if outputs.shape[-1] == 1:  # binary: targets in {0, 1}
            labels = tf.cast(tf.reshape(targets, [-1, 1]), outputs.dtype)
            if from_logits:
                values = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=outputs)
            else:
                positive = tf.math.log(tf.maximum(outputs, _PROBABILITY_FLOOR))
                negative = tf.math.log(tf.maximum(1 - outputs, _PROBABILITY_FLOOR))
                values = -(labels * positive + (1 - labels) * negative)
            return tf.reshape(values, [-1])
        if targets.shape.rank == outputs.shape.rank and targets.shape[-1] == outputs.shape[-1]:  # one-hot
            labels = tf.cast(targets, outputs.dtype)
            if from_logits:
                return tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=outputs)
            return -tf.reduce_sum(labels * tf.math.log(tf.maximum(outputs, _PROBABILITY_FLOOR)), axis=-1)
        if not targets.dtype.is_integer and not targets.dtype.is_floating:
            raise TypeError(f"Targets must be class indices or one-hot rows, got dtype {targets.dtype.name}.")
        labels = tf.cast(tf.reshape(targets, [-1]), tf.int32)
        if from_logits:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs)
        chosen = tf.gather(outputs, labels, batch_dims=1)
        return -tf.math.log(tf.maximum(chosen, _PROBABILITY_FLOOR))

    return loss
