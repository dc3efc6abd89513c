"""The Apache Beam scoring pipeline against one process (issue 8). Runs in ``.venv-beam`` (``make test-beam``).

* On the DirectRunner with 2 worker processes (``multi_processing``), top-k indices are identical and influence
  vectors within 1e-6 of :class:`~influenciae.FirstOrderInfluenceCalculator` in one process.
* A job killed mid-run leaves no manifest, so its output is refused; a rerun completes it and removes the leftovers.
* A complete output of the same job is kept; the ``score`` command saves the solver state and reuses it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

apache_beam = pytest.importorskip("apache_beam")  # the Makefile runs this directory in .venv-beam, where it exists

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from influenciae import ORDER, FirstOrderInfluenceCalculator  # noqa: E402
from influenciae.distributed import SolverState, block_candidates, merge_candidates  # noqa: E402
from influenciae.distributed.beam import (  # noqa: E402
    MANIFEST,
    IncompleteOutputError,
    ScoringJob,
    TopKCombineFn,
    is_complete,
    read_scoring_output,
    run_scoring,
)
from influenciae.distributed.records import decode_records, read_tfrecords, write_sharded_tfrecords  # noqa: E402
from influenciae.distributed.state import load_influence_model  # noqa: E402
from influenciae.hessian import ExactIHVP  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NUM_TRAIN, NUM_TEST, DAMPING, K = 150, 4, 0.5, 7
TWO_PROCESSES = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
IN_MEMORY = ["--runner=DirectRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _make_problem(directory: Path, num_train: int, num_shards: int = 3) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((num_train + NUM_TEST, 5))
    y = rng.integers(0, 3, num_train + NUM_TEST)
    x[1] = x[0]  # two identical training examples: equal scores, the tie goes to the smaller index
    y[1] = y[0]
    directory.mkdir(parents=True, exist_ok=True)
    _model().save(directory / "model.keras")
    write_sharded_tfrecords(directory / "train", x[:num_train], y[:num_train], num_shards=num_shards)
    write_sharded_tfrecords(directory / "test", x[num_train:], y[num_train:], num_shards=1, prefix="test")
    model = load_influence_model(directory / "model.keras")
    train = read_tfrecords(str(directory / "train"), batch_size=16)
    test = read_tfrecords(str(directory / "test"), batch_size=16)
    state = SolverState.from_solver(model, ExactIHVP(model, train, damping=DAMPING), test_set=test)
    state.save(directory / "state.npz")
    return {"model": model, "train": train, "test": test, "directory": directory}


def _job(problem: dict, output: str, **changes) -> ScoringJob:
    directory = problem["directory"]
    settings = {
        "input_pattern": str(directory / "train" / "train-*.tfrecord"),
        "model_path": str(directory / "model.keras"),
        "state_path": str(directory / "state.npz"),
        "output_dir": str(directory / output),
        "mode": "top_k",
        "k": K,
        "batch_size": 16,
    }
    settings.update(changes)
    return ScoringJob(**settings)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    problem = _make_problem(tmp_path_factory.mktemp("beam"), NUM_TRAIN)
    model, train, test = problem["model"], problem["train"], problem["test"]
    calculator = FirstOrderInfluenceCalculator(model, train, ihvp_calculator=ExactIHVP(model, train, damping=DAMPING))
    problem["scores"] = calculator.influence_matrix(test, train)
    problem["top_k"] = calculator.most_influential(test, train, k=K)
    problem["vectors"] = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(train)])
    problem["self_influence"] = calculator.self_influence(train)
    return problem


def _relative_error(actual, expected) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# ---------------------------------------------------------------------- kernels inside Beam


def test_records_round_trip_with_indices(tmp_path):
    x, y = np.arange(12.0).reshape(6, 2), np.arange(6)
    files = write_sharded_tfrecords(tmp_path, x, y, np.linspace(0, 1, 6), num_shards=4, first_index=100)
    records = [r.numpy() for r in tf.data.TFRecordDataset(files[::-1])]  # any order: indices travel with records
    indices, (xs, ys, weights) = decode_records(records)
    np.testing.assert_array_equal(indices, np.arange(100, 106))
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)
    np.testing.assert_allclose(weights, np.linspace(0, 1, 6))
    batches = list(read_tfrecords(str(tmp_path), batch_size=4))
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in batches]), x)


def test_top_k_combine_fn_in_beam_is_exact_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(2, 40)).astype("float64")  # many ties
    indices = np.arange(40, dtype=np.int64)
    blocks = [block_candidates(indices[i : i + 6], scores[:, i : i + 6], 5, ORDER.DESCENDING) for i in range(0, 40, 6)]
    with apache_beam.Pipeline(options=apache_beam.options.pipeline_options.PipelineOptions(IN_MEMORY)) as pipeline:
        merged = (
            pipeline
            | apache_beam.Create(blocks[::-1], reshuffle=True)
            | apache_beam.CombineGlobally(TopKCombineFn(5, "descending"))
        )
        results = merged | apache_beam.Map(lambda candidates: candidates)
        from apache_beam.testing.util import assert_that

        expected_indices = np.stack([np.lexsort((indices, -row))[:5] for row in scores])

        def check(outputs):
            ((top_indices, top_values),) = outputs
            np.testing.assert_array_equal(top_indices, expected_indices)
            np.testing.assert_array_equal(top_values, np.take_along_axis(scores, expected_indices, 1))

        assert_that(results, check)
    one_by_one = blocks[0]
    for block in blocks[1:]:
        one_by_one = merge_candidates(one_by_one, block, 5)
    np.testing.assert_array_equal(one_by_one[0], expected_indices)


# ---------------------------------------------------------------------- the pipeline against one process


@pytest.mark.slow
def test_two_worker_processes_match_one_process(problem):
    manifest = run_scoring(_job(problem, "top_k"), TWO_PROCESSES)
    assert manifest["num_examples"] == NUM_TRAIN
    result = read_scoring_output(manifest_dir := str(problem["directory"] / "top_k"))
    np.testing.assert_array_equal(result["indices"], np.arange(NUM_TRAIN))
    assert _relative_error(result["scores"], problem["scores"]) <= 1e-6
    np.testing.assert_array_equal(result["top_k_indices"], problem["top_k"][0])
    np.testing.assert_allclose(result["top_k_values"], problem["top_k"][1], rtol=1e-6)
    assert is_complete(manifest_dir)

    manifest = run_scoring(_job(problem, "vectors", mode="vectors"), TWO_PROCESSES)
    vectors = read_scoring_output(str(problem["directory"] / "vectors"))
    assert _relative_error(vectors["vectors"], problem["vectors"]) <= 1e-6
    assert len(manifest["parts"]) >= 2


@pytest.mark.slow
def test_self_influence_and_its_top_k(problem):
    run_scoring(_job(problem, "self", mode="self_influence", order="descending"), IN_MEMORY)
    result = read_scoring_output(str(problem["directory"] / "self"))
    assert _relative_error(result["self_influence"], problem["self_influence"]) <= 1e-6
    expected = np.lexsort((np.arange(NUM_TRAIN), -problem["self_influence"]))[:K]
    np.testing.assert_array_equal(result["top_k_indices"][0], expected)


@pytest.mark.slow
def test_complete_output_is_kept_and_another_job_refused(problem):
    job = _job(problem, "kept", mode="self_influence")
    run_scoring(job, IN_MEMORY)
    manifest_path = Path(job.output_dir) / MANIFEST
    written = manifest_path.stat().st_mtime_ns
    run_scoring(job, IN_MEMORY)
    assert manifest_path.stat().st_mtime_ns == written  # nothing recomputed
    with pytest.raises(ValueError, match="another job"):
        run_scoring(_job(problem, "kept", mode="self_influence", k=3), IN_MEMORY)


# ---------------------------------------------------------------------- a job killed mid-run


_KILLED_RUN = """
import json, sys
from influenciae.distributed.beam import ScoringJob, run_scoring
run_scoring(ScoringJob(**json.loads(sys.argv[1])), json.loads(sys.argv[2]))
"""


@pytest.mark.slow
def test_killed_run_is_never_mistaken_for_complete_and_a_rerun_finishes(tmp_path):
    problem = _make_problem(tmp_path / "big", 1000, num_shards=4)
    job = _job(problem, "out", mode="self_influence", batch_size=8)
    output = Path(job.output_dir)
    environment = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, json.dumps(job.to_json()), json.dumps(TWO_PROCESSES)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the runner and its worker processes die together
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if output.is_dir() and len(list(output.glob("part-*.npz"))) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the job ended before it could be killed"
        assert not (output / MANIFEST).exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the group this test started
        process.wait(timeout=60)
    parts_before = len(list(output.glob("part-*.npz")))
    assert 3 <= parts_before < 250  # killed mid-run: some parts, not all of them
    assert not is_complete(str(output))
    with pytest.raises(IncompleteOutputError, match="did not finish"):
        read_scoring_output(str(output))

    manifest = run_scoring(job, IN_MEMORY)  # the rerun
    assert manifest["num_examples"] == 1000
    listed = {part["file"] for part in manifest["parts"]}
    assert {path.name for path in output.glob("part-*.npz")} == listed  # leftovers of the killed run removed
    assert not list(output.glob(".tmp-*"))
    result = read_scoring_output(str(output))
    np.testing.assert_array_equal(result["indices"], np.arange(1000))
    calculator = FirstOrderInfluenceCalculator(
        problem["model"],
        problem["train"],
        ihvp_calculator=ExactIHVP(problem["model"], problem["train"], damping=DAMPING),
    )
    expected = calculator.self_influence(problem["train"])
    assert _relative_error(result["self_influence"], expected) <= 1e-6


# ---------------------------------------------------------------------- the command


@pytest.mark.slow
def test_score_command_saves_the_state_and_reuses_it(problem, tmp_path, capsys):
    import argparse

    from influenciae.cli import score as cli

    directory = problem["directory"]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = [
        "--model", str(directory / "model.keras"),
        "--train", str(directory / "train" / "train-*.tfrecord"),
        "--test", str(directory / "test" / "test-*.tfrecord"),
        "--state", str(tmp_path / "state.npz"),
        "--output", str(tmp_path / "scores"),
        "--damping", str(DAMPING),
        "-k", str(K),
        "--batch-size", "32",
    ]  # fmt: skip
    assert cli.run(parser.parse_args(argv)) == 0
    first = capsys.readouterr().out
    assert "solver state computed" in first
    state_written = (tmp_path / "state.npz").stat().st_mtime_ns
    result = read_scoring_output(str(tmp_path / "scores"))
    np.testing.assert_array_equal(result["top_k_indices"], problem["top_k"][0])

    (tmp_path / "scores" / MANIFEST).unlink()  # as if the scoring pass had died: the state is reused
    assert cli.run(parser.parse_args(argv)) == 0
    second = capsys.readouterr().out
    assert "solver state reused" in second and '"status": "scored"' in second
    assert (tmp_path / "state.npz").stat().st_mtime_ns == state_written
    np.testing.assert_array_equal(read_scoring_output(str(tmp_path / "scores"))["top_k_indices"], problem["top_k"][0])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "options", "workers"),
    [("tracin", ["--learning-rate", "0.5"], "1"), ("trak", ["--projection-dim", "8", "--seed", "3"], "1")],
)
def test_score_command_runs_tracin_and_trak_as_one_process(problem, tmp_path, capsys, method, options, workers):
    """``influenciae score --method tracin|trak``: each worker builds the calculator; scores equal one process."""
    import argparse

    from influenciae.cli import score as cli
    from influenciae.influence.registry import CalculatorOptions, CalculatorSetup, build_calculator
    from influenciae.model.loading import load_model

    directory = problem["directory"]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    common = [
        "--model", str(directory / "model.keras"),
        "--train", str(directory / "train" / "train-*.tfrecord"),
        "--test", str(directory / "test" / "test-*.tfrecord"),
        "--method", method, *options, "--damping", "0", "-k", str(K), "--batch-size", "16",
        "--num-workers", workers,
    ]  # fmt: skip
    settings = {"learning_rate": 0.5} if method == "tracin" else {"projection_dim": 8, "seed": 3}
    setup = CalculatorSetup(
        load_model(directory / "model.keras"), problem["train"], None, CalculatorOptions(damping=0.0, **settings)
    )
    calculator = build_calculator(method, setup)
    scores = calculator.influence_matrix(problem["test"], problem["train"])
    self_influence = calculator.self_influence(problem["train"])
    top_indices, top_values = calculator.most_influential(problem["test"], problem["train"], k=K)

    assert cli.run(parser.parse_args([*common, "--output", str(tmp_path / "top_k"), "--mode", "top_k"])) == 0
    result = read_scoring_output(str(tmp_path / "top_k"))
    assert result["manifest"]["job"]["method"] == method and result["manifest"]["job"]["state_path"] is None
    np.testing.assert_array_equal(result["indices"], np.arange(NUM_TRAIN))
    assert _relative_error(result["scores"], scores) <= 1e-9
    np.testing.assert_array_equal(result["top_k_indices"], top_indices)
    np.testing.assert_allclose(result["top_k_values"], top_values, rtol=1e-9)

    argv = [*common, "--output", str(tmp_path / "self"), "--mode", "self_influence"]
    assert cli.run(parser.parse_args(argv)) == 0
    result = read_scoring_output(str(tmp_path / "self"))
    assert _relative_error(result["self_influence"], self_influence) <= 1e-9
    expected = np.lexsort((np.arange(NUM_TRAIN), -self_influence))[:K]
    np.testing.assert_array_equal(result["top_k_indices"][0], expected)
    assert "solver state" not in capsys.readouterr().out  # no solver state: the calculator is the method's
