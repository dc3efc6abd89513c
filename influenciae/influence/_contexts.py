"""Contexts: the settings a calculator's scores are summed over (checkpoints of one run, members of an ensemble).

A calculator with contexts (TracIn's checkpoints) computes *features* of a batch at one context and assembles the
features of all contexts into influence vectors and transforms; self-influence is a sum over contexts of small
per-batch *terms*. The engine (:mod:`influenciae.influence.base`) asks :meth:`ContextHooks._contexts` and, when
switching contexts is expensive (a checkpoint read from disk), reorganises its passes context by context with the
two functions below, so that no context is loaded per batch:

* :func:`context_values`: a block of batches (``batches_per_load`` of them, a disk-cache shard, or a whole pass),
  each context activated once for the whole block;
* :func:`context_self_influence`: one pass over the data per context, only the ``[N]`` running sums held.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from influenciae._backend import tf
from influenciae.data.streams import Stream
from influenciae.model import InfluenceModel

__all__ = ["VECTORS", "TRANSFORMS", "Contexts", "ModelContexts", "ContextHooks", "context_values"]

VECTORS, TRANSFORMS = "vectors", "transforms"  # the two sides the engine evaluates


class Contexts(Protocol):
    """The contexts of a calculator: ``activate(c)`` returns an InfluenceModel computing at context ``c``.

    A protocol: :class:`ModelContexts` (models in memory) and ``influenciae.model.checkpoints.StoredCheckpoints``
    (files loaded one at a time into one Keras model) implement it.
    """

    reference: InfluenceModel  # the calculator's ``model``: validation, dtype, nb_params
    loads: int = 0  # contexts read from disk or produced by a callable so far
    #: Batches per block when contexts are expensive to switch (``None``: a whole pass).
    batches_per_load: int | None = None

    def __len__(self) -> int: ...

    def activate(self, index: int) -> InfluenceModel: ...

    def fingerprints(self) -> list[str]: ...

    @property
    def expensive(self) -> bool:
        """Whether switching contexts reads a file (then the engine's passes go context by context)."""
        return False

    def order(self) -> list[int]:
        """Context indices in the order to visit them: starting from the active one saves a load."""
        return list(range(len(self)))


class ModelContexts(Contexts):
    """One InfluenceModel per context, all in memory; switching costs nothing."""

    def __init__(self, models: list[InfluenceModel], fingerprint: Callable[[InfluenceModel], str]) -> None:
        self.models = models
        self.reference = models[0]
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.models)

    def activate(self, index: int) -> InfluenceModel:
        return self.models[index]

    def fingerprints(self) -> list[str]:
        return [self._fingerprint(model) for model in self.models]


class ContextHooks:
    """The engine hooks of a calculator whose scores sum over contexts, from per-context hooks.

    Mix in before :class:`~influenciae.influence.base.BaseInfluenceCalculator` and set ``self.contexts``.
    Subclasses implement ``_features`` (what the scores need from one context for a batch), ``_vectors_from`` and
    ``_transforms_from`` (assembly over contexts, in context order) and ``_self_terms`` (summed over contexts,
    then reduced by ``_self_from_terms``).
    """

    contexts: Contexts

    def _contexts(self) -> Contexts | None:
        return self.contexts

    @abc.abstractmethod
    def _features(self, model: InfluenceModel, index: int, batch: Any) -> Any:
        """What the scores need from context ``index`` for ``batch`` (``model`` computes at that context)."""

    @abc.abstractmethod
    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        """Influence vectors ``[B, D]`` from the features of every context, in context order."""

    @abc.abstractmethod
    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        """Transforms ``[B, D]`` from the features of every context, in context order."""

    def _self_terms(self, features: Any, index: int) -> tuple[tf.Tensor, ...]:
        """Per-context terms of the self-influence, summed over contexts (or override ``_self_influence``)."""
        raise NotImplementedError(f"{type(self).__name__} defines no per-context self-influence terms.")

    def _self_from_terms(self, terms: tuple[tf.Tensor, ...]) -> tf.Tensor:
        return terms[0]

    def _query_features(self, model: InfluenceModel, index: int, batch: Any) -> Any:
        """Features of a test batch (the transforms' side); the training features unless overridden."""
        return self._features(model, index, batch)

    # one batch at a time, when switching contexts is cheap
    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        return context_values(self, [batch], VECTORS)

    def _transforms(self, batch: Any) -> tf.Tensor:
        return context_values(self, [batch], TRANSFORMS)

    def _self_influence(self, batch: Any) -> tf.Tensor:
        features = _feature_table(self, [batch], self._features)[0]
        return self._self_from_terms(_sum_terms(self._self_terms(f, c) for c, f in enumerate(features)))


