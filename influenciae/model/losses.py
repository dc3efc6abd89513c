"""The loss of an InfluenceModel: per-example Keras losses, their closed-form families, regularization terms.

``resolve_loss`` turns what the user passed (a Keras loss object, a loss name, a function or ``None`` for the compiled
loss) into a per-example loss in the model's dtype; ``loss_family_of`` tells the curvature operators when the
output-space Hessian has a closed form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from influenciae.model._backend import is_keras3_object, keras, keras_module_of, tf

__all__ = [
    "LossFunction",
    "resolve_loss",
    "flavoured_loss",
    "rebuild_loss",
    "legacy_loss_class",
    "is_keras_loss",
    "loss_family_of",
    "single_output",
    "needs_target_alignment",
    "align_legacy_targets",
    "regularization_terms",
    "token_loss_jvp",
]

LossFunction = Callable[[Any, Any], Any]
"""A per-example loss ``(y_true, y_pred) -> [batch]``."""


def resolve_loss(model: Any, loss_function: Any, dtype: tf.DType) -> LossFunction:
    """The per-example loss of an InfluenceModel, from what the user passed.

    Args:
        model: The Keras model (its compiled ``model.loss`` is used when ``loss_function`` is None).
        loss_function: A Keras loss object (rebuilt with ``reduction="none"`` if it is the compiled loss), a loss
            name, a callable ``(y_true, y_pred) -> [batch]`` or None.
        dtype: The watched weights' dtype; a Keras 3 loss object is rebuilt to compute in it.

    Raises:
        ValueError: No loss at all, several losses, or an explicit loss object that reduces over the batch.
        TypeError: If the loss is not callable.
    """
    keras_module = keras_module_of(model)
    explicit = loss_function is not None
    if loss_function is None:
        loss_function = getattr(model, "loss", None)
        if loss_function is None:
            raise ValueError(
                "The model is not compiled with a loss and no loss_function was given. Pass a per-example loss, "
                "e.g. loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='none')."
            )
    if isinstance(loss_function, (dict, list, tuple)):
        raise ValueError(
            "Models with several losses (one per output) are not supported directly: pass one per-example "
            "loss_function(y_true, y_pred) -> [batch] that combines them."
        )
    if isinstance(loss_function, str):
        loss_function = keras_module.losses.get(loss_function)
    loss_classes = tuple(cls for cls in (keras.losses.Loss, legacy_loss_class()) if cls is not None)
    if isinstance(loss_function, loss_classes):
        reduction = getattr(loss_function, "reduction", None)
        if reduction not in (None, "none"):
            if explicit:
                raise ValueError(
                    f"loss_function has reduction={reduction!r}, but influence needs one loss per example. "
                    f"Create it with reduction='none', e.g. {type(loss_function).__name__}(..., reduction='none')."
                )
            loss_function = rebuild_loss(loss_function, reduction="none")
        loss_dtype = getattr(loss_function, "dtype", None)
        if isinstance(loss_function, keras.losses.Loss) and loss_dtype not in (None, dtype.name):
            # Keras 3 losses cast predictions to their own dtype (floatx by default): a float64 model would
            # silently get float32 losses and gradients.
            loss_function = rebuild_loss(loss_function, dtype=dtype.name)
    if not callable(loss_function):
        raise TypeError(f"loss_function must be callable (y_true, y_pred) -> [batch], got {type(loss_function)}.")
    return loss_function  # type: ignore[no-any-return]


def flavoured_loss(model: Any, name: str, **config: Any) -> Any:
    """A Keras loss object of ``model``'s Keras flavour, e.g. ``flavoured_loss(model, "CategoricalCrossentropy",
    from_logits=False, reduction="none")`` (``tf_keras`` losses for a ``tf_keras`` model)."""
    return getattr(keras_module_of(model).losses, name)(**config)


def rebuild_loss(loss_function: Any, **changes: Any) -> Any:
    """A copy of a Keras loss object with some configuration entries changed (``reduction=``, ``dtype=``...)."""
    config = dict(loss_function.get_config())
    config.update({"reduction": getattr(loss_function, "reduction", None), **changes})
    if "dtype" not in changes and isinstance(loss_function, keras.losses.Loss):
        config["dtype"] = loss_function.dtype
    return type(loss_function).from_config(config)


def legacy_loss_class() -> type | None:
    """``tf_keras.losses.Loss``, or None when ``tf_keras`` is not installed."""
    try:
        import tf_keras
    except ImportError:
        return None
    return tf_keras.losses.Loss  # type: ignore[no-any-return]


def is_keras_loss(loss: Any) -> bool:
    """Whether ``loss`` is a Keras ``Loss`` object (of Keras 3 or tf_keras), not a user's own callable."""
    return any(cls.__name__ == "Loss" and "keras" in cls.__module__ for cls in type(loss).__mro__)


