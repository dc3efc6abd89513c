"""Disk caches of per-training-example results (influence vectors, self-influence, ...), and the files they use.

A calculator streams over a batched ``tf.data`` training set and cuts it into **shards**: shard ``s`` holds
the arrays computed from one block of consecutive batches, shard ids ``0, 1, 2, ...`` follow the dataset's
iteration order, and every array of a shard has one row per training example (``[num_rows, ...]``). A
calculator writes a single code path:

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

- ``manifest.json`` records the format version, the calculator configuration (which includes the model's
  identity, see :func:`~influenciae.model.identity.model_identity`), a fingerprint of the weights and, per completed
  shard, its number of rows, first training index, input hash, file name, array schema and the SHA-256 checksum of
  its file; once complete, the number of shards and of examples. Reopening with another configuration or other
  weights is refused unless ``overwrite=True``.
- Each shard is an uncompressed ``.npz`` written without pickle (object arrays are refused) and read back with
  ``allow_pickle=False``. It also holds a ``__meta__`` member naming the cache identity, the shard id and its
  input hash, so a shard file copied from another cache, or swapped with another shard, is refused on read even
  when its checksum was copied along. Every read checks the checksum and the meta record first; a corrupted file
  raises a ``ValueError`` naming the shard and how to rebuild.
- Every manifest (this cache's, and those of the solver state, the K-FAC factors and the CAV store) has one format:
  a JSON object with the store's ``kind`` and ``format_version`` (:func:`manifest_bytes`, :func:`read_manifest`).
- Every file is written by :func:`atomic_write` (unique temporary name, ``fsync``,
  ``os.replace``); the manifest is replaced only after the shard file is in place, and each write of a shard uses
  a fresh file name, first recorded as *pending* in the manifest. A process killed at any moment therefore leaves
  either a complete shard recorded in the manifest or nothing recorded; the next open deletes the pending files
  and the temporary files of a dead writer. Files the manifest never named are never deleted.
- Writers take an exclusive ``fcntl`` lock on ``.influenciae.lock`` (:meth:`DiskCache.lock`), and reload the
  manifest when they get it, so two processes filling the same cache never delete each other's files and never
  record a missing one: the second waits, then finds the shards the first wrote.

:func:`fill_cache` is the one loop that resumes or reuses a cache for a stream of shards: every shard's input hash
and row count is checked against the data, and a complete cache must cover exactly the data given now.
"""

from influenciae.cache.disk import FORMAT_VERSION, LOCK_NAME, MANIFEST_NAME, DiskCache
from influenciae.cache.files import (
    TEMPORARY_PREFIX,
    atomic_write,
    checksum_file,
    manifest_array,
    manifest_bytes,
    parse_manifest,
    read_manifest,
    temporary_name,
    write_manifest,
    write_npz,
)
from influenciae.cache.fingerprint import canonical_configuration, combine_hashes, fingerprint_arrays, hash_batch
from influenciae.cache.store import (
    _OVERWRITE_HINT,  # noqa: F401 -- the CLI's hint is checked against it
    ShardCache,
    ShardInput,
    ShardRecord,
    fill_cache,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "LOCK_NAME",
    "TEMPORARY_PREFIX",
    "ShardRecord",
    "ShardInput",
    "ShardCache",
    "DiskCache",
    "fill_cache",
    "atomic_write",
    "checksum_file",
    "temporary_name",
    "write_npz",
    "manifest_array",
    "manifest_bytes",
    "parse_manifest",
    "read_manifest",
    "write_manifest",
    "canonical_configuration",
    "combine_hashes",
    "fingerprint_arrays",
    "hash_batch",
]
