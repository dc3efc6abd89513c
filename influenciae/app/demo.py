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

Example:
    >>> metrics = run_demo("runs/demo", seed=0)
    >>> metrics["cleaning"]["rankings"]["self_influence"]["mean"]  # test accuracy per budget
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
from influenciae.app.report import CSS, html_table, image_tag, write_csv
from influenciae.data import from_numpy
from influenciae.evaluation.mislabeling import detection_curve, detection_metrics, flip_labels
from influenciae.hessian import registered_solvers
from influenciae.influence import ArnoldiInfluenceCalculator, BaseInfluenceCalculator, FirstOrderInfluenceCalculator
from influenciae.model import InfluenceModel
from influenciae.types import CACHE

__all__ = [
    "DemoConfig",
    "NoisyDigits",
    "run_demo",
    "load_noisy_digits",
    "build_model",
    "format_summary",
]

METHODS = ("first_order", "arnoldi")
CLEANING_ACTIONS = ("fix", "drop")
RANKINGS = ("self_influence", "loss", "random")
CSV_FILES = ("cleaning.csv", "test_errors.csv", "self_influence.csv", "top_k.csv")
RANKING_NAMES = {"self_influence": "self-influence", "loss": "training loss", "random": "random"}
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
    budgets: tuple[float, ...] = (0.05, 0.1, 0.2)
    cleaning_seeds: int = 3
    cleaning_action: str = "fix"

    def __post_init__(self) -> None:
        _check_int("seed", self.seed, minimum=0)
        if not 0.0 < self.flip_fraction < 1.0:
            raise ValueError(f"flip_fraction must be in (0, 1), got {self.flip_fraction!r}.")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}.")
        for name in ("epochs", "num_test_images", "k", "batch_size", "num_suspicious", "cleaning_seeds"):
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
        budgets = self.budgets
        if (
            not isinstance(budgets, tuple)
            or not budgets
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 < b <= 1.0 for b in budgets)
            or any(later <= earlier for earlier, later in zip(budgets, budgets[1:], strict=False))
        ):
            raise ValueError(f"budgets must be a non-empty increasing tuple of fractions in (0, 1], got {budgets!r}.")
        if self.cleaning_action not in CLEANING_ACTIONS:
            raise ValueError(f"cleaning_action must be one of {CLEANING_ACTIONS}, got {self.cleaning_action!r}.")

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


_BATCH_SIZE = 32


