"""Output-space pieces of the Gauss-Newton and Fisher operators (:mod:`influenciae.hessian.ggn`): the per-example
loss Hessian ``H_out`` in closed form or by autodiff, the model's class scores, and the seeded per-example draws of
the sampled Fisher."""

from __future__ import annotations

from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import unpack_batch
from influenciae.model import InfluenceModel

__all__ = ["autodiff_output_hessian", "closed_form_output_hessian"]


def closed_form_output_hessian(family: str, outputs: tf.Tensor, weights: tf.Tensor, tangents: tf.Tensor) -> tf.Tensor:
    """``H_out t`` in closed form for logits/predictions ``outputs [B, K]`` and tangents ``[n, B, K]``.

    Args:
        family: ``"softmax_cross_entropy"``, ``"sigmoid_cross_entropy"`` or ``"squared_error"``
            (see :attr:`InfluenceModel.loss_family`).
        outputs: ``[B, K]``.
        weights: Sample weights ``[B]``.
        tangents: ``[n, B, K]``.

    Returns:
        ``[n, B, K]``: ``w_i H_out,i t`` per example.
    """
    scale = weights[None, :, None]
    if family == "softmax_cross_entropy":
        probabilities = tf.nn.softmax(outputs, axis=-1)[None]
        inner = tf.reduce_sum(probabilities * tangents, axis=-1, keepdims=True)
        return scale * probabilities * (tangents - inner)
    width = tf.cast(tf.shape(outputs)[-1], outputs.dtype)  # Keras averages over the last axis
    if family == "sigmoid_cross_entropy":
        probabilities = tf.sigmoid(outputs)[None]
        return scale * probabilities * (1.0 - probabilities) * tangents / width
    if family == "squared_error":
        return scale * 2.0 * tangents / width
    raise ValueError(f"No closed-form output Hessian for {family!r}.")


