"""Query batching and mixed-precision benchmarks (issue 7): scoring many queries, and low-precision gradients.

Two tables, on an MLP trained on scikit-learn's bundled digits:

1. scoring a training set against many queries from their influence factors ``H⁻¹∇ℓ(x)`` ``[Q, P]``: one pass per
   query, one pass for all queries (``[N, P] × [P, Q]``), and one pass through a rank-``r`` compression of the
   factors (``[N, P] × [P, r]`` then ``[N, r] × [r, Q]``, :func:`~influenciae.influence.first_order.compress_factors`),
   with the compressed scores' error against the uncompressed ones;
2. the fidelity of influence scores computed from per-sample gradients in bfloat16/float16 (``gradient_dtype``),
   and from a model run under Keras's ``mixed_bfloat16`` policy, against float32.

Run alone with ``.venv/bin/python -m benchmarks.curvature_query`` (both tables, markdown on stdout) or
``.venv/bin/python -m benchmarks.curvature_query --fidelity`` (the fidelity table only, as quoted in
``docs/theory.md``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.run_benchmarks import Section, log, median_times, milliseconds, ratio
from influenciae import FirstOrderInfluenceCalculator, InfluenceModel, NystromIHVP
from influenciae.influence.first_order import compress_factors
from influenciae.model._backend import keras, tf

__all__ = ["run", "mixed_precision_fidelity", "fidelity_section", "query_batching_section"]

SEED = 0
BATCH_SIZE = 128
TRAIN_EXAMPLES = 1024
NUM_QUERIES = 1024
QUERY_RANKS = (16, 64, 256)
NYSTROM_RANK = 64  # the inverse used for the factors (GGN, first HESSIAN_EXAMPLES training examples)
HESSIAN_EXAMPLES = 256
DAMPING = 1e-3
FIDELITY_TEST_EXAMPLES = 200
LOW_PRECISION = ("bfloat16", "float16")
TOP_K = 10


# ---------------------------------------------------------------------- shared set-up


def digits_model(policy: str | None = None, weights: list[np.ndarray] | None = None) -> keras.Model:
    """A 64-64-64-10 MLP (``P = 8,970``), optionally under a Keras dtype policy and with given weights."""
    dtype = policy or "float32"
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", dtype=dtype),
            keras.layers.Dense(64, activation="relu", dtype=dtype),
            keras.layers.Dense(10, dtype=dtype),
        ]
    )
    if weights is not None:
        model.set_weights(weights)
    return model


def digits_problem() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """The trained float32 MLP and the digits data ``(x [1797, 64] float32, y [1797] int64)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    keras.utils.set_random_seed(SEED)
    model = digits_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=_loss())
    model.fit(x[:TRAIN_EXAMPLES], y[:TRAIN_EXAMPLES], epochs=20, batch_size=BATCH_SIZE, verbose=0)
    return model, x, y


def _loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def _batched(x: np.ndarray, y: np.ndarray) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH_SIZE)


def _ggn_nystrom(im: InfluenceModel, train: tf.data.Dataset) -> NystromIHVP:
    hessian_set = train.unbatch().take(HESSIAN_EXAMPLES).batch(BATCH_SIZE)
    solver = NystromIHVP(im, hessian_set, rank=NYSTROM_RANK, damping=DAMPING, seed=SEED, curvature="ggn")
    solver.eigenvalues  # noqa: B018 - sketch now, outside every timing
    return solver


def _relative_error(approximation: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(approximation - reference) / np.linalg.norm(reference))


def _pearson(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.corrcoef(first.ravel(), second.ravel())[0, 1])


def _top_k_overlap(first: np.ndarray, second: np.ndarray, k: int = TOP_K) -> float:
    """Mean fraction of each query's top-``k`` proponents that both score matrices ``[Q, N]`` share."""
    top_first = np.argsort(-first, axis=1)[:, :k]
    top_second = np.argsort(-second, axis=1)[:, :k]
    shared = [len(set(a) & set(b)) / k for a, b in zip(top_first, top_second, strict=True)]
    return float(np.mean(shared))


# ---------------------------------------------------------------------- 1. query batching


