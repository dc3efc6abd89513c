"""Import TensorFlow, with a user-facing error message when it is missing.

This is the only place that imports TensorFlow at module level. Everything Keras (the two Keras flavours, the
``tf.Variable`` behind a weight) lives in :mod:`influenciae.model._backend`; the names it defines are still reachable
here, for code written before that move.
"""

from __future__ import annotations

from typing import Any

try:
    import tensorflow as tf
except ImportError as error:  # pragma: no cover - exercised only without TensorFlow
    raise ImportError(
        "influenciae needs TensorFlow >= 2.16, which is not installed. Install it with one of:\n"
        "  pip install 'influenciae[cpu]'       # tensorflow-cpu\n"
        "  pip install 'influenciae[and-cuda]'  # tensorflow with CUDA\n"
        "or install the TensorFlow distribution of your choice first."
    ) from error

__all__ = ["tf"]

_MOVED = frozenset(
    {"keras", "is_keras3_object", "is_legacy_keras_object", "keras_module_of", "variable_tensor", "variable_name"}
)


def __getattr__(name: str) -> Any:
    """The Keras helpers that moved to :mod:`influenciae.model._backend` (imported on first use: no import cycle)."""
    if name in _MOVED:
        from influenciae.model import _backend as model_backend  # noqa: PLC0415 - lazy, see above

        return getattr(model_backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
