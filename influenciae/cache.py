"""Caches of per-training-example results (influence vectors, self-influence, ...), in memory or on disk.

A calculator streams over a batched ``tf.data`` training set and cuts it into **shards**: shard ``s`` holds
the arrays computed from one block of consecutive batches, shard ids ``0, 1, 2, ...`` follow the dataset's
iteration order, and every array of a shard has one row per training example (``[num_rows, ...]``). Both
caches share one interface, so a calculator writes a single code path:

```python
cache = DiskCache("runs/vectors", configuration={"method": "first_order", "damping": 0.0},
                  weights_fingerprint=fingerprint_arrays(model.trainable_weights))
for shard_id, (first_index, batches) in enumerate(blocks_of_batches):
    input_hash = combine_hashes(hash_batch(batch) for batch in batches)
    if cache.has_shard(shard_id):
        cache.check_input_hash(shard_id, input_hash)      # the dataset must not have changed
        continue
    cache.write_shard(shard_id, {"vectors": vectors}, first_index=first_index, input_hash=input_hash)
cache.mark_complete(num_shards)
vectors = cache.load_all("vectors")                       # [num_train, num_params], dataset order
```

The disk format is pickle-free and crash-safe (kronfluence's "saved results carry their arguments", plus
atomicity):

- ``manifest.json`` records the format version, the calculator configuration, a fingerprint of the watched
  weights and, per completed shard, its number of rows, first training index, input hash, file name and array
  schema. Reopening with another configuration or other weights is refused unless ``overwrite=True``.
- Each shard is an uncompressed ``.npz`` written without pickle (object arrays are refused) and read back with
  ``allow_pickle=False``.
- Every file is written to a temporary file in the cache directory, flushed, ``fsync``-ed and ``os.replace``-d
  into place; the manifest is replaced only after the shard file is in place, and each write of a shard uses a
  fresh file name. A process killed at any moment therefore leaves either a complete shard recorded in the
  manifest or nothing recorded; leftover temporary and unrecorded shard files are deleted on the next open.

A disk cache assumes one writing process at a time.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import enum
import hashlib
import json
import numbers
import os
import re
import secrets
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

FORMAT_VERSION = 1
"""Version of the on-disk layout written in every manifest; a cache of another version is refused."""

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside a disk-cache directory."""

_MANIFEST_KIND = "influenciae.cache"
_TEMPORARY_PREFIX = ".influenciae-tmp-"
_SHARD_FILE_PATTERN = re.compile(r"^shard-(\d{6,})-([0-9a-f]{16})\.npz$")
_ARRAY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_OVERWRITE_HINT = "pass overwrite=True to rebuild the cache (this deletes its files) or choose another path"


# ------------------------------------------------------------------------------------------------------------
# Hashing and configuration helpers
# ------------------------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """Converts a numpy array, ``tf.Tensor``, ``tf.Variable`` or Keras variable to a host numpy array."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


def _update_hash(hasher: Any, array: np.ndarray, dtype_name: str) -> None:
    """Feeds the dtype, shape and content of ``array`` into ``hasher`` without ambiguity between arrays."""
    header = json.dumps({"dtype": dtype_name, "shape": list(array.shape)}, sort_keys=True).encode()
    hasher.update(len(header).to_bytes(8, "little"))
    hasher.update(header)
    if array.dtype.hasobject:
        # String tensors come back from TensorFlow as object arrays of bytes: hash them one by one.
        for element in array.reshape(-1):
            data = element if isinstance(element, bytes) else str(element).encode()
            hasher.update(len(data).to_bytes(8, "little"))
            hasher.update(data)
        return
    # Little-endian and C order, so the digest does not depend on the machine or on the memory layout.
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    data = np.ascontiguousarray(array).tobytes()
    hasher.update(len(data).to_bytes(8, "little"))
    hasher.update(data)


