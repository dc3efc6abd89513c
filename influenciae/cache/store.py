"""The shard protocol of a cache: records, the shared bookkeeping of :class:`ShardCache`, and :func:`fill_cache`."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import numbers
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from influenciae.cache.fingerprint import _to_numpy, canonical_configuration

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["ShardCache", "ShardInput", "ShardRecord", "fill_cache"]

_META_NAME = "__meta__"
_ARRAY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_OVERWRITE_HINT = "pass overwrite=True to rebuild the cache (this deletes its files) or choose another path"


def _identity_digest(configuration: Mapping[str, Any], weights_fingerprint: str) -> str:
    """The digest written into every shard file: which cache (settings and weights) the shard belongs to."""
    text = json.dumps({"configuration": configuration, "weights": weights_fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """What a cache knows about one completed shard.

    Attributes:
        num_rows: number of training examples in the shard (the leading dimension of each of its arrays).
        first_index: dataset index of the shard's first training example.
        input_hash: hash of the shard's input batches, given by the writer (see :func:`hash_batch`).
        arrays: array name -> ``{"dtype": numpy dtype string, "shape": [num_rows, ...]}``.
        file: name of the shard file inside the cache directory (``None`` before it is stored).
        checksum: SHA-256 of the shard file's bytes (``None`` before it is stored), checked on every read.
    """

    num_rows: int
    first_index: int
    input_hash: str
    arrays: dict[str, dict[str, Any]]
    file: str | None = None
    checksum: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Returns the manifest entry of this shard."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ShardRecord:
        """Builds a record from a manifest entry."""
        return cls(
            num_rows=int(entry["num_rows"]),
            first_index=int(entry["first_index"]),
            input_hash=str(entry["input_hash"]),
            arrays={str(name): dict(spec) for name, spec in entry["arrays"].items()},
            file=None if entry.get("file") is None else str(entry["file"]),
            checksum=None if entry.get("checksum") is None else str(entry["checksum"]),
        )


@dataclasses.dataclass(frozen=True)
class ShardInput:
    """One shard of the data as :func:`fill_cache` sees it: where it is, what it hashes to, how to compute it.

    Attributes:
        shard_id: the shard's position in the dataset's iteration order (0, 1, 2, ...).
        first_index: dataset index of its first example.
        num_rows: number of examples in it.
        input_hash: hash of its input batches (:func:`combine_hashes` of :func:`hash_batch`).
        compute: returns the shard's arrays ``{name: [num_rows, ...]}``; called only if the shard is not cached.
    """

    shard_id: int
    first_index: int
    num_rows: int
    input_hash: str
    compute: Callable[[], Mapping[str, Any]]


def _check_index(value: Any, name: str) -> int:
    """Returns ``value`` as an int if it is a non-negative integer, else raises ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def _prepare_arrays(arrays: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """Converts and validates the arrays of one shard; returns them and their common number of rows."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError("arrays must be a non-empty mapping from names to arrays.")
    prepared: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not _ARRAY_NAME_PATTERN.match(name):
            raise ValueError(
                f"Array name {name!r} is not allowed: use letters, digits, '_', '.' or '-' (not starting with '.')."
            )
        array = _to_numpy(value)
        if array.dtype.hasobject:
            raise ValueError(
                f"Array {name!r} has dtype {array.dtype}: object arrays would need pickle, which caches "
                "never use. Convert it to a numeric or fixed-width string dtype."
            )
        if array.ndim == 0:
            raise ValueError(f"Array {name!r} is a scalar; shard arrays need one row per training example.")
        if name == _META_NAME:
            raise ValueError(f"Array name {_META_NAME!r} is reserved for the cache's own record; choose another.")
        prepared[name] = array
    row_counts = {name: array.shape[0] for name, array in prepared.items()}
    if len(set(row_counts.values())) != 1:
        raise ValueError(f"All arrays of a shard must have the same number of rows, got {row_counts}.")
    return prepared, next(iter(row_counts.values()))


def _array_schema(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {name: {"dtype": array.dtype.str, "shape": list(array.shape)} for name, array in sorted(arrays.items())}


class ShardCache(abc.ABC):
    """Interface and bookkeeping of a shard cache (:class:`~influenciae.cache.DiskCache` implements the storage).

    Public methods validate and keep the bookkeeping; a subclass stores and loads shard arrays through the
    private hooks ``_store``, ``_load`` and ``_save_state``. (The engine keeps in-memory results itself: a cache
    is what outlives a process.)
    """

    def __init__(self, configuration: Mapping[str, Any], weights_fingerprint: str) -> None:
        if not isinstance(weights_fingerprint, str):
            raise TypeError(f"weights_fingerprint must be a string, got {type(weights_fingerprint).__name__}.")
        self._configuration = canonical_configuration(configuration)
        self._weights_fingerprint = weights_fingerprint
        self._records: dict[int, ShardRecord] = {}
        self._num_shards: int | None = None
        self._identity = _identity_digest(self._configuration, weights_fingerprint)

    # -- hooks -----------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _store(self, shard_id: int, arrays: dict[str, np.ndarray], record: ShardRecord) -> ShardRecord:
        """Stores the arrays of a shard and returns its record (with its file name, if any)."""

    @abc.abstractmethod
    def _load(self, shard_id: int, record: ShardRecord, names: list[str]) -> dict[str, np.ndarray]:
        """Loads the arrays ``names`` of a recorded shard."""

    def _save_state(self, replaced: ShardRecord | None = None) -> None:  # noqa: B027 -- optional hook
        """Persists the records and completion; ``replaced`` is a record no longer in use (its file goes)."""

    def _location(self) -> str:
        return "this cache"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """A context holding the cache's writer lock (re-entrant; a no-op unless the storage has one).

        A disk cache takes an exclusive ``fcntl`` lock on its ``.influenciae.lock`` file and reloads its manifest,
        so the writes made inside see (and keep) what another process wrote before.
        """
        return contextlib.nullcontext()

    # -- public interface ------------------------------------------------------------------------------------

    @property
    def configuration(self) -> dict[str, Any]:
        """The canonical calculator configuration (see :func:`canonical_configuration`)."""
        return json.loads(json.dumps(self._configuration))

    @property
    def weights_fingerprint(self) -> str:
        """The fingerprint of the weights the cached results were computed with."""
        return self._weights_fingerprint

    @property
    def is_complete(self) -> bool:
        """Whether :meth:`mark_complete` was called: every shard of the training set is cached."""
        return self._num_shards is not None

    @property
    def num_examples(self) -> int:
        """The number of rows (training examples) of the cached shards."""
        return sum(record.num_rows for record in self._records.values())

    @property
    def num_shards(self) -> int | None:
        """The number of shards given to :meth:`mark_complete`, or ``None`` while the cache is incomplete."""
        return self._num_shards

    def completed_shards(self) -> list[int]:
        """Returns the ids of the shards written so far, in increasing order."""
        return sorted(self._records)

    def has_shard(self, shard_id: int) -> bool:
        """Returns whether shard ``shard_id`` is cached."""
        return shard_id in self._records

    def shard_record(self, shard_id: int) -> ShardRecord:
        """Returns the record (rows, first index, input hash, schema) of a cached shard."""
        return self._record(shard_id)

    def write_shard(
        self,
        shard_id: int,
        arrays: Mapping[str, np.ndarray | tf.Tensor],
        *,
        first_index: int,
        input_hash: str,
    ) -> None:
        """Caches the arrays computed from one shard of the training set.

        Writing a shard that is already cached replaces it. All shards must hold the same array names, with
        the same dtypes and the same shapes after the first (row) dimension.

        Args:
            shard_id: the shard's position in the dataset's iteration order (0, 1, 2, ...).
            arrays: name -> array of shape ``[num_rows, ...]``, one row per training example of the shard.
            first_index: dataset index of the shard's first training example.
            input_hash: a hash of the shard's input batches (:func:`hash_batch`, :func:`combine_hashes`),
                checked by :meth:`check_input_hash` when a computation resumes.

        Raises:
            ValueError: on an invalid id, name, object array, row-count or schema mismatch, or a completed
                cache.
        """
        shard_id = _check_index(shard_id, "shard_id")
        first_index = _check_index(first_index, "first_index")
        if not isinstance(input_hash, str):
            raise ValueError(f"input_hash must be a string, got {type(input_hash).__name__}.")
        with self.lock():
            self._write_shard(shard_id, arrays, first_index=first_index, input_hash=input_hash)

    def _write_shard(self, shard_id: int, arrays: Mapping[str, Any], *, first_index: int, input_hash: str) -> None:
        if self.is_complete:
            raise ValueError(
                f"{self._location().capitalize()} is complete ({self._num_shards} shards) and takes no more "
                f"shards. To recompute, {_OVERWRITE_HINT}."
            )
        prepared, num_rows = _prepare_arrays(arrays)
        schema = _array_schema(prepared)
        self._check_schema(shard_id, schema)
        record = ShardRecord(num_rows=num_rows, first_index=first_index, input_hash=input_hash, arrays=schema)
        record = self._store(shard_id, prepared, record)
        replaced = self._records.get(shard_id)
        self._records[shard_id] = record
        self._save_state(replaced)

    def read_shard(self, shard_id: int) -> dict[str, np.ndarray]:
        """Returns the arrays of a cached shard, as written.

        Raises:
            KeyError: if the shard is not cached.
        """
        record = self._record(shard_id)
        return self._load(shard_id, record, sorted(record.arrays))

    def check_input_hash(self, shard_id: int, input_hash: str) -> None:
        """Checks that a cached shard was computed from the same input batches as the ones given now.

        Raises:
            KeyError: if the shard is not cached.
            ValueError: if the input hash differs, i.e. the training dataset changed.
        """
        record = self._record(shard_id)
        if record.input_hash != input_hash:
            raise ValueError(
                f"Shard {shard_id} of {self._location()} was computed from other input batches (stored "
                f"input hash {record.input_hash[:16]}..., now {str(input_hash)[:16]}...): the training "
                f"dataset differs from the one this cache was built from; {_OVERWRITE_HINT}."
            )

    def mark_complete(self, num_shards: int) -> None:
        """Records that the training set has ``num_shards`` shards, all of them cached.

        Raises:
            ValueError: if shards ``0 .. num_shards - 1`` are not exactly the cached ones, or if their rows do
                not follow each other (``first_index`` of a shard must be the previous one's plus its rows).
        """
        num_shards = _check_index(num_shards, "num_shards")
        with self.lock():
            self._mark_complete(num_shards)

    def _mark_complete(self, num_shards: int) -> None:
        expected = list(range(num_shards))
        if self.completed_shards() != expected:
            missing = sorted(set(expected) - set(self._records))
            extra = sorted(set(self._records) - set(expected))
            raise ValueError(
                f"Cannot mark {self._location()} complete with {num_shards} shards: missing shards "
                f"{missing}, unexpected shards {extra}."
            )
        for shard_id in expected[1:]:
            previous = self._records[shard_id - 1]
            if self._records[shard_id].first_index != previous.first_index + previous.num_rows:
                end = previous.first_index + previous.num_rows
                raise ValueError(
                    f"Shard {shard_id} starts at training index {self._records[shard_id].first_index} but "
                    f"shard {shard_id - 1} ends at {end}: shards must cover consecutive training indices."
                )
        self._num_shards = num_shards
        self._save_state()

    def verify_shard(self, shard_id: int) -> None:
        """Checks that a cached shard is intact (on disk: its file's checksum and meta record).

        Raises:
            KeyError: if the shard is not cached.
            ValueError: if the shard file is missing, truncated, modified or belongs to another cache or shard.
        """
        self._verify(shard_id, self._record(shard_id))

    def _verify(self, shard_id: int, record: ShardRecord) -> None:  # noqa: B027 -- optional hook
        """Hook of :meth:`verify_shard`."""

    def iter_shards(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields ``(shard_id, arrays)`` for each cached shard in increasing order, one shard at a time."""
        for shard_id in self.completed_shards():
            yield shard_id, self.read_shard(shard_id)

    def load_all(self, name: str) -> np.ndarray:
        """Concatenates one array over all shards, in dataset order.

        Args:
            name: the array name given to :meth:`write_shard`.

        Returns:
            An array ``[total_rows, ...]``; row ``i`` belongs to training index ``first_index(shard 0) + i``.

        Raises:
            ValueError: if no shard is cached, the cached shard ids have gaps, or the name is unknown.
        """
        shard_ids = self.completed_shards()
        if not shard_ids:
            raise ValueError(f"{self._location().capitalize()} holds no shard yet.")
        if shard_ids != list(range(len(shard_ids))):
            raise ValueError(
                f"{self._location().capitalize()} holds shards {shard_ids}, not consecutive from 0; write "
                "the missing shards before loading."
            )
        first = self._records[0].arrays
        if name not in first:
            raise ValueError(f"No array named {name!r}; the cache holds {sorted(first)}.")
        # Filled in place rather than concatenated, so peak memory is the result plus one shard.
        total_rows = sum(self._records[shard_id].num_rows for shard_id in shard_ids)
        result = np.empty([total_rows, *first[name]["shape"][1:]], dtype=np.dtype(first[name]["dtype"]))
        row = 0
        for shard_id in shard_ids:
            record = self._records[shard_id]
            result[row : row + record.num_rows] = self._load(shard_id, record, [name])[name]
            row += record.num_rows
        return result

    # -- helpers ---------------------------------------------------------------------------------------------

    def _record(self, shard_id: int) -> ShardRecord:
        if shard_id not in self._records:
            raise KeyError(f"Shard {shard_id} is not in {self._location()}; cached shards: {self.completed_shards()}.")
        return self._records[shard_id]

    def _check_schema(self, shard_id: int, schema: dict[str, dict[str, Any]]) -> None:
        """Checks that a new shard has the array names, dtypes and row shapes of the shards already cached."""
        others = [record for other_id, record in sorted(self._records.items()) if other_id != shard_id]
        if not others:
            return
        reference = others[0].arrays

        def signature(arrays: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, list[int]]]:
            return {name: (spec["dtype"], list(spec["shape"][1:])) for name, spec in arrays.items()}

        if signature(schema) != signature(reference):
            raise ValueError(
                f"Shard {shard_id} has arrays {signature(schema)} (name: (dtype, shape after rows)) but the "
                f"cached shards have {signature(reference)}."
            )


def fill_cache(cache: ShardCache, shards: Iterable[ShardInput]) -> None:
    """Resumes, completes or reuses a cache for the shards of the data given now, under the cache's lock.

    Every shard of the data is hashed and compared with the cached one (input hash, first index, rows), not only
    the first; missing shards are computed and written; a complete cache must hold exactly the shards and the
    number of examples of the data, and every cached file is checked (checksum and meta record) before it is
    reused, so that a corrupted file is reported here, eagerly, rather than inside a later ``tf.data`` pipeline.

    Args:
        cache: the cache to fill (a :class:`~influenciae.cache.DiskCache`).
        shards: the shards of the data in order, as :class:`ShardInput` (computed lazily).

    Raises:
        ValueError: if the data differs from the data the cache was built from (another example anywhere, more or
            fewer examples), or a cached shard file is corrupted; the message says how to rebuild.
    """
    with cache.lock():
        complete = cache.is_complete
        seen = rows = 0
        for shard in shards:
            seen += 1
            rows += shard.num_rows
            if cache.has_shard(shard.shard_id):
                cache.check_input_hash(shard.shard_id, shard.input_hash)
                record = cache.shard_record(shard.shard_id)
                if (record.num_rows, record.first_index) != (shard.num_rows, shard.first_index):
                    raise ValueError(
                        f"Shard {shard.shard_id} of {cache._location()} holds {record.num_rows} examples from index "
                        f"{record.first_index}, the data now {shard.num_rows} from index {shard.first_index}: the "
                        f"training dataset changed since the cache was built; {_OVERWRITE_HINT}."
                    )
                continue
            if complete:
                raise ValueError(
                    f"The training set has more examples than {cache._location()} holds: the cache is complete "
                    f"with {cache.num_examples} examples in {cache.num_shards} shards, and the data goes on with "
                    f"shard {shard.shard_id} from index {shard.first_index}. The training dataset changed since "
                    f"the cache was built; {_OVERWRITE_HINT}."
                )
            cache.write_shard(
                shard.shard_id, shard.compute(), first_index=shard.first_index, input_hash=shard.input_hash
            )
        if not complete:
            cache.mark_complete(seen)
            return
        if seen != cache.num_shards or rows != cache.num_examples:
            raise ValueError(
                f"The training set has {rows} examples in {seen} shards, but {cache._location()} holds "
                f"{cache.num_examples} examples in {cache.num_shards} shards: the training dataset changed since "
                f"the cache was built; {_OVERWRITE_HINT}."
            )
        for shard_id in cache.completed_shards():
            cache.verify_shard(shard_id)
