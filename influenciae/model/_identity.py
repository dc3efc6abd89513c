"""Which of a Keras model's weights an InfluenceModel watches, by position: what stored artifacts record.

The cache identities (:func:`influenciae.cache.fingerprint.model_identity`) name watched weights by their position
among the Keras model's weights; finding it needs the Keras variables, so it lives here, in the model wing.
"""

from __future__ import annotations

from typing import Any

from influenciae.model._backend import variable_tensor

__all__ = ["watched_weight_positions"]


def watched_weight_positions(model: Any) -> list[int]:
    """The position of each watched weight among ``model.model.weights``, in flattening order.

    Args:
        model: An :class:`~influenciae.model.InfluenceModel`.

    Returns:
        One index per watched weight (``-1`` for a watched variable that is not one of the Keras model's weights).
    """
    positions = {id(variable_tensor(weight)): index for index, weight in enumerate(model.model.weights)}
    return [positions.get(id(tensor), -1) for tensor in model.watched]