def fingerprint_arrays(arrays: Iterable[np.ndarray | tf.Tensor | Any]) -> str:
    """Returns a SHA-256 fingerprint of a sequence of arrays (dtype, shape and bytes of each, in order).

    Used for the watched weights of an ``InfluenceModel``: a cache built with other weights is refused.

    Args:
        arrays: numpy arrays, tensors or (Keras or TensorFlow) variables; their order matters.

    Returns:
        The hexadecimal SHA-256 digest.

    Example:
        >>> fingerprint_arrays([np.zeros(2, np.float32)]) == fingerprint_arrays([np.zeros(2, np.float64)])
        False
    """
    hasher = hashlib.sha256(b"influenciae.fingerprint_arrays.v1")
    count = 0
    for value in arrays:
        array = _to_numpy(value)
        if array.dtype.hasobject:
            raise ValueError(f"fingerprint_arrays got an object array (element {count}); pass numeric arrays.")
        _update_hash(hasher, array, array.dtype.str)
        count += 1
    hasher.update(count.to_bytes(8, "little"))
    return hasher.hexdigest()


def hash_batch(batch: Any) -> str:
    """Returns a SHA-256 hash of one ``tf.data`` batch: every tensor's dtype, shape and content, in order.

    The batch is flattened with ``tf.nest.flatten(batch, expand_composites=True)``, so tuples, dicts, ragged
    and sparse tensors all work. Runs eagerly (it reads tensor values).

    Args:
        batch: a nested structure of tensors or arrays, e.g. ``(inputs, targets)`` from a batched dataset.

    Returns:
        The hexadecimal SHA-256 digest.
    """
    import tensorflow as tf  # Lazy: the rest of this module, and processes that only read caches, need no TF.

    hasher = hashlib.sha256(b"influenciae.hash_batch.v1")
    leaves = tf.nest.flatten(batch, expand_composites=True)
    for leaf in leaves:
        array = _to_numpy(leaf)
        # TensorFlow dtype names, so that a numpy batch and the same batch as tensors hash the same.
        try:
            dtype_name = tf.as_dtype(leaf.dtype).name
        except TypeError:
            dtype_name = array.dtype.str
        _update_hash(hasher, array, dtype_name)
    hasher.update(len(leaves).to_bytes(8, "little"))
    return hasher.hexdigest()


def combine_hashes(hashes: Iterable[str]) -> str:
    """Combines the hashes of consecutive batches (from :func:`hash_batch`) into the input hash of one shard.

    Args:
        hashes: hexadecimal digests, in dataset order.

    Returns:
        The hexadecimal SHA-256 digest of the sequence.
    """
    hasher = hashlib.sha256(b"influenciae.combine_hashes.v1")
    for digest in hashes:
        hasher.update(digest.encode() + b"\n")
    return hasher.hexdigest()


def _canonical_value(value: Any, key_path: str) -> Any:
    """Returns the JSON-stable form of one configuration value; see :func:`canonical_configuration`."""
    if isinstance(value, enum.Enum):
        return _canonical_value(value.value, key_path)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, Mapping):
        result = {}
        for sub_key in value:
            if not isinstance(sub_key, str):
                raise TypeError(f"Configuration key {sub_key!r} in {key_path} is not a string; JSON needs string keys.")
        for sub_key in sorted(value):
            result[sub_key] = _canonical_value(value[sub_key], f"{key_path}[{sub_key!r}]")
        return result
    if isinstance(value, list | tuple):
        return [_canonical_value(item, f"{key_path}[{index}]") for index, item in enumerate(value)]
    raise TypeError(
        f"Configuration value {key_path} = {value!r} of type {type(value).__name__} is not JSON-able; use "
        "None, bool, int, float, str, an enum, or lists and string-keyed mappings of those."
    )


