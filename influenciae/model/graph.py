"""Sub-models cut from a Keras graph, and InfluenceModels for methods that need no loss.

Similarity, boundary, representer and TracIn-fast methods read intermediate tensors of a Sequential or functional
model: the outputs of some layers (:func:`layer_outputs_model`) or the inputs of one (:func:`layer_input_model`),
from the model's own symbolic inputs (:func:`symbolic_inputs`). Subclassed models have no graph to cut and are
refused with a message saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from influenciae.model._backend import keras_module_of, tf, variable_tensor
from influenciae.model.core import InfluenceModel
from influenciae.model.selection import layer_index

__all__ = ["as_influence_model", "symbolic_inputs", "layer_outputs_model", "layer_input_model"]


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
