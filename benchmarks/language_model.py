"""EK-FAC influence on a GPT-2-like causal language model: time and peak memory per phase, as a markdown table.

Default size (the target of ``docs/language_models.md``): a randomly initialised ``keras_hub.models.GPT2Backbone``
of about 5M parameters (vocabulary 2,048, width 256, 5 blocks, 4 heads) with a Dense head, 1,024 training sequences
of 64 tokens and 16 queries measured by the log-probability of their last token. Phases:

1. EK-FAC fit (``EKFACIHVP``: factors, eigendecomposition, eigenvalue correction; empirical Fisher);
2. query factors ``H⁻¹∇q(x)`` for the 16 queries (``compute_influence_factors``);
3. scoring every training sequence against the factors (``influence_from_factors``: one pass of per-sample
   gradients).

Peak memory is the process's maximum resident set size after each phase (``ru_maxrss``: it never decreases, so a
phase's figure includes the earlier ones). Run it in its own process (TF's pfor may abort an interpreter on attention
models with older versions of ``InfluenceModel``)::

    .venv/bin/python benchmarks/language_model.py                     # the default size
    .venv/bin/python benchmarks/language_model.py --sequences 64 --width 64 --blocks 2 --vocabulary 256
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

import numpy as np

__all__ = ["build_model", "main", "run"]


def build_model(vocabulary: int, width: int, blocks: int, heads: int, length: int, seed: int = 0) -> Any:
    """A GPT-2 backbone (random init, no dropout) with a Dense head: token ids ``[B, T]`` -> logits ``[B, T, V]``."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary,
        num_layers=blocks,
        num_heads=heads,
        hidden_dim=width,
        intermediate_dim=4 * width,
        dropout=0.0,
        max_sequence_length=length,
    )
    token_ids = keras.Input((length,), dtype="int32", name="token_ids")
    padding_mask = keras.ops.ones_like(token_ids)
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    logits = keras.layers.Dense(vocabulary, name="lm_head")(hidden)
    return keras.Model(token_ids, logits)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(
    *,
    vocabulary: int = 2048,
    width: int = 256,
    blocks: int = 5,
    heads: int = 4,
    length: int = 64,
    sequences: int = 1024,
    queries: int = 16,
    batch_size: int = 32,
) -> list[tuple[str, float, float]]:
    """Time (s) and peak RSS (MiB) after each phase; returns ``[(phase, seconds, peak_mib)]``."""
    import tensorflow as tf

    from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
    from influenciae.hessian import EKFACIHVP
    from influenciae.language import completion_log_probability, token_cross_entropy

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocabulary, size=(sequences, length + 1)).astype("int32")
    x_train, y_train = tokens[:, :-1], tokens[:, 1:]
    query_tokens = rng.integers(1, vocabulary, size=(queries, length + 1)).astype("int32")
    query_targets = np.zeros([queries, length], "int32")
    query_targets[:, -1] = query_tokens[:, -1]  # the measured completion: the last token
    rows: list[tuple[str, float, float]] = []

    def done(phase: str, start: float) -> None:
        rows.append((phase, time.perf_counter() - start, _peak_rss_mib()))
        print(f"{phase}: {rows[-1][1]:.1f} s, peak RSS {rows[-1][2]:.0f} MiB", file=sys.stderr, flush=True)

    start = time.perf_counter()
    model = build_model(vocabulary, width, blocks, heads, length)
    im = InfluenceModel(model, loss_function=token_cross_entropy(pad_id=0))
    done(f"build ({im.nb_params / 1e6:.2f}M parameters)", start)
    train_set = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(batch_size)
    query_set = tf.data.Dataset.from_tensor_slices((query_tokens[:, :-1], query_targets)).batch(queries)

    start = time.perf_counter()
    ekfac = EKFACIHVP(im, train_set, relative_damping=0.1, fisher="empirical")
    _ = ekfac.blocks  # fits on first access
    done("EK-FAC fit", start)
    calculator = FirstOrderInfluenceCalculator(
        im, train_set, ihvp_calculator=ekfac, measurement=completion_log_probability(pad_id=0)
    )

    start = time.perf_counter()
    factors = calculator.compute_influence_factors(query_set)
    done(f"query factors ({queries} queries)", start)

    start = time.perf_counter()
    scores = calculator.influence_from_factors(factors, train_set)
    done(f"scoring ({sequences} sequences)", start)
    if scores.shape != (queries, sequences) or not np.all(np.isfinite(scores)):
        raise RuntimeError(f"unexpected scores: shape {scores.shape}")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse the sizes, run, print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabulary", type=int, default=2048)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    arguments = parser.parse_args(argv)
    rows = run(
        vocabulary=arguments.vocabulary,
        width=arguments.width,
        blocks=arguments.blocks,
        heads=arguments.heads,
        length=arguments.length,
        sequences=arguments.sequences,
        queries=arguments.queries,
        batch_size=arguments.batch_size,
    )
    print(
        f"GPT-2 backbone: vocabulary {arguments.vocabulary}, width {arguments.width}, {arguments.blocks} blocks, "
        f"{arguments.sequences} sequences x {arguments.length} tokens, {arguments.queries} queries\n"
    )
    print("| phase | seconds | peak RSS (MiB) |")
    print("| --- | --- | --- |")
    for phase, seconds, peak in rows:
        print(f"| {phase} | {seconds:.1f} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