def _compile(model: Any, num_examples: int, config: DemoConfig) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        # One graph call per epoch instead of per step: ~1.5x faster here, same updates (same accuracy to the bit).
        steps_per_execution=max(1, -(-num_examples // _BATCH_SIZE)),
    )


def _fit(images: np.ndarray, labels: np.ndarray, *, seed: int, config: DemoConfig, show_progress: bool = False) -> Any:
    """Build and train the demo's model; the same seed on the same data gives the same weights (one recipe for the
    main model and every retraining of the cleaning experiment)."""
    keras.utils.set_random_seed(seed)  # initialization and shuffling
    model = build_model(images.shape[1:])
    _compile(model, len(labels), config)
    callbacks = [_EpochBar(config.epochs)] if show_progress else []
    model.fit(images, labels, batch_size=_BATCH_SIZE, epochs=config.epochs, verbose=0, callbacks=callbacks)
    return model


class _Retrainer:
    """:func:`_fit` for many retrainings: one compiled model per training-set size, reset before each training.

    A new Keras model traces a new training function (about a second, most of a retraining in the reduced test
    configuration). Instead, each retraining builds the seed's initial weights exactly as :func:`_fit` does (a new,
    never-traced model right after ``keras.utils.set_random_seed``), copies them into the compiled model, restores
    the optimizer's initial state and trains: the weights equal :func:`_fit`'s to the bit (checked in the tests).
    """

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.models: dict[int, tuple[Any, list[np.ndarray]]] = {}

    def fit(self, images: np.ndarray, labels: np.ndarray, *, seed: int) -> Any:
        """Train from scratch on ``(images [N, 8, 8, 1], labels [N])`` with ``seed``; returns the (shared) model."""
        if len(labels) not in self.models:
            model = build_model(images.shape[1:])
            _compile(model, len(labels), self.config)
            model.optimizer.build(model.trainable_variables)
            self.models[len(labels)] = (model, [np.array(variable) for variable in model.optimizer.variables])
        model, optimizer_state = self.models[len(labels)]
        keras.utils.set_random_seed(seed)
        model.set_weights(build_model(images.shape[1:]).get_weights())
        for variable, value in zip(model.optimizer.variables, optimizer_state, strict=True):
            variable.assign(value)
        model.fit(images, labels, batch_size=_BATCH_SIZE, epochs=self.config.epochs, verbose=0)
        return model


def _predict(model: Any, images: np.ndarray) -> np.ndarray:
    # A direct call, not model.predict: the cleaning experiment builds dozens of models, and each predict() traces
    # a new function (TensorFlow then warns about retracing); the digits fit in one batch.
    return np.argmax(np.asarray(model(images, training=False)), axis=1)


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
    log = _Logger(show_progress)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    log("loading digits and flipping labels")
    data = load_noisy_digits(
        seed=config.seed, flip_fraction=config.flip_fraction, test_fraction=config.test_fraction, train_size=train_size
    )
    with _timer(timings, "training"):
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
    with _timer(timings, "self_influence"):
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
    with _timer(timings, "test_errors"):
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
    with _timer(timings, "cleaning"):
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
    (output / "report.html").write_text(_report_html(metrics, suspicious_rows, images), encoding="utf-8")
    return ["report.html", *figures, *CSV_FILES]


def _cleaning_csv_rows(cleaning: dict[str, Any]) -> list[list[Any]]:
    """One row per trained configuration: before/clean per seed, then ranking × budget × seed."""
    seeds = cleaning["retrain_seeds"]
    rows: list[list[Any]] = []
    for name in ("before", "clean"):
        fixed = 0 if name == "before" else cleaning["num_flipped"]  # labels changed, all of them flipped ones
        summary = cleaning[name]
        for position, seed in enumerate(seeds):
            rows.append(
                [
                    name,
                    0.0,
                    fixed,
                    seed,
                    fixed,
                    summary["per_seed"][position],
                    summary["test_loss"]["per_seed"][position],
                ]
            )
    for name, ranking in cleaning["rankings"].items():
        for index, (budget, count) in enumerate(zip(cleaning["budgets"], cleaning["num_cleaned"], strict=True)):
            for position, seed in enumerate(seeds):
                rows.append(
                    [
                        name,
                        budget,
                        count,
                        seed,
                        ranking["flipped_cleaned"][index][position],
                        ranking["per_seed"][index][position],
                        ranking["test_loss"]["per_seed"][index][position],
                    ]
                )
    return rows


def _cleaning_figure(plots: Any, cleaning: dict[str, Any]) -> Any:
    """Test accuracy (left) and test cross-entropy (right) against the budget, one line per ranking."""
    figure = plots.new_figure((11.5, 4.4))
    left, right = figure.subplots(1, 2)
    rankings = cleaning["rankings"]

    def pick(summary: dict[str, Any], key: str | None) -> dict[str, Any]:
        return summary if key is None else summary[key]

    for axis, key, label in ((left, None, "test accuracy"), (right, "test_loss", "test cross-entropy")):
        plots.plot_cleaning_curve(
            cleaning["budgets"],
            {
                RANKING_NAMES[name]: (pick(ranking, key)["mean"], pick(ranking, key)["std"])
                for name, ranking in rankings.items()
            },
            before=(pick(cleaning["before"], key)["mean"], pick(cleaning["before"], key)["std"]),
            ceiling=pick(cleaning["clean"], key)["mean"],
            title=label,
            ylabel=label,
            axis=axis,
        )
    right.legend(loc="center right")  # the random line runs along the top
    verb = "Fixing the labels of" if cleaning["action"] == "fix" else "Dropping"
    figure.suptitle(
        f"{verb} the top-ranked training examples and retraining (mean ± std over {len(cleaning['retrain_seeds'])} "
        "seeds; dashed black: every label clean)"
    )
    return figure


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
            test_title=f"{'ERROR' if example['misclassified'] else 'correct'} test #{example['test_index']}\n"
            f"true {example['true_label']}, pred {example['predicted_label']}\n"
            f"{example['flipped_proponents']}/{len(example['proponents'])} proponents flipped",
            proponent_titles=titles(example["proponents"]),
            opponent_titles=titles(example["opponents"]),
            figure=panel,
        )
    figure.suptitle(
        "Why this prediction? Proponents of the predicted class (green, top rows) and opponents (red, bottom rows); "
        "* = flipped label"
    )
    return figure


