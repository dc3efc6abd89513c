"""Fingerprints of everything a stored artifact depends on.

Every store of the library (the influence-vector :mod:`~influenciae.cache`, the solver state of
:mod:`~influenciae.distributed.state` and the K-FAC factors of :mod:`~influenciae.hessian.kfac`) records what its
values were computed from, with the functions of this module, and refuses to reuse them when any of it changed:

* :func:`~influenciae.model.identity.model_identity` (in the model wing, built from this module's functions): the
  loss's configuration (class and ``get_config``, or a plain function's code and closure, so ``2 * loss`` differs
  from ``loss``), the watched weights (position among the model's weights, shape, dtype and a fingerprint of their
  values), ``gradient_dtype`` and the weights' dtype;
* :func:`dataset_fingerprint`: the content of a dataset (per-example, order- and batching-invariant, or per batch);
* :func:`fingerprint_arrays`, :func:`hash_batch`, :func:`combine_hashes`: the hashing primitives;
* :func:`canonical_configuration`: the JSON-stable form in which all of it is stored and compared;

This module imports neither TensorFlow nor the rest of the package at import time (TensorFlow is imported lazily by
the functions that read tensors), so that processes that only read caches stay light.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import json
import numbers
import types
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "canonical_configuration",
    "combine_hashes",
    "dataset_fingerprint",
    "describe_differences",
    "fingerprint_arrays",
    "hash_batch",
    "loss_identity",
]

_MAX_DEPTH = 6


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
# Identities of losses, models and datasets
# ------------------------------------------------------------------------------------------------------------


def _code_digest(code: types.CodeType) -> str:
    """A digest of a code object: bytecode, constants (nested code included) and names."""
    hasher = hashlib.sha256(b"influenciae.code.v1")
    hasher.update(code.co_code)
    for constant in code.co_consts:
        text = _code_digest(constant) if isinstance(constant, types.CodeType) else repr(constant)
        hasher.update(text.encode() + b"\0")
    hasher.update(repr(code.co_names).encode())
    return hasher.hexdigest()


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a loss, callable or setting that changes when its behaviour may change."""
    if depth > _MAX_DEPTH:
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    if isinstance(value, enum.Enum):
        return _describe(value.value, depth)
    if value is None or isinstance(value, str | bool | np.bool_):
        return bool(value) if isinstance(value, np.bool_) else value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, np.ndarray):
        return {"array": fingerprint_arrays([value]) if not value.dtype.hasobject else repr(value.tolist())}
    if isinstance(value, Mapping):
        return {str(key): _describe(value[key], depth + 1) for key in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_describe(item, depth + 1) for item in value]
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if kind.startswith("tensorflow.python.data."):  # a dataset captured by a closure: its elements are not settings
        return f"<{kind}>"
    if hasattr(value, "dtype") and hasattr(value, "shape") and hasattr(value, "numpy"):  # tensors, variables
        if getattr(value.dtype, "name", str(value.dtype)) in ("variant", "resource"):  # handles have no values
            return f"<{kind}>"
        return {"array": fingerprint_arrays([value])}
    if isinstance(value, functools.partial):
        return {
            "partial": _describe(value.func, depth + 1),
            "args": _describe(list(value.args), depth + 1),
            "keywords": _describe(dict(value.keywords), depth + 1),
        }
    if isinstance(value, types.MethodType):
        return {"method": _describe(value.__func__, depth + 1), "self": _describe(value.__self__, depth + 1)}
    if isinstance(value, types.FunctionType):
        closure = [cell.cell_contents for cell in value.__closure__ or () if _cell_is_set(cell)]
        return {
            "function": f"{value.__module__}.{value.__qualname__}",
            "code": _code_digest(value.__code__),
            "defaults": _describe(list(value.__defaults__ or ()), depth + 1),
            "keyword_defaults": _describe(dict(value.__kwdefaults__ or {}), depth + 1),
            "closure": _describe(closure, depth + 1),
        }
    if isinstance(value, types.BuiltinFunctionType | types.ModuleType | type):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', getattr(value, '__name__', ''))}"
    get_config = getattr(value, "get_config", None)
    if callable(get_config):
        with contextlib.suppress(Exception):
            described: dict[str, Any] = {"class": kind, "config": _describe(get_config(), depth + 1)}
            function = getattr(value, "fn", None)  # Keras's LossFunctionWrapper keeps the function here
            if function is not None:
                described["fn"] = _describe(function, depth + 1)
            return described
    attributes = {name: item for name, item in vars(value).items()} if hasattr(value, "__dict__") else {}
    return {"class": kind, "attributes": _describe(attributes, depth + 1)}


