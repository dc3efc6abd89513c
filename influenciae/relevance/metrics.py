"""Evaluation metrics for feature attributions: infidelity and max-sensitivity (Yeh et al. 2019).

Both follow Captum's ``captum.metrics`` definitions, so scores are comparable:

- ``infidelity = E_I[(Iᵀ·φ(x) − (f(x) − f(x − I)))²]`` over random perturbations ``I`` (lower is better); with
  ``normalize=True`` the attributions are first scaled by the per-example least-squares ``β``.
- ``sensitivity_max = max_{‖δ‖∞ ≤ r} ‖φ(x + δ) − φ(x)‖ / ‖φ(x)‖`` over sampled ``δ`` (lower is better).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

__all__ = ["infidelity", "sensitivity_max"]

_NORMS = ("fro", "inf", "-inf")


def _generator(seed: int | None) -> tf.random.Generator:
    if seed is None:
        return tf.random.Generator.from_non_deterministic_state()
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int or None, got {seed!r}.")
    return tf.random.Generator.from_seed(int(seed))


def _check_num_samples(num_samples: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    return int(num_samples)


def _takes_generator(function: Callable[..., Any]) -> bool:
    """Whether ``function`` accepts a second positional argument (the random generator)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _select(outputs: tf.Tensor, target: Any, batch: int) -> tf.Tensor:
    """The explained score ``[batch]`` of outputs ``[batch]`` or ``[batch, classes]``."""
    outputs = tf.convert_to_tensor(outputs)
    if outputs.shape.rank == 1:
        return outputs
    flat = tf.reshape(outputs, [batch, -1])
    if target is None:
        if flat.shape[1] != 1:
            raise ValueError(f"The model has {flat.shape[1]} outputs per example: pass target (an int or [batch]).")
        return flat[:, 0]
    index = np.asarray(target)
    if index.ndim == 0:
        index = np.full([batch], int(index))
    if index.shape != (batch,):
        raise ValueError(f"target must be an int or have shape [{batch}], got shape {index.shape}.")
    return tf.gather(flat, tf.constant(index, tf.int32), axis=1, batch_dims=1)


