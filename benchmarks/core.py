"""Core engine benchmarks: per-sample gradients and Hessian-vector products (DESIGN.md §5).

Three tables, on a small CNN (the model the targets name) and a small MLP, float32, one batch of 128 random
examples:

1. per-sample gradients: ``InfluenceModel.batch_jacobian_tensor`` vs an eager per-example loop vs
   ``tape.jacobian`` (pfor) inside ``tf.function``;
2. the cost of Hessian-vector products (1, 8 and 32 vectors) relative to one batch gradient, public API;
3. the HVP method inside ``tf.function``: the library's two ``hvp_mode`` implementations, back-over-back (the
   default, ``InfluenceModel._back_over_back``) and forward-over-backward (``_forward_over_backward``), each
   vectorized over the vectors as the library runs it, against the same product one vector at a time
   (``tf.map_fn``).

The reference implementations reuse the model's own per-example loss and watched variables, so every method
differentiates the same function; each table states how closely the methods agree.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.run_benchmarks import Check, Section, log, median_times, milliseconds, ratio
from influenciae import InfluenceModel
from influenciae.model._backend import keras, tf

__all__ = ["run", "make_workloads", "small_cnn", "small_mlp"]

BATCH_SIZE = 128
LOOP_EXAMPLES = 32  # the eager loop is timed on this many examples and scaled linearly to the batch
BLOCK_SIZES = (1, 8, 32)
NUM_CLASSES = 10
SEED = 0
TIE = 0.05  # relative difference below which two methods count as equally fast
ZERO = tf.UnconnectedGradients.ZERO

HvpFunction = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]

# Read from the signature, so that the report names the default the library actually has.
DEFAULT_HVP_MODE: str = inspect.signature(InfluenceModel).parameters["hvp_mode"].default
HVP_MODE_NAMES = {"back_over_back": "back-over-back", "forward_over_backward": "forward-over-backward"}
HVP_MODE_ABBREVIATIONS = {"back_over_back": "B/B", "forward_over_backward": "F/B"}


@dataclass(frozen=True)
class Workload:
    """A wrapped model and one batch of ``BATCH_SIZE`` examples with unit weights."""

    name: str
    model: InfluenceModel
    inputs: tf.Tensor
    targets: tf.Tensor
    weights: tf.Tensor
    vectors: tf.Tensor  # [max(BLOCK_SIZES), nb_params] random directions for the HVPs

    @property
    def batch(self) -> tuple[tf.Tensor, tf.Tensor]:
        return self.inputs, self.targets

    @property
    def label(self) -> str:
        return f"{self.name} (P = {self.model.nb_params:,})"

    def graph_args(self, count: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        return self.inputs, self.targets, self.weights, self.vectors[:count]


def small_cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def small_mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def make_workloads() -> list[Workload]:
    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    workloads = []
    for name, model in (("CNN", small_cnn()), ("MLP", small_mlp())):
        im = InfluenceModel(model, loss_function=loss)
        input_shape = tuple(model.inputs[0].shape[1:])
        vectors = rng.standard_normal((max(BLOCK_SIZES), im.nb_params))
        workloads.append(
            Workload(
                name=name,
                model=im,
                inputs=tf.constant(rng.standard_normal((BATCH_SIZE, *input_shape)), tf.float32),
                targets=tf.constant(rng.integers(0, NUM_CLASSES, BATCH_SIZE), tf.int32),
                weights=tf.ones([BATCH_SIZE], tf.float32),
                vectors=tf.constant(vectors, tf.float32),
            )
        )
    return workloads


# ---------------------------------------------------------------------- timing with pfor diagnostics


class _FallbackRecorder(logging.Handler):
    """Collects the ops that pfor could not vectorize (TensorFlow logs "<Op> uses a while_loop")."""

    pattern = re.compile(r"(\w+) uses a while_loop")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.ops: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.search(record.getMessage())
        if match:
            self.ops.add(match.group(1))


@contextlib.contextmanager
def _pfor_fallbacks() -> Iterator[set[str]]:
    recorder = _FallbackRecorder()
    logger = logging.getLogger("tensorflow")
    logger.addHandler(recorder)
    try:
        yield recorder.ops
    finally:
        logger.removeHandler(recorder)


def timed(functions: Sequence[Callable[[], Any]], repeats: int) -> tuple[list[float], list[set[str]]]:
    """Median times of ``functions`` (round-robin) and, for each, the ops pfor ran as a while_loop.

    The first call of each function, under the log recorder, is its warm-up: it traces the ``tf.function``.
    """
    fallbacks = []
    for function in functions:
        with _pfor_fallbacks() as ops:
            tf.nest.map_structure(lambda t: t.numpy() if isinstance(t, tf.Tensor) else t, function())
        fallbacks.append(ops)
    return median_times(functions, repeats=repeats, warmup=0), fallbacks


def _ops_note(fallbacks: set[str]) -> str:
    return ", ".join(f"`{op}`" for op in sorted(fallbacks))


# ---------------------------------------------------------------------- reference implementations


def _rows(blocks: Sequence[tf.Tensor], count: tf.Tensor) -> tf.Tensor:
    """``[count, *shape]`` per-weight blocks -> ``[count, nb_params]`` in the model's flattening order."""
    return tf.concat([tf.reshape(block, [count, -1]) for block in blocks], axis=1)