def _pm(summary: dict[str, Any]) -> str:
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _headline(metrics: dict[str, Any]) -> list[str]:
    """The findings in plain sentences, shared by the report and the terminal summary (numbers, not adjectives)."""
    cleaning, errors, detection = metrics["cleaning"], metrics["test_errors"], metrics["detection"]
    verb = "fixing the labels of" if cleaning["action"] == "fix" else "dropping"
    middle = len(cleaning["budgets"]) // 2
    budget, count = cleaning["budgets"][middle], cleaning["num_cleaned"][middle]
    rankings = cleaning["rankings"]
    after = {
        name: f"{ranking['mean'][middle]:.3f} ± {ranking['std'][middle]:.3f}" for name, ranking in rankings.items()
    }
    after_loss = {
        name: f"{ranking['test_loss']['mean'][middle]:.3f} ± {ranking['test_loss']['std'][middle]:.3f}"
        for name, ranking in rankings.items()
    }
    found = {name: float(np.mean(ranking["flipped_cleaned"][middle])) for name, ranking in rankings.items()}
    seeds = len(cleaning["retrain_seeds"])
    lines = [
        f"Cleaning: {verb} the top {budget:.0%} ({count} examples) of each ranking and retraining gives a test "
        f"accuracy of {after['self_influence']} by self-influence, {after['loss']} by training loss and "
        f"{after['random']} by random picks, against {_pm(cleaning['before'])} before cleaning and "
        f"{_pm(cleaning['clean'])} with every label clean (mean ± std over {seeds} retraining seeds); test "
        f"cross-entropy {after_loss['self_influence']}, {after_loss['loss']} and {after_loss['random']} against "
        f"{_pm(cleaning['before']['test_loss'])} before and {_pm(cleaning['clean']['test_loss'])} clean. Those "
        f"picks hold {found['self_influence']:.0f}, {found['loss']:.0f} and {found['random']:.0f} of the "
        f"{cleaning['num_flipped']} flipped labels.",
    ]
    gap = cleaning["clean"]["mean"] - cleaning["before"]["mean"]
    if abs(gap) <= cleaning["clean"]["std"] + cleaning["before"]["std"]:
        lines.append(
            f"Caution: with every label clean the test accuracy changes by {gap:+.3f}, no more than the spread "
            f"between training seeds (± {cleaning['before']['std']:.3f} before, ± {cleaning['clean']['std']:.3f} "
            "clean), so accuracy differences between rankings are within seed noise here."
        )
    before_loss, clean_loss = cleaning["before"]["test_loss"], cleaning["clean"]["test_loss"]
    if before_loss["mean"] - clean_loss["mean"] > before_loss["std"] + clean_loss["std"]:
        lines.append(
            f"The test cross-entropy separates noisy from clean training beyond the seed spread "
            f"({_pm(before_loss)} vs {_pm(clean_loss)}): it is the finer measure of what cleaning buys here."
        )
    influence, relatif = errors["influence"], errors["relatif"]
    if errors["num_errors"]:
        sentence = (
            f"Test errors: {errors['num_errors']} of {errors['num_test']} test images are misclassified. Among the "
            f"top-{errors['k']} proponents of each wrong prediction (the training images that pushed the model most "
            f"towards the wrong class), {_percent(influence['errors']['flipped_fraction'])} carry a flipped label, "
            f"{_percent(influence['errors']['flipped_to_predicted_fraction'])} flipped to the predicted class; "
            f"{_percent(influence['errors']['with_a_flipped_proponent'])} of the errors have at least one. For "
            f"correct predictions the same lists hold {_percent(influence['correct']['flipped_fraction'])} flipped "
            f"labels (training base rate {errors['train_flipped_rate']:.0%}): plain influence favours high-loss "
            "training images for every test image."
        )
        if relatif is not None:
            sentence += (
                " RelatIF (training side normalized by ‖H⁻¹∇ℓ(z)‖): "
                f"{_percent(relatif['errors']['flipped_fraction'])} flipped among the proponents of errors, "
                f"{_percent(relatif['correct']['flipped_fraction'])} for correct predictions; "
                f"{_percent(relatif['errors']['with_a_flipped_proponent'])} of the errors have at least one, against "
                f"{_percent(relatif['correct']['with_a_flipped_proponent'])} of the correct predictions."
            )
        lines.append(sentence)
    else:
        lines.append(f"Test errors: none of the {errors['num_test']} test images is misclassified.")
    auc = detection["auc"]
    if auc["loss"] >= auc["self_influence"]:
        lines.append(
            f"Detection: at this noise level the training loss ranks the flipped labels as well as or better than "
            f"self-influence (ROC AUC {auc['loss']:.4f} vs {auc['self_influence']:.4f}), and costs nothing; what "
            "influence adds is the explanation of each test error above, which a per-example loss cannot give."
        )
    else:
        lines.append(
            f"Detection: self-influence ranks the flipped labels better than the training loss (ROC AUC "
            f"{auc['self_influence']:.4f} vs {auc['loss']:.4f})."
        )
    return lines


