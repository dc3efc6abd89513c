"""Propagation rules of layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019).

A rule redistributes the relevance ``R_j`` of a linear layer's outputs ``z_j = Σ_i a_i w_ij + b_j`` onto its inputs
``a_i``. Every rule here is the *gradient trick* of Montavon et al. (2019, §10.2) applied to a modified layer:

1. ``z = forward'(a)`` with modified weights (the rule's only job),
2. ``s = R / (z + ε·sign(z))`` (element-wise, ``sign(0) = 1`` as in Captum),
3. ``c = ∂(z·s)/∂a`` with ``s`` held constant (one vector-Jacobian product: the transposed matmul or convolution),
4. ``R_in = a ⊙ c``.

Rules see a layer only as ``linear(a, kernel, bias)``, so the same rule serves Dense, Conv1D/2D/3D and an element-wise
(BatchNormalization) layer; layers without weights (pooling, ``Add``) use the plain ε-trick with the rule's stabilizer.

Conservation: with ``b = 0`` and ``ε → 0`` the ε-, γ- and z⁺-rules conserve relevance, ``Σ_i R_in,i = Σ_j R_j``
(except at outputs with ``z_j = 0``, whose relevance is dropped); a bias ``b_j`` absorbs ``b_j·s_j`` and the
stabilizer absorbs ``ε·sign(z_j)·s_j``. The α-β rule conserves ``(α − β)·Σ_j R_j``.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

__all__ = [
    "AlphaBetaRule",
    "EpsilonRule",
    "GammaRule",
    "IdentityRule",
    "LinearFunction",
    "PropagationRule",
    "ZPlusRule",
    "gradient_trick",
    "stabilize",
]

LinearFunction = Callable[[tf.Tensor, "tf.Tensor | None", "tf.Tensor | None"], tf.Tensor]
"""``linear(inputs, kernel, bias) -> pre-activations``: a layer's affine map with the weights passed in (``None``
weights mean the layer's own, weight-free map, e.g. pooling)."""

_Layer = tuple[tf.Tensor, "tf.Tensor | None", "tf.Tensor | None"]  # (inputs, kernel or None, bias or None)


def _check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}.")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}.")
    return float(value)


def stabilize(z: tf.Tensor, epsilon: float) -> tf.Tensor:
    """``z + ε·sign(z)`` with ``sign(0) = 1``, so that the division in the gradient trick never divides by zero.

    Args:
        z: pre-activations, any shape.
        epsilon: the stabilizer ``ε >= 0``.

    Returns:
        A tensor of ``z``'s shape and dtype.
    """
    sign = tf.where(z >= 0, tf.ones_like(z), -tf.ones_like(z))
    return z + tf.constant(epsilon, z.dtype) * sign


def gradient_trick(
    forward: Callable[[tf.Tensor], tf.Tensor], inputs: tf.Tensor, relevance: tf.Tensor, epsilon: float
) -> tf.Tensor:
    """``R_in = a ⊙ ∂(z·s)/∂a`` with ``z = forward(a)`` and ``s = R / (z + ε·sign(z))`` held constant.

    Args:
        forward: a function that is linear (or positively homogeneous, like max-pooling) in ``inputs``, plus a bias.
        inputs: the layer's input activations ``a``, shape ``[batch, ...in]``.
        relevance: relevance of the layer's outputs, shape of ``forward(inputs)``.
        epsilon: stabilizer of the denominator.

    Returns:
        Relevance of the inputs, shape ``[batch, ...in]``.
    """
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        z = forward(inputs)
    scale = tf.stop_gradient(tf.math.divide_no_nan(tf.cast(relevance, z.dtype), stabilize(z, epsilon)))
    contribution = tape.gradient(z, inputs, output_gradients=scale)
    if contribution is None:  # the output does not depend on the input at all
        return tf.zeros_like(inputs)
    return inputs * contribution


