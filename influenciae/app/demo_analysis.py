"""The demo's measurements: influence on the test predictions, the cleaning experiment and mislabeled detection.

Each function takes the trained model's data and scores and returns plain numbers and arrays for
:func:`influenciae.app.demo.run_demo` to record in ``metrics.json`` and the report.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from influenciae.app.demo_digits import (
    _SOLVER_OPTIONS,
    CLEANING_ACTIONS,
    RANKINGS,
    DemoConfig,
    NoisyDigits,
    _fit,
    _Retrainer,
)
from influenciae.evaluation.mislabeling import detection_curve, detection_metrics
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.influence.registry import CalculatorOptions, CalculatorSetup, build_calculator
from influenciae.model import InfluenceModel
from influenciae.model._backend import keras, tf
from influenciae.types import CACHE

# ---------------------------------------------------------------------- influence


def _calculator(model: InfluenceModel, train_set: tf.data.Dataset, config: DemoConfig, show_progress: bool) -> Any:
    """The registered method ``config.method`` on the demo's influence model (its last layer, wide HVP blocks)."""
    if config.method == "arnoldi":
        arnoldi = _SOLVER_OPTIONS["arnoldi"]
        options = CalculatorOptions(
            damping=config.damping,
            subspace_dim=arnoldi["subspace_dim"],
            rank=arnoldi["k_largest_eig_vals"],
            show_progress=show_progress,
        )
    else:
        options = CalculatorOptions(
            damping=config.damping,
            solver=config.solver,
            solver_options=_SOLVER_OPTIONS.get(config.solver),
            show_progress=show_progress,
        )
    setup = CalculatorSetup(model.model, train_set, model.loss_function, options, influence_model=model)
    return build_calculator(config.method, setup)


def _influence_on_predictions(
    calculator: BaseInfluenceCalculator, test_set: tf.data.Dataset, train_set: tf.data.Dataset
) -> np.ndarray:
    """Scores ``[N_test, N_train]`` of every training example on the loss of each test image's *predicted* label.

    A proponent (positive score) pushed the model towards its prediction: for a misclassified image, towards the
    wrong class. The matrix is small here (``450 × 1347``); the influence vectors are computed once.
    """
    with tempfile.TemporaryDirectory(prefix="influenciae-demo-") as cache_dir:
        return calculator.influence_matrix(
            test_set, train_set, influence_vector_in_cache=CACHE.DISK, save_influence_vector_ds_path=cache_dir
        )


