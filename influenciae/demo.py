"""End-to-end demo: find flipped labels in scikit-learn's digits with self-influence, and explain test predictions.

:func:`run_demo` (the job behind ``make demo`` and ``influenciae demo``) loads the bundled 8×8 digits (no network),
flips a fraction of the *training* labels to another class, trains a small CNN, and then

* ranks every training example by self-influence ``∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z)`` (high = atypical or likely mislabeled) and
  compares that ranking with the training-loss baseline and with random inspection (ROC AUC, and the fraction of
  flipped labels found after inspecting the top 10 % / 20 %);
* lists the proponents (most positive influence: helpful) and opponents (most negative: harmful) of a few test images.

Only the last dense layer is watched (``start_layer=-1``): its Hessian is small enough (``P = 2890``) to form exactly
in a few seconds, and softmax cross-entropy is convex in it, so ``H`` is positive semi-definite. It is singular along
the directions that shift all logits by the same amount; per-example gradients are orthogonal to those directions, so
a small damping only makes the Cholesky factorization possible and barely changes the scores.

Results land in ``output_dir``: ``report.html``, ``suspicious.png``, ``proponents_opponents.png``,
``detection_curve.png``, ``self_influence.csv``, ``top_k.csv`` and ``metrics.json``. Needs scikit-learn (the data) and
matplotlib (the figures).

Example:
    >>> metrics = run_demo("runs/demo", seed=0)
    >>> metrics["detection"]["auc"]["self_influence"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from influenciae._backend import keras, tf
from influenciae.data import from_numpy
from influenciae.evaluation.mislabeling import detection_curve, detection_metrics, flip_labels
from influenciae.hessian import registered_solvers
from influenciae.influence import ArnoldiInfluenceCalculator, BaseInfluenceCalculator, FirstOrderInfluenceCalculator
from influenciae.model import InfluenceModel
from influenciae.report import CSS, html_table, image_tag, write_csv
from influenciae.types import CACHE, ORDER

__all__ = [
    "DemoConfig",
    "NoisyDigits",
    "run_demo",
    "load_noisy_digits",
    "build_model",
    "format_summary",
]

METHODS = ("first_order", "arnoldi")
NUM_CLASSES = 10
# Settings that keep the approximate solvers to a few minutes here. With damping 1e-3 the damped Hessian's condition
# number is in the thousands, so CG stops at its iteration cap (it warns with the residual reached) and LiSSA's
# truncated series acts as extra regularization. Arnoldi keeps the top half of its Ritz values: the random start
# vector has a component in H's null space (the logit-shift directions), whose Ritz value is the damping itself.
_SOLVER_OPTIONS: dict[str, dict[str, Any]] = {
    "cg": {"tolerance": 1e-3, "max_iterations": 100},
    "lissa": {"tolerance": 1e-4, "depth": 100},
    "arnoldi": {"subspace_dim": 200, "k_largest_eig_vals": 100},
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo` (see there), validated once here."""

    seed: int = 0
    flip_fraction: float = 0.1
    epochs: int = 30
    num_test_images: int = 4
    k: int = 8
    method: str = "first_order"
    ihvp: str | None = None
    damping: float = 1e-3
    train_size: int | None = None
    test_fraction: float = 0.25
    learning_rate: float = 3e-3
    batch_size: int = 256
    num_suspicious: int = 24

    def __post_init__(self) -> None:
        _check_int("seed", self.seed, minimum=0)
        if not 0.0 < self.flip_fraction < 1.0:
            raise ValueError(f"flip_fraction must be in (0, 1), got {self.flip_fraction!r}.")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}.")
        for name in ("epochs", "num_test_images", "k", "batch_size", "num_suspicious"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.train_size is not None:
            _check_int("train_size", self.train_size, minimum=20)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        if self.method == "arnoldi" and self.ihvp is not None:
            raise ValueError(
                "method='arnoldi' has its own low-rank solver: leave ihvp unset (it is for 'first_order')."
            )
        if self.ihvp is not None and self.ihvp not in registered_solvers():
            raise ValueError(f"ihvp must be one of {registered_solvers()}, got {self.ihvp!r}.")
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0.0):
            raise ValueError(f"damping must be a non-negative number, got {self.damping!r}.")
        if not self.learning_rate > 0.0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}.")

    @property
    def solver(self) -> str:
        """The inverse-HVP solver's name (``"exact"`` unless chosen)."""
        return "arnoldi" if self.method == "arnoldi" else (self.ihvp or "exact")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


