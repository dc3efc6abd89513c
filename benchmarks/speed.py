"""Our own solver timings, cold and warm, on the problem of issue 15 (digits MLP, 1,000 train × 100 test).

From the repository root::

    .venv/bin/python benchmarks/speed.py                       # every method, both model sizes
    .venv/bin/python benchmarks/speed.py --methods cg lissa --hidden 32

For each model size (hidden width 8: P = 610; 32: P = 2,410) and method it times, in one process, the
self-influence of the 1,000 training examples and the 100 × 1,000 score matrix: **cold** is the first call of the
process for that (method, task) (tracing included), **warm** the same call again on a new calculator (the model's
shared traced functions are reused, the solver is set up again). Wall and CPU seconds, the machine's load before the
run. It is the quick before/after probe of engine changes; ``make bench-peers`` compares with the peer libraries.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

METHODS = ("exact", "cg", "lissa", "arnoldi", "nystrom", "ekfac", "tracin")
NUM_TRAIN, NUM_TEST, BATCH_SIZE, DAMPING = 1000, 100, 50, 0.05


def problem(hidden: int, seed: int = 0) -> dict[str, Any]:
    """The digits MLP ``64 → hidden (tanh) → 10``, trained 20 epochs, and its batched datasets."""
    import keras
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(10)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
    x_train, y_train = x[NUM_TEST : NUM_TEST + NUM_TRAIN], y[NUM_TEST : NUM_TEST + NUM_TRAIN]
    model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=20, verbose=0)

    def batched(a: np.ndarray, b: np.ndarray) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((a, b)).batch(BATCH_SIZE)

    return {
        "model": model,
        "train": batched(x_train, y_train),
        "test": batched(x[:NUM_TEST], y[:NUM_TEST]),
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"),
    }


def calculator(state: dict[str, Any], method: str) -> Any:
    """A new calculator for ``method`` (the solver is set up again: Hessian, factorization, fitting)."""
    from influenciae import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator, InfluenceModel, TracIn

    if method == "tracin":
        return TracIn([state["model"]] * 3, 0.1, loss_function=state["loss"])
    im = state.setdefault("im", InfluenceModel(state["model"], last_layer=-1, loss_function=state["loss"]))
    if method == "arnoldi":
        return ArnoldiInfluenceCalculator(im, state["train"], subspace_dim=100, k_largest_eig_vals=50, damping=DAMPING)
    return FirstOrderInfluenceCalculator(im, state["train"], ihvp_calculator=method, damping=DAMPING)


def task(state: dict[str, Any], method: str, name: str) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        calc = calculator(state, method)
        if name == "self-influence":
            return np.asarray(calc.self_influence(state["train"]))
        if method in ("cg", "lissa"):
            factors = calc.compute_influence_factors(state["test"])
            return np.asarray(calc.influence_from_factors(factors, state["train"]))
        return np.asarray(calc.influence_matrix(state["test"], state["train"]))

    return run


def timed(function: Callable[[], np.ndarray]) -> tuple[float, float, np.ndarray]:
    """Wall and CPU seconds (this process, all threads) of one call."""
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    result = function()
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--hidden", nargs="+", type=int, default=[8, 32])
    tasks = ["self-influence", "matrix"]
    parser.add_argument("--tasks", nargs="+", choices=tasks, default=tasks)
    args = parser.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    print("| P | method | task | cold wall (s) | cold CPU (s) | warm wall (s) | warm CPU (s) | warm vs cold max diff |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for hidden in args.hidden:
        state = problem(hidden)
        params = sum(int(np.prod(w.shape)) for w in state["model"].trainable_weights)
        for method in args.methods:
            for name in args.tasks:
                cold_wall, cold_cpu, first = timed(task(state, method, name))
                warm_wall, warm_cpu, second = timed(task(state, method, name))
                diff = float(np.max(np.abs(first - second))) / max(float(np.max(np.abs(first))), 1e-30)
                print(
                    f"| {params:,} | {method} | {name} | {cold_wall:.2f} | {cold_cpu:.2f} | {warm_wall:.2f} | "
                    f"{warm_cpu:.2f} | {diff:.1e} |",
                    flush=True,
                )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