def _top_k_of_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Proponents (highest scores first) and opponents (lowest first) of the chosen rows: ``[R, k]`` each."""
    chosen = scores[rows]
    result = {}
    for kind, sign in (("proponent", -1.0), ("opponent", 1.0)):
        indices = np.argsort(sign * chosen, axis=1, kind="stable")[:, :k]
        result[kind] = (indices.astype(np.int64), np.take_along_axis(chosen, indices, axis=1))
    return result


def _proponent_statistics(
    scores: np.ndarray, data: NoisyDigits, test_predictions: np.ndarray, k: int
) -> dict[str, dict[str, float | None]]:
    """How often the top-``k`` proponents of errors and of correct predictions carry a flipped label.

    ``flipped_fraction``: mean over test images of the fraction of their top-``k`` proponents whose label was
    flipped; ``flipped_to_predicted_fraction``: of those, flipped *to the predicted class* (a training image of the
    true class labeled as the wrong prediction); ``with_a_flipped_proponent``: fraction of test images with at least
    one. ``None`` when there is no test image of that kind.
    """
    proponents = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N_test, k]
    flipped = data.flipped[proponents]
    to_predicted = flipped & (data.given_labels[proponents] == test_predictions[:, None])
    errors = test_predictions != data.y_test
    result: dict[str, dict[str, float | None]] = {}
    for name, mask in (("errors", errors), ("correct", ~errors)):
        if not mask.any():
            result[name] = {"flipped_fraction": None, "flipped_to_predicted_fraction": None}
            result[name]["with_a_flipped_proponent"] = None
            continue
        result[name] = {
            "flipped_fraction": float(flipped[mask].mean()),
            "flipped_to_predicted_fraction": float(to_predicted[mask].mean()),
            "with_a_flipped_proponent": float(flipped[mask].any(axis=1).mean()),
        }
    return result


# ---------------------------------------------------------------------- cleaning experiment


def _cleaned_training_set(data: NoisyDigits, picks: np.ndarray, action: str) -> tuple[np.ndarray, np.ndarray]:
    """The training set after cleaning the picked examples.

    Args:
        data: The noisy split.
        picks: Indices of the training examples inspected ``[n_picked]``.
        action: ``"fix"``: their labels become the true ones (a reviewer relabels them; clean picks are unchanged);
            ``"drop"``: they are removed.

    Returns:
        ``(images [N', 8, 8, 1], labels [N'])``: ``N' = N`` when fixing, ``N - n_picked`` when dropping.
    """
    picks = np.asarray(picks, dtype=np.int64)
    if action == "fix":
        labels = data.given_labels.copy()
        labels[picks] = data.true_labels[picks]
        return data.x_train, labels
    if action == "drop":
        keep = np.ones(data.given_labels.size, dtype=bool)
        keep[picks] = False
        return data.x_train[keep], data.given_labels[keep]
    raise ValueError(f"action must be one of {CLEANING_ACTIONS}, got {action!r}.")


def _test_scores(model: Any, data: NoisyDigits) -> tuple[float, float]:
    """``(test accuracy, mean test cross-entropy)`` of a trained model."""
    logits = model(data.x_test, training=False)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(data.y_test, logits)
    return float(np.mean(np.argmax(np.asarray(logits), axis=1) == data.y_test)), float(loss)


def _retrained_accuracy(
    images: np.ndarray, labels: np.ndarray, data: NoisyDigits, config: DemoConfig, seed: int
) -> float:
    """Test accuracy of the demo's model trained from scratch on ``(images, labels)`` with ``seed``."""
    return _test_scores(_fit(images, labels, seed=seed, config=config), data)[0]


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    content = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    content.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return content.hexdigest()


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0  # sample standard deviation over seeds
    return {"mean": float(array.mean()), "std": std, "per_seed": [float(v) for v in array]}