# ---------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class NoisyDigits:
    """The digits split, with some training labels flipped.

    Attributes:
        x_train: Training images ``[N, 8, 8, 1]`` float32 in ``[0, 1]``.
        given_labels: Training labels the model sees ``[N]`` (flipped where ``flipped``).
        true_labels: The original training labels ``[N]``.
        flipped: Whether each training label was flipped ``[N]`` bool.
        x_test: Test images ``[M, 8, 8, 1]``.
        y_test: Test labels ``[M]`` (never flipped).
    """

    x_train: np.ndarray
    given_labels: np.ndarray
    true_labels: np.ndarray
    flipped: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_noisy_digits(
    *, seed: int, flip_fraction: float, test_fraction: float = 0.25, train_size: int | None = None
) -> NoisyDigits:
    """scikit-learn's bundled digits, split (stratified, seeded) and with ``flip_fraction`` training labels flipped.

    Args:
        seed: Seed of the split, the optional subsampling and the flips.
        flip_fraction: Fraction of training labels moved to another class.
        test_fraction: Fraction of the 1797 images held out for testing (labels kept clean).
        train_size: Keep only this many training examples (a random subset), e.g. for quick tests.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "The demo loads scikit-learn's bundled digits; install it with `pip install scikit-learn`."
        ) from error
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    if train_size is not None and train_size < len(y_train):
        keep = np.sort(np.random.default_rng([seed, 2]).choice(len(y_train), size=train_size, replace=False))
        x_train, y_train = x_train[keep], y_train[keep]
    given, flipped = flip_labels(y_train, flip_fraction, NUM_CLASSES, seed=seed)
    if not flipped.any():
        raise ValueError(
            f"flip_fraction={flip_fraction} flips no label among {len(y_train)} training examples; raise it."
        )
    return NoisyDigits(x_train, given, y_train, flipped, x_test, y_test)


# ---------------------------------------------------------------------- model


def build_model(input_shape: Sequence[int] = (8, 8, 1), num_classes: int = NUM_CLASSES) -> Any:
    """A small float32 CNN with logits: ``Conv2D(8, 3, relu) -> Flatten -> Dense(num_classes)``."""
    return keras.Sequential(
        [
            keras.Input(tuple(input_shape)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes),
        ]
    )


class _EpochBar(keras.callbacks.Callback):
    """One tqdm bar over epochs with the running loss and accuracy (Keras' own bar prints a line per epoch)."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.bar = tqdm(total=epochs, desc="training", unit="epoch", dynamic_ncols=True)

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        self.bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}", acc=f"{logs.get('accuracy', 0.0):.3f}")
        self.bar.update()

    def on_train_end(self, logs: dict[str, float] | None = None) -> None:
        self.bar.close()


def _train(model: Any, data: NoisyDigits, config: DemoConfig, show_progress: bool) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = [_EpochBar(config.epochs)] if show_progress else []
    model.fit(data.x_train, data.given_labels, batch_size=32, epochs=config.epochs, verbose=0, callbacks=callbacks)


def _predict(model: Any, images: np.ndarray) -> np.ndarray:
    return np.argmax(np.asarray(model.predict(images, batch_size=512, verbose=0)), axis=1)


# ---------------------------------------------------------------------- influence


def _calculator(model: InfluenceModel, train_set: tf.data.Dataset, config: DemoConfig, show_progress: bool) -> Any:
    if config.method == "arnoldi":
        return ArnoldiInfluenceCalculator(
            model, train_set, **_SOLVER_OPTIONS["arnoldi"], damping=config.damping, show_progress=show_progress
        )
    return FirstOrderInfluenceCalculator(
        model,
        train_set,
        ihvp_calculator=config.solver,
        damping=config.damping,
        ihvp_options=_SOLVER_OPTIONS.get(config.solver),
        show_progress=show_progress,
    )


