"""Our side of the peer comparison: ``prepare`` trains and exports the problem, ``measure`` runs one job.

Run with our ``.venv`` python (``run_peers.py`` does)::

    .venv/bin/python benchmarks/peers/ours.py prepare --directory DIR --sizes 1000 --hidden 8 32
    .venv/bin/python benchmarks/peers/ours.py measure --problem DIR/problem_h8_n1000.npz --method exact \
        --task self --output DIR/out/ours_exact_self_h8_n1000
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


def build_model(layers: list[tuple[np.ndarray, np.ndarray]] | None = None, hidden: int | None = None) -> Any:
    """The Keras MLP ``64 → H (tanh) → 10`` (logits), with ``layers`` weights when given.

    ``H`` is read from ``layers`` (kernel ``[64, H]``) when given, else ``hidden`` (default
    :data:`problem.HIDDEN_UNITS`).
    """
    import keras

    if layers is not None:
        hidden = int(layers[0][0].shape[1])
    model = keras.Sequential(
        [
            keras.Input((spec.NUM_FEATURES,)),
            keras.layers.Dense(spec.HIDDEN_UNITS if hidden is None else hidden, activation="tanh"),
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


def problem_name(hidden: int, size: int) -> str:
    """File name of the problem with hidden width ``hidden`` and ``size`` training examples."""
    return f"problem_h{hidden}_n{size}.npz"


def prepare(
    directory: Path, sizes: list[int], seed: int = 0, hiddens: tuple[int, ...] = (spec.HIDDEN_UNITS,)
) -> list[Path]:
    """Train one model per (hidden width, training-set size) on digits and export each to :func:`problem_name`."""
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
    for hidden, size in [(h, n) for h in hiddens for n in sizes]:
        if spec.TEST_SIZE + size > len(x_all):
            raise ValueError(f"digits has {len(x_all)} examples: at most {len(x_all) - spec.TEST_SIZE} for training.")
        x_train = x_all[spec.TEST_SIZE : spec.TEST_SIZE + size]
        y_train = y_all[spec.TEST_SIZE : spec.TEST_SIZE + size]
        keras.utils.set_random_seed(seed)
        model = build_model(hidden=hidden)
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
        path = directory / problem_name(hidden, size)
        spec.save_problem(path, problem)
        logits = np.asarray(model(x_train))
        accuracy = float(np.mean(np.argmax(logits, axis=1) == y_train))
        test_accuracy = float(np.mean(np.argmax(np.asarray(model(x_test)), axis=1) == y_test))
        print(
            f"prepared H={hidden} N={size}: P={problem.num_params}, train accuracy {accuracy:.3f}, test accuracy "
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
    if job.method in ("tracin", "tracin_fast"):
        state["models"] = [build_model(layers) for layers in problem.checkpoints]
    else:
        state["model"] = InfluenceModel(build_model(problem.layers), loss_function=loss_function())
    state["lissa_scale"] = problem.lissa_scale
    return state


def calculator(state: dict[str, Any], method: str) -> Any:
    """Our calculator for ``method``, configured like the peers (see ``run_peers.py``)."""
    from influenciae import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator, TracIn, TracInCPFast

    if method == "tracin":
        return TracIn(state["models"], spec.LEARNING_RATE, loss_function=loss_function())
    if method == "tracin_fast":  # the last Dense layer's kernel and bias, without per-example backward passes
        return TracInCPFast(state["models"], spec.LEARNING_RATE, loss_function=loss_function())
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
    if method == "nystrom":
        options = {"rank": spec.NYSTROM_RANK}  # of the Hessian (curvature="hessian"), as pyDVL's sketch
    elif method == "ekfac":
        # Absolute damping λ only, the exact (expected) Gauss-Newton statistics; run_peers.py lists how pyDVL's differ.
        options = {"fisher": "expected", "relative_damping": 0.0}
    elif method == "cg":
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


def numpy_limit(
    state: dict[str, Any], problem: spec.Problem, job: spec.Job, result: dict[str, np.ndarray]
) -> dict[str, float]:
    """The arithmetic limit of the exact method: the float64 NumPy closed form given ``G`` and ``H + λI``.

    Untimed here: the per-example gradients of the scored training set ``G [N, P]`` and of the test set
    ``[T, P]`` and the dense damped Hessian ``[P, P]`` (our exact solver's matrix) are formed first; then only the
    dense solve and the products are timed, best of three: ``diag(G (H + λI)⁻¹ Gᵀ)`` for self-influence,
    ``G_test (H + λI)⁻¹ Gᵀ`` for the matrix (and an ``argpartition`` for top-k). Returns ``limit_seconds`` and
    ``limit_relative_difference`` (how far those float64 scores are from our cold ones).
    """
    if job.method != "exact":
        return {}
    import time

    from influenciae import ExactIHVP

    model = state["model"]
    hessian = np.asarray(ExactIHVP(model, state["hessian_set"], damping=spec.DAMPING).matrix, dtype=np.float64)
    train = np.asarray(model.batch_jacobian(state["train_set"]), dtype=np.float64)
    test = np.asarray(model.batch_jacobian(state["test_set"]), dtype=np.float64)

    def closed_form() -> dict[str, np.ndarray]:
        if job.task == "self":
            solved = np.linalg.solve(hessian, train.T)  # [P, N]
            return {"scores": np.einsum("np,pn->n", train, solved)}
        scores = np.linalg.solve(hessian, test.T).T @ train.T  # [T, N]
        if job.task == "matrix":
            return {"scores": scores}
        top = np.argpartition(-scores, spec.TOP_K - 1, axis=1)[:, : spec.TOP_K]
        values = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-values, axis=1)
        return {"indices": np.take_along_axis(top, order, axis=1), "values": np.take_along_axis(values, order, axis=1)}

    times = []
    for _ in range(3):
        start = time.perf_counter()
        scores = closed_form()
        times.append(time.perf_counter() - start)
    return {"limit_seconds": min(times), "limit_relative_difference": spec.relative_difference(scores, result)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prepare":
        parser = argparse.ArgumentParser(description="Train and export the peer-comparison problems.")
        parser.add_argument("--directory", type=Path, required=True)
        parser.add_argument("--sizes", type=int, nargs="+", required=True)
        parser.add_argument("--hidden", type=int, nargs="+", default=[spec.HIDDEN_UNITS], help="hidden widths")
        args = parser.parse_args(argv[1:])
        prepare(args.directory, args.sizes, hiddens=tuple(args.hidden))
        return 0
    if argv and argv[0] == "measure":
        argv = argv[1:]
    spec.run_job(spec.parse_job(argv), setup, compute, numpy_limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
