"""The embarrassingly parallel pass as an Apache Beam pipeline: influence vectors, self-influence and top-k.

Once the solver state is saved (:class:`~influenciae.distributed.state.SolverState`), every training example is
scored independently: the pipeline reads sharded TFRecords (:mod:`~influenciae.distributed.records`), batches them,
and a ``DoFn`` that loads the model and the state **once per worker** (``DoFn.setup``) computes, per batch,
:func:`~influenciae.distributed.kernels.score_batch` and writes one output file. Partial top-k results are merged
exactly by a ``CombineFn`` (:class:`TopKCombineFn`, ties by training index, so any bundling gives the same answer as
one process).

The same pipeline runs on the DirectRunner (``--direct_num_workers=2 --direct_running_mode=multi_processing``) and on
Dataflow, Flink or Spark by changing the runner and its options (paths may then be ``gs://``, ``s3://``...: files go
through Beam's ``FileSystems``).

Outputs (``output_dir``):

* ``part-<first index>-<rows>.npz``: ``indices [B]`` and ``vectors [B, P]``, ``self_influence [B]`` or
  ``scores [m, B]`` of one batch. Written under a temporary name and renamed, so a file is whole or absent; a retried
  bundle rewrites the same name.
* ``top_k.npz`` (modes ``top_k`` and ``self_influence``): ``indices [m, k]`` and ``values [m, k]``.
* ``_MANIFEST.json``: written **last**, by one finalizing step after every part: the job, the files and the row
  count. A run is complete if and only if the manifest exists. A new run deletes an old manifest before writing
  anything, and the finalizer deletes parts and temporary files it did not list, so a worker (or the whole job)
  killed mid-run leaves a directory that :func:`read_scoring_output` refuses and that a rerun completes.

Example:
    >>> job = ScoringJob(input_pattern="data/train-*.tfrecord", model_path="model.keras",
    ...                  state_path="runs/state.npz", output_dir="runs/scores", mode="top_k", k=10)
    >>> run_scoring(job, ["--runner=DirectRunner", "--direct_num_workers=2",
    ...                   "--direct_running_mode=multi_processing"])
    >>> result = read_scoring_output("runs/scores")  # refuses an incomplete run
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "The Beam pipeline needs Apache Beam, which needs protobuf < 7: install the extra in its own environment, "
        "`pip install 'influenciae[beam]'` (see docs/distributed.md)."
    ) from error

from influenciae.cache import manifest_bytes, parse_manifest, write_npz
from influenciae.distributed.kernels import SCORING_MODES, Candidates, block_candidates, merge_candidates
from influenciae.types import ORDER

__all__ = [
    "MANIFEST",
    "ScoringJob",
    "IncompleteOutputError",
    "TopKCombineFn",
    "build_pipeline",
    "run_scoring",
    "read_scoring_output",
    "is_complete",
    "exists",
    "copy_to",
    "local_copy",
]

MANIFEST = "_MANIFEST.json"
TOP_K_FILE = "top_k.npz"
_PART_PREFIX = "part-"
_TEMPORARY_PREFIX = ".tmp-"
_KIND = "influenciae.scoring_output"
_FORMAT_VERSION = 1
_SCORER_SETTINGS = ("method", "options", "test_pattern", "loss", "from_logits", "batch_size")


class IncompleteOutputError(ValueError):
    """The output directory has no manifest: the run that wrote it did not finish (or never started)."""


@dataclasses.dataclass(frozen=True)
class ScoringJob:
    """What a scoring run computes; stored in the manifest so that a rerun knows whether it is done.

    Attributes:
        input_pattern: Glob of the training TFRecord files (records with an ``index``).
        model_path: The saved ``.keras`` model.
        state_path: The saved :class:`~influenciae.distributed.state.SolverState` (first-order influence through
            its preconditioner or test factors), or None to score with the registered ``method``.
        output_dir: Where the parts, the top-k and the manifest go.
        mode: ``"vectors"``, ``"self_influence"`` or ``"top_k"``.
        k: Training examples kept per test example (``top_k``) or in total (``self_influence``).
        order: ``"descending"`` (proponents, highest self-influence) or ``"ascending"``.
        batch_size: Training examples per batch (and per output part, at most).
        loss: ``None`` for the model's compiled loss, or a Keras loss name (e.g.
            ``"sparse_categorical_crossentropy"``).
        from_logits: With a named cross-entropy loss: whether the model outputs logits.
        method: Without a state: the registered calculator method each worker builds (``"tracin"``, ``"trak"``,
            ...; :mod:`influenciae.influence.registry`).
        options: Without a state: fields of :class:`~influenciae.influence.registry.CalculatorOptions` (JSON-able,
            e.g. ``{"projection_dim": 64, "seed": 0}``).
        test_pattern: Without a state, mode ``top_k``: glob of the test TFRecord files.
    """

    input_pattern: str
    model_path: str
    state_path: str | None
    output_dir: str
    mode: str = "top_k"
    k: int = 10
    order: str = "descending"
    batch_size: int = 64
    loss: str | None = None
    from_logits: bool = False
    method: str = "first_order"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    test_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in SCORING_MODES:
            raise ValueError(f"mode must be one of {SCORING_MODES}, got {self.mode!r}.")
        if self.order not in ("descending", "ascending"):
            raise ValueError(f"order must be 'descending' or 'ascending', got {self.order!r}.")
        for name in ("k", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.state_path is not None and self.method != "first_order":
            raise ValueError(f"A solver state scores first-order influence; method {self.method!r} takes none.")
        if self.state_path is None and self.mode == "top_k" and self.test_pattern is None:
            raise ValueError("mode 'top_k' without a solver state needs test_pattern (the test TFRecords).")

    @property
    def order_enum(self) -> ORDER:
        return ORDER(self.order)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- files (local or remote, via FileSystems)


def _join(directory: str, name: str) -> str:
    return FileSystems.join(directory, name)


def _write_atomically(path: str, data: bytes) -> None:
    """Write under a temporary name in the same directory, then rename: readers see the whole file or none."""
    directory, name = os.path.split(path)
    temporary = _join(directory, f"{_TEMPORARY_PREFIX}{uuid.uuid4().hex}-{name}")
    with FileSystems.create(temporary) as handle:
        handle.write(data)
    try:
        FileSystems.rename([temporary], [path])  # replaces an existing file (a retried bundle) where renames can
    except Exception:  # noqa: BLE001 - file systems whose rename refuses an existing target
        FileSystems.delete([path])
        FileSystems.rename([temporary], [path])


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return bytes(handle.read())


def _read_manifest(path: str) -> dict[str, Any]:
    return parse_manifest(_read_bytes(path), _KIND, source=path, what="the manifest of a scoring output")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    write_npz(buffer, arrays)
    return buffer.getvalue()


def exists(path: str) -> bool:
    """Whether a local or remote (``gs://``...) file exists."""
    return bool(FileSystems.exists(path))


def copy_to(local_path: str | os.PathLike[str], path: str) -> None:
    """Copy a local file to a local or remote path, atomically (temporary name, then rename)."""
    with open(local_path, "rb") as handle:
        _write_atomically(path, handle.read())


def local_copy(path: str, suffix: str) -> str:
    """A local path for ``path`` (itself when local; otherwise a temporary copy, e.g. of a ``gs://`` file)."""
    if os.path.exists(path):
        return path
    descriptor, local = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(_read_bytes(path))
    return local


def _list(directory: str) -> list[str]:
    pattern = _join(directory, "*")
    matches = FileSystems.match([pattern])[0].metadata_list
    return [metadata.path for metadata in matches]


def is_complete(output_dir: str) -> bool:
    """Whether ``output_dir`` holds the manifest of a finished run."""
    return bool(FileSystems.exists(_join(output_dir, MANIFEST)))


# ---------------------------------------------------------------------- pipeline pieces


class TopKCombineFn(beam.CombineFn):  # type: ignore[misc]
    """Exact top-k of partial candidates ``(indices [m, c], values [m, c])``, ties by the smaller training index.

    The accumulator is itself a partial result (``None`` when empty); merging is associative and commutative
    (:func:`~influenciae.distributed.kernels.merge_candidates`), so Beam may combine in any tree.
    """

    def __init__(self, k: int, order: str = "descending") -> None:
        self.k = k
        self.order = order

    def create_accumulator(self) -> Candidates | None:
        return None

    def _merge(self, first: Candidates | None, second: Candidates | None) -> Candidates | None:
        if first is None:
            return second
        if second is None:
            return first
        return merge_candidates(first, second, self.k, ORDER(self.order))

    def add_input(self, accumulator: Candidates | None, element: Candidates) -> Candidates | None:
        return self._merge(accumulator, element)

    def merge_accumulators(self, accumulators: Iterable[Candidates | None]) -> Candidates | None:
        merged = None
        for accumulator in accumulators:
            merged = self._merge(merged, accumulator)
        return merged

    def extract_output(self, accumulator: Candidates | None) -> Candidates | None:
        return accumulator


class _ScoreBatchesFn(beam.DoFn):  # type: ignore[misc]
    """Scores batches of serialized records and writes one part per batch; builds its calculator in ``setup``."""

    def __init__(self, job: ScoringJob) -> None:
        self.job = job

    def setup(self) -> None:
        from influenciae.distributed.kernels import shard_scorer

        job = self.job
        state_path = None if job.state_path is None else local_copy(job.state_path, ".npz")
        settings = {name: getattr(job, name) for name in _SCORER_SETTINGS}  # the calculator's, as the job has them
        self._score = shard_scorer(
            job.mode, local_copy(job.model_path, ".keras"), job.input_pattern, state_path=state_path, **settings
        )

    def process(self, records: Sequence[bytes]) -> Iterator[Any]:
        from influenciae.distributed.records import decode_records

        indices, batch = decode_records(list(records))
        result = self._score(batch)
        name = f"{_PART_PREFIX}{int(indices[0]):012d}-{len(indices):06d}.npz"
        _write_atomically(_join(self.job.output_dir, name), _npz_bytes({"indices": indices, **result}))
        yield {"file": name, "rows": len(indices)}
        order = self.job.order_enum
        if self.job.mode == "top_k":
            yield beam.pvalue.TaggedOutput("candidates", block_candidates(indices, result["scores"], self.job.k, order))
        elif self.job.mode == "self_influence":
            scores = result["self_influence"][None]
            yield beam.pvalue.TaggedOutput("candidates", block_candidates(indices, scores, self.job.k, order))


class _FinalizeFn(beam.DoFn):  # type: ignore[misc]
    """Check the parts, delete leftovers of earlier runs, write the top-k and, last, the manifest."""

    def __init__(self, job: ScoringJob, state_fingerprint: str) -> None:
        self.job = job
        self.state_fingerprint = state_fingerprint

    def process(self, parts: list[dict[str, Any]], top_k: Candidates | None, num_records: int) -> Iterator[str]:
        parts = sorted(parts, key=lambda part: part["file"])
        rows = sum(int(part["rows"]) for part in parts)
        if rows != num_records:
            raise RuntimeError(f"The parts hold {rows} rows for {num_records} records read: refusing to finalize.")
        listed = {part["file"] for part in parts}
        leftovers = [
            path
            for path in _list(self.job.output_dir)
            if (os.path.basename(path).startswith(_PART_PREFIX) and os.path.basename(path) not in listed)
            or os.path.basename(path).startswith(_TEMPORARY_PREFIX)
        ]
        if leftovers:
            FileSystems.delete(leftovers)
        if top_k is not None:
            _write_atomically(
                _join(self.job.output_dir, TOP_K_FILE), _npz_bytes({"indices": top_k[0], "values": top_k[1]})
            )
        manifest = {
            "job": self.job.to_json(),
            "state_fingerprint": self.state_fingerprint,
            "num_examples": rows,
            "parts": parts,
            "top_k": TOP_K_FILE if top_k is not None else None,
        }
        _write_atomically(_join(self.job.output_dir, MANIFEST), manifest_bytes(_KIND, _FORMAT_VERSION, manifest))
        yield MANIFEST


def build_pipeline(pipeline: beam.Pipeline, job: ScoringJob, *, state_fingerprint: str = "") -> None:
    """Add the scoring transforms to ``pipeline`` (read, batch, score and write, top-k, finalize)."""
    records = pipeline | "ReadTFRecords" >> beam.io.ReadFromTFRecord(job.input_pattern)
    batches = records | "Batch" >> beam.BatchElements(min_batch_size=job.batch_size, max_batch_size=job.batch_size)
    scored = batches | "ScoreAndWrite" >> beam.ParDo(_ScoreBatchesFn(job)).with_outputs("candidates", main="parts")
    parts = scored.parts | "ListParts" >> beam.combiners.ToList()
    top_k = scored.candidates | "TopK" >> beam.CombineGlobally(TopKCombineFn(job.k, job.order))
    count = records | "CountRecords" >> beam.combiners.Count.Globally()
    _ = parts | "Finalize" >> beam.ParDo(
        _FinalizeFn(job, state_fingerprint), beam.pvalue.AsSingleton(top_k), beam.pvalue.AsSingleton(count)
    )


def _file_fingerprint(path: str | None) -> str:
    import hashlib

    return "" if path is None else hashlib.sha256(_read_bytes(path)).hexdigest()


def run_scoring(
    job: ScoringJob, pipeline_args: Sequence[str] | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Run the scoring pipeline unless ``job.output_dir`` already holds this job's complete output.

    Args:
        job: What to compute.
        pipeline_args: Beam options, e.g. ``["--runner=DirectRunner", "--direct_num_workers=2",
            "--direct_running_mode=multi_processing"]`` or ``["--runner=DataflowRunner", "--project=...", ...]``.
        overwrite: Recompute even when a complete output of another job (or state) is there.

    Returns:
        The manifest.

    Raises:
        ValueError: If the directory holds the complete output of another job or state and ``overwrite`` is False.
    """
    state_fingerprint = _file_fingerprint(job.state_path)
    manifest_path = _join(job.output_dir, MANIFEST)
    if FileSystems.exists(manifest_path):
        manifest = _read_manifest(manifest_path)
        same = manifest.get("job") == job.to_json() and manifest.get("state_fingerprint") == state_fingerprint
        if same and not overwrite:
            return dict(manifest)
        if not overwrite:
            raise ValueError(
                f"{job.output_dir} holds the complete output of another job or solver state; pass overwrite=True "
                "(--overwrite) to replace it, or choose another output directory."
            )
    if not FileSystems.exists(job.output_dir):
        FileSystems.mkdirs(job.output_dir)
    if FileSystems.exists(manifest_path):  # never leave an old manifest next to a run in progress
        FileSystems.delete([manifest_path])
    options = PipelineOptions(list(pipeline_args or ["--runner=DirectRunner"]))
    with beam.Pipeline(options=options) as pipeline:
        build_pipeline(pipeline, job, state_fingerprint=state_fingerprint)
    if not FileSystems.exists(manifest_path):
        raise RuntimeError(f"The pipeline finished without writing {manifest_path}.")
    return _read_manifest(manifest_path)


def read_scoring_output(output_dir: str) -> dict[str, Any]:
    """Read a complete scoring output, rows sorted by training index.

    Returns:
        ``{"indices": [N] int64, <mode's array>, "top_k_indices": [m, k], "top_k_values": [m, k], "manifest": ...}``
        with ``vectors [N, P]``, ``self_influence [N]`` or ``scores [m, N]``.

    Raises:
        IncompleteOutputError: Without a manifest (the run did not finish): rerun the job.
    """
    manifest_path = _join(output_dir, MANIFEST)
    if not FileSystems.exists(manifest_path):
        raise IncompleteOutputError(
            f"{output_dir} has no {MANIFEST}: the scoring run did not finish. Rerun it (the solver state is reused)."
        )
    manifest = _read_manifest(manifest_path)
    mode = manifest["job"]["mode"]
    key = {"vectors": "vectors", "self_influence": "self_influence", "top_k": "scores"}[mode]
    indices, blocks = [], []
    for part in manifest["parts"]:
        with np.load(io.BytesIO(_read_bytes(_join(output_dir, part["file"]))), allow_pickle=False) as archive:
            indices.append(archive["indices"])
            blocks.append(archive[key])
    all_indices = np.concatenate(indices) if indices else np.zeros([0], np.int64)
    order = np.argsort(all_indices, kind="stable")
    axis = 1 if key == "scores" else 0
    values = np.concatenate(blocks, axis=axis) if blocks else np.zeros([0])
    result: dict[str, Any] = {"indices": all_indices[order], key: np.take(values, order, axis=axis)}
    if manifest.get("top_k"):
        with np.load(io.BytesIO(_read_bytes(_join(output_dir, manifest["top_k"]))), allow_pickle=False) as archive:
            result["top_k_indices"], result["top_k_values"] = archive["indices"], archive["values"]
    result["manifest"] = manifest
    return result