def _cleaning_experiment(
    data: NoisyDigits,
    scores: dict[str, np.ndarray],
    config: DemoConfig,
    show_progress: bool,
    main_scores: tuple[float, float],
) -> dict[str, Any]:
    """Clean the top of each ranking at each budget, retrain, and measure the test accuracy over several seeds.

    Every ranking gets the same budgets and the same retraining seeds (``config.seed + s``); the random ranking uses
    a different permutation for each seed, so its spread covers both the picks and the training noise. The noisy
    ("before") and clean ("ceiling") models use the same seeds too.

    Training is deterministic (same data, same seed: same weights, checked in the tests), so a training set met twice
    with the same seed is trained once: the main model is the noisy set with ``config.seed`` (``main_scores``), and
    fixing every flipped label (e.g. a ranking whose picks hold all of them) is the clean set.
    """
    num_train = data.given_labels.size
    counts = [max(1, int(round(budget * num_train))) for budget in config.budgets]
    seeds = [config.seed + offset for offset in range(config.cleaning_seeds)]
    orders: dict[str, list[np.ndarray]] = {
        name: [np.argsort(-scores[name], kind="stable")] * len(seeds) for name in ("self_influence", "loss")
    }
    pick_seeds = [[config.seed, 3, offset] for offset in range(len(seeds))]
    orders["random"] = [np.random.default_rng(pick_seed).permutation(num_train) for pick_seed in pick_seeds]
    trained: dict[tuple[str, int], tuple[float, float]] = {
        (_digest(data.x_train, data.given_labels), config.seed): main_scores
    }
    bar = tqdm(
        total=len(seeds) * (2 + len(RANKINGS) * len(counts)),
        desc="cleaning: retraining",
        unit="model",
        dynamic_ncols=True,
        disable=not show_progress,
    )

    retrainer = _Retrainer(config)

    def evaluate(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[float, float]:
        key = (_digest(images, labels), seed)
        if key not in trained:
            trained[key] = _test_scores(retrainer.fit(images, labels, seed=seed), data)
        bar.update()
        return trained[key]

    def summary(results: list[tuple[float, float]]) -> dict[str, Any]:
        accuracy = _mean_std([result[0] for result in results])
        return {**accuracy, "test_loss": _mean_std([result[1] for result in results])}

    before = summary([evaluate(data.x_train, data.given_labels, seed) for seed in seeds])
    all_fixed = _cleaned_training_set(data, np.flatnonzero(data.flipped), "fix")
    clean = summary([evaluate(*all_fixed, seed) for seed in seeds])
    rankings: dict[str, Any] = {}
    for name in RANKINGS:
        summaries, flipped_cleaned = [], []
        for count in counts:
            picks = [order[:count] for order in orders[name]]
            summaries.append(
                summary(
                    [
                        evaluate(*_cleaned_training_set(data, chosen, config.cleaning_action), seed)
                        for chosen, seed in zip(picks, seeds, strict=True)
                    ]
                )
            )
            flipped_cleaned.append([int(data.flipped[chosen].sum()) for chosen in picks])
        rankings[name] = {
            "mean": [entry["mean"] for entry in summaries],
            "std": [entry["std"] for entry in summaries],
            "per_seed": [entry["per_seed"] for entry in summaries],
            "test_loss": {key: [entry["test_loss"][key] for entry in summaries] for key in ("mean", "std", "per_seed")},
            "flipped_cleaned": flipped_cleaned,
        }
    bar.close()
    return {
        "action": config.cleaning_action,
        "budgets": list(config.budgets),
        "num_cleaned": counts,
        "num_flipped": int(data.flipped.sum()),
        "retrain_seeds": seeds,
        "random_pick_seeds": pick_seeds,
        "num_models_trained": len(trained) - 1,  # the main model is the first entry
        "before": before,
        "clean": clean,
        "rankings": rankings,
    }


# ---------------------------------------------------------------------- detection and the explained test images


def _detection_metrics(self_influence: np.ndarray, losses: np.ndarray, flipped: np.ndarray) -> dict[str, Any]:
    """AUCs, fractions found and curves for self-influence, training loss and (expected) random inspection.

    The metrics are those of ``make evaluate`` (:mod:`influenciae.evaluation.mislabeling`), so the numbers agree.
    """
    num = flipped.size
    results = {"self_influence": detection_metrics(self_influence, flipped), "loss": detection_metrics(losses, flipped)}
    curves = {
        "self_influence": detection_curve(self_influence, flipped),
        "loss": detection_curve(losses, flipped),
        "random": np.arange(num + 1) / num,  # expected fraction found when inspecting in random order
    }
    random_found = {f"{fraction}": float(curves["random"][int(np.ceil(fraction * num))]) for fraction in (0.1, 0.2)}
    return {
        "auc": {**{name: result.roc_auc for name, result in results.items()}, "random": 0.5},
        "curve_auc": {**{name: result.curve_auc for name, result in results.items()}, "random": 0.5},
        "fraction_found": {
            **{
                name: {"0.1": result.found_at_10, "0.2": result.found_at_20, "1.0": float(curves[name][-1])}
                for name, result in results.items()
            },
            "random": {**random_found, "1.0": 1.0},
        },
        "rank_correlation_self_influence_loss": float(spearmanr(self_influence, losses).statistic),
        "curves": curves,
    }


def _test_examples(
    data: NoisyDigits,
    test_indices: np.ndarray,
    test_predictions: np.ndarray,
    top_k: dict[str, tuple[np.ndarray, np.ndarray]],
) -> list[dict[str, Any]]:
    examples = []
    for row, test_index in enumerate(test_indices):
        entry: dict[str, Any] = {
            "test_index": int(test_index),
            "true_label": int(data.y_test[test_index]),
            "predicted_label": int(test_predictions[test_index]),
            "misclassified": bool(test_predictions[test_index] != data.y_test[test_index]),
        }
        for kind, (indices, values) in top_k.items():
            entry[f"{kind}s"] = [
                {
                    "train_index": int(index),
                    "score": float(value),
                    "given_label": int(data.given_labels[index]),
                    "true_label": int(data.true_labels[index]),
                    "flipped": bool(data.flipped[index]),
                }
                for index, value in zip(indices[row], values[row], strict=True)
            ]
        proponents = entry["proponents"]
        entry["flipped_proponents"] = sum(item["flipped"] for item in proponents)
        entry["flipped_to_predicted_proponents"] = sum(
            item["flipped"] and item["given_label"] == entry["predicted_label"] for item in proponents
        )
        entry["flipped_fraction_of_proponents"] = entry["flipped_proponents"] / max(len(proponents), 1)
        examples.append(entry)
    return examples
