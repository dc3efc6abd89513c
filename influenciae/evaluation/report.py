"""`make evaluate`: how well every method finds mislabeled examples and predicts retraining, written to the docs.

The page is a list of sections (:data:`SECTIONS`), each a function returning markdown:

* ``mislabeled``: mislabeled detection of every method on the digits MLP (10 % of the labels flipped), beside the
  "training loss" and "random" baselines;
* ``faithfulness``: leave-one-out correlations, the linear datamodeling score and mislabeled-detection ROC AUC of
  every first-order solver and the other pairwise methods, on logistic regression and a small MLP, on digits and
  breast cancer, with "loss only" and "random" baselines;
* ``curvature``: curvature-approximation accuracy, when ``influenciae.evaluation.curvature`` provides it.

Run (``--sections`` picks some, the size options shrink them for a quick look)::

    python -m influenciae.evaluation.report --output docs/evaluation.md
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from influenciae._backend import keras, tf
from influenciae.data import from_numpy
from influenciae.evaluation.mislabeling import EvaluationReport, MislabelingDetectorEvaluator
from influenciae.evaluation.retraining import (
    LeaveOneOutEvaluator,
    LeaveOneOutReport,
    LinearDatamodelingEvaluator,
    LinearDatamodelingReport,
)
from influenciae.model import InfluenceModel

__all__ = [
    "SECTIONS",
    "FullBatchTrainer",
    "ReportOptions",
    "digits_problem",
    "faithfulness_section",
    "load_problem",
    "main",
    "mislabeled_section",
    "run_faithfulness",
    "scorers",
    "train_digits_mlp",
]

BATCH_SIZE = 128


def digits_problem() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ``(inputs [1797, 64] float32 in [0, 1], labels [1797])``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype("float32"), digits.target.astype("int64")


def train_digits_mlp(inputs: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 200) -> Any:
    """A 64-32-10 tanh MLP with a small L2 penalty, trained with Adam (the model every method scores)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((inputs.shape[1],)),
            keras.layers.Dense(32, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-4)),
            keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(1e-4)),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(inputs, labels, epochs=epochs, batch_size=BATCH_SIZE, verbose=0)
    return model


def _loss() -> Any:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


Scorer = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]


