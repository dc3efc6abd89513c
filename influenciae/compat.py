"""Names and behaviours of the original Influenciae (deel-ai, 0.3) for code being migrated.

``docs/migration.md`` lists every difference; this module holds the few shims that are cheap and exact:

- :func:`original_weights` / :func:`original_influence_model`: the original's rule for which weights
  ``InfluenceModel(model, start_layer, last_layer)`` watches (``start_layer`` alone meant *that layer only*; no
  argument meant the last layer with weights *before* the output layer). Here ``InfluenceModel`` watches every
  trainable weight by default and ``start_layer`` alone means "from this layer to the end".
- :func:`compute_ihvp` / :func:`compute_hvp`: the original solver methods of the same names, ``[P, B]`` per batch,
  delegating to ``solve``/``hvp`` (which take and return rows ``[n, P]``).
- :func:`original_group_values`: second-order group influence at the original's scale (ours is N times it).
- :func:`tracin_models`: the original ``TracIn.models``.
- :func:`from_layer_name_to_layer_idx`, :func:`find_layer`, :func:`dataset_size`, :func:`dataset_to_tensor`,
  :func:`array_to_dataset`: the cheap ``deel.influenciae.utils`` helpers.

Every other name of ``deel.influenciae.utils`` (``BatchSort``, ``conjugate_gradients_solve``, ...) is importable from
here as a placeholder whose use raises ``AttributeError`` naming what replaced it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import check_dataset, unpack_batch
from influenciae.model import InfluenceModel
from influenciae.model.losses import flavoured_loss
from influenciae.model.migration import original_weights
from influenciae.model.selection import layer_index, layer_of
from influenciae.types import CACHE, ORDER

__all__ = [
    "CACHE",
    "ORDER",
    "array_to_dataset",
    "compute_hvp",
    "compute_ihvp",
    "dataset_size",
    "dataset_to_tensor",
    "find_layer",
    "from_layer_name_to_layer_idx",
    "original_group_values",
    "original_influence_model",
    "original_weights",
    "tracin_models",
]


# ---------------------------------------------------------------------- watched weights


def original_influence_model(
    model: Any,
    start_layer: int | str | None = None,
    last_layer: int | str | None = None,
    loss_function: Any = None,
    **options: Any,
) -> InfluenceModel:
    """An :class:`~influenciae.model.InfluenceModel` built with the original Influenciae's defaults.

    The watched weights follow :func:`original_weights`, and ``loss_function=None`` means the original's default,
    ``CategoricalCrossentropy(from_logits=False, reduction="none")`` (here ``InfluenceModel`` defaults to the
    compiled model's loss).

    Args:
        model: A built Keras model.
        start_layer: As in the original (see :func:`original_weights`).
        last_layer: As in the original.
        loss_function: A per-example loss, or ``None`` for the original's categorical cross-entropy.
        **options: Keyword options of ``InfluenceModel`` (``max_chunk_size``, ``gradient_dtype``, ...).

    Returns:
        The wrapped model.
    """
    if loss_function is None:
        loss_function = flavoured_loss(model, "CategoricalCrossentropy", from_logits=False, reduction="none")
    return InfluenceModel(
        model,
        weights_to_watch=original_weights(model, start_layer, last_layer),
        loss_function=loss_function,
        **options,
    )


# ---------------------------------------------------------------------- solver methods


def compute_ihvp(ihvp: Any, group: tf.data.Dataset, use_gradient: bool = True) -> tf.data.Dataset:
    """The original ``ihvp.compute_ihvp(group, use_gradient)``: ``H⁻¹ v`` per batch, as columns ``[P, B]``.

    Args:
        ihvp: A solver of this library (``ExactIHVP``, ``ConjugateGradientDescentIHVP``, ...).
        group: A batched dataset: examples whose loss gradients are used (``use_gradient=True``), or batches
            ``(vectors [B, P],)`` of vectors (``use_gradient=False``).
        use_gradient: Whether to take the examples' per-sample gradients or the vectors themselves.

    Returns:
        A dataset with one ``[P, B]`` tensor per batch of ``group`` (this library's ``solve`` returns rows
        ``[B, P]``).
    """
    return _per_batch(ihvp, group, use_gradient, ihvp.solve)


def compute_hvp(ihvp: Any, group: tf.data.Dataset, use_gradient: bool = True) -> tf.data.Dataset:
    """The original ``ihvp.compute_hvp(group, use_gradient)``: ``H v`` per batch, as columns ``[P, B]``.

    Args:
        ihvp: A solver of this library.
        group: As in :func:`compute_ihvp`.
        use_gradient: As in :func:`compute_ihvp`.

    Returns:
        A dataset with one ``[P, B]`` tensor per batch of ``group``.
    """
    return _per_batch(ihvp, group, use_gradient, ihvp.hvp)


def _per_batch(ihvp: Any, group: tf.data.Dataset, use_gradient: bool, product: Any) -> tf.data.Dataset:
    if not isinstance(use_gradient, (bool, np.bool_)):
        raise TypeError(f"use_gradient must be True or False, got {use_gradient!r}.")
    if use_gradient:
        check_dataset(group, name="group")
        if ihvp.model is None:
            raise ValueError(
                "This solver was built from an operator without a model: pass vectors (use_gradient=False)."
            )
    blocks = []
    for batch in group:
        if use_gradient:
            vectors = ihvp.model.batch_jacobian_tensor(batch)
        else:
            vectors = batch[0] if isinstance(batch, (tuple, list)) else batch
        blocks.append(tf.transpose(product(tf.reshape(vectors, [-1, ihvp.nb_params]))))
    if not blocks:
        raise ValueError("group is empty: there is nothing to multiply.")
    signature = tf.TensorSpec([ihvp.nb_params, None], blocks[0].dtype)
    return tf.data.Dataset.from_generator(lambda: iter(blocks), output_signature=signature)


# ---------------------------------------------------------------------- calculators


def original_group_values(values: Any, calculator: Any) -> tf.Tensor:
    """Second-order group influence (vectors or values) at the original Influenciae's scale.

    ``SecondOrderInfluenceCalculator`` here returns ``N`` times the original's numbers (``N`` the number of training
    examples): its vectors approximate ``N·(θ̂_{-U} − θ̂)`` so that they tend to the first-order ``H⁻¹ g_U`` as the
    group shrinks, while the original's approximated ``θ̂_{-U} − θ̂``. This divides by ``N``.

    Args:
        values: The output of ``compute_influence_vector_group`` ``[nb_params]`` or of
            ``estimate_influence_values_group`` ``[N_test]``.
        calculator: The ``SecondOrderInfluenceCalculator`` that produced them.

    Returns:
        ``values / N``, same shape.
    """
    values = tf.convert_to_tensor(values)
    return values / tf.cast(calculator.train_size, values.dtype)


def tracin_models(tracin: Any) -> list[InfluenceModel]:
    """The original ``TracIn.models``: the checkpoints' ``InfluenceModel`` objects, in order.

    Args:
        tracin: A ``TracIn`` built from a list of models (checkpoints loaded from files are not held in memory).

    Returns:
        The list of ``InfluenceModel``.
    """
    models = getattr(getattr(tracin, "checkpoints", None), "models", None)
    if models is None:
        raise AttributeError(
            "This TracIn holds no list of models (its checkpoints are loaded one at a time from files); the "
            "original's TracIn.models exists only for TracIn(models=[...], learning_rates=...)."
        )
    return list(models)


# ---------------------------------------------------------------------- deel.influenciae.utils


def from_layer_name_to_layer_idx(model: Any, layer_name: str) -> int:
    """The index of the layer named ``layer_name`` in ``model.layers`` (``ValueError`` if there is none)."""
    return layer_index(model, layer_name, "layer_name")


def find_layer(model: Any, layer: int | str) -> Any:
    """The layer of ``model`` with this index or name."""
    return layer_of(model, layer)


def dataset_size(dataset: tf.data.Dataset) -> int:
    """The number of examples of a batched dataset, counted by iterating it (never from ``cardinality()``)."""
    check_dataset(dataset, name="dataset")
    return sum(int(tf.shape(tf.nest.flatten(unpack_batch(batch).targets)[0])[0]) for batch in dataset)


def dataset_to_tensor(dataset: tf.data.Dataset) -> Any:
    """Every element of a batched dataset concatenated along the batch axis (same structure as one element).

    Elements may be any structure of tensors (inputs alone, ``(inputs, targets)``, ...), as in the original.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"dataset must be a batched tf.data.Dataset, got {type(dataset).__name__}.")
    batches = list(dataset)
    if not batches:
        raise ValueError("The dataset is empty.")
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *batches)


