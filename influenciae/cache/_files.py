"""The one atomic file writer and checksum of every store of the library (caches, solver state, factors).

:func:`atomic_write` writes to a temporary file with a unique name (:func:`temporary_name`), ``fsync``-s it,
``os.replace``-s it onto the target and ``fsync``-s the directory; it returns the SHA-256 checksum of what it
wrote (:func:`checksum_file`), which stores record and check on every read. No TensorFlow import.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["TEMPORARY_PREFIX", "atomic_write", "checksum_file", "temporary_name", "write_npz"]

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
