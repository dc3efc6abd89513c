"""The Hessian of the training objective over ``tf.distribute`` replicas: local sums, one all-reduce per product.

:class:`DistributedHessianOperator` is a :class:`~influenciae.hessian.RowOperator`, so every solver (CG, LiSSA,
Arnoldi, exact) runs on it unchanged through ``operator=...`` (:func:`distributed_ihvp` does the wiring). One product
``H V`` for a block of vectors ``V [n, P]`` is one ``tf.function`` call in which

1. every replica loops, inside the graph, over **its own shard** of the Hessian dataset and sums the per-example
   HVPs and the example count (:func:`~influenciae.distributed.kernels.hvp_sum`): no communication;
2. the replicas exchange **one** all-reduce of ``[n, P + 1]`` values (the local sums with the count appended as a
   last column), so that every replica holds ``Σ_all ∇²ℓ V`` and ``N``;
3. the result is ``sum / N + ∇²Ω V`` (the regularizer enters once, after the reduction).

Shards may be uneven (a partial last batch, more batches on some replicas, even an empty shard): each replica's
loop runs as long as its own data, and replicas meet only at the single all-reduce, not once per step as when
iterating a ``strategy.experimental_distribute_dataset``.

Strategies:

* ``tf.distribute.MirroredStrategy``: several devices (GPUs, or logical CPUs) of one host; the all-reduce is NCCL
  or a reduction to one device.
* ``tf.distribute.MultiWorkerMirroredStrategy``: one process per host (set ``TF_CONFIG``), ring or NCCL collectives.
  Every worker runs the same program (SPMD): it builds the same operator and solver and calls the products in the
  same order; since every worker receives the same reduced values, iterative solvers (CG's convergence test,
  LiSSA's power iteration, Arnoldi) take the same decisions everywhere.
* The default strategy (no ``strategy.scope()``): one replica; the operator then equals
  :class:`~influenciae.hessian.HessianOperator`.

Load the model under ``strategy.scope()`` (:func:`load_model_in_scope`) so that its variables are mirrored on each
replica's device rather than copied at every product. (Keras 3's own ``keras.distribution`` does not distribute on
the TensorFlow backend: ``tf.distribute`` is the engine here.)

Sharding policy (:class:`Sharding`), how the global replica ``r`` of ``R`` gets its examples:

* ``Sharding.DATA`` (default): every replica reads the whole dataset and keeps every ``R``-th batch
  (``dataset.shard(R, r)``). Works for any ``tf.data.Dataset`` (arrays, generators, a single file); costs ``R``
  reads of the data per product. Shards differ by at most one batch.
* ``Sharding.FILE``: the data are files (e.g. TFRecords); replica ``r`` reads only ``files[r::R]`` through
  ``read_files(files) -> batched dataset``. Each file is read once per product in total; needs at least ``R``
  files, and shard sizes follow the file sizes.
* a function ``dataset_fn(input_context) -> batched dataset`` (``tf.distribute.InputContext`` with
  ``input_pipeline_id = r``, ``num_input_pipelines = R``) for anything else; the shards must be disjoint and cover
  the data.

Example:
    >>> strategy = tf.distribute.MirroredStrategy()
    >>> model = load_model_in_scope(strategy, "model.keras")
    >>> im = InfluenceModel(model)
    >>> cg = distributed_ihvp(strategy, im, train_ds, solver="cg", damping=1e-3)
    >>> calculator = FirstOrderInfluenceCalculator(im, train_ds, ihvp_calculator=cg)
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from typing import Any

from influenciae._backend import tf
from influenciae.data import check_dataset
from influenciae.distributed.kernels import hvp_sum
from influenciae.hessian import InverseHessianVectorProduct, RowOperator, get_ihvp
from influenciae.model import InfluenceModel
from influenciae.model.loading import load_model

__all__ = [
    "Sharding",
    "DistributedHessianOperator",
    "distributed_ihvp",
    "load_model_in_scope",
    "local_replica_ids",
]

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]

#: Op types of cross-process collectives (what :meth:`DistributedHessianOperator.collective_ops` reports).
_COLLECTIVE_OPS = ("CollectiveReduce", "CollectiveReduceV2", "CollectiveReduceV3", "NcclAllReduce", "CollectiveGather")


class Sharding(str, enum.Enum):
    """How the Hessian dataset is split among the replicas (see the module docstring)."""

    DATA = "data"
    FILE = "file"


def local_replica_ids(strategy: tf.distribute.Strategy) -> list[int]:
    """Global ids (``0 ≤ r < num_replicas_in_sync``) of the replicas this process runs, in local order."""
    values = strategy.experimental_distribute_values_from_function(lambda context: context.replica_id_in_sync_group)
    return [int(value) for value in strategy.experimental_local_results(values)]


def load_model_in_scope(strategy: tf.distribute.Strategy, path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """The saved Keras model at ``path`` loaded under ``strategy.scope()``: variables mirrored per replica.

    The model wing's loader (:func:`influenciae.model.loading.load_model`, which takes ``compile=`` and
    ``custom_objects=`` in ``kwargs``) with the strategy.
    """
    return load_model(path, strategy=strategy, **kwargs)


class DistributedHessianOperator(RowOperator):
    """Matrix-free Hessian whose products run on a ``tf.distribute`` strategy with one all-reduce each.

    Args:
        model: The wrapped model (preferably loaded under ``strategy.scope()``).
        data: The Hessian data: a batched ``tf.data.Dataset`` (``Sharding.DATA``), a list of files
            (``Sharding.FILE``, or ``DATA`` on the dataset ``read_files(files)``), or a function
            ``dataset_fn(input_context) -> batched dataset`` returning each replica's shard.
        strategy: The strategy; ``None`` uses the current one (``tf.distribute.get_strategy()``).
        sharding: ``Sharding.DATA`` or ``Sharding.FILE`` (or ``"data"``/``"file"``); ignored for a ``dataset_fn``.
        read_files: ``files -> batched dataset`` of ``(inputs, targets[, sample_weight])``, needed with files.

    Attributes:
        num_products: Products computed so far; each made exactly one all-reduce.

    Raises:
        ValueError: For a sharding that does not fit the data (``FILE`` with a dataset, fewer files than replicas).
        TypeError: For data of another type.
    """

    def __init__(
        self,
        model: InfluenceModel,
        data: tf.data.Dataset | Sequence[str] | DatasetFn,
        strategy: tf.distribute.Strategy | None = None,
        *,
        sharding: Sharding | str = Sharding.DATA,
        read_files: Callable[[list[str]], tf.data.Dataset] | None = None,
    ) -> None:
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        try:
            sharding = Sharding(sharding)
        except ValueError:
            raise ValueError(f"sharding must be 'data' or 'file', got {sharding!r}.") from None
        self.model = model
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        self.sharding = sharding
        self.num_replicas = int(self.strategy.num_replicas_in_sync)
        dataset_fn = _dataset_fn(data, sharding, read_files)
        self._shards: dict[int, tf.data.Dataset] = {}
        for replica in local_replica_ids(self.strategy):
            context = tf.distribute.InputContext(self.num_replicas, replica, self.num_replicas)
            self._shards[replica] = check_dataset(dataset_fn(context), name=f"the dataset of replica {replica}")
        for shard in self._shards.values():
            for batch in shard.take(1):  # validate eagerly, with an error naming the fix
                model.validate_batch(batch)
        self._num_examples: int | None = None
        self._product: Any = None
        self.num_products = 0
        super().__init__(
            model.nb_params,
            model.dtype,
            "DistributedHessianOperator",
            parameters={"model": model, "data": data, "strategy": self.strategy, "sharding": sharding.value},
        )

    @property
    def num_examples(self) -> int:
        """N, the number of examples over all replicas (known after the first product, computed by one if needed)."""
        if self._num_examples is None:
            self._matmul_rows(tf.zeros([1, self.num_params], self.dtype))
        return int(self._num_examples or 0)

    def collective_ops(self) -> list[str]:
        """Types of the cross-process collective ops in one traced product (one all-reduce: one entry).

        Under ``MultiWorkerMirroredStrategy`` this is ``["CollectiveReduceV2"]``; a ``MirroredStrategy`` on one host
        reduces through device copies and an ``AddN`` (an empty list), NCCL on GPUs (``["NcclAllReduce"]``).
        """
        graph = self._product_function().get_concrete_function().graph
        return [op.type for op in graph.get_operations() if op.type in _COLLECTIVE_OPS]

    def _product_function(self) -> Any:
        if self._product is None:
            shards, model, strategy = self._shards, self.model, self.strategy

            def local_sum(vectors: tf.Tensor) -> tf.Tensor:
                context = tf.distribute.get_replica_context()
                replica = int(tf.get_static_value(context.replica_id_in_sync_group))
                total = tf.zeros_like(vectors)
                count = tf.zeros([], vectors.dtype)
                # `iter` keeps the loop a while_loop of the function graph (traced once); a plain `for` over the
                # dataset would become a dataset reduce whose body tf.data re-instantiates at every call.
                for batch in iter(shards[replica]):
                    batch_total, batch_count = hvp_sum(model, batch, vectors)
                    total += batch_total
                    count += batch_count
                packed = tf.concat([total, tf.fill([tf.shape(vectors)[0], 1], count)], axis=1)
                return context.all_reduce(tf.distribute.ReduceOp.SUM, packed)  # the one all-reduce

            @tf.function(input_signature=[tf.TensorSpec([None, self.num_params], self.dtype)])  # autograph: the loop
            def product(vectors: tf.Tensor) -> tf.Tensor:
                reduced = strategy.run(local_sum, args=(vectors,))
                return strategy.experimental_local_results(reduced)[0]  # identical on every replica

            self._product = product
        return self._product

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        packed = self._product_function()(vectors)
        self.num_products += 1
        total, count = packed[:, :-1], packed[0, -1]
        self._num_examples = int(round(float(count)))
        if self._num_examples == 0:
            raise ValueError("The Hessian dataset is empty on every replica; pass a dataset with at least one example.")
        return total / count + self.model.regularization_hvp(vectors)


def distributed_ihvp(
    strategy: tf.distribute.Strategy | None,
    model: InfluenceModel,
    data: tf.data.Dataset | Sequence[str] | DatasetFn,
    solver: str = "cg",
    *,
    sharding: Sharding | str = Sharding.DATA,
    read_files: Callable[[list[str]], tf.data.Dataset] | None = None,
    damping: float = 0.0,
    **options: Any,
) -> InverseHessianVectorProduct:
    """A registered solver (``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"exact"``) on a :class:`DistributedHessianOperator`.

    Args:
        strategy: The ``tf.distribute`` strategy (``None``: the current one).
        model: The wrapped model.
        data: See :class:`DistributedHessianOperator`.
        solver: A registered solver name.
        sharding: See :class:`DistributedHessianOperator`.
        read_files: See :class:`DistributedHessianOperator`.
        damping: λ ≥ 0.
        **options: Other options of the solver (``tolerance``, ``subspace_dim``...).

    Returns:
        The solver; pass it to a calculator as ``ihvp_calculator=...``.

    Example:
        >>> cg = distributed_ihvp(strategy, im, train_ds, "cg", damping=1e-3)
        >>> solutions = cg.solve(gradients)  # [n, P], one all-reduce per CG iteration
    """
    operator = DistributedHessianOperator(model, data, strategy, sharding=sharding, read_files=read_files)
    return get_ihvp(solver, model, None, operator=operator, damping=damping, **options)


def _dataset_fn(data: Any, sharding: Sharding, read_files: Callable[[list[str]], tf.data.Dataset] | None) -> DatasetFn:
    if isinstance(data, tf.data.Dataset):
        if sharding is Sharding.FILE:
            raise ValueError(
                "Sharding.FILE splits files among replicas, but a tf.data.Dataset hides its files: pass the list of "
                "files with read_files=..., or use Sharding.DATA."
            )
        dataset = check_dataset(data, name="data")
        return lambda context: dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
    if isinstance(data, (list, tuple)) and all(isinstance(item, (str, os.PathLike)) for item in data):
        files = [os.fspath(item) for item in data]
        if not files:
            raise ValueError("The list of Hessian data files is empty.")
        if read_files is None:
            raise ValueError("With a list of files, pass read_files=lambda files: <batched dataset of those files>.")
        reader = read_files
        if sharding is Sharding.DATA:
            return lambda context: reader(files).shard(context.num_input_pipelines, context.input_pipeline_id)

        def file_shard(context: tf.distribute.InputContext) -> tf.data.Dataset:
            if len(files) < context.num_input_pipelines:
                raise ValueError(
                    f"Sharding.FILE needs at least one file per replica: {len(files)} files for "
                    f"{context.num_input_pipelines} replicas. Split the data into more files or use Sharding.DATA."
                )
            return reader(files[context.input_pipeline_id :: context.num_input_pipelines])

        return file_shard
    if callable(data):
        return data  # type: ignore[no-any-return]
    raise TypeError(
        "data must be a batched tf.data.Dataset, a list of files (with read_files=...) or a function "
        f"dataset_fn(input_context) -> dataset; got {type(data).__name__}."
    )
