"""Sub-models cut from a Keras graph, and InfluenceModels for methods that need no loss.

Similarity, boundary, representer and TracIn-fast methods read intermediate tensors of a Sequential or functional
model: the outputs of some layers (:func:`layer_outputs_model`) or the inputs of one (:func:`layer_input_model`),
from the model's own symbolic inputs (:func:`symbolic_inputs`); :class:`DenseHead` is the last Dense layer seen as
``z = ã θ`` on the features entering it. Subclassed models have no graph to cut and are
refused with a message saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from influenciae.model._backend import keras_module_of, tf, variable_tensor
from influenciae.model.core import InfluenceModel
from influenciae.model.selection import last_dense_layer, layer_index

__all__ = ["as_influence_model", "symbolic_inputs", "layer_outputs_model", "layer_input_model", "DenseHead"]


def _no_loss(y_true: Any, y_pred: Any) -> tf.Tensor:
    raise ValueError(
        "This InfluenceModel was built from a bare Keras model by a similarity or boundary calculator, which need "
        "no loss. For loss-based methods wrap the model yourself: InfluenceModel(model, loss_function=...)."
    )


def as_influence_model(model: Any) -> InfluenceModel:
    """Return ``model`` if it is an :class:`~influenciae.model.InfluenceModel`, else wrap a Keras model without a loss.

    Methods that only run the model forward (activations, distances to the decision boundary) accept a bare Keras
    model; the wrapper watches its floating-point weights (they only enter the cache fingerprint) and has a loss
    that raises a clear error if a loss-based method ever calls it.
    """
    if isinstance(model, InfluenceModel):
        return model
    weights = list(getattr(model, "trainable_weights", None) or getattr(model, "weights", None) or [])
    floating = [w for w in weights if tf.as_dtype(variable_tensor(w).dtype).is_floating]
    if floating:
        dtype = tf.as_dtype(variable_tensor(floating[0]).dtype)
        floating = [w for w in floating if tf.as_dtype(variable_tensor(w).dtype) == dtype]
    return InfluenceModel(model, loss_function=_no_loss, weights_to_watch=floating or None)


def symbolic_inputs(model: Any) -> Any:
    """The symbolic inputs of a Sequential or functional model, in the structure its call expects.

    Raises:
        ValueError: If the model has no symbolic inputs (a subclassed model).
    """
    try:
        return model.input
    except (AttributeError, ValueError, RuntimeError):
        pass  # Keras 3 Sequential models only define `inputs`
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"{type(model).__name__} has no symbolic inputs, so the outputs of its layers cannot be extracted: "
            "subclassed models have no graph to cut. Use a Sequential or functional model built from keras.Input."
        )
    return inputs[0] if len(inputs) == 1 else inputs


def layer_outputs_model(model: Any, layers: Sequence[Any], argument: str = "layers") -> tuple[Any, list[int]]:
    """A Keras model from ``model``'s inputs to the outputs of ``layers`` (indices or names in ``model.layers``).

    Returns:
        ``(extractor, indices)``: the sub-model (one output per layer) and the resolved layer indices.
    """
    indices = [layer_index(model, layer, argument) for layer in layers]
    inputs = symbolic_inputs(model)
    outputs = []
    for index in indices:
        layer = model.layers[index]
        try:
            outputs.append(layer.output)
        except (AttributeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"The output of layer {index} ({layer.name}) is not defined: the layer is never called in the "
                f"model's graph or is called several times ({error})."
            ) from error
    return keras_module_of(model).Model(inputs, outputs), indices


def layer_input_model(model: Any, layer: Any) -> Any:
    """A Keras model from ``model``'s inputs to the inputs of ``layer`` (e.g. the features entering the last Dense).

    Raises:
        ValueError: If the model has no symbolic inputs (subclassed) or the layer's input is not defined in its
            graph (the layer is never called, or called several times).
    """
    inputs = symbolic_inputs(model)
    try:
        features = layer.input
    except (AttributeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"The inputs of layer {layer.name!r} are not defined in the model's graph (the layer is never called or "
            f"called several times): {error}"
        ) from error
    return keras_module_of(model).Model(inputs, features)


class DenseHead:
    """The last Dense layer of a model as a linear map ``z = a W + b = ã θ`` of the features ``a`` entering it.

    ``ã = [a, 1]`` when the layer has a bias (``θ = [W; b]``, kernel rows then the bias row), else ``ã = a``. The
    layer is chosen by :func:`~influenciae.model.selection.last_dense_layer`; its weights are only read.

    Args:
        model: A Sequential or functional Keras model.
        at_output: Whether the Dense layer must produce the model's output itself (no trailing softmax layer).
        purpose: Who asks, for the error messages (``"Representer points"``...).

    Attributes:
        layer: The Keras Dense layer.
        use_bias: Whether it has a bias (and ``ã`` a trailing 1).
        kernel_shape: ``(d, K)``, the shape of its kernel.
        num_outputs: ``K``, its number of units.
        activation: Its activation function (None or linear when it outputs logits).
    """

    def __init__(self, model: Any, *, at_output: bool = False, purpose: str = "This method") -> None:
        self.purpose = purpose
        self.layer = last_dense_layer(model, at_output=at_output, purpose=purpose)
        self.extractor = layer_input_model(model, self.layer)
        self.use_bias = bool(getattr(self.layer, "use_bias", False)) and self.layer.bias is not None
        self.kernel_shape = tuple(int(d) for d in self.layer.kernel.shape)
        self.num_outputs = self.kernel_shape[-1]
        self.activation = self.layer.activation

    @property
    def name(self) -> str:
        """The layer's name."""
        return str(self.layer.name)

    @property
    def trainable_weights(self) -> list[Any]:
        """The layer's trainable weights (kernel, then bias), to watch in an InfluenceModel."""
        return list(self.layer.trainable_weights)

    @property
    def regularizers(self) -> tuple[Any, Any]:
        """``(kernel_regularizer, bias_regularizer)`` of the layer (None where there is none or no bias)."""
        bias = getattr(self.layer, "bias_regularizer", None) if self.use_bias else None
        return getattr(self.layer, "kernel_regularizer", None), bias

    def features(self, inputs: Any, dtype: tf.DType, *, augment: bool = False) -> tf.Tensor:
        """The features ``a`` ``[B, d]`` entering the layer (``ã`` ``[B, d + 1]`` with ``augment`` and a bias).

        Raises:
            ValueError: If the layer gets inputs of another rank than ``[batch, features]``.
        """
        features = tf.cast(self.extractor(inputs, training=False), dtype)
        if features.shape.rank != 2:
            raise ValueError(
                f"The last Dense layer {self.name!r} receives features of shape {tuple(features.shape)}; "
                f"{self.purpose} needs one feature vector per example ([batch, features]). Flatten or pool before "
                "the last Dense layer."
            )
        return self.augment(features) if augment else features

    def augment(self, features: tf.Tensor) -> tf.Tensor:
        """``ã`` ``[B, d(+1)]``: ``features`` with a trailing column of ones when the layer has a bias."""
        return tf.concat([features, tf.ones_like(features[:, :1])], axis=1) if self.use_bias else features

    def logits(self, features: tf.Tensor) -> tf.Tensor:
        """The pre-activation outputs ``z = a W + b`` ``[B, K]`` of features ``a`` ``[B, d]``, current weights."""
        logits = tf.matmul(features, tf.cast(variable_tensor(self.layer.kernel), features.dtype))
        if self.use_bias:
            logits += tf.cast(variable_tensor(self.layer.bias), features.dtype)
        return logits
