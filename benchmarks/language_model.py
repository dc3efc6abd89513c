"""EK-FAC influence on a GPT-2-like causal language model: time and peak memory per phase, as a markdown table.

Default size (the target of ``docs/language_models.md``): a randomly initialised ``keras_hub.models.GPT2Backbone``
of about 5M parameters (vocabulary 2,048, width 256, 5 blocks, 4 heads) with a Dense head, 1,024 training sequences
of 64 tokens and 16 queries measured by the log-probability of their last token.

Influence is taken over the weights of the layers EK-FAC factors (Dense and EinsumDense: 4.47M parameters), as
Kronfluence tracks linear modules only; ``--watch all`` adds the token and position embeddings and the layer norms,
whose per-example gradients the layer capture takes with a ``tape.jacobian`` over the whole batch (about ``B`` times
a backward pass per batch: 35 s per batch of 32 at the default size on 2 shared cores, so the two passes of the fit
take about 40 minutes). Phases:

1. EK-FAC fit (``EKFACIHVP``: factors, eigendecomposition, eigenvalue correction; empirical Fisher);
2. query factors ``H⁻¹∇q(x)`` for the 16 queries (``compute_influence_factors``);
3. scoring every training sequence against the factors (``influence_from_factors``: one pass of per-sample
   gradients).

Memory: the peak resident set size *during* each phase (``/proc/self/status`` sampled every 20 ms by a thread) and
the process's maximum so far (``ru_maxrss``, which never decreases). The script runs with TensorFlow's oneDNN kernels
off (``TF_ENABLE_ONEDNN_OPTS=0``, set before TensorFlow is imported): with them, pfor's per-sample gradients of
attention layers corrupt the heap and abort the interpreter (``free(): invalid pointer``) on TensorFlow 2.21.

    .venv/bin/python benchmarks/language_model.py                     # the default size
    .venv/bin/python benchmarks/language_model.py --sequences 64 --width 64 --blocks 2 --vocabulary 256

``make bench`` runs it as the "GPT-2 EK-FAC (issue 13)" section of ``docs/benchmarks.md`` (:func:`run`: the default
size in a subprocess, so that an abort cannot take the report down and the environment variable takes effect); to
refresh that section alone::

    .venv/bin/python benchmarks/run_benchmarks.py --only language_model --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_model", "main", "measure", "run"]

ROOT = Path(__file__).resolve().parent.parent
SECTION_TITLE = "GPT-2 EK-FAC (issue 13)"
SECTION_COMMAND = ".venv/bin/python benchmarks/run_benchmarks.py --only language_model --output docs/benchmarks.md"
SAMPLE_SECONDS = 0.02


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


def _max_rss_mib() -> float:
    """The process's maximum resident set size so far (MiB); Linux reports ``ru_maxrss`` in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    except OSError:  # pragma: no cover - not Linux
        pass
    return _max_rss_mib()


class PeakMemory:
    """The peak resident set size between :meth:`reset` and :meth:`peak`, sampled by a daemon thread.

    ``ru_maxrss`` only ever grows, so it cannot tell a phase's own peak once an earlier phase went higher; sampling
    the current RSS can (and may miss a spike shorter than the sampling period).
    """

    def __init__(self, period: float = SAMPLE_SECONDS) -> None:
        self._period = period
        self._lock = threading.Lock()
        self._peak = _current_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._period):
            value = _current_rss_mib()
            with self._lock:
                self._peak = max(self._peak, value)

    def reset(self) -> None:
        with self._lock:
            self._peak = _current_rss_mib()

    def peak(self) -> float:
        value = _current_rss_mib()
        with self._lock:
            self._peak = max(self._peak, value)
            return self._peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(
    *,
    vocabulary: int = 2048,
    width: int = 256,
    blocks: int = 5,
    heads: int = 4,
    length: int = 64,
    sequences: int = 1024,
    queries: int = 16,
    batch_size: int = 32,
    watch: str = "factored",
) -> list[tuple[str, float, float, float]]:
    """Time and memory of each phase on a random-init GPT-2 and random tokens.

    Set ``TF_ENABLE_ONEDNN_OPTS=0`` before TensorFlow is imported (:func:`main` does): see the module docstring.
    ``watch="factored"`` watches the weights of the layers EK-FAC factors (Dense and EinsumDense kernels and biases:
    4.47M of the 5.02M parameters at the default size), ``"all"`` every weight (the token and position embeddings
    and layer norms too, which the capture differentiates with a ``tape.jacobian`` over the batch).

    Returns:
        ``[(phase, seconds, phase_peak_mib, process_max_mib)]``: wall time, the peak RSS during the phase, and
        ``ru_maxrss`` at its end.
    """
    import tensorflow as tf

    from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
    from influenciae.hessian import EKFACIHVP
    from influenciae.language import completion_log_probability, token_cross_entropy
    from influenciae.model.capture import LayerCapture

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocabulary, size=(sequences, length + 1)).astype("int32")
    x_train, y_train = tokens[:, :-1], tokens[:, 1:]
    query_tokens = rng.integers(1, vocabulary, size=(queries, length + 1)).astype("int32")
    query_targets = np.zeros([queries, length], "int32")
    query_targets[:, -1] = query_tokens[:, -1]  # the measured completion: the last token
    rows: list[tuple[str, float, float, float]] = []
    memory = PeakMemory()

    def done(phase: str, start: float) -> None:
        rows.append((phase, time.perf_counter() - start, memory.peak(), _max_rss_mib()))
        print(
            f"{phase}: {rows[-1][1]:.1f} s, peak RSS {rows[-1][2]:.0f} MiB (process max {rows[-1][3]:.0f} MiB)",
            file=sys.stderr,
            flush=True,
        )
        memory.reset()

    start = time.perf_counter()
    model = build_model(vocabulary, width, blocks, heads, length)
    loss = token_cross_entropy(pad_id=0)
    im = InfluenceModel(model, loss_function=loss)
    total = im.nb_params
    if watch == "factored":
        uncovered = set(LayerCapture(im).uncovered_weight_names)
        factored = [weight for weight, name in zip(im.weights, im.weight_names, strict=True) if name not in uncovered]
        im = InfluenceModel(model, loss_function=loss, weights_to_watch=factored)
    done(f"build ({total / 1e6:.2f}M parameters, {im.nb_params / 1e6:.2f}M watched)", start)
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
    memory.close()
    if scores.shape != (queries, sequences) or not np.all(np.isfinite(scores)):
        raise RuntimeError(f"unexpected scores: shape {scores.shape}")
    return rows


