"""End-to-end demo: explain test errors with influence, clean flipped labels, and measure what cleaning buys.

:func:`run_demo` (the job behind ``make demo`` and ``influenciae demo``) loads the bundled 8×8 digits (no network),
flips a fraction of the *training* labels to another class, trains a small CNN, and then

* explains every misclassified test image: its proponents are the training examples that pushed the model most
  towards the (wrong) predicted class (influence on the loss of the predicted label), and the demo reports how many of
  them carry a flipped label, against the same lists for correctly classified images (plain influence and RelatIF);
* runs a cleaning experiment: for each budget (a fraction of the training set) it fixes (or drops) the labels of the
  top-ranked examples by self-influence ``∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z)``, by training loss and by random picks (one pick seed per
  retraining seed), retrains the same model with the same seeds and epochs, and reports the test accuracy (mean ± std
  over the seeds) before cleaning, after, and with every label clean (the ceiling);
* ranks every training example by self-influence and by training loss for detection (ROC AUC, and the fraction of
  flipped labels found after inspecting the top 10 % / 20 %), stated as measured: at 10 % noise the loss is as good.

Only the last dense layer is watched (``start_layer=-1``): its Hessian is small enough (``P = 2890``) to form exactly
in a few seconds, and softmax cross-entropy is convex in it, so ``H`` is positive semi-definite. It is singular along
the directions that shift all logits by the same amount; per-example gradients are orthogonal to those directions, so
a small damping only makes the Cholesky factorization possible and barely changes the scores.

Results land in ``output_dir``: ``report.html``, ``cleaning.png``, ``suspicious.png``, ``proponents_opponents.png``,
``detection_curve.png``, ``self_influence.csv``, ``top_k.csv``, ``test_errors.csv``, ``cleaning.csv`` and
``metrics.json``. Needs scikit-learn (the data) and matplotlib (the figures).

The pieces live beside this module: :mod:`influenciae.app.demo_digits` (configuration, data, model),
:mod:`influenciae.app.demo_analysis` (the measurements) and :mod:`influenciae.app.demo_report` (figures, CSV, HTML).

Example:
    >>> metrics = run_demo("runs/demo", seed=0)
    >>> metrics["cleaning"]["rankings"]["self_influence"]["mean"]  # test accuracy per budget
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from influenciae.app.demo_analysis import (
    _calculator,
    _cleaning_experiment,
    _detection_metrics,
    _influence_on_predictions,
    _proponent_statistics,
    _test_examples,
    _test_scores,
    _top_k_of_rows,
)
from influenciae.app.demo_digits import (
    CSV_FILES,
    RANKING_NAMES,
    DemoConfig,
    NoisyDigits,
    _fit,
    _predict,
    build_model,
    load_noisy_digits,
)
from influenciae.app.demo_report import (
    _cleaning_csv_rows,
    _cleaning_figure,
    _headline,
    _pm,
    _proponents_figure,
    _report_html,
)
from influenciae.app.progress import StepLogger, timed
from influenciae.app.report import write_csv, write_text
from influenciae.data import from_numpy
from influenciae.influence.first_order import FirstOrderInfluenceCalculator
from influenciae.model import InfluenceModel
from influenciae.model._backend import keras

__all__ = [
    "DemoConfig",
    "NoisyDigits",
    "run_demo",
    "load_noisy_digits",
    "build_model",
    "format_summary",
]


# ---------------------------------------------------------------------- the job


def run_demo(
    output_dir: str | Path,
    *,
    seed: int = 0,
    flip_fraction: float = 0.1,
    epochs: int = 30,
    num_test_images: int = 4,
    k: int = 8,
    method: str = "first_order",
    ihvp: str | None = None,
    damping: float = 1e-3,
    train_size: int | None = None,
    budgets: Sequence[float] = (0.05, 0.1, 0.2),
    cleaning_seeds: int = 3,
    cleaning_action: str = "fix",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Test errors explained, a cleaning experiment and mislabeled detection on digits; writes a report.

    Args:
        output_dir: Directory for the report, figures, CSV files and ``metrics.json`` (created; files overwritten).
        seed: Seed of the split, the flips, the model's initialization and training (through Keras' global
            ``keras.utils.set_random_seed``), the correctly classified test images shown and the random picks.
        flip_fraction: Fraction of training labels flipped to another class.
        epochs: Training epochs (of the main model and of every retraining).
        num_test_images: Test images in the proponents/opponents figure (misclassified ones first) and correctly
            classified test images listed next to the errors (every error is listed).
        k: Proponents and opponents per test image.
        method: ``"first_order"`` (Koh & Liang) or ``"arnoldi"`` (low-rank, Schioppa et al.).
        ihvp: Inverse-HVP solver of ``"first_order"``: ``"exact"`` (default), ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
        damping: λ added to the Hessian.
        train_size: Use a random subset of this many training examples (quick runs and tests); all when ``None``.
        budgets: Fractions of the training set cleaned in the cleaning experiment, increasing, in ``(0, 1]``.
        cleaning_seeds: Retraining seeds (and random-pick seeds) of the cleaning experiment: ``seed, seed + 1, ...``.
        cleaning_action: ``"fix"`` (set the picked labels to the true ones) or ``"drop"`` (remove the picked examples).
        show_progress: Progress bars and step messages on stderr.

    Returns:
        The metrics also written to ``metrics.json``: configuration, data sizes, accuracies, the cleaning table
        (``cleaning``), the test errors and their proponents (``test_errors``, ``test_examples``), detection AUCs and
        fractions found, timings and the files written.
    """
    config = DemoConfig(
        seed=seed,
        flip_fraction=flip_fraction,
        epochs=epochs,
        num_test_images=num_test_images,
        k=k,
        method=method,
        ihvp=ihvp,
        damping=damping,
        train_size=train_size,
        budgets=tuple(budgets),
        cleaning_seeds=cleaning_seeds,
        cleaning_action=cleaning_action,
    )
    from influenciae.app import plots

    plots.require_matplotlib()  # fail before training, not after
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    log = StepLogger("demo", enabled=show_progress)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    log("loading digits and flipping labels")
    data = load_noisy_digits(
        seed=config.seed, flip_fraction=config.flip_fraction, test_fraction=config.test_fraction, train_size=train_size
    )
    with timed(timings, "training"):
        model = _fit(data.x_train, data.given_labels, seed=config.seed, config=config, show_progress=show_progress)
    train_predictions, test_predictions = _predict(model, data.x_train), _predict(model, data.x_test)

    influence_model = InfluenceModel(
        model,
        start_layer=-1,
        loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"),
        hvp_chunk_size=256,  # wide vectorized HVPs: forming the exact Hessian is ~3x faster than with 16
    )
    train_set = from_numpy(data.x_train, data.given_labels, batch_size=config.batch_size)
    log(
        f"watching {influence_model.nb_params} parameters ({', '.join(influence_model.weight_names)}); "
        f"solver {config.solver}, damping {config.damping:g}"
    )
    with timed(timings, "self_influence"):
        calculator = _calculator(influence_model, train_set, config, show_progress)
        self_influence = calculator.self_influence(train_set)
    losses = np.concatenate([influence_model.batch_loss(batch).numpy() for batch in train_set])

    # Explain the predictions: every error, then a few correctly classified images for contrast.
    errors = np.flatnonzero(test_predictions != data.y_test)
    correct = np.flatnonzero(test_predictions == data.y_test)
    rng = np.random.default_rng([config.seed, 1])
    shown_correct = np.sort(rng.choice(correct, size=min(config.num_test_images, correct.size), replace=False))
    test_indices = np.concatenate([errors, shown_correct]).astype(np.int64)
    k_used = min(config.k, len(data.given_labels))
    log(f"explaining {errors.size} misclassified and {shown_correct.size} correct test images (k={k_used})")
    with timed(timings, "test_errors"):
        predicted_set = from_numpy(data.x_test, test_predictions, batch_size=config.batch_size)
        scores = _influence_on_predictions(calculator, predicted_set, train_set)
        relatif = None
        if config.method == "first_order":  # RelatIF shares the solver: one Hessian
            normalized = FirstOrderInfluenceCalculator(
                influence_model, train_set, ihvp_calculator=calculator.ihvp, normalize=True
            )
            relatif = _proponent_statistics(
                _influence_on_predictions(normalized, predicted_set, train_set), data, test_predictions, k_used
            )
    top_k = _top_k_of_rows(scores, test_indices, k_used)
    test_errors = {
        "explained_label": "predicted",
        "k": k_used,
        "num_errors": int(errors.size),
        "num_test": int(data.y_test.size),
        "test_indices": [int(index) for index in errors],
        "train_flipped_rate": float(data.flipped.mean()),
        "influence": _proponent_statistics(scores, data, test_predictions, k_used),
        "relatif": relatif,
    }

    log(
        f"cleaning experiment: {config.cleaning_action} the top {', '.join(f'{b:.0%}' for b in config.budgets)} of "
        f"each ranking, {config.cleaning_seeds} seeds"
    )
    with timed(timings, "cleaning"):
        cleaning = _cleaning_experiment(
            data,
            {"self_influence": self_influence, "loss": losses},
            config,
            show_progress,
            main_scores=_test_scores(model, data),
        )

    detection = _detection_metrics(self_influence, losses, data.flipped)
    metrics: dict[str, Any] = {
        "config": {**dataclasses.asdict(config), "solver": config.solver},
        "data": {
            "num_train": int(data.given_labels.size),
            "num_test": int(data.y_test.size),
            "num_flipped": int(data.flipped.sum()),
            "image_shape": list(data.x_train.shape[1:]),
        },
        "model": {
            "num_params": int(model.count_params()),
            "watched_weights": influence_model.weight_names,
            "num_watched_params": influence_model.nb_params,
            "train_accuracy_given_labels": float(np.mean(train_predictions == data.given_labels)),
            "train_accuracy_true_labels": float(np.mean(train_predictions == data.true_labels)),
            "test_accuracy": float(np.mean(test_predictions == data.y_test)),
        },
        "cleaning": cleaning,
        "test_errors": test_errors,
        "detection": {key: value for key, value in detection.items() if key != "curves"},
        "test_examples": _test_examples(data, test_indices, test_predictions, top_k),
    }
    log("writing the report")
    with timed(timings, "report"):
        files = _write_outputs(
            output, data, self_influence, losses, train_predictions, test_predictions, metrics, detection, config
        )
    timings["total"] = time.perf_counter() - start
    metrics["timings_seconds"] = {name: round(value, 2) for name, value in timings.items()}
    metrics["files"] = [*files, "metrics.json"]
    write_text(output / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------------- outputs


def _write_outputs(
    output: Path,
    data: NoisyDigits,
    self_influence: np.ndarray,
    losses: np.ndarray,
    train_predictions: np.ndarray,
    test_predictions: np.ndarray,
    metrics: dict[str, Any],
    detection: dict[str, Any],
    config: DemoConfig,
) -> list[str]:
    from influenciae.app import plots

    write_csv(
        output / "self_influence.csv",
        ["index", "given_label", "true_label", "flipped", "self_influence", "loss"],
        (
            [
                index,
                int(data.given_labels[index]),
                int(data.true_labels[index]),
                int(data.flipped[index]),
                float(self_influence[index]),
                float(losses[index]),
            ]
            for index in range(data.given_labels.size)
        ),
    )
    write_csv(
        output / "top_k.csv",
        ["test_index", "rank", "kind", "train_index", "score"],
        (
            [example["test_index"], rank, kind, item["train_index"], float(item["score"])]
            for example in metrics["test_examples"]
            for kind in ("proponent", "opponent")
            for rank, item in enumerate(example[f"{kind}s"], start=1)
        ),
    )
    write_csv(
        output / "test_errors.csv",
        [
            "test_index",
            "true_label",
            "predicted_label",
            "flipped_proponents",
            "flipped_to_predicted_proponents",
            "k",
            "top_proponent",
            "top_proponent_given_label",
            "top_proponent_true_label",
        ],
        (
            [
                example["test_index"],
                example["true_label"],
                example["predicted_label"],
                example["flipped_proponents"],
                example["flipped_to_predicted_proponents"],
                len(example["proponents"]),
                example["proponents"][0]["train_index"],
                example["proponents"][0]["given_label"],
                example["proponents"][0]["true_label"],
            ]
            for example in metrics["test_examples"]
            if example["misclassified"]
        ),
    )
    cleaning = metrics["cleaning"]
    write_csv(
        output / "cleaning.csv",
        ["ranking", "budget", "num_cleaned", "seed", "flipped_cleaned", "test_accuracy", "test_loss"],
        _cleaning_csv_rows(cleaning),
    )

    suspects = np.argsort(-self_influence, kind="stable")[: config.num_suspicious]
    figures = {
        "cleaning.png": _cleaning_figure(plots, cleaning),
        "suspicious.png": plots.plot_image_grid(
            data.x_train[suspects],
            [
                f"#{i} given {data.given_labels[i]}\npred {train_predictions[i]} · "
                + (f"FLIP ({data.true_labels[i]})" if data.flipped[i] else "clean")
                for i in suspects
            ],
            title_colors=[plots.OPPONENT_COLOR if data.flipped[i] else None for i in suspects],
            suptitle=f"The {suspects.size} training images of highest self-influence (red: flipped label)",
        ),
        "proponents_opponents.png": _proponents_figure(plots, data, metrics["test_examples"][: config.num_test_images]),
        "detection_curve.png": plots.plot_detection_curve(
            {
                f"self-influence (AUC {detection['auc']['self_influence']:.3f})": detection["curves"]["self_influence"],
                f"training loss (AUC {detection['auc']['loss']:.3f})": detection["curves"]["loss"],
                "random (AUC 0.5)": detection["curves"]["random"],
                "perfect ranking": np.minimum(np.arange(data.flipped.size + 1) / max(int(data.flipped.sum()), 1), 1.0),
            },
            max_inspected=0.5,
            title=f"Finding {int(data.flipped.sum())} flipped labels among {data.flipped.size} training examples",
        ),
    }
    images = {}
    for name, figure in figures.items():
        plots.save_figure(figure, output / name)
        images[name] = (output / name).read_bytes()
    suspicious_rows = [
        {
            "rank": rank,
            "index": int(i),
            "self_influence": float(self_influence[i]),
            "loss": float(losses[i]),
            "given": int(data.given_labels[i]),
            "predicted": int(train_predictions[i]),
            "true": int(data.true_labels[i]),
            "flipped": bool(data.flipped[i]),
        }
        for rank, i in enumerate(suspects, start=1)
    ]
    write_text(output / "report.html", _report_html(metrics, suspicious_rows, images))
    return ["report.html", *figures, *CSV_FILES]


# ---------------------------------------------------------------------- terminal output


def format_summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: the cleaning table, the test errors explained, then the detection AUCs."""
    detection, data, model, cleaning = metrics["detection"], metrics["data"], metrics["model"], metrics["cleaning"]
    auc, found = detection["auc"], detection["fraction_found"]
    budgets = cleaning["budgets"]
    header = "".join(f"{f'{budget:.0%}':>16}" for budget in budgets)
    lines = [
        f"Cleaning ({cleaning['action']} the top-ranked training "
        f"{'labels' if cleaning['action'] == 'fix' else 'examples'}, retrain; test accuracy, mean ± std over "
        f"{len(cleaning['retrain_seeds'])} seeds): before {_pm(cleaning['before'])}, "
        f"all labels clean {_pm(cleaning['clean'])}",
        f"  {'ranking':<16}{header}",
    ]
    for name, ranking in cleaning["rankings"].items():
        cells = "".join(
            f"{f'{mean:.3f} ± {std:.3f}':>16}" for mean, std in zip(ranking["mean"], ranking["std"], strict=True)
        )
        lines.append(f"  {RANKING_NAMES[name]:<16}{cells}")
    before_loss, clean_loss = cleaning["before"]["test_loss"], cleaning["clean"]["test_loss"]
    lines.append(f"  test cross-entropy: before {_pm(before_loss)}, all labels clean {_pm(clean_loss)}")
    for name, ranking in cleaning["rankings"].items():
        losses = ranking["test_loss"]
        cells = "".join(
            f"{f'{mean:.3f} ± {std:.3f}':>16}" for mean, std in zip(losses["mean"], losses["std"], strict=True)
        )
        lines.append(f"  {RANKING_NAMES[name]:<16}{cells}")
    lines += _headline(metrics)[1:]
    lines += [
        f"Mislabeled detection: {data['num_flipped']} of {data['num_train']} training labels flipped; "
        f"test accuracy {model['test_accuracy']:.3f}; {model['num_watched_params']} watched parameters.",
        f"  {'ranking':<16}{'ROC AUC':>9}{'found@10%':>11}{'found@20%':>11}",
    ]
    for key, label in (("self_influence", "self-influence"), ("loss", "training loss"), ("random", "random")):
        lines.append(f"  {label:<16}{auc[key]:>9.4f}{found[key]['0.1']:>11.3f}{found[key]['0.2']:>11.3f}")
    return "\n".join(lines)
