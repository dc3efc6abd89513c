"""The demo's problem: its configuration, the noisy digits, the small CNN and its training.

:class:`DemoConfig` checks the demo's settings once; :func:`load_noisy_digits` splits scikit-learn's bundled 8×8 digits
and flips a fraction of the training labels; :func:`build_model` is the CNN every run (and every retraining of the
cleaning experiment) trains. :mod:`influenciae.app.demo` runs the job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from influenciae.evaluation.mislabeling import flip_labels
from influenciae.evaluation.problems import digits
from influenciae.hessian.registry import registered_solvers
from influenciae.model._backend import keras

__all__ = ["DemoConfig", "NoisyDigits", "load_noisy_digits", "build_model"]

METHODS = ("first_order", "arnoldi")
"""The calculator methods (:mod:`influenciae.influence.registry`) the demo runs."""


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
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "The demo loads scikit-learn's bundled digits; install it with `pip install scikit-learn`."
        ) from error
    images, labels = digits("images")
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