SIZES = {
    "vocabulary": 2048,
    "width": 256,
    "blocks": 5,
    "heads": 4,
    "length": 64,
    "sequences": 1024,
    "queries": 16,
    "batch_size": 32,
}


def describe(sizes: dict[str, int]) -> str:
    """One line naming the configuration, e.g. for a table's caption."""
    return (
        f"GPT-2 backbone: vocabulary {sizes['vocabulary']}, width {sizes['width']}, {sizes['blocks']} blocks of "
        f"{sizes['heads']} heads, {sizes['sequences']} sequences x {sizes['length']} tokens (batches of "
        f"{sizes['batch_size']}), {sizes['queries']} queries"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the sizes, run, print the markdown table (and write the rows as JSON with ``--json PATH``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    parser.add_argument(
        "--watch",
        choices=["factored", "all"],
        default="factored",
        help="the weights influence is taken over: those of the layers EK-FAC factors (default), or all",
    )
    parser.add_argument("--json", type=Path, help="also write {sizes, rows} to this file")
    arguments = parser.parse_args(argv)
    sizes = {name: getattr(arguments, name) for name in SIZES}
    # Before TensorFlow is imported (measure imports it): see the module docstring.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = measure(**sizes, watch=arguments.watch)
    print(f"{describe(sizes)}; watched weights: {arguments.watch}\n")
    print("| phase | seconds | peak RSS during the phase (MiB) | process max RSS (MiB) |")
    print("| --- | --- | --- | --- |")
    for phase, seconds, peak, maximum in rows:
        print(f"| {phase} | {seconds:.1f} | {peak:.0f} | {maximum:.0f} |")
    if arguments.json is not None:
        arguments.json.write_text(json.dumps({"sizes": sizes, "rows": rows}), encoding="utf-8")
    return 0


def run(*, repeats: int) -> list[Any]:
    """The "GPT-2 EK-FAC (issue 13)" section of ``docs/benchmarks.md``: the default size, once, in a subprocess.

    Each phase takes minutes, so it is timed once (``repeats`` is not used). The subprocess isolates an abort of
    the interpreter (reported in the table with its exit code) and starts TensorFlow with oneDNN off.
    """
    from benchmarks.run_benchmarks import Section, log

    del repeats
    columns = ["phase", "seconds", "peak RSS during the phase (MiB)", "process max RSS (MiB)"]
    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    load_start, date = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory) / "rows.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--json", str(output)]
        log("language_model: " + describe(SIZES))
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, check=False)
        elapsed = time.perf_counter() - started
        result = json.loads(output.read_text(encoding="utf-8")) if output.is_file() else None
    load_end = os.getloadavg()[0]
    intro = (
        f"EK-FAC influence on a randomly initialised `keras_hub.models.GPT2Backbone` with a Dense head "
        f"({describe(SIZES)}), influence over the weights of the layers EK-FAC factors (Dense and EinsumDense "
        "kernels and biases; not the embeddings and layer norms, whose per-example gradients the capture takes with "
        "a `tape.jacobian` over the batch, about 35 s per batch here: see the script's `--watch all`), measured by "
        "`benchmarks/language_model.py` in a subprocess: EK-FAC fit "
        '(`EKFACIHVP(fisher="empirical", relative_damping=0.1)`: factors, eigendecompositions, eigenvalue '
        "correction), the query factors `H⁻¹∇q` of 16 completion log-probabilities, and scoring every training "
        "sequence against them (one pass of per-sample gradients). One run (each phase takes minutes), with "
        "TensorFlow's oneDNN kernels off (`TF_ENABLE_ONEDNN_OPTS=0`: with them, pfor's per-sample gradients of "
        "attention abort the interpreter). Peak RSS during a phase is sampled every "
        f"{SAMPLE_SECONDS * 1e3:.0f} ms; the process maximum (`ru_maxrss`) includes the earlier phases."
    )
    notes = [
        f"Run on {date} UTC, {elapsed:.0f} s in all, load average "
        f"(1 min) {load_start:.2f} at the start and {load_end:.2f} at the end; this section alone is refreshed by "
        f"`{SECTION_COMMAND}`."
    ]
    if completed.returncode != 0 or result is None:
        rows = [["(did not finish)", f"exit code {completed.returncode} after {elapsed:.0f} s", "", ""]]
    else:
        rows = [
            [phase, f"{seconds:.1f}", f"{peak:.0f}", f"{maximum:.0f}"]
            for phase, seconds, peak, maximum in result["rows"]
        ]
    return [Section(SECTION_TITLE, intro, columns, rows, notes)]


if __name__ == "__main__":
    raise SystemExit(main())
