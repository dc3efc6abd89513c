"""Influence-engine benchmarks (DESIGN.md §5): influence-vector throughput and top-k over 10⁶ training vectors.

Two tables:

1. influence vectors (and self-influence) for a whole training set against one training epoch over the same
   examples and batch size, on the small MLP and the small CNN of :mod:`benchmarks.core`;
2. top-k over 10⁶ random training vectors for a block of queries: ``LinearNearestNeighbors`` against a reference
   written here (blocked matmul + ``tf.math.top_k`` in one ``tf.function``), with ``StreamingTopK`` and a flat
   ``FaissNearestNeighbors`` for information; every strategy must return the reference's indices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.core import small_cnn, small_mlp
from benchmarks.run_benchmarks import Check, Section, log, median_times, milliseconds, ratio
from influenciae import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.model._backend import keras, tf
from influenciae.search import FaissNearestNeighbors, LinearNearestNeighbors, StreamingTopK

__all__ = ["run"]

SEED = 0
NUM_CLASSES = 10
BATCH_SIZE = 128
# The CNN gets fewer examples than the MLP so that `make bench` stays within about 8 minutes on 2 cores: the
# ratios are per example, so N only amortizes the per-pass setup (building the tf.data pipelines).
TRAIN_EXAMPLES = {"MLP": 4096, "CNN": 1024}
HESSIAN_EXAMPLES = 256  # n_samples_for_hessian: the Arnoldi iteration runs on the first examples only
ARNOLDI_SUBSPACE = 20
ARNOLDI_RANK = 10
DAMPING = 1e-3
LEARNING_RATE = 0.01

TOP_K_TRAIN = 1_000_000
TOP_K_DIM = 64
TOP_K_QUERIES = 128  # one test batch; 256 doubles the section's time (query time grows linearly with it)
TOP_K = 10
SCORES_BUDGET = 2**25  # scores held at once by the reference: the same budget as LinearNearestNeighbors' default


class Recorded:
    """Wraps a function and keeps its last result, so that timed calls also provide the values to check."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function
        self.last: Any = None

    def __call__(self) -> Any:
        self.last = self.function()
        return self.last


# ---------------------------------------------------------------------- 1. influence vectors vs a training epoch


@dataclass(frozen=True)
class ThroughputWorkload:
    """A wrapped model, its training set and the two calculators whose influence vectors are timed."""

    name: str
    model: keras.Model
    im: InfluenceModel
    dataset: tf.data.Dataset
    examples: int
    first_order: FirstOrderInfluenceCalculator
    arnoldi: ArnoldiInfluenceCalculator
    build_seconds: float  # the Arnoldi decomposition, shared by both calculators, timed once

    @property
    def label(self) -> str:
        return f"{self.name} (P = {self.im.nb_params:,}, N = {self.examples:,})"


def make_throughput_workload(name: str, model: keras.Model) -> ThroughputWorkload:
    rng = np.random.default_rng(SEED)
    examples = TRAIN_EXAMPLES[name]
    input_shape = tuple(model.inputs[0].shape[1:])
    inputs = rng.standard_normal((examples, *input_shape)).astype(np.float32)
    targets = rng.integers(0, NUM_CLASSES, examples).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(BATCH_SIZE)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    im = InfluenceModel(model, loss_function=loss)
    arnoldi = ArnoldiInfluenceCalculator(
        im,
        dataset,
        subspace_dim=ARNOLDI_SUBSPACE,
        k_largest_eig_vals=ARNOLDI_RANK,
        damping=DAMPING,
        n_samples_for_hessian=HESSIAN_EXAMPLES,
    )
    start = time.perf_counter()
    arnoldi.ihvp.eigenvalues  # noqa: B018 - runs the Arnoldi iteration now, so that it is timed here
    build_seconds = time.perf_counter() - start
    # The same low-rank inverse as a preconditioner: full P-dimensional influence vectors H⁻¹∇ℓ(z).
    first_order = FirstOrderInfluenceCalculator(im, dataset, arnoldi.ihvp)
    return ThroughputWorkload(name, model, im, dataset, examples, first_order, arnoldi, build_seconds)


