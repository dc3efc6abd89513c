"""Sharded TFRecord files whose records carry their training index.

On one machine a training example is named by its position in the dataset's iteration order. Once the training set
is split into files read by many workers in any order, that position must travel with the example: each record is a
``tf.train.Example`` with

* ``index``: an ``int64`` feature, the example's training index (distinct across all files);
* ``x``, ``y`` (and optionally ``sample_weight``): bytes features holding one tensor each, serialized by
  ``tf.io.serialize_tensor`` (any dtype and shape): the schema of :func:`influenciae.io.write_tfrecords`, which
  reads these files too (it ignores ``index``).

:func:`write_sharded_tfrecords` writes arrays in this schema; :func:`decode_records` turns a list of serialized
records into ``(indices, batch)`` (what a Beam worker does with a bundle); :func:`read_tfrecords` reads files as a
batched ``tf.data.Dataset`` (the Hessian and test data of the solver state).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from influenciae._backend import tf

__all__ = [
    "INDEX_KEY",
    "write_sharded_tfrecords",
    "encode_example",
    "encode_record",
    "decode_records",
    "read_tfrecords",
    "list_files",
]

INDEX_KEY = "index"
"""Feature name of the training index carried by every record."""
_KEYS = ("x", "y", "sample_weight")


def encode_example(features: Mapping[str, Any], index: int | None = None) -> bytes:
    """One serialized ``tf.train.Example``: a bytes feature per array (``tf.io.serialize_tensor``), and the index.

    The one encoding of the library's TFRecords (these files, and :func:`influenciae.app.io.write_tfrecords`).

    Args:
        features: Feature name -> one example's array (any dtype and shape).
        index: The example's training index (an ``int64`` feature :data:`INDEX_KEY`), or None.

    Returns:
        The serialized example.
    """
    feature = {}
    if index is not None:
        feature[INDEX_KEY] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(index)]))
    for key, value in features.items():
        serialized = tf.io.serialize_tensor(tf.convert_to_tensor(np.asarray(value))).numpy()
        feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[serialized]))
    return bytes(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def encode_record(index: int, x: Any, y: Any, sample_weight: Any | None = None) -> bytes:
    """One serialized ``tf.train.Example`` of the schema above."""
    values = zip(_KEYS, (x, y, sample_weight), strict=True)
    return encode_example({key: value for key, value in values if value is not None}, index)


def write_sharded_tfrecords(
    directory: str | os.PathLike[str],
    x: Any,
    y: Any,
    sample_weight: Any | None = None,
    *,
    num_shards: int = 4,
    prefix: str = "train",
    first_index: int = 0,
) -> list[str]:
    """Write arrays as ``num_shards`` TFRecord files of contiguous examples, each record with its index.

    Args:
        directory: Created if needed.
        x: Inputs ``[N, ...]``.
        y: Targets ``[N, ...]``.
        sample_weight: Optional ``[N]``.
        num_shards: Number of files (``prefix-00000-of-00004.tfrecord``...); at most ``N``.
        prefix: File name prefix.
        first_index: Training index of ``x[0]``.

    Returns:
        The file paths, in index order.

    Example:
        >>> files = write_sharded_tfrecords("data", x_train, y_train, num_shards=8)
        >>> # influenciae score --train "data/train-*.tfrecord" ...
    """
    x, y = np.asarray(x), np.asarray(y)
    weights = None if sample_weight is None else np.asarray(sample_weight)
    if len(x) != len(y) or (weights is not None and len(weights) != len(x)):
        raise ValueError("x, y and sample_weight must have the same length.")
    if not isinstance(num_shards, int) or not 1 <= num_shards <= max(1, len(x)):
        raise ValueError(f"num_shards must be an integer in [1, {max(1, len(x))}], got {num_shards!r}.")
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, rows in enumerate(np.array_split(np.arange(len(x)), num_shards)):
        path = target / f"{prefix}-{shard:05d}-of-{num_shards:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for row in rows:
                weight = None if weights is None else weights[row]
                writer.write(encode_record(first_index + int(row), x[row], y[row], weight))
        paths.append(str(path))
    return paths


def _parse(serialized: bytes) -> dict[str, Any]:
    example = tf.train.Example.FromString(serialized)
    features = example.features.feature
    if INDEX_KEY not in features or "x" not in features or "y" not in features:
        raise ValueError(
            f"A record has features {sorted(features)}; scoring needs 'index' (int64), 'x' and 'y' (serialized "
            "tensors). Write the data with influenciae.distributed.records.write_sharded_tfrecords."
        )
    parsed: dict[str, Any] = {INDEX_KEY: int(features[INDEX_KEY].int64_list.value[0])}
    for key in _KEYS:
        if key in features:
            proto = tf.make_tensor_proto(0)
            proto.ParseFromString(features[key].bytes_list.value[0])
            parsed[key] = tf.make_ndarray(proto)
    return parsed


def decode_records(records: Sequence[bytes]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Decode serialized records into their indices and one batch, sorted by index.

    Args:
        records: Serialized ``tf.train.Example`` of the schema above.

    Returns:
        ``(indices [B] int64, (x [B, ...], y [B, ...][, sample_weight [B]]))``.

    Raises:
        ValueError: If a record lacks a feature, or only some records have sample weights.
    """
    parsed = sorted((_parse(record) for record in records), key=lambda example: example[INDEX_KEY])
    if not parsed:
        raise ValueError("decode_records got no record.")
    indices = np.array([example[INDEX_KEY] for example in parsed], np.int64)
    parts = [np.stack([example["x"] for example in parsed]), np.stack([example["y"] for example in parsed])]
    weighted = {"sample_weight" in example for example in parsed}
    if weighted == {True}:
        parts.append(np.stack([example["sample_weight"] for example in parsed]))
    elif len(weighted) > 1:
        raise ValueError("Some records have a sample_weight and others do not; give every record one, or none.")
    return indices, tuple(parts)