def array_to_dataset(arrays: Any, batch_size: int, shuffle: bool = False, buffer_size: int = 0) -> tf.data.Dataset:
    """A batched dataset from arrays (a tuple of arrays for ``(inputs, targets)``), optionally shuffled (seed 0)."""
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        dataset = dataset.shuffle(buffer_size or 1024, seed=0, reshuffle_each_iteration=False)
    return dataset.batch(batch_size)


class _Gone:
    """A name of the original Influenciae with no counterpart: importable, and any use says what replaced it."""

    def __init__(self, name: str, replacement: str) -> None:
        self._name = name
        self._replacement = replacement

    def _error(self) -> AttributeError:
        return AttributeError(f"{self._name} (original Influenciae) is gone: {self._replacement}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error()

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        raise self._error()

    def __repr__(self) -> str:
        return f"<removed {self._name}: {self._replacement}>"


_TOP_K = "top-k is one accumulator: calc.top_k(..., nearest_neighbors='streaming'|'linear'|'faiss')."
_REPLACED = {  # the original Influenciae's names with no counterpart, and what replaced them
    "BatchSort": _TOP_K + " The sorted buffer is influenciae.search.StreamingTopK.",
    "BaseNearestNeighbors": _TOP_K + " Strategies subclass influenciae.search.NearestNeighbors (build/query).",
    "LinearNearestNeighbors": (
        "pass nearest_neighbors='linear' to top_k; influenciae.search.LinearNearestNeighbors has another build/query "
        "signature (vectors with indices, query(transforms, k, order))."
    ),
    "conjugate_gradients_solve": "ConjugateGradientDescentIHVP(model, dataset).solve(vectors) [n, P] -> [n, P].",
    "BacktrackingLineSearch": "no solver here uses a line search; nothing replaces it.",
    "is_dataset_batched": "influenciae.data.check_dataset(dataset) raises a ValueError for an unbatched dataset.",
    "assert_batched_dataset": "influenciae.data.check_dataset(dataset).",
    "default_process_batch": "elements are (inputs, targets) or (inputs, targets, sample_weight); map to that.",
    "map_to_device": "choose devices with `with tf.device(...)`.",
    "split_model": "solvers no longer slice models: choose the weights with InfluenceModel(start_layer, last_layer).",
    "IHVPCalculator": "pass ihvp_calculator='exact'|'cg'|'lissa'|'arnoldi'|... or an instance.",
    "ExactIHVPFactory": "RepresenterPointLJE(..., ihvp_calculator='exact', damping=...).",
    "CGDIHVPFactory": "RepresenterPointLJE(..., ihvp_calculator='cg', damping=...).",
    "LissaIHVPFactory": "RepresenterPointLJE(..., ihvp_calculator='lissa', damping=...).",
    "BaseInfluenceModel": "InfluenceModel(model, weights_to_watch=[...], loss_function=...) is the one class.",
}
_GONE: dict[str, _Gone] = {}


def __getattr__(name: str) -> Any:
    """A name of :data:`_REPLACED`: importable, and any use says what replaced it."""
    if name not in _REPLACED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _GONE.setdefault(name, _Gone(name, _REPLACED[name]))
