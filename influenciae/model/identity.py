"""What stored artifacts record of an InfluenceModel: :func:`model_identity`.

A cache, a solver state or a set of K-FAC factors is reused only when the model identity it recorded equals the
current one. The identity names watched weights by their position among the Keras model's weights
(:func:`watched_weight_positions`); finding it needs the Keras variables, so the identity lives here, in the model
wing, built from the hashing primitives of :mod:`influenciae.cache.fingerprint`.
"""

from __future__ import annotations

from typing import Any

from influenciae.cache.fingerprint import canonical_configuration, fingerprint_arrays, loss_identity
from influenciae.model._backend import variable_tensor

__all__ = ["model_identity", "watched_weight_positions"]


def watched_weight_positions(model: Any) -> list[int]:
    """The position of each watched weight among ``model.model.weights``, in flattening order.

    Args:
        model: An :class:`~influenciae.model.InfluenceModel`.

    Returns:
        One index per watched weight (``-1`` for a watched variable that is not one of the Keras model's weights).
    """
    positions = {id(variable_tensor(weight)): index for index, weight in enumerate(model.model.weights)}
    return [positions.get(id(tensor), -1) for tensor in model.watched]


def model_identity(model: Any) -> dict[str, Any]:
    """What an ``InfluenceModel``'s per-sample gradients depend on besides the weights' values and the data.

    Records the loss (:func:`loss_identity`), ``gradient_dtype``, the per-example gradient method when it is the
    layer structure, the weights' dtype, the number of parameters and,
    for each watched weight in flattening order, its position among ``model.model.weights``, its shape and a
    fingerprint of its values. Positions rather than names: Keras names layers per session (``dense_5``), so
    names would refuse a valid cache when the same model is rebuilt; the position and the values pin the weight.

    Args:
        model: an :class:`~influenciae.InfluenceModel`.

    Returns:
        A canonical JSON-able mapping.
    """
    watched = []
    for position, tensor in zip(watched_weight_positions(model), model.watched, strict=True):
        watched.append(
            {
                "position": position,
                "shape": [int(dimension) for dimension in tensor.shape],
                "fingerprint": fingerprint_arrays([tensor])[:32],
            }
        )
    layered = {"per_example_gradients": "layers"} if getattr(model, "_layer_capture", None) is not None else {}
    return canonical_configuration(
        {
            **layered,  # (recorded only when not the vectorized map, so earlier identities stay valid)
            "loss": loss_identity(model.loss_function)["loss"],
            "gradient_dtype": getattr(getattr(model, "gradient_dtype", None), "name", None),
            "dtype": getattr(model.dtype, "name", str(model.dtype)),
            "nb_params": int(model.nb_params),
            "watched_weights": watched,
        }
    )
