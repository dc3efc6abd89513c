"""The parts of the peer comparison (``benchmarks/peers``) that run in our environment, without the peers."""

from __future__ import annotations

import datetime
import json
import math
import time

import numpy as np
import pytest

from benchmarks.peers import blocks, run_peers
from benchmarks.peers import problem as spec


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A Keras MLP of the benchmark's architecture with random weights, exported and read back."""
    ours = pytest.importorskip("benchmarks.peers.ours")
    rng = np.random.default_rng(0)
    model = ours.build_model()
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    layers = ours._layers_of(model)
    x = rng.random((20, spec.NUM_FEATURES), dtype=np.float32)
    y = rng.integers(0, spec.NUM_CLASSES, 20)
    path = tmp_path_factory.mktemp("peers") / "problem.npz"
    spec.save_problem(path, spec.Problem(x, y, x[:5], y[:5], layers, [layers, layers], 1.5))
    return model, ours, x, y, spec.load_problem(path)


def test_export_round_trip_reproduces_keras_outputs_the_torch_way(exported):
    model, ours, x, y, problem = exported
    keras_logits = np.asarray(model(x))
    torch_logits = spec.torch_style_logits(spec.torch_layers(problem.layers), problem.x_train)
    np.testing.assert_allclose(torch_logits, keras_logits, rtol=1e-5, atol=1e-5)
    # nn.Linear's weight is [out, in]: the kernel transposed.
    assert [w.shape for w, _ in spec.torch_layers(problem.layers)] == [(spec.HIDDEN_UNITS, 64), (10, spec.HIDDEN_UNITS)]
    keras_losses = np.asarray(ours.loss_function()(y, keras_logits))
    np.testing.assert_allclose(spec.per_example_cross_entropy(torch_logits, y), keras_losses, rtol=1e-5, atol=1e-6)


