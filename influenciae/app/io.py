"""Loading what the console commands work on: a saved Keras model, its loss, and data from files or tfds.

Data sources (each gives a batched ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])`` in file order):

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

The model is a ``.keras`` (or legacy ``.h5``) file (:func:`load_model`); the loss comes from a name
(:data:`LOSSES`) or from the compiled model (:func:`resolve_loss`). :func:`scan_dataset` checks that the targets fit
the model's outputs for that loss, example by example, and records each example's label, predicted label and loss.

Every problem with the user's files or data raises :class:`InputError`, whose message is one line naming the file or
the mismatch (the console script prints it and exits with code 1).

Example:
    >>> model = load_model("model.keras")
    >>> loss = resolve_loss(model, "sparse_categorical_crossentropy", from_logits=True)
    >>> train = load_npz("train.npz", batch_size=64)
    >>> train = prepare_dataset(model, train, loss)
    >>> scan = scan_dataset(model, train, loss)  # labels, predictions and losses, checked
"""

from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from influenciae._backend import keras, tf
from influenciae.data import from_numpy, unpack_batch

__all__ = [
    "InputError",
    "LOSSES",
    "LossSpec",
    "DataSpec",
    "ScanResult",
    "require_file",
    "load_model",
    "resolve_loss",
    "load_npz",
    "load_tfrecords",
    "write_tfrecords",
    "load_tfds",
    "load_data",
    "prepare_dataset",
    "scan_dataset",
    "gather_inputs",
]

LOSSES: dict[str, str] = {
    "sparse_categorical_crossentropy": "sparse",
    "categorical_crossentropy": "categorical",
    "binary_crossentropy": "binary",
    "mse": "regression",
}
"""Loss names accepted by :func:`resolve_loss` (and the ``--loss`` flag), with the kind of targets they expect."""
_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


class InputError(ValueError):
    """A problem with the user's files or data (a missing file, targets that do not fit the model...).

    The message is one line that names the file or what mismatched; the console script prints it as is.
    """


