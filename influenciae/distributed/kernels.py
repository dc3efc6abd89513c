"""The per-shard work of every distributed engine: HVP sums, scores, exact top-k merges, and the worker's calculator.

DESIGN.md §4 asks that influence vectors, self-influence and top-k of one shard of the training set depend only on
that shard, the model weights and the solver's state, and that partial top-k results merge exactly. These kernels are
that work, so that the ``tf.distribute`` operator (:mod:`influenciae.distributed.strategy`)
and the Apache Beam pipeline (:mod:`influenciae.distributed.beam`) stay thin adapters:

* :func:`hvp_sum`: the sum of per-example Hessian-vector products over one batch, and its example count (the
  local term of ``H v = (1/N) Σ_i ∇²ℓ(z_i) v``; engines add local sums and divide once by the global count);
* :func:`score_block`: scores ``[m, B]`` of test transforms against a block of training vectors;
* :func:`self_scores`: row-wise scores ``[B]`` (self-influence);
* :func:`block_candidates` and :func:`merge_candidates`: an exact top-k per block and an exact, associative and
  commutative merge of partial top-k results, ties broken by the smaller training index (reusing
  :class:`influenciae.search.TopK`), so that any grouping of shards, in any order, gives the same answer;
* :func:`score_shard`: everything a scoring worker does with one batch of training examples: it hands the batch
  to the public methods of the calculator built on the worker (any calculator); :func:`score_batch` does it with
  the first-order calculator of a saved :class:`~influenciae.distributed.state.SolverState`;
  :func:`shard_scorer` builds a worker's calculator once (a saved state, or any registered method) and returns
  its per-batch call.

Inputs may be numpy arrays or tensors; merge results are numpy arrays (what engines serialize).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import TensorBatches, batch_size_of
from influenciae.model import InfluenceModel
from influenciae.search import TopK
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
    "score_shard",
    "shard_scorer",
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
    best = TopK(k, order)
    best.add(indices, scores)
    top_indices, top_values = best.result()
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
    best = TopK(k, order)
    best.add(*first)
    best.add(*second)
    indices, values = best.result()
    return indices.numpy(), values.numpy()


def score_shard(
    calculator: Any,
    batch: Any,
    mode: str,
    *,
    test_set: tf.data.Dataset | None = None,
    factors: Any = None,
) -> dict[str, np.ndarray]:
    """What a scoring worker computes for one batch of training examples, through the calculator's own methods.

    The batch, held as tensors (:class:`~influenciae.data.TensorBatches`: no ``tf.data`` pipeline is built or
    iterated per batch), goes to the calculator's public methods, so any calculator (first order, TracIn, TRAK,
    representer points, ...) scores a shard exactly as it scores a whole training set in one process, with the same
    checks.

    Args:
        calculator: A :class:`~influenciae.influence.base.BaseInfluenceCalculator` built on the worker.
        batch: ``(inputs, targets[, sample_weight])`` with ``B`` examples.
        mode: One of :data:`SCORING_MODES`.
        test_set: With ``"top_k"``: the batched test examples (their transforms are the calculator's).
        factors: With ``"top_k"``, instead of ``test_set``: a first-order calculator's saved influence factors
            ``H⁻¹∇ℓ(x)`` ``[m, P]`` (:meth:`~influenciae.FirstOrderInfluenceCalculator.influence_from_factors`).

    Returns:
        ``{"vectors": [B, D]}`` (influence vectors), ``{"self_influence": [B]}`` or ``{"scores": [m, B]}``.
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"mode must be one of {SCORING_MODES}, got {mode!r}.")
    shard = TensorBatches.of(batch)
    if mode == "self_influence":
        return {"self_influence": np.asarray(calculator.self_influence(shard))}
    if mode == "vectors":
        blocks = [vectors.numpy() for _, vectors in calculator.compute_influence_vector(shard)]
        return {"vectors": np.concatenate(blocks)}
    if factors is not None:
        return {"scores": np.asarray(calculator.influence_from_factors(factors, shard))}
    if test_set is None:
        raise ValueError("Scoring against test examples needs test_set (or saved influence factors).")
    return {"scores": np.asarray(calculator.influence_matrix(test_set, shard))}


