"""What TracIn's calculators share: argument checks and the checkpoint calculator on the engine's contexts hook.

The checkpoints are the engine's *contexts* (:mod:`influenciae.influence._contexts`): a calculator computes
per-checkpoint features and assembles them; the engine decides how to walk checkpoints and batches (checkpoint by
checkpoint when loading one reads a file), so nothing here overrides an engine pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.cache import combine_hashes
from influenciae.influence._contexts import ContextHooks, Contexts, ModelContexts
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.model import InfluenceModel
from influenciae.model.checkpoints import weights_fingerprint

__all__ = ["CheckpointCalculator", "checkpoint_list", "learning_rates_of", "positive_or_none", "in_memory"]


def checkpoint_list(checkpoints: Any, name: str) -> list[Any]:
    if isinstance(checkpoints, (str, os.PathLike)) or not isinstance(checkpoints, Iterable):
        raise TypeError(f"{name} must be a list (one entry per checkpoint), got {type(checkpoints).__name__}.")
    items = list(checkpoints)
    if not items:
        raise ValueError(f"{name} is empty: TracIn needs at least one checkpoint.")
    return items


def learning_rates_of(learning_rates: Any, count: int) -> np.ndarray:
    try:
        rates = np.asarray(learning_rates, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"learning_rates must be a float or a list of floats, got {learning_rates!r}.") from error
    if rates.ndim == 0:
        rates = np.full([count], float(rates))
    elif rates.ndim != 1 or rates.shape[0] != count:
        raise ValueError(
            f"learning_rates has {rates.size} values for {count} checkpoints: pass one learning rate per checkpoint "
            "(the rate in use when each checkpoint was saved), or a single float for all of them."
        )
    if not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(f"learning_rates must be positive and finite, got {rates.tolist()}.")
    return rates


def positive_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    return int(value)


def in_memory(models: list[InfluenceModel]) -> ModelContexts:
    """Checkpoints held in memory as InfluenceModels (switching costs nothing), of one architecture."""
    first = models[0]
    for index, model in enumerate(models[1:], start=1):
        if model.weight_shapes != first.weight_shapes or model.dtype != first.dtype:
            raise ValueError(
                f"Checkpoint {index} watches weights of shapes {model.weight_shapes} ({model.dtype.name}) but "
                f"checkpoint 0 watches {first.weight_shapes} ({first.dtype.name}): checkpoints must share one "
                "architecture and the same watched layers."
            )
    return ModelContexts(models, weights_fingerprint)


class CheckpointCalculator(ContextHooks, BaseInfluenceCalculator):
    """Scores summed over checkpoints, from per-checkpoint *features* of a batch (:class:`ContextHooks`).

    When switching checkpoints reads files (:class:`~influenciae.TracInCP` with ``keep_in_memory=False``), the
    engine's passes go checkpoint by checkpoint so that no checkpoint is loaded per batch:

    * influence vectors, transforms and ``top_k``'s test batches: the dataset is cut into blocks of
      ``batches_per_load`` batches (the whole pass when ``None``); for each block every checkpoint is loaded once
      and applied to all its batches. Memory: one model, the block's batches and the block's vectors.
    * disk caches: the block is the cache shard (``batches_per_shard`` batches), so each checkpoint is loaded
      once per shard and memory holds one shard of vectors, as the engine's own disk cache does.
    * self-influence: each checkpoint is loaded once per pass and applied to the whole dataset (one iteration of
      the dataset per checkpoint, plus one to return the batches); memory holds only the ``[N]`` running sums
      (``[N, projection_dim]`` for the random projection). The dataset must iterate in the same order each time.
    """

    def __init__(
        self,
        checkpoints: Contexts,
        learning_rates: Any,
        batches_per_load: int | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        super().__init__(checkpoints.reference, show_progress=show_progress, batches_per_shard=batches_per_shard)
        self.learning_rates = learning_rates_of(learning_rates, len(checkpoints))
        self.batches_per_load = checkpoints.batches_per_load = positive_or_none(batches_per_load, "batches_per_load")
        self.contexts = self.checkpoints = checkpoints
        self._rates = [tf.constant(rate, self.model.dtype) for rate in self.learning_rates]

    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoints)

    @property
    def checkpoint_loads(self) -> int:
        """How many times a checkpoint was read from disk (or produced by a callable) so far."""
        return self.checkpoints.loads

    def _configuration(self) -> dict[str, Any]:
        return {
            "learning_rates": self.learning_rates.tolist(),
            "num_checkpoints": len(self.checkpoints),
            "checkpoint_fingerprints": self.checkpoints.fingerprints(),
        }

    def weights_fingerprint(self) -> str:
        """A hash of every checkpoint's weights (file contents for files), in checkpoint order."""
        return combine_hashes(self.checkpoints.fingerprints())
