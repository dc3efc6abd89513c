"""Similarity-based attribution: the training examples nearest to a test example in a layer's activation space.

The training-side influence vectors and the test-side transforms are both the activations of the chosen layer(s),
flattened (and concatenated for several layers), so the shared engine of :mod:`influenciae.influence.base` gives
matrices, streaming, memory/disk caches of activations and top-k for free.

The activations come from a sub-model cut from the Keras graph (:func:`influenciae.model.graph.layer_outputs_model`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from influenciae._backend import tf
from influenciae.data import batch_size_of, unpack_batch
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.model import InfluenceModel
from influenciae.model.graph import as_influence_model, layer_outputs_model

__all__ = ["SimilarityInfluence"]

SimilarityFunction = Callable[[tf.Tensor, tf.Tensor], Any]

_SIMILARITIES = ("cosine", "euclidean", "dot")
_PAIRWISE_BUDGET = 2**22  # elements of one block of pairwise differences [rows, n, D] for the euclidean score


# ---------------------------------------------------------------------- the calculator


class SimilarityInfluence(BaseInfluenceCalculator):
    """Nearest training examples in the activation space of one or more layers (a similarity, not an influence).

    Each example is represented by the activations ``a(x)`` of ``layers``, flattened and concatenated. The score of
    a training example ``z`` for a test example ``x`` is:

    * ``"cosine"``: ``a(x)·a(z) / (‖a(x)‖ ‖a(z)‖)`` in ``[-1, 1]`` (0 when an activation vector is 0). Vectors are
      L2-normalized once, so the score is a dot product and every neighbour strategy (``"linear"``,
      ``"streaming"``, ``"faiss"``) applies. Self-influence is 1 (0 for a zero activation vector).
    * ``"dot"``: ``a(x)·a(z)``, unbounded; self-influence ``‖a(z)‖²``. All neighbour strategies apply.
    * ``"euclidean"``: ``-‖a(x) - a(z)‖ ≤ 0``, so that ``ORDER.DESCENDING`` lists the nearest examples first.
      Self-influence is 0 for every example (the distance of an example to itself), so it cannot rank training
      examples. Top-k uses the engine's brute-force search (neighbour strategies rank by dot product).
    * a callable ``(a [m, D], b [n, D]) -> [m, n]``: any similarity, higher meaning more similar; self-influence
      is its diagonal. Brute-force top-k. The disk-cache manifest records the callable's qualified name only.

    Sign and scale: higher always means more similar and ``ORDER.DESCENDING`` gives the most similar first. The
    score is **not** a counterfactual influence: it says nothing about how removing ``z`` changes the loss at ``x``
    (compare :class:`~influenciae.FirstOrderInfluenceCalculator`, ``docs/theory.md``). It is a fast,
    model-based nearest-neighbour explanation and a baseline for influence methods.

    Caching: the training-side influence vectors are the (normalized for cosine) activations, so
    ``influence_vector_in_cache=CACHE.DISK`` and :meth:`compute_influence_vector` store activations in the
    engine's atomic, resumable disk cache, whose manifest records the layers and the similarity and a fingerprint
    of the model weights: a cache made with other layers, another similarity or other weights is refused.
    ``cache_dir`` is only the default directory: it is used whenever ``CACHE.DISK`` is asked for without
    ``save_influence_vector_ds_path``, and by :meth:`compute_influence_vector` called without a path. Other cache
    modes (``CACHE.MEMORY`` by default) do not touch it.

    Args:
        model: An :class:`~influenciae.InfluenceModel` or a Keras model (Sequential or functional; no loss needed).
        layers: Index or name in ``model.layers`` of the layer whose output represents an example, or a sequence
            of them (activations are flattened and concatenated in the given order).
        similarity: ``"cosine"``, ``"euclidean"``, ``"dot"`` or a callable ``(a, b) -> [m, n]``.
        cache_dir: Default directory of the disk cache of activations.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Example:
        >>> similarity = SimilarityInfluence(keras_model, layers="embedding", cache_dir="runs/activations")
        >>> indices, values = similarity.most_influential(test_ds, train_ds, k=5,
        ...                                               influence_vector_in_cache=CACHE.DISK)
    """

    method_name = "similarity"

    def __init__(
        self,
        model: InfluenceModel | Any,
        layers: int | str | Sequence[int | str],
        similarity: str | SimilarityFunction = "cosine",
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        super().__init__(as_influence_model(model), show_progress=show_progress, batches_per_shard=batches_per_shard)
        if isinstance(similarity, str):
            if similarity not in _SIMILARITIES:
                raise ValueError(
                    f"similarity must be one of {_SIMILARITIES} or a callable (a, b) -> [m, n], got {similarity!r}."
                )
        elif not callable(similarity):
            raise TypeError(f"similarity must be a string or a callable (a, b) -> [m, n], got {type(similarity)}.")
        self.similarity = similarity
        layer_list = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if not layer_list:
            raise ValueError("layers is empty: pass at least one layer index or name.")
        self._extractor, self.layer_indices = layer_outputs_model(self.model.model, layer_list)
        self._extract = tf.function(self._extract_activations, reduce_retracing=True, autograph=False)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)

    @property
    def similarity_name(self) -> str:
        """The similarity's name (a callable's module and qualified name), as stored in cache manifests."""
        if isinstance(self.similarity, str):
            return self.similarity
        function = self.similarity
        return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"

    def activations(self, batch: Any) -> tf.Tensor:
        """The raw activations of a batch: the chosen layers' outputs, flattened and concatenated ``[B, D]``."""
        return self._extract(unpack_batch(batch).inputs)

    # ------------------------------------------------------------------ hooks

    def _configuration(self) -> dict[str, Any]:
        return {"layers": list(self.layer_indices), "similarity": self.similarity_name}

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        return self._represent(batch)

    def _transforms(self, batch: Any) -> tf.Tensor:
        return self._represent(batch)

    def _inner(self, transforms: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        if self.similarity == "euclidean":
            return _negative_distances(transforms, vectors)
        if callable(self.similarity):
            return self._call_similarity(transforms, vectors)
        return tf.matmul(transforms, vectors, transpose_b=True)

    def _self_influence(self, batch: Any) -> tf.Tensor:
        if self.similarity == "euclidean":  # ‖a - a‖ = 0: no need to run the model
            return tf.zeros([batch_size_of(batch)], self.model.dtype)
        vectors = self._represent(batch)
        if callable(self.similarity):
            return tf.linalg.diag_part(self._call_similarity(vectors, vectors))
        return tf.reduce_sum(vectors * vectors, axis=1)

    @property
    def _uses_dot_product(self) -> bool:
        # Per instance (the engine decides per class): cosine and dot are dot products of the stored vectors.
        return self.similarity in ("cosine", "dot")

    # ------------------------------------------------------------------ engine overrides

    def _batch_check(self) -> tuple[Callable[[Any], Any], str]:
        # No loss is involved, so the batch is checked against the activation extractor rather than the loss.
        return self.activations, f"the activations of layers {self.layer_indices}"

    # ------------------------------------------------------------------ internals

    def _represent(self, batch: Any) -> tf.Tensor:
        """The vector both sides use: activations, L2-normalized for cosine."""
        activations = self.activations(batch)
        return _normalize(activations) if self.similarity == "cosine" else activations

    def _extract_activations(self, inputs: Any) -> tf.Tensor:
        outputs = tf.nest.flatten(self._extractor(inputs, training=False))
        flat = [tf.reshape(tf.cast(output, self.model.dtype), [tf.shape(output)[0], -1]) for output in outputs]
        return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)

    def _call_similarity(self, transforms: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        function: SimilarityFunction = self.similarity  # type: ignore[assignment]
        scores = tf.cast(tf.convert_to_tensor(function(transforms, vectors)), self.model.dtype)
        expected = [int(transforms.shape[0]), int(vectors.shape[0])]
        if scores.shape.as_list() != expected:
            raise ValueError(
                f"The similarity {self.similarity_name} returned shape {scores.shape.as_list()} for inputs "
                f"{transforms.shape.as_list()} and {vectors.shape.as_list()}; it must return [m, n] = {expected}."
            )
        return scores


def _normalize(vectors: tf.Tensor) -> tf.Tensor:
    """Rows divided by their L2 norm (zero rows stay zero)."""
    return tf.math.divide_no_nan(vectors, tf.norm(vectors, axis=1, keepdims=True))


def _negative_distances(transforms: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
    """``-‖a_i - b_j‖`` ``[m, n]`` from explicit differences (exact zeros on identical rows, unlike the Gram
    expansion ``‖a‖² + ‖b‖² - 2a·b``), in blocks of rows so memory stays ``O(_PAIRWISE_BUDGET)``."""
    count, size, dimension = int(transforms.shape[0]), int(vectors.shape[0]), int(vectors.shape[1])
    if count == 0 or size == 0:
        return tf.zeros([count, size], transforms.dtype)
    rows = max(1, _PAIRWISE_BUDGET // max(1, size * dimension))
    blocks = [
        -tf.norm(transforms[start : start + rows, None, :] - vectors[None, :, :], axis=-1)
        for start in range(0, count, rows)
    ]
    return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=0)
