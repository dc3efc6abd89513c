"""Distributed engines against one process (issue 8): ``tf.distribute`` Hessian products and the Beam scoring pass.

Two tables:

1. One Hessian-vector product (8 vectors, an MLP, 4,096 examples in batches of 128, float32) by
   :class:`~influenciae.hessian.HessianOperator` in one process against
   :class:`~influenciae.distributed.DistributedHessianOperator` on ``MirroredStrategy`` over two logical CPU
   devices and on ``MultiWorkerMirroredStrategy`` with two worker processes on 127.0.0.1. Each configuration runs in
   its own subprocess (logical devices and ``TF_CONFIG`` must be set before TensorFlow starts), which times both the
   one-process operator and the distributed one, round-robin.
2. The scoring pass (self-influence of 4,096 examples from 4 TFRecord files, batches of 128): a plain loop in one
   process (decode, :func:`~influenciae.distributed.score_batch`) against the Beam pipeline on the DirectRunner,
   in memory and with two worker processes, end to end (pipeline start, workers loading the model and state, writing
   parts and the manifest). Needs ``.venv-beam`` (``make venv-beam``); the table says so when it is missing.

Run alone: ``.venv/bin/python -m benchmarks.distributed`` (prints the markdown of both tables).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run_benchmarks import Section, log, milliseconds, ratio

__all__ = ["run"]

ROOT = Path(__file__).resolve().parent.parent
BEAM_PYTHON = ROOT / ".venv-beam" / "bin" / "python"
NUM_EXAMPLES, BATCH_SIZE, NUM_VECTORS, FEATURES, HIDDEN, CLASSES = 4096, 128, 8, 32, 64, 10
TIMEOUT = 900


def _problem(dtype: str = "float32") -> tuple[Any, Any]:
    import keras

    from influenciae import InfluenceModel
    from influenciae.data import from_numpy

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,), dtype=dtype),
            keras.layers.Dense(HIDDEN, activation="tanh", dtype=dtype),
            keras.layers.Dense(CLASSES, dtype=dtype),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM_EXAMPLES, FEATURES)).astype(dtype)
    y = rng.integers(0, CLASSES, NUM_EXAMPLES)
    return model, (x, y, from_numpy(x, y, batch_size=BATCH_SIZE), InfluenceModel)


# ---------------------------------------------------------------------- table 1: tf.distribute (subprocesses)


def _hvp_worker(kind: str, output: str, repeats: int) -> None:
    import tensorflow as tf

    if kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from influenciae.distributed import DistributedHessianOperator
    from influenciae.hessian import HessianOperator

    with strategy.scope():
        model, (_, _, dataset, influence_model) = _problem()
    im = influence_model(model)
    vectors = tf.constant(np.random.default_rng(1).standard_normal((NUM_VECTORS, im.nb_params)), im.dtype)
    single = HessianOperator(im, dataset)
    distributed = DistributedHessianOperator(im, dataset, strategy)
    functions = {"one process": lambda: single.matmul_rows(vectors), kind: lambda: distributed.matmul_rows(vectors)}
    reference = single.matmul_rows(vectors).numpy()
    error = float(np.max(np.abs(distributed.matmul_rows(vectors).numpy() - reference)) / np.max(np.abs(reference)))
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):  # round-robin; every worker of a multi-worker run takes the same steps
        for name, function in functions.items():
            start = time.perf_counter()
            function().numpy()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(samples) for name, samples in times.items()}
    Path(output).write_text(json.dumps({"times": result, "error": error, "nb_params": im.nb_params}))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_hvp(kind: str, repeats: int, directory: Path) -> dict[str, Any]:
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="-1")
    workers = 2 if kind == "multi_worker" else 1
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(workers)]}
    processes = []
    for index in range(workers):
        if kind == "multi_worker":
            environment["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        command = [
            sys.executable,
            "-m",
            "benchmarks.distributed",
            "hvp-worker",
            kind,
            str(directory / f"{kind}{index}"),
        ]
        processes.append(subprocess.Popen([*command, str(repeats)], env=dict(environment), cwd=ROOT))
    for process in processes:
        if process.wait(timeout=TIMEOUT) != 0:
            raise RuntimeError(f"the {kind} benchmark worker failed")
    return dict(json.loads((directory / f"{kind}0").read_text()))


def _hvp_section(repeats: int) -> Section:
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as directory:
        for kind, label in (
            ("mirrored", "MirroredStrategy, 2 logical CPUs"),
            ("multi_worker", "MultiWorkerMirrored, 2 workers"),
        ):
            log(f"distributed: HVP on {kind}")
            result = _run_hvp(kind, repeats, Path(directory))
            single, distributed = result["times"]["one process"], result["times"][kind]
            rows.append([label, milliseconds(single), milliseconds(distributed), ratio(distributed / single)])
            notes.append(f"{label}: relative difference to one process {result['error']:.1e}.")
            nb_params = result["nb_params"]
    return Section(
        title="Distributed Hessian-vector products (tf.distribute)",
        intro=(
            f"One product `H V` with {NUM_VECTORS} vectors on an MLP {FEATURES}-{HIDDEN}-{CLASSES} "
            f"(P = {nb_params:,}, float32) over {NUM_EXAMPLES:,} examples in batches of {BATCH_SIZE}: "
            "`HessianOperator` in one process against `DistributedHessianOperator` (each replica sums its shard in "
            "a graph loop, then one all-reduce of `n × (P + 1)` values). Both are timed in the same subprocess, "
            f"round-robin, median of {repeats}. *Overhead* is distributed time over one-process time; on this "
            "2-core machine the replicas share the cores. Below 1× the distributed operator was faster: its "
            "per-replica loop runs inside one graph, while `HessianOperator` dispatches each batch from Python."
        ),
        columns=["Engine", "One process (ms)", "Distributed (ms)", "Overhead"],
        rows=rows,
        notes=notes,
    )


# ---------------------------------------------------------------------- table 2: Beam scoring pass (.venv-beam)


_BEAM_SCRIPT = (
    """
