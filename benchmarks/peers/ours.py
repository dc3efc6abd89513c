"""Our side of the peer comparison: ``prepare`` trains and exports the problem, ``measure`` runs one job.

Run with our ``.venv`` python (``run_peers.py`` does)::

    .venv/bin/python benchmarks/peers/ours.py prepare --directory DIR --sizes 500 1500
    .venv/bin/python benchmarks/peers/ours.py measure --problem DIR/problem_500.npz --method exact --task self \
        --output DIR/out/ours_exact_self_500
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import problem as spec  # noqa: E402


def build_model(layers: list[tuple[np.ndarray, np.ndarray]] | None = None) -> Any:
    """The Keras MLP ``64 → 8 (tanh) → 10`` (logits), with ``layers`` weights when given."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((spec.NUM_FEATURES,)),
            keras.layers.Dense(spec.HIDDEN_UNITS, activation="tanh"),
            keras.layers.Dense(spec.NUM_CLASSES),
        ]
    )
    if layers is not None:
        model.set_weights([array for pair in layers for array in pair])
    return model


def loss_function() -> Any:
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def _layers_of(model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    weights = [np.asarray(w, dtype=np.float32) for w in model.get_weights()]
    return [(weights[i], weights[i + 1]) for i in range(0, len(weights), 2)]


def dataset(x: np.ndarray, y: np.ndarray) -> Any:
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(spec.BATCH_SIZE)


# ---------------------------------------------------------------------- prepare


def prepare(directory: Path, sizes: list[int], seed: int = 0) -> list[Path]:
    """Train one model per training-set size on digits and export each problem to ``problem_<N>.npz``."""
    import keras
    from sklearn.datasets import load_digits

    from influenciae import InfluenceModel, LissaIHVP

    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x_all))
    x_all, y_all = x_all[order], y_all[order]
    x_test, y_test = x_all[: spec.TEST_SIZE], y_all[: spec.TEST_SIZE]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for size in sizes:
        if spec.TEST_SIZE + size > len(x_all):
            raise ValueError(f"digits has {len(x_all)} examples: at most {len(x_all) - spec.TEST_SIZE} for training.")
        x_train = x_all[spec.TEST_SIZE : spec.TEST_SIZE + size]
        y_train = y_all[spec.TEST_SIZE : spec.TEST_SIZE + size]
        keras.utils.set_random_seed(seed)
        model = build_model()
        model.compile(
            optimizer=keras.optimizers.SGD(spec.LEARNING_RATE),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),  # mean over the batch
        )
        checkpoints = []
        epoch = 0
        for target in spec.CHECKPOINT_EPOCHS:
            model.fit(x_train, y_train, batch_size=spec.BATCH_SIZE, epochs=target - epoch, verbose=0, shuffle=True)
            epoch = target
            checkpoints.append(_layers_of(model))
        influence_model = InfluenceModel(model, loss_function=loss_function())
        scale = LissaIHVP(influence_model, dataset(x_train, y_train), damping=spec.DAMPING, power_iterations=50).scale
        problem = spec.Problem(x_train, y_train, x_test, y_test, checkpoints[-1], checkpoints, float(scale))
        path = directory / f"problem_{size}.npz"
        spec.save_problem(path, problem)
        logits = np.asarray(model(x_train))
        accuracy = float(np.mean(np.argmax(logits, axis=1) == y_train))
        test_accuracy = float(np.mean(np.argmax(np.asarray(model(x_test)), axis=1) == y_test))
        print(
            f"prepared N={size}: P={problem.num_params}, train accuracy {accuracy:.3f}, test accuracy "
            f"{test_accuracy:.3f}, LiSSA scale {scale:.3f}",
            file=sys.stderr,
        )
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- measure


def setup(problem: spec.Problem, job: spec.Job) -> dict[str, Any]:
    from influenciae import InfluenceModel

    x_scored, y_scored = spec.scored_train(problem, job)
    state: dict[str, Any] = {
        "hessian_set": dataset(problem.x_train, problem.y_train),
        "train_set": dataset(x_scored, y_scored),
        "test_set": dataset(problem.x_test, problem.y_test),
    }
    if job.method == "tracin":
        state["models"] = [build_model(layers) for layers in problem.checkpoints]
    else:
        state["model"] = InfluenceModel(build_model(problem.layers), loss_function=loss_function())
    state["lissa_scale"] = problem.lissa_scale
    return state


def calculator(state: dict[str, Any], method: str) -> Any:
    """Our calculator for ``method``, configured like the peers (see ``run_peers.py``)."""
    from influenciae import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator, TracIn

    if method == "tracin":
        return TracIn(state["models"], spec.LEARNING_RATE, loss_function=loss_function())
    model, hessian_set = state["model"], state["hessian_set"]
    if method == "arnoldi":
        return ArnoldiInfluenceCalculator(
            model,
            hessian_set,
            subspace_dim=spec.ARNOLDI_SUBSPACE,
            k_largest_eig_vals=spec.ARNOLDI_RANK,
            damping=spec.DAMPING,
        )
    options: dict[str, Any] = {}
    if method == "cg":
        options = {"tolerance": spec.CG_TOLERANCE, "max_iterations": spec.CG_MAX_ITERATIONS}
    elif method == "lissa":
        # A fixed number of deterministic (full-batch) steps, as the peers run: the tolerance never stops it early.
        options = {"scale": state["lissa_scale"], "depth": spec.LISSA_DEPTH, "tolerance": 1e-30}
    return FirstOrderInfluenceCalculator(
        model, hessian_set, ihvp_calculator=method, damping=spec.DAMPING, ihvp_options=options
    )


def compute(state: dict[str, Any], job: spec.Job) -> dict[str, np.ndarray]:
    calc = calculator(state, job.method)
    train_set, test_set = state["train_set"], state["test_set"]
    if job.task == "self":
        return {"scores": calc.self_influence(train_set)}
    if job.task == "matrix":
        if job.method in ("cg", "lissa"):
            # Iterative solvers: precondition the 50 test gradients (influence factors) instead of the N training
            # gradients, as pyDVL does; same scores (DESIGN.md §3, FirstOrderInfluenceCalculator docs).
            factors = calc.compute_influence_factors(test_set)
            return {"scores": calc.influence_from_factors(factors, train_set)}
        return {"scores": calc.influence_matrix(test_set, train_set)}
    indices, values = calc.most_influential(test_set, train_set, k=spec.TOP_K)
    return {"indices": indices, "values": values}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prepare":
        parser = argparse.ArgumentParser(description="Train and export the peer-comparison problems.")
        parser.add_argument("--directory", type=Path, required=True)
        parser.add_argument("--sizes", type=int, nargs="+", required=True)
        args = parser.parse_args(argv[1:])
        prepare(args.directory, args.sizes)
        return 0
    if argv and argv[0] == "measure":
        argv = argv[1:]
    spec.run_job(spec.parse_job(argv), setup, compute)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