def canonical_configuration(configuration: Mapping[str, Any]) -> dict[str, Any]:
    """Returns a JSON-stable copy of a calculator configuration, as stored in a cache manifest.

    Keys are sorted (recursively); floats become their ``repr`` string (exact, and stable for
    ``nan``/``inf``); enums become their value; numpy scalars become Python scalars; tuples become lists.

    Args:
        configuration: a mapping from string keys to JSON-able values.

    Returns:
        A new dictionary that survives a JSON round trip unchanged.

    Raises:
        TypeError: if a key is not a string or a value is not JSON-able; the message names the key.

    Example:
        >>> canonical_configuration({"solver": "cg", "damping": 0.1})
        {'damping': '0.1', 'solver': 'cg'}
    """
    if not isinstance(configuration, Mapping):
        raise TypeError(f"configuration must be a mapping, got {type(configuration).__name__}.")
    result = _canonical_value(configuration, "configuration")
    return dict(result)


# ------------------------------------------------------------------------------------------------------------
# Shared cache logic
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """What a cache knows about one completed shard.

    Attributes:
        num_rows: number of training examples in the shard (the leading dimension of each of its arrays).
        first_index: dataset index of the shard's first training example.
        input_hash: hash of the shard's input batches, given by the writer (see :func:`hash_batch`).
        arrays: array name -> ``{"dtype": numpy dtype string, "shape": [num_rows, ...]}``.
        file: name of the shard file inside the cache directory (``None`` in memory).
    """

    num_rows: int
    first_index: int
    input_hash: str
    arrays: dict[str, dict[str, Any]]
    file: str | None = None

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
        )


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
        prepared[name] = array
    row_counts = {name: array.shape[0] for name, array in prepared.items()}
    if len(set(row_counts.values())) != 1:
        raise ValueError(f"All arrays of a shard must have the same number of rows, got {row_counts}.")
    return prepared, next(iter(row_counts.values()))


def _array_schema(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {name: {"dtype": array.dtype.str, "shape": list(array.shape)} for name, array in sorted(arrays.items())}


class ShardCache(abc.ABC):
    """Interface and shared logic of :class:`MemoryCache` and :class:`DiskCache`.

    Public methods validate and keep the bookkeeping; subclasses store and load shard arrays through the
    private hooks ``_store``, ``_load`` and ``_save_state``.
    """

    def __init__(self, configuration: Mapping[str, Any], weights_fingerprint: str) -> None:
        if not isinstance(weights_fingerprint, str):
            raise TypeError(f"weights_fingerprint must be a string, got {type(weights_fingerprint).__name__}.")
        self._configuration = canonical_configuration(configuration)
        self._weights_fingerprint = weights_fingerprint
        self._records: dict[int, ShardRecord] = {}
        self._num_shards: int | None = None

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


class MemoryCache(ShardCache):
    """A :class:`ShardCache` that keeps the shards in host memory.

    Arrays are copied when written and returned read-only by :meth:`read_shard`, so neither the writer nor a
    reader can change the cached values.

    Args:
        configuration: the calculator configuration (JSON-able; checked as for :class:`DiskCache`).
        weights_fingerprint: fingerprint of the watched weights (see :func:`fingerprint_arrays`).

    Example:
        >>> cache = MemoryCache()
        >>> cache.write_shard(0, {"self_influence": np.ones(3)}, first_index=0, input_hash="h0")
        >>> cache.load_all("self_influence").shape
        (3,)
    """

    def __init__(self, *, configuration: Mapping[str, Any] | None = None, weights_fingerprint: str = "") -> None:
        super().__init__({} if configuration is None else configuration, weights_fingerprint)
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    def _store(self, shard_id: int, arrays: dict[str, np.ndarray], record: ShardRecord) -> ShardRecord:
        stored = {}
        for name, array in arrays.items():
            copy = np.array(array, copy=True)
            copy.setflags(write=False)
            stored[name] = copy
        self._arrays[shard_id] = stored
        return record

    def _load(self, shard_id: int, record: ShardRecord, names: list[str]) -> dict[str, np.ndarray]:
        return {name: self._arrays[shard_id][name] for name in names}

    def __repr__(self) -> str:
        return f"MemoryCache(shards={self.completed_shards()}, complete={self.is_complete})"


# ------------------------------------------------------------------------------------------------------------
# Disk cache
# ------------------------------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _atomic_write(directory: Path, file_name: str, write: Any) -> None:
    """Writes ``directory / file_name`` atomically: temporary file, fsync, ``os.replace``, fsync directory.

    Args:
        directory: the cache directory (the temporary file lives there so that ``os.replace`` is atomic).
        file_name: the final file name.
        write: a callable taking the open binary file handle.
    """
    descriptor, temporary_name = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, suffix=".part", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_name, directory / file_name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary_name)
        raise
    _fsync_directory(directory)


