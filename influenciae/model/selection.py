"""Which layers of a Keras model a method reads: layer indices/names, the last Dense layer, the original default.

One rule decides "the last Dense layer" for every method that decomposes it (TracIn's fast variants, representer
points, the weights-boundary distance):

1. It is the last layer of ``model.layers`` that is a Dense layer (Keras 3 or ``tf_keras``); a model without one is
   refused ("no Dense layer").
2. No layer with weights may follow it (weightless layers such as a softmax may): the logits are that layer's
   outputs ("come after the last Dense layer").
3. With ``at_output=True`` it must also produce the model's single output itself: the methods that use the identity
   ``∇_W ℓ = a ⊗ g`` on the model's output (TracIn fast, representer points) refuse a trailing ``Softmax`` or
   ``Activation`` layer ("is not Dense"; its activation may be fused, e.g. ``Dense(k, activation="softmax")``).

The three copies this replaces differed only in which of 2. and 3. they checked; this keeps every one of their
refusals (and their tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from influenciae.model._backend import (
    is_keras3_object,
    is_legacy_keras_object,
    keras,
    tf,
    variable_name,
    variable_tensor,
)

__all__ = [
    "last_dense_layer",
    "check_outer_product_layer",
    "layer_index",
    "layer_of",
    "original_default_layer",
    "check_model",
    "resolve_weights",
    "resolve_gradient_dtype",
]


def layer_index(model: Any, layer: int | str, argument: str) -> int:
    """The index in ``model.layers`` of ``layer`` (an index, negative allowed, or a layer name).

    Args:
        model: A Keras model.
        layer: A layer index in ``[-len(layers), len(layers))`` or a layer name.
        argument: The argument's name, for the error message.

    Raises:
        ValueError: If the name is not a layer of the model or the index is out of range.
        TypeError: If ``layer`` is neither an integer nor a string.
    """
    layers = list(model.layers)
    if isinstance(layer, str):
        names = [candidate.name for candidate in layers]
        if layer not in names:
            raise ValueError(f"{argument}={layer!r} is not a layer of the model. Layers are: {names}.")
        return names.index(layer)
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"{argument}={layer} is out of range for a model with {len(layers)} layers.")
        return int(layer) % len(layers)
    raise TypeError(f"{argument} must be a layer index or name, got {type(layer).__name__}.")


def layer_of(model: Any, layer: int | str) -> Any:
    """The layer of ``model`` with this index (negative allowed) or name (see :func:`layer_index`)."""
    return model.layers[layer_index(model, layer, "layer")]


def original_default_layer(layers: Sequence[Any]) -> int | None:
    """The layer the original Influenciae's ``InfluenceModel(model)`` watched: the last one with weights before the
    output layer (the output layer itself is skipped), or ``None`` when there is none."""
    return next((index for index in range(len(layers) - 2, -1, -1) if layers[index].weights), None)


def dense_classes() -> tuple[type, ...]:
    """The Dense layer classes: Keras 3's and, when ``tf_keras`` is installed, the legacy one."""
    classes: list[type] = [keras.layers.Dense]
    try:
        import tf_keras  # noqa: PLC0415 - optional
    except ImportError:  # pragma: no cover - tf_keras is optional
        return tuple(classes)
    classes.append(tf_keras.layers.Dense)
    return tuple(classes)


def last_dense_layer(model: Any, *, at_output: bool = False, purpose: str = "This method") -> Any:
    """The last Dense layer of ``model`` (the rule in this module's docstring).

    Args:
        model: A Keras model (its ``model.layers`` are searched).
        at_output: Whether the Dense layer must also produce the model's single output (no trailing weightless
            layer such as ``Softmax``).
        purpose: Who asks, e.g. ``"Representer points"``: starts the error messages.

    Returns:
        The Dense layer.

    Raises:
        ValueError: If the model has no Dense layer, a layer with weights follows the last one, or (``at_output``)
            the model has several outputs or its output does not come straight from that Dense layer.
    """
    layers = list(getattr(model, "layers", None) or [])
    classes = dense_classes()
    positions = [i for i, layer in enumerate(layers) if isinstance(layer, classes)]
    if not positions:
        raise ValueError(
            f"{purpose} uses the model's last Dense layer, but {type(model).__name__} has no Dense layer among "
            "model.layers."
        )
    position = positions[-1]
    dense = layers[position]
    after = [layer.name for layer in layers[position + 1 :] if layer.weights]
    if after:
        raise ValueError(
            f"Layers with weights {after} come after the last Dense layer {dense.name!r}: the logits must be the "
            "last Dense layer's outputs (followed only by weightless layers such as a softmax)."
        )
    if not at_output:
        return dense
    try:
        outputs = list(model.outputs or [])
    except (AttributeError, ValueError):
        outputs = []  # subclassed models: the last entry of model.layers stands for the output layer
    if len(outputs) > 1:
        raise ValueError(f"{purpose} needs a Keras model with one output; {type(model).__name__} has {len(outputs)}.")
    history = getattr(outputs[0], "_keras_history", None) if outputs else None
    output_layer = history[0] if history is not None else layers[-1]
    if output_layer is not dense:
        raise ValueError(
            f"{purpose} reads the model's output layer, which must be a Dense layer: "
            f"{getattr(output_layer, 'name', None)!r} ({type(output_layer).__name__}) is not Dense. Fold a final "
            "activation into the Dense layer (activation=..., e.g. Dense(k, activation='softmax')) or into the loss "
            "(from_logits=True), so that the model ends with its Dense layer."
        )
    return dense


