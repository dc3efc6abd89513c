"""The demo job (`make demo`), its metrics, its figures and the `influenciae` console script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from influenciae import cli
from influenciae.app import plots
from influenciae.app.demo import DemoConfig, format_summary, load_noisy_digits, run_demo
from influenciae.app.demo_analysis import _cleaned_training_set, _retrained_accuracy, _test_scores
from influenciae.app.demo_digits import _fit, _Retrainer
from influenciae.evaluation import roc_auc

EXPECTED_FILES = {
    "report.html",
    "cleaning.png",
    "suspicious.png",
    "proponents_opponents.png",
    "detection_curve.png",
    "self_influence.csv",
    "top_k.csv",
    "test_errors.csv",
    "cleaning.csv",
    "metrics.json",
}
PNG_FILES = ("cleaning.png", "suspicious.png", "proponents_opponents.png", "detection_curve.png")
NUM_TEST_IMAGES, K = 2, 3
# The reduced run: 400 training examples (40 flipped), 8 epochs, one budget and two retraining seeds (each retraining
# costs ~1.5 s here, mostly tracing: this keeps the module near 40 s).
SETTINGS = {"seed": 0, "epochs": 8, "train_size": 400, "budgets": (0.1,), "cleaning_seeds": 2}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    metrics = run_demo(output, **SETTINGS, num_test_images=NUM_TEST_IMAGES, k=K, show_progress=False)
    return output, metrics


@pytest.fixture(scope="module")
def demo_data():
    config = DemoConfig(**SETTINGS)
    data = load_noisy_digits(seed=0, flip_fraction=config.flip_fraction, train_size=config.train_size)
    return data, config


@pytest.fixture(scope="module")
def main_model_again(demo_data):
    data, config = demo_data
    return _fit(data.x_train, data.given_labels, seed=0, config=config)  # the main model's recipe, from scratch


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
    for name in PNG_FILES:
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
    assert len(rows) == len(metrics["test_examples"]) * 2 * K
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
    assert report.count("data:image/png;base64,") == len(PNG_FILES)
    assert 'src="http' not in report and "<script" not in report
    cleaning = metrics["cleaning"]
    for text in (
        "Summary",
        "What cleaning buys",
        "Why did the model get these test images wrong?",
        "most suspicious",
        "Proponents and opponents",
        f"{metrics['detection']['auc']['loss']:.4f}",
        f"{cleaning['before']['mean']:.3f} ± {cleaning['before']['std']:.3f}",
        f"{cleaning['clean']['mean']:.3f} ± {cleaning['clean']['std']:.3f}",
    ):
        assert text in report, text
    # The headline comes first: cleaning, then the test errors, then detection.
    assert report.index("What cleaning buys") < report.index("Why did the model") < report.index("Detecting flipped")


# ---------------------------------------------------------------------- the cleaning experiment


@pytest.mark.slow
def test_cleaning_table_has_one_entry_per_budget_and_seed(demo_run):
    output, metrics = demo_run
    cleaning = metrics["cleaning"]
    assert cleaning["action"] == "fix"
    assert cleaning["budgets"] == [0.1]
    assert cleaning["num_cleaned"] == [40]  # 10 % of 400
    assert cleaning["retrain_seeds"] == [0, 1]
    assert cleaning["num_flipped"] == 40
    assert set(cleaning["rankings"]) == {"self_influence", "loss", "random"}
    for summary in (cleaning["before"], cleaning["clean"]):
        for values in (summary, summary["test_loss"]):
            assert len(values["per_seed"]) == 2
            assert values["mean"] == pytest.approx(np.mean(values["per_seed"]))
            assert values["std"] == pytest.approx(np.std(values["per_seed"], ddof=1))
    for name, ranking in cleaning["rankings"].items():
        assert np.shape(ranking["per_seed"]) == np.shape(ranking["flipped_cleaned"]) == (1, 2), name  # [budget, seed]
        assert np.shape(ranking["test_loss"]["per_seed"]) == (1, 2), name
        for values in (ranking, ranking["test_loss"]):
            assert values["mean"] == pytest.approx(np.mean(values["per_seed"], axis=1))
            assert values["std"] == pytest.approx(np.std(values["per_seed"], axis=1, ddof=1))
        assert all(loss > 0 for row in ranking["test_loss"]["per_seed"] for loss in row)
        flipped = np.array(ranking["flipped_cleaned"])
        assert np.all(flipped >= 0) and np.all(flipped <= np.array(cleaning["num_cleaned"])[:, None])
        for accuracies in ranking["per_seed"]:
            assert all(0.0 < accuracy <= 1.0 for accuracy in accuracies)
    # The deterministic rankings clean the same picks for every seed.
    for name in ("self_influence", "loss"):
        assert all(len(set(row)) == 1 for row in cleaning["rankings"][name]["flipped_cleaned"])
    # Self-influence and loss find flipped labels far above the random rate (10 %) at the 10 % budget.
    for name in ("self_influence", "loss"):
        assert cleaning["rankings"][name]["flipped_cleaned"][0][0] >= 30
    # 2 seeds x (before, clean, 3 rankings x 1 budget) evaluations; the main model and repeats are not retrained.
    assert 1 <= cleaning["num_models_trained"] <= 2 * (2 + 3) - 1
    columns, rows = read_csv(output / "cleaning.csv")
    assert columns == ["ranking", "budget", "num_cleaned", "seed", "flipped_cleaned", "test_accuracy", "test_loss"]
    assert len(rows) == 2 * 2 + 3 * 2
    chosen = [r for r in rows if r["ranking"] == "loss" and float(r["budget"]) == 0.1]
    assert [float(r["test_accuracy"]) for r in chosen] == cleaning["rankings"]["loss"]["per_seed"][0]
    assert [float(r["test_loss"]) for r in chosen] == cleaning["rankings"]["loss"]["test_loss"]["per_seed"][0]


@pytest.mark.slow
def test_retraining_with_the_same_seed_reproduces_the_main_model(demo_run, demo_data, main_model_again):
    _, metrics = demo_run
    data, _ = demo_data
    # Same data, same seed: the same model, so the same test accuracy and loss to the last bit (the cleaning
    # experiment relies on it to train a training set met twice only once).
    accuracy, loss = _test_scores(main_model_again, data)
    assert accuracy == metrics["model"]["test_accuracy"] == metrics["cleaning"]["before"]["per_seed"][0]
    assert loss == metrics["cleaning"]["before"]["test_loss"]["per_seed"][0]


@pytest.mark.slow
def test_fixing_every_flipped_label_gives_the_clean_accuracy(demo_run, demo_data):
    _, metrics = demo_run
    data, config = demo_data
    oracle = np.argsort(~data.flipped, kind="stable")  # flipped examples first
    budget = int(data.flipped.sum())
    images, labels = _cleaned_training_set(data, oracle[:budget], "fix")
    np.testing.assert_array_equal(labels, data.true_labels)
    # A fresh model (_fit) here, the reused compiled model (_Retrainer) in the run: the same accuracy to the bit.
    assert _retrained_accuracy(images, labels, data, config, 0) == metrics["cleaning"]["clean"]["per_seed"][0]
    # Fixing clean examples changes nothing; dropping removes exactly the picks.
    unchanged = _cleaned_training_set(data, np.flatnonzero(~data.flipped)[:50], "fix")[1]
    np.testing.assert_array_equal(unchanged, data.given_labels)
    kept_images, kept_labels = _cleaned_training_set(data, oracle[:budget], "drop")
    assert kept_labels.size == kept_images.shape[0] == data.given_labels.size - budget
    np.testing.assert_array_equal(kept_labels, data.true_labels[~data.flipped])


@pytest.mark.slow
def test_reused_compiled_model_trains_like_a_fresh_one(demo_data):
    data, _ = demo_data
    config = DemoConfig(epochs=1, train_size=400)
    # Dropping changes the training-set size (a compiled model of its own); the reuse at one size is checked against
    # a fresh model in test_fixing_every_flipped_label_gives_the_clean_accuracy.
    images, labels = _cleaned_training_set(data, np.arange(40), "drop")
    retrainer = _Retrainer(config)
    reused = retrainer.fit(images, labels, seed=1).get_weights()
    fresh = _fit(images, labels, seed=1, config=config).get_weights()
    for reused_weight, fresh_weight in zip(reused, fresh, strict=True):
        np.testing.assert_array_equal(reused_weight, fresh_weight)
    assert list(retrainer.models) == [360]


@pytest.mark.slow
def test_random_baseline_uses_distinct_seeds(demo_run, demo_data):
    _, metrics = demo_run
    data, _ = demo_data
    cleaning = metrics["cleaning"]
    pick_seeds = cleaning["random_pick_seeds"]
    assert len({tuple(seed) for seed in pick_seeds}) == len(pick_seeds) == 2
    picks = [np.random.default_rng(seed).permutation(400) for seed in pick_seeds]
    for position, count in enumerate(cleaning["num_cleaned"]):
        assert set(picks[0][:count]) != set(picks[1][:count])
        expected = [int(data.flipped[order[:count]].sum()) for order in picks]
        assert cleaning["rankings"]["random"]["flipped_cleaned"][position] == expected


# ---------------------------------------------------------------------- test errors explained


@pytest.mark.slow
def test_misclassified_list_is_exactly_the_test_errors(demo_run, demo_data, main_model_again):
    output, metrics = demo_run
    data, _ = demo_data
    predictions = np.argmax(main_model_again.predict(data.x_test, verbose=0), axis=1)
    errors = np.flatnonzero(predictions != data.y_test)
    assert errors.size == metrics["test_errors"]["num_errors"] > 0
    assert metrics["test_errors"]["test_indices"] == errors.tolist()
    examples = metrics["test_examples"]
    assert [e["test_index"] for e in examples[: errors.size]] == errors.tolist()  # errors first, every one
    assert all(e["misclassified"] for e in examples[: errors.size])
    assert len(examples) == errors.size + NUM_TEST_IMAGES
    assert not any(e["misclassified"] for e in examples[errors.size :])
    _, rows = read_csv(output / "test_errors.csv")
    assert [int(r["test_index"]) for r in rows] == errors.tolist()
    for example in examples:
        flags = [item["flipped"] for item in example["proponents"]]
        assert flags == [bool(data.flipped[item["train_index"]]) for item in example["proponents"]]
        assert example["flipped_proponents"] == sum(flags)
        assert example["flipped_fraction_of_proponents"] == pytest.approx(sum(flags) / K)


@pytest.mark.slow
def test_proponent_statistics_agree_with_the_listed_proponents(demo_run):
    _, metrics = demo_run
    errors = [e for e in metrics["test_examples"] if e["misclassified"]]
    statistics = metrics["test_errors"]["influence"]["errors"]
    assert statistics["flipped_fraction"] == pytest.approx(
        np.mean([e["flipped_fraction_of_proponents"] for e in errors])
    )
    assert statistics["flipped_to_predicted_fraction"] == pytest.approx(
        np.mean([e["flipped_to_predicted_proponents"] / K for e in errors])
    )
    assert statistics["with_a_flipped_proponent"] == pytest.approx(
        np.mean([e["flipped_proponents"] > 0 for e in errors])
    )
    for method in ("influence", "relatif"):
        for kind in ("errors", "correct"):
            values = metrics["test_errors"][method][kind]
            assert 0.0 <= values["flipped_to_predicted_fraction"] <= values["flipped_fraction"] <= 1.0


@pytest.mark.slow
def test_summary_leads_with_the_cleaning_result(demo_run):
    _, metrics = demo_run
    lines = format_summary(metrics).splitlines()
    assert lines[0].startswith("Cleaning")
    assert f"{metrics['cleaning']['before']['mean']:.3f}" in lines[0]
    assert any(line.startswith("Test errors:") for line in lines)
    assert any(line.startswith("Detection:") for line in lines)


# ---------------------------------------------------------------------- settings (fast)


def test_run_demo_rejects_bad_settings_before_training(tmp_path):
    with pytest.raises(ValueError, match="flip_fraction"):
        run_demo(tmp_path, flip_fraction=0.0, show_progress=False)
    with pytest.raises(ValueError, match="ihvp"):
        run_demo(tmp_path, ihvp="newton", show_progress=False)
    with pytest.raises(ValueError, match="arnoldi"):
        run_demo(tmp_path, method="arnoldi", ihvp="cg", show_progress=False)
    with pytest.raises(ValueError, match="budgets"):
        run_demo(tmp_path, budgets=(0.2, 0.1), show_progress=False)
    with pytest.raises(ValueError, match="budgets"):
        run_demo(tmp_path, budgets=(), show_progress=False)
    with pytest.raises(ValueError, match="cleaning_action"):
        run_demo(tmp_path, cleaning_action="relabel", show_progress=False)
    with pytest.raises(ValueError, match="cleaning_seeds"):
        run_demo(tmp_path, cleaning_seeds=0, show_progress=False)
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
    cleaning = plots.plot_cleaning_curve(
        [0.05, 0.1], {"loss": ([0.95, 0.96], [0.01, 0.0]), "random": ([0.9, 0.91], [0.02, 0.01])}, before=(0.9, 0.01)
    )
    assert len(cleaning.axes[0].containers) == 2  # one errorbar container per ranking
    for figure in (grid, pairs, curve, cleaning):
        assert figure.axes
        plots.save_figure(figure, os.devnull, dpi=20)
    with pytest.raises(ValueError, match="titles"):
        plots.plot_image_grid(images, ["only one"])
    with pytest.raises(ValueError, match="scores"):
        plots.plot_proponents_opponents(images[0], images[1:3], images[3:5], ([1.0], [-1.0]))
    with pytest.raises(ValueError, match="one per budget"):
        plots.plot_cleaning_curve([0.1, 0.2], {"loss": ([0.9], [0.0])}, before=(0.9, 0.0))
    with pytest.raises(ValueError, match="increasing"):
        plots.plot_cleaning_curve([0.2, 0.1], {"loss": ([0.9, 0.9], [0.0, 0.0])}, before=(0.9, 0.0))


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
        ["demo", "--budgets", "0.2,0.1"],
        ["demo", "--budgets", "0.1,ten"],
        ["demo", "--budgets", "1.5"],
        ["demo", "--cleaning-seeds", "0"],
        ["demo", "--cleaning-action", "relabel"],
    ],
)
def test_cli_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage: influenciae" in capsys.readouterr().err


def test_cli_help_exits_0(capsys):
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--flip-fraction", "--budgets", "--cleaning-seeds", "--cleaning-action"):
        assert option in out


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