def _self_influence(build: Callable[[Any, tf.data.Dataset], Any]) -> Scorer:
    def score(model: Any, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        train = from_numpy(inputs, labels, batch_size=BATCH_SIZE)
        return np.asarray(build(model, train).self_influence(train))

    return score


def scorers() -> dict[str, tuple[str, Scorer]]:
    """``{name: (description, scorer)}`` for every method in the table; heavy imports stay inside."""
    from influenciae import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator

    damping = 1e-3
    # A network trained by Adam is not exactly at a minimum: over all layers its Hessian has eigenvalues down to about
    # -0.02 here (measured with ExactIHVP), so methods on all layers use a damping that makes H + λI definite.
    network_damping = 3e-2

    def last_layer(model: Any) -> InfluenceModel:
        return InfluenceModel(model, start_layer=-1, loss_function=_loss())

    def all_layers(model: Any) -> InfluenceModel:
        return InfluenceModel(model, loss_function=_loss())

    table: dict[str, tuple[str, Scorer]] = {
        "influence, exact (last layer)": (
            "FirstOrderInfluenceCalculator, ExactIHVP, damping 1e-3, last Dense layer (330 parameters)",
            _self_influence(lambda m, t: FirstOrderInfluenceCalculator(last_layer(m), t, "exact", damping=damping)),
        ),
        "influence, CG (last layer, Hessian on 512 examples)": (
            "FirstOrderInfluenceCalculator, CG (tolerance 1e-4), n_samples_for_hessian=512, damping 1e-3, last layer",
            _self_influence(
                lambda m, t: FirstOrderInfluenceCalculator(
                    last_layer(m), t, "cg", n_samples_for_hessian=512, damping=damping, ihvp_options={"tolerance": 1e-4}
                )
            ),
        ),
        "RelatIF (last layer)": (
            "FirstOrderInfluenceCalculator(normalize=True), exact, damping 1e-3, last Dense layer",
            _self_influence(
                lambda m, t: FirstOrderInfluenceCalculator(last_layer(m), t, "exact", normalize=True, damping=damping)
            ),
        ),
        "Arnoldi embeddings (all layers, k=50)": (
            "ArnoldiInfluenceCalculator, subspace 100, 50 eigenvalues of largest magnitude, damping 3e-2",
            _self_influence(
                lambda m, t: ArnoldiInfluenceCalculator(all_layers(m), t, 100, True, 50, damping=network_damping)
            ),
        ),
    }
    table.update(_optional_scorers(last_layer, all_layers))
    table["training loss (baseline)"] = (
        "per-example training loss",
        lambda m, x, y: all_layers(m).batch_loss((x, y)).numpy(),
    )
    return table


def _optional_scorers(
    last_layer: Callable[[Any], InfluenceModel], all_layers: Callable[[Any], InfluenceModel]
) -> dict[str, tuple[str, Scorer]]:
    """Methods of the other attribution families, when present."""
    import influenciae

    extra: dict[str, tuple[str, Scorer]] = {}
    loss = _loss()
    extra["TracIn (final model, all layers)"] = (
        "TracIn with the final model as its only checkpoint, learning rate 1",
        _self_influence(lambda m, t: influenciae.TracIn([all_layers(m)], 1.0)),
    )
    extra["TracInCPFast (final model)"] = (
        "TracInCPFast: last Dense layer through the outer-product identity",
        _self_influence(lambda m, t: influenciae.TracInCPFast([m], 1.0, loss_function=loss, keep_in_memory=True)),
    )
    extra["TracInCPFastRandProj (k=64)"] = (
        "TracInCPFastRandProj, projection_dim 64, seed 0",
        _self_influence(
            lambda m, t: influenciae.TracInCPFastRandProj(
                [m], 1.0, projection_dim=64, seed=0, loss_function=loss, keep_in_memory=True
            )
        ),
    )
    extra["representer points, L2 (λ=1e-3)"] = (
        "RepresenterPointL2, last layer refit with λ = 1e-3, explaining the predicted class",
        _self_influence(lambda m, t: influenciae.RepresenterPointL2(m, t, loss, 1e-3)),
    )
    extra["representer points, LJE"] = (
        "RepresenterPointLJE, step 1e-2, exact solver, damping 1e-3",
        _self_influence(lambda m, t: influenciae.RepresenterPointLJE(m, t, loss, damping=1e-3)),
    )
    extra["TRAK (k=512)"] = (
        "TrakCalculator, margin output, Gaussian projection to 512 dimensions of all 2,410 gradients, seed 0",
        _self_influence(lambda m, t: influenciae.TrakCalculator(all_layers(m), t, 512)),
    )
    extra["sample boundary (DeepFool, input space)"] = (
        "SampleBoundaryCalculator: minus the DeepFool distance to the decision boundary (label-free)",
        _self_influence(lambda m, t: influenciae.SampleBoundaryCalculator(m, step_nbr=50)),
    )
    extra["weights boundary (DeepFool, last layer)"] = (
        "WeightsBoundaryCalculator: minus the distance in the last layer's weight space (label-free)",
        _self_influence(lambda m, t: influenciae.WeightsBoundaryCalculator(m)),
    )
    extra["similarity (dot product, hidden layer)"] = (
        "SimilarityInfluence on the hidden layer's activations, dot product: self-influence = squared norm "
        "(cosine self-similarity is always 1 and cannot rank)",
        _self_influence(lambda m, t: influenciae.SimilarityInfluence(m, 0, similarity="dot")),
    )
    return extra


# ---------------------------------------------------------------------------------------------------- section (a)


def mislabeled_section(options: ReportOptions) -> str:
    """Mislabeled detection on the digits MLP, every method: the markdown of one section."""
    inputs, labels = digits_problem()
    table = scorers()
    evaluator = MislabelingDetectorEvaluator(
        inputs,
        labels,
        10,
        lambda x, y, seed: train_digits_mlp(x, y, seed, options.epochs),
        {name: scorer for name, (_, scorer) in table.items()},
        flip_fraction=0.1,
    )
    report = evaluator.evaluate(seeds=tuple(range(options.mislabeled_seeds)))
    return "\n".join(
        [
            "## Finding mislabeled examples: every method on the digits MLP",
            "",
            f"scikit-learn's digits (1,797 images), 10 % of the labels flipped to another class, a 64-32-10 tanh MLP "
            f"trained for {options.epochs} epochs with Adam on the noisy labels; every method ranks the training "
            f"examples by its self-influence (higher = more suspicious). Mean ± standard deviation over "
            f"{options.mislabeled_seeds} seeds (each seed flips other labels and trains a new model).",
            "",
            "* **roc_auc**: probability that a flipped example scores above a clean one.",
            "* **curve_auc**: area under the fraction of flipped labels found vs fraction of the data inspected (the "
            "original Influenciae metric; 0.5 is random).",
            "* **found_at_10 / found_at_20**: fraction of flipped labels among the top 10 % / 20 %.",
            "",
            report.to_markdown(),
            "",
            "| Method | Configuration |",
            "|---|---|",
            *[f"| {name} | {description} |" for name, (description, _) in table.items()],
            "| random | a seeded uniform draw |",
        ]
    )


# ---------------------------------------------------------------------------------------------------- section (b)

REGULARIZATION = 1e-3  # L2 factor c of c‖w‖² on every kernel and bias of the faithfulness models
HIDDEN_UNITS = {"digits": 16, "breast_cancer": 8}
SPLITS = {"digits": (400, 100), "breast_cancer": (400, 100)}  # (training, test) examples


@dataclasses.dataclass(frozen=True)
class Problem:
    """A classification problem of the faithfulness section, split into training and test examples."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def num_outputs(self) -> int:
        """One logit for a binary problem (sigmoid), one per class otherwise (softmax)."""
        return 1 if self.num_classes == 2 else self.num_classes


def load_problem(name: str, *, seed: int = 0) -> Problem:
    """``"digits"`` (4×4 pooled pixels in [0, 1]) or ``"breast_cancer"`` (standardized), a seeded split."""
    from sklearn.datasets import load_breast_cancer, load_digits

    if name == "digits":
        data = load_digits()
        # 2×2 average pooling of the 8×8 images: 16 features keep the exact Hessians small (170 and 442 parameters)
        inputs = data.data.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16) / 16.0
    elif name == "breast_cancer":
        data = load_breast_cancer()
        inputs = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
    else:
        raise ValueError(f"Unknown problem {name!r}: choose 'digits' or 'breast_cancer'.")
    labels = data.target.astype(np.int64)
    num_train, num_test = SPLITS[name]
    order = np.random.default_rng(seed).permutation(len(inputs))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    return Problem(name, inputs[train], labels[train], inputs[test], labels[test], int(labels.max()) + 1)


def build_model(kind: str, num_features: int, num_outputs: int, hidden_units: int) -> Any:
    """A float64 ``"logistic"`` regression or tanh ``"mlp"``, every kernel and bias L2-regularized."""
    regularizer = keras.regularizers.L2(REGULARIZATION)
    layers = [keras.Input((num_features,), dtype="float64")]
    if kind == "mlp":
        layers.append(
            keras.layers.Dense(
                hidden_units,
                activation="tanh",
                dtype="float64",
                kernel_regularizer=regularizer,
                bias_regularizer=regularizer,
            )
        )
    elif kind != "logistic":
        raise ValueError(f"Unknown model kind {kind!r}: choose 'logistic' or 'mlp'.")
    layers.append(
        keras.layers.Dense(num_outputs, dtype="float64", kernel_regularizer=regularizer, bias_regularizer=regularizer)
    )
    return keras.Sequential(layers)


def per_example_loss(num_outputs: int) -> Any:
    """Cross-entropy on logits, per example, in float64: sigmoid for one output, softmax otherwise."""
    if num_outputs == 1:
        return keras.losses.BinaryCrossentropy(from_logits=True, reduction="none", dtype="float64")
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", dtype="float64")


class FullBatchTrainer:
    """``train(inputs, labels, *, seed, initial_weights=None) -> model`` that trains to a real optimum.

    The objective is the full-batch ``mean loss + Σ model.losses`` in float64. From scratch, a network is first fit
    by L-BFGS; then (and always for warm starts and convex models) scipy's Newton trust-region method with exact
    Hessian-vector products runs until the gradient norm is below ``gradient_tolerance``. The graph functions are
    traced once, on a work copy of the model, and every call returns a new model holding the solution.
    """

    def __init__(self, kind: str, num_features: int, num_outputs: int, hidden_units: int, *, gradient_tolerance: float):
        self.kind = kind
        self.build = lambda: build_model(kind, num_features, num_outputs, hidden_units)
        self.gradient_tolerance = gradient_tolerance
        self.num_outputs = num_outputs
        self.work = self.build()
        variables = list(self.work.trainable_variables)
        shapes = [tuple(variable.shape) for variable in variables]
        sizes = [int(np.prod(shape)) for shape in shapes]
        loss = per_example_loss(num_outputs)
        signature = [
            tf.TensorSpec([None, num_features], tf.float64),
            tf.TensorSpec([None], tf.float64 if num_outputs == 1 else tf.int64),
        ]

        def assign(theta: tf.Tensor) -> None:
            for variable, part, shape in zip(variables, tf.split(theta, sizes), shapes, strict=True):
                variable.assign(tf.reshape(part, shape))

        def value_and_gradient(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                value = tf.reduce_mean(loss(y, self.work(x))) + tf.add_n(self.work.losses)
            gradients = tape.gradient(value, variables)
            return value, tf.concat([tf.reshape(gradient, [-1]) for gradient in gradients], 0)

        @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], tf.float64), *signature])
        def objective(theta: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            assign(theta)
            return value_and_gradient(x, y)

        @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], tf.float64)] * 2 + signature)
        def hvp(theta: tf.Tensor, vector: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            assign(theta)
            with tf.GradientTape() as tape:
                _, gradient = value_and_gradient(x, y)
                directional = tf.reduce_sum(gradient * vector)
            return tf.concat([tf.reshape(part, [-1]) for part in tape.gradient(directional, variables)], 0)

        self._objective, self._hvp = objective, hvp

    def __call__(self, inputs: np.ndarray, labels: np.ndarray, *, seed: int, initial_weights: Any = None) -> Any:
        import scipy.optimize

        keras.utils.set_random_seed(seed)
        model = self.build()
        weights = model.get_weights() if initial_weights is None else initial_weights
        theta = np.concatenate([np.asarray(weight, dtype=np.float64).ravel() for weight in weights])
        x = tf.constant(inputs, tf.float64)
        y = tf.constant(labels, tf.float64 if self.num_outputs == 1 else tf.int64)

        def objective(point: np.ndarray) -> tuple[float, np.ndarray]:
            value, gradient = self._objective(tf.constant(point), x, y)
            return float(value), gradient.numpy()

        def hvp(point: np.ndarray, vector: np.ndarray) -> np.ndarray:
            return self._hvp(tf.constant(point), tf.constant(vector), x, y).numpy()

        if initial_weights is None and self.kind == "mlp":
            theta = scipy.optimize.minimize(
                objective, theta, jac=True, method="L-BFGS-B", options={"gtol": 1e-6, "maxiter": 5000, "maxcor": 30}
            ).x
        result = scipy.optimize.minimize(
            objective,
            theta,
            jac=True,
            hessp=hvp,
            method="trust-ncg",
            options={"gtol": self.gradient_tolerance, "maxiter": 200},
        )
        gradient_norm = float(np.linalg.norm(result.jac))
        if gradient_norm > 100 * self.gradient_tolerance:
            raise RuntimeError(f"Training stopped at gradient norm {gradient_norm:.2e}: {result.message}")
        shapes = [np.shape(weight) for weight in weights]
        offsets = np.cumsum([0] + [int(np.prod(shape)) for shape in shapes])
        model.set_weights(
            [
                result.x[start:end].reshape(shape)
                for start, end, shape in zip(offsets[:-1], offsets[1:], shapes, strict=True)
            ]
        )
        return model


PairwiseScorer = Callable[[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the faithfulness table: a calculator built on the trained model and the training set."""

    name: str
    description: str
    build: Callable[[Any, tf.data.Dataset], Any]
    test_side_solve: bool = False  # pairwise scores from influence factors H⁻¹∇ℓ(x): N_test solves, not N_train

    def pairwise(self, model: Any, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
        train, test = from_numpy(x, y, batch_size=BATCH_SIZE), from_numpy(x_test, y_test, batch_size=BATCH_SIZE)
        calculator = self.build(model, train)
        if self.test_side_solve:
            return calculator.influence_from_factors(calculator.compute_influence_factors(test), train)
        return calculator.influence_matrix(test, train)

    def self_influence(self, model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        train = from_numpy(x, y, batch_size=BATCH_SIZE)
        return np.asarray(self.build(model, train).self_influence(train))


def faithfulness_methods(kind: str, num_outputs: int) -> list[Method]:
    """Every first-order solver and the other pairwise methods, configured for a ``"logistic"`` or ``"mlp"`` model."""
    import influenciae

    loss = per_example_loss(num_outputs)
    # A network fit to a local minimum has a positive-definite but badly conditioned Hessian (smallest eigenvalues
    # near 1e-5): the iterative solvers get a damping that bounds their condition number; exact stays undamped.
    damping = 0.0 if kind == "logistic" else 1e-3

    def wrapped(model: Any) -> InfluenceModel:
        return InfluenceModel(model, loss_function=loss)

    # One exact Hessian per trained model, shared by "influence, exact" and RelatIF (the models are kept alive with
    # their solver, so that an id is never reused while its entry lives).
    exact_solvers: dict[int, tuple[Any, Any]] = {}

    def exact(model: Any, train: tf.data.Dataset, **settings: Any) -> Any:
        if id(model) not in exact_solvers:
            exact_solvers[id(model)] = (model, influenciae.ExactIHVP(wrapped(model), train))
        solver = exact_solvers[id(model)][1]
        return influenciae.FirstOrderInfluenceCalculator(solver.model, train, solver, **settings)

    def first_order(solver: str, **settings: Any) -> Callable[[Any, tf.data.Dataset], Any]:
        return lambda model, train: influenciae.FirstOrderInfluenceCalculator(wrapped(model), train, solver, **settings)

    def arnoldi(model: Any, train: tf.data.Dataset) -> Any:
        influence_model = wrapped(model)
        eigenvalues = min(50, influence_model.nb_params // 2)
        options = {"subspace_dim": min(2 * eigenvalues, influence_model.nb_params), "k_largest_eig_vals": eigenvalues}
        return influenciae.FirstOrderInfluenceCalculator(
            influence_model, train, "arnoldi", damping=damping, ihvp_options=options
        )

    def trak(model: Any, train: tf.data.Dataset) -> Any:
        influence_model = wrapped(model)
        projection = 256 if influence_model.nb_params > 256 else None
        return influenciae.TrakCalculator(influence_model, train, projection, damping=1e-3)

    methods = [
        Method("influence, exact", "ExactIHVP, no damping", exact),
        Method(
            "influence, CG",
            "ConjugateGradientDescentIHVP, tolerance 1e-6, at most 100 iterations, damping 0 (logistic) or 1e-3 (MLP)",
            first_order("cg", damping=damping, ihvp_options={"tolerance": 1e-6, "max_iterations": 100}),
            test_side_solve=True,
        ),
        Method(
            "influence, LiSSA",
            "LissaIHVP, depth 200, damping 1e-2 (LiSSA needs ‖H‖/λ small to converge in that depth)",
            first_order("lissa", damping=1e-2, ihvp_options={"depth": 200}),
            test_side_solve=True,
        ),
        Method(
            "influence, Arnoldi",
            "ArnoldiIHVP, k = min(50, P // 2) eigenvalues of largest magnitude from a subspace of min(2k, P), "
            "damping 0 (logistic) or 1e-3 (MLP)",
            arnoldi,
        ),
        Method(
            "RelatIF",
            "FirstOrderInfluenceCalculator(normalize=True), exact",
            lambda model, train: exact(model, train, normalize=True),
        ),
        Method(
            "TracIn (final model)",
            "TracIn with the final model as its only checkpoint, learning rate 1, all layers",
            lambda model, train: influenciae.TracIn([wrapped(model)], 1.0),
        ),
        Method(
            "TracInCPFast (last layer)",
            "TracInCPFast, final model, last Dense layer",
            lambda model, train: influenciae.TracInCPFast([model], 1.0, loss_function=loss, keep_in_memory=True),
        ),
        Method(
            "TracInCPFastRandProj (k=32)",
            "TracInCPFastRandProj, projection_dim 32, seed 0",
            lambda model, train: influenciae.TracInCPFastRandProj(
                [model], 1.0, projection_dim=32, seed=0, loss_function=loss, keep_in_memory=True
            ),
        ),
        Method(
            "TRAK",
            "TrakCalculator, margin output, Gaussian projection to 256 dimensions (none when P ≤ 256), seed 0, kernel "
            "damping 1e-3 (the margins' gradients span fewer than min(N, P) directions: ΦᵀΦ alone is singular)",
            trak,
        ),
        Method(
            "representer points, L2",
            "RepresenterPointL2, λ = 1e-3, explaining the label's logit",
            lambda model, train: influenciae.RepresenterPointL2(model, train, loss, 1e-3, explained_class="label"),
        ),
        Method(
            "representer points, LJE",
            "RepresenterPointLJE, step 1e-2, exact solver, damping 1e-3, explaining the label's logit",
            lambda model, train: influenciae.RepresenterPointLJE(
                model, train, loss, damping=1e-3, explained_class="label"
            ),
        ),
    ]
    return methods


@dataclasses.dataclass(frozen=True)
class FaithfulnessRun:
    """The three measurements of one (problem, model kind), over seeds."""

    loo: LeaveOneOutReport
    lds: LinearDatamodelingReport
    detection: EvaluationReport
    methods: list[Method]
    seconds: float
    failures: dict[str, str]


def run_faithfulness(problem: Problem, kind: str, options: ReportOptions) -> FaithfulnessRun:
    """Leave-one-out, LDS and mislabeled detection of every method and baseline, for one problem and model kind."""
    start = time.perf_counter()
    hidden = HIDDEN_UNITS[problem.name]
    train = FullBatchTrainer(
        kind,
        problem.inputs.shape[1],
        problem.num_outputs,
        hidden,
        gradient_tolerance=1e-10 if kind == "logistic" else 1e-8,
    )
    loss = per_example_loss(problem.num_outputs)

    def test_loss(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return loss(tf.constant(y), model(tf.constant(x))).numpy()

    def minus_test_loss(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return -test_loss(model, x, y)

    methods = faithfulness_methods(kind, problem.num_outputs)

    def loss_only(model: Any, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
        return np.tile(test_loss(model, x, y), (len(x_test), 1))

    pairwise: dict[str, PairwiseScorer] = {method.name: method.pairwise for method in methods}
    pairwise["loss only (baseline)"] = loss_only
    data = (problem.inputs, problem.labels, problem.test_inputs, problem.test_labels, train)
    loo = LeaveOneOutEvaluator(*data, pairwise, test_loss, num_removals=options.num_removals, warm_start=True)
    lds = LinearDatamodelingEvaluator(
        *data, pairwise, minus_test_loss, num_subsets=options.num_subsets, subset_fraction=0.5, warm_start=True
    )
    failures: dict[str, str] = {}
    loo_results: dict[str, list[Any]] = {}
    lds_results: dict[str, list[Any]] = {}
    seeds = tuple(range(options.faithfulness_seeds))
    for seed in seeds:
        model = train(problem.inputs, problem.labels, seed=seed)
        scores = {}
        for name, scorer in pairwise.items():
            try:
                scores[name] = scorer(model, problem.inputs, problem.labels, problem.test_inputs, problem.test_labels)
            except Exception as error:  # noqa: BLE001 - one failing method must not lose the table
                failures[name] = f"{type(error).__name__}: {error}"
        for name, result in loo.evaluate_scores(model, scores, seed=seed).items():
            loo_results.setdefault(name, []).append(result)
        for name, lds_result in lds.evaluate_scores(model, scores, seed=seed).items():
            lds_results.setdefault(name, []).append(lds_result)

    def guarded(method: Method) -> Callable[[Any, np.ndarray, np.ndarray], np.ndarray]:
        def score(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
            try:
                return method.self_influence(model, x, y)
            except Exception as error:  # noqa: BLE001 - reported in the table, zeros rank nothing
                failures[method.name] = f"self-influence: {type(error).__name__}: {error}"
                return np.zeros(len(x))

        return score

    self_scorers: dict[str, Callable[[Any, np.ndarray, np.ndarray], np.ndarray]] = {
        method.name: guarded(method) for method in methods if method.name not in failures
    }
    self_scorers["loss only (baseline)"] = test_loss
    detection = MislabelingDetectorEvaluator(
        problem.inputs,
        problem.labels,
        problem.num_classes,
        lambda x, y, seed: train(x, y, seed=seed),
        self_scorers,
        flip_fraction=0.1,
    ).evaluate(seeds=seeds)
    return FaithfulnessRun(
        LeaveOneOutReport(loo_results, seeds),
        LinearDatamodelingReport(lds_results, seeds),
        detection,
        methods,
        time.perf_counter() - start,
        failures,
    )


def faithfulness_table(run: FaithfulnessRun) -> str:
    """One markdown table: LOO Pearson / Spearman / scale ratio, LDS and mislabeled ROC AUC per method."""
    loo, lds, detection = run.loo.summary(), run.lds.summary(), run.detection.summary()

    def cell(values: dict[str, dict[str, tuple[float, float]]], name: str, metric: str) -> str:
        if name not in values or not np.isfinite(values[name][metric][0]):
            return "n/a"
        mean, spread = values[name][metric]
        return f"{mean:.3f} ± {spread:.3f}" if len(run.loo.seeds) > 1 else f"{mean:.3f}"

    lines = [
        "| Method | LOO Pearson | LOO Spearman | LOO scale ratio | LDS | mislabeled ROC AUC |",
        "|---|---|---|---|---|---|",
    ]
    for name in loo:
        cells = [
            cell(loo, name, "pearson"),
            cell(loo, name, "spearman"),
            cell(loo, name, "scale_ratio"),
            cell(lds, name, "lds"),
            "failed (below)" if name in run.failures else cell(detection, name, "roc_auc"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, message in run.failures.items():
        lines.append(f"| {name} | failed: `{message[:200].replace('|', '/').replace(chr(10), ' ')}` | | | | |")
    return "\n".join(lines)


def faithfulness_section(options: ReportOptions) -> str:
    """Leave-one-out, LDS and mislabeled detection for {logistic regression, MLP} × {digits, breast cancer}."""
    parts = [
        "## Faithfulness to retraining: leave-one-out and LDS",
        "",
        "Every first-order solver and the other pairwise methods, on an L2-regularized (c = 1e-3 on every kernel and "
        "bias) logistic regression and a one-hidden-layer tanh MLP, in float64, on scikit-learn's digits "
        f"(8×8 images average-pooled to 4×4, {SPLITS['digits'][0]} training / {SPLITS['digits'][1]} test images, "
        f"10 classes, MLP 16-"
        f"{HIDDEN_UNITS['digits']}-10) and breast cancer ({SPLITS['breast_cancer'][0]} / "
        f"{SPLITS['breast_cancer'][1]}, standardized, one logit, MLP 30-{HIDDEN_UNITS['breast_cancer']}-1). "
        "Models are trained to a real optimum: full batch, L-BFGS then Newton trust-region steps with exact "
        "Hessian-vector products until the gradient norm is below 1e-10 (logistic) or 1e-8 (MLP); every "
        "retraining is warm-started from the trained weights and converged the same way.",
        "",
        f"* **LOO** (Koh & Liang): {options.num_removals} training examples drawn at random per seed, each removed "
        "and the model retrained; predicted change of the loss of test example x is `+score(z, x) / N` "
        "(docs/theory.md: removing a proponent raises the loss). Pearson and Spearman over all (removed example, "
        "test example) pairs; **scale ratio** = least-squares slope of actual on predicted changes (1 = right sign "
        "and scale; only influence functions claim that scale, the other methods are judged by the correlations).",
        f"* **LDS** (Park et al. 2023): {options.num_subsets} random halves of the training set per seed, each "
        "retrained (warm start); per test example, Spearman correlation over subsets between minus its test loss "
        "and the sum of the scores of the kept examples, averaged over test examples.",
        "* **mislabeled ROC AUC**: 10 % of the training labels flipped, the model retrained on them, training "
        "examples ranked by self-influence (as in the section above).",
        "* Baselines: **loss only** scores every (z, x) pair by the training loss of z (and ranks by training loss "
        "for mislabeled detection); **random** is a seeded standard-normal draw.",
        (
            f"* Mean ± standard deviation over {options.faithfulness_seeds} seeds (each seed: another model "
            "initialization, other removals, subsets and flipped labels; the split is fixed)."
            if options.faithfulness_seeds > 1
            else "* One seed (`--faithfulness-seeds N` adds seeds and a ± standard deviation; each seed draws another "
            "model initialization, other removals, subsets and flipped labels; the split is fixed)."
        ),
        "",
    ]
    for problem_name in options.problems:
        problem = load_problem(problem_name)
        for kind in options.kinds:
            run = run_faithfulness(problem, kind, options)
            title = {"logistic": "logistic regression", "mlp": "MLP"}[kind]
            parts += [f"### {problem_name.replace('_', ' ')}, {title}", "", faithfulness_table(run), ""]
            parts.append(f"({run.seconds:.0f} s)")
            parts.append("")
            configurations = run.methods
    parts += [
        "| Method | Configuration |",
        "|---|---|",
        *[f"| {method.name} | {method.description} |" for method in configurations],
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- the page


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """Sizes of the experiments; section functions take the ones they need.

    Attributes:
        epochs: Adam epochs of the digits MLP of the mislabeled-detection section.
        mislabeled_seeds: Seeds of the mislabeled-detection section.
        faithfulness_seeds: Seeds of the faithfulness section.
        num_removals: Leave-one-out retrainings per seed.
        num_subsets: LDS subsets per seed.
        problems: Problems of the faithfulness section.
        kinds: Model kinds of the faithfulness section.
    """

    epochs: int = 200
    mislabeled_seeds: int = 2
    faithfulness_seeds: int = 1
    num_removals: int = 20
    num_subsets: int = 20
    problems: tuple[str, ...] = ("digits", "breast_cancer")
    kinds: tuple[str, ...] = ("logistic", "mlp")


# Sections, in page order: "module:function" taking a ReportOptions (or no positional argument, then it is called
# without arguments, with its own defaults) and returning markdown that
# starts with a "## " heading. A section whose module is missing is skipped; one that fails is reported on the page
# without losing the others.
SECTIONS = {
    "mislabeled": "influenciae.evaluation.report:mislabeled_section",
    "faithfulness": "influenciae.evaluation.report:faithfulness_section",
    "curvature": "influenciae.evaluation.curvature:curvature_accuracy_section",
}
"""The page's sections, in order: name -> ``"module:function"`` returning the section's markdown."""
COMMAND = "python -m influenciae.evaluation.report --output docs/evaluation.md"


def run_section(target: str, options: ReportOptions) -> str | None:
    """The markdown of one section; None when its module does not exist (yet)."""
    import importlib
    import inspect

    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise
    function = getattr(module, function_name, None)
    if function is None:
        return None
    positional = [
        parameter
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    return str(function(options) if positional else function())


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation sections and write the markdown page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/evaluation.md")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--epochs", type=int, default=ReportOptions.epochs)
    parser.add_argument("--seeds", type=int, default=ReportOptions.mislabeled_seeds, help="mislabeled-detection seeds")
    parser.add_argument("--faithfulness-seeds", type=int, default=ReportOptions.faithfulness_seeds)
    parser.add_argument("--removals", type=int, default=ReportOptions.num_removals)
    parser.add_argument("--subsets", type=int, default=ReportOptions.num_subsets)
    parser.add_argument(
        "--problems", nargs="+", choices=["digits", "breast_cancer"], default=list(ReportOptions.problems)
    )
    parser.add_argument("--kinds", nargs="+", choices=["logistic", "mlp"], default=list(ReportOptions.kinds))
    arguments = parser.parse_args(argv)
    options = ReportOptions(
        epochs=arguments.epochs,
        mislabeled_seeds=arguments.seeds,
        faithfulness_seeds=arguments.faithfulness_seeds,
        num_removals=arguments.removals,
        num_subsets=arguments.subsets,
        problems=tuple(arguments.problems),
        kinds=tuple(arguments.kinds),
    )

    start = time.perf_counter()
    bodies: list[tuple[str, str, float]] = []
    for name in arguments.sections:
        section_start = time.perf_counter()
        try:
            body = run_section(SECTIONS[name], options)
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
            where = traceback.extract_tb(error.__traceback__)[-1]
            body = (
                f"## {name}\n\nThis section failed at `{where.filename}:{where.lineno}`: "
                f"`{type(error).__name__}: {str(error).strip()[:500]}`."
            )
        if body is None:
            continue
        bodies.append((name, body.strip(), time.perf_counter() - section_start))
        print(body, flush=True)
    stamp = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}"
    )
    blocks = {name: _section_block(name, body, stamp, seconds) for name, body, seconds in bodies}
    previous = Path(arguments.output).read_text(encoding="utf-8") if Path(arguments.output).is_file() else ""
    page = _assemble(blocks, previous)
    Path(arguments.output).write_text(page, encoding="utf-8")
    print(f"wrote {arguments.output} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def _section_block(name: str, body: str, stamp: str, seconds: float) -> str:
    return (
        f"<!-- section:{name} -->\n{body}\n\n*Section `{name}`: run on {stamp}, in {seconds:.0f} s.*\n"
        f"<!-- /section:{name} -->"
    )


def _assemble(blocks: dict[str, str], previous: str) -> str:
    """The page: the sections just run, and the other sections' blocks kept from the previous page.

    Running ``--sections curvature`` alone therefore refreshes that section and leaves the others as they were
    generated (each block carries its own run date and duration).
    """
    parts = []
    for name in SECTIONS:
        if name in blocks:
            parts.append(blocks[name])
            continue
        match = re.search(rf"<!-- section:{name} -->.*?<!-- /section:{name} -->", previous, flags=re.DOTALL)
        if match:
            parts.append(match.group(0))
    header = ["# Evaluation", "", f"Generated by `make evaluate` (`{COMMAND}`); do not edit by hand.", ""]
    return "\n".join([*header, *[part for block in parts for part in (block, "")]])


if __name__ == "__main__":
    raise SystemExit(main())