def _clone(model: keras.Model) -> keras.Model:
    """A copy with the same architecture and weights, so that training leaves the measured model untouched."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def train_epoch_function(model: keras.Model, dataset: tf.data.Dataset) -> Callable[[], tf.Tensor]:
    """One epoch of SGD over ``dataset``: a compiled train step called per batch (``model.fit``'s core loop)."""
    clone = _clone(model)
    optimizer = keras.optimizers.SGD(LEARNING_RATE)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(inputs: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            value = loss(targets, clone(inputs, training=True))
        gradients = tape.gradient(value, clone.trainable_variables)
        optimizer.apply(gradients, clone.trainable_variables)
        return value

    def epoch() -> tf.Tensor:
        value = tf.zeros([])
        for inputs, targets in dataset:
            value = step(inputs, targets)
        return value

    return epoch


def fit_epoch_function(model: keras.Model, dataset: tf.data.Dataset) -> Callable[[], Any]:
    clone = _clone(model)
    clone.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lambda: clone.fit(dataset, epochs=1, verbose=0)


def iterate_vectors(calculator: Any, dataset: tf.data.Dataset) -> Callable[[], tf.Tensor]:
    """Iterates ``compute_influence_vector(dataset)`` to the end and returns the last block of vectors."""

    def run() -> tf.Tensor:
        vectors = tf.zeros([0, 0])
        for _, vectors in calculator.compute_influence_vector(dataset):  # noqa: B007 - keep the last block
            pass
        return vectors

    return run


def per_sample_gradients(im: InfluenceModel, dataset: tf.data.Dataset) -> Callable[[], tf.Tensor]:
    def run() -> tf.Tensor:
        gradients = tf.zeros([0, 0])
        for batch in dataset:
            gradients = im.batch_jacobian_tensor(batch)
        return gradients

    return run


def throughput_rows(workload: ThroughputWorkload, repeats: int) -> tuple[list[tuple[str, ...]], list[Check], str]:
    dataset = workload.dataset
    first_order, arnoldi = workload.first_order, workload.arnoldi
    first_order_vectors = Recorded(iterate_vectors(first_order, dataset))
    arnoldi_vectors = Recorded(iterate_vectors(arnoldi, dataset))
    first_order_self = Recorded(lambda: first_order.self_influence(dataset))
    arnoldi_self = Recorded(lambda: arnoldi.self_influence(dataset))
    work: list[tuple[str, Callable[[], Any], bool]] = [  # (what, function, is the §5 target)
        ("one training epoch: compiled SGD train step per batch", train_epoch_function(workload.model, dataset), False),
        ("one training epoch: `model.fit(epochs=1)`", fit_epoch_function(workload.model, dataset), False),
        (
            "per-sample gradients only: `batch_jacobian_tensor` per batch",
            per_sample_gradients(workload.im, dataset),
            False,
        ),
        (
            "influence vectors: `FirstOrderInfluenceCalculator(im, train, arnoldi_ihvp).compute_influence_vector`",
            first_order_vectors,
            True,
        ),
        ("influence vectors: `ArnoldiInfluenceCalculator.compute_influence_vector`", arnoldi_vectors, False),
        ("self-influence: `FirstOrderInfluenceCalculator.self_influence`", first_order_self, False),
        ("self-influence: `ArnoldiInfluenceCalculator.self_influence`", arnoldi_self, False),
    ]
    times = median_times([function for _, function, _ in work], repeats=repeats)
    epoch = times[0]
    rows: list[tuple[str, ...]] = []
    checks: list[Check] = []
    for index, ((what, _, targeted), seconds) in enumerate(zip(work, times, strict=True)):
        target, verdict = "", ""
        if targeted:
            check = Check.at_most(f"Influence vectors / one training epoch ({workload.name})", seconds / epoch, 3.0)
            checks.append(check)
            target, verdict = check.target, check.verdict
        rows.append(
            (
                workload.label,
                what,
                milliseconds(seconds),
                f"{workload.examples / seconds:,.0f}",
                "1×" if index == 0 else ratio(seconds / epoch),
                target,
                verdict,
            )
        )
    deviation = np.max(np.abs(first_order_self.last - arnoldi_self.last)) / np.max(np.abs(arnoldi_self.last))
    gradients_share, vectors_share, self_share = (times[index] / epoch for index in (2, 3, 5))
    breakdown = (
        f"Of the first-order vectors' {vectors_share:.2f}× an epoch, per-sample gradients alone take "
        f"{gradients_share:.2f}×; first-order self-influence, the same gradients and preconditioning but one "
        f"number per example and no `compute_influence_vector` dataset, {self_share:.2f}×."
    )
    note = (
        f"{workload.name}: the Arnoldi decomposition ({ARNOLDI_SUBSPACE} Hessian-vector products over "
        f"{HESSIAN_EXAMPLES} examples, rank {ARNOLDI_RANK} kept), shared by both calculators and not part of the "
        f"times above, took {workload.build_seconds:.1f} s once ({workload.build_seconds / epoch:.0f} epochs). "
        f"Last block of vectors: {tuple(first_order_vectors.last.shape)} (first-order), "
        f"{tuple(arnoldi_vectors.last.shape)} (Arnoldi). The two self-influences, both ∇ℓᵀ U diag(1/λ) Uᵀ ∇ℓ, "
        f"agree to {deviation:.1e} (relative max deviation over the {len(arnoldi_self.last):,} examples). " + breakdown
    )
    log(note)
    return rows, checks, note


def throughput_section(repeats: int) -> Section:
    rows, checks, notes = [], [], []
    for name, builder in (("MLP", small_mlp), ("CNN", small_cnn)):
        keras.utils.set_random_seed(SEED)
        workload = make_throughput_workload(name, builder())
        log(f"influence-vector throughput: {workload.label}")
        workload_rows, workload_checks, note = throughput_rows(workload, repeats)
        rows += workload_rows
        checks += workload_checks
        notes.append(note)
    return Section(
        title="Influence vectors vs one training epoch",
        intro=(
            f"The whole training set ({TRAIN_EXAMPLES['MLP']:,} random float32 examples for the MLP, "
            f"{TRAIN_EXAMPLES['CNN']:,} for the CNN, fewer so that `make bench` stays within about 8 minutes on "
            f"this machine; the models of §1), batched by {BATCH_SIZE} in one "
            "`tf.data` pipeline that every row iterates the same way. The reference epoch is a compiled SGD train "
            "step called on each batch of the dataset (the loop `model.fit` runs, without its callbacks), on a "
            "copy of the model; `model.fit` itself is shown for information. Influence vectors are timed through "
            "the public API: `compute_influence_vector(train)` iterated to the end (no cache: computed as it "
            "is read). Preconditioner: both calculators share one `ArnoldiIHVP` (Schioppa et al.: "
            f"{ARNOLDI_SUBSPACE} Arnoldi steps, the {ARNOLDI_RANK} eigenpairs of largest magnitude, damping "
            f"{DAMPING:g}, Hessian on the first {HESSIAN_EXAMPLES} examples), built once before timing, so an "
            "influence vector costs one per-sample gradient and two thin matmuls. `FirstOrderInfluenceCalculator` "
            "returns P-dimensional vectors `U diag(1/λ) Uᵀ∇ℓ(z)`, the §5 target row; `ArnoldiInfluenceCalculator` "
            f"the {ARNOLDI_RANK}-dimensional embeddings. The exact solver is not a meaningful choice here: it "
            "forms the dense P × P Hessian (P Hessian-vector products over the Hessian set, minutes for the "
            "MLP's P and more memory than the machine has for the CNN's) and costs O(P²) per example to apply; "
            "CG and LiSSA need tens of Hessian passes per vector. *÷ one epoch* is the time over the reference "
            "epoch's; *Examples/s* counts training examples."
        ),
        columns=(
            "Model",
            "Work over the training set",
            "Median (ms)",
            "Examples/s",
            "÷ one epoch",
            "Target",
            "Verdict",
        ),
        rows=rows,
        notes=notes,
        checks=checks,
    )


# ---------------------------------------------------------------------- 2. top-k over 10⁶ training vectors


def reference_top_k(num_train: int, block_size: int, k: int) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, ...]]:
    """The obvious exact top-k: for each block of rows one matmul and one ``tf.math.top_k``, then a final top-k.

    The blocks are unrolled when tracing (a static Python loop), so the graph is a plain sequence of matmuls and
    top-ks. Returns ``(indices [num_queries, k] int64, values [num_queries, k])``, largest scores first.
    """

    @tf.function
    def top_k(queries: tf.Tensor, vectors: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        values, indices = [], []
        for start in range(0, num_train, block_size):
            scores = tf.matmul(queries, vectors[start : start + block_size], transpose_b=True)
            block_values, block_indices = tf.math.top_k(scores, k)
            values.append(block_values)
            indices.append(tf.cast(block_indices, tf.int64) + start)
        best_values, best = tf.math.top_k(tf.concat(values, axis=1), k)
        return tf.gather(tf.concat(indices, axis=1), best, batch_dims=1), best_values

    return top_k


def _timed_once(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def top_k_section(repeats: int) -> Section:
    log(f"top-k: {TOP_K_QUERIES} queries over {TOP_K_TRAIN:,} × {TOP_K_DIM} vectors")
    rng = np.random.default_rng(SEED)
    data = rng.standard_normal((TOP_K_TRAIN, TOP_K_DIM), dtype=np.float32)
    queries = tf.constant(rng.standard_normal((TOP_K_QUERIES, TOP_K_DIM), dtype=np.float32))
    vectors = tf.constant(data)
    block_size = SCORES_BUDGET // TOP_K_QUERIES
    reference = reference_top_k(TOP_K_TRAIN, block_size, TOP_K)

    linear = LinearNearestNeighbors()
    linear_build = _timed_once(lambda: linear.build(data))
    blocks = [
        (tf.range(start, min(start + block_size, TOP_K_TRAIN), dtype=tf.int64), vectors[start : start + block_size])
        for start in range(0, TOP_K_TRAIN, block_size)
    ]
    streaming = StreamingTopK()
    streaming_build = _timed_once(lambda: streaming.build(lambda: iter(blocks)))
    faiss = FaissNearestNeighbors(index_type="flat")
    faiss_build = _timed_once(lambda: faiss.build(data))

    methods: list[tuple[str, str, Callable[[], Any], float | None]] = [  # (name, description, query, build)
        (
            "reference",
            f"reference: blocked matmul + `tf.math.top_k` in one `tf.function` ({block_size:,}-row blocks)",
            lambda: reference(queries, vectors),
            None,
        ),
        (
            "LinearNearestNeighbors",
            "`LinearNearestNeighbors().query` (default blocks)",
            lambda: linear.query(queries, TOP_K),
            linear_build,
        ),
        (
            "StreamingTopK",
            f"`StreamingTopK().query` (in-memory blocks of {block_size:,} rows)",
            lambda: streaming.query(queries, TOP_K),
            streaming_build,
        ),
        (
            "FaissNearestNeighbors (flat)",
            '`FaissNearestNeighbors(index_type="flat").query`',
            lambda: faiss.query(queries, TOP_K),
            faiss_build,
        ),
    ]
    recorded = [Recorded(function) for _, _, function, _ in methods]
    times = median_times(recorded, repeats=repeats)
    expected_indices, expected_values = (np.asarray(t) for t in recorded[0].last)
    rows: list[tuple[str, ...]] = []
    checks: list[Check] = []
    agreement, disagreeing = [], []
    for index, ((name, what, _, build), seconds) in enumerate(zip(methods, times, strict=True)):
        target, verdict = "", ""
        if index == 1:
            check = Check.at_most(
                f"Top-k over {TOP_K_TRAIN:,} vectors: `LinearNearestNeighbors` / blocked matmul + top_k",
                seconds / times[0],
                1.5,
            )
            checks.append(check)
            target, verdict = check.target, check.verdict
        elif index > 1:
            verdict = "info"
        if index > 0:
            found_indices, found_values = (np.asarray(t) for t in recorded[index].last)
            differing = int(np.sum(np.any(found_indices != expected_indices, axis=1)))
            gap = float(np.max(np.abs(found_values - expected_values)))
            agreement.append(f"{name}: {differing} of {TOP_K_QUERIES} queries differ, max |Δ score| = {gap:.1e}")
            if differing:
                disagreeing.append(name)
        ratio_text = "1×" if index == 0 else ratio(seconds / times[0])
        build_text = "—" if build is None else f"{build:.2f}"
        rows.append((what, build_text, milliseconds(seconds), ratio_text, target, verdict))
    conclusion = (
        f"**{', '.join(disagreeing)} return other indices than the reference.**"
        if disagreeing
        else "Every strategy returns exactly the reference's indices."
    )
    note = f"Agreement with the reference (k = {TOP_K}): {'; '.join(agreement)}. {conclusion}"
    log(note)
    return Section(
        title="Top-k over 10⁶ training vectors",
        intro=(
            f"{TOP_K_QUERIES} random float32 queries (one test batch; 256 would double this section's time, "
            "which grows linearly with the number of queries) against "
            f"{TOP_K_TRAIN:,} random float32 training vectors of "
            f"dimension {TOP_K_DIM} ({TOP_K_TRAIN * TOP_K_DIM * 4 / 2**20:.0f} MiB), k = {TOP_K}, largest inner "
            "products first. The reference is written in the benchmark: one `tf.function` that, for each block of "
            f"{block_size:,} rows ({SCORES_BUDGET:,} scores, the budget `LinearNearestNeighbors` uses by default), "
            "computes `queries @ blockᵀ` and its `tf.math.top_k`, then takes the top-k of the block winners. "
            "Building a strategy (reading the vectors, sorting them by index, filling the faiss index) is timed "
            "once and excluded from the query time. `StreamingTopK` streams the same in-memory blocks; faiss "
            "searches a flat (exact) inner-product index with its own BLAS and threads. *÷ reference* is the "
            "query time over the reference's."
        ),
        columns=("Method", "Build (s, once)", "Query (ms)", "÷ reference", "Target", "Verdict"),
        rows=rows,
        notes=[note],
        checks=checks,
    )


# ---------------------------------------------------------------------- entry point


def run(*, repeats: int) -> list[Section]:
    """The influence-engine sections of ``docs/benchmarks.md``."""
    return [throughput_section(repeats), top_k_section(repeats)]
