"""The demo job (`make demo`), its metrics, its figures and the `influenciae` console script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from influenciae import cli, plots
from influenciae.demo import run_demo
from influenciae.evaluation import roc_auc

EXPECTED_FILES = {
    "report.html",
    "suspicious.png",
    "proponents_opponents.png",
    "detection_curve.png",
    "self_influence.csv",
    "top_k.csv",
    "metrics.json",
}
NUM_TEST_IMAGES, K = 2, 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    metrics = run_demo(
        output, seed=0, epochs=8, train_size=400, num_test_images=NUM_TEST_IMAGES, k=K, show_progress=False
    )
    return output, metrics


def read_csv(path):
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        return reader.fieldnames, list(reader)


# ---------------------------------------------------------------------- the job, at reduced size


@pytest.mark.slow
def test_demo_writes_every_file(demo_run):
    output, metrics = demo_run
    assert set(metrics["files"]) == EXPECTED_FILES
    for name in EXPECTED_FILES:
        assert (output / name).stat().st_size > 0, name
    for name in ("suspicious.png", "proponents_opponents.png", "detection_curve.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((output / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


@pytest.mark.slow
def test_self_influence_csv_matches_metrics(demo_run):
    output, metrics = demo_run
    columns, rows = read_csv(output / "self_influence.csv")
    assert columns == ["index", "given_label", "true_label", "flipped", "self_influence", "loss"]
    assert [int(r["index"]) for r in rows] == list(range(400))
    flipped = np.array([r["flipped"] == "1" for r in rows])
    assert flipped.sum() == metrics["data"]["num_flipped"] == 40
    assert all((r["given_label"] != r["true_label"]) == (r["flipped"] == "1") for r in rows)
    self_influence = np.array([float(r["self_influence"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    assert np.all(self_influence > 0) and np.all(loss >= 0)  # H + λI is positive definite on the last layer
    auc = metrics["detection"]["auc"]
    assert roc_auc(self_influence, flipped) == pytest.approx(auc["self_influence"])
    assert roc_auc(loss, flipped) == pytest.approx(auc["loss"])


@pytest.mark.slow
def test_detection_metrics_are_consistent(demo_run):
    _, metrics = demo_run
    detection = metrics["detection"]
    for name, auc in detection["auc"].items():
        assert 0.0 <= auc <= 1.0, name
    assert detection["auc"]["random"] == 0.5
    assert detection["auc"]["self_influence"] > 0.5 + 0.25  # far better than chance even after 8 epochs
    for name, found in detection["fraction_found"].items():
        assert 0.0 <= found["0.1"] <= found["0.2"] <= found["1.0"] == 1.0, name
    assert detection["fraction_found"]["random"]["0.1"] == pytest.approx(0.1, abs=0.01)
    assert 0.0 <= detection["curve_auc"]["self_influence"] <= 1.0
    assert 0.0 < metrics["model"]["test_accuracy"] <= 1.0
    assert metrics["model"]["num_watched_params"] == 2890  # Dense(10) on 6·6·8 features: the last layer only


@pytest.mark.slow
def test_top_k_csv_orders_proponents_and_opponents(demo_run):
    output, metrics = demo_run
    columns, rows = read_csv(output / "top_k.csv")
    assert columns == ["test_index", "rank", "kind", "train_index", "score"]
    assert len(rows) == NUM_TEST_IMAGES * 2 * K
    test_indices = [example["test_index"] for example in metrics["test_examples"]]
    for test_index in test_indices:
        for kind in ("proponent", "opponent"):
            chosen = [r for r in rows if int(r["test_index"]) == test_index and r["kind"] == kind]
            assert [int(r["rank"]) for r in chosen] == list(range(1, K + 1))
            scores = [float(r["score"]) for r in chosen]
            assert scores == sorted(scores, reverse=kind == "proponent")
        proponents = [
            float(r["score"]) for r in rows if int(r["test_index"]) == test_index and r["kind"] == "proponent"
        ]
        opponents = [float(r["score"]) for r in rows if int(r["test_index"]) == test_index and r["kind"] == "opponent"]
        assert min(proponents) > max(opponents)
        assert proponents[0] > 0 > opponents[0]


@pytest.mark.slow
def test_report_is_self_contained(demo_run):
    output, metrics = demo_run
    report = (output / "report.html").read_text(encoding="utf-8")
    assert report.count("data:image/png;base64,") == 3
    assert 'src="http' not in report and "<script" not in report
    for text in (
        "Summary",
        "most suspicious",
        "Proponents and opponents",
        f"{metrics['detection']['auc']['loss']:.4g}",
    ):
        assert text in report


# ---------------------------------------------------------------------- settings (fast)


def test_run_demo_rejects_bad_settings_before_training(tmp_path):
    with pytest.raises(ValueError, match="flip_fraction"):
        run_demo(tmp_path, flip_fraction=0.0, show_progress=False)
    with pytest.raises(ValueError, match="ihvp"):
        run_demo(tmp_path, ihvp="newton", show_progress=False)
    with pytest.raises(ValueError, match="arnoldi"):
        run_demo(tmp_path, method="arnoldi", ihvp="cg", show_progress=False)
    assert not any(tmp_path.iterdir())


def test_run_demo_refuses_a_fraction_that_flips_nothing(tmp_path):
    with pytest.raises(ValueError, match="flips no label"):
        run_demo(tmp_path, flip_fraction=0.001, train_size=100, show_progress=False)


# ---------------------------------------------------------------------- plots


def test_plots_return_figures():
    images = np.random.default_rng(0).random((5, 8, 8, 1))
    grid = plots.plot_image_grid(images, [f"image {i}" for i in range(5)], num_columns=3)
    pairs = plots.plot_proponents_opponents(images[0], images[1:3], images[3:5], ([2.0, 1.0], [-1.0, -2.0]))
    curve = plots.plot_detection_curve({"self-influence": np.linspace(0, 1, 11), "random": np.linspace(0, 1, 5)})
    for figure in (grid, pairs, curve):
        assert figure.axes
        plots.save_figure(figure, os.devnull, dpi=20)
    with pytest.raises(ValueError, match="titles"):
        plots.plot_image_grid(images, ["only one"])
    with pytest.raises(ValueError, match="scores"):
        plots.plot_proponents_opponents(images[0], images[1:3], images[3:5], ([1.0], [-1.0]))


def test_plots_name_the_extra_when_matplotlib_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"influenciae\[plots\]"):
        plots.require_matplotlib()


# ---------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["unknown-command"],
        ["demo", "--flip-fraction", "1.5"],
        ["demo", "--flip-fraction", "ten"],
        ["demo", "--seed", "-1"],
        ["demo", "--solver", "newton"],
        ["demo", "--method", "arnoldi", "--solver", "cg"],
    ],
)
def test_cli_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage: influenciae" in capsys.readouterr().err


def test_cli_help_exits_0(capsys):
    assert cli.main(["demo", "--help"]) == 0
    assert "--flip-fraction" in capsys.readouterr().out


def test_cli_failure_exits_1(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli.main(["demo", "--output", str(blocker / "demo"), "--no-progress"]) == 1
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_cli_exits_2_on_a_bad_argument():
    result = subprocess.run(
        [sys.executable, "-m", "influenciae.cli", "demo", "--flip-fraction", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 2
    assert "--flip-fraction" in result.stderr