# ---------------------------------------------------------------------- files and the model


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` as a ``Path`` if it is an existing file, else raise :class:`InputError` naming it."""
    candidate = Path(path)
    if not candidate.exists():
        raise InputError(f"{what} not found: {candidate} (no such file)")
    if not candidate.is_file():
        raise InputError(f"{what} is not a file: {candidate}")
    return candidate


def load_model(path: str | os.PathLike[str]) -> Any:
    """Load a saved Keras model (``.keras``, or a legacy ``.h5``/``.hdf5`` file) with its compiled loss.

    Raises:
        InputError: If the file is missing, has another suffix or cannot be read as a Keras model.
    """
    model_path = require_file(path, "model file")
    if model_path.suffix.lower() not in _MODEL_SUFFIXES:
        raise InputError(
            f"model file {model_path} is not a saved Keras model: expected a .keras file (model.save('model.keras')) "
            "or a legacy .h5 file"
        )
    with warnings.catch_warnings():
        # The optimizer's state is irrelevant here; Keras warns when it was saved before the optimizer was built.
        warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer.*")
        warnings.filterwarnings("ignore", message=".*compiled metrics.*")
        try:
            model = keras.models.load_model(model_path)
        except Exception as error:  # noqa: BLE001 - any failure to read the file is the user's input problem
            raise InputError(f"could not load a Keras model from {model_path}: {_first_line(error)}") from error
    outputs = getattr(model, "outputs", None)
    if outputs is not None and len(outputs) > 1:
        raise InputError(f"the model in {model_path} has {len(outputs)} outputs; the commands need a single output")
    return model


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A per-example loss and what it expects.

    Attributes:
        function: The loss ``(y_true, y_pred) -> [batch]`` (reduction none for Keras loss objects).
        name: A readable name, e.g. ``"sparse_categorical_crossentropy"`` or the compiled loss' class name.
        kind: ``"sparse"`` (class indices), ``"categorical"`` (one-hot), ``"binary"`` (targets in ``[0, 1]``),
            ``"regression"`` (targets shaped like the outputs) or ``"other"`` (not checked).
        from_logits: Whether the model outputs logits (decides the predicted class of a single binary output).
        compiled: Whether the loss is the model's compiled loss.
    """

    function: Any
    name: str
    kind: str
    from_logits: bool
    compiled: bool


def resolve_loss(model: Any, name: str | None, *, from_logits: bool = False) -> LossSpec:
    """The loss of the commands: a named one (:data:`LOSSES`) or, when ``name`` is None, the model's compiled loss.

    Args:
        model: The loaded Keras model.
        name: One of :data:`LOSSES`, or None for the compiled loss.
        from_logits: For a named cross-entropy: whether the model outputs logits (ignored by ``"mse"``).

    Raises:
        InputError: If ``name`` is None and the model was saved without a compiled loss.
        ValueError: For an unknown name.
    """
    if name is not None:
        if name not in LOSSES:
            raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.")
        kind = LOSSES[name]
        if kind == "sparse":
            function: Any = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction="none")
        elif kind == "categorical":
            function = keras.losses.CategoricalCrossentropy(from_logits=from_logits, reduction="none")
        elif kind == "binary":
            function = keras.losses.BinaryCrossentropy(from_logits=from_logits, reduction="none")
        else:
            function = keras.losses.MeanSquaredError(reduction="none")
        return LossSpec(function, name, kind, from_logits and kind != "regression", compiled=False)
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise InputError(
            "the model was saved without a compiled loss: choose one with --loss "
            f"({'|'.join(LOSSES)}) and --from-logits if it outputs logits"
        )
    if isinstance(compiled, (dict, list, tuple)):
        raise InputError("the model is compiled with several losses; choose one with --loss")
    config = compiled.get_config() if hasattr(compiled, "get_config") else {}
    raw_name = compiled if isinstance(compiled, str) else getattr(compiled, "__name__", type(compiled).__name__)
    key = str(raw_name).lower()
    canonical = {
        "sparsecategoricalcrossentropy": "sparse_categorical_crossentropy",
        "categoricalcrossentropy": "categorical_crossentropy",
        "binarycrossentropy": "binary_crossentropy",
        "meansquarederror": "mse",
        "mean_squared_error": "mse",
    }.get(key, key)
    kind = LOSSES.get(canonical, "other")
    return LossSpec(_per_example(compiled), canonical, kind, bool(config.get("from_logits", False)), compiled=True)


def _per_example(loss: Any) -> Any:
    """The compiled loss with one value per example: loss objects rebuilt with reduction none, names resolved."""
    if isinstance(loss, str):
        return keras.losses.get(loss)  # Keras' loss functions return one value per example
    if isinstance(loss, keras.losses.Loss) and getattr(loss, "reduction", None) not in (None, "none"):
        config = dict(loss.get_config())
        config["reduction"] = "none"
        return type(loss).from_config(config)
    return loss


# ---------------------------------------------------------------------- data sources


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
    return load_tfds(
        spec.location,
        split=spec.split,
        data_dir=spec.data_dir,
        download=spec.download,
        x_key=spec.x_key,
        y_key=spec.y_key,
        **options,
    )


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
    if os.path.isdir(pattern):
        files = sorted(str(p) for p in Path(pattern).iterdir() if p.is_file())
    else:
        files = sorted(glob.glob(pattern))
    if not files:
        raise InputError(f"{what} not found: no TFRecord file matches {pattern}")
    return files


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
            feature = {
                key: tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[tf.io.serialize_tensor(array[index]).numpy()])
                )
                for key, array in arrays.items()
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
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


# ---------------------------------------------------------------------- fitting data to the model


def _single_output(outputs: Any) -> tf.Tensor:
    flat = tf.nest.flatten(outputs)
    if len(flat) != 1:
        raise InputError(f"the model returns {len(flat)} outputs; the commands need a single output")
    return tf.convert_to_tensor(flat[0])


def prepare_dataset(model: Any, dataset: tf.data.Dataset, loss: LossSpec) -> tf.data.Dataset:
    """Adapt a dataset to the model: integer inputs of a float model are cast, and one-value targets ``[B]`` become
    ``[B, 1]`` for a single-output model with a binary or regression loss (what Keras' ``fit`` does implicitly).

    Args:
        model: The Keras model.
        dataset: Batched ``(inputs, targets[, sample_weight])``.
        loss: The loss (its kind decides the target reshaping).

    Returns:
        The mapped dataset (the same object when nothing needs changing).
    """
    spec = unpack_batch(dataset.element_spec)
    cast_to = None
    model_inputs = getattr(model, "inputs", None) or []
    if len(model_inputs) == 1 and not isinstance(spec.inputs, (tuple, list, dict)):
        wanted = tf.as_dtype(model_inputs[0].dtype)
        if wanted.is_floating and not spec.inputs.dtype.is_floating:
            cast_to = wanted
    reshape = False
    output_shape = _output_shape(model)
    targets = spec.targets
    if (
        loss.kind in ("binary", "regression")
        and isinstance(targets, tf.TensorSpec)
        and targets.shape.rank == 1
        and output_shape is not None
        and len(output_shape) == 2
        and output_shape[-1] == 1
    ):
        reshape = True
    if cast_to is None and not reshape:
        return dataset

    def adapt(*parts: Any) -> tuple[Any, ...]:
        inputs, targets, *rest = parts
        if cast_to is not None:
            inputs = tf.cast(inputs, cast_to)
        if reshape:
            targets = tf.reshape(targets, [-1, 1])
        return (inputs, targets, *rest)

    return dataset.map(adapt)


def _output_shape(model: Any) -> tuple[Any, ...] | None:
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) == 1:
        return tuple(outputs[0].shape)
    return None


@dataclasses.dataclass(frozen=True)
class ScanResult:
    """What one pass of the model over a dataset found.

    Attributes:
        labels: One label per example ``[N]`` (class index, or the target value, or a short text for vectors).
        predicted: The model's predicted label ``[N]`` in the same form.
        losses: Per-example losses ``[N]`` (times the sample weights), as in the training objective.
        num_outputs: The model's outputs per example.
        num_examples: ``N``.
    """

    labels: np.ndarray
    predicted: np.ndarray
    losses: np.ndarray
    num_outputs: int
    num_examples: int


def scan_dataset(model: Any, dataset: tf.data.Dataset, loss: LossSpec, *, what: str = "training") -> ScanResult:
    """Run the model over a dataset, checking that the targets fit its outputs for ``loss``.

    Checks (for the known loss kinds): class indices within ``[0, outputs)`` and integer-valued for a sparse loss,
    one-hot targets as wide as the outputs for a categorical loss, targets in ``[0, 1]`` and shaped like the outputs
    for a binary loss, targets shaped like the outputs for a regression loss.

    Args:
        model: The Keras model.
        dataset: The prepared (see :func:`prepare_dataset`) batched dataset.
        loss: The loss.
        what: ``"training"`` or ``"test"``: names the examples in error messages.

    Returns:
        The labels, predictions and losses of every example.

    Raises:
        InputError: At the first example whose target does not fit (its index and what mismatched).
    """
    labels, predicted, losses = [], [], []
    offset, num_outputs = 0, 0
    for batch in dataset:
        structure = unpack_batch(batch)
        outputs = _single_output(model(structure.inputs, training=False))
        targets = np.asarray(tf.nest.flatten(structure.targets)[0])
        prediction = outputs.numpy()
        num_outputs = int(np.prod(prediction.shape[1:])) if prediction.ndim > 1 else 1
        _check_targets(targets, prediction, loss, offset, what)
        try:
            values = tf.convert_to_tensor(loss.function(structure.targets, outputs))
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise InputError(
                f"the loss {loss.name} failed on {what} examples {offset}-{offset + len(targets) - 1} "
                f"(targets {targets.shape[1:]}, outputs {prediction.shape[1:]}): {_first_line(error)}"
            ) from error
        values = np.asarray(values, dtype=np.float64).reshape(len(targets), -1).mean(axis=1)
        if structure.sample_weight is not None:
            values = values * np.asarray(structure.sample_weight, dtype=np.float64).reshape(-1)
        labels.append(_label_column(targets, loss.kind))
        predicted.append(_predicted_column(prediction, loss))
        losses.append(values)
        offset += len(targets)
    if offset == 0:
        raise InputError(f"the {what} data holds no example")
    return ScanResult(
        labels=np.concatenate(labels),
        predicted=np.concatenate(predicted),
        losses=np.concatenate(losses),
        num_outputs=num_outputs,
        num_examples=offset,
    )


def _check_targets(targets: np.ndarray, outputs: np.ndarray, loss: LossSpec, offset: int, what: str) -> None:
    per_output = int(np.prod(outputs.shape[1:])) if outputs.ndim > 1 else 1
    per_target = int(np.prod(targets.shape[1:])) if targets.ndim > 1 else 1
    plural = "s" if per_output != 1 else ""
    if loss.kind == "sparse":
        if per_output == 1:
            raise InputError(
                f"the model has 1 output per example (a regression or binary output) but {loss.name} needs one "
                "output per class: use --loss binary_crossentropy for a binary classifier or --loss mse"
            )
        if per_target != 1:
            raise InputError(
                f"{loss.name} needs one class index per example, but the targets have shape {targets.shape[1:]}"
                + (": they look one-hot, use --loss categorical_crossentropy" if per_target == per_output else "")
            )
        flat = targets.reshape(-1)
        if not np.issubdtype(flat.dtype, np.number):
            raise InputError(f"{loss.name} needs numeric class labels, got dtype {flat.dtype}")
        bad = np.flatnonzero((flat != np.round(flat)) | (flat < 0) | (flat >= per_output))
        if bad.size:
            index = int(bad[0])
            label = flat[index]
            largest = flat.max()
            reason = (
                f"has label {label!r}, not a class index"
                if label != np.round(label)
                else f"has label {_number(label)} (labels go up to {_number(largest)} in its batch) but the model "
                f"has {per_output} outputs, classes 0-{per_output - 1}"
            )
            raise InputError(f"the model's outputs do not fit the labels: {what} example {offset + index} {reason}")
    elif loss.kind == "categorical":
        if per_target != per_output:
            detail = (
                "class indices: use --loss sparse_categorical_crossentropy"
                if per_target == 1
                else f"{per_target} columns"
            )
            raise InputError(
                f"the model's outputs do not fit the targets: {loss.name} needs one-hot targets with {per_output} "
                f"column{plural} (one per output), but the {what} targets are {detail}"
            )
    elif loss.kind in ("binary", "regression"):
        if per_target != per_output:
            raise InputError(
                f"the model's outputs do not fit the targets: the model has {per_output} output{plural} per example "
                f"but the {what} targets have {per_target} value{'s' if per_target != 1 else ''}; {loss.name} needs "
                "targets shaped like the outputs"
                + (" (class labels? use --loss sparse_categorical_crossentropy)" if per_target == 1 else "")
            )
        if loss.kind == "binary":
            rows = targets.reshape(len(targets), -1)
            bad = np.flatnonzero(np.any((rows < 0) | (rows > 1), axis=1))
            if bad.size:
                index = int(bad[0])
                raise InputError(
                    f"{loss.name} needs targets in [0, 1], but {what} example {offset + index} has "
                    f"{_number(rows[index].max() if rows[index].max() > 1 else rows[index].min())} (class labels? "
                    "use --loss sparse_categorical_crossentropy with one output per class)"
                )


def _number(value: Any) -> Any:
    value = np.asarray(value).item()
    return int(value) if float(value).is_integer() else value


def _label_column(targets: np.ndarray, kind: str) -> np.ndarray:
    flat = targets.reshape(len(targets), -1)
    if kind == "categorical" or (kind == "other" and flat.shape[1] > 1 and np.all((flat == 0) | (flat == 1))):
        return np.argmax(flat, axis=1)
    if flat.shape[1] == 1:
        values = flat[:, 0]
        if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)) and kind != "regression":
            return values.astype(np.int64)
        return values
    return np.array([" ".join(f"{v:.4g}" for v in row[:8]) + (" …" if len(row) > 8 else "") for row in flat])


def _predicted_column(outputs: np.ndarray, loss: LossSpec) -> np.ndarray:
    flat = outputs.reshape(len(outputs), -1)
    if loss.kind in ("sparse", "categorical") or (loss.kind == "other" and flat.shape[1] > 1):
        return np.argmax(flat, axis=1)
    if loss.kind == "binary":
        threshold = 0.0 if loss.from_logits else 0.5
        decided = (flat > threshold).astype(np.int64)
        return decided[:, 0] if flat.shape[1] == 1 else np.array([" ".join(map(str, row)) for row in decided])
    if flat.shape[1] == 1:
        return flat[:, 0].astype(np.float64)
    return np.array([" ".join(f"{v:.4g}" for v in row[:8]) + (" …" if len(row) > 8 else "") for row in flat])


def gather_inputs(dataset: tf.data.Dataset, indices: Sequence[int]) -> np.ndarray | None:
    """The inputs of the examples at ``indices`` (dataset order), stacked in the order of ``indices``.

    One pass over the dataset that keeps only the wanted examples. Returns None for multi-input models (their inputs
    are not one array), which reports then show without feature values.
    """
    wanted = {int(index): position for position, index in enumerate(indices)}
    if not wanted:
        return None
    found: dict[int, np.ndarray] = {}
    offset = 0
    for batch in dataset:
        inputs = unpack_batch(batch).inputs
        if isinstance(inputs, (tuple, list, dict)):
            return None
        array = np.asarray(inputs)
        for row in range(len(array)):
            if offset + row in wanted:
                found[offset + row] = array[row]
        offset += len(array)
        if len(found) == len(wanted):
            break
    return np.stack([found[int(index)] for index in indices])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