def _loss(im: InfluenceModel, inputs: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(im._per_example_loss(inputs, targets, weights))


def eager_loop_gradients(im: InfluenceModel, inputs: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Per-sample gradients the obvious way: one eager ``GradientTape`` per example, ``[n, nb_params]``."""
    rows = []
    for index in range(int(inputs.shape[0])):
        part = slice(index, index + 1)
        with tf.GradientTape() as tape:
            tape.watch(im._watched)
            loss = _loss(im, inputs[part], targets[part], weights[part])
        rows.append(im.flatten(tape.gradient(loss, im._watched, unconnected_gradients=ZERO)))
    return tf.stack(rows)


def tape_jacobian_gradients(im: InfluenceModel) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]:
    """Per-sample gradients as ``tape.jacobian(losses [B], watched)`` (pfor) inside ``tf.function``."""

    @tf.function
    def jacobian(inputs: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(im._watched)
            losses = im._per_example_loss(inputs, targets, weights)
        blocks = tape.jacobian(losses, im._watched, unconnected_gradients=ZERO)
        return _rows(blocks, tf.shape(losses)[0])

    return jacobian


def library_hvp(im: InfluenceModel, mode: str) -> HvpFunction:
    """The library's vectorized HVP of ``hvp_mode=mode`` (``_back_over_back`` or ``_forward_over_backward``).

    What ``_hvp_sum`` runs for that mode, whatever ``im.hvp_mode`` is, compiled afresh so that its tracing (and
    pfor's diagnostics) is not shared with the public calls.
    """
    implementation = {"back_over_back": im._back_over_back, "forward_over_backward": im._forward_over_backward}[mode]

    @tf.function
    def hvp(inputs: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        return implementation(lambda: _loss(im, inputs, targets, weights), vectors)

    return hvp


def forward_over_backward_loop(im: InfluenceModel) -> HvpFunction:
    """The same forward-over-backward product, one vector at a time in ``tf.map_fn``."""

    @tf.function
    def hvp(inputs: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        def one_vector(vector: tf.Tensor) -> tf.Tensor:
            with tf.autodiff.ForwardAccumulator(im._watched, im.unflatten(vector)) as accumulator:
                with tf.GradientTape() as tape:
                    tape.watch(im._watched)
                    loss = _loss(im, inputs, targets, weights)
                gradients = tape.gradient(loss, im._watched, unconnected_gradients=ZERO)
            return im.flatten(accumulator.jvp(gradients, unconnected_gradients=ZERO))

        return tf.map_fn(one_vector, vectors, fn_output_signature=tf.TensorSpec([im.nb_params], im.dtype))

    return hvp


def back_over_back_loop(im: InfluenceModel) -> HvpFunction:
    """Back-over-back one vector at a time: a full double backward pass per vector in ``tf.map_fn``."""

    @tf.function
    def hvp(inputs: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        def one_vector(vector: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as outer:
                outer.watch(im._watched)
                with tf.GradientTape() as inner:
                    inner.watch(im._watched)
                    loss = _loss(im, inputs, targets, weights)
                gradient = im.flatten(inner.gradient(loss, im._watched, unconnected_gradients=ZERO))
                product = tf.reduce_sum(gradient * vector)
            return im.flatten(outer.gradient(product, im._watched, unconnected_gradients=ZERO))

        return tf.map_fn(one_vector, vectors, fn_output_signature=tf.TensorSpec([im.nb_params], im.dtype))

    return hvp


def max_abs_difference(first: tf.Tensor, second: tf.Tensor) -> float:
    return float(tf.reduce_max(tf.abs(first - second)))


def max_abs(tensor: tf.Tensor) -> float:
    return float(tf.reduce_max(tf.abs(tensor)))


# ---------------------------------------------------------------------- 1. per-sample gradients


def per_sample_gradient_rows(workload: Workload, repeats: int) -> tuple[list[tuple[str, ...]], list[Check], str]:
    im = workload.model
    jacobian = tape_jacobian_gradients(im)
    graph_args = (workload.inputs, workload.targets, workload.weights)
    subset = tuple(t[:LOOP_EXAMPLES] for t in graph_args)
    # the library's default for this model, and the other per_example_gradients method for information
    layered = im._layer_capture is not None
    other = InfluenceModel(im.model, loss_function=im.loss_function, per_example_gradients="vectorized")
    if not layered:
        try:
            other = InfluenceModel(im.model, loss_function=im.loss_function, per_example_gradients="layers")
        except ValueError:
            other = None
    functions = [
        lambda: im.batch_jacobian_tensor(workload.batch),
        lambda: eager_loop_gradients(im, *subset),
        lambda: jacobian(*graph_args),
    ]
    if other is not None:
        functions.append(lambda: other.batch_jacobian_tensor(workload.batch))
    times, fallbacks = timed(functions, repeats)
    library, loop, jacobian_time = times[:3]
    loop *= BATCH_SIZE / LOOP_EXAMPLES
    reference = im.batch_jacobian_tensor(workload.batch)
    loop_difference = max_abs_difference(reference[:LOOP_EXAMPLES], eager_loop_gradients(im, *subset))
    jacobian_difference = max_abs_difference(reference, jacobian(*graph_args))
    note = (
        f"{workload.name}: the three methods agree: max |library − loop| = {loop_difference:.1e}, "
        f"max |library − jacobian| = {jacobian_difference:.1e} (largest entry {max_abs(reference):.1e})."
    )
    if fallbacks[0]:
        note += f" pfor ran {_ops_note(fallbacks[0])} as a while_loop over the examples in the library's method."
    log(note)

    targeted = workload.name == "CNN"  # DESIGN.md §5 states these targets on a small CNN
    rows: list[tuple[str, ...]] = []
    checks: list[Check] = []
    default = "layer capture, `Σ_t a_t ⊗ g_t`" if layered else "`vectorized_map` over examples"
    methods = [
        (f"`batch_jacobian_tensor` (library default: {default})", "", library, None),
        (
            f"eager loop, one `GradientTape` per example (timed on {LOOP_EXAMPLES}, ×{BATCH_SIZE // LOOP_EXAMPLES})",
            "eager per-example loop",
            loop,
            20.0,
        ),
        ("`tape.jacobian` of the losses in `tf.function` (pfor)", "`tape.jacobian`", jacobian_time, 10.0),
    ]
    if other is not None:
        mode = "vectorized" if layered else "layers"
        methods.append((f'`batch_jacobian_tensor` with `per_example_gradients="{mode}"`', "", times[3], None))
    for method, short_name, seconds, goal in methods:
        speedup = seconds / library
        target, verdict = "", ""
        if goal is not None:
            check = Check.at_least(f"Per-sample gradients vs {short_name} ({workload.name})", speedup, goal)
            target, verdict = (check.target, check.verdict) if targeted else (f"({check.target})", "info")
            if targeted:
                checks.append(check)
        rows.append(
            (
                workload.label,
                method,
                milliseconds(seconds),
                milliseconds(seconds / BATCH_SIZE),
                "1×" if seconds is library else ratio(speedup),
                target,
                verdict,
            )
        )
    return rows, checks, note


def per_sample_gradients_section(workloads: Sequence[Workload], repeats: int) -> Section:
    rows, checks, notes = [], [], []
    for workload in workloads:
        log(f"per-sample gradients: {workload.label}")
        workload_rows, workload_checks, note = per_sample_gradient_rows(workload, repeats)
        rows += workload_rows
        checks += workload_checks
        notes.append(note)
    return Section(
        title="Per-sample gradients",
        intro=(
            f"Per-sample gradients `[{BATCH_SIZE}, P]` of one batch of {BATCH_SIZE} random float32 examples. "
            "The library is timed through its public eager call (input checks included). The eager loop is "
            f"timed on {LOOP_EXAMPLES} examples and scaled linearly to {BATCH_SIZE} (every example costs the "
            "same). *Library speed-up* is the method's time over the library's. The targets are stated for "
            "the CNN; the MLP rows are for information."
        ),
        columns=(
            "Model",
            "Method",
            f"Median for {BATCH_SIZE} (ms)",
            "Per example (ms)",
            "Library speed-up",
            "Target",
            "Verdict",
        ),
        rows=rows,
        notes=notes,
        checks=checks,
    )


# ---------------------------------------------------------------------- 2. HVP vs batch gradient


def hvp_cost_rows(workload: Workload, repeats: int) -> tuple[list[tuple[str, ...]], list[Check]]:
    im = workload.model
    functions: list[Callable[[], Any]] = [lambda: im.batch_gradient(workload.batch)]
    functions += [
        functools.partial(im.batch_hvp_sum, workload.batch, workload.vectors[:count]) for count in BLOCK_SIZES
    ]
    (gradient, *hvps), _ = timed(functions, repeats)
    rows: list[tuple[str, ...]] = [(workload.label, "`batch_gradient`", "—", milliseconds(gradient), "—", "1×", "", "")]
    checks = []
    for count, seconds in zip(BLOCK_SIZES, hvps, strict=True):
        per_vector = seconds / count / gradient
        target, verdict = "", ""
        if count == 1:
            check = Check.at_most(f"HVP (1 vector) / batch gradient ({workload.name})", per_vector, 3.0)
            checks.append(check)
            target, verdict = check.target, check.verdict
        row = ("`batch_hvp_sum`", str(count), milliseconds(seconds), milliseconds(seconds / count))
        rows.append((workload.label, *row, ratio(per_vector), target, verdict))
    return rows, checks


def hvp_cost_section(workloads: Sequence[Workload], repeats: int) -> Section:
    rows, checks = [], []
    for workload in workloads:
        log(f"HVP vs batch gradient: {workload.label}")
        workload_rows, workload_checks = hvp_cost_rows(workload, repeats)
        rows += workload_rows
        checks += workload_checks
    chunk = workloads[0].model.hvp_chunk_size
    mode = workloads[0].model.hvp_mode
    return Section(
        title="Hessian-vector product vs batch gradient",
        intro=(
            f"Public eager calls on the same batch of {BATCH_SIZE}: `batch_gradient(batch)` against "
            "`batch_hvp_sum(batch, V)` for blocks of 1, 8 and 32 random vectors, with the models' "
            f'`hvp_mode="{mode}"` (the default, {HVP_MODE_NAMES[mode]}). *Per vector / gradient* is the time per '
            "vector over the gradient's time; the §5 target applies to one vector. Blocks larger than "
            f"`hvp_chunk_size` ({chunk}) run as several vectorized chunks."
        ),
        columns=(
            "Model",
            "Operation",
            "Vectors",
            "Median (ms)",
            "Per vector (ms)",
            "Per vector / gradient",
            "Target",
            "Verdict",
        ),
        rows=rows,
        checks=checks,
    )


# ---------------------------------------------------------------------- 3. HVP method choice


@dataclass(frozen=True)
class HvpMethod:
    """One way of computing ``H Vᵀ``: a library mode, vectorized as the library runs it or looped over vectors."""

    mode: str  # "back_over_back" or "forward_over_backward"
    vectorized: bool

    @property
    def is_default(self) -> bool:
        return self.vectorized and self.mode == DEFAULT_HVP_MODE

    @property
    def name(self) -> str:
        how = "vectorized (library)" if self.vectorized else "loop"
        return f"{HVP_MODE_NAMES[self.mode]}, {how}"

    @property
    def column(self) -> str:
        how = "vectorized" if self.vectorized else "loop"
        default = ", library default" if self.is_default else ""
        return f"{HVP_MODE_ABBREVIATIONS[self.mode]} {how}{default} (ms)"

    def build(self, im: InfluenceModel) -> HvpFunction:
        if self.vectorized:
            return library_hvp(im, self.mode)
        loops = {"back_over_back": back_over_back_loop, "forward_over_backward": forward_over_backward_loop}
        return loops[self.mode](im)


OTHER_HVP_MODE = next(mode for mode in HVP_MODE_NAMES if mode != DEFAULT_HVP_MODE)
# Index 0 is the library's default; 1 the default mode looped; 2 and 3 the other mode, vectorized and looped.
METHODS: tuple[HvpMethod, ...] = (
    HvpMethod(DEFAULT_HVP_MODE, vectorized=True),
    HvpMethod(DEFAULT_HVP_MODE, vectorized=False),
    HvpMethod(OTHER_HVP_MODE, vectorized=True),
    HvpMethod(OTHER_HVP_MODE, vectorized=False),
)


@dataclass(frozen=True)
class MethodTimes:
    """Median times ``[block size index][method index]`` of one workload."""

    workload: str
    times: list[list[float]]
    fallbacks: list[set[str]]  # ops pfor ran as a while_loop, per method
    deviations: list[float]  # relative max deviation from the library's default on 8 vectors, per method

    def ratio(self, block: int, slower: int, faster: int) -> float:
        return self.times[block][slower] / self.times[block][faster]


def time_hvp_methods(workload: Workload, repeats: int) -> MethodTimes:
    functions = [method.build(workload.model) for method in METHODS]
    times: list[list[float]] = []
    fallbacks: list[set[str]] = [set() for _ in METHODS]
    for count in BLOCK_SIZES:
        args = workload.graph_args(count)
        block_times, block_fallbacks = timed([functools.partial(f, *args) for f in functions], repeats)
        times.append(block_times)
        for seen, new in zip(fallbacks, block_fallbacks, strict=True):
            seen |= new
    probe = workload.graph_args(8)
    reference = functions[0](*probe)
    deviations = [max_abs_difference(reference, f(*probe)) / max_abs(reference) for f in functions]
    return MethodTimes(workload.name, times, fallbacks, deviations)


def hvp_method_section(workloads: Sequence[Workload], repeats: int) -> Section:
    rows, notes, results = [], [], []
    for workload in workloads:
        log(f"HVP methods: {workload.label}")
        result = time_hvp_methods(workload, repeats)
        results.append(result)
        for block, count in enumerate(BLOCK_SIZES):
            row = result.times[block]
            fastest = METHODS[int(np.argmin(row))]
            rows.append(
                (
                    workload.label,
                    str(count),
                    *(milliseconds(seconds) for seconds in row),
                    ratio(result.ratio(block, 2, 0)),
                    ratio(result.ratio(block, 3, 1)),
                    fastest.name.replace(" (library)", "") + (" (default)" if fastest.is_default else ""),
                )
            )
        deviations = ", ".join(
            f"{method.name.replace(' (library)', '')} {value:.1e}"
            for method, value in zip(METHODS[1:], result.deviations[1:], strict=True)
        )
        notes.append(f"{workload.name}: relative max deviation from the library's default on 8 vectors: {deviations}.")
    notes += _method_conclusions(results)
    for line in notes:
        log(line)
    default, other = HVP_MODE_NAMES[DEFAULT_HVP_MODE], HVP_MODE_NAMES[OTHER_HVP_MODE]
    default_abbreviation, other_abbreviation = (HVP_MODE_ABBREVIATIONS[m] for m in (DEFAULT_HVP_MODE, OTHER_HVP_MODE))
    return Section(
        title=f"HVP method: {default} (default) vs {other}",
        intro=(
            f"`H Vᵀ` summed over the batch of {BATCH_SIZE}, for blocks of 1, 8 and 32 random vectors; every "
            "method is a `tf.function` called directly (no eager chunking). The two *vectorized* methods are the "
            "library's own implementations of the two `hvp_mode` values, called as `_hvp_sum` calls them: "
            f'back-over-back (`_back_over_back`, `hvp_mode="back_over_back"`) is the outer tape\'s `jacobian` of '
            "`V·∇f(θ)` `[n]`, vectorized over the vectors by pfor; forward-over-backward "
            '(`_forward_over_backward`, `hvp_mode="forward_over_backward"`) is a `ForwardAccumulator` around a '
            "`GradientTape`, vectorized with `tf.vectorized_map`. The *loop* variants, written in the benchmark, "
            "run the same product one vector at a time in `tf.map_fn` (back-over-back: a full double backward "
            f'pass per vector). The library\'s default is `hvp_mode="{DEFAULT_HVP_MODE}"` ({default}, vectorized; '
            "read from `InfluenceModel`'s signature). TensorFlow's `ForwardAccumulator` computes each op's JVP "
            "by transposing its VJP (pruned when traced), so forward mode has no built-in advantage over reverse "
            f"mode here. *{other_abbreviation} ÷ {default_abbreviation}* compares {other} with the default "
            f"{default} at equal vectorization (above 1×: {default} is faster)."
        ),
        columns=(
            "Model",
            "Vectors",
            *(method.column for method in METHODS),
            f"{other_abbreviation} ÷ {default_abbreviation}, vectorized",
            f"{other_abbreviation} ÷ {default_abbreviation}, loop",
            "Fastest",
        ),
        rows=rows,
        notes=notes,
    )


def _span(values: Sequence[float]) -> str:
    return f"{min(values):.2f}×" if max(values) - min(values) < 0.005 else f"{min(values):.2f}–{max(values):.2f}×"


def _support(faster: int, slower: int, choice: str) -> str:
    """How far ``faster`` wins and ``slower`` losses (beyond ``TIE``) support ``choice``."""
    if faster == slower == 0:
        return f"neither mode is faster, so {choice} does not matter for speed"
    if slower == 0:
        return f"the measurements support {choice}"
    if faster == 0:
        return f"the measurements do not support {choice}"
    if slower >= 2 * faster:
        return f"the measurements mostly do not support {choice}"
    if faster >= 2 * slower:
        return f"the measurements mostly support {choice}"
    return f"the measurements are mixed on {choice}"


def _method_conclusions(results: Sequence[MethodTimes]) -> list[str]:
    """Sentences generated from the measurements: whether the default mode wins, and whether vectorizing pays."""
    blocks = range(len(BLOCK_SIZES))
    default, other = HVP_MODE_NAMES[DEFAULT_HVP_MODE], HVP_MODE_NAMES[OTHER_HVP_MODE]
    per_model, vectorized_ratios, looped_ratios = [], [], []
    for r in results:
        vectorized = [r.ratio(b, 2, 0) for b in blocks]  # other mode over the default, both as the library runs
        looped = [r.ratio(b, 3, 1) for b in blocks]
        vectorized_ratios += vectorized
        looped_ratios += looped
        per_model.append(f"{r.workload} {_span(vectorized)} vectorized ({_span(looped)} in a loop)")
    faster = sum(value > 1 + TIE for value in vectorized_ratios)  # the default faster by more than TIE
    slower = sum(value < 1 - TIE for value in vectorized_ratios)
    tied = len(vectorized_ratios) - faster - slower
    verdict = _support(faster, slower, f'the library\'s default `hvp_mode="{DEFAULT_HVP_MODE}"` ({default})')
    loop_faster = sum(value > 1 + TIE for value in looped_ratios)
    loop_slower = sum(value < 1 - TIE for value in looped_ratios)
    lines = [
        f"**Default mode: {default} vs {other}.** Time of {other} over {default}: {'; '.join(per_model)}. "
        f"Of the {len(vectorized_ratios)} comparisons of the two modes as the library runs them (vectorized), "
        f"{default} is faster by more than {TIE:.0%} in {faster}, slower by more than {TIE:.0%} in {slower} and "
        f"within {TIE:.0%} in {tied}: {verdict}. One vector at a time, {default} is faster in {loop_faster} and "
        f"slower in {loop_slower} of {len(looped_ratios)}."
    ]
    largest = len(BLOCK_SIZES) - 1
    vectorizing = []
    for r in results:
        text = (
            f"{r.workload} {r.ratio(largest, 1, 0):.2f}× at {BLOCK_SIZES[largest]} vectors and "
            f"{r.ratio(0, 1, 0):.2f}× at 1 vector"
        )
        if r.fallbacks[0]:
            text += f" (pfor ran {_ops_note(r.fallbacks[0])} as a while_loop)"
        vectorizing.append(text)
    default_fastest = sum(int(np.argmin(row)) == 0 for r in results for row in r.times)
    loop_wins = [
        f"{r.workload} at {count} vectors"
        for r in results
        for block, count in enumerate(BLOCK_SIZES)
        if count > 1 and r.ratio(block, 1, 0) < 1 - TIE
    ]
    loop_note = (
        f" Looping over the vectors beats the default's vectorization by more than {TIE:.0%} for "
        f"{', '.join(loop_wins)}."
        if loop_wins
        else ""
    )
    lines.append(
        f"**Vectorizing over vectors.** Time of the `tf.map_fn` loop over the library's vectorized {default} "
        f"(above 1×: vectorizing pays off): {'; '.join(vectorizing)}. The library's default is the fastest of "
        f"the four methods in {default_fastest} of {len(results) * len(BLOCK_SIZES)} configurations.{loop_note}"
    )
    return lines


# ---------------------------------------------------------------------- entry point


def run(*, repeats: int) -> list[Section]:
    """The core-engine sections of ``docs/benchmarks.md``."""
    workloads = make_workloads()
    return [
        per_sample_gradients_section(workloads, repeats),
        hvp_cost_section(workloads, repeats),
        hvp_method_section(workloads, repeats),
    ]