def autodiff_output_hessian(
    model: InfluenceModel, outputs: tf.Tensor, targets: Any, weights: tf.Tensor, tangents: tf.Tensor
) -> tf.Tensor:
    """``H_out t``: the Hessian of ``Σ_i w_i ℓ(y_i, o_i)`` with respect to the outputs, applied to each tangent.

    The loss is a sum of per-example terms, so its output Hessian is block-diagonal and one output-space
    Hessian-vector product per tangent gives every example's ``H_out,i t_i`` at once.

    Args:
        model: Supplies the loss as a function of the outputs.
        outputs: ``[B, *output_shape]``.
        targets: The batch's targets.
        weights: ``[B]``.
        tangents: ``[n, B, *output_shape]``.

    Returns:
        ``[n, B, *output_shape]``.
    """
    count = tf.shape(tangents)[0]
    with tf.GradientTape() as outer:
        outer.watch(outputs)
        with tf.GradientTape() as inner:
            inner.watch(outputs)
            loss = tf.reduce_sum(model.loss_from_outputs(outputs, targets, weights))
        gradients = inner.gradient(loss, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        projections = tf.reduce_sum(tf.reshape(tangents, [count, -1]) * tf.reshape(gradients, [1, -1]), axis=1)
    return outer.jacobian(projections, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _outer_product_sum(scores: tf.Tensor, coefficients: tf.Tensor, tangents: tf.Tensor) -> tf.Tensor:
    """``Σ_k a_ki s_ki (s_kiᵀ t_i)`` for scores ``[K, B, O]``, coefficients ``[K, B]`` and tangents ``[n, B, O]``."""
    projections = tf.einsum("nbo,kbo->nkb", tangents, scores) * coefficients[None]
    return tf.einsum("nkb,kbo->nbo", projections, scores)


def _class_scores(model: InfluenceModel, outputs: tf.Tensor, targets: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Output-space gradients ``s_c = ∇_o ℓ(c, o)`` ``[C, B, O]`` and ``log p_c = -ℓ(c, o)`` ``[C, B]``."""
    if outputs.shape.rank != 2:
        raise ValueError(
            f"The categorical Fisher needs outputs of shape [batch, classes], got {outputs.shape}. Use "
            "curvature='ggn' for other outputs."
        )
    size = tf.shape(outputs)[0]
    width = int(outputs.shape[-1])
    num_classes = 2 if width == 1 else width
    tiled = tf.tile(outputs, [num_classes, 1])  # [C·B, O], class-major
    labels = _class_targets(tf.repeat(tf.range(num_classes), size), targets, width)
    with tf.GradientTape() as tape:
        tape.watch(tiled)
        losses = model.loss_from_outputs(tiled, labels)  # unweighted: weights multiply the whole F_out
    scores = tape.gradient(losses, tiled, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.reshape(scores, [num_classes, size, width]), -tf.reshape(losses, [num_classes, size])


def _class_targets(classes: tf.Tensor, targets: Any, width: int) -> tf.Tensor:
    """Targets meaning ``classes [M]``, in the format of the dataset's ``targets`` (sparse, one-hot or binary)."""
    if not isinstance(targets, tf.Tensor):
        targets = tf.convert_to_tensor(targets)
    trailing = targets.shape[1:]
    if width > 1 and targets.shape.rank == 2 and targets.shape[-1] == width:  # one-hot rows
        return tf.one_hot(classes, width, dtype=targets.dtype)
    if trailing.num_elements() == 1 or targets.shape.rank == 1:  # sparse labels, or 0/1 for a single output
        return tf.cast(tf.reshape(classes, tf.concat([[-1], tf.shape(targets)[1:]], axis=0)), targets.dtype)
    raise ValueError(
        f"Cannot enumerate the classes of targets of shape {targets.shape} for outputs with {width} columns: the "
        "categorical Fisher expects sparse labels [batch] or [batch, 1], or one-hot rows [batch, classes]."
    )


def _looks_like_class_labels(outputs: tf.Tensor, targets: Any) -> bool:
    if outputs.shape.rank != 2 or not isinstance(targets, tf.Tensor):
        return False
    values = targets.numpy()
    if targets.dtype.is_integer or targets.dtype.is_bool:
        return True
    if outputs.shape[-1] == 1 or (targets.shape.rank == 2 and targets.shape[-1] == outputs.shape[-1]):
        return bool(np.all((values == 0) | (values == 1)))  # binary labels or one-hot rows
    return bool(targets.shape[1:].num_elements() == 1 and np.all(values == np.round(values)))


def _sample_classes(log_probabilities: tf.Tensor, indices: tf.Tensor, num_samples: int, seed: Any) -> tf.Tensor:
    """Classes ``[K, B]`` drawn from ``p = exp(log_probabilities [C, B])`` by inverse CDF, seeded per example."""
    uniforms = _per_example_uniform(indices, num_samples, seed, log_probabilities.dtype)  # [B, K]
    cumulative = tf.cumsum(tf.exp(tf.transpose(log_probabilities)), axis=1)  # [B, C]
    cumulative = cumulative / cumulative[:, -1:]
    classes = tf.searchsorted(cumulative, uniforms, side="right")  # [B, K]
    return tf.transpose(tf.minimum(classes, tf.shape(cumulative)[1] - 1))


def _per_example_uniform(indices: tf.Tensor, num_samples: int, seed: Any, dtype: tf.DType) -> tf.Tensor:
    return tf.map_fn(
        lambda index: tf.random.stateless_uniform([num_samples], seed=_example_seed(seed, index), dtype=dtype),
        indices,
        fn_output_signature=tf.TensorSpec([num_samples], dtype),
    )


def _per_example_normal(indices: tf.Tensor, shape: tf.Tensor, seed: Any, dtype: tf.DType) -> tf.Tensor:
    return tf.map_fn(
        lambda index: tf.random.stateless_normal(shape, seed=_example_seed(seed, index), dtype=dtype),
        indices,
        fn_output_signature=tf.TensorSpec([None, None], dtype),
    )


def _pad_indices(indices: tf.Tensor, length: int) -> tf.Tensor:
    """Pad example positions ``[B]`` to ``length`` by repeating the last one (padded rows carry weight 0)."""
    missing = length - int(indices.shape[0])
    return indices if missing <= 0 else tf.concat([indices, tf.repeat(indices[-1:], missing)], 0)


def _example_seed(seed: Any, index: tf.Tensor) -> tf.Tensor:
    return tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])


def _batch_parts(model: InfluenceModel, batch: Any) -> tuple[Any, Any, tf.Tensor]:
    structure = unpack_batch(batch)
    inputs = tf.nest.map_structure(tf.convert_to_tensor, structure.inputs)
    targets = tf.nest.map_structure(tf.convert_to_tensor, structure.targets)
    size = tf.shape(tf.nest.flatten(targets)[0])[0]
    if structure.sample_weight is None:
        weights = tf.ones([size], model.dtype)
    else:
        weights = tf.cast(tf.reshape(structure.sample_weight, [-1]), model.dtype)
    return inputs, targets, weights
