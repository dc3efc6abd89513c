"""What code written for the original Influenciae meets here: a warning where it would watch other weights, and
attributes that are gone with the name of their replacement."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from influenciae.model._backend import variable_tensor
from influenciae.model.selection import layer_index, original_default_layer

__all__ = ["MigrationWarning", "Removed", "warn_start_layer_only", "warn_default_watch_once", "original_weights"]


class MigrationWarning(UserWarning):
    """Code written for the original Influenciae would watch other weights or compute another quantity here."""


class Removed:
    """A class attribute the original Influenciae had: reading it raises ``AttributeError`` naming its replacement."""

    def __init__(self, replacement: str) -> None:
        self.replacement = replacement

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = f"{owner.__name__}.{name}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        raise AttributeError(f"{self.name} (original Influenciae) is gone: {self.replacement}")


def warn_start_layer_only(model: Any, start_layer: int | str, weights: list[Any]) -> None:
    """Warn when ``start_layer`` alone watches more than the original Influenciae's "layer k only"."""
    first = layer_index(model, start_layer, "start_layer")
    own = {id(variable_tensor(weight)) for weight in model.layers[first].trainable_weights}
    if all(id(variable_tensor(weight)) in own for weight in weights):
        return
    layer_only = sum(int(np.prod(variable_tensor(w).shape)) for w in model.layers[first].trainable_weights)
    watched = sum(int(np.prod(variable_tensor(w).shape)) for w in weights)
    warnings.warn(
        f"start_layer={start_layer!r} without last_layer watches layers {first} to the end ({watched} parameters). "
        f"The original Influenciae watched layer {first} only ({layer_only} parameters). Pass "
        f"last_layer={start_layer!r} for that layer only, or last_layer=-1 to keep every layer from "
        f"{start_layer!r} to the end; either silences this warning.",
        MigrationWarning,
        stacklevel=3,
    )


_DEFAULT_WATCH_WARNED = False  # the default-selection warning is shown once per process


def warn_default_watch_once(model: Any, weights: list[Any]) -> None:
    """Say once per process what ``InfluenceModel(model)`` watches, where the original Influenciae watched less.

    The original's ``InfluenceModel(model)`` watched only the last layer with weights before the output layer; code
    moved over unchanged would silently compute influence over other weights. Nothing is said when both rules pick
    the same weights (one weighted layer) or when the caller chose the weights (any of ``start_layer``,
    ``last_layer``, ``weights_to_watch``).
    """
    global _DEFAULT_WATCH_WARNED
    if _DEFAULT_WATCH_WARNED:
        return
    layers = list(model.layers)
    original = original_default_layer(layers)
    if original is None:
        return
    original_ids = {id(variable_tensor(weight)) for weight in layers[original].trainable_weights}
    if {id(variable_tensor(weight)) for weight in weights} == original_ids:
        return
    _DEFAULT_WATCH_WARNED = True
    watched = sum(int(np.prod(variable_tensor(w).shape)) for w in weights)
    original_count = sum(int(np.prod(variable_tensor(w).shape)) for w in layers[original].trainable_weights)
    warnings.warn(
        f"InfluenceModel(model) watches every trainable weight ({watched:,} parameters). Code written for the "
        f"original Influenciae watched only layer {original} ({layers[original].name!r}, {original_count:,} "
        "parameters) there: build it with influenciae.compat.original_influence_model(model) for that selection. "
        "Choosing the weights (start_layer=, last_layer= or weights_to_watch=; last_layer=-1 means all of them) "
        "silences this warning, which is shown once per process.",
        MigrationWarning,
        stacklevel=3,
    )


def original_weights(model: Any, start_layer: int | str | None = None, last_layer: int | str | None = None) -> list:
    """The trainable weights the original ``InfluenceModel(model, start_layer, last_layer)`` watched.

    The original's rule (``deel/influenciae/common/model_wrappers.py``):

    - ``start_layer=None``: the last layer with weights *before* the model's last layer (the output layer itself is
      skipped, whether or not it has weights);
    - ``last_layer=None``: the ``start_layer`` layer **only**;
    - otherwise the layers ``start_layer .. last_layer`` inclusive (indices or names; negative indices count from
      the end).

    The original collected ``layer.weights`` (non-trainable BatchNorm statistics included, which have no gradient);
    this collects ``layer.trainable_weights`` of the same layers.

    Args:
        model: A built Keras model.
        start_layer: Index or name of the first layer, or ``None`` for the original's default.
        last_layer: Index or name of the last layer (inclusive), or ``None`` for ``start_layer`` alone.

    Returns:
        The list of variables, to pass as ``InfluenceModel(model, weights_to_watch=...)``.

    Raises:
        ValueError: If a layer is unknown, out of range, the range is empty, or it holds no trainable weight.

    Example:
        >>> im = InfluenceModel(model, weights_to_watch=original_weights(model, start_layer=0), loss_function=loss)
    """
    layers = list(model.layers)
    if start_layer is None:
        first = _last_weighted_layer_before_output(layers)
    else:
        first = layer_index(model, start_layer, "start_layer")
    last = first if last_layer is None else layer_index(model, last_layer, "last_layer")
    if last < first:
        raise ValueError(f"last_layer ({last}) comes before start_layer ({first}): pass layers in model order.")
    weights = [weight for layer in layers[first : last + 1] for weight in layer.trainable_weights]
    if not weights:
        raise ValueError(f"Layers {first}..{last} have no trainable weights: pick other layers.")
    return weights


def _last_weighted_layer_before_output(layers: Sequence[Any]) -> int:
    index = original_default_layer(layers)
    if index is not None:
        return index
    raise ValueError(
        "No layer with weights before the output layer (the original's default start_layer): pass start_layer."
    )


MigrationWarning.__module__ = "influenciae.model"  # its documented canonical path
original_weights.__module__ = "influenciae.compat"  # documented (and imported) from there, with the original's API
