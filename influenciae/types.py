"""Small public enums shared by calculators, caches and top-k strategies."""

from __future__ import annotations

import enum


class ORDER(enum.Enum):
    """Order of influence scores in top-k results.

    ``DESCENDING`` returns the most positive scores first (the strongest proponents, in the sign convention of
    ``docs/theory.md``); ``ASCENDING`` returns the most negative first (the strongest opponents).
    """

    DESCENDING = "descending"
    ASCENDING = "ascending"


class CACHE(enum.Enum):
    """Where a calculator keeps the influence vectors of the training set between passes.

    ``MEMORY`` keeps them in host memory, ``DISK`` writes them to an atomic, resumable on-disk cache, ``NO_CACHE``
    recomputes them for each block of test examples.
    """

    MEMORY = "memory"
    DISK = "disk"
    NO_CACHE = "no_cache"