def loss_family_of(loss_function: Any) -> str | None:
    """The closed-form family of a Keras loss object (see :attr:`InfluenceModel.loss_family`), else None."""
    loss_classes = tuple(cls for cls in (keras.losses.Loss, legacy_loss_class()) if cls is not None)
    if not isinstance(loss_function, loss_classes):
        return None
    config: dict[str, Any] = dict(loss_function.get_config())  # type: ignore[union-attr]
    name = type(loss_function).__name__
    last_axis = config.get("axis", -1) in (-1, None)
    from_logits = bool(config.get("from_logits", False))
    if name in ("SparseCategoricalCrossentropy", "CategoricalCrossentropy"):
        if from_logits and last_axis and config.get("ignore_class") is None:
            return "softmax_cross_entropy"
    elif name == "BinaryCrossentropy":
        if from_logits and last_axis:
            return "sigmoid_cross_entropy"
    elif name == "MeanSquaredError":
        return "squared_error"
    return None


def single_output(outputs: Any) -> tf.Tensor:
    """The one output tensor of a model's outputs ``[batch, *output_shape]``.

    Raises:
        ValueError: If the model has several outputs (Gauss-Newton and Fisher curvatures need one).
    """
    if not isinstance(outputs, tf.Tensor):
        flat = tf.nest.flatten(outputs)
        if len(flat) != 1:
            raise ValueError(
                f"Gauss-Newton and Fisher curvatures need a model with one output tensor, got {len(flat)} outputs. "
                "Use curvature='hessian', or wrap the model so that it returns one tensor."
            )
        outputs = flat[0]
    return tf.convert_to_tensor(outputs)


def needs_target_alignment(loss_function: Any) -> bool:
    """Whether targets one rank below the outputs must get a trailing axis before the loss sees them.

    ``tf_keras`` losses squeeze a ``[B, 1]`` prediction to ``[B]`` when the targets are ``[B]`` and then reduce
    the last axis, returning one scalar for the batch (Keras 3 expands the targets instead). Sparse losses take
    targets one rank below the outputs on purpose and are left alone.
    """
    legacy = legacy_loss_class()
    return (
        legacy is not None
        and isinstance(loss_function, legacy)
        and not type(loss_function).__name__.startswith("Sparse")
        and "sparse" not in str(getattr(loss_function, "name", "")).lower()
    )


def align_legacy_targets(targets: Any, outputs: Any) -> tuple[Any, Any]:
    """Give ``[B]`` targets a trailing axis when the outputs are ``[B, 1]`` (see :func:`needs_target_alignment`)."""
    if not isinstance(targets, tf.Tensor) or not isinstance(outputs, tf.Tensor):
        return targets, outputs
    target_rank, output_rank = targets.shape.rank, outputs.shape.rank
    if (
        target_rank is not None
        and output_rank is not None
        and target_rank == output_rank - 1
        and outputs.shape[-1] == 1
    ):
        targets = tf.expand_dims(targets, -1)
    return targets, outputs


def regularization_terms(model: Any) -> list[tf.Tensor]:
    """The weight regularization losses of a model, recomputed from the current weights.

    ``model.losses`` may also hold activity-regularization tensors from the last call (possibly of another graph),
    so the terms are recomputed from the weights' regularizers instead.
    """
    if is_keras3_object(model):
        return [
            weight.regularizer(weight)
            for weight in model.trainable_weights
            if getattr(weight, "regularizer", None) is not None
        ]
    terms: list[tf.Tensor] = []
    for layer in [model, *model.submodules]:
        terms.extend(loss() for loss in getattr(layer, "_callable_losses", []))
    return terms


def token_loss_jvp(model: Any) -> Callable[..., tf.Tensor]:
    """``(inputs, targets, weights [B], v [P]) -> [B, T]``: the directional derivatives ``∇_θ [w_i c_t ℓ_t] · v``.

    Forward mode (a ``ForwardAccumulator`` on the watched weights) through the token terms of ``model``'s loss,
    which must have a ``token_losses(y_true, y_pred) -> [B, T]`` method (e.g.
    :class:`influenciae.language.TokenCrossEntropy`); one traced function per model and loss.

    Raises:
        ValueError: If the loss has no token terms.
    """
    loss = model.loss_function
    token_losses = getattr(loss, "token_losses", None)
    if token_losses is None:
        raise ValueError(
            "per_token_influence needs a training loss made of token terms: build the InfluenceModel with "
            "loss_function=influenciae.language.token_cross_entropy(pad_id=...) (or a loss with a "
            "token_losses(y_true, y_pred) -> [B, T] method whose terms sum to the loss)."
        )
    watched = model.watched

    def jvp(inputs: Any, targets: Any, weights: tf.Tensor, vector: tf.Tensor) -> tf.Tensor:
        with tf.autodiff.ForwardAccumulator(watched, model.unflatten(vector)) as accumulator:
            outputs = model.model(inputs, training=False)
            terms = tf.cast(token_losses(targets, outputs), model.dtype) * weights[:, None]
        return tf.cast(accumulator.jvp(terms, unconnected_gradients=tf.UnconnectedGradients.ZERO), model.dtype)

    return model.shared_function(("influenciae.per_token_jvp", id(loss)), lambda: tf.function(jvp, autograph=False))
