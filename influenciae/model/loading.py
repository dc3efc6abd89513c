"""The one way to load a Keras model: a saved model file, a checkpoint's weights, or a model already in memory.

:func:`load_model` reads a ``.keras`` file (or a legacy ``.h5``/``.hdf5`` one) under an optional
``tf.distribute`` strategy scope, or passes an in-memory model through; :func:`load_weights` reads a checkpoint's
weights into a model of the same architecture; :func:`copy_model` makes a private copy to assign other checkpoints
into; :func:`load_influence_model` loads and wraps in :class:`~influenciae.model.InfluenceModel` with a named loss.
The console commands (``influenciae.app.io``), TracIn's stored checkpoints and the distributed workers all call these.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

from influenciae.model._backend import keras, keras_module_of, tf

__all__ = ["MODEL_SUFFIXES", "WEIGHTS_SUFFIXES", "load_model", "load_weights", "copy_model", "load_influence_model"]

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
"""Suffixes of a saved (whole) Keras model: ``model.save('model.keras')``, or legacy HDF5 files."""
WEIGHTS_SUFFIXES = (".weights.h5", ".h5")
"""Suffixes of a weights-only checkpoint: ``model.save_weights('ckpt.weights.h5')`` (or a legacy ``.h5``)."""


def is_model(obj: Any) -> bool:
    """Whether ``obj`` is a Keras model (of either flavour) or an :class:`~influenciae.model.InfluenceModel`."""
    from influenciae.model import InfluenceModel  # noqa: PLC0415 - the package imports this module

    return isinstance(obj, InfluenceModel) or (hasattr(obj, "get_weights") and hasattr(obj, "trainable_weights"))


def load_model(
    source: Any,
    *,
    compile: bool = True,
    custom_objects: dict[str, Any] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    single_output: bool = False,
    what: str = "model file",
    error: type[Exception] = ValueError,
) -> Any:
    """Load a saved Keras model, or return a model already in memory.

    Args:
        source: A path to a ``.keras`` file (or a legacy ``.h5``/``.hdf5`` file), a Keras model (returned as is) or
            an :class:`~influenciae.model.InfluenceModel` (its Keras model is returned).
        compile: Whether to restore the compiled loss (False when the caller brings its own loss).
        custom_objects: Custom layers, losses... the file refers to, passed to ``keras.models.load_model``.
        strategy: A ``tf.distribute`` strategy whose scope the variables are created under (mirrored weights).
        single_output: Refuse models with more than one output.
        what: What the file is, for the error messages (``"model file"``, ``"checkpoint 0"``...).
        error: The exception class raised for every problem with the file (a ``ValueError`` subclass such as the
            console commands' ``InputError``).

    Returns:
        The Keras model.

    Raises:
        error: If the file is missing, is not a file, has another suffix, cannot be read as a Keras model, or
            (``single_output``) has several outputs.
    """
    from influenciae.model import InfluenceModel  # noqa: PLC0415 - the package imports this module

    if isinstance(source, InfluenceModel):
        return source.model
    if is_model(source):
        return source
    path = Path(os.fspath(source))
    if not path.exists():
        raise error(f"{what} not found: {path} (no such file)")
    if not path.is_file():
        raise error(f"{what} is not a file: {path}")
    if not path.name.lower().endswith(MODEL_SUFFIXES):
        raise error(
            f"{what} {path} is not a saved Keras model: expected a .keras file (model.save('model.keras')) "
            "or a legacy .h5 file"
        )
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope, warnings.catch_warnings():
        # The optimizer's state is irrelevant here; Keras warns when it was saved before the optimizer was built.
        warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer.*")
        warnings.filterwarnings("ignore", message=".*compiled metrics.*")
        try:
            model = keras.models.load_model(path, compile=compile, custom_objects=custom_objects)
        except Exception as failure:  # noqa: BLE001 - any failure to read the file is a problem with the file
            raise error(f"could not load a Keras model from {path}: {_first_line(failure)}") from failure
    outputs = getattr(model, "outputs", None)
    if single_output and outputs is not None and len(outputs) > 1:
        raise error(f"the model in {path} has {len(outputs)} outputs; the commands need a single output")
    return model


def load_weights(model: Any, path: str | os.PathLike[str], *, what: str = "The checkpoint") -> None:
    """Read a checkpoint's weights (``.weights.h5``, or a whole ``.keras`` model) into ``model``, in place.

    Raises:
        ValueError: If the weights do not fit ``model`` (another architecture); the message starts with ``what``.
    """
    try:
        model.load_weights(os.fspath(path))
    except (ValueError, OSError, KeyError, TypeError) as failure:
        raise ValueError(
            f"{what} ({os.fspath(path)}) does not fit the model: {_first_line(failure)}. All checkpoints must share "
            "one architecture."
        ) from failure


def copy_model(model: Any, *, loss: Any = None, what: str = "the model") -> Any:
    """A private copy of ``model`` (same architecture and weights, new variables), compiled with ``loss`` if given.

    Other checkpoints' weights can be assigned into the copy without touching the caller's model.

    Raises:
        ValueError: If Keras cannot clone the model (a subclassed model without ``get_config``...).
    """
    try:
        clone = keras_module_of(model).models.clone_model(model)
    except (ValueError, TypeError, NotImplementedError) as failure:
        raise ValueError(
            f"Could not copy {what} ({_first_line(failure)}): pass model_factory=... building the architecture."
        ) from failure
    clone.set_weights(model.get_weights())
    if loss is not None:
        clone.compile(loss=loss)
    return clone


class _WithLogits:
    """A Keras loss function called with ``from_logits=True`` (picklable, unlike a lambda)."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        return self.function(y_true, y_pred, from_logits=True)


def named_loss(loss: str, *, from_logits: bool = False) -> Any:
    """The Keras loss function called ``loss`` (``"sparse_categorical_crossentropy"``...), with logits if asked."""
    function = keras.losses.get(loss)
    return _WithLogits(function) if from_logits else function


def load_influence_model(
    path: str | os.PathLike[str],
    *,
    loss: str | None = None,
    from_logits: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> Any:
    """Load a saved ``.keras`` model (under ``strategy.scope()`` when given) and wrap it in an InfluenceModel.

    Args:
        path: The model file.
        loss: ``None`` for the compiled loss, or a Keras loss name (``"sparse_categorical_crossentropy"``...).
        from_logits: With a named cross-entropy: the model outputs logits.
        strategy: A ``tf.distribute`` strategy whose scope mirrors the variables.

    Returns:
        The :class:`~influenciae.model.InfluenceModel`.
    """
    from influenciae.model import InfluenceModel  # noqa: PLC0415 - the package imports this module

    model = load_model(path, compile=loss is None, strategy=strategy)
    loss_function = None if loss is None else named_loss(loss, from_logits=from_logits)
    return InfluenceModel(model, loss_function=loss_function)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
