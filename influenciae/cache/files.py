"""The files of every store of the library (caches, K-FAC factors, solver states, CAVs): one atomic writer, one
pickle-free array format and one manifest format.

* :func:`atomic_write` writes to a temporary file with a unique name (:func:`temporary_name`), ``fsync``-s it,
  ``os.replace``-s it onto the target and ``fsync``-s the directory; it returns the SHA-256 checksum of what it
  wrote (:func:`checksum_file`), which stores record and check on every read.
* :func:`write_npz`: an uncompressed ``.npz`` archive without pickle.
* A **manifest** is a JSON object whose ``kind`` names the store (``"influenciae.cache"``,
  ``"influenciae.solver_state"``, ...) and whose ``format_version`` its layout, next to the store's own fields;
  :func:`manifest_bytes` writes it (sorted keys, no NaN) and :func:`parse_manifest` reads it and refuses another
  kind. A manifest lives in a ``.json`` file (:func:`write_manifest`, :func:`read_manifest`) or, for a one-file
  store, inside its ``.npz`` as a ``uint8`` member (:func:`manifest_array`).

No TensorFlow import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "TEMPORARY_PREFIX",
    "atomic_write",
    "checksum_file",
    "manifest_array",
    "manifest_bytes",
    "parse_manifest",
    "read_manifest",
    "temporary_name",
    "write_manifest",
    "write_npz",
]

TEMPORARY_PREFIX = ".influenciae-tmp-"
"""Prefix of the temporary files :func:`atomic_write` creates next to their target."""


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


def temporary_name(file_name: str) -> str:
    """Returns a fresh temporary name for ``file_name``: ``.influenciae-tmp-<file_name>-<random>.part``.

    The random part makes the names of two writers (two processes, or two threads) of the same target distinct,
    so neither can overwrite or delete the other's file in flight.
    """
    return f"{TEMPORARY_PREFIX}{file_name}-{secrets.token_hex(8)}.part"


def checksum_file(path: str | os.PathLike[str]) -> str:
    """Returns the SHA-256 hexadecimal digest of a file's bytes (read in 1 MiB blocks)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any] | bytes) -> str:
    """Writes a file atomically and returns the SHA-256 checksum of its content.

    The content goes to a temporary file with a unique name (:func:`temporary_name`) in the target's directory,
    is flushed and ``fsync``-ed, checksummed, then ``os.replace``-d onto the target, and the directory is
    ``fsync``-ed. A process killed at any moment leaves the old file or the new one, never a partial one; the
    temporary file is removed on an exception.

    Args:
        path: the target file; its directory must exist.
        write: the bytes to write, or a callable taking the open binary file handle.

    Returns:
        The hexadecimal SHA-256 digest of the bytes written.
    """
    target = Path(path)
    temporary = target.parent / temporary_name(target.name)
    try:
        with open(temporary, "xb") as handle:
            if isinstance(write, bytes | bytearray):
                handle.write(write)
            else:
                write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        checksum = checksum_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(target.parent)
    return checksum


def write_npz(handle: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """Writes an uncompressed ``.npz`` archive with ``allow_pickle=False`` (``np.savez`` allows pickle).

    Args:
        handle: an open binary file (e.g. the one :func:`atomic_write` passes).
        arrays: member name -> array (any shape; object arrays are refused by numpy).
    """
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def manifest_bytes(kind: str, format_version: int, fields: Mapping[str, Any], *, indent: int | None = 1) -> bytes:
    """The manifest of a store: ``{"kind": kind, "format_version": format_version, **fields}`` as JSON bytes.

    Args:
        kind: The store's kind, e.g. ``"influenciae.cache"``.
        format_version: The version of the store's layout.
        fields: The store's own JSON-able fields (no NaN).
        indent: JSON indentation (``None``: one line).

    Returns:
        UTF-8 JSON with sorted keys, ending with a newline when indented.
    """
    document = {**fields, "kind": kind, "format_version": format_version}
    text = json.dumps(document, indent=indent, sort_keys=True, allow_nan=False)
    return (text + "\n" if indent is not None else text).encode()


def parse_manifest(data: bytes | str, kind: str, *, source: str, what: str) -> dict[str, Any]:
    """Reads manifest bytes written by :func:`manifest_bytes`; refuses what is not JSON or of another kind.

    Args:
        data: The bytes (or text).
        kind: The expected kind.
        source: Where the bytes come from, for the messages (a path).
        what: What the manifest is, for the messages (``"an influenciae cache manifest"``).

    Returns:
        The manifest (its ``format_version`` is the caller's to check).

    Raises:
        ValueError: ``"<source> cannot be read as <what> (...)"`` or ``"<source> is not <what>"``.
    """
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{source} cannot be read as {what} ({error}); choose another path.") from error
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        raise ValueError(f"{source} is not {what}; choose another path.")
    return manifest


def write_manifest(path: str | os.PathLike[str], kind: str, format_version: int, fields: Mapping[str, Any]) -> str:
    """Writes a manifest file atomically (:func:`manifest_bytes`, :func:`atomic_write`); returns its checksum."""
    return atomic_write(path, manifest_bytes(kind, format_version, fields))


def read_manifest(path: str | os.PathLike[str], kind: str, *, what: str) -> dict[str, Any] | None:
    """The manifest file at ``path`` (:func:`parse_manifest`), or ``None`` when there is none.

    Raises:
        ValueError: If the file cannot be read, is not JSON or is of another kind.
    """
    target = Path(path)
    if not target.exists():
        return None
    try:
        data = target.read_bytes()
    except OSError as error:
        raise ValueError(f"{target} cannot be read as {what} ({error}); choose another path.") from error
    return parse_manifest(data, kind, source=str(target), what=what)


def manifest_array(kind: str, format_version: int, fields: Mapping[str, Any]) -> np.ndarray:
    """A manifest as a ``uint8`` array, the member of a one-file ``.npz`` store (read back with ``.tobytes()``)."""
    return np.frombuffer(manifest_bytes(kind, format_version, fields, indent=None), dtype=np.uint8)
