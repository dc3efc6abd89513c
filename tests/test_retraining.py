"""Leave-one-out and LDS harnesses: metrics against closed forms, an exactly additive "model" that pins the sign and
scale convention, and exact influence against Newton retraining of an L2-regularized logistic regression (float64)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import ExactL2, dataset, logistic_loss, logistic_problem
from scipy.stats import spearmanr

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.evaluation import (
    LeaveOneOutEvaluator,
    LinearDatamodelingEvaluator,
    datamodeling_correlations,
    leave_one_out,
    linear_datamodeling_score,
    pearson_correlation,
    random_subsets,
    retrain_on_subsets,
    scale_ratio,
    spearman_correlation,
)

# ---------------------------------------------------------------------------------------------------- metrics


def test_correlations_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    first = rng.standard_normal(50)
    second = first + rng.standard_normal(50)
    second[:5] = second[5]  # ties
    assert pearson_correlation(first, second) == pytest.approx(np.corrcoef(first, second)[0, 1], abs=1e-12)
    assert spearman_correlation(first, second) == pytest.approx(spearmanr(first, second).statistic, abs=1e-12)
    assert spearman_correlation(first, np.exp(first)) == pytest.approx(1.0)
    assert np.isnan(pearson_correlation(first, np.ones(50)))
    assert scale_ratio(first, 2.0 * first) == pytest.approx(2.0)
    assert scale_ratio(first, -0.5 * first) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="same number"):
        pearson_correlation(first, second[:10])


def test_random_subsets_keep_the_fraction_and_are_seeded():
    masks = random_subsets(101, 40, 0.3, seed=2)
    assert masks.shape == (40, 101) and masks.dtype == bool
    np.testing.assert_array_equal(masks.sum(axis=1), 30)
    np.testing.assert_array_equal(masks, random_subsets(101, 40, 0.3, seed=2))
    assert not np.array_equal(masks, random_subsets(101, 40, 0.3, seed=3))
    assert masks.any(axis=0).all() and not masks.all(axis=0).any()  # every example is kept sometimes, dropped sometimes
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        random_subsets(10, 5, 1.0)
    with pytest.raises(ValueError, match="keeps 0"):
        random_subsets(3, 5, 0.1)


def test_lds_of_an_exactly_additive_model():
    rng = np.random.default_rng(1)
    true_scores = rng.standard_normal((7, 60))  # [N_test, N_train]
    masks = random_subsets(60, 25, 0.5, seed=0)
    outputs = 3.0 + masks @ true_scores.T  # the output of test example j is Σ_{i∈S} a_ji
    np.testing.assert_allclose(datamodeling_correlations(true_scores, masks, outputs), 1.0)
    assert linear_datamodeling_score(0.1 * true_scores, masks, outputs) == pytest.approx(1.0)
    assert linear_datamodeling_score(-true_scores, masks, outputs) == pytest.approx(-1.0)
    noisy = linear_datamodeling_score(true_scores + 2.0 * rng.standard_normal(true_scores.shape), masks, outputs)
    assert 0.2 < noisy < 0.9
    constant = outputs.copy()
    constant[:, 0] = 1.0
    correlations = datamodeling_correlations(true_scores, masks, constant)
    assert np.isnan(correlations[0]) and np.allclose(correlations[1:], 1.0)
    with pytest.raises(ValueError, match="num_subsets, N_test"):
        datamodeling_correlations(true_scores, masks, outputs.T)
    with pytest.raises(ValueError, match="boolean"):
        datamodeling_correlations(true_scores, masks.astype(int), outputs)


# -------------------------------------------------------------------------------------------------- an additive "model"


class _Additive:
    """A "model" whose test loss is exactly ``c_j - Σ_{i kept} a_ji / N``: removing ``z_i`` raises it by ``a_ji / N``.

    With scores ``a`` (the influence convention: positive = proponent), the leave-one-out prediction is exact.
    """

    def __init__(self, kept: np.ndarray, effects: np.ndarray, initial_weights) -> None:
        self.kept, self.effects, self.initial_weights = kept, effects, initial_weights

    def get_weights(self):
        return [self.kept.astype(np.float64)]

    def loss(self, test_index: np.ndarray) -> np.ndarray:
        return 5.0 - self.effects[test_index][:, self.kept].sum(axis=1) / self.effects.shape[1]


def _additive_problem(num_train=30, num_test=6, seed=0):
    rng = np.random.default_rng(seed)
    effects = rng.standard_normal((num_test, num_train))
    calls = []

    def train(inputs, labels, *, seed, initial_weights=None):
        calls.append((len(inputs), seed, initial_weights is not None))
        return _Additive(inputs[:, 0].astype(int), effects, initial_weights)

    def test_loss(model, inputs, labels):
        return model.loss(inputs[:, 0].astype(int))

    inputs = np.arange(num_train)[:, None]
    test_inputs = np.arange(num_test)[:, None]
    return effects, train, test_loss, inputs, np.zeros(num_train), test_inputs, np.zeros(num_test), calls


def test_leave_one_out_sign_and_scale_on_an_additive_model():
    effects, train, test_loss, x, y, x_test, y_test, calls = _additive_problem()
    changes = leave_one_out(train, x, y, x_test, y_test, test_loss, [3, 7], seed=4)
    np.testing.assert_allclose(changes, effects[:, [3, 7]].T / 30, atol=1e-14)  # +score / N
    assert calls == [(30, 4, False), (29, 4, False), (29, 4, False)]  # the reference, then one per removal

    scorers = {"exact": lambda m, *_: effects, "flipped": lambda m, *_: -effects, "doubled": lambda m, *_: 2 * effects}
    evaluator = LeaveOneOutEvaluator(x, y, x_test, y_test, train, scorers, test_loss, num_removals=10)
    report = evaluator.evaluate(seeds=(0, 1))
    summary = report.summary()
    assert summary["exact"]["pearson"] == pytest.approx((1.0, 0.0))
    assert summary["exact"]["scale_ratio"] == pytest.approx((1.0, 0.0))
    assert summary["flipped"]["spearman"] == pytest.approx((-1.0, 0.0))
    assert summary["doubled"]["scale_ratio"][0] == pytest.approx(0.5)
    assert abs(summary["random"]["pearson"][0]) < 0.3
    result = report.per_seed["exact"][0]
    assert result.predicted.shape == (10, 6) and len(np.unique(result.indices)) == 10
    np.testing.assert_array_equal(result.indices, report.per_seed["doubled"][0].indices)  # random: shared removals
    assert "| exact | 1.000 ± 0.000 |" in report.to_markdown()


def test_leave_one_out_selection_targets_and_shared_retrainings():
    effects, train, test_loss, x, y, x_test, y_test, calls = _additive_problem()
    mean_effect = effects.mean(axis=0)
    scorers = {"exact": lambda m, *_: effects, "flipped": lambda m, *_: -effects}
    for selection, expected in [
        ("top", np.argsort(-mean_effect)[:5]),
        ("bottom", np.argsort(mean_effect)[:5]),
        ("largest", np.argsort(-np.abs(mean_effect))[:5]),
    ]:
        calls.clear()
        evaluator = LeaveOneOutEvaluator(
            x, y, x_test, y_test, train, scorers, test_loss, num_removals=5, selection=selection, target="mean"
        )
        results = evaluator.evaluate_scores(train(x, y, seed=0), evaluator.score(None), seed=0)
        np.testing.assert_array_equal(results["exact"].indices, expected)
        assert results["exact"].predicted.shape == (5,)
        np.testing.assert_allclose(results["exact"].actual, effects[:, expected].mean(axis=0) / 30, atol=1e-14)
        assert results["exact"].scale_ratio == pytest.approx(1.0)
        # warm-started from the model's weights; retrainings shared between the scorers (and the random baseline)
        assert all(warm for _, _, warm in calls[1:])
        assert len(calls) - 2 == len(
            {*results["exact"].indices, *results["flipped"].indices, *results["random"].indices}
        )


def test_lds_evaluator_on_an_additive_model():
    effects, train, test_loss, x, y, x_test, y_test, calls = _additive_problem(num_train=40)
    scorers = {"exact": lambda m, *_: effects, "noise": lambda m, *_: np.ones_like(effects)}
    evaluator = LinearDatamodelingEvaluator(
        x, y, x_test, y_test, train, scorers, lambda m, a, b: -test_loss(m, a, b), num_subsets=12, seeds_per_subset=2
    )
    report = evaluator.evaluate(seeds=(0,))
    summary = report.summary()
    assert summary["exact"]["lds"][0] == pytest.approx(1.0)
    assert np.isnan(summary["noise"]["lds"][0])  # every subset predicted alike: nothing to rank
    assert abs(summary["random"]["lds"][0]) < 0.3
    assert len(calls) == 1 + 12 * 2 and len({seed for _, seed, _ in calls[1:]}) == 24  # distinct retraining seeds
    outputs = retrain_on_subsets(
        train, x, y, x_test, y_test, lambda m, a, b: -test_loss(m, a, b), random_subsets(40, 4)
    )
    assert outputs.shape == (4, 6)


def test_bad_arguments_are_refused():
    effects, train, test_loss, x, y, x_test, y_test, _ = _additive_problem()
    scorers = {"exact": lambda m, *_: effects}
    with pytest.raises(ValueError, match="differ in length"):
        LeaveOneOutEvaluator(x, y[:5], x_test, y_test, train, scorers, test_loss)
    with pytest.raises(ValueError, match="selection"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, scorers, test_loss, selection="best")
    with pytest.raises(ValueError, match="target"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, scorers, test_loss, target="sum")
    with pytest.raises(ValueError, match="exceeds"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, scorers, test_loss, num_removals=31)
    with pytest.raises(ValueError, match="positive integer"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, scorers, test_loss, num_removals=0)
    with pytest.raises(TypeError, match="train_procedure must be callable"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, None, scorers, test_loss)
    with pytest.raises(TypeError, match="test_loss must be callable"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, scorers, None)
    with pytest.raises(ValueError, match="built-in baseline"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, {"random": scorers["exact"]}, test_loss)
    with pytest.raises(ValueError, match="at least one scorer"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, {}, test_loss).evaluate()
    with pytest.raises(ValueError, match=r"shape \(30, 6\), expected \(6, 30\)"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, {"t": lambda m, *_: effects.T}, test_loss).evaluate()
    with pytest.raises(ValueError, match="non-finite"):
        LeaveOneOutEvaluator(x, y, x_test, y_test, train, {"n": lambda m, *_: effects * np.nan}, test_loss).evaluate()
    with pytest.raises(ValueError, match="one per example"):
        leave_one_out(train, x, y, x_test, y_test, lambda m, a, b: np.zeros(2), [0])
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        leave_one_out(train, x, y, x_test, y_test, test_loss, [30])
    with pytest.raises(ValueError, match="at least 3"):
        LinearDatamodelingEvaluator(x, y, x_test, y_test, train, scorers, test_loss, num_subsets=2)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        LinearDatamodelingEvaluator(x, y, x_test, y_test, train, scorers, test_loss, subset_fraction=0.0)
    with pytest.raises(ValueError, match="seeds_per_subset"):
        LinearDatamodelingEvaluator(x, y, x_test, y_test, train, scorers, test_loss, seeds_per_subset=0)


# -------------------------------------------------------------------------------------------------- logistic regression

REGULARIZATION = 0.05
NUM_FEATURES = 4


def _newton(x, y, start, iterations=30):
    """Minimize mean BCE + (λ/2)‖w‖² (bias unregularized) to machine precision."""
    augmented = np.hstack([x, np.ones((len(x), 1))])
    theta = start.copy()
    penalty = REGULARIZATION * np.diag(np.append(np.ones(x.shape[1]), 0.0))
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-augmented @ theta))
        gradient = augmented.T @ (p - y) / len(x) + penalty @ theta
        if np.linalg.norm(gradient) < 1e-14:
            break
        hessian = (augmented * (p * (1 - p))[:, None]).T @ augmented / len(x) + penalty
        theta = theta - np.linalg.solve(hessian, gradient)
    return theta


def _train_logistic(inputs, labels, *, seed, initial_weights=None):
    """The user's training procedure: a float64 Keras logistic regression fitted by Newton's method."""
    model = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,), dtype="float64"),
            keras.layers.Dense(1, dtype="float64", kernel_regularizer=ExactL2(REGULARIZATION / 2)),
        ]
    )
    start = (
        np.zeros(NUM_FEATURES + 1)
        if initial_weights is None
        else np.append(initial_weights[0][:, 0], initial_weights[1])
    )
    theta = _newton(inputs, labels, start)
    model.set_weights([theta[:NUM_FEATURES, None], theta[NUM_FEATURES:]])
    return model


def _test_loss(model, inputs, labels):
    return logistic_loss(labels, model(inputs)).numpy()


def _exact_influence(model, inputs, labels, test_inputs, test_labels):
    train = dataset(inputs, labels, batch_size=32)
    calculator = FirstOrderInfluenceCalculator(InfluenceModel(model, loss_function=logistic_loss), train, "exact")
    return calculator.influence_matrix(dataset(test_inputs, test_labels), train)


def _logistic_data():
    _, x, y, _, _ = logistic_problem(num_examples=200, num_features=NUM_FEATURES, regularization=REGULARIZATION, seed=3)
    rng = np.random.default_rng(7)
    x_test = rng.standard_normal((15, NUM_FEATURES))
    y_test = (x_test @ np.array([1.0, -1.0, 0.5, 0.0]) > 0).astype("float64")
    return x, y, x_test, y_test


def _training_loss(model, inputs, labels, test_inputs, test_labels):
    """A test-independent "loss only" baseline: every test example gets the training example's loss."""
    return np.tile(_test_loss(model, inputs, labels), (len(test_inputs), 1))


