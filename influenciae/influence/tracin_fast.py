"""TracIn on the last Dense layer: :class:`TracInCPFast` (exact, factored) and :class:`TracInCPFastRandProj`.

See :mod:`influenciae.influence.tracin` for the score, its sign and scale; the Keras side (the last Dense layer's
``(ã, g)`` features, checkpoint loading) lives in :mod:`influenciae.model.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import split_batch
from influenciae.influence._checkpoints import (
    CheckpointCalculator,
    checkpoint_list,
    in_memory,
)
from influenciae.influence._contexts import Contexts
from influenciae.model import InfluenceModel
from influenciae.model.checkpoints import (
    StoredCheckpoints,
    fast_tracin_dense,
    last_dense_head,
    last_dense_wrap,
    reuse_or_wrap,
)
from influenciae.model.loading import is_model

__all__ = ["TracInCPFast", "TracInCPFastRandProj"]


class _LastDenseCalculator(CheckpointCalculator):
    """Features ``(ã, g)`` of the last Dense layer at each checkpoint (``ã`` ends with 1 when there is a bias)."""

    def __init__(
        self,
        checkpoints: Sequence[Any],
        learning_rates: float | Sequence[float],
        model_factory: Callable[[], Any] | None = None,
        *,
        loss_function: Any = None,
        keep_in_memory: bool = False,
        batches_per_load: int | None = None,
        custom_objects: dict[str, Any] | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        items, explicit = checkpoint_list(checkpoints, "checkpoints"), loss_function is not None
        wrap = last_dense_wrap(loss_function)
        source: Contexts
        if model_factory is None and all(is_model(item) for item in items):
            if loss_function is not None and any(isinstance(item, InfluenceModel) for item in items):
                raise ValueError("loss_function configures Keras models; configure the InfluenceModels instead.")
            source = in_memory([reuse_or_wrap(item, wrap) for item in items])
        else:
            source = StoredCheckpoints(items, wrap, model_factory, keep_in_memory, custom_objects, explicit)
        super().__init__(source, learning_rates, batches_per_load, show_progress, batches_per_shard)
        kernel_shape = self.model.weight_shapes[0]
        dense = fast_tracin_dense(self.model.model)
        self.feature_dim = int(kernel_shape[0]) + (1 if dense.use_bias else 0)
        self.output_dim = int(kernel_shape[1])

    def _features(self, model: InfluenceModel, index: int, batch: Any) -> Any:
        inputs, targets, weights = split_batch(batch, model.dtype)
        inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        return last_dense_head(model)(inputs, targets, weights)


class TracInCPFast(_LastDenseCalculator):
    """TracInCP on the last Dense layer, exactly, without per-sample backward passes through the network.

    For a final Dense layer ``z = aW + b`` (any fused activation, e.g. softmax or sigmoid), the per-example
    gradient of the loss is ``∇_W ℓ = a ⊗ g`` and ``∇_b ℓ = g`` with ``g = ∂ℓ/∂z``, so

        ∇ℓ(x)·∇ℓ(z) = (a_x·a_z)(g_x·g_z) + g_x·g_z = (ã_x·ã_z)(g_x·g_z),   ã = [a, 1].

    ``a`` comes from one forward pass to the Dense input and ``g`` from one batched gradient with respect to the
    pre-activation. The score equals :class:`TracIn` with ``start_layer=-1`` (the last Dense layer's kernel and
    bias): same sign (positive = proponent) and scale, ``Σ_c η_c (ã_x·ã_z)(g_x·g_z)``; self-influence
    ``Σ_c η_c ‖ã_z‖²‖g_z‖²``.

    Influence vectors ``[ã_c, η_c g_c]_c`` and transforms ``[ã_c, g_c]_c`` hold ``C × (d + 1 + K)`` numbers instead
    of ``C × (d + 1) K``; the score is not their dot product, so top-k runs by brute force over blocks (neighbour
    strategies do not apply: use :class:`TracInCPFastRandProj` for an index).

    Args:
        checkpoints: Keras models or InfluenceModels in memory, or paths/callables as for :class:`TracInCP`.
            The model must be Sequential or functional with one output produced by a Dense layer on
            ``[batch, features]`` inputs.
        learning_rates: The learning rate at each checkpoint (one float for all, or one per checkpoint).
        model_factory: Builds the architecture for ``.weights.h5`` files.
        loss_function: Per-example loss on the model's outputs; ``None`` uses the compiled loss.
        keep_in_memory: For checkpoints on disk, as in :class:`TracInCP`.
        batches_per_load: For checkpoints on disk, as in :class:`TracInCP`.
        custom_objects: Passed to ``keras.models.load_model`` for ``.keras`` files.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Example:
        >>> fast = TracInCPFast([model_a, model_b], learning_rates=[0.1, 0.01], loss_function=loss)
        >>> proponents, values = fast.most_influential(test_ds, train_ds, k=10)
    """

    method_name = "tracin_cp_fast"

    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        parts = [tf.concat([a, rate * g], axis=1) for rate, (a, g) in zip(self._rates, features, strict=True)]
        return tf.concat(parts, axis=1)

    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        return tf.concat([tf.concat([a, g], axis=1) for a, g in features], axis=1)

    def _inner(self, transforms: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        width = self.feature_dim + self.output_dim
        shape = [len(self.checkpoints), width]
        left = tf.reshape(transforms, [-1, *shape])
        right = tf.reshape(vectors, [-1, *shape])
        d = self.feature_dim
        features = tf.einsum("mcd,ncd->cmn", left[..., :d], right[..., :d])
        gradients = tf.einsum("mck,nck->cmn", left[..., d:], right[..., d:])
        return tf.reduce_sum(features * gradients, axis=0)

    def _self_terms(self, features: Any, index: int) -> tuple[tf.Tensor, ...]:
        a, g = features
        return (self._rates[index] * tf.reduce_sum(tf.square(a), axis=1) * tf.reduce_sum(tf.square(g), axis=1),)

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "layer": "last_dense"}


class TracInCPFastRandProj(_LastDenseCalculator):
    """:class:`TracInCPFast` through a seeded random projection: dot products estimate the scores without bias.

    Each checkpoint ``c`` gets independent Gaussian matrices ``A_c [d + 1, k]`` and ``B_c [K, k]`` (``k =
    projection_dim``, from ``seed``) and sketches the last-layer gradient ``u = ã ⊗ g`` as

        s_c = (ã A_c) ⊙ (g B_c) / √k   ∈ R^k,

    a linear map of ``u`` whose rows are rank-one Gaussian matrices, so ``E[s_c(x)·s_c(z)] = (ã_x·ã_z)(g_x·g_z)``
    (never materializing ``ã ⊗ g`` nor a ``k × (d + 1) K`` matrix). Influence vectors ``Σ_c η_c s_c(z)`` and
    transforms ``Σ_c s_c(x)`` have ``k`` entries whatever the number of checkpoints: the cross-checkpoint terms
    have zero mean because the projections are independent. Hence

        E[t(x)·v(z)] = Σ_c η_c ∇ℓ_c(x)·∇ℓ_c(z)   (the TracInCPFast score: same sign and scale),

    with a relative error shrinking like ``1/√k``. Scores are plain dot products, so the ``"linear"``,
    ``"streaming"`` and ``"faiss"`` neighbour strategies index the training vectors for fast repeated queries.
    Self-influence is the estimate ``t(z)·v(z)`` (the diagonal of the estimated scores).

    Args:
        checkpoints: As for :class:`TracInCPFast`.
        learning_rates: As for :class:`TracInCPFast`.
        model_factory: As for :class:`TracInCPFast`.
        projection_dim: ``k``, the length of the sketched vectors.
        seed: Seed of the projections (the same seed gives the same vectors).
        **options: ``loss_function``, ``keep_in_memory``, ``batches_per_load``, ``custom_objects``,
            ``show_progress``, ``batches_per_shard``: as for :class:`TracInCPFast`.

    Example:
        >>> sketch = TracInCPFastRandProj(checkpoint_paths, 0.01, projection_dim=256, seed=0, loss_function=loss)
        >>> top = sketch.top_k(test_ds, train_ds, k=10, nearest_neighbors="faiss")
    """

    method_name = "tracin_cp_fast_rand_proj"

    def __init__(
        self,
        checkpoints: Sequence[Any],
        learning_rates: float | Sequence[float],
        model_factory: Callable[[], Any] | None = None,
        *,
        projection_dim: int,
        seed: int = 0,
        **options: Any,
    ) -> None:
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, (int, np.integer)) or projection_dim <= 0:
            raise ValueError(f"projection_dim must be a positive integer, got {projection_dim!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {seed!r}.")
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        super().__init__(checkpoints, learning_rates, model_factory, **options)
        generator = np.random.default_rng(self.seed)
        scale = 1.0 / np.sqrt(self.projection_dim)
        self._projections = []
        for _ in range(len(self.checkpoints)):
            left = generator.standard_normal((self.feature_dim, self.projection_dim)) * scale
            right = generator.standard_normal((self.output_dim, self.projection_dim))
            self._projections.append((tf.constant(left, self.model.dtype), tf.constant(right, self.model.dtype)))

    def _features(self, model: InfluenceModel, index: int, batch: Any) -> Any:
        a, g = super()._features(model, index, batch)
        left, right = self._projections[index]
        return tf.matmul(a, left) * tf.matmul(g, right)

    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        return tf.add_n([rate * sketch for rate, sketch in zip(self._rates, features, strict=True)])

    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        return tf.add_n(features)

    def _self_terms(self, features: Any, index: int) -> tuple[tf.Tensor, ...]:
        return features, self._rates[index] * features

    def _self_from_terms(self, terms: tuple[tf.Tensor, ...]) -> tf.Tensor:
        transforms, vectors = terms
        return tf.reduce_sum(transforms * vectors, axis=1)

    def _configuration(self) -> dict[str, Any]:
        return {
            **super()._configuration(),
            "layer": "last_dense",
            "projection": "gaussian_khatri_rao",
            "projection_dim": self.projection_dim,
            "seed": self.seed,
        }
