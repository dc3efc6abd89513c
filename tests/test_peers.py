"""The parts of the peer comparison (``benchmarks/peers``) that run in our environment, without the peers."""

from __future__ import annotations

import datetime
import math

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
    return run_peers.Measurement(
        library,
        method,
        task,
        size,
        "ok",
        seconds=2.0,
        peak_rss_mib=500.0,
        rss_before_mib=400.0,
        result=result,
        **kwargs,
    )


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
    measurements = [
        _measurement("ours", "exact", "matrix", 30, {"scores": scores}),
        _measurement("pydvl", "exact", "matrix", 30, {"scores": scores}),
        run_peers.Measurement("captum", "exact", "matrix", 30, "timeout (> 1 s)"),
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
        num_params=610,
    )
    assert blocks.extract_block(block) == block.rstrip("\n")
    assert run_peers.COMMAND in block and "timeout" in block and "| 1.00× |" in block
    assert "every peer agrees" in block
