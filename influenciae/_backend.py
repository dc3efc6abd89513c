"""Import TensorFlow, with a user-facing error message when it is missing.

This is the only place that imports TensorFlow at module level. Everything Keras (the two Keras flavours, the
``tf.Variable`` behind a weight) lives in :mod:`influenciae.model._backend`.
"""

from __future__ import annotations

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
