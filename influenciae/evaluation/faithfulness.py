"""The faithfulness section of ``make evaluate``: leave-one-out and LDS of every first-order solver and the other
pairwise methods, on logistic regression and a small MLP, on digits and breast cancer (:mod:`.problems`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import from_numpy
from influenciae.evaluation.evaluators import (
    LeaveOneOutEvaluator,
    LeaveOneOutReport,
    LinearDatamodelingEvaluator,
    LinearDatamodelingReport,
)
from influenciae.evaluation.mislabeling import EvaluationReport, MislabelingDetectorEvaluator
from influenciae.evaluation.problems import (
    BATCH_SIZE,
    HIDDEN_UNITS,
    SPLITS,
    FullBatchTrainer,
    Problem,
    load_problem,
    per_example_loss,
)
from influenciae.model import InfluenceModel

if TYPE_CHECKING:  # the page module imports this one
    from influenciae.evaluation.report import ReportOptions

__all__ = [
    "Method",
    "PairwiseScorer",
    "FaithfulnessRun",
    "faithfulness_methods",
    "run_faithfulness",
    "faithfulness_table",
    "faithfulness_section",
]


PairwiseScorer = Callable[[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(model, x, y, x_test, y_test) -> scores [N_test, N_train]``."""


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the faithfulness table: a calculator built on the trained model and the training set."""

    name: str
    description: str
    build: Callable[[Any, tf.data.Dataset], Any]
    test_side_solve: bool = False  # pairwise scores from influence factors H⁻¹∇ℓ(x): N_test solves, not N_train

    def pairwise(self, model: Any, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
        """Scores ``[N_test, N_train]`` of the calculator built on ``model`` and ``(x, y)``."""
        train, test = from_numpy(x, y, batch_size=BATCH_SIZE), from_numpy(x_test, y_test, batch_size=BATCH_SIZE)
        calculator = self.build(model, train)
        if self.test_side_solve:
            return calculator.influence_from_factors(calculator.compute_influence_factors(test), train)
        return calculator.influence_matrix(test, train)

    def self_influence(self, model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Self-influence ``[N_train]`` of the calculator built on ``model`` and ``(x, y)``."""
        train = from_numpy(x, y, batch_size=BATCH_SIZE)
        return np.asarray(self.build(model, train).self_influence(train))


def faithfulness_methods(kind: str, num_outputs: int) -> list[Method]:
    """Every first-order solver and the other pairwise methods, configured for a ``"logistic"`` or ``"mlp"`` model."""
    from influenciae.hessian.exact import ExactIHVP
    from influenciae.influence.first_order import FirstOrderInfluenceCalculator
    from influenciae.influence.representer import RepresenterPointL2, RepresenterPointLJE
    from influenciae.influence.tracin import TracIn, TracInCPFast, TracInCPFastRandProj
    from influenciae.influence.trak import TrakCalculator

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
            exact_solvers[id(model)] = (model, ExactIHVP(wrapped(model), train))
        solver = exact_solvers[id(model)][1]
        return FirstOrderInfluenceCalculator(solver.model, train, solver, **settings)

    def first_order(solver: str, **settings: Any) -> Callable[[Any, tf.data.Dataset], Any]:
        return lambda model, train: FirstOrderInfluenceCalculator(wrapped(model), train, solver, **settings)

    def arnoldi(model: Any, train: tf.data.Dataset) -> Any:
        influence_model = wrapped(model)
        eigenvalues = min(50, influence_model.nb_params // 2)
        options = {"subspace_dim": min(2 * eigenvalues, influence_model.nb_params), "k_largest_eig_vals": eigenvalues}
        return FirstOrderInfluenceCalculator(influence_model, train, "arnoldi", damping=damping, ihvp_options=options)

    def trak(model: Any, train: tf.data.Dataset) -> Any:
        influence_model = wrapped(model)
        projection = 256 if influence_model.nb_params > 256 else None
        return TrakCalculator(influence_model, train, projection, damping=1e-3)

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
            lambda model, train: TracIn([wrapped(model)], 1.0),
        ),
        Method(
            "TracInCPFast (last layer)",
            "TracInCPFast, final model, last Dense layer",
            lambda model, train: TracInCPFast([model], 1.0, loss_function=loss, keep_in_memory=True),
        ),
        Method(
            "TracInCPFastRandProj (k=32)",
            "TracInCPFastRandProj, projection_dim 32, seed 0",
            lambda model, train: TracInCPFastRandProj(
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
            lambda model, train: RepresenterPointL2(model, train, loss, 1e-3, explained_class="label"),
        ),
        Method(
            "representer points, LJE",
            "RepresenterPointLJE, step 1e-2, exact solver, damping 1e-3, explaining the label's logit",
            lambda model, train: RepresenterPointLJE(model, train, loss, damping=1e-3, explained_class="label"),
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
