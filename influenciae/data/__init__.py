"""tf.data helpers: batch structure, validation, sample indices and numpy adapters, and the engine's streams.

Every dataset the library consumes yields batches ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``.
Nothing here reads private dataset attributes or trusts ``cardinality()``: datasets after ``map``, ``filter``,
``prefetch`` or ``cache``, with a partial last batch or an unknown length all behave the same.
:mod:`~influenciae.data.batches` holds the batch helpers and checks, :mod:`~influenciae.data.streams` the validated
passes the engine's internals take.
"""

from influenciae.data.batches import (
    Batch,
    CheckedBatches,
    TensorBatches,
    batch_checks,
    batch_size_of,
    check_dataset,
    check_stable_order,
    checked_iteration,
    from_numpy,
    iterate_batches,
    sparse_classes,
    split_batch,
    unpack_batch,
    with_checks,
    with_indices,
)
from influenciae.data.streams import IndexedStream, Stream, TensorStream, check_first_batch, stream_dataset

__all__ = [
    "Batch",
    "unpack_batch",
    "check_dataset",
    "batch_size_of",
    "split_batch",
    "from_numpy",
    "with_indices",
    "iterate_batches",
    "check_stable_order",
    "with_checks",
    "checked_iteration",
    "CheckedBatches",
    "sparse_classes",
    "IndexedStream",
    "TensorBatches",
    "TensorStream",
    "Stream",
    "batch_checks",
    "check_first_batch",
    "stream_dataset",
]
