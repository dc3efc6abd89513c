"""Engine-free kernels: the per-shard work of every distributed engine, as pure functions on tensors and arrays.

DESIGN.md §4 asks that influence vectors, self-influence and top-k of one shard of the training set depend only on
that shard, the model weights and the solver's state, and that partial top-k results merge exactly. These kernels are
that work, with no engine in sight, so that the ``tf.distribute`` operator (:mod:`influenciae.distributed.strategy`)
and the Apache Beam pipeline (:mod:`influenciae.distributed.beam`) stay thin adapters:

* :func:`hvp_sum`: the sum of per-example Hessian-vector products over one batch, and its example count (the
  local term of ``H v = (1/N) Σ_i ∇²ℓ(z_i) v``; engines add local sums and divide once by the global count);
* :func:`score_block`: scores ``[m, B]`` of test transforms against a block of training vectors;
* :func:`self_scores`: row-wise scores ``[B]`` (self-influence);
* :func:`block_candidates` and :func:`merge_candidates`: an exact top-k per block and an exact, associative and
  commutative merge of partial top-k results, ties broken by the smaller training index (reusing
  :func:`influenciae.search.merge_top_k`), so that any grouping of shards, in any order, gives the same answer;
* :func:`score_batch`: everything a scoring worker does with one batch of training examples and a
  :class:`~influenciae.distributed.state.SolverState`.

Inputs may be numpy arrays or tensors; merge results are numpy arrays (what engines serialize).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import batch_size_of
from influenciae.model import InfluenceModel
from influenciae.search import merge_top_k
from influenciae.types import ORDER

if TYPE_CHECKING:
    from influenciae.distributed.state import SolverState

__all__ = [
    "Candidates",
    "SCORING_MODES",
    "hvp_sum",
    "score_block",
    "self_scores",
    "block_candidates",
    "empty_candidates",
    "merge_candidates",
    "score_batch",
]

Candidates = tuple[np.ndarray, np.ndarray]
"""A partial top-k result: ``(indices [m, c] int64, values [m, c])``, best first, ties by smaller index."""

#: What a scoring pass produces per training example: the influence vector ``H⁻¹∇ℓ(z)``, the self-influence
#: ``∇ℓ(z)ᵀH⁻¹∇ℓ(z)`` or the scores against the saved test factors ``H⁻¹∇ℓ(x)`` (with their top-k).
SCORING_MODES = ("vectors", "self_influence", "top_k")
"""What a scoring pass can produce: influence vectors, self-influence, or top-k against test transforms."""


def hvp_sum(model: InfluenceModel, batch: Any, vectors: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum over one batch of the per-example Hessian-vector products, and the batch's example count.

    Works eagerly and inside ``tf.function`` (each replica of a ``tf.distribute`` strategy calls it on its own
    batches); the regularization term is not included: it enters ``H`` once, after the global sum.

    Args:
        model: The wrapped model.
        batch: ``(inputs, targets[, sample_weight])`` with ``B`` examples (``B`` may be 0 or vary).
        vectors: ``[n, P]``.

    Returns:
        ``(Σ_i ∇²_θ(w_i ℓ(z_i)) v  [n, P], B)`` with ``B`` a scalar in the model's dtype.
    """
    total = model.batch_hvp_sum(batch, vectors)
    return total, tf.cast(batch_size_of(batch), model.dtype)


def score_block(transforms: Any, vectors: Any) -> tf.Tensor:
    """Scores of test transforms against training vectors: ``transforms @ vectorsᵀ``.

    Args:
        transforms: ``[m, D]`` (e.g. influence factors ``H⁻¹∇ℓ(x)``).
        vectors: ``[B, D]`` (e.g. per-sample gradients ``∇ℓ(z)``), same dtype.

    Returns:
        ``[m, B]``; entry ``(i, j)`` scores training example ``j`` on test example ``i``.
    """
    transforms = tf.convert_to_tensor(transforms)
    vectors = tf.convert_to_tensor(vectors, dtype=transforms.dtype)
    if transforms.shape.rank != 2 or vectors.shape.rank != 2 or transforms.shape[1] != vectors.shape[1]:
        raise ValueError(
            f"score_block needs transforms [m, D] and vectors [B, D] of the same D, got {transforms.shape} and "
            f"{vectors.shape}."
        )
    return tf.matmul(transforms, vectors, transpose_b=True)