class PropagationRule:
    """A relevance propagation rule for one linear layer.

    :meth:`propagate` is the gradient trick on the layer with the weights a rule modifies (``_weights(kernel,
    bias)``, unchanged by default: LRP-ε); a rule that redistributes otherwise replaces ``_redistribute`` (α-β,
    identity) or :meth:`propagate` itself. Every rule carries a stabilizer ``epsilon`` that layers without weights
    (pooling, ``Add``) use for their ε-trick.

    Attributes:
        epsilon: stabilizer ``ε`` of the denominator ``z + ε·sign(z)``.
    """

    epsilon: float = 1e-9

    def propagate(
        self,
        linear: LinearFunction,
        inputs: tf.Tensor,
        kernel: tf.Tensor | None,
        bias: tf.Tensor | None,
        relevance: tf.Tensor,
    ) -> tf.Tensor:
        """Relevance of the inputs of ``z = linear(inputs, kernel, bias)``.

        Args:
            linear: the layer's affine map, ``linear(a, kernel, bias)``.
            inputs: input activations ``a``, shape ``[batch, ...in]``.
            kernel: the layer's kernel (``None`` for a weight-free map such as pooling).
            bias: the layer's bias, or ``None`` when it has none.
            relevance: relevance of the outputs, shape ``[batch, ...out]``.

        Returns:
            Relevance of the inputs, shape ``[batch, ...in]``.
        """
        return self._redistribute(linear, (inputs, kernel, bias), relevance)

    def _redistribute(self, linear: LinearFunction, layer: _Layer, relevance: tf.Tensor) -> tf.Tensor:
        """The gradient trick on the layer with the rule's weights (:meth:`_weights`); rules may replace it."""
        inputs, kernel, bias = layer
        kernel, bias = self._weights(kernel, bias)
        return gradient_trick(lambda a: linear(a, kernel, bias), inputs, relevance, self.epsilon)

    def _weights(self, kernel: tf.Tensor | None, bias: tf.Tensor | None) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        """The modified ``(kernel, bias)`` of the rule (unchanged: LRP-ε)."""
        return kernel, bias

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class EpsilonRule(PropagationRule):
    """LRP-ε: ``R_i = Σ_j a_i w_ij / (z_j + ε·sign(z_j)) · R_j`` with ``z_j = Σ_i a_i w_ij + b_j``.

    ``ε → 0`` is LRP-0, which on a ReLU network without biases equals gradient × input. A larger ``ε`` absorbs weak
    or contradictory contributions (Montavon et al. recommend it for the middle layers). Same as Captum's
    ``EpsilonRule``.

    Args:
        epsilon: stabilizer ``ε >= 0`` (default ``1e-9``, Captum's).

    Example:
        >>> rule = EpsilonRule(epsilon=0.25)
    """

    def __init__(self, epsilon: float = 1e-9) -> None:
        self.epsilon = _check_non_negative("epsilon", epsilon)


class GammaRule(PropagationRule):
    """LRP-γ: the ε-trick with the kernel ``w + γ·w⁺``, favouring positive contributions.

    ``R_i = Σ_j a_i (w_ij + γ w_ij⁺) / Σ_i' a_i' (w_i'j + γ w_i'j⁺) · R_j`` (plus the bias in the denominator unless
    ``set_bias_to_zero``). Montavon et al. recommend it for the lower layers. Same modification as Captum's
    ``GammaRule`` (the bias is kept as is). ``γ = 0`` is LRP-ε; ``γ → ∞`` tends to z⁺.

    Args:
        gamma: ``γ >= 0`` (default ``0.25``).
        set_bias_to_zero: drop the bias from ``z`` (then relevance is conserved exactly).
        epsilon: stabilizer of the denominator.
    """

    def __init__(self, gamma: float = 0.25, set_bias_to_zero: bool = False, epsilon: float = 1e-9) -> None:
        self.gamma = _check_non_negative("gamma", gamma)
        self.set_bias_to_zero = bool(set_bias_to_zero)
        self.epsilon = _check_non_negative("epsilon", epsilon)

    def _weights(self, kernel: tf.Tensor | None, bias: tf.Tensor | None) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        if kernel is not None:
            kernel = kernel + tf.constant(self.gamma, kernel.dtype) * tf.nn.relu(kernel)
        return kernel, None if self.set_bias_to_zero else bias


