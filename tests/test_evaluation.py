"""Mislabeled-detection harness: metrics against scikit-learn, label flipping, and an end-to-end run."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.data import from_numpy
from influenciae.evaluation import (
    MislabelingDetectorEvaluator,
    detection_curve,
    detection_metrics,
    flip_labels,
    load_tfds_arrays,
    roc_auc,
)


def test_roc_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    positives = rng.random(200) < 0.3
    assert roc_auc(scores, positives) == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)
    assert np.isnan(roc_auc(scores, np.zeros(200, dtype=bool)))


def test_flip_labels_flips_exactly_the_fraction_to_other_classes():
    labels = np.arange(1000) % 10
    noisy, flipped = flip_labels(labels, 0.1, 10, seed=3)
    assert flipped.sum() == 100
    assert np.all(noisy[flipped] != labels[flipped]) and np.all(noisy[~flipped] == labels[~flipped])
    assert set(np.unique(noisy)) <= set(range(10))
    again, _ = flip_labels(labels, 0.1, 10, seed=3)
    np.testing.assert_array_equal(noisy, again)
    with pytest.raises(ValueError, match="range"):
        flip_labels(labels + 1, 0.1, 10)


def test_detection_metrics_for_perfect_and_reversed_scores():
    flipped = np.zeros(100, dtype=bool)
    flipped[:10] = True
    perfect = detection_metrics(flipped.astype(float), flipped)
    assert perfect.roc_auc == 1.0 and perfect.found_at_10 == 1.0 and perfect.curve_auc > 0.94
    reversed_ = detection_metrics(-flipped.astype(float), flipped)
    assert reversed_.roc_auc == 0.0 and reversed_.found_at_20 == 0.0
    curve = detection_curve(np.arange(100.0), flipped)
    assert curve[0] == 0.0 and curve[-1] == 1.0 and curve[90] == 0.0


def _train(inputs, labels, seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((inputs.shape[1],)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(inputs, labels, epochs=30, batch_size=128, verbose=0)
    return model


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


@pytest.mark.slow
def test_self_influence_finds_flipped_labels_on_breast_cancer():
    data = load_breast_cancer()
    inputs = (data.data - data.data.mean(0)) / data.data.std(0)
    labels = data.target

    def self_influence(model, x, y):
        influence_model = InfluenceModel(model, loss_function=_loss())
        train = from_numpy(x.astype("float32"), y, batch_size=128)
        return FirstOrderInfluenceCalculator(influence_model, train, damping=1e-3).self_influence(train)

    def loss(model, x, y):
        return InfluenceModel(model, loss_function=_loss()).batch_loss((x.astype("float32"), y)).numpy()

    evaluator = MislabelingDetectorEvaluator(
        inputs, labels, 2, _train, {"self-influence": self_influence, "loss": loss}, flip_fraction=0.1
    )
    report = evaluator.evaluate(seeds=(0, 1))
    summary = report.summary()
    assert summary["self-influence"]["roc_auc"][0] > 0.9
    assert abs(summary["random"]["roc_auc"][0] - 0.5) < 0.15
    assert "self-influence" in report.to_markdown()


def test_tfds_loading_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        images, labels = load_tfds_arrays("mnist", "train", limit=10)
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and labels.shape == (10,)


def test_report_sections_are_pluggable_and_failures_do_not_lose_the_page(tmp_path, monkeypatch):
    import sys
    import types

    from influenciae.evaluation import report

    assert report.run_section("influenciae.evaluation.no_such_module:section", report.ReportOptions()) is None
    module = types.ModuleType("fake_sections")
    module.good = lambda options: f"## Good\n\n{options.num_subsets} subsets"
    module.bare = lambda: "## Bare"

    def broken(options):
        raise RuntimeError("boom")

    module.broken = broken
    monkeypatch.setitem(sys.modules, "fake_sections", module)
    monkeypatch.setattr(
        report,
        "SECTIONS",
        {
            "good": "fake_sections:good",
            "bare": "fake_sections:bare",
            "broken": "fake_sections:broken",
            "absent": "fake_sections:absent",
        },
    )
    output = tmp_path / "evaluation.md"
    assert report.main(["--output", str(output), "--subsets", "7"]) == 0
    page = output.read_text()
    assert "## Good\n\n7 subsets" in page and "## Bare" in page
    assert "This section failed at `" in page and "`RuntimeError: boom`" in page
    assert page.index("## Good") < page.index("## Bare") < page.index("## broken")

    # Running one section again refreshes its block and keeps the others as they were generated.
    module.bare = lambda: "## Bare, again"
    assert report.main(["--output", str(output), "--sections", "bare"]) == 0
    refreshed = output.read_text()
    assert "## Bare, again" in refreshed and "## Bare\n" not in refreshed
    assert "## Good\n\n7 subsets" in refreshed and "`RuntimeError: boom`" in refreshed
    assert refreshed.index("## Good") < refreshed.index("## Bare, again") < refreshed.index("## broken")


def test_full_batch_trainer_reaches_the_optimum_and_warm_starts():
    from influenciae.evaluation.problems import FullBatchTrainer, per_example_loss

    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((60, 3))
    labels = (inputs[:, 0] - inputs[:, 1] > 0).astype("float64")
    train = FullBatchTrainer("logistic", 3, 1, 4, gradient_tolerance=1e-10)
    model = train(inputs, labels, seed=0)
    influence_model = InfluenceModel(model, loss_function=per_example_loss(1))
    gradient = influence_model.batch_gradient((inputs, labels)).numpy()
    kernel, bias = model.get_weights()
    # the penalty c‖w‖² on kernel and bias, c = 1e-3 as keras.regularizers.L2 stores it (in float32)
    gradient += 2 * float(np.float32(1e-3)) * np.concatenate([kernel.ravel(), bias])
    assert np.linalg.norm(gradient) < 1e-9
    again = train(inputs, labels, seed=5, initial_weights=model.get_weights())
    for first, second in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_allclose(first, second, atol=1e-10)
