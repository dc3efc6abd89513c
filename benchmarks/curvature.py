"""Kronecker-factored curvature at scale: EK-FAC on an MLP with about 2 million parameters and 8,192 examples.

Two tables:

1. the time of each EK-FAC phase (factor fitting, eigendecomposition, eigenvalue correction, scoring) and the memory
   of the factors against the dense Gauss-Newton matrix they stand for;
2. scoring with and without query batching (``FirstOrderInfluenceCalculator(query_rank=...)``): the default path
   solves once per *training* example (timed on a subset and extrapolated: it is linear in N), query batching once
   per *test* example and then streams the training gradients once (timed on the whole training set).

A third table compares per-example gradients rebuilt from the layer capture (``a ⊗ g``) with the vectorized
per-example gradients of ``InfluenceModel`` and with ``tape.jacobian`` on the small models of
:mod:`benchmarks.core`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.run_benchmarks import Check, Section, log, median_times, milliseconds, ratio
from influenciae import EKFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.data import from_numpy
from influenciae.model._backend import keras, tf
from influenciae.model.capture import LayerCapture

__all__ = ["run"]

SEED = 0
INPUTS = 1024
HIDDEN = 1024
CLASSES = 10
TRAIN_EXAMPLES = 8192
TEST_QUERIES = 64
SUBSET = 128  # training examples scored by the default path (it caches [SUBSET, P] influence vectors in memory)
BATCH_SIZE = 256
DAMPING = 1e-3
GRADIENT_BATCH = 32


def _model() -> keras.Model:
    keras.utils.set_random_seed(SEED)
    return keras.Sequential(
        [
            keras.Input((INPUTS,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(CLASSES),
        ]
    )


def _data(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    inputs = rng.standard_normal((TRAIN_EXAMPLES + TEST_QUERIES, INPUTS)).astype("float32")
    logits = model.predict(inputs, batch_size=1024, verbose=0)
    labels = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)  # labels drawn from the model itself
    return inputs, labels.astype("int64")


def _megabytes(count: float) -> str:
    return f"{count / 2**20:,.1f} MB"


def _human_bytes(count: float) -> str:
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:,.0f} B"


def run(*, repeats: int) -> list[Section]:
    model = _model()
    inputs, labels = _data(model)
    im = InfluenceModel(
        model, loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    )
    train = from_numpy(inputs[:TRAIN_EXAMPLES], labels[:TRAIN_EXAMPLES], batch_size=BATCH_SIZE)
    test = from_numpy(inputs[TRAIN_EXAMPLES:], labels[TRAIN_EXAMPLES:], batch_size=TEST_QUERIES)
    subset = from_numpy(inputs[:SUBSET], labels[:SUBSET], batch_size=SUBSET // 4)
    parameters = im.nb_params

    log(f"curvature: fitting EK-FAC on {TRAIN_EXAMPLES} examples, P = {parameters:,}")
    solver = EKFACIHVP(im, train, damping=DAMPING).fit()
    timings = dict(solver.timings)
    factor_bytes = solver.factors_nbytes()
    dense_bytes = float(parameters) ** 2 * 4  # float32

    calculator = FirstOrderInfluenceCalculator(im, train, ihvp_calculator=solver)
    batched = FirstOrderInfluenceCalculator(im, train, ihvp_calculator=solver, query_rank=TEST_QUERIES)
    log("curvature: influence factors of the test queries")
    started = time.perf_counter()
    calculator.compute_influence_factors(test)
    factor_seconds = time.perf_counter() - started
    log("curvature: scoring every training example (query batching)")
    started = time.perf_counter()
    full = batched.influence_matrix(test, train)
    full_seconds = time.perf_counter() - started

    log(f"curvature: default path (a solve per training example) on {SUBSET} training examples")
    started = time.perf_counter()
    default_scores = calculator.influence_matrix(test, subset)
    default_time = time.perf_counter() - started
    agreement = float(np.max(np.abs(default_scores - full[:, :SUBSET])) / np.max(np.abs(default_scores)))
    default_full = default_time / SUBSET * TRAIN_EXAMPLES  # one solve per training example: linear in N
    speedup = default_full / full_seconds

    phases = Section(
        title="EK-FAC at scale: phases and memory",
        intro=(
            f"A {INPUTS}-{HIDDEN}-{HIDDEN}-{CLASSES} tanh MLP (P = {parameters:,} parameters) and "
            f"{TRAIN_EXAMPLES:,} training examples (Gaussian inputs, labels drawn from the model), batch size "
            f"{BATCH_SIZE}, float32 weights, float64 factors. `EKFACIHVP(im, train, damping={DAMPING:g})` with the "
            'exact expected Gauss-Newton statistics (`fisher="expected"`: one backward pass per class). The fitting '
            "phases run once (each is a full pass over the data, or a dense eigendecomposition); scoring is "
            f"{TEST_QUERIES} test queries against all {TRAIN_EXAMPLES:,} training examples with query batching."
        ),
        columns=["Phase", "Time (s)", "Notes"],
        rows=[
            ["factor fitting (A, S)", f"{timings['factors']:.1f}", "one capture pass: a aᵀ and g gᵀ per layer"],
            [
                "eigendecomposition",
                f"{timings['eigendecomposition']:.1f}",
                f"float64 `eigh` of {2 * len(solver.capture.layers)} factors (largest {HIDDEN + 1}²)",
            ],
            ["EK-FAC eigenvalue correction", f"{timings['correction']:.1f}", "second capture pass, rotated (a ⊗ g)²"],
            ["influence factors (test side)", f"{factor_seconds:.1f}", f"{TEST_QUERIES} EK-FAC solves"],
            [
                "scoring (query batching)",
                f"{full_seconds:.1f}",
                f"{TEST_QUERIES} × {TRAIN_EXAMPLES:,} scores: factors, rank-{TEST_QUERIES} compression, one "
                "gradient pass",
            ],
        ],
        notes=[
            f"Factors, eigenbases and eigenvalues take **{_megabytes(factor_bytes)}** (float64); the dense "
            f"Gauss-Newton matrix they stand for would take **{_human_bytes(dense_bytes)}** in float32 "
            f"(P² = {float(parameters) ** 2:.2e} entries).",
        ],
    )
    batching = Section(
        title="EK-FAC scoring with and without query batching",
        intro=(
            f"{TEST_QUERIES} test queries against all {TRAIN_EXAMPLES:,} training examples. Default path: "
            "`influence_matrix` computes the influence vector `(G + λI)⁻¹∇ℓ(z)` of every training example (one "
            f"EK-FAC solve each); it is timed once on the first {SUBSET} training examples and extrapolated "
            "linearly (on all of them it would also need a "
            f"{_human_bytes(TRAIN_EXAMPLES * parameters * 4)} cache of influence vectors). Query batching "
            f"(`query_rank={TEST_QUERIES}`): the {TEST_QUERIES} "
            "test-side factors `(G + λI)⁻¹∇ℓ(x)` once, then one pass over the training gradients, timed once on "
            "the whole training set."
        ),
        columns=["Path", f"Time for {TRAIN_EXAMPLES:,} training examples (s)", "Per training example (ms)"],
        rows=[
            [
                f"default (a solve per training example; measured on {SUBSET})",
                f"≈ {default_full:.0f}",
                milliseconds(default_time / SUBSET),
            ],
            ["query batching (measured)", f"{full_seconds:.0f}", milliseconds(full_seconds / TRAIN_EXAMPLES)],
        ],
        notes=[
            f"Query batching is **{ratio(speedup)}** faster on the whole training set, fixed cost of the "
            f"{TEST_QUERIES} test-side solves ({factor_seconds:.0f} s) included. On the first {SUBSET} training "
            f"examples the two paths agree to {agreement:.1e} (largest difference relative to the largest score).",
        ],
        checks=[
            Check.at_least("EK-FAC query batching vs a solve per training example (2M-parameter MLP)", speedup, 2.0)
        ],
    )
    return [phases, batching, _per_example_section(repeats=repeats)]


def _per_example_section(*, repeats: int) -> Section:
    """Per-example gradients from the layer capture against vectorized_map and tape.jacobian."""
    from benchmarks.core import small_cnn, small_mlp

    rows = []
    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    workloads: list[tuple[str, Any, np.ndarray]] = [
        ("small CNN", small_cnn(), rng.standard_normal((GRADIENT_BATCH, 28, 28, 1)).astype("float32")),
        ("small MLP", small_mlp(), rng.standard_normal((GRADIENT_BATCH, 32)).astype("float32")),
    ]
    for name, model, inputs in workloads:
        labels = rng.integers(0, CLASSES, GRADIENT_BATCH)
        im = InfluenceModel(  # the vectorized map, whatever the default for this model
            model,
            loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"),
            per_example_gradients="vectorized",
        )
        batch = (tf.constant(inputs), tf.constant(labels))
        functions = _gradient_functions(im, batch)
        log(f"curvature: per-example gradients, {name}")
        captured, vectorized, jacobian = median_times(functions, repeats=repeats)
        rebuilt, reference = functions[0]().numpy(), functions[1]().numpy()
        difference = float(np.max(np.abs(rebuilt - reference)) / np.max(np.abs(reference)))
        rows.append(
            [
                f"{name} (P = {im.nb_params:,})",
                milliseconds(captured),
                milliseconds(vectorized),
                milliseconds(jacobian),
                ratio(jacobian / captured),
                f"{difference:.0e}",
            ]
        )
    return Section(
        title="Per-example gradients from the layer capture",
        intro=(
            f"Per-example gradients of a batch of {GRADIENT_BATCH}: rebuilt from the captured layer inputs and "
            "pre-activation gradients (`LayerCapture.per_example_gradients`, `Σ_t a_t ⊗ g_t`), the library's "
            '`batch_jacobian_tensor` with `per_example_gradients="vectorized"` (`tf.vectorized_map` of '
            "per-example tapes) and `tape.jacobian` of the batch's losses. Times in ms; the last column is the "
            "largest difference between the capture and `batch_jacobian_tensor`, relative to the largest gradient "
            "entry. Informational: the capture (its public, eagerly chunked call here) is the default "
            "`per_example_gradients` of models with convolutions (§1 times the traced one), where pfor runs the "
            "filter gradient as a loop over the examples; on Dense layers the vectorized map's batched matmuls are "
            "faster."
        ),
        columns=[
            "Model",
            "capture (a ⊗ g)",
            "vectorized_map",
            "tape.jacobian",
            "capture speed-up vs jacobian",
            "rel. difference",
        ],
        rows=rows,
    )


def _gradient_functions(im: InfluenceModel, batch: tuple[tf.Tensor, tf.Tensor]) -> list[Any]:
    capture = LayerCapture(im)
    jacobian_fn = tf.function(lambda x, y: _tape_jacobian(im, x, y))
    return [
        lambda: capture.per_example_gradients(batch),
        lambda: im.batch_jacobian_tensor(batch),
        lambda: jacobian_fn(*batch),
    ]


def _tape_jacobian(im: InfluenceModel, inputs: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    weights = [w.value for w in im.weights]
    with tf.GradientTape() as tape:
        losses = im.loss_function(labels, im.model(inputs, training=False))
    jacobians = tape.jacobian(losses, weights)
    return tf.concat([tf.reshape(j, [tf.shape(losses)[0], -1]) for j in jacobians], axis=1)
