"""tf.data helpers: batch structure, validation, sample indices and numpy adapters, and the engine's streams.

Every dataset the library consumes yields batches ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``.
Nothing here reads private dataset attributes or trusts ``cardinality()``: datasets after ``map``, ``filter``,
``prefetch`` or ``cache``, with a partial last batch or an unknown length all behave the same.
:mod:`~influenciae.data.batches` holds the batch helpers and checks, :mod:`~influenciae.data.streams` the validated
passes the engine's internals take; every public name of both is importable from here.
"""

from influenciae.data import batches as _batches
from influenciae.data import streams as _streams
from influenciae.data.batches import *  # noqa: F403
from influenciae.data.streams import *  # noqa: F403

__all__: list[str] = []
__all__ += _batches.__all__
__all__ += _streams.__all__
