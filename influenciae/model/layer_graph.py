"""The layer graph of a Keras 3 model as a flat list of steps, each of a kind LRP has a relevance handler for.

Nested models are inlined, so a rule can be chosen for a layer of a sub-model and ``LayerLRP`` can read any layer.
Tensors are named by integer keys; a step reads the values of its input keys and writes those of its output keys.
The affine maps of the layers (Dense, Conv, inference-mode BatchNormalization) are read here too; the relevance
handlers themselves are in :mod:`influenciae.relevance` (``_graph.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from influenciae.model._backend import keras, tf

__all__ = [
    "Values",
    "SUPPORTED",
    "Step",
    "Graph",
    "dense_linear",
    "conv_linear",
    "batchnorm_affine",
    "weights",
    "channel_axis",
    "is_linear_activation",
]

Values = dict[int, tf.Tensor]
"""Recorded tensors of a forward pass, by key."""

_DENSE = (keras.layers.Dense,)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_POOLING = (
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
)  # fmt: skip
# Index rearrangements: relevance follows the transposed map exactly (R_in = Jᵀ R).
_STRUCTURAL = (
    keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute, keras.layers.Concatenate,
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D,
)  # fmt: skip
# Element-wise at inference (activations, regularization noise): relevance passes through unchanged.
_PASS_THROUGH = (
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.PReLU, keras.layers.Softmax,
    keras.layers.Activation, keras.layers.Dropout, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
    keras.layers.AlphaDropout, keras.layers.ActivityRegularization, keras.layers.Identity,
)  # fmt: skip
_MERGE = (keras.layers.Add, keras.layers.Average)
# Operations that appear in functional graphs without a layer (``x + y``, ``x[:, :3]``, ``ops.reshape``).
_OP_MERGE = {"Add"}
_OP_STRUCTURAL = {"GetItem", "Reshape", "Transpose", "Concatenate", "ExpandDims", "Squeeze"}

SUPPORTED = (
    "Dense, Conv1D/2D/3D, BatchNormalization, Max/Average/GlobalAverage/GlobalMax pooling (1D/2D/3D), "
    "Flatten, Reshape, Permute, Concatenate, ZeroPadding, Cropping, Add, Average, activation layers (ReLU, "
    "Activation, ...), Dropout and noise layers, InputLayer, nested Sequential/Functional models"
)
"""The layers LRP propagates relevance through, as listed in its error messages."""


@dataclasses.dataclass
class Step:
    """One call of a layer (or operation) in the graph.

    Attributes:
        layer: the Keras layer or operation.
        inputs: keys of the input tensors, in call order.
        outputs: keys of the output tensors.
        call: ``call(values) -> outputs``, the layer's forward call on the recorded input values.
        kind: which relevance handler runs: ``"dense"``, ``"conv"``, ``"batchnorm"``, ``"pooling"``, ``"merge"``,
            ``"structural"`` or ``"pass"``.
    """

    layer: Any
    inputs: list[int]
    outputs: list[int]
    call: Callable[[Values], list[tf.Tensor]]
    kind: str


def _kind(operation: Any) -> str:
    if isinstance(operation, _DENSE):
        return "dense"
    if isinstance(operation, _CONV):
        return "conv"
    if isinstance(operation, keras.layers.BatchNormalization):
        return "batchnorm"
    if isinstance(operation, _POOLING):
        return "pooling"
    if isinstance(operation, _MERGE):
        return "merge"
    if isinstance(operation, _STRUCTURAL):
        return "structural"
    if isinstance(operation, _PASS_THROUGH):
        return "pass"
    if not isinstance(operation, keras.layers.Layer) and type(operation).__module__.startswith("keras.src.ops"):
        if type(operation).__name__ in _OP_MERGE:
            return "merge"
        if type(operation).__name__ in _OP_STRUCTURAL:
            return "structural"
    name = getattr(operation, "name", repr(operation))
    raise ValueError(
        f"LRP does not support layer {name!r} of class {type(operation).__name__}. Supported: {SUPPORTED}. "
        "Rebuild the model from supported layers, or explain a sub-model that contains only supported layers."
    )


class Graph:
    """The flattened graph of a Keras model: ``steps`` in topological order, from ``input_keys`` to ``output_keys``.

    Args:
        model: a built Keras 3 ``Sequential`` or ``Functional`` model (nested models are inlined).

    Attributes:
        input_dtypes: the dtype of each model input (Keras' ``floatx`` where the model does not say).
        output_size: values per example of the model's output, or None when not static.

    Raises:
        TypeError: if ``model`` is not a Keras 3 model.
        ValueError: if a layer is not supported or the model is not built.
    """

    def __init__(self, model: Any) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"LRP needs a Keras 3 model, got {type(model).__name__}.")
        self.steps: list[Step] = []
        self.layer_outputs: dict[int, list[list[int]]] = {}  # id(layer) -> output keys of each of its calls
        self.layer_inputs: dict[int, list[list[int]]] = {}
        self.layers: list[Any] = []
        self._next_key = 0
        num_inputs = len(model.inputs) if _is_functional(model) else 1
        self.input_keys = [self._new_key() for _ in range(num_inputs)]
        self.output_keys = self._add_model(model, self.input_keys)
        dtypes = [getattr(tensor, "dtype", None) for tensor in getattr(model, "inputs", None) or []]
        self.input_dtypes = [
            dtypes[index] if index < len(dtypes) and dtypes[index] is not None else keras.config.floatx()
            for index in range(num_inputs)
        ]
        try:
            outputs = model.outputs
        except (AttributeError, ValueError):  # a Sequential model that was never built symbolically
            outputs = None
        shape = tuple(outputs[0].shape) if outputs else None
        self.output_size: int | None = None  # values per example of the (first) output, when static
        if shape is not None and all(size is not None for size in shape[1:]):
            self.output_size = int(np.prod(shape[1:])) if len(shape) > 1 else 1

    def _new_key(self) -> int:
        self._next_key += 1
        return self._next_key - 1

    def _record(self, layer: Any, inputs: list[int], outputs: list[int]) -> None:
        if id(layer) not in self.layer_outputs:
            self.layers.append(layer)
        self.layer_outputs.setdefault(id(layer), []).append(outputs)
        self.layer_inputs.setdefault(id(layer), []).append(inputs)

    def _add_model(self, model: Any, input_keys: list[int]) -> list[int]:
        if _is_functional(model):
            return self._add_functional(_functional(model), input_keys)
        if isinstance(model, keras.Sequential):  # not built symbolically: a plain chain of layers
            keys = input_keys
            for layer in model.layers:
                keys = self._add_layer(layer, keys, None)
            return keys
        raise ValueError(f"LRP needs a Keras Sequential or Functional model, got {type(model).__name__}.")

    def _add_functional(self, model: Any, input_keys: list[int]) -> list[int]:
        if len(model.inputs) != len(input_keys):
            raise ValueError(f"Model {model.name!r} takes {len(model.inputs)} inputs, got {len(input_keys)}.")
        keys = {id(tensor): key for tensor, key in zip(model.inputs, input_keys, strict=True)}
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    for tensor in node.outputs:
                        if id(tensor) in keys:
                            self._record(node.operation, [], [keys[id(tensor)]])
                    continue
                if any(id(tensor) not in keys for tensor in node.input_tensors):
                    continue  # not reachable from the model's inputs
                node_inputs = [keys[id(tensor)] for tensor in node.input_tensors]
                node_outputs = self._add_layer(node.operation, node_inputs, node)
                if len(node_outputs) != len(node.outputs):
                    raise ValueError(f"Layer {node.operation.name!r} returned an unexpected number of outputs.")
                for tensor, key in zip(node.outputs, node_outputs, strict=True):
                    keys[id(tensor)] = key
        missing = [tensor for tensor in model.outputs if id(tensor) not in keys]
        if missing:
            raise ValueError(f"The outputs of model {model.name!r} are not reachable from its inputs.")
        return [keys[id(tensor)] for tensor in model.outputs]

    def _add_layer(self, layer: Any, input_keys: list[int], node: Any) -> list[int]:
        if isinstance(layer, keras.layers.InputLayer):
            return input_keys
        if isinstance(layer, keras.Model):
            outputs = self._add_model(layer, input_keys)
            self._record(layer, input_keys, outputs)
            return outputs
        kind = _kind(layer)
        num_outputs = len(node.outputs) if node is not None else 1
        if num_outputs != 1:
            raise ValueError(f"LRP supports single-output layers only; {layer.name!r} has {num_outputs} outputs.")
        output_keys = [self._new_key()]
        self.steps.append(Step(layer, list(input_keys), output_keys, _make_call(layer, input_keys, node), kind))
        self._record(layer, list(input_keys), output_keys)
        return output_keys

    def consumers(self) -> dict[int, int]:
        """Number of steps (plus model outputs) reading each tensor key."""
        counts: dict[int, int] = {}
        for step in self.steps:
            for key in step.inputs:
                counts[key] = counts.get(key, 0) + 1
        for key in self.output_keys:
            counts[key] = counts.get(key, 0) + 1
        return counts

    def forward(self, inputs: Sequence[tf.Tensor]) -> Values:
        """Run the model step by step, recording every tensor: ``{key: value}``."""
        values: Values = dict(zip(self.input_keys, inputs, strict=True))
        for step in self.steps:
            for key, value in zip(step.outputs, step.call(values), strict=True):
                values[key] = value
        return values


def _is_functional(model: Any) -> bool:
    return _functional(model) is not None


def _functional(model: Any) -> Any:
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and getattr(model, "inputs", None):
        return model
    return None


def _make_call(layer: Any, input_keys: list[int], node: Any) -> Callable[[Values], list[tf.Tensor]]:
    if node is None:
        return lambda values: [layer(values[input_keys[0]])]
    tensors = list(node.input_tensors)

    def call(values: Values) -> list[tf.Tensor]:
        filled = {id(tensor): values[key] for tensor, key in zip(tensors, input_keys, strict=True)}
        args, kwargs = node.arguments.fill_in(filled)
        return list(keras.tree.flatten(layer(*args, **kwargs)))

    return call


# ------------------------------------------------------------------------------------------------ affine maps


def dense_linear(layer: Any) -> Callable[[tf.Tensor, tf.Tensor | None, tf.Tensor | None], tf.Tensor]:
    """``linear(a, kernel, bias) = a·kernel + bias`` of a Dense layer."""

    def linear(a: tf.Tensor, kernel: tf.Tensor | None, bias: tf.Tensor | None) -> tf.Tensor:
        z = tf.matmul(a, kernel) if a.shape.rank == 2 else tf.tensordot(a, kernel, axes=[[a.shape.rank - 1], [0]])
        return z if bias is None else z + bias

    return linear


def conv_linear(layer: Any) -> Callable[[tf.Tensor, tf.Tensor | None, tf.Tensor | None], tf.Tensor]:
    """``linear(a, kernel, bias) = conv(a, kernel) + bias`` with the layer's strides, padding and dilation."""

    def linear(a: tf.Tensor, kernel: tf.Tensor | None, bias: tf.Tensor | None) -> tf.Tensor:
        z = layer.convolution_op(a, kernel)
        if bias is None:
            return z
        if layer.data_format == "channels_first":
            return z + tf.reshape(bias, [1, -1] + [1] * layer.rank)
        return z + bias

    return linear


def batchnorm_affine(layer: Any, rank: int, dtype: tf.DType) -> tuple[int, tf.Tensor, tf.Tensor]:
    """``(axis, scale, shift)`` of an inference-mode BatchNormalization: ``y = x·scale + shift`` along ``axis``."""
    axis = layer.axis if layer.axis >= 0 else layer.axis + rank
    variance = tf.cast(keras.ops.convert_to_tensor(layer.moving_variance), dtype)
    mean = tf.cast(keras.ops.convert_to_tensor(layer.moving_mean), dtype)
    scale = tf.math.rsqrt(variance + tf.constant(layer.epsilon, dtype))
    if layer.scale:
        scale = scale * tf.cast(keras.ops.convert_to_tensor(layer.gamma), dtype)
    shift = -mean * scale
    if layer.center:
        shift = shift + tf.cast(keras.ops.convert_to_tensor(layer.beta), dtype)
    return axis, scale, shift


def weights(layer: Any, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor | None]:
    """``(kernel, bias or None)`` of a Dense or Conv layer, in ``dtype``."""
    kernel = tf.cast(keras.ops.convert_to_tensor(layer.kernel), dtype)
    bias = tf.cast(keras.ops.convert_to_tensor(layer.bias), dtype) if layer.use_bias else None
    return kernel, bias


def channel_axis(layer: Any, rank: int) -> int:
    """The output axis a BatchNormalization must normalize to be folded into this Dense/Conv layer."""
    if isinstance(layer, _CONV) and layer.data_format == "channels_first":
        return 1
    return rank - 1


def is_linear_activation(layer: Any) -> bool:
    """Whether the layer has no activation (or the linear one), so a BatchNormalization after it can be folded."""
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear
