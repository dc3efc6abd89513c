"""Beyond one machine: per-shard kernels, ``tf.distribute`` Hessian products and an Apache Beam scoring pipeline.

* :mod:`~influenciae.distributed.kernels`: the per-shard work (HVP sums, exact top-k merges, and the worker's
  calculator: :func:`shard_scorer` builds it once, :func:`score_shard` hands it each batch).
* :mod:`~influenciae.distributed.strategy`: :class:`DistributedHessianOperator` and :func:`distributed_ihvp` run
  the phases that sum over the whole dataset (CG, LiSSA, Arnoldi, exact Hessians) on a ``tf.distribute`` strategy.
* :mod:`~influenciae.distributed.state`: :class:`SolverState`, the saved summary of a solver that scoring workers
  load.
* :mod:`~influenciae.distributed.beam`: the embarrassingly parallel pass (influence vectors, self-influence, top-k)
  as an Apache Beam pipeline; needs the ``[beam]`` extra and is not imported here.

``docs/distributed.md`` shows a run on one machine and how the same jobs are submitted to a cluster.
"""

from influenciae.distributed.kernels import (
    SCORING_MODES,
    block_candidates,
    empty_candidates,
    hvp_sum,
    merge_candidates,
    score_batch,
    score_block,
    score_shard,
    self_scores,
    shard_scorer,
)
from influenciae.distributed.state import SavedSolver, SolverState, model_fingerprint
from influenciae.distributed.strategy import (
    DistributedHessianOperator,
    Sharding,
    distributed_ihvp,
    load_model_in_scope,
    local_replica_ids,
)

__all__ = [
    "SCORING_MODES",
    "DistributedHessianOperator",
    "SavedSolver",
    "Sharding",
    "SolverState",
    "block_candidates",
    "distributed_ihvp",
    "empty_candidates",
    "hvp_sum",
    "load_model_in_scope",
    "local_replica_ids",
    "merge_candidates",
    "model_fingerprint",
    "score_batch",
    "score_block",
    "score_shard",
    "self_scores",
    "shard_scorer",
]