def _feature_table(calculator: Any, batches: list[Any], features_of: Callable[..., Any]) -> list[list[Any]]:
    contexts: Contexts = calculator.contexts
    table: list[list[Any]] = [[None] * len(contexts) for _ in batches]
    for index in contexts.order():
        model = contexts.activate(index)
        for row, batch in zip(table, batches, strict=True):
            row[index] = features_of(model, index, batch)
    return table


def context_values(calculator: Any, batches: list[Any], side: str) -> tf.Tensor:
    """Influence vectors or transforms ``[rows, D]`` of a block of batches, each context activated once.

    Args:
        calculator: A calculator with :class:`ContextHooks`.
        batches: Consecutive batches (their rows are concatenated in the result).
        side: :data:`VECTORS` or :data:`TRANSFORMS`.
    """
    features_of = calculator._features if side == VECTORS else calculator._query_features
    assemble = calculator._vectors_from if side == VECTORS else calculator._transforms_from
    table: list[list[Any] | None] = list(_feature_table(calculator, batches, features_of))
    parts = []
    for position in range(len(table)):
        features, table[position] = table[position], None  # keep ~one copy of the block's vectors
        parts.append(assemble(features or []))
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)


def context_self_influence(
    calculator: Any, stream: Stream, describe: Callable[[str], Callable[[Iterable[Any]], Iterable[Any]] | None]
) -> Iterator[tuple[tf.Tensor, Any, tf.Tensor]]:
    """Self-influence ``(indices, batch, values [B])``, one pass over ``stream`` per context (``[N]`` sums held).

    Args:
        calculator: A calculator with :class:`ContextHooks`.
        stream: The training stream (it must iterate in the same order every pass).
        describe: A progress wrapper for a pass's description.
    """
    contexts: Contexts = calculator.contexts
    order = contexts.order()
    totals: list[tuple[tf.Tensor, ...]] = []
    index_blocks: list[tf.Tensor] = []
    for step, index in enumerate(order):
        model = contexts.activate(index)
        position = -1
        for position, (indices, batch) in enumerate(
            stream.batches(describe(f"self-influence, checkpoint {step + 1}/{len(order)}"))
        ):
            terms = calculator._self_terms(calculator._features(model, index, batch), index)
            if step == 0:
                totals.append(terms)
                index_blocks.append(indices)
            elif position >= len(totals) or not _same_indices(index_blocks[position], indices):
                raise _reordered_dataset_error()
            else:
                totals[position] = _sum_terms([totals[position], terms])
        if position + 1 != len(totals):
            raise _reordered_dataset_error()
    position = -1
    for position, (indices, batch) in enumerate(stream.batches()):
        if position >= len(totals) or not _same_indices(index_blocks[position], indices):
            raise _reordered_dataset_error()
        yield indices, batch, calculator._self_from_terms(totals[position])
    if position + 1 != len(totals):
        raise _reordered_dataset_error()


def _sum_terms(terms: Iterable[tuple[tf.Tensor, ...]]) -> tuple[tf.Tensor, ...]:
    total: tuple[tf.Tensor, ...] | None = None
    for term in terms:
        total = term if total is None else tuple(a + b for a, b in zip(total, term, strict=True))
    if total is None:
        raise ValueError("No checkpoint to sum over.")
    return total


def _same_indices(first: tf.Tensor, second: tf.Tensor) -> bool:
    return bool(first.shape == second.shape and np.array_equal(first.numpy(), second.numpy()))


def _reordered_dataset_error() -> ValueError:
    return ValueError(
        "The training set changed between passes (another number or size of batches), but with checkpoints loaded "
        "one at a time it is read once per checkpoint. Make its iteration deterministic (e.g. "
        "shuffle(..., reshuffle_each_iteration=False)) or pass keep_in_memory=True."
    )
