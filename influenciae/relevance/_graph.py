"""Relevance handlers for the steps of a model's layer graph (:mod:`influenciae.model.layer_graph`)."""

from __future__ import annotations

from collections.abc import Callable

from influenciae._backend import tf
from influenciae.model.layer_graph import Step, Values, batchnorm_affine, conv_linear, dense_linear, weights
from influenciae.relevance.rules import EpsilonRule, IdentityRule, PropagationRule, gradient_trick

# ------------------------------------------------------------------------------------------------ handlers


def propagate_step(
    step: Step, values: Values, relevance: tf.Tensor, rule: PropagationRule, folded: tuple[tf.Tensor, tf.Tensor] | None
) -> list[tf.Tensor]:
    """Relevance of a step's inputs from the relevance of its (single) output.

    Args:
        step: the step.
        values: recorded forward values.
        relevance: relevance of the step's output, shape of the output.
        rule: the rule chosen for the step's layer.
        folded: ``(scale, shift)`` of a BatchNormalization folded into this Dense/Conv step, if any.

    Returns:
        One relevance tensor per input key, each of that input's shape.
    """
    inputs = [values[key] for key in step.inputs]
    layer = step.layer
    if step.kind == "pass":
        return [relevance]
    if step.kind == "structural":
        return _transpose(lambda *a: step.call(dict(zip(step.inputs, a, strict=True)))[0], inputs, relevance)
    if step.kind == "merge":
        return _merge(lambda *a: step.call(dict(zip(step.inputs, a, strict=True)))[0], inputs, relevance, rule)
    (a,) = inputs
    if step.kind == "pooling":
        if isinstance(rule, IdentityRule) and a.shape == relevance.shape:
            return [relevance]
        return [gradient_trick(lambda x: layer(x), a, relevance, rule.epsilon)]
    if step.kind == "batchnorm":
        axis, scale, shift = batchnorm_affine(layer, a.shape.rank, a.dtype)
        broadcast = [1] * a.shape.rank
        broadcast[axis] = -1
        scale, shift = tf.reshape(scale, broadcast), tf.reshape(shift, broadcast)

        def elementwise(x: tf.Tensor, kernel: tf.Tensor | None, bias: tf.Tensor | None) -> tf.Tensor:
            z = x * kernel if kernel is not None else x
            return z if bias is None else z + bias

        return [rule.propagate(elementwise, a, scale, shift, relevance)]
    kernel, bias = weights(layer, a.dtype)
    if folded is not None:
        scale, shift = folded
        kernel = kernel * scale
        bias = shift if bias is None else bias * scale + shift
    linear = dense_linear(layer) if step.kind == "dense" else conv_linear(layer)
    return [rule.propagate(linear, a, kernel, bias, relevance)]


def _transpose(function: Callable[..., tf.Tensor], inputs: list[tf.Tensor], relevance: tf.Tensor) -> list[tf.Tensor]:
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        output = function(*inputs)
    gradients = tape.gradient(output, inputs, output_gradients=tf.cast(relevance, output.dtype))
    return [tf.zeros_like(x) if g is None else g for x, g in zip(inputs, gradients, strict=True)]


def _merge(
    function: Callable[..., tf.Tensor], inputs: list[tf.Tensor], relevance: tf.Tensor, rule: PropagationRule
) -> list[tf.Tensor]:
    """``R_k = x_k ⊙ ∂(z·s)/∂x_k``: for ``z = Σ_k x_k`` each input gets ``x_k / z`` of the relevance."""
    from influenciae.relevance.rules import stabilize

    with tf.GradientTape() as tape:
        tape.watch(inputs)
        z = function(*inputs)
    scale = tf.stop_gradient(tf.math.divide_no_nan(tf.cast(relevance, z.dtype), stabilize(z, rule.epsilon)))
    gradients = tape.gradient(z, inputs, output_gradients=scale)
    return [tf.zeros_like(x) if g is None else x * g for x, g in zip(inputs, gradients, strict=True)]


DEFAULT_RULE = EpsilonRule()