def test_the_hidden_width_is_part_of_the_problem_file(tmp_path):
    """The larger model (H = 32, P = 2,410) is read back with its width from the kernel shapes, by every worker."""
    ours = pytest.importorskip("benchmarks.peers.ours")
    rng = np.random.default_rng(4)
    model = ours.build_model(hidden=32)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    layers = ours._layers_of(model)
    x = rng.random((7, spec.NUM_FEATURES), dtype=np.float32)
    y = rng.integers(0, spec.NUM_CLASSES, 7)
    path = tmp_path / ours.problem_name(32, 7)
    spec.save_problem(path, spec.Problem(x, y, x[:3], y[:3], layers, [layers], 1.0))
    problem = spec.load_problem(path)
    assert path.name == "problem_h32_n7.npz"
    assert problem.hidden_units == 32 and problem.num_params == 64 * 32 + 32 + 32 * 10 + 10 == 2410
    rebuilt = ours.build_model(problem.layers)  # no width given: read from the kernels
    np.testing.assert_allclose(np.asarray(rebuilt(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)
    torch_logits = spec.torch_style_logits(spec.torch_layers(problem.layers), x)
    np.testing.assert_allclose(torch_logits, np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_run_job_reports_cold_warm_cpu_load_and_the_limit(tmp_path):
    """The worker protocol calls compute twice in one process and reports both calls, CPU seconds and the load."""
    rng = np.random.default_rng(5)
    layers = [(rng.normal(size=(64, 8)).astype(np.float32), np.zeros(8, np.float32))]
    layers.append((rng.normal(size=(8, 10)).astype(np.float32), np.zeros(10, np.float32)))
    x = rng.random((6, 64), dtype=np.float32)
    y = rng.integers(0, 10, 6)
    problem_path = tmp_path / "problem.npz"
    spec.save_problem(problem_path, spec.Problem(x, y, x[:2], y[:2], layers, [layers], 1.0))
    calls = []

    def compute(state, job):
        calls.append(len(calls))
        busy = time.process_time()
        while time.process_time() - busy < 0.05:  # CPU work the report must see
            pass
        # The warm call differs by 1e-3 relative: the report must measure it.
        return {"scores": state * (1.0 + 1e-3 * (len(calls) - 1))}

    job = spec.Job(str(problem_path), "exact", "self", str(tmp_path / "out"))
    spec.run_job(job, lambda problem, job: np.arange(1.0, 7.0), compute, lambda *args: {"limit_seconds": 0.25})
    report = json.loads((tmp_path / "out.json").read_text())
    assert calls == [0, 1]
    assert report["hidden_units"] == 8 and report["num_params"] == 610 and report["num_train"] == 6
    assert report["cpu_seconds"] >= 0.04 and report["warm_cpu_seconds"] >= 0.04
    assert report["seconds"] >= 0.04 and report["warm_seconds"] >= 0.04
    assert report["warm_relative_difference"] == pytest.approx(1e-3)
    assert report["limit_seconds"] == 0.25
    assert report["load_start"] >= 0 and report["load_end"] >= 0
    with np.load(tmp_path / "out.npz") as saved:  # the cold scores are the ones kept
        np.testing.assert_array_equal(saved["scores"], np.arange(1.0, 7.0))
    measurement = run_peers.measurement_from_report("ours", job, 6, report, {})
    assert measurement.warm_seconds == report["warm_seconds"] and measurement.limit_seconds == 0.25
    assert measurement.key == ("exact", "self", 8, 6)


def test_export_round_trip_keeps_everything(exported):
    _, _, x, y, problem = exported
    np.testing.assert_array_equal(problem.x_train, x)
    np.testing.assert_array_equal(problem.y_train, y)
    assert len(problem.checkpoints) == 2
    assert problem.lissa_scale == 1.5
    assert problem.num_params == 64 * spec.HIDDEN_UNITS + spec.HIDDEN_UNITS + spec.HIDDEN_UNITS * 10 + 10


def test_job_arguments_round_trip():
    job = spec.Job("p.npz", "cg", "matrix", "out/x", train_limit=4)
    assert spec.parse_job(job.to_arguments()) == job
    assert spec.parse_job(spec.Job("p.npz", "exact", "self", "o").to_arguments()).train_limit is None


BLOCK = f"{blocks.BEGIN}\n## Peers\n\nnumbers\n{blocks.END}"


def test_replace_block_appends_then_replaces():
    text = "# Benchmarks\n\nbody\n"
    once = blocks.replace_block(text, BLOCK)
    assert once.startswith(text.rstrip("\n")) and once.endswith(blocks.END + "\n")
    new = BLOCK.replace("numbers", "new numbers")
    twice = blocks.replace_block(once + "tail\n", new)
    assert twice.count(blocks.BEGIN) == 1 and "new numbers" in twice and "\nnumbers" not in twice
    assert twice.endswith("tail\n")  # text after the block is kept
    assert blocks.replace_block("", BLOCK) == BLOCK + "\n"
    with pytest.raises(ValueError, match="must start"):
        blocks.replace_block(text, "no markers")


def test_preserve_block_carries_the_peers_block_over_a_rewrite():
    old = blocks.replace_block("# Benchmarks\n\nold body\n", BLOCK)
    new = blocks.preserve_block("# Benchmarks\n\nnew body\n", old)
    assert "new body" in new and "old body" not in new
    assert blocks.extract_block(new) == BLOCK
    assert blocks.preserve_block("fresh\n", None) == "fresh\n"
    assert blocks.preserve_block("fresh\n", "no block\n") == "fresh\n"
    assert blocks.extract_block(f"{blocks.BEGIN} unterminated") is None


def test_preserve_block_carries_the_analysis_block_too():
    analysis = f"{blocks.ANALYSIS_BEGIN}\nCaptum agreement\n{blocks.ANALYSIS_END}"
    old = blocks.replace_block("# Benchmarks\n\nold body\n", BLOCK) + "\n" + analysis + "\n"
    new = blocks.preserve_block("# Benchmarks\n\nnew body\n", old)
    assert "old body" not in new
    assert blocks.extract_block(new) == BLOCK
    assert blocks.extract_block(new, blocks.ANALYSIS_BEGIN, blocks.ANALYSIS_END) == analysis
    assert new.count(blocks.ANALYSIS_BEGIN) == 1


def test_run_benchmarks_keeps_the_block(tmp_path, monkeypatch):
    from benchmarks import run_benchmarks

    output = tmp_path / "benchmarks.md"
    output.write_text(blocks.replace_block("# Benchmarks\n\nstale\n", BLOCK), encoding="utf-8")
    monkeypatch.setattr(run_benchmarks, "run_sections", lambda names, repeats: [])
    monkeypatch.setattr(run_benchmarks, "machine_info", lambda: [("CPU", "test")])
    assert run_benchmarks.main(["--output", str(output), "--sections", *run_benchmarks.SECTION_MODULES]) == 0
    text = output.read_text(encoding="utf-8")
    assert "stale" not in text and blocks.extract_block(text) == BLOCK


def test_write_block_replaces_only_the_block(tmp_path):
    output = tmp_path / "benchmarks.md"
    output.write_text("# Benchmarks\n\nbody\n", encoding="utf-8")
    run_peers.write_block(output, BLOCK)
    run_peers.write_block(output, BLOCK.replace("numbers", "other"))
    text = output.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nbody\n") and text.count(blocks.BEGIN) == 1 and "other" in text


def _measurement(library, method, task, size, result, **kwargs):
    options = {"seconds": 2.0, "warm_seconds": 1.0, "cpu_seconds": 3.0, "warm_cpu_seconds": 1.5, "num_params": 610}
    options.update(kwargs)
    return run_peers.Measurement(
        library,
        method,
        task,
        size,
        "ok",
        peak_rss_mib=500.0,
        rss_before_mib=400.0,
        result=result,
        load_start=1.0,
        load_end=2.0,
        **options,
    )


def test_ratio_to_the_best_peer_and_the_fraction_of_the_limit():
    ours = _measurement("ours", "exact", "self", 30, {}, seconds=2.0, warm_seconds=1.0, limit_seconds=0.5)
    measurements = [
        ours,
        _measurement("pydvl", "exact", "self", 30, {}, seconds=8.0, warm_seconds=3.0),
        _measurement("captum", "exact", "self", 30, {}, seconds=4.0, warm_seconds=10.0),
        # Another model size and a failed run never count as the best peer.
        _measurement("captum", "exact", "self", 30, {}, seconds=0.1, warm_seconds=0.1, hidden=32, num_params=2410),
        run_peers.Measurement("pydvl", "exact", "self", 30, "timeout (> 1 s)"),
    ]
    assert run_peers.best_peer(measurements, ours.key).library == "captum"
    assert run_peers.best_peer(measurements, ours.key, warm=True).library == "pydvl"
    assert run_peers.ratio_to_best(measurements, ours) == pytest.approx(2.0 / 4.0)
    assert run_peers.ratio_to_best(measurements, ours, warm=True) == pytest.approx(1.0 / 3.0)
    # CPU seconds: ours 3 / 1.5 (the helper's defaults) against the same for every peer.
    assert run_peers.ratio_to_best(measurements, ours, cpu=True) == pytest.approx(1.0)
    assert run_peers.limit_fraction(ours) == pytest.approx(0.25)
    assert run_peers.limit_fraction(ours, warm=True) == pytest.approx(0.5)
    alone = _measurement("ours", "cg", "self", 30, {})
    assert math.isnan(run_peers.ratio_to_best(measurements, alone)) and math.isnan(run_peers.limit_fraction(alone))
    # A peer that scored a subset is compared on its time extrapolated to all N.
    subset = _measurement("pydvl", "cg", "self", 30, {}, seconds=1.0, warm_seconds=1.0, train_limit=3)
    assert run_peers.ratio_to_best([alone, subset], alone) == pytest.approx(2.0 / 10.0)


def test_agreement_converts_the_peer_convention():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(5, 30))
    captum = next(peer for peer in run_peers.PEERS if peer.name == "captum")
    ours = _measurement("ours", "exact", "matrix", 30, {"scores": scores})
    peer = _measurement("captum", "exact", "matrix", 30, {"scores": scores / 30})  # Captum: the summed-loss Hessian
    agreement = run_peers.compare(ours, peer, captum)
    assert agreement.pearson == pytest.approx(1.0)
    assert agreement.max_relative_difference < 1e-12
    flipped = run_peers.compare(ours, _measurement("captum", "exact", "matrix", 30, {"scores": -scores}), captum)
    assert flipped.pearson == pytest.approx(-1.0)
    assert run_peers.exact_failures([flipped]) == [flipped]


def test_agreement_on_a_subset_and_on_top_k():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=40)
    library = run_peers.PEERS[0]
    ours = _measurement("ours", "cg", "self", 40, {"scores": scores})
    peer = _measurement(library.name, "cg", "self", 40, {"scores": scores[:4]}, train_limit=4)
    agreement = run_peers.compare(ours, peer, library)
    assert agreement.compared == 4 and agreement.pearson == pytest.approx(1.0)
    assert peer.full_seconds == pytest.approx(2.0 * 40 / 4)
    indices = np.array([[1, 2, 3], [4, 5, 6]])
    values = np.array([[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]])
    ours_top = _measurement("ours", "exact", "topk", 40, {"indices": indices, "values": values})
    peer_top = _measurement(library.name, "exact", "topk", 40, {"indices": indices[:, [0, 2, 1]], "values": values})
    top = run_peers.compare(ours_top, peer_top, library)
    assert top.overlap == 1.0 and top.max_relative_difference == 0.0


def test_render_block_is_a_complete_block():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(spec.TEST_SIZE, 30))
    large = {"hidden": 32, "num_params": 2410}
    measurements = [
        _measurement(
            "ours", "exact", "matrix", 30, {"scores": scores}, limit_seconds=0.5, warm_relative_difference=0.0
        ),
        _measurement("pydvl", "exact", "matrix", 30, {"scores": scores}, seconds=4.0, warm_seconds=4.0),
        run_peers.Measurement("captum", "exact", "matrix", 30, "timeout (> 1 s)"),
        _measurement("ours", "exact", "matrix", 30, {"scores": scores}, seconds=6.0, **large),
        _measurement("pydvl", "exact", "matrix", 30, {"scores": -scores}, seconds=3.0, **large),
    ]
    libraries = [run_peers.OURS, *run_peers.PEERS]
    found = run_peers.agreements(measurements, libraries)
    block = run_peers.render_block(
        measurements,
        found,
        libraries,
        sizes=[30],
        versions={"ours": "TensorFlow x"},
        started=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        elapsed=1.0,
        load=(1.0, math.nan),
        num_params={8: 610, 32: 2410},
        command="the exact command",
        commit="`abc1234`",
        note="reduced run",
    )
    assert blocks.extract_block(block) == block.rstrip("\n")
    assert run_peers.COMMAND in block and "the exact command" in block and "`abc1234`" in block
    assert "reduced run" in block and "timeout" in block
    # Ours/best peer per P, cold and warm: P = 610 cold 2/4, warm 1/4; P = 2,410 cold 6/3.
    assert (
        "| exact | test × train | 610 | 30 | 4.00 (pyDVL 0.10) | 2.00 | **0.50×** | 4.00 (pyDVL 0.10) | 1.00 | "
        "**0.25×** | 1.00× / 1.00× | 0.50 | 25 % / 50 % |" in block
    )
    assert "| exact | test × train | 2,410 | 30 | 3.00 (pyDVL 0.10) | 6.00 | **2.00×** |" in block
    assert "| exact | test × train | 610 | 30 | limit (numpy) | 0.50 |" in block
    assert "**disagreement** for pydvl matrix P=2,410 N=30" in block  # the sign flip at P = 2,410 is caught
    assert "influenciae (ours) 0.0e+00" in block and "ours is within 1e-06" in block
