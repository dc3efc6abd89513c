"""The disk cache: ``manifest.json`` plus one pickle-free ``.npz`` file per shard, crash-safe and locked."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import secrets
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from influenciae.cache.files import (
    TEMPORARY_PREFIX,
    atomic_write,
    checksum_file,
    read_manifest,
    write_manifest,
    write_npz,
)
from influenciae.cache.fingerprint import describe_differences
from influenciae.cache.store import _META_NAME, _OVERWRITE_HINT, ShardCache, ShardRecord, _array_schema

try:  # POSIX; elsewhere a disk cache has no inter-process lock (one writer at a time, as before)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FORMAT_VERSION", "LOCK_NAME", "MANIFEST_NAME", "DiskCache"]

FORMAT_VERSION = 2
"""Version of the on-disk layout written in every manifest; a cache of another version is refused."""

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside a disk-cache directory."""

LOCK_NAME = ".influenciae.lock"
"""File name of the writers' lock inside a disk-cache directory (created by the cache, never deleted)."""

_MANIFEST_KIND = "influenciae.cache"
_SHARD_FILE_PATTERN = re.compile(r"^shard-(\d{6,})-([0-9a-f]{16})\.npz$")


def _meta_array(meta: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)


class DiskCache(ShardCache):
    """A :class:`ShardCache` in a directory: ``manifest.json`` plus one pickle-free ``.npz`` file per shard.

    Opening a directory that already holds a cache resumes it when its format version, configuration and
    weights fingerprint all match; otherwise a ``ValueError`` names the fields that differ. With
    ``overwrite=True`` the files the old manifest recorded are deleted (files it never recorded are left alone)
    and an empty cache starts.

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
        self._pending: set[str] = set()
        self._lock_depth = 0
        self._lock_handle: IO[bytes] | None = None
        with self._locked(reload=False):
            manifest = self._read_manifest()
            if manifest is not None and not overwrite:
                self._adopt(manifest)
                missing = [
                    record.file for record in self._records.values() if not (self._path / str(record.file)).is_file()
                ]
                if missing:
                    raise ValueError(
                        f"The cache at {self._path} lists shard files that are missing: {missing}; {_OVERWRITE_HINT}."
                    )
                self._delete_dead_writers_files()
            else:
                stale = self._recorded_files(manifest) if manifest is not None else set()
                # Writing the new manifest first is the atomic switch: the old files become unrecorded.
                self._save_state()
                for name in stale:
                    with contextlib.suppress(FileNotFoundError):
                        (self._path / name).unlink()
                self._delete_dead_writers_files()

    @property
    def path(self) -> Path:
        """The cache directory."""
        return self._path

    def __repr__(self) -> str:
        return f"DiskCache({str(self._path)!r}, shards={self.completed_shards()}, complete={self.is_complete})"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Holds the exclusive writer lock of the directory and reloads the manifest (re-entrant).

        Two processes filling one cache serialize on this lock: the second sees the shards the first recorded.

        Raises:
            ValueError: if, meanwhile, another process rebuilt the cache with other settings.
        """
        return self._locked(reload=True)

    @contextlib.contextmanager
    def _locked(self, *, reload: bool) -> Iterator[None]:
        if self._lock_depth == 0:
            handle = open(self._path / LOCK_NAME, "a+b")  # noqa: SIM115 -- closed when the outermost lock ends
            try:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                if reload:
                    manifest = self._read_manifest()
                    if manifest is not None:
                        self._adopt(manifest)
            except BaseException:
                handle.close()
                raise
            self._lock_handle = handle
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_handle is not None:
                if fcntl is not None:
                    fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
                self._lock_handle.close()
                self._lock_handle = None

    # -- hooks -----------------------------------------------------------------------------------------------

    def _location(self) -> str:
        return f"the cache at {self._path}"

    def _store(self, shard_id: int, arrays: dict[str, np.ndarray], record: ShardRecord) -> ShardRecord:
        # A fresh name per write, so a replaced shard's file stays valid until the manifest drops it; recorded as
        # pending first, so that only files this cache wrote are ever deleted.
        file_name = f"shard-{shard_id:06d}-{secrets.token_hex(8)}.npz"
        self._pending.add(file_name)
        self._save_state()
        meta = {"identity": self._identity, "shard_id": shard_id, "input_hash": record.input_hash}
        members = {**arrays, _META_NAME: _meta_array(meta)}
        checksum = atomic_write(self._path / file_name, lambda handle: write_npz(handle, members))
        return dataclasses.replace(record, file=file_name, checksum=checksum)

    def _corrupted(self, shard_id: int, record: ShardRecord, problem: str) -> ValueError:
        return ValueError(
            f"Shard {shard_id} of {self._location()} (file {record.file}) {problem}; its cached values cannot be "
            f"trusted. Rebuild the cache: {_OVERWRITE_HINT}."
        )

    def _check_meta(self, shard_id: int, record: ShardRecord, archive: Any) -> None:
        if f"{_META_NAME}.npy" not in archive.namelist():
            raise self._corrupted(shard_id, record, "has no meta record (it was not written by this cache)")
        with archive.open(f"{_META_NAME}.npy") as member:
            meta = json.loads(np.lib.format.read_array(member, allow_pickle=False).tobytes().decode())
        expected = {"identity": self._identity, "shard_id": shard_id, "input_hash": record.input_hash}
        if meta != expected:
            which = [key for key in sorted(expected) if meta.get(key) != expected[key]]
            raise self._corrupted(
                shard_id, record, f"belongs to another cache or shard (its meta record differs in {which})"
            )

    def _read_file(self, shard_id: int, record: ShardRecord) -> bytes:
        try:
            data = (self._path / str(record.file)).read_bytes()
        except OSError as error:
            raise self._corrupted(shard_id, record, f"cannot be read ({error})") from error
        if record.checksum is None or hashlib.sha256(data).hexdigest() != record.checksum:
            raise self._corrupted(shard_id, record, "does not match its checksum (truncated or modified)")
        return data

    def _verify(self, shard_id: int, record: ShardRecord) -> None:
        path = self._path / str(record.file)
        try:
            checksum = checksum_file(path)
        except OSError as error:
            raise self._corrupted(shard_id, record, f"cannot be read ({error})") from error
        if checksum != record.checksum:
            raise self._corrupted(shard_id, record, "does not match its checksum (truncated or modified)")
        try:
            with zipfile.ZipFile(path) as archive:
                self._check_meta(shard_id, record, archive)
        except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError) as error:
            if isinstance(error, ValueError) and str(error).startswith(f"Shard {shard_id} of"):
                raise
            raise self._corrupted(shard_id, record, f"cannot be parsed ({error})") from error

    def _load(self, shard_id: int, record: ShardRecord, names: list[str]) -> dict[str, np.ndarray]:
        data = self._read_file(shard_id, record)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                self._check_meta(shard_id, record, archive)
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                stored_names = set(archive.files)
                arrays = {name: archive[name] for name in names if name in stored_names}
        except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, ValueError) as error:
            if isinstance(error, ValueError) and str(error).startswith(f"Shard {shard_id} of"):
                raise
            raise self._corrupted(shard_id, record, f"cannot be parsed ({error})") from error
        if _array_schema(arrays) != {name: record.arrays[name] for name in names}:
            raise ValueError(
                f"Shard file {record.file} of {self._location()} does not match its manifest entry "
                f"({_array_schema(arrays)} vs {record.arrays}); the file was modified. {_OVERWRITE_HINT}."
            )
        return arrays

    def _save_state(self, replaced: ShardRecord | None = None) -> None:
        recorded = {record.file for record in self._records.values()}
        self._pending -= recorded
        fields = {
            "configuration": self._configuration,
            "weights_fingerprint": self._weights_fingerprint,
            "num_shards": self._num_shards,
            "num_examples": self.num_examples if self._num_shards is not None else None,
            "shards": {str(shard_id): record.to_json() for shard_id, record in sorted(self._records.items())},
            "pending_files": sorted(self._pending),
        }
        write_manifest(self._path / MANIFEST_NAME, _MANIFEST_KIND, FORMAT_VERSION, fields)
        if replaced is not None and replaced.file is not None and replaced.file not in recorded:
            with contextlib.suppress(FileNotFoundError):
                (self._path / replaced.file).unlink()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any] | None:
        """Returns the stored manifest, ``None`` if there is none; raises if it is not an influenciae one."""
        # Not ours (another kind): refused, so that even overwrite=True never deletes files another tool owns.
        return read_manifest(self._path / MANIFEST_NAME, _MANIFEST_KIND, what="an influenciae cache manifest")

    def _adopt(self, manifest: Mapping[str, Any]) -> None:
        """Takes the records of a stored manifest, after checking it was built with this cache's settings."""
        differences = self._differences(manifest)
        if differences:
            raise ValueError(
                f"The cache at {self._path} was built with other settings: "
                + "; ".join(differences)
                + f"; {_OVERWRITE_HINT}."
            )
        records = {int(key): ShardRecord.from_json(entry) for key, entry in manifest["shards"].items()}
        pending = {str(name) for name in manifest.get("pending_files", [])}
        for name in [record.file for record in records.values()] + sorted(pending):
            if not isinstance(name, str) or not _SHARD_FILE_PATTERN.match(name):
                raise ValueError(
                    f"The manifest at {self._path} names an invalid shard file {name!r}; {_OVERWRITE_HINT}."
                )
        self._records, self._pending = records, pending
        self._num_shards = manifest["num_shards"]

    @staticmethod
    def _recorded_files(manifest: Mapping[str, Any]) -> set[str]:
        """The shard files a manifest names (recorded or pending): the only files an overwrite deletes."""
        names = {str(entry.get("file")) for entry in manifest.get("shards", {}).values() if entry.get("file")}
        names |= {str(name) for name in manifest.get("pending_files", [])}
        return {name for name in names if _SHARD_FILE_PATTERN.match(name)}

    def _differences(self, manifest: Mapping[str, Any]) -> list[str]:
        """Describes each field of ``manifest`` that differs from this cache's settings."""
        differences = []
        if manifest.get("format_version") != FORMAT_VERSION:
            differences.append(
                f"format_version: cache has {manifest.get('format_version')!r}, this code writes {FORMAT_VERSION}"
            )
            return differences  # Nothing else can be compared reliably across formats.
        stored_configuration = manifest.get("configuration", {})
        differences.extend(
            difference.replace(": stored ", ": cache has ", 1)
            for difference in describe_differences(stored_configuration, self._configuration, "configuration")
        )
        if manifest.get("weights_fingerprint") != self._weights_fingerprint:
            differences.append(
                f"weights_fingerprint: cache has {str(manifest.get('weights_fingerprint'))[:16]}..., given "
                f"{self._weights_fingerprint[:16]}... (the model weights changed)"
            )
        return differences

    def _delete_dead_writers_files(self) -> None:
        """Deletes, under the lock, what an interrupted writer of this cache left: its pending shard files and
        the temporary files of the manifest and of those shards. Files the manifest never named stay."""
        recorded = {record.file for record in self._records.values()}
        dead = self._pending - recorded
        targets = dead | {MANIFEST_NAME}
        for entry in self._path.iterdir():
            name = entry.name
            leftover = name in dead or (
                name.startswith(TEMPORARY_PREFIX)
                and name.endswith(".part")
                and name[len(TEMPORARY_PREFIX) : -22] in targets
            )
            if leftover and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        if dead:
            self._pending -= dead
            self._save_state()