def _cell_is_set(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 -- probing an empty closure cell raises ValueError
    except ValueError:
        return False
    return True


def loss_identity(loss_function: Any) -> dict[str, Any]:
    """Describes a loss so that another loss, or the same loss with other settings, gets another description.

    A Keras loss is described by its class and ``get_config()`` (``ignore_class``, ``from_logits``, ...; a
    ``LossFunctionWrapper`` also by its function); a plain function or lambda by its qualified name, a digest of
    its code and constants, its defaults and the values it closes over (so ``lambda y, p: 2.0 * loss(y, p)``
    differs from ``loss`` and from ``3.0 * loss``); a callable object by its class and attributes.

    Args:
        loss_function: the per-example loss of an ``InfluenceModel``.

    Returns:
        A JSON-able description (canonical: stable across processes for the same loss).
    """
    return canonical_configuration({"loss": _describe(loss_function)})


def _row_digests(batch: Any) -> list[bytes]:
    """One digest per example of a batch (every leaf's row: dtype, shape and bytes)."""
    import tensorflow as tf

    leaves = tf.nest.flatten(batch, expand_composites=True)
    arrays = [_to_numpy(leaf) for leaf in leaves]
    rows = {int(array.shape[0]) for array in arrays if array.ndim > 0}
    if len(rows) != 1:  # no common batch dimension: the batch is one "example"
        return [bytes.fromhex(hash_batch(batch))]
    hashers = [hashlib.sha256(b"influenciae.example.v1") for _ in range(rows.pop())]
    for leaf, array in zip(leaves, arrays, strict=True):
        try:
            dtype_name = tf.as_dtype(leaf.dtype).name
        except TypeError:
            dtype_name = array.dtype.str
        for index, hasher in enumerate(hashers):
            _update_hash(hasher, array[index], dtype_name)
    return [hasher.digest() for hasher in hashers]


def dataset_fingerprint(dataset: tf.data.Dataset, *, order_invariant: bool = False) -> dict[str, Any]:
    """Fingerprints the content of a batched dataset in one pass (eagerly).

    Args:
        dataset: a batched ``(inputs, targets[, sample_weight])`` dataset.
        order_invariant: hash the multiset of examples, so that the order and the batching do not matter (right
            for a Hessian dataset, whose mean does not depend on them); otherwise hash the batches in order.

    Returns:
        ``{"hash": hex digest, "num_examples": int, "num_batches": int, "order_invariant": bool}``.
    """
    num_examples = num_batches = 0
    if order_invariant:
        digests: list[bytes] = []
        for batch in dataset:
            rows = _row_digests(batch)
            digests.extend(rows)
            num_examples += len(rows)
            num_batches += 1
        hasher = hashlib.sha256(b"influenciae.dataset.multiset.v1")
        for digest in sorted(digests):
            hasher.update(digest)
        digest_text = hasher.hexdigest()
    else:
        hashes = []
        for batch in dataset:
            hashes.append(hash_batch(batch))
            num_examples += len(_row_digests(batch))
            num_batches += 1
        digest_text = combine_hashes(hashes)
    return {
        "hash": digest_text,
        "num_examples": num_examples,
        "num_batches": None if order_invariant else num_batches,
        "order_invariant": order_invariant,
    }


def describe_differences(stored: Any, given: Any, key_path: str = "") -> list[str]:
    """Lists the leaves where two canonical configurations differ, as ``path: stored X, given Y`` strings.

    Args:
        stored: the recorded configuration.
        given: the configuration of the current request.
        key_path: prefix of the paths (for recursion).

    Returns:
        One short description per differing leaf (empty when they are equal).
    """

    def short(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    if isinstance(stored, Mapping) and isinstance(given, Mapping):
        differences = []
        for key in sorted(set(stored) | set(given)):
            path = f"{key_path}[{key!r}]" if key_path else str(key)
            if key not in stored or key not in given:
                differences.append(
                    f"{path}: stored {short(stored.get(key, '<missing>'))}, given {short(given.get(key, '<missing>'))}"
                )
            else:
                differences.extend(describe_differences(stored[key], given[key], path))
        return differences
    if stored != given:
        return [f"{key_path or 'value'}: stored {short(stored)}, given {short(given)}"]
    return []
