"""Layer activations and output sensitivities of a functional Keras model: the Keras side of TCAV.

A :class:`LayerProbe` builds, once, a sub-model from the model's inputs to the outputs of some named layers and
the model's output. One call then returns, for a batch, each layer's activations flattened per example
``[batch, F_l]`` and the gradient of the target output with respect to them ``[batch, F_l]`` (the *sensitivities*
of TCAV). Because the layer outputs are intermediate tensors of one recorded forward pass, a single backward pass
gives every layer's gradient, on any functional graph (skip connections included), without splitting the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from influenciae.cache import fingerprint_arrays
from influenciae.model._backend import keras_module_of, tf, variable_tensor
from influenciae.model.core import InfluenceModel

__all__ = ["LayerProbe", "keras_model_of", "resolve_layer_names"]


def keras_model_of(model: Any) -> Any:
    """Returns the Keras model behind ``model`` (an ``InfluenceModel`` gives its ``.model``).

    Raises:
        TypeError: if ``model`` is not a functional or Sequential Keras model with symbolic inputs and outputs.
    """
    if isinstance(model, InfluenceModel):
        model = model.model
    if not hasattr(model, "layers") or not callable(model):
        raise TypeError(f"Expected a Keras model or an influenciae.InfluenceModel, got {type(model).__name__}.")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs, outputs = None, None
    if not inputs or not outputs:
        raise TypeError(
            f"{type(model).__name__} has no symbolic inputs/outputs: concepts need a functional or Sequential "
            "Keras model (build it with keras.Input, or rebuild a subclassed model functionally) so that "
            "intermediate layer outputs can be reached."
        )
    if len(outputs) != 1:
        raise ValueError(f"The model has {len(outputs)} outputs; TCAV needs a model with one output tensor.")
    return model


def resolve_layer_names(model: Any, layers: int | str | Sequence[int | str]) -> list[str]:
    """Returns the names of ``layers`` (names or indices into ``model.layers``), without duplicates.

    Raises:
        ValueError: for an unknown name, an out-of-range index, an empty list or a duplicate.
        TypeError: for anything that is neither a name nor an index.
    """
    items = [layers] if isinstance(layers, (str, int, np.integer)) else list(layers)
    if not items:
        raise ValueError("layers is empty; name at least one layer of the model.")
    all_layers = list(model.layers)
    names = [layer.name for layer in all_layers]
    resolved: list[str] = []
    for item in items:
        if isinstance(item, str):
            if item not in names:
                raise ValueError(f"Layer {item!r} is not a layer of the model. Layers are: {names}.")
            name = item
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -len(all_layers) <= item < len(all_layers):
                raise ValueError(f"Layer index {item} is out of range for a model with {len(all_layers)} layers.")
            name = names[int(item)]
        else:
            raise TypeError(f"A layer must be a name or an index into model.layers, got {type(item).__name__}.")
        if name in resolved:
            raise ValueError(f"Layer {name!r} is listed twice in layers.")
        resolved.append(name)
    return resolved


def _layer_output(model: Any, name: str) -> Any:
    layer = model.get_layer(name)
    try:
        return layer.output
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"Layer {name!r} has no single output tensor in the model's graph ({error}); a layer called several "
            "times (shared layer) is ambiguous: pick another layer."
        ) from error


class LayerProbe:
    """Activations at named layers, and sensitivities of one output unit to them, batch by batch.

    Args:
        model: a functional or Sequential Keras model (or an ``InfluenceModel``) with one output.
        layer_names: names of layers of ``model`` (see :func:`resolve_layer_names`).

    Example:
        >>> probe = LayerProbe(model, ["dense"])
        >>> [activations] = probe.activations(x)                 # [[batch, F]]
        >>> [activations], [gradients] = probe.sensitivities(x, target=1)
    """

    def __init__(self, model: Any, layer_names: Sequence[str]) -> None:
        self.model = keras_model_of(model)
        self.layer_names = list(layer_names)
        keras_module = keras_module_of(self.model)
        layer_outputs = [_layer_output(self.model, name) for name in self.layer_names]
        self._model_inputs = self.model.inputs
        self._single_input = len(self._model_inputs) == 1
        self._graph = keras_module.Model(self._model_inputs, [*layer_outputs, self.model.outputs[0]])
        self._sub_models = {
            name: keras_module.Model(self._model_inputs, output)
            for name, output in zip(self.layer_names, layer_outputs, strict=True)
        }
        self.feature_sizes: dict[str, int | None] = {
            name: _feature_size(output) for name, output in zip(self.layer_names, layer_outputs, strict=True)
        }
        output_shape = tuple(self.model.outputs[0].shape)
        self.num_outputs = int(np.prod([d for d in output_shape[1:] if d is not None] or [1]))
        if any(d is None for d in output_shape[1:]):
            raise ValueError(f"The model output has an unknown dimension {output_shape}; TCAV needs a fixed shape.")
        self.dtype = tf.as_dtype(self.model.outputs[0].dtype)
        self._activations_fn = tf.function(self._activations, reduce_retracing=True, autograph=False)
        self._sensitivities_fn = tf.function(self._sensitivities, reduce_retracing=True, autograph=False)

    # -- checks ----------------------------------------------------------------------------------------------

    def check_target(self, target: int | None) -> int:
        """Returns the output unit index for ``target``; ``None`` is allowed for a one-unit output.

        Raises:
            ValueError: if the index is out of range, or ``None`` for a several-unit output.
            TypeError: if ``target`` is not an integer.
        """
        if target is None:
            if self.num_outputs != 1:
                raise ValueError(
                    f"target=None needs a model with one output unit; this one has {self.num_outputs}: pass the "
                    "class index."
                )
            return 0
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise TypeError(f"target must be an integer class index (or None), got {type(target).__name__}.")
        if not -self.num_outputs <= target < self.num_outputs:
            raise ValueError(f"target={target} is out of range for a model with {self.num_outputs} output units.")
        return int(target) % self.num_outputs

    def weights_fingerprint(self, layer_name: str) -> str:
        """Fingerprint of the weights the activations of ``layer_name`` depend on (the sub-model up to it)."""
        return fingerprint_arrays(variable_tensor(weight) for weight in self._sub_models[layer_name].weights)

    # -- computations ----------------------------------------------------------------------------------------

    def _call(self, inputs: Any) -> list[tf.Tensor]:
        outputs = self._graph(inputs, training=False)
        return list(outputs)

    def _activations(self, inputs: Any) -> list[tf.Tensor]:
        outputs = self._call(inputs)[:-1]
        return [_flatten(tensor) for tensor in outputs]

    def _target_output(self, output: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
        flat = tf.reshape(output, [tf.shape(output)[0], -1])
        return flat[:, target]

    def _sensitivities(self, inputs: Any, target: tf.Tensor) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            outputs = self._call(inputs)
            layer_outputs = outputs[:-1]
            tape.watch(layer_outputs)
            # Examples are independent (training=False), so the gradient of the sum is each example's own.
            total = tf.reduce_sum(self._target_output(outputs[-1], target))
        gradients = tape.gradient(total, layer_outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [_flatten(a) for a in layer_outputs], [_flatten(g) for g in gradients]

    def activations(self, inputs: Any) -> list[tf.Tensor]:
        """Activations of each layer for a batch.

        Args:
            inputs: one batch of model inputs ``[batch, ...]`` (a nested structure for multi-input models).

        Returns:
            One tensor ``[batch, F_l]`` per layer, in ``layer_names`` order.
        """
        return self._activations_fn(self._cast_inputs(inputs))

    def sensitivities(self, inputs: Any, target: int) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """Activations and gradients ``∂ output[target] / ∂ activation`` of each layer for a batch.

        Args:
            inputs: one batch of model inputs ``[batch, ...]``.
            target: the output unit (e.g. the class logit), from :meth:`check_target`.

        Returns:
            ``(activations, gradients)``: two lists with one ``[batch, F_l]`` tensor per layer.
        """
        return self._sensitivities_fn(self._cast_inputs(inputs), tf.constant(target, tf.int32))

    def sensitivity_of(self, inputs: Any, target: int, layer_index: int, vector: tf.Tensor) -> tf.Tensor:
        """Directional derivatives ``∇_a output[target] · vector`` for a batch, differentiable in the weights.

        Used inside an outer ``GradientTape`` over the model weights (see :func:`concept_influence`).

        Args:
            inputs: one batch of model inputs ``[batch, ...]``.
            target: the output unit.
            layer_index: position of the layer in ``layer_names``.
            vector: the direction ``[F_l]``.

        Returns:
            Tensor ``[batch]``.
        """
        _, gradients = self._sensitivities(self._cast_inputs(inputs), tf.constant(target, tf.int32))
        return tf.linalg.matvec(gradients[layer_index], tf.cast(vector, gradients[layer_index].dtype))

    def _cast_inputs(self, inputs: Any) -> Any:
        if self._single_input and isinstance(inputs, (list, tuple)):
            raise ValueError(
                f"Got a tuple of {len(inputs)} tensors for a single-input model: concept examples and class inputs "
                "are inputs only; drop the labels, e.g. dataset.map(lambda x, y: x)."
            )
        if self._single_input and not isinstance(inputs, dict):
            tensor = tf.convert_to_tensor(inputs)
            expected = tuple(self._model_inputs[0].shape)[1:]
            given = tuple(tensor.shape)[1:]
            if len(given) != len(expected) or any(
                e is not None and e != g for e, g in zip(expected, given, strict=False)
            ):
                raise ValueError(
                    f"Inputs of shape [batch, {', '.join(map(str, given))}] do not match the model's input "
                    f"[batch, {', '.join(map(str, expected))}]."
                )
            dtype = self._model_inputs[0].dtype
            return tf.cast(tensor, dtype) if dtype is not None else tensor
        return tf.nest.map_structure(tf.convert_to_tensor, inputs)


def _feature_size(tensor: Any) -> int | None:
    dims = tuple(tensor.shape)[1:]
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))


def _flatten(tensor: tf.Tensor) -> tf.Tensor:
    return tf.reshape(tensor, [tf.shape(tensor)[0], -1])