def self_scores(gradients: Any, vectors: Any) -> tf.Tensor:
    """Row-wise scores ``gradients[j] · vectors[j]``: self-influence when ``vectors = H⁻¹ gradients``.

    Args:
        gradients: ``[B, D]``.
        vectors: ``[B, D]``.

    Returns:
        ``[B]``.
    """
    gradients = tf.convert_to_tensor(gradients)
    vectors = tf.convert_to_tensor(vectors, dtype=gradients.dtype)
    if gradients.shape != vectors.shape or gradients.shape.rank != 2:
        raise ValueError(f"self_scores needs two [B, D] blocks, got {gradients.shape} and {vectors.shape}.")
    return tf.reduce_sum(gradients * vectors, axis=1)


def empty_candidates(num_queries: int, dtype: Any = np.float64) -> Candidates:
    """The neutral element of :func:`merge_candidates`: no candidate for each of ``num_queries`` queries."""
    return np.zeros([num_queries, 0], np.int64), np.zeros([num_queries, 0], np.dtype(dtype))


def block_candidates(indices: Any, scores: Any, k: int, order: ORDER = ORDER.DESCENDING) -> Candidates:
    """Exact top-k of one block of scores.

    Args:
        indices: Training indices of the block's columns, ``[B]`` int64 (distinct).
        scores: ``[m, B]``.
        k: Candidates kept per query.
        order: ``ORDER.DESCENDING`` keeps the largest scores, ``ORDER.ASCENDING`` the smallest.

    Returns:
        ``(indices [m, min(k, B)] int64, values [m, min(k, B)])``, best first, ties by the smaller index.
    """
    scores = tf.convert_to_tensor(scores)
    indices = tf.cast(tf.convert_to_tensor(indices), tf.int64)
    if scores.shape.rank != 2 or indices.shape.rank != 1 or indices.shape[0] != scores.shape[1]:
        raise ValueError(f"block_candidates needs indices [B] and scores [m, B], got {indices.shape}, {scores.shape}.")
    tiled = tf.tile(indices[None], [tf.shape(scores)[0], 1])
    none_indices, none_values = empty_candidates(int(scores.shape[0]), scores.dtype.as_numpy_dtype)
    top_indices, top_values = merge_top_k(tiled, scores, none_indices, none_values, k=k, order=order)
    return top_indices.numpy(), top_values.numpy()


def merge_candidates(first: Candidates, second: Candidates, k: int, order: ORDER = ORDER.DESCENDING) -> Candidates:
    """Exact merge of two partial top-k results over disjoint training examples.

    Associative and commutative (ties go to the smaller training index whatever side they come from), so an engine
    may merge per-bundle, per-worker and global results in any grouping and order and get the same answer as one
    process scanning the whole training set.

    Args:
        first: ``(indices [m, a], values [m, a])``.
        second: ``(indices [m, b], values [m, b])``, same ``m`` and dtype.
        k: Candidates kept per query.
        order: ``ORDER.DESCENDING`` or ``ORDER.ASCENDING``.

    Returns:
        ``(indices [m, min(k, a + b)] int64, values [m, min(k, a + b)])`` as numpy arrays.
    """
    indices, values = merge_top_k(first[0], first[1], second[0], second[1], k=k, order=order)
    return indices.numpy(), values.numpy()


def score_batch(model: InfluenceModel, state: SolverState, batch: Any, mode: str) -> dict[str, np.ndarray]:
    """Everything a scoring worker computes for one batch of training examples.

    Args:
        model: The wrapped model (the same weights the state was computed with).
        state: The solver state: a preconditioner for ``"vectors"``/``"self_influence"``, test factors for
            ``"top_k"``.
        batch: ``(inputs, targets[, sample_weight])`` with ``B`` examples.
        mode: One of :data:`SCORING_MODES`.

    Returns:
        ``{"vectors": [B, P]}`` (influence vectors ``H⁻¹∇ℓ(z)``), ``{"self_influence": [B]}`` or
        ``{"scores": [m, B]}`` (``∇ℓ(x_i)ᵀ H⁻¹ ∇ℓ(z_j)`` through the factors ``H⁻¹∇ℓ(x_i)``).
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"mode must be one of {SCORING_MODES}, got {mode!r}.")
    gradients = model.batch_jacobian_tensor(batch)
    if mode == "top_k":
        return {"scores": score_block(state.factors_tensor(model.dtype), gradients).numpy()}
    vectors = state.precondition(gradients)
    if mode == "vectors":
        return {"vectors": vectors.numpy()}
    return {"self_influence": self_scores(gradients, vectors).numpy()}
