"""Tests of influenciae.cache: round trip, resume, stale caches, changed datasets, no pickle, SIGKILL."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import influenciae.cache as cache_module
from influenciae.cache import (
    MANIFEST_NAME,
    DiskCache,
    ShardCache,
    canonical_configuration,
    combine_hashes,
    fingerprint_arrays,
    hash_batch,
)

CONFIGURATION = {"method": "first_order", "solver": "cg", "damping": 0.01, "num_iters": 30}
FINGERPRINT = fingerprint_arrays([np.arange(6.0).reshape(2, 3), np.ones(3, np.float32)])

# One source for the shard contents, executed here and in the child processes of the kill tests.
MAKE_ARRAYS_SOURCE = textwrap.dedent(
    """
    def make_arrays(shard_id, num_rows, num_params):
        generator = np.random.default_rng(1000 + shard_id)
        return {
            "vectors": generator.standard_normal((num_rows, num_params)),
            "self_influence": generator.standard_normal(num_rows).astype(np.float32),
            "indices": np.arange(shard_id * num_rows, (shard_id + 1) * num_rows, dtype=np.int64),
        }
    """
)
_namespace: dict[str, Any] = {"np": np}
exec(MAKE_ARRAYS_SOURCE, _namespace)  # trusted test source, shared with the child processes
make_arrays: Callable[[int, int, int], dict[str, np.ndarray]] = _namespace["make_arrays"]


def open_disk(path: Path, **overrides: Any) -> DiskCache:
    arguments: dict[str, Any] = {"configuration": CONFIGURATION, "weights_fingerprint": FINGERPRINT}
    arguments.update(overrides)
    return DiskCache(path, **arguments)


@pytest.fixture
def new_cache(tmp_path: Path) -> Callable[[], ShardCache]:
    """A factory for an empty cache (it reopens the same directory)."""
    return lambda: open_disk(tmp_path / "cache")


def write_shards(cache: ShardCache, shard_ids: list[int], rows_per_shard: list[int]) -> None:
    """Writes ``make_arrays`` shards, with consecutive first indices from the given shard sizes."""
    for shard_id in shard_ids:
        arrays = make_arrays(shard_id, rows_per_shard[shard_id], 4)
        first_index = sum(rows_per_shard[:shard_id])
        cache.write_shard(shard_id, arrays, first_index=first_index, input_hash=f"input-{shard_id}")


def owned_files(path: Path) -> list[str]:
    """The directory's entries, without the writers' lock file (which the cache creates and never deletes)."""
    return sorted(entry.name for entry in path.iterdir() if entry.name != cache_module.LOCK_NAME)


# ------------------------------------------------------------------------------------------------------------
# Round trip, resume, validation
# ------------------------------------------------------------------------------------------------------------


def test_round_trip(new_cache: Callable[[], ShardCache]) -> None:
    rows_per_shard = [5, 5, 2]
    cache = new_cache()
    write_shards(cache, [0, 1, 2], rows_per_shard)

    assert cache.completed_shards() == [0, 1, 2]
    assert not cache.is_complete
    for shard_id in range(3):
        expected = make_arrays(shard_id, rows_per_shard[shard_id], 4)
        stored = cache.read_shard(shard_id)
        assert sorted(stored) == ["indices", "self_influence", "vectors"]
        for name, array in expected.items():
            assert stored[name].dtype == array.dtype
            np.testing.assert_array_equal(stored[name], array)
        record = cache.shard_record(shard_id)
        assert (record.num_rows, record.first_index) == (rows_per_shard[shard_id], [0, 5, 10][shard_id])
        assert record.input_hash == f"input-{shard_id}"

    assert [shard_id for shard_id, _ in cache.iter_shards()] == [0, 1, 2]
    vectors = cache.load_all("vectors")
    assert vectors.shape == (12, 4)
    np.testing.assert_array_equal(vectors[5:10], make_arrays(1, 5, 4)["vectors"])
    np.testing.assert_array_equal(cache.load_all("indices"), np.concatenate([np.arange(5), np.arange(5, 10), [4, 5]]))
    assert cache.load_all("self_influence").dtype == np.float32

    cache.mark_complete(3)
    assert cache.is_complete and cache.num_shards == 3


def test_disk_cache_resumes_after_some_shards(tmp_path: Path) -> None:
    rows_per_shard = [3, 3, 3, 1]
    first_run = open_disk(tmp_path / "cache")
    write_shards(first_run, [0, 1], rows_per_shard)
    del first_run

    resumed = open_disk(tmp_path / "cache")
    assert resumed.completed_shards() == [0, 1]
    assert resumed.has_shard(1) and not resumed.has_shard(2)
    np.testing.assert_array_equal(resumed.read_shard(1)["vectors"], make_arrays(1, 3, 4)["vectors"])
    write_shards(resumed, [2, 3], rows_per_shard)
    resumed.mark_complete(4)

    reopened = open_disk(tmp_path / "cache")
    uninterrupted = open_disk(tmp_path / "uninterrupted")
    write_shards(uninterrupted, [0, 1, 2, 3], rows_per_shard)
    assert reopened.is_complete and reopened.num_shards == 4
    for name in ("vectors", "self_influence", "indices"):
        np.testing.assert_array_equal(reopened.load_all(name), uninterrupted.load_all(name))
    # One file per shard plus the manifest: nothing else was left behind.
    assert len(owned_files(tmp_path / "cache")) == 5


def test_manifest_records_settings_and_shards(tmp_path: Path) -> None:
    cache = open_disk(tmp_path)
    write_shards(cache, [0], [7])
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == cache_module.FORMAT_VERSION
    assert manifest["configuration"] == {
        "damping": "0.01",
        "method": "first_order",
        "num_iters": 30,
        "solver": "cg",
    }
    assert manifest["weights_fingerprint"] == FINGERPRINT
    entry = manifest["shards"]["0"]
    assert (entry["num_rows"], entry["first_index"], entry["input_hash"]) == (7, 0, "input-0")
    assert (tmp_path / entry["file"]).is_file()
    assert entry["arrays"]["vectors"] == {"dtype": "<f8", "shape": [7, 4]}


@pytest.mark.parametrize(
    ("overrides", "named_fields"),
    [
        ({"configuration": {**CONFIGURATION, "damping": 0.1}}, ["configuration['damping']"]),
        ({"configuration": {**CONFIGURATION, "extra": True}}, ["configuration['extra']"]),
        ({"weights_fingerprint": fingerprint_arrays([np.zeros(3)])}, ["weights_fingerprint"]),
        (
            {"configuration": {**CONFIGURATION, "solver": "lissa"}, "weights_fingerprint": "other"},
            ["configuration['solver']", "weights_fingerprint"],
        ),
    ],
)
def test_refuses_other_settings_unless_overwrite(
    tmp_path: Path, overrides: dict[str, Any], named_fields: list[str]
) -> None:
    write_shards(open_disk(tmp_path), [0, 1], [2, 2])
    before = owned_files(tmp_path)

    with pytest.raises(ValueError, match="overwrite=True") as error:
        open_disk(tmp_path, **overrides)
    for field in named_fields:
        assert field in str(error.value)
    assert "configuration['method']" not in str(error.value)
    # The refusal touched nothing: the original settings still resume both shards.
    assert owned_files(tmp_path) == before
    assert open_disk(tmp_path).completed_shards() == [0, 1]

    rebuilt = open_disk(tmp_path, overwrite=True, **overrides)
    assert rebuilt.completed_shards() == []
    assert owned_files(tmp_path) == [MANIFEST_NAME]
    assert open_disk(tmp_path, **overrides).completed_shards() == []
    with pytest.raises(ValueError, match="other settings"):
        open_disk(tmp_path)


def test_overwrite_deletes_only_files_the_cache_owns(tmp_path: Path) -> None:
    write_shards(open_disk(tmp_path), [0, 1, 2], [2, 2, 2])
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "shard-notes.npz").write_bytes(b"not a cache shard name")
    (tmp_path / "subdirectory").mkdir()

    open_disk(tmp_path, configuration={"method": "tracin"}, overwrite=True)

    assert owned_files(tmp_path) == [MANIFEST_NAME, "notes.txt", "shard-notes.npz", "subdirectory"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_refuses_a_manifest_it_does_not_own(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text('{"name": "someone else"}')
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not an influenciae cache manifest"):
            open_disk(tmp_path, overwrite=overwrite)
    assert (tmp_path / MANIFEST_NAME).read_text() == '{"name": "someone else"}'
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        open_disk(tmp_path / "file")


def test_refuses_another_format_version(tmp_path: Path) -> None:
    open_disk(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["format_version"] = 999
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version: cache has 999"):
        open_disk(tmp_path)
    assert open_disk(tmp_path, overwrite=True).completed_shards() == []


def test_missing_shard_file_is_reported(tmp_path: Path) -> None:
    write_shards(open_disk(tmp_path), [0, 1], [2, 2])
    entry = json.loads((tmp_path / MANIFEST_NAME).read_text())["shards"]["1"]
    (tmp_path / entry["file"]).unlink()
    with pytest.raises(ValueError, match="missing"):
        open_disk(tmp_path)


def test_rewriting_a_shard_replaces_it(new_cache: Callable[[], ShardCache]) -> None:
    cache = new_cache()
    cache.write_shard(0, {"values": np.zeros(3)}, first_index=0, input_hash="old")
    cache.write_shard(0, {"values": np.full(3, 2.5)}, first_index=0, input_hash="new")
    np.testing.assert_array_equal(cache.read_shard(0)["values"], [2.5, 2.5, 2.5])
    assert cache.shard_record(0).input_hash == "new"
    if isinstance(cache, DiskCache):
        assert len(owned_files(cache.path)) == 2  # the manifest and the new shard file only


def test_invalid_writes_and_reads(new_cache: Callable[[], ShardCache]) -> None:
    cache = new_cache()
    cache.write_shard(0, {"vectors": np.zeros((2, 3)), "loss": np.zeros(2)}, first_index=0, input_hash="a")
    with pytest.raises(ValueError, match="same number of rows"):
        cache.write_shard(1, {"vectors": np.zeros((2, 3)), "loss": np.zeros(3)}, first_index=2, input_hash="b")
    with pytest.raises(ValueError, match="cached shards have"):
        cache.write_shard(1, {"vectors": np.zeros((2, 4)), "loss": np.zeros(2)}, first_index=2, input_hash="b")
    with pytest.raises(ValueError, match="cached shards have"):
        cache.write_shard(
            1, {"vectors": np.zeros((2, 3), np.float32), "loss": np.zeros(2)}, first_index=2, input_hash="b"
        )
    with pytest.raises(ValueError, match="scalar"):
        cache.write_shard(1, {"vectors": np.float64(1.0)}, first_index=2, input_hash="b")
    with pytest.raises(ValueError, match="not allowed"):
        cache.write_shard(1, {"../escape": np.zeros(2)}, first_index=2, input_hash="b")
    with pytest.raises(ValueError, match="shard_id"):
        cache.write_shard(-1, {"vectors": np.zeros((2, 3)), "loss": np.zeros(2)}, first_index=2, input_hash="b")
    with pytest.raises(KeyError, match="Shard 5 is not in"):
        cache.read_shard(5)

    cache.write_shard(2, {"vectors": np.ones((1, 3)), "loss": np.ones(1)}, first_index=4, input_hash="c")
    with pytest.raises(ValueError, match="not consecutive from 0"):
        cache.load_all("vectors")
    with pytest.raises(ValueError, match=r"missing shards \[1\]"):
        cache.mark_complete(3)
    cache.write_shard(1, {"vectors": np.ones((2, 3)), "loss": np.ones(2)}, first_index=3, input_hash="b")
    with pytest.raises(ValueError, match="consecutive training indices"):
        cache.mark_complete(3)
    cache.write_shard(1, {"vectors": np.ones((2, 3)), "loss": np.ones(2)}, first_index=2, input_hash="b")
    with pytest.raises(ValueError, match="No array named 'gradients'"):
        cache.load_all("gradients")
    cache.mark_complete(3)
    np.testing.assert_array_equal(cache.load_all("loss"), [0.0, 0.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="is complete"):
        cache.write_shard(3, {"vectors": np.ones((1, 3)), "loss": np.ones(1)}, first_index=5, input_hash="d")


# ------------------------------------------------------------------------------------------------------------
# No pickle
# ------------------------------------------------------------------------------------------------------------


def test_object_arrays_are_refused_and_nothing_is_written(new_cache: Callable[[], ShardCache]) -> None:
    cache = new_cache()
    with pytest.raises(ValueError, match="object arrays would need pickle"):
        cache.write_shard(0, {"values": np.array([{"a": 1}, None], dtype=object)}, first_index=0, input_hash="h")
    assert cache.completed_shards() == []
    if isinstance(cache, DiskCache):
        assert owned_files(cache.path) == [MANIFEST_NAME]


def test_shard_files_are_plain_npy_archives_read_without_pickle(tmp_path: Path) -> None:
    cache = open_disk(tmp_path)
    write_shards(cache, [0], [3])
    shard_file = tmp_path / cache.shard_record(0).file  # type: ignore[operator]
    with zipfile.ZipFile(shard_file) as archive:
        assert sorted(archive.namelist()) == ["__meta__.npy", "indices.npy", "self_influence.npy", "vectors.npy"]
    with np.load(shard_file, allow_pickle=False) as loaded:
        np.testing.assert_array_equal(loaded["vectors"], make_arrays(0, 3, 4)["vectors"])

    # A shard file swapped for one holding a pickled object array is refused on read, not unpickled: first by its
    # checksum, and, were the checksum forged too, by np.load(allow_pickle=False).
    with open(shard_file, "wb") as handle:
        np.savez(handle, vectors=np.array([object()] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="does not match its checksum"):
        cache.read_shard(0)
    forged = dataclasses.replace(cache.shard_record(0), checksum=cache_module.checksum_file(shard_file))
    with pytest.raises(ValueError, match="no meta record|allow_pickle=False"):
        cache._load(0, forged, ["vectors"])


# ------------------------------------------------------------------------------------------------------------
# Hashes, fingerprints and configurations
# ------------------------------------------------------------------------------------------------------------


def batch_hashes(dataset: tf.data.Dataset) -> list[str]:
    return [hash_batch(batch) for batch in dataset]


def test_changed_dataset_is_detected(new_cache: Callable[[], ShardCache]) -> None:
    features = np.arange(24, dtype=np.float32).reshape(12, 2)
    labels = np.arange(12, dtype=np.int64) % 3
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(4)
    hashes = batch_hashes(dataset)
    cache = new_cache()
    for shard_id in range(3):
        cache.write_shard(
            shard_id,
            {"loss": np.zeros(4)},
            first_index=4 * shard_id,
            input_hash=combine_hashes([hashes[shard_id]]),
        )

    # The same data through another pipeline hashes the same: the check passes.
    rebuilt = tf.data.Dataset.from_tensor_slices((features, labels)).map(lambda x, y: (x, y)).batch(4).prefetch(2)
    for shard_id, digest in enumerate(batch_hashes(rebuilt)):
        cache.check_input_hash(shard_id, combine_hashes([digest]))

    flipped_labels = labels.copy()
    flipped_labels[5] = (flipped_labels[5] + 1) % 3
    changed = tf.data.Dataset.from_tensor_slices((features, flipped_labels)).batch(4)
    changed_hashes = batch_hashes(changed)
    cache.check_input_hash(0, combine_hashes([changed_hashes[0]]))
    with pytest.raises(ValueError, match="the training dataset differs from the one this cache was built from"):
        cache.check_input_hash(1, combine_hashes([changed_hashes[1]]))
    with pytest.raises(ValueError, match="overwrite=True"):
        cache.check_input_hash(1, combine_hashes([changed_hashes[1]]))
    with pytest.raises(KeyError):
        cache.check_input_hash(7, "anything")


def test_hash_batch_covers_dtype_shape_structure_and_content() -> None:
    values = tf.constant([1.0, 2.0, 3.0, 4.0])
    reference = hash_batch((values, tf.constant([0, 1])))
    assert hash_batch((np.array([1.0, 2.0, 3.0, 4.0], np.float32), np.array([0, 1], np.int32))) == reference
    assert hash_batch((tf.cast(values, tf.float64), tf.constant([0, 1]))) != reference
    assert hash_batch((tf.reshape(values, [2, 2]), tf.constant([0, 1]))) != reference
    assert hash_batch((values, tf.constant([0, 2]))) != reference
    assert hash_batch((values, tf.constant([0, 1]), tf.ones(2))) != reference
    assert hash_batch({"text": tf.constant(["ab", "c"])}) != hash_batch({"text": tf.constant(["a", "bc"])})
    ragged = tf.ragged.constant([[1, 2], [3]])
    assert hash_batch(ragged) != hash_batch(tf.ragged.constant([[1], [2, 3]]))
    assert len(reference) == 64 and int(reference, 16) >= 0


def test_fingerprint_arrays() -> None:
    weights = [np.arange(6.0).reshape(2, 3), np.ones(3, np.float32)]
    assert fingerprint_arrays([tf.Variable(weights[0]), tf.constant(weights[1])]) == FINGERPRINT
    changed = [weights[0].copy(), weights[1]]
    changed[0][1, 2] += 1e-12
    assert fingerprint_arrays(changed) != FINGERPRINT
    assert fingerprint_arrays(weights[::-1]) != FINGERPRINT
    assert fingerprint_arrays([weights[0].reshape(3, 2), weights[1]]) != FINGERPRINT
    assert fingerprint_arrays([weights[0].astype(np.float32), weights[1]]) != FINGERPRINT
    assert fingerprint_arrays([np.asfortranarray(weights[0]), weights[1]]) == FINGERPRINT
    assert fingerprint_arrays([]) != fingerprint_arrays([np.zeros(0)])


class Solver(enum.Enum):
    CG = "cg"


def test_canonical_configuration() -> None:
    configuration = {
        "solver": Solver.CG,
        "damping": np.float32(0.1),
        "tolerance": float("nan"),
        "num_iters": np.int64(30),
        "flags": (True, np.bool_(False), None),
        "nested": {"b": 1, "a": [0.5]},
    }
    canonical = canonical_configuration(configuration)
    assert canonical == {
        "damping": repr(float(np.float32(0.1))),
        "flags": [True, False, None],
        "nested": {"a": ["0.5"], "b": 1},
        "num_iters": 30,
        "solver": "cg",
        "tolerance": "nan",
    }
    assert list(canonical) == sorted(canonical) and list(canonical["nested"]) == ["a", "b"]
    assert json.loads(json.dumps(canonical)) == canonical
    assert type(canonical["num_iters"]) is int

    with pytest.raises(TypeError, match=r"configuration\['callback'\]"):
        canonical_configuration({"callback": print})
    with pytest.raises(TypeError, match=r"configuration\['solver'\]\['options'\]\[1\]"):
        canonical_configuration({"solver": {"options": [1, {2, 3}]}})
    with pytest.raises(TypeError, match="not a string"):
        canonical_configuration({"solver": {1: "cg"}})
    with pytest.raises(TypeError, match=r"configuration\['model'\]"):
        open_disk(Path("unused"), configuration={"model": object()})


# ------------------------------------------------------------------------------------------------------------
# A real SIGKILL in the middle of a run
# ------------------------------------------------------------------------------------------------------------

NUM_SHARDS = 6
ROWS_PER_SHARD = 1000
NUM_PARAMS = 128  # 1 MB of vectors per shard, so that a kill from outside tends to land during a write.
KILLED_SHARD = 3
TEMPORARY = ".influenciae-tmp-"

# The child imports influenciae.cache alone so that it does not pay for importing TensorFlow through the package.
CHILD_SCRIPT = (
    textwrap.dedent(
        """
    import importlib.util, os, signal, sys
    import numpy as np

    cache_file, path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    # influenciae.cache under a stub influenciae package, so that the package's __init__ (TensorFlow) never runs.
    import importlib, types
    package = types.ModuleType("influenciae")
    package.__path__ = [os.path.dirname(os.path.dirname(cache_file))]
    sys.modules["influenciae"] = package
    cache_module = importlib.import_module("influenciae.cache")
    assert "tensorflow" not in sys.modules
    """
    )
    + MAKE_ARRAYS_SOURCE
    + textwrap.dedent(
        """
        KILLED_SHARD = {killed_shard}
        state = {{"current": None, "shard_renamed": False}}

        def kill():
            os.kill(os.getpid(), signal.SIGKILL)

        real_replace = os.replace
        def replace(source, destination):
            name = os.path.basename(os.fspath(destination))
            is_killed_shard = name.startswith(f"shard-{{KILLED_SHARD:06d}}-")
            if mode == "before_shard_rename" and is_killed_shard:
                kill()
            if mode == "before_manifest_rename" and name == "manifest.json" and state["shard_renamed"]:
                kill()
            real_replace(source, destination)
            if mode == "after_manifest_rename" and name == "manifest.json" and state["shard_renamed"]:
                kill()
            state["shard_renamed"] = state["shard_renamed"] or is_killed_shard
        os.replace = replace

        real_write_array = np.lib.format.write_array
        def write_array(*arguments, **keywords):
            real_write_array(*arguments, **keywords)
            if mode == "mid_shard_write" and state["current"] == KILLED_SHARD:
                kill()  # one array of the shard is in the temporary file, the others are not
        np.lib.format.write_array = write_array

        cache = cache_module.DiskCache(
            path, configuration={configuration!r}, weights_fingerprint={fingerprint!r}
        )
        for shard_id in range({num_shards}):
            if cache.has_shard(shard_id):
                continue
            arrays = make_arrays(shard_id, {rows}, {params})
            state["current"] = shard_id
            print(f"begin {{shard_id}}", flush=True)
            first_index, input_hash = shard_id * {rows}, f"input-{{shard_id}}"
            cache.write_shard(shard_id, arrays, first_index=first_index, input_hash=input_hash)
            print(f"written {{shard_id}}", flush=True)
        cache.mark_complete({num_shards})
        print("done", flush=True)
        """
    ).format(
        killed_shard=KILLED_SHARD,
        configuration=CONFIGURATION,
        fingerprint=FINGERPRINT,
        num_shards=NUM_SHARDS,
        rows=ROWS_PER_SHARD,
        params=NUM_PARAMS,
    )
)


def start_child(path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, cache_module.__file__, str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_child(path: Path, mode: str) -> tuple[int, list[str]]:
    """Runs the writer; in mode "external_kill" this process SIGKILLs it once it starts writing shard 4."""
    child = start_child(path, mode)
    lines: list[str] = []
    assert child.stdout is not None
    for line in child.stdout:
        lines.append(line.strip())
        if mode == "external_kill" and line.strip() == f"begin {KILLED_SHARD + 1}":
            os.kill(child.pid, signal.SIGKILL)
            break
    return_code = child.wait(timeout=60)
    stderr = child.stderr.read() if child.stderr is not None else ""
    if return_code not in (0, -signal.SIGKILL):
        pytest.fail(f"child failed with code {return_code}:\n{stderr}")
    child.stdout.close()
    if child.stderr is not None:
        child.stderr.close()
    return return_code, lines


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> DiskCache:
    """The cache written by the same child process when nothing interrupts it."""
    path = tmp_path_factory.mktemp("uninterrupted")
    return_code, lines = run_child(path, "no_kill")
    assert return_code == 0 and lines[-1] == "done"
    return open_disk(path)


@pytest.mark.parametrize(
    ("mode", "expected_shards", "expected_strays"),
    [
        ("mid_shard_write", [0, 1, 2], [TEMPORARY]),
        ("before_shard_rename", [0, 1, 2], [TEMPORARY]),
        # The new manifest is in its temporary file; the shard file is in place but not recorded.
        ("before_manifest_rename", [0, 1, 2], [TEMPORARY, f"shard-{KILLED_SHARD:06d}-"]),
        ("after_manifest_rename", [0, 1, 2, 3], []),
        ("external_kill", None, None),  # where an external kill lands is not deterministic
    ],
)
def test_sigkill_leaves_only_complete_shards_and_resume_matches(
    tmp_path: Path,
    uninterrupted: DiskCache,
    mode: str,
    expected_shards: list[int] | None,
    expected_strays: list[str] | None,
) -> None:
    path = tmp_path / "cache"
    return_code, lines = run_child(path, mode)
    assert return_code == -signal.SIGKILL
    assert "done" not in lines

    recorded = {entry["file"] for entry in json.loads((path / MANIFEST_NAME).read_text())["shards"].values()}
    strays = sorted(name for name in owned_files(path) if name != MANIFEST_NAME and name not in recorded)
    if expected_strays is not None:
        assert len(strays) == len(expected_strays)
        assert all(name.startswith(prefix) for name, prefix in zip(strays, expected_strays, strict=True))

    reopened = open_disk(path)
    completed = reopened.completed_shards()
    if expected_shards is not None:
        assert completed == expected_shards
    else:  # killed while writing shard 4, before or after it was recorded
        assert completed in ([0, 1, 2, 3], [0, 1, 2, 3, 4])
    # Every shard the writer reported as written survived the kill, and nothing after the kill was recorded.
    written = [int(line.split()[1]) for line in lines if line.startswith("written")]
    assert set(written) <= set(completed) and f"begin {completed[-1]}" in lines
    assert not reopened.is_complete
    assert len(owned_files(path)) == len(completed) + 1  # strays are cleaned on open
    for shard_id, arrays in reopened.iter_shards():
        expected = make_arrays(shard_id, ROWS_PER_SHARD, NUM_PARAMS)
        for name in expected:
            np.testing.assert_array_equal(arrays[name], expected[name])

    # Resuming in a fresh process writes only the missing shards.
    return_code, lines = run_child(path, "no_kill")
    assert return_code == 0
    assert lines[0] == f"begin {completed[-1] + 1}" and lines[-1] == "done"

    resumed = open_disk(path)
    assert resumed.is_complete and resumed.num_shards == NUM_SHARDS
    for name in ("vectors", "self_influence", "indices"):
        np.testing.assert_array_equal(resumed.load_all(name), uninterrupted.load_all(name))
    np.testing.assert_array_equal(resumed.load_all("indices"), np.arange(NUM_SHARDS * ROWS_PER_SHARD))
    for shard_id in range(NUM_SHARDS):
        assert resumed.shard_record(shard_id).input_hash == uninterrupted.shard_record(shard_id).input_hash