class ZPlusRule(PropagationRule):
    """LRP-z⁺: ``R_i = Σ_j a_i w_ij⁺ / Σ_i' a_i' w_i'j⁺ · R_j`` (Montavon et al. 2017, deep Taylor on ReLU inputs).

    Only the positive weights carry relevance, and the bias is dropped by default, so relevance is conserved
    whenever the denominators are non-zero. On non-negative inputs (ReLU activations) it equals
    :class:`AlphaBetaRule` with ``α = 1, β = 0``. With ``set_bias_to_zero=False`` it is exactly Captum's
    ``Alpha1_Beta0_Rule()`` (positive kernel, bias kept).

    Args:
        set_bias_to_zero: drop the bias (default ``True``, the z⁺ rule of Montavon et al.).
        epsilon: stabilizer of the denominator.
    """

    def __init__(self, set_bias_to_zero: bool = True, epsilon: float = 1e-9) -> None:
        self.set_bias_to_zero = bool(set_bias_to_zero)
        self.epsilon = _check_non_negative("epsilon", epsilon)

    def _weights(self, kernel: tf.Tensor | None, bias: tf.Tensor | None) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        return (None if kernel is None else tf.nn.relu(kernel)), None if self.set_bias_to_zero else bias


class AlphaBetaRule(PropagationRule):
    """LRP-αβ: positive and negative contributions ``a_i w_ij`` are redistributed separately.

    ``R_i = Σ_j (α (a_i w_ij)⁺ / Σ_i' (a_i' w_i'j)⁺ − β (a_i w_ij)⁻ / Σ_i' (a_i' w_i'j)⁻) · R_j`` (Bach et al. 2015).
    The bias is not part of either sum. Relevance is scaled by ``α − β`` per layer, so choose ``α − β = 1`` (the
    usual ``α = 1, β = 0`` or ``α = 2, β = 1``) to conserve it. Weight-free layers (pooling) use the ε-trick.

    Args:
        alpha: weight of the positive part, ``α >= 0`` (default 1).
        beta: weight of the negative part, ``β >= 0`` (default 0).
        epsilon: stabilizer of both denominators.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, epsilon: float = 1e-9) -> None:
        self.alpha = _check_non_negative("alpha", alpha)
        self.beta = _check_non_negative("beta", beta)
        self.epsilon = _check_non_negative("epsilon", epsilon)

    def _redistribute(self, linear: LinearFunction, layer: _Layer, relevance: tf.Tensor) -> tf.Tensor:
        inputs, kernel, _ = layer
        if kernel is None:
            return gradient_trick(lambda a: linear(a, None, None), inputs, relevance, self.epsilon)
        positive_inputs, negative_inputs = tf.nn.relu(inputs), -tf.nn.relu(-inputs)
        positive_kernel, negative_kernel = tf.nn.relu(kernel), -tf.nn.relu(-kernel)
        result = tf.zeros_like(inputs)
        # (a w)⁺ = a⁺ w⁺ + a⁻ w⁻ and (a w)⁻ = a⁺ w⁻ + a⁻ w⁺ (products of same-sign factors are positive).
        for weight, kernels in (
            (self.alpha, (positive_kernel, negative_kernel)),
            (-self.beta, (negative_kernel, positive_kernel)),
        ):
            if weight == 0:
                continue
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([positive_inputs, negative_inputs])
                z = linear(positive_inputs, kernels[0], None) + linear(negative_inputs, kernels[1], None)
            scale = tf.stop_gradient(tf.math.divide_no_nan(tf.cast(relevance, z.dtype), stabilize(z, self.epsilon)))
            for part in (positive_inputs, negative_inputs):
                contribution = tape.gradient(z, part, output_gradients=scale)
                if contribution is not None:
                    result += tf.constant(weight, inputs.dtype) * part * contribution
            del tape
        return result


class IdentityRule(PropagationRule):
    """Pass relevance through unchanged, ``R_in = R`` (only for layers whose input and output shapes agree).

    Useful for element-wise layers (a BatchNormalization that is not folded), as in Captum's ``IdentityRule``.

    Args:
        epsilon: stabilizer that weight-free multi-input layers (``Add``) still use.
    """

    def __init__(self, epsilon: float = 1e-9) -> None:
        self.epsilon = _check_non_negative("epsilon", epsilon)

    def _redistribute(self, linear: LinearFunction, layer: _Layer, relevance: tf.Tensor) -> tf.Tensor:
        inputs = layer[0]
        if inputs.shape != relevance.shape:
            raise ValueError(
                f"IdentityRule needs a layer whose input and output shapes agree, got input {inputs.shape} and "
                f"output {relevance.shape}; use EpsilonRule, GammaRule or ZPlusRule for this layer."
            )
        return relevance