def query_batching_section(repeats: int) -> Section:
    model, x, y = digits_problem()
    im = InfluenceModel(model, loss_function=_loss())
    train = _batched(x[:TRAIN_EXAMPLES], y[:TRAIN_EXAMPLES])
    queries = _batched(x[-NUM_QUERIES:], y[-NUM_QUERIES:])
    calculator = FirstOrderInfluenceCalculator(im, train, _ggn_nystrom(im, train))
    log(f"query batching: P = {im.nb_params:,}, {NUM_QUERIES} influence factors")
    factors = calculator.compute_influence_factors(queries)  # [Q, P], not timed: the same for every method
    start = time.perf_counter()
    compressed = {rank: compress_factors(factors, rank) for rank in QUERY_RANKS}
    compression_seconds = (time.perf_counter() - start) / len(QUERY_RANKS)
    results: dict[str, np.ndarray] = {}

    def scorer(name: str, prepared: Any) -> Any:
        def score() -> np.ndarray:
            results[name] = calculator.influence_from_factors(prepared, train)
            return results[name]

        return score

    methods = [("one query", scorer("one query", factors[:1])), ("all queries", scorer("all queries", factors))]
    methods += [(f"rank {rank}", scorer(f"rank {rank}", compressed[rank])) for rank in QUERY_RANKS]
    times = dict(
        zip([name for name, _ in methods], median_times([f for _, f in methods], repeats=repeats), strict=True)
    )
    per_query_total = times["one query"] * NUM_QUERIES
    reference = results["all queries"]
    rows = [
        (
            f"one pass per query ({NUM_QUERIES} passes: {NUM_QUERIES} × the median of one single-query pass)",
            milliseconds(per_query_total),
            "1.00×",
            ratio(times["all queries"] / per_query_total),
            "0 (same scores)",
            "",
        ),
        (
            "one pass for all queries: `influence_from_factors(factors)`, `[N, P] × [P, Q]`",
            milliseconds(times["all queries"]),
            ratio(per_query_total / times["all queries"]),
            "1.00×",
            "0 (reference)",
            "",
        ),
    ]
    for rank in QUERY_RANKS:
        seconds = times[f"rank {rank}"]
        rows.append(
            (
                f"one pass, factors compressed to rank {rank}: `[N, P] × [P, {rank}]`, `[N, {rank}] × [{rank}, Q]`",
                milliseconds(seconds),
                ratio(per_query_total / seconds),
                ratio(times["all queries"] / seconds),
                f"{_relative_error(results[f'rank {rank}'], reference):.1e} "
                f"(factors: {compressed[rank].relative_error:.1e})",
                f"{_pearson(results[f'rank {rank}'], reference):.5f} / "
                f"{_top_k_overlap(results[f'rank {rank}'], reference):.2f}",
            )
        )
    return Section(
        title="Query batching: scoring a training set against many queries",
        intro=(
            f"An MLP (P = {im.nb_params:,}) trained on scikit-learn's digits; N = {TRAIN_EXAMPLES:,} training "
            f"examples (batches of {BATCH_SIZE}) scored against Q = {NUM_QUERIES:,} queries. The queries' influence "
            f"factors `H⁻¹∇ℓ(x)` `[Q, P]` come once from a rank-{NYSTROM_RANK} Nyström sketch of the GGN "
            f"(damping {DAMPING:g}) and are not timed. Every pass recomputes the training examples' per-sample "
            "gradients. The compressed rows use `compress_factors(factors, r)` (truncated SVD; "
            f"{compression_seconds:.1f} s per compression, not included) and "
            "`influence_from_factors(compressed, train)`, which `FirstOrderInfluenceCalculator(..., query_rank=r)."
            "influence_matrix` runs."
        ),
        columns=(
            "Method",
            "Time (ms)",
            "Speed-up vs one pass per query",
            "Speed-up vs one uncompressed pass",
            "Relative error of the scores",
            "Pearson / top-10 overlap",
        ),
        rows=rows,
        notes=(
            "Relative errors are Frobenius norms against the uncompressed scores; in parentheses, the compression "
            "error of the factors themselves, which bounds every score's error by Cauchy-Schwarz. "
            "Top-10 overlap: the mean fraction of each query's ten strongest proponents that the compressed scores "
            "recover.",
        ),
    )


