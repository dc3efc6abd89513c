"""The problem every library solves in the peer comparison, and the measurement protocol of the workers.

This module is imported by the orchestrator (our ``.venv``) and by every worker, each in its own virtual environment
(TensorFlow + tf_keras for Influenciae 0.3.0, torch for Captum and pyDVL), so it uses the standard library and NumPy
only.

The problem: scikit-learn's digits (64 pixels in ``[0, 1]``, 10 classes), an MLP ``64 → H (tanh) → 10`` (logits;
``H = 8``: ``P = 610`` parameters, ``H = 32``: ``P = 2,410``) trained by our side with plain SGD on the mean
cross-entropy, exported with its weights (final and per checkpoint) to one ``.npz`` file per (hidden width,
training-set size). The hidden width is part of the file: every worker reads it from the exported kernel shapes
(:attr:`Problem.hidden_units`). Every library evaluates that same function:

* Keras ``Dense``: ``y = x @ kernel + bias`` with ``kernel [in, out]``.
* torch ``nn.Linear``: ``y = x @ weight.T + bias`` with ``weight [out, in] = kernel.T``.

so the torch workers load ``weight = kernel.T`` (:func:`torch_layers`) and tf_keras loads the kernels as they are.
Influence conventions are converted to ours (``docs/benchmarks.md``, "Conventions") by :data:`SCALE_RULES` in
``run_peers.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN_UNITS = 8  # the default hidden width of ``ours.py prepare``; workers read it from the problem file
HIDDEN_WIDTHS = (8, 32)  # P = 610 and P = 2,410: the two model sizes of the comparison
NUM_CLASSES = 10
NUM_FEATURES = 64
TEST_SIZE = 50
TOP_K = 10
BATCH_SIZE = 50  # every library reads the data in batches of this size (Hessian batches too)
DAMPING = 0.05  # λ in (H + λI), H the Hessian of the MEAN training loss (its lowest eigenvalue is about -0.03)
LEARNING_RATE = 0.1  # plain SGD, constant: the TracIn learning rate of every checkpoint
CHECKPOINT_EPOCHS = (10, 20, 30)  # TracIn checkpoints; the last one is the final model
CG_TOLERANCE = 1e-4  # relative residual (pyDVL's default; float32 stalls near 1e-6)
CG_MAX_ITERATIONS = 500
LISSA_DEPTH = 100  # a fixed number of full-batch LiSSA steps for every library (no early stop)
ARNOLDI_SUBSPACE = 200  # Krylov dimension
ARNOLDI_RANK = 50  # eigenpairs kept
NYSTROM_RANK = 50  # Nyström sketch size (ours and pyDVL's NystroemSketchInfluence)
WARM_RELATIVE_TOLERANCE = 1e-6  # the warm repeat must reproduce the cold scores: max |warm − cold| / max |cold|

METHODS = ("exact", "cg", "lissa", "arnoldi", "nystrom", "ekfac", "tracin", "tracin_fast")
TASKS = ("self", "matrix", "topk")


@dataclass(frozen=True)
class Problem:
    """One training-set size of the problem, as exported by ``ours.py prepare``.

    Attributes:
        x_train: ``[N, 64]`` float32.
        y_train: ``[N]`` int64 class labels.
        x_test: ``[TEST_SIZE, 64]`` float32.
        y_test: ``[TEST_SIZE]`` int64.
        layers: ``[(kernel [in, out], bias [out]), ...]`` final weights, Keras layout.
        checkpoints: One such list per TracIn checkpoint (the last equals ``layers``).
        lissa_scale: The LiSSA scale ``s`` shared by every library (``1.1 λ_max(H + λI)``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]
    checkpoints: list[list[tuple[np.ndarray, np.ndarray]]]
    lissa_scale: float

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_params(self) -> int:
        return sum(kernel.size + bias.size for kernel, bias in self.layers)

    @property
    def hidden_units(self) -> int:
        """The hidden width ``H``, read from the first kernel ``[64, H]``."""
        return int(self.layers[0][0].shape[1])


def save_problem(path: str | os.PathLike, problem: Problem) -> None:
    """Write ``problem`` to one ``.npz`` file."""
    arrays: dict[str, np.ndarray] = {
        "x_train": problem.x_train,
        "y_train": problem.y_train,
        "x_test": problem.x_test,
        "y_test": problem.y_test,
        "lissa_scale": np.asarray(problem.lissa_scale),
        "num_checkpoints": np.asarray(len(problem.checkpoints)),
    }
    for prefix, layers in [("final", problem.layers)] + [(f"ckpt{c}", w) for c, w in enumerate(problem.checkpoints)]:
        for index, (kernel, bias) in enumerate(layers):
            arrays[f"{prefix}_kernel{index}"] = kernel
            arrays[f"{prefix}_bias{index}"] = bias
    np.savez(path, **arrays)


