"""Keras 3 and legacy ``tf_keras``: tell their objects apart and reach the ``tf.Variable`` behind a weight.

The only place that knows how the two Keras flavours differ; ``influenciae.model`` builds on it and nothing outside
``influenciae/model/`` (and the application wing, which builds models) needs it. TensorFlow itself is imported by
:mod:`influenciae._backend`, with the installation hint.
"""

from __future__ import annotations

from typing import Any

import keras

from influenciae._backend import tf

__all__ = [
    "tf",
    "keras",
    "is_keras3_object",
    "is_legacy_keras_object",
    "keras_module_of",
    "variable_tensor",
    "variable_name",
]


def is_keras3_object(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 3 model, layer, loss or variable."""
    return _defined_in(obj, ("keras.",)) or isinstance(obj, keras.Variable)


def is_legacy_keras_object(obj: Any) -> bool:
    """Whether ``obj`` comes from legacy Keras 2 (``tf_keras`` or ``tf.keras`` under ``TF_USE_LEGACY_KERAS=1``)."""
    return _defined_in(obj, ("tf_keras.", "tensorflow.python.keras."))


def _defined_in(obj: Any, prefixes: tuple[str, ...]) -> bool:
    """Whether the class of ``obj`` or one of its bases (user subclasses included) comes from these packages."""
    return any(klass.__module__.startswith(prefixes) for klass in type(obj).__mro__)


def keras_module_of(obj: Any) -> Any:
    """The Keras package (``keras`` or ``tf_keras``) that ``obj`` belongs to."""
    if is_legacy_keras_object(obj):
        import tf_keras

        return tf_keras
    return keras


def variable_tensor(variable: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras 3 or legacy Keras variable.

    Keras 3 variables are not ``tf.Variable``: the tensor a model reads is ``variable.value``, and that is what a
    ``GradientTape`` or ``ForwardAccumulator`` has to watch.
    """
    if isinstance(variable, keras.Variable):
        return variable.value
    if isinstance(variable, tf.Variable):
        return variable
    raise TypeError(
        f"Expected a Keras or tf.Variable weight, got {type(variable).__name__}. Pass the model's own weights "
        "(e.g. `model.layers[-1].kernel`) in weights_to_watch."
    )


def variable_name(variable: Any) -> str:
    """A readable, unique name for a weight: Keras 3's ``.path`` or the legacy ``.name``."""
    return str(getattr(variable, "path", None) or variable.name)