def _cleaning_rows(cleaning: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for name, ranking in cleaning["rankings"].items():
        for position, budget in enumerate(cleaning["budgets"]):
            flipped = ranking["flipped_cleaned"][position]
            rows.append(
                [
                    RANKING_NAMES[name],
                    f"{budget:.0%} ({cleaning['num_cleaned'][position]})",
                    f"{float(np.mean(flipped)):.3g} of {cleaning['num_flipped']}",
                    f"{ranking['mean'][position]:.3f} ± {ranking['std'][position]:.3f}",
                    f"{ranking['mean'][position] - cleaning['before']['mean']:+.3f}",
                    f"{ranking['test_loss']['mean'][position]:.3f} ± {ranking['test_loss']['std'][position]:.3f}",
                ]
            )
    return rows


def _report_html(metrics: dict[str, Any], suspicious: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    detection, model, data, config = metrics["detection"], metrics["model"], metrics["data"], metrics["config"]
    cleaning, errors = metrics["cleaning"], metrics["test_errors"]
    found = detection["fraction_found"]
    difference = detection["auc"]["self_influence"] - detection["auc"]["loss"]
    names = {"self_influence": "self-influence", "loss": "training loss", "random": "random (expected)"}
    headline = "".join(f"<li>{html.escape(line)}</li>" for line in _headline(metrics))
    cleaning_table = html_table(
        [
            "ranking",
            "budget (examples)",
            "flipped labels cleaned",
            "test accuracy (mean ± std)",
            "accuracy gain",
            "test cross-entropy",
        ],
        [
            [
                "before cleaning (noisy labels)",
                "0 %",
                "0",
                _pm(cleaning["before"]),
                "+0.000",
                _pm(cleaning["before"]["test_loss"]),
            ],
            *_cleaning_rows(cleaning),
            [
                "all labels clean (ceiling)",
                "",
                str(cleaning["num_flipped"]),
                _pm(cleaning["clean"]),
                f"{cleaning['clean']['mean'] - cleaning['before']['mean']:+.3f}",
                _pm(cleaning["clean"]["test_loss"]),
            ],
        ],
    )
    statistics_rows = []
    for method, label in (("influence", "first-order influence"), ("relatif", "RelatIF")):
        stats = errors[method]
        if stats is None:
            continue
        for kind in ("errors", "correct"):
            statistics_rows.append(
                [
                    label,
                    "misclassified" if kind == "errors" else "correctly classified",
                    _percent(stats[kind]["flipped_fraction"]),
                    _percent(stats[kind]["flipped_to_predicted_fraction"]),
                    _percent(stats[kind]["with_a_flipped_proponent"]),
                ]
            )
    error_statistics = html_table(
        [
            "scores",
            "test images",
            f"top-{errors['k']} proponents flipped",
            "flipped to the predicted class",
            "images with ≥ 1 flipped proponent",
        ],
        statistics_rows,
    )
    error_rows, error_classes = [], []
    for example in metrics["test_examples"]:
        top = example["proponents"][0]
        error_rows.append(
            [
                example["test_index"],
                example["true_label"],
                example["predicted_label"],
                "error" if example["misclassified"] else "correct",
                f"{example['flipped_proponents']} of {len(example['proponents'])}",
                example["flipped_to_predicted_proponents"],
                f"#{top['train_index']} (given {top['given_label']}, true {top['true_label']})",
            ]
        )
        error_classes.append("flipped" if example["misclassified"] else "")
    errors_table = html_table(
        [
            "test index",
            "true",
            "predicted",
            "",
            "proponents flipped",
            "… to the predicted class",
            "top proponent",
        ],
        error_rows,
        error_classes,
    )
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
            [
                "cleaning: action / retraining seeds",
                f"{cleaning['action']} / {', '.join(str(seed) for seed in cleaning['retrain_seeds'])}",
            ],
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
        status = "misclassified" if example["misclassified"] else "correct"
        test_sections.append(
            f"<h3>Test image #{example['test_index']} ({status}): true {example['true_label']}, "
            f"predicted {example['predicted_label']}</h3>"
            + html_table(["kind", "rank", "train index", "influence", "given", "true", "flipped"], rows, classes)
        )
    action = "fixes the labels of" if cleaning["action"] == "fix" else "drops"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>influenciae demo: digits with flipped labels</title>
<style>{CSS}</style></head><body>
<h1>Influence functions on digits with flipped labels</h1>
<p class="note">{data["num_flipped"]} of {data["num_train"]} training labels were flipped to another class before
training. Influence answers two questions here: which training images caused each test error, and which labels to
fix first. Positive influence on a test prediction means the training example is a <b>proponent</b> (it pushed the
model towards that prediction: removing it would raise the loss of the predicted label); negative means an
<b>opponent</b>.</p>
<h2>Summary</h2>
<ul>{headline}</ul>
<h2>What cleaning buys</h2>
<p class="note">For each budget the experiment {action} the top-ranked training examples of each ranking, retrains the
same model (same epochs, same seeds {", ".join(str(seed) for seed in cleaning["retrain_seeds"])}) and measures the test
accuracy and cross-entropy; random picks use one permutation per seed. Mean ± sample standard deviation over the
seeds; the dashed line is the model trained with every label clean. {cleaning["num_models_trained"]} models were trained
(a training set met twice with the same seed is trained once: training is deterministic).</p>
{image_tag(images, "cleaning.png")}
{cleaning_table}
<h2>Why did the model get these test images wrong?</h2>
<p class="note">Every misclassified test image (red rows), then {config["num_test_images"]} correct ones for contrast.
Scores are influence on the loss of the <i>predicted</i> label, so the proponents of an error are the training images
that pushed the model towards the wrong class. "Flipped to the predicted class": a training image of another class
labeled as the (wrong) prediction.</p>
{error_statistics}
{image_tag(images, "proponents_opponents.png")}
{errors_table}
<h2>Detecting flipped labels</h2>
<p class="note">Every training example ranked by its self-influence ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) (high = atypical or likely
mislabeled) and, as a baseline, by its training loss.</p>
{summary}
<p>Self-influence AUC minus training-loss AUC: <b>{difference:+.4f}</b>; rank correlation between the two scores:
{detection["rank_correlation_self_influence_loss"]:.3f}.</p>
{setup}
{image_tag(images, "detection_curve.png")}
<h2>The {len(suspicious)} most suspicious training images</h2>
<p class="note">Highest self-influence first; red rows and frames are flipped labels.</p>
{image_tag(images, "suspicious.png")}
{suspicious_table}
<h2>Proponents and opponents of each explained test image</h2>
{"".join(test_sections)}
<p class="note">Files: {", ".join(html.escape(name) for name in [*images, *CSV_FILES, "metrics.json"])}. Timings and
every number above are in metrics.json.</p>
</body></html>
"""


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
