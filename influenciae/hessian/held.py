"""Curvature data held as tensors, and the one-graph-call product over it.

A dataset operator (:class:`~influenciae.hessian.operator.DatasetOperator`) reads its data once through the
per-batch checks; when it fits :data:`HELD_DATA_BUDGET` it is held here as stacked tensors
(:func:`hold_batches`) and every product is one ``tf.function`` that loops over the held batches inside the graph
(:func:`held_matmul`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from influenciae._backend import tf
from influenciae.model import InfluenceModel

__all__ = [
    "HELD_BATCH_BYTES",
    "HELD_DATA_BUDGET",
    "MERGE_MAX_PARAMS",
    "BatchSum",
    "HeldBatches",
    "held_matmul",
    "hold_batches",
]


HELD_DATA_BUDGET = 256 * 2**20
"""Bytes of inputs, targets and sample weights up to which a dataset operator holds its data as tensors (after the
first, checked pass), so that a product is one graph call instead of one dispatch per batch."""


MERGE_MAX_PARAMS = 65_536
"""Models of at most this many parameters merge their dataset's batches into held batches of up to
:data:`HELD_BATCH_BYTES` (their products are many small ops, cheaper on more rows); larger ones keep the dataset's
batches, which bound the intermediates of a vectorized product."""

HELD_BATCH_BYTES = 128 * 2**10
"""Bytes of inputs, targets and weights up to which a small model's held batch holds (a power of two of) the dataset's
batches; see :data:`MERGE_MAX_PARAMS`."""


class HeldBatches(NamedTuple):
    """A curvature dataset held as tensors: its examples, in order, re-batched into ``num_batches`` equal batches.

    The last batch is padded with copies of the last example carrying sample weight 0 (as
    :meth:`InfluenceModel._pad_batch` pads a partial batch), so every batch has one static shape.

    Attributes:
        inputs: Structure of ``[num_batches, batch, ...]`` tensors.
        targets: Structure of ``[num_batches, batch, ...]`` tensors.
        weights: ``[num_batches, batch]`` sample weights (0 on the padding).
        indices: ``[num_batches, batch]`` int64 positions of the examples in the dataset (padding repeats the last).
        num_examples: N, the number of examples (padding excluded).
    """

    inputs: Any
    targets: Any
    weights: tf.Tensor
    indices: tf.Tensor
    num_examples: int

    def signature(self) -> Any:
        """``tf.TensorSpec`` s of the data with the batch count left unknown (one trace for any dataset size)."""
        return tf.nest.map_structure(
            lambda tensor: tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype),
            (self.inputs, self.targets, self.weights, self.indices),
        )


def hold_batches(model: InfluenceModel, batches: Iterable[Any], budget: int) -> HeldBatches | None:
    """Read ``batches`` once and hold them as :class:`HeldBatches`, or ``None`` when they do not fit.

    Not when inputs, targets and weights take more than ``budget`` bytes (the pass stops there), batches differ in
    anything but their length (e.g. sequences padded per batch) or hold ragged, sparse or string tensors. Batches
    are validated as by :meth:`InfluenceModel.batch_hvp_sum`, and merged for small models (:data:`MERGE_MAX_PARAMS`).

    Args:
        model: The wrapped model (validates the batches and gives the weights' dtype).
        batches: The dataset's batches (e.g. a :class:`~influenciae.data.CheckedBatches`).
        budget: The most bytes to hold.

    Returns:
        The held data (``num_examples`` 0 for an empty dataset), or ``None``.
    """
    parts: list[tuple[Any, Any, tf.Tensor]] = []
    used, batch_size, shapes = 0, 0, None
    for batch in batches:
        inputs, targets, weights = model._prepare(batch)
        flat = tf.nest.flatten((inputs, targets, weights))
        if not all(isinstance(tensor, tf.Tensor) and tensor.dtype != tf.string for tensor in flat):
            return None  # ragged, sparse or string data: streamed as given
        trailing = [(tensor.dtype, tuple(tensor.shape[1:])) for tensor in flat]
        if shapes is not None and trailing != shapes:
            return None
        shapes = trailing
        used += sum(tensor.dtype.size * int(tf.size(tensor)) for tensor in flat)
        if used > budget:
            return None
        batch_size = max(batch_size, int(tf.shape(weights)[0]))
        parts.append((inputs, targets, weights))
    count = sum(int(tf.shape(part[2])[0]) for part in parts)
    if count == 0:
        return HeldBatches(None, None, tf.zeros([0, 0], model.dtype), tf.zeros([0, 0], tf.int64), 0)
    if model.nb_params <= MERGE_MAX_PARAMS:  # small model: fewer, larger batches cost fewer small ops
        fitting = max(1, HELD_BATCH_BYTES * count // (used * batch_size))  # the dataset's batches in the budget
        batch_size *= min(len(parts), 1 << (fitting.bit_length() - 1))  # a power of two: one trace for any N
    num_batches = -(-count // batch_size)
    length = num_batches * batch_size

    def stacked(*tensors: tf.Tensor, zeros: bool = False) -> tf.Tensor:
        whole = tf.concat(tensors, axis=0) if len(tensors) > 1 else tensors[0]
        missing = length - count
        if missing:
            padding = tf.zeros_like(whole[:1]) if zeros else whole[-1:]
            whole = tf.concat([whole, tf.repeat(padding, missing, axis=0)], axis=0)
        return tf.reshape(whole, [num_batches, batch_size, *whole.shape[1:]])

    inputs, targets = tf.nest.map_structure(lambda *t: stacked(*t), *[part[:2] for part in parts])
    weights = stacked(*[part[2] for part in parts], zeros=True)
    indices = stacked(tf.range(count, dtype=tf.int64))
    return HeldBatches(inputs, targets, weights, indices, count)


BatchSum = Callable[[tuple[Any, Any, tf.Tensor, tf.Tensor], tuple[tf.Tensor, ...], tf.Tensor], tf.Tensor]
"""``batch_sum((inputs, targets, weights, indices), extra, vectors [L, P]) -> [L, P]``: one batch's sum of
per-example curvature products, pure TensorFlow on static shapes."""


def held_matmul(
    model: InfluenceModel,
    key: tuple[Any, ...],
    batch_sum: BatchSum,
    held: HeldBatches,
    vectors: tf.Tensor,
    extra: tuple[tf.Tensor, ...] = (),
    *,
    blocked: bool = True,
) -> tf.Tensor:
    """``(1/N) Σ_batches batch_sum(batch, v) + ∇²Ω v`` for each row ``v`` of ``vectors``, in one graph call.

    The rows are cut into blocks of a static length (at most ``model.hvp_chunk_size``, zero-padded) and the one
    ``tf.function`` loops over blocks and held batches inside the graph, so a product costs one Python-side
    dispatch whatever the number of batches and vectors. The function is shared per model, ``key``, block length
    and data signature (:meth:`InfluenceModel.shared_function`), with the batch count left unknown: a new operator
    or solver on the same model and data layout reuses its trace. Pure TensorFlow: callable inside a caller's
    ``tf.function`` too.

    Args:
        model: The wrapped model.
        key: Everything ``batch_sum`` depends on besides its tensor arguments (e.g. the curvature and its options).
        batch_sum: One batch's sum of products, see :data:`BatchSum`.
        held: The data, from :func:`hold_batches`.
        vectors: ``[n, P]``.
        extra: Tensors passed through to ``batch_sum`` (e.g. a seed).
        blocked: Whether ``batch_sum`` is called per block of vectors (vectorized over them, e.g. an HVP) or once
            per batch on all of them ``[n_padded, P]`` (e.g. a product with per-sample gradients computed once).

    Returns:
        ``[n, P]``.
    """
    num_params = model.nb_params
    rows = vectors.shape[0]
    chunk = model.hvp_chunk_size
    if rows == 0:
        return tf.zeros_like(vectors)
    # a block as long as a short request (Arnoldi: one vector) or hvp_chunk_size; one trace per length
    length = chunk if rows is None else model._static_length("vectors", min(rows, chunk), chunk)
    count = tf.shape(vectors)[0]
    num_blocks = (count + length - 1) // length
    blocks = tf.reshape(tf.pad(vectors, [[0, num_blocks * length - count], [0, 0]]), [num_blocks, length, num_params])
    data = (held.inputs, held.targets, held.weights, held.indices)
    specs = (
        held.signature(),
        tuple(tf.TensorSpec(t.shape, t.dtype) for t in extra),
        tf.TensorSpec([None, length, num_params], model.dtype),
        tf.TensorSpec([], model.dtype),
    )
    looped = tuple(sorted(model._looped))  # a graph traced before a switch to the looped twins keeps its ops

    def build() -> Callable[..., tf.Tensor]:
        def product(data: Any, extra: tuple[tf.Tensor, ...], blocks: tf.Tensor, total: tf.Tensor) -> tf.Tensor:
            def data_sum(block: tf.Tensor) -> tf.Tensor:
                return tf.foldl(
                    lambda accumulated, batch: accumulated + batch_sum(batch, extra, block),
                    data,
                    initializer=tf.zeros_like(block),
                    parallel_iterations=1,  # one batch's intermediates at a time, as when streaming
                )

            if blocked:
                summed = tf.map_fn(data_sum, blocks, parallel_iterations=1)
            else:
                summed = tf.reshape(data_sum(tf.reshape(blocks, [-1, num_params])), tf.shape(blocks))
            regularization = tf.map_fn(model.regularization_hvp, blocks, parallel_iterations=1)
            return summed / total + regularization

        return tf.function(product, input_signature=list(specs), autograph=False)

    function = model.shared_function(("held_matmul", *key, blocked, looped, repr(specs)), build)
    result = function(data, tuple(extra), blocks, tf.constant(held.num_examples, model.dtype))
    traced_with = tuple(sorted(model._looped))
    if traced_with != looped:  # its first trace switched functions to their looped twins: its graph has them
        model.shared_function(("held_matmul", *key, blocked, traced_with, repr(specs)), lambda: function)
    return tf.reshape(result, [-1, num_params])[:count]
