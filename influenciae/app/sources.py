"""The data sources of the console commands: ``.npz`` files, TFRecord files and TensorFlow Datasets.

Each gives a batched ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])`` in file order:

* ``.npz`` (:func:`load_npz`): arrays ``x`` and ``y`` (other names with ``x_key``/``y_key``), optionally per-example
  weights (``weight_key``), all with the same first dimension.
* TFRecord files (:func:`load_tfrecords`): a glob (or a directory), files read in sorted order. Each record is a
  ``tf.train.Example`` whose features ``x``, ``y`` (and optionally the weight) are either

  - a bytes feature holding one serialized tensor (``tf.io.serialize_tensor``): any dtype and shape, found from the
    first record. :func:`write_tfrecords` writes this schema from numpy arrays;
  - a ``float_list`` or ``int64_list`` of fixed length: the inputs are reshaped to ``x_shape`` when given (flat
    vectors otherwise) and a one-value target becomes a scalar.

* TensorFlow Datasets (:func:`load_tfds`): ``tfds.load(name, split=..., data_dir=..., download=False)``, with the
  dataset's supervised keys unless ``x_key``/``y_key`` name features.

:func:`load_data` reads the source a :class:`DataSpec` describes. Every problem with the user's files raises
:class:`InputError`, one line naming the file (the console script prints it and exits with code 1).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import from_numpy
from influenciae.distributed.records import encode_example, list_files

__all__ = [
    "InputError",
    "require_file",
    "DataSpec",
    "load_data",
    "load_npz",
    "load_tfrecords",
    "write_tfrecords",
    "load_tfds",
]


class InputError(ValueError):
    """A problem with the user's files or data (a missing file, targets that do not fit the model...).

    The message is one line that names the file or what mismatched; the console script prints it as is.
    """


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` as a ``Path`` if it is an existing file, else raise :class:`InputError` naming it."""
    candidate = Path(path)
    if not candidate.exists():
        raise InputError(f"{what} not found: {candidate} (no such file)")
    if not candidate.is_file():
        raise InputError(f"{what} is not a file: {candidate}")
    return candidate


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a dataset comes from and how to read it (see the module docstring).

    Attributes:
        source: ``"npz"``, ``"tfrecord"`` or ``"tfds"``.
        location: The ``.npz`` path, the TFRecord glob or the tfds name.
        x_key: Inputs' array / feature name (None: ``"x"``, or the tfds supervised keys).
        y_key: Targets' array / feature name (None: ``"y"``, or the tfds supervised keys).
        weight_key: Optional per-example weights' array / feature name.
        x_shape: Shape of each input for TFRecord numeric-list features.
        split: tfds split.
        data_dir: tfds data directory.
        download: Let tfds download and prepare the dataset.
        limit: Keep only the first ``limit`` examples.
    """

    source: str
    location: str
    x_key: str | None = None
    y_key: str | None = None
    weight_key: str | None = None
    x_shape: tuple[int, ...] | None = None
    split: str = "train"
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.source not in ("npz", "tfrecord", "tfds"):
            raise ValueError(f"source must be 'npz', 'tfrecord' or 'tfds', got {self.source!r}.")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise ValueError(f"limit must be a positive integer or None, got {self.limit!r}.")

    def describe(self) -> str:
        """One line for reports, e.g. ``"npz train.npz (x, y)"`` or ``"tfds iris[train]"``."""
        if self.source == "tfds":
            text = f"tfds {self.location}[{self.split}]" + (f" from {self.data_dir}" if self.data_dir else "")
        else:
            text = f"{self.source} {self.location} ({self.x_key or 'x'}, {self.y_key or 'y'})"
        return text + (f", first {self.limit} examples" if self.limit else "")

    def check_exists(self, what: str) -> None:
        """Raise :class:`InputError` if a file source is missing (before any heavy work)."""
        if self.source == "npz":
            require_file(self.location, f"{what} file")
        elif self.source == "tfrecord":
            _tfrecord_files(self.location, what)


def load_data(spec: DataSpec, *, batch_size: int, what: str = "data") -> tf.data.Dataset:
    """The batched dataset described by ``spec`` (``what`` names it in error messages, e.g. ``"test data"``)."""
    options: dict[str, Any] = {
        "weight_key": spec.weight_key,
        "batch_size": batch_size,
        "limit": spec.limit,
        "what": what,
    }
    if spec.source == "npz":
        return load_npz(spec.location, x_key=spec.x_key or "x", y_key=spec.y_key or "y", **options)
    if spec.source == "tfrecord":
        return load_tfrecords(
            spec.location, x_key=spec.x_key or "x", y_key=spec.y_key or "y", x_shape=spec.x_shape, **options
        )
    options.update(split=spec.split, data_dir=spec.data_dir, download=spec.download, x_key=spec.x_key, y_key=spec.y_key)
    return load_tfds(spec.location, **options)


def load_npz(
    path: str | os.PathLike[str],
    *,
    x_key: str = "x",
    y_key: str = "y",
    weight_key: str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    what: str = "data",
) -> tf.data.Dataset:
    """A batched dataset from the arrays of an ``.npz`` file (``np.savez(path, x=..., y=...)``).

    Args:
        path: The ``.npz`` file.
        x_key: Name of the inputs array ``[N, ...]``.
        y_key: Name of the targets array ``[N, ...]``.
        weight_key: Name of an optional per-example weights array ``[N]``.
        batch_size: Batch size (the last batch may be partial).
        limit: Keep the first ``limit`` examples.
        what: Names the data in error messages.

    Raises:
        InputError: Missing file, missing array, arrays of different lengths, or a file numpy cannot read.
    """
    file = require_file(path, f"{what} file")
    try:
        with np.load(file, allow_pickle=False) as archive:
            names = list(archive.files)
            wanted = [key for key in (x_key, y_key, weight_key) if key is not None]
            missing = [key for key in wanted if key not in names]
            if missing:
                raise InputError(
                    f"{file} has no array {missing[0]!r} (it holds {', '.join(names) or 'nothing'}); "
                    "name the arrays with --x-key/--y-key/--weight-key"
                )
            arrays = {key: archive[key] for key in wanted}
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt or non-npz file
        raise InputError(f"could not read {file} as an .npz file: {_first_line(error)}") from error
    lengths = {key: len(array) if array.ndim else 0 for key, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"the arrays of {file} have different lengths: {lengths}")
    if lengths[x_key] == 0:
        raise InputError(f"{file} holds no examples (array {x_key!r} is empty)")
    if limit is not None:
        arrays = {key: array[:limit] for key, array in arrays.items()}
    weights = arrays.get(weight_key) if weight_key is not None else None
    return from_numpy(arrays[x_key], arrays[y_key], sample_weight=weights, batch_size=batch_size)


def _tfrecord_files(pattern: str, what: str) -> list[str]:
    try:
        return list_files(pattern)
    except FileNotFoundError:
        raise InputError(f"{what} not found: no TFRecord file matches {pattern}") from None


def load_tfrecords(
    pattern: str,
    *,
    x_key: str = "x",
    y_key: str = "y",
    weight_key: str | None = None,
    x_shape: Sequence[int] | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    what: str = "data",
) -> tf.data.Dataset:
    """A batched dataset from TFRecord files of ``tf.train.Example`` (schema in the module docstring).

    Args:
        pattern: A glob (``"data/train-*.tfrecord"``), one file, or a directory (all its files).
        x_key: Feature holding the inputs.
        y_key: Feature holding the targets.
        weight_key: Optional feature holding per-example weights.
        x_shape: Shape of one input when ``x_key`` is a numeric list (e.g. ``(8, 8, 1)``).
        batch_size: Batch size.
        limit: Keep the first ``limit`` records.
        what: Names the data in error messages.

    Raises:
        InputError: No matching file, a missing feature, or a feature in another format.
    """
    files = _tfrecord_files(pattern, what)
    records = tf.data.TFRecordDataset(files)
    try:
        first = next(iter(records.take(1)), None)
    except tf.errors.OpError as error:
        raise InputError(f"could not read TFRecord file {files[0]}: {_first_line(error)}") from error
    if first is None:
        raise InputError(f"the TFRecord files matching {pattern} hold no record")
    try:
        example = tf.train.Example.FromString(first.numpy())
    except Exception as error:  # noqa: BLE001 - not an Example
        raise InputError(f"the records of {files[0]} are not tf.train.Example protos: {_first_line(error)}") from error
    keys = [(x_key, "x"), (y_key, "y")] + ([(weight_key, "w")] if weight_key is not None else [])
    decoders = {role: _feature_decoder(example, key, files[0], role, x_shape) for key, role in keys}
    spec = {key: decoders[role][0] for key, role in keys}

    def parse(record: tf.Tensor) -> tuple[Any, ...]:
        features = tf.io.parse_single_example(record, spec)
        parts = [decoders[role][1](features[key]) for key, role in keys]
        return tuple(parts)

    if limit is not None:
        records = records.take(limit)
    return records.map(parse).batch(batch_size)


def _feature_decoder(example: Any, key: str, file: str, role: str, x_shape: Sequence[int] | None) -> tuple[Any, Any]:
    """``(parse spec, decode function)`` of feature ``key`` (role ``"x"``, ``"y"`` or ``"w"``) from its first record."""
    features = example.features.feature
    if key not in features:
        raise InputError(
            f"the records of {file} have no feature {key!r} (they have {', '.join(sorted(features)) or 'none'}); "
            "name the features with --x-key/--y-key/--weight-key"
        )
    feature = features[key]
    kind = feature.WhichOneof("kind")
    if kind == "bytes_list":
        values = feature.bytes_list.value
        proto = tf.make_tensor_proto(0)
        try:
            proto.ParseFromString(values[0] if len(values) == 1 else b"")
        except Exception:  # noqa: BLE001 - reported below
            proto.dtype = 0
        if len(values) != 1 or proto.dtype == 0:
            raise InputError(
                f"feature {key!r} of {file} is a bytes feature but not one serialized tensor (tf.io.serialize_tensor); "
                "write the records with influenciae.app.io.write_tfrecords or use numeric-list features"
            )
        dtype = tf.as_dtype(proto.dtype)
        tensor_shape = tf.TensorShape([dim.size for dim in proto.tensor_shape.dim])

        def decode_tensor(value: tf.Tensor) -> tf.Tensor:
            return tf.ensure_shape(tf.io.parse_tensor(value, out_type=dtype), tensor_shape)

        return tf.io.FixedLenFeature([], tf.string), decode_tensor
    if kind in ("float_list", "int64_list"):
        length = len(getattr(feature, kind).value)
        dtype = tf.float32 if kind == "float_list" else tf.int64
        if role == "x":
            target_shape = [length] if x_shape is None else list(x_shape)
            if int(np.prod(target_shape)) != length:
                raise InputError(
                    f"--x-shape {tuple(target_shape)} does not fit the {length} values of feature {key!r} in {file}"
                )
        else:  # a one-value target or weight is a scalar per example
            target_shape = [] if length == 1 else [length]

        def decode_list(value: tf.Tensor) -> tf.Tensor:
            return tf.reshape(value, target_shape)

        return tf.io.FixedLenFeature([length], dtype), decode_list
    raise InputError(f"feature {key!r} of {file} is empty")


def write_tfrecords(
    path: str | os.PathLike[str],
    x: Any,
    y: Any,
    sample_weight: Any | None = None,
    *,
    x_key: str = "x",
    y_key: str = "y",
    weight_key: str = "sample_weight",
) -> Path:
    """Write arrays as one TFRecord file that :func:`load_tfrecords` (and ``--tfrecords``) reads back exactly.

    Each record is a ``tf.train.Example`` with one bytes feature per array holding that example's slice serialized
    by ``tf.io.serialize_tensor`` (dtype and shape preserved).

    Args:
        path: The file to write (parent directories are created).
        x: Inputs ``[N, ...]``.
        y: Targets ``[N, ...]``.
        sample_weight: Optional weights ``[N]``.
        x_key: Feature name of the inputs.
        y_key: Feature name of the targets.
        weight_key: Feature name of the weights.

    Returns:
        The path written.

    Example:
        >>> write_tfrecords("data/train.tfrecord", x_train, y_train)
        >>> # influenciae self-influence --model model.keras --tfrecords "data/train.tfrecord"
    """
    arrays = {x_key: np.asarray(x), y_key: np.asarray(y)}
    if sample_weight is not None:
        arrays[weight_key] = np.asarray(sample_weight)
    lengths = {key: len(array) for key, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"x, y and sample_weight must have the same length, got {lengths}.")
    if len(arrays) != len({x_key, y_key, *([weight_key] if sample_weight is not None else [])}):
        raise ValueError("x_key, y_key and weight_key must be different feature names.")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        for index in range(lengths[x_key]):
            writer.write(encode_example({key: array[index] for key, array in arrays.items()}))
    return target


def load_tfds(
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    download: bool = False,
    x_key: str | None = None,
    y_key: str | None = None,
    weight_key: str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    what: str = "data",
) -> tf.data.Dataset:
    """A batched dataset from TensorFlow Datasets, in the split's stored order.

    Args:
        name: The tfds name (``"mnist"``, ``"iris:2.1.0"``...).
        split: The split (``"train"``, ``"test[:10%]"``...).
        data_dir: Where the prepared dataset lives (tfds' default when None).
        download: Let tfds download and prepare it when absent (off by default: nothing leaves the machine).
        x_key: Feature of the inputs; with ``y_key`` None for both, the dataset's supervised keys are used.
        y_key: Feature of the targets.
        weight_key: Optional feature of per-example weights.
        batch_size: Batch size.
        limit: Keep the first ``limit`` examples.
        what: Names the data in error messages.

    Raises:
        InputError: tfds missing, the dataset not prepared in ``data_dir`` (with ``download=False``), or a missing
            feature.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:  # pragma: no cover - tensorflow-datasets is a dependency
        raise InputError("--tfds needs tensorflow-datasets: pip install tensorflow-datasets") from error
    if (x_key is None) != (y_key is None):
        raise InputError("for a tfds dataset give both --x-key and --y-key, or neither (the supervised keys)")
    supervised = x_key is None
    location = f" in {data_dir}" if data_dir else ""
    try:
        dataset = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            as_supervised=supervised,
            shuffle_files=False,
        )
    except Exception as error:  # noqa: BLE001 - tfds raises many types for "not there"
        hint = "" if download else " (it is not downloaded: prepare it, or pass --download)"
        raise InputError(
            f"could not load tfds dataset {name!r} split {split!r}{location}{hint}: {_first_line(error)}"
        ) from error
    if supervised:
        if weight_key is not None:
            raise InputError("--weight-key with a tfds dataset needs --x-key and --y-key too (feature names)")
        structure = dataset.element_spec
        if not isinstance(structure, tuple) or len(structure) != 2:
            raise InputError(f"tfds dataset {name!r} has no supervised keys: name the features with --x-key/--y-key")
    else:
        features = dataset.element_spec
        wanted = [key for key in (x_key, y_key, weight_key) if key is not None]
        missing = [key for key in wanted if key not in features]
        if missing:
            raise InputError(
                f"tfds dataset {name!r} has no feature {missing[0]!r} (features: {', '.join(sorted(features))})"
            )
        keys = tuple(wanted)
        dataset = dataset.map(lambda element: tuple(element[key] for key in keys))
    if limit is not None:
        dataset = dataset.take(limit)
    return dataset.batch(batch_size)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
