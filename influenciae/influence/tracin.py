"""TracIn (Pruthi, Liu, Kale & Sundararajan, 2020): training-data attribution from checkpoints, without a Hessian.

Score, sign and scale (``docs/theory.md``). For checkpoints ``θ_1 … θ_C`` of one training run, taken with learning
rates ``η_1 … η_C``,

    TracIn(z, x) = Σ_c η_c ∇ℓ(x; θ_c) · ∇ℓ(z; θ_c)

(TracInCP). A gradient step ``θ_c - η_c ∇ℓ(z; θ_c)`` on the training example ``z`` alone changes the loss at ``x``
by ``≈ -η_c ∇ℓ(x; θ_c) · ∇ℓ(z; θ_c)``, so the score is the first-order **decrease** of the loss at ``x`` that
single-example steps on ``z`` at the checkpoints cause. Positive means ``z`` is a **proponent** of ``x`` (a step on
``z`` lowers ``x``'s loss), negative an opponent, as for every other calculator; ``ORDER.DESCENDING`` lists
proponents first. There is no Hessian and no ``1/N``: scores are in loss units per (unit-batch) step.
Self-influence ``Σ_c η_c ‖∇ℓ(z; θ_c)‖² ≥ 0`` is large for examples the model keeps fighting (mislabeled, atypical).
Gradients are those of ``InfluenceModel.batch_jacobian_tensor``: per-example losses times sample weights, without
the regularizer.

Four calculators, all on the shared engine (self-influence, matrices, streaming, caches, top-k):

* :class:`TracIn`: checkpoints as Keras models (or ``InfluenceModel``) already in memory, over any watched layers.
* :class:`TracInCP`: checkpoints as files (``.keras``; ``.weights.h5`` with a ``model_factory``) or callables,
  loaded into **one** Keras model whose weights are swapped (see the memory notes on the class).
* :class:`TracInCPFast`: the last Dense layer only, through the outer-product identity
  ``∇_W ℓ = ã ⊗ g`` (``ã`` the layer input with a trailing 1 for the bias, ``g = ∂ℓ/∂(pre-activation)``), so
  ``∇ℓ(x)·∇ℓ(z) = (ã_x·ã_z)(g_x·g_z)`` without forming ``ã ⊗ g``.
* :class:`TracInCPFastRandProj`: the same gradients sketched to ``projection_dim`` numbers by a seeded random
  projection whose dot products are unbiased estimates of the scores, so the linear/faiss indices apply.

Influence vectors put the learning rate on the training side: ``v(z) = [η_c ∇ℓ(z; θ_c)]_c`` and the test transform
``t(x) = [∇ℓ(x; θ_c)]_c`` (concatenated over checkpoints), so ``t(x)·v(z)`` is the score, with no square roots of
the learning rates. Influence vectors have ``C × P`` entries (``C × (d + 1 + K)`` for the fast
variant, ``projection_dim`` for the sketch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from influenciae._backend import tf
from influenciae.influence._checkpoints import (
    CheckpointCalculator,
    checkpoint_list,
    in_memory,
)
from influenciae.influence._contexts import ModelContexts
from influenciae.influence.tracin_fast import TracInCPFast, TracInCPFastRandProj
from influenciae.language import Measurement, as_measurement, query_model
from influenciae.model import InfluenceModel
from influenciae.model.checkpoints import StoredCheckpoints, Wrap
from influenciae.model.loading import is_model

__all__ = ["TracIn", "TracInCP", "TracInCPFast", "TracInCPFastRandProj"]


class _GradientTracIn(CheckpointCalculator):
    """Per-sample gradients of the watched weights at each checkpoint (of the measurement's ``q`` on the test side)."""

    measurement: Measurement | None = None

    def _features(self, model: InfluenceModel, index: int, batch: Any) -> tf.Tensor:
        return model.batch_jacobian_tensor(batch)

    def _query_features(self, model: InfluenceModel, index: int, batch: Any) -> tf.Tensor:
        if self.measurement is None:
            return model.batch_jacobian_tensor(batch)
        queries: dict[int, InfluenceModel] = self.__dict__.setdefault("_query_models", {})
        if id(model) not in queries:  # one query model per checkpoint model, sharing its watched weights
            queries[id(model)] = query_model(model, self.measurement)
        return queries[id(model)].batch_jacobian_tensor(batch)

    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        return tf.concat([rate * gradients for rate, gradients in zip(self._rates, features, strict=True)], axis=1)

    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        return tf.concat(features, axis=1)

    def _self_terms(self, features: Any, index: int) -> tuple[tf.Tensor, ...]:
        return (self._rates[index] * tf.reduce_sum(tf.square(features), axis=1),)


def _gradient_wrap(start_layer: int | str | None, last_layer: int | str | None, loss_function: Any) -> Wrap:
    def wrap(model: Any, loss: Any) -> InfluenceModel:
        return InfluenceModel(model, start_layer, last_layer, loss_function if loss_function is not None else loss)

    return wrap


class TracIn(_GradientTracIn):
    """TracInCP over checkpoints held in memory: ``Σ_c η_c ∇ℓ(x; θ_c) · ∇ℓ(z; θ_c)``.

    Sign and scale (module docstring): positive means ``z`` is a proponent of ``x`` (single-example gradient steps
    on ``z`` at the checkpoints lower ``x``'s loss, by about the score to first order); self-influence
    ``Σ_c η_c ‖∇ℓ(z; θ_c)‖²``. Gradients are taken with respect to the watched weights (all trainable weights, or
    ``start_layer``..``last_layer``), per-example losses times sample weights, no regularizer.

    Influence vectors ``[η_c ∇ℓ(z; θ_c)]_c`` and transforms ``[∇ℓ(x; θ_c)]_c`` are concatenated over checkpoints
    (``D = C × nb_params``), so scores are dot products and every neighbour strategy applies. With one checkpoint
    and ``learning_rates=1`` this is the plain gradient dot product ("TracIn-last" with the last checkpoint).

    Args:
        models: One Keras model (or :class:`~influenciae.InfluenceModel`) per checkpoint, same architecture.
        learning_rates: The learning rate at each checkpoint (one float for all, or one per checkpoint).
        start_layer: First watched layer (index or name) of each Keras model.
        last_layer: Last watched layer (inclusive) of each Keras model.
        loss_function: Per-example loss; ``None`` uses each model's compiled loss.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.
        measurement: What the test side measures instead of its loss (:mod:`influenciae.language`): transforms
            become ``[∇q(x; θ_c)]_c`` with ``q`` the measurement's query loss, so positive scores mark proponents of
            the measurement; influence vectors and self-influence are unchanged. ``None``: the test loss.

    Example:
        >>> tracin = TracIn([model_epoch_1, model_epoch_5, model_epoch_10], learning_rates=[0.1, 0.05, 0.01],
        ...                 loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
        ...                                                                          reduction="none"))
        >>> indices, values = tracin.most_influential(test_ds, train_ds, k=5)
    """

    method_name = "tracin"

    def __init__(
        self,
        models: Sequence[Any],
        learning_rates: float | Sequence[float],
        *,
        start_layer: int | str | None = None,
        last_layer: int | str | None = None,
        loss_function: Any = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
        measurement: Measurement | Any = None,
    ) -> None:
        self.measurement = as_measurement(measurement)
        items = checkpoint_list(models, "models")
        for index, item in enumerate(items):
            if not is_model(item):
                raise TypeError(
                    f"models[{index}] is a {type(item).__name__}, not a Keras model or InfluenceModel. For checkpoint "
                    "files or callables use TracInCP."
                )
            options = (start_layer, last_layer, loss_function)
            if isinstance(item, InfluenceModel) and any(option is not None for option in options):
                raise ValueError(
                    f"start_layer, last_layer and loss_function configure Keras models; models[{index}] is already "
                    "an InfluenceModel (configure it there)."
                )
        models_ = [
            item
            if isinstance(item, InfluenceModel)
            else _gradient_wrap(start_layer, last_layer, loss_function)(item, None)
            for item in items
        ]
        super().__init__(in_memory(models_), learning_rates, None, show_progress, batches_per_shard)

    @property
    def models(self) -> list[InfluenceModel]:
        """The checkpoints' :class:`InfluenceModel` objects, in order (the original Influenciae's ``TracIn.models``)."""
        checkpoints = self.checkpoints
        assert isinstance(checkpoints, ModelContexts)  # noqa: S101 - TracIn builds nothing else
        return list(checkpoints.models)


class TracInCP(_GradientTracIn):
    """TracInCP from saved checkpoints: the score of :class:`TracIn`, loading one checkpoint at a time.

    Checkpoints are paths to ``.keras`` files, paths to ``.weights.h5`` files (then ``model_factory()`` builds the
    architecture), Keras models, or callables returning a Keras model. They are loaded into **one** Keras model
    (built from ``model_factory`` or from checkpoint 0, a private copy for callables) whose weights are swapped in
    place, so there is a single traced gradient function for all checkpoints. Same score, sign and scale as
    :class:`TracIn`; equal to it on the same weights.

    Memory and loading:

    * ``keep_in_memory=True``: each checkpoint is read once (on first use) and its weights kept as host arrays,
      ``C ×`` the model's weights (the size of a single influence vector row when all weights are watched). Every
      engine method then behaves as with :class:`TracIn`; switching checkpoints is an in-memory assignment.
    * ``keep_in_memory=False`` (default): one set of weights in memory. Passes over a dataset go checkpoint by
      checkpoint: each checkpoint is loaded once per block of ``batches_per_load`` batches (once per pass when
      ``None``, the default: memory then holds that pass's vectors, which ``CACHE.MEMORY`` keeps anyway), once
      per cache shard when writing a disk cache, once per pass for self-influence (``O(N)`` memory). Set
      ``batches_per_load`` to bound memory with ``CACHE.NO_CACHE``; ``top_k``'s test batches go block by block too.

    ``checkpoint_loads`` counts the loads. Disk caches are keyed by the learning rates and by the SHA-256 of each
    checkpoint file (weights of callables, assumed to return the same weights every call).

    Args:
        checkpoints: One entry per checkpoint (see above), same architecture.
        learning_rates: The learning rate at each checkpoint (one float for all, or one per checkpoint).
        model_factory: Builds a new model with the architecture (required for ``.weights.h5`` files); its weights
            are overwritten by each checkpoint in turn.
        start_layer: First watched layer (index or name).
        last_layer: Last watched layer (inclusive).
        loss_function: Per-example loss; ``None`` uses the compiled loss stored in checkpoint 0 (or the model
            from ``model_factory``).
        keep_in_memory: Keep every checkpoint's weights in host memory after their first load.
        batches_per_load: Batches per block when loading checkpoints one at a time (``None``: a whole pass).
        custom_objects: Passed to ``keras.models.load_model`` for ``.keras`` files.
        show_progress: As for :class:`TracIn`.
        batches_per_shard: As for :class:`TracIn`.
        measurement: As for :class:`TracIn` (the test side's measurement, ``None``: the test loss).

    Example:
        >>> tracin = TracInCP(["ckpt/epoch_02.keras", "ckpt/epoch_06.keras", "ckpt/epoch_10.keras"],
        ...                   learning_rates=0.01, loss_function=loss)
        >>> scores = tracin.influence_matrix(test_ds, train_ds)
        >>> indices, self_influence = tracin.compute_top_k_from_training_dataset(train_ds, k=20)
    """

    method_name = "tracin"

    def __init__(
        self,
        checkpoints: Sequence[Any],
        learning_rates: float | Sequence[float],
        model_factory: Callable[[], Any] | None = None,
        *,
        start_layer: int | str | None = None,
        last_layer: int | str | None = None,
        loss_function: Any = None,
        keep_in_memory: bool = False,
        batches_per_load: int | None = None,
        custom_objects: dict[str, Any] | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
        measurement: Measurement | Any = None,
    ) -> None:
        self.measurement = as_measurement(measurement)
        items, explicit = checkpoint_list(checkpoints, "checkpoints"), loss_function is not None
        wrap = _gradient_wrap(start_layer, last_layer, loss_function)
        source = StoredCheckpoints(items, wrap, model_factory, keep_in_memory, custom_objects, explicit)
        super().__init__(source, learning_rates, batches_per_load, show_progress, batches_per_shard)
