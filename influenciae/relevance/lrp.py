"""Layer-wise relevance propagation for Keras 3 models (Bach et al. 2015; Montavon et al. 2019).

A forward pass records every layer's input and output; the backward pass starts from the chosen output's value and
redistributes it layer by layer with each layer's :mod:`rule <influenciae.relevance.rules>`. The semantics follow
Captum's ``LRP`` and ``LayerLRP``: the relevance of the output layer is the model's output for the target (not 1),
activations pass relevance through unchanged, and a BatchNormalization that follows a linear Dense/Conv layer is
folded into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

from influenciae._backend import tf
from influenciae.model.layer_graph import Graph, Values, batchnorm_affine, channel_axis, is_linear_activation
from influenciae.relevance._graph import DEFAULT_RULE, propagate_step
from influenciae.relevance.rules import PropagationRule

__all__ = ["LRP", "LayerLRP", "RuleSpec"]

RuleSpec = Union[  # noqa: UP007 (a runtime alias; `X | Y` of a Callable is not valid at runtime on 3.10)
    None, PropagationRule, Mapping[str, PropagationRule], Callable[[Any], "PropagationRule | None"]
]
"""How rules are chosen: ``None`` (LRP-ε with ``ε = 1e-9`` everywhere), one rule for every layer, a dict
``{layer name: rule}`` (other layers get the default), or a callable ``layer -> rule or None``."""

Target = Union[int, Sequence[int], np.ndarray, tf.Tensor, None]  # noqa: UP007


class LRP:
    """Relevance of each input feature for one output of a Keras model.

    For a target output ``f_t(x)``, ``attribute`` returns ``R(x)`` of the inputs' shape with, for conservative rules
    on a model without biases, ``Σ R(x) = f_t(x)``; with biases, each layer's bias absorbs its share.

    Args:
        model: a Keras 3 ``Sequential`` or ``Functional`` model with one output ``[batch, classes]`` or ``[batch]``,
            built from supported layers (Dense, Conv1D/2D/3D, pooling, Flatten/Reshape, BatchNormalization, Add,
            activations, Dropout, nested models). Prefer a model that outputs logits: activations, softmax
            included, pass relevance through unchanged.
        rules: a :data:`RuleSpec`: ``None`` (LRP-ε, ``ε = 1e-9``), one rule, ``{layer name: rule}`` or a callable
            ``layer -> rule | None``.
        compile: run the forward and backward passes in one ``tf.function`` (default; traced on the first call and
            again for a new input shape, then several times faster than eager). ``False`` runs eagerly (debugging).

    Raises:
        ValueError: on an unsupported layer (naming it and its class), several outputs, or unknown layer names in
            ``rules``.

    Example:
        >>> lrp = LRP(model, rules={"conv1": GammaRule(0.25), "dense_out": EpsilonRule(0.1)})
        >>> relevance = lrp.attribute(images, target=labels)  # [batch, height, width, channels]
    """

    def __init__(self, model: Any, rules: RuleSpec = None, *, compile: bool = True) -> None:
        self._graph = Graph(model)
        self.model = model
        if len(self._graph.output_keys) != 1:
            raise ValueError(
                f"LRP explains a model with one output; {model.name!r} has {len(self._graph.output_keys)}. "
                "Build a Keras Model(model.inputs, model.outputs[i]) for the output to explain."
            )
        self._rules = self._resolve_rules(rules)
        self._consumers = self._graph.consumers()
        self._producer = {key: index for index, step in enumerate(self._graph.steps) for key in step.outputs}
        self._wanted: list[int] = list(self._graph.input_keys)
        self._compile = bool(compile)
        self._compiled: Any = None
        self._num_outputs = self._graph.output_size

    def _resolve_rules(self, rules: RuleSpec) -> dict[int, PropagationRule]:
        layers = self._graph.layers
        resolved: dict[int, PropagationRule] = {}
        if rules is None or isinstance(rules, PropagationRule):
            rule = DEFAULT_RULE if rules is None else rules
            return {id(layer): rule for layer in layers}
        if isinstance(rules, Mapping):
            names = {getattr(layer, "name", None) for layer in layers}
            unknown = sorted(str(name) for name in rules if name not in names)
            if unknown:
                raise ValueError(
                    f"rules name layers that are not in the model: {unknown}; layers: {sorted(map(str, names))}."
                )
            for name, rule in rules.items():
                _check_rule(rule, f"rules[{name!r}]")
            return {id(layer): rules.get(getattr(layer, "name", ""), DEFAULT_RULE) for layer in layers}
        if callable(rules):
            for layer in layers:
                chosen = rules(layer)
                chosen = DEFAULT_RULE if chosen is None else chosen
                _check_rule(chosen, f"rules({getattr(layer, 'name', layer)!r})")
                resolved[id(layer)] = chosen
            return resolved
        raise TypeError(
            "rules must be None, a PropagationRule, a dict {layer name: rule} or a callable, "
            f"got {type(rules).__name__}."
        )

    def rule_for(self, layer: Any) -> PropagationRule:
        """The rule used for ``layer`` (a layer of the model, nested models included)."""
        return self._rules.get(id(layer), DEFAULT_RULE)

    # ------------------------------------------------------------------------------------------------ core

    def _prepare_inputs(self, inputs: Any) -> list[tf.Tensor]:
        items = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        if len(items) != len(self._graph.input_keys):
            raise ValueError(f"The model takes {len(self._graph.input_keys)} inputs, got {len(items)}.")
        prepared = []
        for item, dtype in zip(items, self._graph.input_dtypes, strict=True):
            if isinstance(item, tf.Tensor | tf.Variable):
                tensor = tf.cast(item, dtype) if item.dtype != tf.as_dtype(dtype) else tf.convert_to_tensor(item)
            else:  # via NumPy, so that Python floats are not rounded to float32 first
                tensor = tf.constant(np.asarray(item, dtype=tf.as_dtype(dtype).as_numpy_dtype))
            if tensor.shape.rank is None or tensor.shape.rank < 1:
                raise ValueError(f"inputs must be batched ([batch, ...]), got shape {tensor.shape}.")
            prepared.append(tensor)
        return prepared

    def _target_index(self, target: Target, batch: int) -> np.ndarray | None:
        """Validated target indices ``[batch]`` (``None``: the predicted output)."""
        if target is None:
            return None
        index = np.asarray(target)
        if index.dtype.kind not in "iu":
            raise TypeError(f"target must be an int or integer indices [batch], got dtype {index.dtype}.")
        if index.ndim == 0:
            index = np.full([batch], int(index))
        if index.shape != (batch,):
            raise ValueError(f"target must be an int or have shape [{batch}], got shape {index.shape}.")
        self._check_range(index)
        return index.astype(np.int32)

    def _check_range(self, index: np.ndarray) -> None:
        if self._num_outputs is not None and (index.min() < 0 or index.max() >= self._num_outputs):
            raise ValueError(f"target must lie in [0, {self._num_outputs}), got {index.min()}..{index.max()}.")

    def _initial_relevance(self, output: tf.Tensor, index: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(R at the output [batch, ...], explained score [batch])``; ``index`` ``[batch]`` or ``None`` (argmax)."""
        if any(size is None for size in output.shape[1:]):
            raise ValueError(f"LRP needs a static number of outputs, got output shape {output.shape}.")
        num_outputs = int(np.prod(output.shape[1:]))
        flat = tf.reshape(output, [-1, num_outputs])
        self._num_outputs = num_outputs
        if index is None:
            index = tf.argmax(flat, axis=1, output_type=tf.int32)
        mask = tf.one_hot(index, num_outputs, dtype=flat.dtype)
        relevance = tf.reshape(mask * flat, tf.shape(output))
        return relevance, tf.reduce_sum(mask * flat, axis=1)

    def _backward(self, values: Values, relevance: tf.Tensor) -> dict[int, tf.Tensor]:
        graph = self._graph
        relevances: dict[int, tf.Tensor] = {graph.output_keys[0]: relevance}
        folded: dict[int, tuple[tf.Tensor, tf.Tensor]] = {}
        for index in reversed(range(len(graph.steps))):
            step = graph.steps[index]
            (output_key,) = step.outputs
            if output_key not in relevances:
                continue  # does not reach the explained output
            incoming = relevances[output_key]
            fold = self._fold_target(index, values) if step.kind == "batchnorm" else None
            if fold is not None:
                producer, scale, shift = fold
                folded[producer] = (scale, shift)
                received = [incoming]
            else:
                rule = self.rule_for(step.layer)
                received = propagate_step(step, values, incoming, rule, folded.pop(index, None))
            for key, part in zip(step.inputs, received, strict=True):
                part = tf.cast(part, values[key].dtype)  # layers with another dtype policy
                part = tf.reshape(part, tf.shape(values[key])) if part.shape != values[key].shape else part
                relevances[key] = relevances[key] + part if key in relevances else part
        return relevances

    def _fold_target(self, index: int, values: Values) -> tuple[int, tf.Tensor, tf.Tensor] | None:
        """``(producer step, scale, shift)`` when the BatchNormalization at ``index`` folds into its producer."""
        step = self._graph.steps[index]
        (key,) = step.inputs
        producer = self._producer.get(key)
        if producer is None or self._consumers.get(key, 0) != 1:
            return None
        previous = self._graph.steps[producer]
        if previous.kind not in ("dense", "conv") or not is_linear_activation(previous.layer):
            return None
        value = values[key]
        axis, scale, shift = batchnorm_affine(step.layer, value.shape.rank, value.dtype)
        if axis != channel_axis(previous.layer, value.shape.rank):
            return None
        return producer, scale, shift

    def _core(self, inputs: list[tf.Tensor], index: tf.Tensor | None) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Forward and backward pass: ``(relevance of each wanted key, explained score [batch])``."""
        values = self._graph.forward(inputs)
        initial, score = self._initial_relevance(values[self._graph.output_keys[0]], index)
        relevances = self._backward(values, initial)
        return [relevances[key] if key in relevances else tf.zeros_like(values[key]) for key in self._wanted], score

    def _run(self, inputs: Any, target: Target) -> tuple[dict[int, tf.Tensor], tf.Tensor]:
        prepared = self._prepare_inputs(inputs)
        batch = prepared[0].shape[0]
        if batch is None:
            raise ValueError("inputs need a known batch size.")
        index = self._target_index(target, int(batch))
        index_tensor = None if index is None else tf.constant(index)
        if self._compile:
            if self._compiled is None:
                self._compiled = tf.function(self._core, reduce_retracing=True, autograph=False)
            results, score = self._compiled(prepared, index_tensor)
        else:
            results, score = self._core(prepared, index_tensor)
        if index is not None:
            self._check_range(index)  # when the number of outputs was only known after the forward pass
        return dict(zip(self._wanted, results, strict=True)), score

    # ------------------------------------------------------------------------------------------------ public

    def attribute(self, inputs: Any, target: Target = None, *, return_output: bool = False) -> Any:
        """Relevance of every input feature for the target output.

        Args:
            inputs: ``[batch, ...]`` (a list of tensors for a multi-input model).
            target: the output index to explain: an int, integer indices ``[batch]``, or ``None`` for the
                predicted (largest) output; a model with output ``[batch]`` or ``[batch, 1]`` needs none.
            return_output: also return the explained output value ``f_t(x)`` ``[batch]``, the total relevance
                before propagation (for conservation checks: ``relevance.sum(non-batch axes) ≈ f_t(x)`` when no
                bias absorbs relevance).

        Returns:
            Relevance of the inputs' shape (a list for a multi-input model), or ``(relevance, output [batch])``.

        Raises:
            ValueError: on a target out of range or of the wrong shape, or inputs of the wrong count.
        """
        relevances, score = self._run(inputs, target)
        result = [relevances[key] for key in self._graph.input_keys]
        relevance = result[0] if len(result) == 1 else result
        return (relevance, score) if return_output else relevance


class LayerLRP(LRP):
    """Relevance of a layer's neurons for one output (Captum's ``LayerLRP``).

    Args:
        model: as for :class:`LRP`.
        layer: a layer of the model (or its name), or a list of them; the layer must be called once in the model.
        rules: as for :class:`LRP`.
        compile: as for :class:`LRP`.

    Raises:
        ValueError: if the layer is not in the model or is called more than once.

    Example:
        >>> LayerLRP(model, "dense_hidden").attribute(x, target=3)  # [batch, units]
    """

    def __init__(self, model: Any, layer: Any, rules: RuleSpec = None, *, compile: bool = True) -> None:
        super().__init__(model, rules, compile=compile)
        self._many = isinstance(layer, list | tuple)
        self.layers = [self._find_layer(item) for item in (layer if self._many else [layer])]
        for item in self.layers:
            for keys in (self._graph.layer_outputs[id(item)][0], self._graph.layer_inputs[id(item)][0]):
                self._wanted.extend(key for key in keys if key not in self._wanted)

    def _find_layer(self, layer: Any) -> Any:
        candidates = self._graph.layers
        if isinstance(layer, str):
            matches = [item for item in candidates if getattr(item, "name", None) == layer]
            if not matches:
                names = sorted(str(getattr(item, "name", item)) for item in candidates)
                raise ValueError(f"No layer named {layer!r} in the model; layers: {names}.")
            layer = matches[0]
        elif not any(item is layer for item in candidates):
            raise ValueError(f"Layer {getattr(layer, 'name', layer)!r} is not a layer of the model.")
        if len(self._graph.layer_outputs[id(layer)]) != 1:
            raise ValueError(
                f"Layer {layer.name!r} is called more than once in the model, so its relevance is ambiguous."
            )
        return layer

    def attribute(
        self, inputs: Any, target: Target = None, *, return_output: bool = False, attribute_to_layer_input: bool = False
    ) -> Any:
        """Relevance of the layer's outputs (or inputs) for the target output.

        Args:
            inputs: ``[batch, ...]`` (a list for a multi-input model).
            target: as for :meth:`LRP.attribute`.
            return_output: also return the explained output value ``[batch]``.
            attribute_to_layer_input: relevance of the layer's input instead of its output.

        Returns:
            Relevance of the layer's activations' shape (its output, or input; a list if the layer has several, and
            a list of those if several layers were given), or ``(relevance, output [batch])``.
        """
        relevances, score = self._run(inputs, target)
        results = []
        for layer in self.layers:
            table = self._graph.layer_inputs if attribute_to_layer_input else self._graph.layer_outputs
            keys = table[id(layer)][0]
            if attribute_to_layer_input and not keys:  # an InputLayer: its input is its output
                keys = self._graph.layer_outputs[id(layer)][0]
            parts = [relevances[key] for key in keys]
            results.append(parts[0] if len(parts) == 1 else parts)
        relevance = results if self._many else results[0]
        return (relevance, score) if return_output else relevance


def _check_rule(rule: Any, where: str) -> None:
    if not isinstance(rule, PropagationRule):
        raise TypeError(f"{where} must be a PropagationRule (EpsilonRule(), GammaRule(), ...), got {rule!r}.")