def score_batch(model: InfluenceModel, state: SolverState, batch: Any, mode: str) -> dict[str, np.ndarray]:
    """:func:`score_shard` of the first-order calculator of a saved solver state (:meth:`SolverState.calculator`).

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
    factors = state.factors_tensor(model.dtype).numpy() if mode == "top_k" else None
    calculator = state.calculator(model, TensorBatches.of(batch))
    return score_shard(calculator, batch, mode, factors=factors)


def shard_scorer(
    mode: str,
    model_path: str,
    train_pattern: str,
    *,
    state_path: str | None = None,
    method: str = "first_order",
    options: Mapping[str, Any] | None = None,
    test_pattern: str | None = None,
    loss: str | None = None,
    from_logits: bool = False,
    batch_size: int = 64,
) -> Callable[[Any], dict[str, np.ndarray]]:
    """What a scoring worker builds once (in ``DoFn.setup``): the calculator, and the call that scores one batch.

    With ``state_path``, the first-order calculator of the saved :class:`~influenciae.distributed.state.SolverState`
    (:meth:`~influenciae.distributed.state.SolverState.calculator`), its test factors for ``"top_k"``. Without, the
    registered ``method`` (:mod:`influenciae.influence.registry`: ``"tracin"``, ``"trak"``, ...) built from the
    model file and the training TFRecords (a method that fits on the training set, e.g. TRAK's kernels, fits on
    each worker, from the same files in the same order as one process), scored against the test TFRecords.

    Args:
        mode: One of :data:`SCORING_MODES`.
        model_path: A local ``.keras`` file.
        train_pattern: Glob of the training TFRecords (:mod:`~influenciae.distributed.records`).
        state_path: A local saved solver state, or None.
        method: A registered calculator method (without ``state_path``).
        options: Keyword fields of :class:`~influenciae.influence.registry.CalculatorOptions`.
        test_pattern: Glob of the test TFRecords (``"top_k"`` without ``state_path``).
        loss: ``None`` for the compiled loss, or a Keras loss name.
        from_logits: With a named cross-entropy: the model outputs logits.
        batch_size: Batch size of the TFRecords read here.

    Returns:
        ``score(batch) -> dict``: :func:`score_shard` of the worker's calculator.
    """
    from influenciae.distributed.records import read_tfrecords
    from influenciae.model.loading import load_influence_model, load_model, named_loss

    if mode not in SCORING_MODES:
        raise ValueError(f"mode must be one of {SCORING_MODES}, got {mode!r}.")
    if state_path is not None:
        from influenciae.distributed.state import SolverState

        model = load_influence_model(model_path, loss=loss, from_logits=from_logits)
        state = SolverState.load(state_path, model=model)
        factors = state.factors_tensor(model.dtype).numpy() if mode == "top_k" else None
        built: list[Any] = []

        def score_with_state(batch: Any) -> dict[str, np.ndarray]:
            if not built:  # the calculator's data: batches of this structure
                built.append(state.calculator(model, TensorBatches.of(batch)))
            return score_shard(built[0], batch, mode, factors=factors)

        return score_with_state
    from influenciae.influence.registry import CalculatorOptions, CalculatorSetup, build_calculator

    if mode == "top_k" and test_pattern is None:
        raise ValueError("Scoring against test examples (mode 'top_k') without a solver state needs test_pattern.")
    keras_model = load_model(model_path, compile=loss is None)
    loss_function = None if loss is None else named_loss(loss, from_logits=from_logits)
    train = read_tfrecords(train_pattern, batch_size=batch_size)
    setup = CalculatorSetup(keras_model, train, loss_function, CalculatorOptions(**dict(options or {})))
    calculator = build_calculator(method, setup)
    test_set = read_tfrecords(test_pattern, batch_size=batch_size) if mode == "top_k" and test_pattern else None

    def score(batch: Any) -> dict[str, np.ndarray]:
        return score_shard(calculator, batch, mode, test_set=test_set)

    return score