def infidelity(
    forward_fn_or_model: Callable[[tf.Tensor], tf.Tensor],
    perturb_fn: Callable[..., Any],
    inputs: Any,
    attributions: Any,
    target: Any = None,
    num_samples: int = 10,
    normalize: bool = False,
    seed: int | None = None,
) -> tf.Tensor:
    """Explanation infidelity (Yeh et al. 2019), as Captum's ``captum.metrics.infidelity``.

    ``INFD(φ, f, x) = 1/S Σ_s (I_sᵀ·φ(x) − (f_t(x) − f_t(x − I_s)))²`` for ``S = num_samples`` perturbations
    ``I_s`` drawn by ``perturb_fn``. With ``normalize=True`` the attribution term is scaled by the optimal
    ``β = Σ_s a_s d_s / Σ_s a_s²`` first (``a_s = I_sᵀφ``, ``d_s`` the output difference), which makes the score
    invariant to the scale of ``φ``.

    Args:
        forward_fn_or_model: ``f(inputs [batch, ...]) -> [batch]`` or ``[batch, classes]`` (a Keras model works).
        perturb_fn: ``perturb_fn(inputs) -> (perturbations, perturbed_inputs)`` where ``perturbed_inputs =
            inputs − perturbations`` in Yeh et al.'s convention (any other pair is allowed, the metric uses the
            perturbation that is returned); it receives ``inputs`` repeated ``num_samples`` times
            ``[batch·num_samples, ...]`` (each example repeated consecutively). If it takes a second argument it is
            passed a ``tf.random.Generator`` seeded from ``seed``, so results are reproducible.
        inputs: ``[batch, ...]``.
        attributions: ``[batch, ...]``, the inputs' shape.
        target: output index (int or ``[batch]``) when ``f`` returns ``[batch, classes]``.
        num_samples: perturbations per example.
        normalize: scale the attributions by the optimal ``β`` (Captum's ``normalize``).
        seed: seed of the generator passed to ``perturb_fn``.

    Returns:
        Infidelity per example ``[batch]``.

    Raises:
        ValueError: when shapes disagree or ``num_samples < 1``.

    Example:
        >>> def perturb(x, generator):
        ...     noise = generator.normal(tf.shape(x), dtype=x.dtype) * 0.1
        ...     return noise, x - noise
        >>> infidelity(model, perturb, x, LRP(model).attribute(x, 0), target=0, seed=0)  # [batch]
    """
    num_samples = _check_num_samples(num_samples)
    inputs = tf.convert_to_tensor(inputs)
    attributions = tf.cast(tf.convert_to_tensor(attributions), inputs.dtype)
    if attributions.shape != inputs.shape:
        raise ValueError(f"attributions must have the inputs' shape {inputs.shape}, got {attributions.shape}.")
    batch = inputs.shape[0]
    repeated = tf.repeat(inputs, num_samples, axis=0)
    perturbed = perturb_fn(repeated, _generator(seed)) if _takes_generator(perturb_fn) else perturb_fn(repeated)
    if not isinstance(perturbed, tuple | list) or len(perturbed) != 2:
        raise ValueError("perturb_fn must return a pair (perturbations, perturbed_inputs).")
    perturbations = tf.cast(tf.convert_to_tensor(perturbed[0]), inputs.dtype)
    perturbed_inputs = tf.cast(tf.convert_to_tensor(perturbed[1]), inputs.dtype)
    if perturbations.shape != repeated.shape or perturbed_inputs.shape != repeated.shape:
        raise ValueError(
            f"perturb_fn must return two tensors of shape {repeated.shape}, got {perturbations.shape} and "
            f"{perturbed_inputs.shape}."
        )
    repeated_target = None if target is None else np.repeat(np.broadcast_to(np.asarray(target), [batch]), num_samples)
    original = _select(forward_fn_or_model(inputs), target, batch)
    shifted = _select(forward_fn_or_model(perturbed_inputs), repeated_target, batch * num_samples)
    differences = tf.reshape(tf.repeat(original, num_samples, axis=0) - shifted, [batch, num_samples])
    projected = tf.reduce_sum(
        tf.reshape(tf.repeat(attributions, num_samples, axis=0) * perturbations, [batch * num_samples, -1]), axis=1
    )
    projected = tf.reshape(tf.cast(projected, differences.dtype), [batch, num_samples])
    if normalize:
        denominator = tf.reduce_sum(projected**2, axis=1, keepdims=True)
        beta = tf.math.divide_no_nan(tf.reduce_sum(projected * differences, axis=1, keepdims=True), denominator)
        projected = beta * projected
    return tf.reduce_mean((projected - differences) ** 2, axis=1)


def _norm(values: tf.Tensor, norm: str | float) -> tf.Tensor:
    """Norm of each row of ``values [batch, features]``."""
    if norm == "fro" or norm == 2:
        return tf.norm(values, ord="euclidean", axis=1)
    if norm in ("inf", np.inf):
        return tf.reduce_max(tf.abs(values), axis=1)
    if norm in ("-inf", -np.inf):
        return tf.reduce_min(tf.abs(values), axis=1)
    power = float(norm)
    return tf.reduce_sum(tf.abs(values) ** power, axis=1) ** (1.0 / power)