def load_problem(path: str | os.PathLike) -> Problem:
    """Read a problem written by :func:`save_problem`."""
    with np.load(path) as data:

        def layers(prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
            count = sum(1 for name in data.files if name.startswith(f"{prefix}_kernel"))
            return [(data[f"{prefix}_kernel{i}"], data[f"{prefix}_bias{i}"]) for i in range(count)]

        return Problem(
            x_train=data["x_train"],
            y_train=data["y_train"],
            x_test=data["x_test"],
            y_test=data["y_test"],
            layers=layers("final"),
            checkpoints=[layers(f"ckpt{c}") for c in range(int(data["num_checkpoints"]))],
            lissa_scale=float(data["lissa_scale"]),
        )


def torch_layers(layers: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(weight [out, in], bias [out])`` for ``nn.Linear``: the Keras kernel transposed."""
    return [(np.ascontiguousarray(kernel.T), bias) for kernel, bias in layers]


def torch_style_logits(layers: list[tuple[np.ndarray, np.ndarray]], inputs: np.ndarray) -> np.ndarray:
    """The MLP's logits computed the way the torch workers do, from :func:`torch_layers` weights.

    ``x @ weight.T + bias`` per layer, tanh between layers. Used by the tests to prove that the exported weights
    reproduce the Keras outputs.
    """
    hidden = inputs
    for index, (weight, bias) in enumerate(layers):
        hidden = hidden @ weight.T + bias
        if index + 1 < len(layers):
            hidden = np.tanh(hidden)
    return hidden


def per_example_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``-log softmax(logits)[label]`` per row, computed stably."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probabilities[np.arange(len(labels)), labels]


# ---------------------------------------------------------------------- worker protocol


@dataclass(frozen=True)
class Job:
    """One measurement: a library computes one task with one method at one training-set size.

    Attributes:
        problem: Path of the ``.npz`` problem.
        method: One of :data:`METHODS`.
        task: ``"self"`` (self-influence of the training set), ``"matrix"`` (test × train scores) or ``"topk"``
            (the :data:`TOP_K` most positive training examples of every test example).
        output: Path prefix of the result files (``.json`` report, ``.npz`` scores).
        train_limit: Score only the first ``train_limit`` training examples (the Hessian still uses all of
            them); for peers too slow to run the whole set. ``None``: all.
    """

    problem: str
    method: str
    task: str
    output: str
    train_limit: int | None = None

    def to_arguments(self) -> list[str]:
        arguments = ["--problem", self.problem, "--method", self.method, "--task", self.task, "--output", self.output]
        if self.train_limit is not None:
            arguments += ["--train-limit", str(self.train_limit)]
        return arguments


def parse_job(argv: list[str] | None = None) -> Job:
    parser = argparse.ArgumentParser(description="Run one peer-comparison measurement.")
    parser.add_argument("--problem", required=True)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--output", required=True)
    parser.add_argument("--train-limit", type=int, default=None)
    args = parser.parse_args(argv)
    return Job(args.problem, args.method, args.task, args.output, args.train_limit)


def peak_rss_mib() -> float:
    """High-water resident set size of this process so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float:
    """The machine's 1-minute load average (NaN where unavailable)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return float("nan")


def relative_difference(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> float:
    """``max |first − second| / max |first|`` over the score arrays (``scores``, or top-k ``values``)."""
    name = "scores" if "scores" in first else "values"
    a, b = np.asarray(first[name], dtype=np.float64), np.asarray(second[name], dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-300)) if a.size else 0.0


def timed(function: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds)`` of ``function()``."""
    cpu = cpu_seconds()
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start, cpu_seconds() - cpu


def run_job(
    job: Job,
    setup: Callable[[Problem, Job], Any],
    compute: Callable[[Any, Job], dict[str, np.ndarray]],
    limit: Callable[[Any, Problem, Job, dict[str, np.ndarray]], dict[str, float]] | None = None,
) -> None:
    """Load, set up (untimed), compute twice (cold, then the warm repeat), and write the report and the scores.

    ``setup`` builds the models and datasets (framework imports and model loading are excluded from the time);
    ``compute`` does everything else, solver construction (Hessian, factorization, Arnoldi) included, and returns
    numpy arrays: ``{"scores": ...}`` for ``self``/``matrix``, ``{"indices": ..., "values": ...}`` for ``topk``.
    The first call is the **cold** one (tracing, first-use costs); the second, in the same process on the same
    state, is the **warm** repeat (solver set-up again, traced functions and caches of the framework reused). The
    saved scores and the agreement are those of the cold call; ``warm_relative_difference`` says how far the warm
    scores are from them. ``limit`` (optional, untimed here) returns extra report fields, e.g. the time of the
    arithmetic limit of the task.
    """
    problem = load_problem(job.problem)
    load_start = load_average()
    state = setup(problem, job)
    rss_before = peak_rss_mib()
    result, seconds, cpu = timed(lambda: compute(state, job))
    peak = peak_rss_mib()
    warm, warm_seconds, warm_cpu = timed(lambda: compute(state, job))
    np.savez(job.output + ".npz", **{name: np.asarray(value) for name, value in result.items()})
    report: dict[str, Any] = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "warm_seconds": warm_seconds,
        "warm_cpu_seconds": warm_cpu,
        "warm_relative_difference": relative_difference(result, warm),
        "peak_rss_mib": peak,
        "rss_before_mib": rss_before,
        "num_train": problem.num_train,
        "num_params": problem.num_params,
        "hidden_units": problem.hidden_units,
        "train_limit": job.train_limit,
    }
    if limit is not None:
        report.update(limit(state, problem, job, result))
    report["load_start"] = load_start
    report["load_end"] = load_average()
    Path(job.output + ".json").write_text(json.dumps(report), encoding="utf-8")
    print(json.dumps(report), file=sys.stderr)


def scored_train(problem: Problem, job: Job) -> tuple[np.ndarray, np.ndarray]:
    """The training examples that are scored (the first ``train_limit``, or all)."""
    limit = problem.num_train if job.train_limit is None else min(job.train_limit, problem.num_train)
    return problem.x_train[:limit], problem.y_train[:limit]