@pytest.mark.slow
def test_exact_influence_predicts_leave_one_out_of_logistic_regression():
    x, y, x_test, y_test = _logistic_data()
    scorers = {"exact": _exact_influence, "loss only": _training_loss}
    evaluator = LeaveOneOutEvaluator(x, y, x_test, y_test, _train_logistic, scorers, _test_loss, num_removals=25)
    report = evaluator.evaluate(seeds=(0, 1))
    summary = report.summary()
    print(report.to_markdown())
    assert summary["exact"]["pearson"][0] > 0.99
    assert summary["exact"]["spearman"][0] > 0.95
    assert 0.8 <= summary["exact"]["scale_ratio"][0] <= 1.2
    assert abs(summary["random"]["pearson"][0]) < 0.2
    assert summary["loss only"]["pearson"][0] < 0.5
    # the model trained on all data is at the optimum: the reference retraining changes nothing
    model = _train_logistic(x, y, seed=0)
    np.testing.assert_allclose(
        _test_loss(_train_logistic(x, y, seed=0, initial_weights=model.get_weights()), x_test, y_test),
        _test_loss(model, x_test, y_test),
        atol=1e-13,
    )


@pytest.mark.slow
def test_exact_influence_has_a_high_lds_on_logistic_regression():
    x, y, x_test, y_test = _logistic_data()

    def minus_test_loss(model, inputs, labels):
        return -_test_loss(model, inputs, labels)

    evaluator = LinearDatamodelingEvaluator(
        x, y, x_test, y_test, _train_logistic, {"exact": _exact_influence}, minus_test_loss, num_subsets=30
    )
    report = evaluator.evaluate(seeds=(0,))
    summary = report.summary()
    print(report.to_markdown())
    assert summary["exact"]["lds"][0] > 0.8
    assert abs(summary["random"]["lds"][0]) < 0.2
    assert report.per_seed["exact"][0].per_example.shape == (15,)