def sensitivity_max(
    explanation_fn: Callable[..., Any],
    inputs: Any,
    perturb_radius: float = 0.02,
    num_samples: int = 10,
    norm: str | float = "fro",
    seed: int | None = None,
    *,
    perturb_fn: Callable[..., Any] | None = None,
    **explanation_kwargs: Any,
) -> tf.Tensor:
    """Max-sensitivity of an explanation (Yeh et al. 2019), as Captum's ``captum.metrics.sensitivity_max``.

    ``SENS_max(φ, x) = max_s ‖φ(x̃_s) − φ(x)‖ / ‖φ(x)‖`` with ``x̃_s = x + δ_s``, ``δ_s`` uniform in the L∞ ball of
    radius ``perturb_radius`` (or drawn by ``perturb_fn``); a zero ``‖φ(x)‖`` counts as 1, as in Captum.

    Args:
        explanation_fn: ``explanation_fn(inputs [n, ...], **explanation_kwargs) -> attributions [n, ...]`` (e.g.
            ``LRP(model).attribute`` with ``target=...`` in ``explanation_kwargs``; an int target is repeated,
            a ``[batch]`` target is repeated per sample).
        inputs: ``[batch, ...]``.
        perturb_radius: ``r`` of the default uniform L∞ perturbation.
        num_samples: perturbations per example.
        norm: ``"fro"`` (L2 of the flattened attributions, the default), ``"inf"``, ``"-inf"``, or ``p > 0``.
        seed: seed of the perturbations (and of the generator passed to ``perturb_fn``).
        perturb_fn: optional ``perturb_fn(inputs [batch·S, ...][, generator]) -> perturbed inputs``; default:
            ``inputs + uniform(−r, r)``.
        **explanation_kwargs: forwarded to ``explanation_fn``.

    Returns:
        Max-sensitivity per example ``[batch]``.

    Raises:
        ValueError: on a bad norm, radius or ``num_samples``.

    Example:
        >>> sensitivity_max(LRP(model).attribute, x, perturb_radius=0.05, target=0, seed=0)  # [batch]
    """
    num_samples = _check_num_samples(num_samples)
    if isinstance(norm, str) and norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS} or a number p > 0, got {norm!r}.")
    if not isinstance(norm, str) and not (isinstance(norm, int | float) and norm > 0):
        raise ValueError(f"norm must be one of {_NORMS} or a number p > 0, got {norm!r}.")
    if not (isinstance(perturb_radius, int | float) and perturb_radius >= 0):
        raise ValueError(f"perturb_radius must be a number >= 0, got {perturb_radius!r}.")
    inputs = tf.convert_to_tensor(inputs)
    batch = inputs.shape[0]
    generator = _generator(seed)
    repeated = tf.repeat(inputs, num_samples, axis=0)
    if perturb_fn is None:
        radius = tf.constant(perturb_radius, inputs.dtype)
        perturbed = repeated + generator.uniform(tf.shape(repeated), -radius, radius, dtype=inputs.dtype)
    else:
        perturbed = perturb_fn(repeated, generator) if _takes_generator(perturb_fn) else perturb_fn(repeated)
        perturbed = tf.cast(tf.convert_to_tensor(perturbed), inputs.dtype)
        if perturbed.shape != repeated.shape:
            raise ValueError(f"perturb_fn must return a tensor of shape {repeated.shape}, got {perturbed.shape}.")
    repeated_kwargs = dict(explanation_kwargs)
    target = explanation_kwargs.get("target")
    if target is not None and np.ndim(target) == 1:
        repeated_kwargs["target"] = np.repeat(np.asarray(target), num_samples)
    original = tf.reshape(tf.convert_to_tensor(explanation_fn(inputs, **explanation_kwargs)), [batch, -1])
    shifted = tf.reshape(tf.convert_to_tensor(explanation_fn(perturbed, **repeated_kwargs)), [batch * num_samples, -1])
    original_norm = _norm(original, norm)
    original_norm = tf.where(original_norm == 0, tf.ones_like(original_norm), original_norm)
    changes = _norm(shifted - tf.repeat(original, num_samples, axis=0), norm)
    ratios = tf.reshape(changes / tf.repeat(original_norm, num_samples, axis=0), [batch, num_samples])
    return tf.reduce_max(ratios, axis=1)