def list_files(pattern: str) -> list[str]:
    """Files matching a glob (or every file of a local directory), sorted; remote globs go through ``tf.io.gfile``.

    Raises:
        FileNotFoundError: If nothing matches.
    """
    if os.path.isdir(pattern):
        files = sorted(str(path) for path in Path(pattern).iterdir() if path.is_file())
    elif "://" in pattern:  # gs://, s3://, hdfs://: TensorFlow's file systems
        files = sorted(tf.io.gfile.glob(pattern))
    else:
        files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"No TFRecord file matches {pattern}.")
    return files


def read_tfrecords(pattern: str | Sequence[str], *, batch_size: int = 64, limit: int | None = None) -> tf.data.Dataset:
    """A batched ``(x, y[, sample_weight])`` dataset of the records of local files, in sorted file order.

    Args:
        pattern: A glob, a directory, or a list of files.
        batch_size: Batch size (the last batch may be partial).
        limit: Keep the first ``limit`` examples (e.g. a sample for the Hessian).
    """
    files = list_files(pattern) if isinstance(pattern, str) else [os.fspath(path) for path in pattern]
    records = tf.data.TFRecordDataset(files)
    first = next(iter(records.take(1)), None)
    if first is None:
        raise ValueError(f"The TFRecord files {files[:3]}... hold no record.")
    probe = _parse(first.numpy())
    keys = [key for key in _KEYS if key in probe]
    dtypes = {key: tf.as_dtype(probe[key].dtype) for key in keys}
    shapes = {key: probe[key].shape for key in keys}
    spec = {key: tf.io.FixedLenFeature([], tf.string) for key in keys}

    def parse(record: tf.Tensor) -> tuple[tf.Tensor, ...]:
        features = tf.io.parse_single_example(record, spec)
        return tuple(
            tf.ensure_shape(tf.io.parse_tensor(features[key], out_type=dtypes[key]), shapes[key]) for key in keys
        )

    if limit is not None:
        records = records.take(limit)
    return records.map(parse).batch(batch_size)