def _write_npz(handle: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """Writes an uncompressed ``.npz`` archive with ``allow_pickle=False`` (``np.savez`` allows pickle)."""
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


class DiskCache(ShardCache):
    """A :class:`ShardCache` in a directory: ``manifest.json`` plus one pickle-free ``.npz`` file per shard.

    Opening a directory that already holds a cache resumes it when its format version, configuration and
    weights fingerprint all match; otherwise a ``ValueError`` names the fields that differ. With
    ``overwrite=True`` the cache's own files are deleted (files the cache does not own are left alone) and an
    empty cache starts.

    Args:
        path: the cache directory; created if needed.
        configuration: the calculator configuration, JSON-able (see :func:`canonical_configuration`).
        weights_fingerprint: fingerprint of the watched weights (see :func:`fingerprint_arrays`).
        overwrite: start an empty cache even if ``path`` holds one with other settings.

    Raises:
        ValueError: if ``path`` is a file, holds a ``manifest.json`` that is not an influenciae cache, holds a
            cache with other settings (and ``overwrite`` is false), or its manifest lists missing shard files.
        TypeError: if the configuration is not JSON-able.

    Example:
        >>> cache = DiskCache(tmp_path, configuration={"method": "tracin"}, weights_fingerprint="abc")
        >>> cache.write_shard(0, {"self_influence": np.ones(3)}, first_index=0, input_hash="h0")
        >>> DiskCache(tmp_path, configuration={"method": "tracin"}, weights_fingerprint="abc").is_complete
        False
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        configuration: Mapping[str, Any],
        weights_fingerprint: str,
        overwrite: bool = False,
    ) -> None:
        super().__init__(configuration, weights_fingerprint)
        self._path = Path(path)
        if self._path.exists() and not self._path.is_dir():
            raise ValueError(f"Cache path {self._path} exists and is not a directory; choose another path.")
        self._path.mkdir(parents=True, exist_ok=True)
        manifest = self._read_manifest()
        if manifest is not None and not overwrite:
            differences = self._differences(manifest)
            if differences:
                raise ValueError(
                    f"The cache at {self._path} was built with other settings: "
                    + "; ".join(differences)
                    + f"; {_OVERWRITE_HINT}."
                )
            self._records = {int(key): ShardRecord.from_json(entry) for key, entry in manifest["shards"].items()}
            self._num_shards = manifest["num_shards"]
            missing = [
                record.file for record in self._records.values() if not (self._path / str(record.file)).is_file()
            ]
            if missing:
                raise ValueError(
                    f"The cache at {self._path} lists shard files that are missing: {missing}; {_OVERWRITE_HINT}."
                )
        if manifest is None or overwrite:
            # Writing the new manifest first is the atomic switch: old shard files become unrecorded.
            self._save_state()
        self._delete_unrecorded_files()

    @property
    def path(self) -> Path:
        """The cache directory."""
        return self._path

    def __repr__(self) -> str:
        return f"DiskCache({str(self._path)!r}, shards={self.completed_shards()}, complete={self.is_complete})"

    # -- hooks -----------------------------------------------------------------------------------------------

    def _location(self) -> str:
        return f"the cache at {self._path}"

    def _store(self, shard_id: int, arrays: dict[str, np.ndarray], record: ShardRecord) -> ShardRecord:
        # A fresh name per write, so a replaced shard's file stays valid until the manifest drops it.
        file_name = f"shard-{shard_id:06d}-{secrets.token_hex(8)}.npz"
        _atomic_write(self._path, file_name, lambda handle: _write_npz(handle, arrays))
        return dataclasses.replace(record, file=file_name)

    def _load(self, shard_id: int, record: ShardRecord, names: list[str]) -> dict[str, np.ndarray]:
        with np.load(self._path / str(record.file), allow_pickle=False) as archive:
            stored_names = set(archive.files)
            arrays = {name: archive[name] for name in names if name in stored_names}
        if _array_schema(arrays) != {name: record.arrays[name] for name in names}:
            raise ValueError(
                f"Shard file {record.file} of {self._location()} does not match its manifest entry "
                f"({_array_schema(arrays)} vs {record.arrays}); the file was modified. {_OVERWRITE_HINT}."
            )
        return arrays

    def _save_state(self, replaced: ShardRecord | None = None) -> None:
        manifest = {
            "kind": _MANIFEST_KIND,
            "format_version": FORMAT_VERSION,
            "configuration": self._configuration,
            "weights_fingerprint": self._weights_fingerprint,
            "num_shards": self._num_shards,
            "shards": {str(shard_id): record.to_json() for shard_id, record in sorted(self._records.items())},
        }
        text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n"
        _atomic_write(self._path, MANIFEST_NAME, lambda handle: handle.write(text.encode()))
        if replaced is not None and replaced.file is not None:
            with contextlib.suppress(FileNotFoundError):
                (self._path / replaced.file).unlink()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any] | None:
        """Returns the stored manifest, ``None`` if there is none; raises if it is not an influenciae one."""
        manifest_path = self._path / MANIFEST_NAME
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{manifest_path} cannot be read as an influenciae cache manifest ({error}); choose another path."
            ) from error
        if not isinstance(manifest, dict) or manifest.get("kind") != _MANIFEST_KIND:
            # Not ours: even overwrite=True must not delete files another tool owns.
            raise ValueError(f"{manifest_path} is not an influenciae cache manifest; choose another path.")
        return manifest

    def _differences(self, manifest: Mapping[str, Any]) -> list[str]:
        """Describes each field of ``manifest`` that differs from this cache's settings."""

        def short(value: Any) -> str:
            text = json.dumps(value, sort_keys=True)
            return text if len(text) <= 60 else text[:57] + "..."

        differences = []
        if manifest.get("format_version") != FORMAT_VERSION:
            differences.append(
                f"format_version: cache has {manifest.get('format_version')!r}, this code writes {FORMAT_VERSION}"
            )
            return differences  # Nothing else can be compared reliably across formats.
        stored_configuration = manifest.get("configuration", {})
        for key in sorted(set(stored_configuration) | set(self._configuration)):
            stored = stored_configuration.get(key, "<missing>")
            given = self._configuration.get(key, "<missing>")
            if stored != given:
                differences.append(f"configuration[{key!r}]: cache has {short(stored)}, given {short(given)}")
        if manifest.get("weights_fingerprint") != self._weights_fingerprint:
            differences.append(
                f"weights_fingerprint: cache has {str(manifest.get('weights_fingerprint'))[:16]}..., given "
                f"{self._weights_fingerprint[:16]}... (the model weights changed)"
            )
        return differences

    def _delete_unrecorded_files(self) -> None:
        """Deletes temporary and shard files the manifest does not name (left by an interrupted writer)."""
        recorded = {record.file for record in self._records.values()}
        for entry in self._path.iterdir():
            owned = entry.name.startswith(_TEMPORARY_PREFIX) or _SHARD_FILE_PATTERN.match(entry.name)
            if owned and entry.name not in recorded and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