def check_outer_product_layer(model: Any, dense: Any, purpose: str = "This method") -> None:
    """Check that the gradient of ``dense``'s kernel is the outer product ``a ⊗ g`` of its inputs and output grads.

    Args:
        model: The Keras model (it needs a symbolic graph: ``dense.input`` is read).
        dense: Its last Dense layer (:func:`last_dense_layer` with ``at_output=True``).
        purpose: Who asks, for the error messages.

    Raises:
        ValueError: If the model has no symbolic outputs (subclassed), or the layer has LoRA enabled, is not
            trainable or gets inputs of rank other than 2 (``[batch, features]``).
    """
    try:
        outputs = list(model.outputs or [])
    except (AttributeError, ValueError):
        outputs = []
    if len(outputs) != 1:
        raise ValueError(
            f"{purpose} needs a Sequential or functional Keras model with one output (it reads the input of its "
            f"last layer); got {type(model).__name__} with {len(outputs) or 'no symbolic'} outputs."
        )
    if getattr(dense, "lora_enabled", False):
        raise ValueError(f"The last Dense layer {dense.name!r} has LoRA enabled: {purpose} cannot use it.")
    if not dense.trainable:
        raise ValueError(f"The last Dense layer {dense.name!r} is not trainable: there is no gradient to trace.")
    rank = len(dense.input.shape)
    if rank != 2:
        raise ValueError(
            f"The last Dense layer {dense.name!r} gets inputs of rank {rank}; the outer-product identity needs "
            "[batch, features] inputs."
        )


def check_model(model: Any) -> None:
    """Check that ``model`` is a built Keras model (Keras 3 or ``tf_keras``), with errors that name the fix."""
    if not (is_keras3_object(model) or is_legacy_keras_object(model)) or not hasattr(model, "trainable_weights"):
        raise TypeError(
            f"InfluenceModel wraps a Keras model (Keras 3 or tf_keras), got {type(model).__name__}. "
            "Build your model with keras.Sequential, the functional API or by subclassing keras.Model."
        )
    if not model.built or not model.weights:
        raise ValueError(
            "The model is not built, so it has no weights yet. Call `model.build(input_shape)` or call the model "
            "once on a batch (`model(x[:1])`) before wrapping it."
        )


def resolve_weights(
    model: Any,
    start_layer: int | str | None,
    last_layer: int | str | None,
    weights_to_watch: Sequence[Any] | None,
) -> list[Any]:
    """The weights an InfluenceModel watches: explicit ``weights_to_watch``, a layer range, or every trainable one.

    Raises:
        ValueError: Both ways given, foreign weights, reversed layers or nothing to watch.
        TypeError: Non-floating weights, or weights of several dtypes.
    """
    if weights_to_watch is not None:
        if start_layer is not None or last_layer is not None:
            raise ValueError("Pass either weights_to_watch or start_layer/last_layer, not both.")
        candidates = list(weights_to_watch)
        owned = {id(variable_tensor(weight)) for weight in model.weights}
        foreign = [variable_name(w) for w in candidates if id(variable_tensor(w)) not in owned]
        if foreign:
            raise ValueError(f"weights_to_watch contains weights that are not the model's: {foreign}.")
    elif start_layer is None and last_layer is None:
        candidates = list(model.trainable_weights)
    else:
        layers = list(model.layers)
        first = 0 if start_layer is None else layer_index(model, start_layer, "start_layer")
        last = len(layers) - 1 if last_layer is None else layer_index(model, last_layer, "last_layer")
        if first > last:
            raise ValueError(f"start_layer ({first}) comes after last_layer ({last}).")
        candidates = [weight for layer in layers[first : last + 1] for weight in layer.trainable_weights]
    unique: dict[int, Any] = {}
    for weight in candidates:
        unique.setdefault(id(variable_tensor(weight)), weight)
    weights = list(unique.values())
    if not weights:
        raise ValueError(
            "There are no weights to watch: the chosen layers have no trainable weights. Pick other layers with "
            "start_layer/last_layer or pass weights_to_watch explicitly."
        )
    dtypes = set()
    for weight in weights:
        dtype = tf.as_dtype(variable_tensor(weight).dtype)
        if not dtype.is_floating:
            raise TypeError(
                f"Weight {variable_name(weight)} has dtype {dtype.name}; influence needs floating-point weights. "
                "Leave it out of weights_to_watch."
            )
        dtypes.add(dtype.name)
    if len(dtypes) > 1:
        raise TypeError(f"The watched weights mix dtypes {sorted(dtypes)}; watch weights of one dtype.")
    return weights


def resolve_gradient_dtype(gradient_dtype: Any, dtype: tf.DType) -> tf.DType:
    """The dtype per-sample gradients are produced in: ``dtype`` itself, or a narrower float (``"bfloat16"``)."""
    if gradient_dtype is None:
        return dtype
    try:
        resolved = tf.as_dtype(gradient_dtype)
    except TypeError as error:
        raise ValueError(f"gradient_dtype must be 'bfloat16', 'float16' or None, got {gradient_dtype!r}.") from error
    if not resolved.is_floating or resolved.size > dtype.size:
        raise ValueError(
            f"gradient_dtype must be a floating dtype no wider than the weights' {dtype.name} (e.g. 'bfloat16' or "
            f"'float16'), got {resolved.name}; per-sample gradients are always accumulated in {dtype.name}."
        )
    return resolved
