"""The original Influenciae 0.3.0 (deel-ai) on the shared problem: one measurement per process.

Runs in ``.venv-peers/influenciae030`` (tensorflow-cpu 2.21, tf_keras, ``influenciae==0.3.0 --no-deps``) with
``TF_USE_LEGACY_KERAS=1``; ``run_peers.py`` starts it. The MLP is rebuilt in tf_keras and given the exported kernels
unchanged (same layout as Keras 3).

Damping. Influenciae 0.3.0's Hessian is that of the mean of ``loss_function`` over the Hessian dataset, without a
damping option for the exact, CG and Arnoldi solvers. The damping is given to it through the loss function: the
per-example loss is ``CE + (λ/2) Σ ‖w − stop_gradient(w)‖²`` whose added term is 0 and has gradient 0 at the current
weights (so scores and per-example gradients are unchanged) but Hessian ``λI``: every Hessian the library forms
(``tape.jacobian`` of the per-example gradients, forward-over-backward HVPs) becomes ``H + λI``. LiSSA has its own
``damping`` argument: its recursion ``v + (1 − d) h − H h / s`` solves ``(H + s·d I) x = v``, so ``d = λ / s``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import problem as spec  # noqa: E402

EXACT_HESSIAN_BATCH = 10


def build_model(layers: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    import tensorflow as tf

    hidden = int(layers[0][0].shape[1])  # the width is part of the problem file (kernel [64, H])
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Dense(hidden, activation="tanh", input_shape=(spec.NUM_FEATURES,)),
            tf.keras.layers.Dense(spec.NUM_CLASSES),
        ]
    )
    model.set_weights([array for pair in layers for array in pair])
    return model


def damped_loss(model: Any, damping: float) -> Any:
    """Per-example cross-entropy plus a zero-valued, zero-gradient term whose Hessian is ``damping · I``."""
    import tensorflow as tf

    cross_entropy = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )
    weights = model.trainable_weights

    def loss(y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        values = cross_entropy(y_true, y_pred, sample_weight)
        if damping:
            penalty = tf.add_n([tf.reduce_sum(tf.square(w - tf.stop_gradient(w))) for w in weights])
            values = values + 0.5 * damping * penalty
        return values

    return loss


def setup(problem: spec.Problem, job: spec.Job) -> dict[str, Any]:
    import tensorflow as tf
    from deel.influenciae.common import InfluenceModel

    tf.random.set_seed(0)
    x_scored, y_scored = spec.scored_train(problem, job)

    def dataset(x: np.ndarray, y: np.ndarray, batch_size: int = spec.BATCH_SIZE) -> Any:
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)

    # ExactIHVP takes `tape.jacobian` of the [B, P] per-example gradients: nested pfor whose memory grows like
    # B² P (batches of 50 took 21 GB with P = 1210); it gets its Hessian in smaller batches.
    hessian_batch = EXACT_HESSIAN_BATCH if job.method == "exact" else spec.BATCH_SIZE
    state: dict[str, Any] = {
        "hessian_set": dataset(problem.x_train, problem.y_train, hessian_batch),
        "train_set": dataset(x_scored, y_scored),
        "test_set": dataset(problem.x_test, problem.y_test),
        "x_scored": x_scored,
        "lissa_scale": problem.lissa_scale,
    }
    if job.method == "tracin":
        state["models"] = []
        for layers in problem.checkpoints:
            model = build_model(layers)
            state["models"].append(InfluenceModel(model, 0, -1, loss_function=damped_loss(model, 0.0)))
    else:
        model = build_model(problem.layers)
        state["keras_model"] = model
        # start_layer=0, last_layer=-1: all weights (the default watches the last layer only).
        state["model"] = InfluenceModel(model, 0, -1, loss_function=damped_loss(model, spec.DAMPING))
    return state


def calculator(state: dict[str, Any], method: str) -> Any:
    import tensorflow as tf
    from deel.influenciae.common import ConjugateGradientDescentIHVP, ExactIHVP, LissaIHVP
    from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator
    from deel.influenciae.trac_in import TracIn

    if method == "tracin":
        return TracIn(state["models"], spec.LEARNING_RATE)
    model, hessian_set = state["model"], state["hessian_set"]
    if method == "arnoldi":
        return ArnoldiInfluenceCalculator(
            model, hessian_set, spec.ARNOLDI_SUBSPACE, True, spec.ARNOLDI_RANK, dtype=tf.float32
        )
    # The iterative solvers split the model at `extractor_layer`; 0 with an identity extractor watches everything.
    identity = tf.keras.Sequential([tf.keras.layers.Lambda(lambda x: x, input_shape=(spec.NUM_FEATURES,))])
    if method == "exact":
        ihvp = ExactIHVP(model, hessian_set)
    elif method == "cg":
        ihvp = ConjugateGradientDescentIHVP(
            model, 0, hessian_set, n_opt_iters=spec.CG_MAX_ITERATIONS, feature_extractor=identity
        )
    else:
        scale = state["lissa_scale"]
        # The damping is LiSSA's own here: the loss's penalty would add λ twice, so use an undamped loss.
        from deel.influenciae.common import InfluenceModel

        keras_model = state["keras_model"]
        undamped = InfluenceModel(keras_model, 0, -1, loss_function=damped_loss(keras_model, 0.0))
        state["model"] = model = undamped
        ihvp = LissaIHVP(
            model,
            0,
            hessian_set,
            n_opt_iters=spec.LISSA_DEPTH,
            feature_extractor=identity,
            damping=spec.DAMPING / scale,
            scale=scale,
        )
    return FirstOrderInfluenceCalculator(model, hessian_set, ihvp_calculator=ihvp)


def _indices_of(samples: np.ndarray, x_train: np.ndarray) -> np.ndarray:
    """Influenciae 0.3.0's top-k returns training samples, not indices: find each sample's row."""
    rows = {row.tobytes(): index for index, row in reversed(list(enumerate(x_train)))}
    flat = samples.reshape(-1, samples.shape[-1]).astype(x_train.dtype)
    return np.array([rows.get(row.tobytes(), -1) for row in flat]).reshape(samples.shape[:-1])


def compute(state: dict[str, Any], job: spec.Job) -> dict[str, np.ndarray]:
    calc = calculator(state, job.method)
    train_set, test_set = state["train_set"], state["test_set"]
    if job.task == "self":
        values = [np.asarray(v).reshape(-1) for _, v in calc.compute_influence_values(train_set)]
        return {"scores": np.concatenate(values)}
    if job.task == "matrix":
        rows = []
        for _, per_train in calc.estimate_influence_values_in_batches(test_set, train_set):
            rows.append(np.concatenate([np.asarray(v) for _, v in per_train], axis=1))
        return {"scores": np.concatenate(rows, axis=0)}
    from deel.influenciae.utils import LinearNearestNeighbors

    values, samples = [], []
    for _, top_values, top_samples in calc.top_k(
        test_set, train_set, k=spec.TOP_K, nearest_neighbors=LinearNearestNeighbors()
    ):
        values.append(np.asarray(top_values))
        samples.append(np.asarray(top_samples))
    return {"indices": _indices_of(np.concatenate(samples), state["x_scored"]), "values": np.concatenate(values)}


if __name__ == "__main__":
    spec.run_job(spec.parse_job(), setup, compute)