# ---------------------------------------------------------------------- 2. mixed precision


def mixed_precision_fidelity() -> list[dict[str, Any]]:
    """Influence scores from low-precision per-sample gradients against float32, on the digits MLP.

    Every variant scores the same ``FIDELITY_TEST_EXAMPLES`` test examples against the ``TRAIN_EXAMPLES``
    training examples with ``FirstOrderInfluenceCalculator.influence_matrix`` and one shared solver (a rank-64
    Nyström sketch of the float32 model's GGN), so that only the per-sample gradients differ.

    Returns:
        One dict per variant: ``variant``, ``pearson``, ``relative_error``, ``top_k_overlap`` (against float32).
    """
    model, x, y = digits_problem()
    train = _batched(x[:TRAIN_EXAMPLES], y[:TRAIN_EXAMPLES])
    test = _batched(x[-FIDELITY_TEST_EXAMPLES:], y[-FIDELITY_TEST_EXAMPLES:])
    reference_model = InfluenceModel(model, loss_function=_loss())
    solver = _ggn_nystrom(reference_model, train)
    mixed = digits_model("mixed_bfloat16", model.get_weights())
    variants: list[tuple[str, InfluenceModel]] = [("float32 (reference)", reference_model)]
    variants += [
        (f"`gradient_dtype={dtype!r}`", InfluenceModel(model, loss_function=_loss(), gradient_dtype=dtype))
        for dtype in LOW_PRECISION
    ]
    variants.append(
        (
            "Keras `mixed_bfloat16` policy (bfloat16 arithmetic) and `gradient_dtype='bfloat16'`",
            InfluenceModel(mixed, loss_function=_loss(), gradient_dtype="bfloat16"),
        )
    )
    scores = {}
    for name, im in variants:
        log(f"fidelity: {name}")
        scores[name] = FirstOrderInfluenceCalculator(im, train, solver).influence_matrix(test, train)
    reference = scores[variants[0][0]]
    return [
        {
            "variant": name,
            "pearson": _pearson(scores[name], reference),
            "relative_error": _relative_error(scores[name], reference),
            "top_k_overlap": _top_k_overlap(scores[name], reference),
        }
        for name, _ in variants[1:]
    ]


def fidelity_section(results: Sequence[dict[str, Any]] | None = None) -> Section:
    results = mixed_precision_fidelity() if results is None else results
    return Section(
        title="Mixed precision: fidelity of influence scores from low-precision per-sample gradients",
        intro=(
            f"The digits MLP of the previous table: {FIDELITY_TEST_EXAMPLES} test examples scored against "
            f"{TRAIN_EXAMPLES:,} training examples (`influence_matrix`), every variant with the same solver (a "
            f"rank-{NYSTROM_RANK} Nyström sketch of the float32 GGN), so only the per-sample gradients differ. "
            "`gradient_dtype` rounds each per-sample gradient where it is computed; kernels, solves and score "
            "matmuls accumulate in float32."
        ),
        columns=("Per-sample gradients", "Pearson vs float32", "Relative error", "Top-10 overlap"),
        rows=[
            (r["variant"], f"{r['pearson']:.6f}", f"{r['relative_error']:.1e}", f"{r['top_k_overlap']:.2f}")
            for r in results
        ],
        notes=(
            "Relative error: Frobenius norm of the score difference over that of the float32 scores. Top-10 "
            "overlap: the mean fraction of each test example's ten strongest proponents found by both.",
        ),
    )


def run(*, repeats: int) -> list[Section]:
    """Both tables (the section-module interface of ``benchmarks/run_benchmarks.py``)."""
    return [query_batching_section(repeats), fidelity_section()]


def _markdown(section: Section) -> str:
    lines = [f"## {section.title}", "", section.intro, "", "| " + " | ".join(section.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in section.columns) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in section.rows]
    lines += ["", *section.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fidelity", action="store_true", help="only the mixed-precision fidelity table")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (≥ 5)")
    args = parser.parse_args(argv)
    sections = [fidelity_section()] if args.fidelity else run(repeats=args.repeats)
    print("\n\n".join(_markdown(section) for section in sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