def _top_k_both_orders(
    calculator: BaseInfluenceCalculator, test_set: tf.data.Dataset, train_set: tf.data.Dataset, k: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Proponents (descending) and opponents (ascending), computing the training influence vectors only once."""
    with tempfile.TemporaryDirectory(prefix="influenciae-demo-") as cache_dir:
        # The disk cache lets the second query reuse the vectors (the costly part with iterative solvers).
        return {
            kind: calculator.most_influential(
                test_set,
                train_set,
                k=k,
                order=order,
                influence_vector_in_cache=CACHE.DISK,
                save_influence_vector_ds_path=cache_dir,
            )
            for kind, order in (("proponent", ORDER.DESCENDING), ("opponent", ORDER.ASCENDING))
        }


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
    show_progress: bool = True,
) -> dict[str, Any]:
    """Mislabeled-example detection and proponents/opponents on digits; writes a report to ``output_dir``.

    Args:
        output_dir: Directory for the report, figures, CSV files and ``metrics.json`` (created; files overwritten).
        seed: Seed of the split, the flips, the model's initialization and training (through Keras' global
            ``keras.utils.set_random_seed``), and the chosen test images.
        flip_fraction: Fraction of training labels flipped to another class.
        epochs: Training epochs.
        num_test_images: Test images whose proponents and opponents are listed.
        k: Proponents and opponents per test image.
        method: ``"first_order"`` (Koh & Liang) or ``"arnoldi"`` (low-rank, Schioppa et al.).
        ihvp: Inverse-HVP solver of ``"first_order"``: ``"exact"`` (default), ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
        damping: λ added to the Hessian.
        train_size: Use a random subset of this many training examples (quick runs and tests); all when ``None``.
        show_progress: Progress bars and step messages on stderr.

    Returns:
        The metrics also written to ``metrics.json``: configuration, data sizes, accuracies, detection AUCs and
        fractions found, the proponents/opponents of each chosen test image, timings and the files written.
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
    )
    from influenciae import plots

    plots.require_matplotlib()  # fail before training, not after
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    log = _Logger(show_progress)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    log("loading digits and flipping labels")
    data = load_noisy_digits(
        seed=config.seed, flip_fraction=config.flip_fraction, test_fraction=config.test_fraction, train_size=train_size
    )
    keras.utils.set_random_seed(config.seed)  # initialization and shuffling
    model = build_model(data.x_train.shape[1:])
    with _timer(timings, "training"):
        _train(model, data, config, show_progress)
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
    with _timer(timings, "self_influence"):
        calculator = _calculator(influence_model, train_set, config, show_progress)
        self_influence = calculator.self_influence(train_set)
    losses = np.concatenate([influence_model.batch_loss(batch).numpy() for batch in train_set])

    rng = np.random.default_rng([config.seed, 1])
    test_indices = np.sort(
        rng.choice(len(data.y_test), size=min(config.num_test_images, len(data.y_test)), replace=False)
    )
    test_set = from_numpy(data.x_test[test_indices], data.y_test[test_indices], batch_size=config.batch_size)
    k_used = min(config.k, len(data.given_labels))
    with _timer(timings, "top_k"):
        top_k = _top_k_both_orders(calculator, test_set, train_set, k_used)

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
        "detection": {key: value for key, value in detection.items() if key != "curves"},
        "test_examples": _test_examples(data, test_indices, test_predictions, top_k),
    }
    log("writing the report")
    with _timer(timings, "report"):
        files = _write_outputs(
            output, data, self_influence, losses, train_predictions, test_predictions, metrics, detection, config
        )
    timings["total"] = time.perf_counter() - start
    metrics["timings_seconds"] = {name: round(value, 2) for name, value in timings.items()}
    metrics["files"] = [*files, "metrics.json"]
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


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
        examples.append(entry)
    return examples


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
    from influenciae import plots

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

    suspects = np.argsort(-self_influence, kind="stable")[: config.num_suspicious]
    figures = {
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
        "proponents_opponents.png": _proponents_figure(plots, data, metrics["test_examples"]),
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
    (output / "report.html").write_text(_report_html(metrics, suspicious_rows, images), encoding="utf-8")
    return ["report.html", *figures, "self_influence.csv", "top_k.csv"]


def _proponents_figure(plots: Any, data: NoisyDigits, examples: list[dict[str, Any]]) -> Any:
    columns = max(len(examples[0]["proponents"]), 1)
    figure = plots.new_figure(figsize=(1.3 * (columns + 1.3), 3.4 * len(examples)))
    panels = figure.subfigures(len(examples), 1, squeeze=False)[:, 0]
    for panel, example in zip(panels, examples, strict=True):

        def titles(items: list[dict[str, Any]]) -> list[str]:
            return [f"#{it['train_index']} y={it['given_label']}" + ("*" if it["flipped"] else "") for it in items]

        plots.plot_proponents_opponents(
            data.x_test[example["test_index"]],
            data.x_train[[it["train_index"] for it in example["proponents"]]],
            data.x_train[[it["train_index"] for it in example["opponents"]]],
            ([it["score"] for it in example["proponents"]], [it["score"] for it in example["opponents"]]),
            test_title=f"test #{example['test_index']}\ntrue {example['true_label']}, "
            f"pred {example['predicted_label']}",
            proponent_titles=titles(example["proponents"]),
            opponent_titles=titles(example["opponents"]),
            figure=panel,
        )
    figure.suptitle("Proponents (green, top rows) and opponents (red, bottom rows); * = flipped label")
    return figure


def _report_html(metrics: dict[str, Any], suspicious: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    detection, model, data, config = metrics["detection"], metrics["model"], metrics["data"], metrics["config"]
    found = detection["fraction_found"]
    difference = detection["auc"]["self_influence"] - detection["auc"]["loss"]
    names = {"self_influence": "self-influence", "loss": "training loss", "random": "random (expected)"}
    summary = html_table(
        ["ranking", "ROC AUC", "found @ 10 % inspected", "found @ 20 % inspected", "detection-curve AUC"],
        [
            [label, detection["auc"][key], found[key]["0.1"], found[key]["0.2"], detection["curve_auc"][key]]
            for key, label in names.items()
        ],
    )
    setup = html_table(
        ["setting", "value"],
        [
            ["training / test examples", f"{data['num_train']} / {data['num_test']}"],
            ["flipped training labels", f"{data['num_flipped']} ({config['flip_fraction']:.0%})"],
            [
                "train accuracy (given labels / true labels)",
                f"{model['train_accuracy_given_labels']:.3f} / {model['train_accuracy_true_labels']:.3f}",
            ],
            ["test accuracy", model["test_accuracy"]],
            ["watched weights", ", ".join(model["watched_weights"])],
            ["watched parameters P (of all)", f"{model['num_watched_params']} (of {model['num_params']})"],
            ["method / solver / damping", f"{config['method']} / {config['solver']} / {config['damping']:g}"],
            ["rank correlation self-influence vs loss", detection["rank_correlation_self_influence_loss"]],
            ["seed / epochs", f"{config['seed']} / {config['epochs']}"],
        ],
    )
    suspicious_table = html_table(
        ["rank", "train index", "self-influence", "loss", "given", "predicted", "true", "flipped"],
        [
            [r["rank"], r["index"], r["self_influence"], r["loss"], r["given"], r["predicted"], r["true"], r["flipped"]]
            for r in suspicious
        ],
        ["flipped" if r["flipped"] else "" for r in suspicious],
    )
    test_sections = []
    for example in metrics["test_examples"]:
        rows, classes = [], []
        for kind in ("proponent", "opponent"):
            for rank, item in enumerate(example[f"{kind}s"], start=1):
                rows.append(
                    [
                        kind,
                        rank,
                        item["train_index"],
                        item["score"],
                        item["given_label"],
                        item["true_label"],
                        item["flipped"],
                    ]
                )
                classes.append("flipped" if item["flipped"] else "")
        test_sections.append(
            f"<h3>Test image #{example['test_index']}: true {example['true_label']}, "
            f"predicted {example['predicted_label']}</h3>"
            + html_table(["kind", "rank", "train index", "influence", "given", "true", "flipped"], rows, classes)
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>influenciae demo: digits with flipped labels</title>
<style>{CSS}</style></head><body>
<h1>Influence functions on digits with flipped labels</h1>
<p class="note">{data["num_flipped"]} of {data["num_train"]} training labels were flipped to another class before
training. Every training example is ranked by its self-influence ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) (high = atypical or likely
mislabeled) and, as a baseline, by its training loss. Positive influence on a test example means the training example
is a <b>proponent</b> (helpful: removing it would raise the test loss); negative means an <b>opponent</b>.</p>
<h2>Summary</h2>
{summary}
<p>Self-influence AUC minus training-loss AUC: <b>{difference:+.4f}</b>; rank correlation between the two scores:
{detection["rank_correlation_self_influence_loss"]:.3f}.</p>
{setup}
{image_tag(images, "detection_curve.png")}
<h2>The {len(suspicious)} most suspicious training images</h2>
<p class="note">Highest self-influence first; red rows and frames are flipped labels.</p>
{image_tag(images, "suspicious.png")}
{suspicious_table}
<h2>Proponents and opponents of test images</h2>
{image_tag(images, "proponents_opponents.png")}
{"".join(test_sections)}
<p class="note">Files: {
        ", ".join(html.escape(name) for name in [*images, "self_influence.csv", "top_k.csv", "metrics.json"])
    }. Timings and every number above are in metrics.json.</p>
</body></html>
"""


# ---------------------------------------------------------------------- terminal output


def format_summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: AUCs, fractions found and accuracy."""
    detection, data, model = metrics["detection"], metrics["data"], metrics["model"]
    auc, found = detection["auc"], detection["fraction_found"]
    lines = [
        f"Mislabeled detection: {data['num_flipped']} of {data['num_train']} training labels flipped; "
        f"test accuracy {model['test_accuracy']:.3f}; {model['num_watched_params']} watched parameters.",
        f"  {'ranking':<16}{'ROC AUC':>9}{'found@10%':>11}{'found@20%':>11}",
    ]
    for key, label in (("self_influence", "self-influence"), ("loss", "training loss"), ("random", "random")):
        lines.append(f"  {label:<16}{auc[key]:>9.4f}{found[key]['0.1']:>11.3f}{found[key]['0.2']:>11.3f}")
    return "\n".join(lines)


class _Logger:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[demo {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