import json, sys, time, statistics, shutil
import numpy as np
from influenciae.distributed import score_batch
from influenciae.distributed.beam import ScoringJob, run_scoring, read_scoring_output
from influenciae.distributed.records import decode_records, list_files
from influenciae.distributed.state import SolverState, load_influence_model
import tensorflow as tf
directory, repeats = sys.argv[1], int(sys.argv[2])
def one_process():
    model = load_influence_model(directory + "/model.keras")
    state = SolverState.load(directory + "/state.npz", model=model)
    records = [r.numpy() for r in tf.data.TFRecordDataset(list_files(directory + "/train"))]
    values = [score_batch(model, state, decode_records(records[i:i + {batch}])[1], "self_influence")["self_influence"]
              for i in range(0, len(records), {batch})]
    return np.concatenate(values)
def beam(arguments):
    shutil.rmtree(directory + "/out", ignore_errors=True)
    job = ScoringJob(directory + "/train/train-*.tfrecord", directory + "/model.keras", directory + "/state.npz",
                     directory + "/out", mode="self_influence", k=10, batch_size={batch})
    run_scoring(job, arguments)
    return read_scoring_output(directory + "/out")["self_influence"]
memory = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
processes = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
engines = {{
    "one process (loop over the records)": lambda: one_process(),
    "Beam DirectRunner, in memory, 1 worker": lambda: beam(memory),
    "Beam DirectRunner, 2 worker processes": lambda: beam(processes),
}}
times = {{name: [] for name in engines}}
outputs = {{}}
for _ in range(repeats):
    for name, function in engines.items():
        start = time.perf_counter()
        outputs[name] = function()
        times[name].append(time.perf_counter() - start)
reference = outputs["one process (loop over the records)"]
errors = {{name: float(np.max(np.abs(v - reference)) / np.max(np.abs(reference))) for name, v in outputs.items()}}
print(json.dumps({{"times": {{n: statistics.median(t) for n, t in times.items()}}, "errors": errors}}))
""".replace("{batch}", str(BATCH_SIZE))
    .replace("{{", "{")
    .replace("}}", "}")
)


def _beam_section(repeats: int) -> Section:
    title = "Distributed scoring pass (Apache Beam)"
    columns = ["Engine", "Wall time (s)", "Overhead vs one process", "Max relative difference"]
    if not BEAM_PYTHON.exists():
        return Section(title, "Not measured: `.venv-beam` is missing (`make venv-beam`).", columns, [])
    from influenciae.distributed import SolverState
    from influenciae.distributed.records import write_sharded_tfrecords
    from influenciae.hessian import ArnoldiIHVP

    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        model, (x, y, dataset, influence_model) = _problem()
        model.save(directory / "model.keras")
        write_sharded_tfrecords(directory / "train", x, y, num_shards=4)
        im = influence_model(model)
        SolverState.from_solver(
            im, ArnoldiIHVP(im, dataset, subspace_dim=40, k_largest_eig_vals=20, damping=1e-2)
        ).save(directory / "state.npz")
        log("distributed: Beam scoring pass (.venv-beam)")
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
        completed = subprocess.run(
            [str(BEAM_PYTHON), "-c", _BEAM_SCRIPT, str(directory), str(max(1, repeats // 5))],
            env=environment,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        )
        result = json.loads(completed.stdout.strip().splitlines()[-1])
    single = result["times"]["one process (loop over the records)"]
    rows = [
        [engine, f"{seconds:.1f}", ratio(seconds / single), f"{result['errors'][engine]:.1e}"]
        for engine, seconds in result["times"].items()
    ]
    intro = (
        f"Self-influence of {NUM_EXAMPLES:,} training examples read from 4 TFRecord files, batches of {BATCH_SIZE}, "
        f"with a rank-20 Arnoldi solver state (P = {im.nb_params:,}), end to end: the Beam rows include starting the "
        "pipeline and its workers (each loads TensorFlow, the model and the state once, in `DoFn.setup`), writing "
        "one part per batch, merging the top-k and writing the manifest. Measured in `.venv-beam` "
        f"(median of {max(1, repeats // 5)} runs). This is a fixed start-up cost: it is paid once per job, and "
        "amortized over 10⁶–10⁹ examples on a cluster."
    )
    return Section(title, intro, columns, rows)


def run(*, repeats: int) -> list[Section]:
    """Both tables (see the module docstring)."""
    return [_hvp_section(repeats), _beam_section(repeats)]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "hvp-worker":
        _hvp_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        from benchmarks.run_benchmarks import render  # noqa: F401 - same Section class as the harness

        sections = run(repeats=5)
        for section in sections:
            print(f"## {section.title}\n\n{section.intro}\n")
            print("| " + " | ".join(section.columns) + " |")
            print("|" + "|".join("---" for _ in section.columns) + "|")
            for row in section.rows:
                print("| " + " | ".join(row) + " |")
            print()
            for note in section.notes:
                print(note + "\n")
