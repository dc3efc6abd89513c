"""The retraining evaluators: leave-one-out and LDS of several scorers over seeds, with a ``"random"`` baseline.

:class:`LeaveOneOutEvaluator` and :class:`LinearDatamodelingEvaluator` share the set-up, the scoring and the
evaluation loop over seeds (:class:`_RetrainingEvaluator`); each adds its experiment on scores already computed
(``evaluate_scores``). The experiments themselves and their sign and scale conventions are in
:mod:`influenciae.evaluation.retraining`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from influenciae.evaluation.retraining import (
    RANDOM_SEED_OFFSET,
    SELECTIONS,
    TARGETS,
    ExampleFunction,
    LeaveOneOutResult,
    LinearDatamodelingResult,
    PairwiseScorer,
    TrainProcedure,
    _check_callable,
    _check_positive_int,
    _examples,
    _per_example,
    datamodeling_correlations,
    leave_one_out,
    random_subsets,
    retrain_on_subsets,
)

__all__ = [
    "LeaveOneOutEvaluator",
    "LeaveOneOutReport",
    "LinearDatamodelingEvaluator",
    "LinearDatamodelingReport",
]


@dataclasses.dataclass(frozen=True)
class _Report:
    """Results over seeds, per scorer; the metrics are those of the result class."""

    per_seed: dict[str, list[Any]]
    seeds: tuple[int, ...]

    metrics: ClassVar[tuple[str, ...]] = ()

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """``{scorer: {metric: (mean, standard deviation)}}`` over seeds (``nan`` values skipped)."""
        table: dict[str, dict[str, tuple[float, float]]] = {}
        for name, results in self.per_seed.items():
            table[name] = {}
            for metric in self.metrics:
                values = np.array([getattr(result, metric) for result in results], dtype=np.float64)
                finite = values[np.isfinite(values)]
                table[name][metric] = (
                    (float(finite.mean()), float(finite.std())) if finite.size else (float("nan"), float("nan"))
                )
        return table

    def to_markdown(self) -> str:
        """A table: one row per scorer, ``mean ± std`` over seeds per metric."""
        lines = ["| Method | " + " | ".join(self.metrics) + " |", "|---" * (len(self.metrics) + 1) + "|"]
        for name, metrics in self.summary().items():
            cells = [f"{mean:.3f} ± {std:.3f}" for mean, std in (metrics[metric] for metric in self.metrics)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class LeaveOneOutReport(_Report):
    """Leave-one-out results over seeds: ``per_seed = {scorer: [LeaveOneOutResult per seed]}``."""

    metrics: ClassVar[tuple[str, ...]] = LeaveOneOutResult.METRICS


@dataclasses.dataclass(frozen=True)
class LinearDatamodelingReport(_Report):
    """LDS results over seeds: ``per_seed = {scorer: [LinearDatamodelingResult per seed]}``."""

    metrics: ClassVar[tuple[str, ...]] = LinearDatamodelingResult.METRICS


class _RetrainingEvaluator:
    """Shared set-up: the data, the training procedure, the scorers and the ``"random"`` baseline."""

    def __init__(
        self,
        inputs: Any,
        labels: Any,
        test_inputs: Any,
        test_labels: Any,
        train_procedure: TrainProcedure,
        scorers: dict[str, PairwiseScorer],
        *,
        add_baselines: bool,
        show_progress: bool,
    ) -> None:
        self.inputs, self.labels = _examples(inputs, labels, "inputs", "labels")
        self.test_inputs, self.test_labels = _examples(test_inputs, test_labels, "test_inputs", "test_labels")
        if len(self.inputs) < 2:
            raise ValueError(f"Retraining experiments need at least 2 training examples, got {len(self.inputs)}.")
        _check_callable(train_procedure, "train_procedure")
        if not isinstance(scorers, dict):
            raise TypeError(f"scorers must be a dict {{name: scorer}}, got {type(scorers).__name__}.")
        for name, scorer in scorers.items():
            _check_callable(scorer, f"scorers[{name!r}]")
        if add_baselines and "random" in scorers:
            raise ValueError(
                '"random" is the name of the built-in baseline: rename your scorer or add_baselines=False.'
            )
        self.train_procedure = train_procedure
        self.scorers = dict(scorers)
        self.add_baselines = bool(add_baselines)
        self.show_progress = bool(show_progress)

    @property
    def num_train(self) -> int:
        return len(self.inputs)

    def train(self, seed: int) -> Any:
        """The model every scorer explains: trained on the whole training set from scratch."""
        return self.train_procedure(self.inputs, self.labels, seed=seed, initial_weights=None)

    def score(self, model: Any) -> dict[str, np.ndarray]:
        """Every scorer's ``[N_test, N_train]`` matrix for ``model``, validated."""
        if not self.scorers:
            raise ValueError("Give at least one scorer: {name: (model, x, y, x_test, y_test) -> [N_test, N_train]}.")
        return {
            name: scorer(model, self.inputs, self.labels, self.test_inputs, self.test_labels)
            for name, scorer in self.scorers.items()
        }

    def evaluate_scores(self, model: Any, scores: dict[str, Any], *, seed: int = 0) -> dict[str, Any]:
        """The experiment for scores already computed on ``model``: ``{name: result}`` (subclasses)."""
        raise NotImplementedError

    def _results_per_seed(self, seeds: Sequence[int]) -> dict[str, list[Any]]:
        """Train, score and run the experiment once per seed: ``{name: [result per seed]}``."""
        per_seed: dict[str, list[Any]] = {}
        for seed in seeds:
            model = self.train(seed)
            for name, result in self.evaluate_scores(model, self.score(model), seed=seed).items():
                per_seed.setdefault(name, []).append(result)
        return per_seed

    def _checked_scores(self, scores: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
        shape = (len(self.test_inputs), self.num_train)
        checked = {}
        for name, values in scores.items():
            array = np.asarray(values, dtype=np.float64)
            if array.shape != shape:
                raise ValueError(f"Scorer {name!r} returned scores of shape {array.shape}, expected {shape}.")
            if not np.all(np.isfinite(array)):
                raise ValueError(f"Scorer {name!r} returned non-finite scores (seed {seed}).")
            checked[name] = array
        if self.add_baselines:
            checked["random"] = np.random.default_rng(RANDOM_SEED_OFFSET + seed).standard_normal(shape)
        return checked


class LeaveOneOutEvaluator(_RetrainingEvaluator):
    """Leave-one-out faithfulness of every scorer: predicted vs actual changes of the test loss.

    Per seed: train on the full training set, score, choose ``num_removals`` training examples, retrain without each
    of them (warm-started from the trained weights by default) and compare ``score(z, x) / N`` with the actual change
    ``ℓ(x; θ_{-z}) - ℓ(x; θ_reference)`` (module docstring: sign and scale). Retrainings are shared between scorers
    whenever they remove the same example.

    Args:
        inputs: Training inputs ``[N, ...]``.
        labels: Training labels ``[N, ...]``.
        test_inputs: Test inputs ``[N_test, ...]``.
        test_labels: Test labels ``[N_test, ...]``.
        train_procedure: ``train(inputs, labels, *, seed, initial_weights=None) -> model``, to convergence.
        scorers: ``{name: (model, x, y, x_test, y_test) -> scores [N_test, N_train]}`` in the influence convention;
            e.g. a calculator's ``influence_matrix``. May be empty if you only call :meth:`evaluate_scores`.
        test_loss: ``(model, inputs, labels) -> per-example losses [N_test]``, the loss the influence is about.
        num_removals: ``m``, the number of training examples removed (one at a time) per seed.
        selection: Which examples: ``"random"`` (shared by all scorers), or per scorer by predicted effect on the
            mean test loss: ``"largest"`` (largest magnitude, as Koh & Liang), ``"top"`` (most positive: the
            strongest proponents) or ``"bottom"`` (most negative: the strongest opponents).
        target: ``"per_test"``: every (removed example, test example) pair is a point (``m · N_test`` points);
            ``"mean"``: one point per removal, the change of the mean test loss.
        warm_start: Retrain from the trained model's ``get_weights()`` (True) or from scratch with the same seed.
        add_baselines: Also report ``"random"``: seeded standard-normal scores.
        show_progress: A progress bar over the retrainings.

    Example:
        >>> evaluator = LeaveOneOutEvaluator(x, y, x_test, y_test, train, {"exact": scorer}, test_loss)
        >>> report = evaluator.evaluate(seeds=(0, 1))
        >>> report.summary()["exact"]["pearson"]  # (mean, std) over seeds
    """

    def __init__(
        self,
        inputs: Any,
        labels: Any,
        test_inputs: Any,
        test_labels: Any,
        train_procedure: TrainProcedure,
        scorers: dict[str, PairwiseScorer],
        test_loss: ExampleFunction,
        *,
        num_removals: int = 20,
        selection: str = "random",
        target: str = "per_test",
        warm_start: bool = True,
        add_baselines: bool = True,
        show_progress: bool = False,
    ) -> None:
        super().__init__(
            inputs,
            labels,
            test_inputs,
            test_labels,
            train_procedure,
            scorers,
            add_baselines=add_baselines,
            show_progress=show_progress,
        )
        _check_callable(test_loss, "test_loss")
        _check_positive_int(num_removals, "num_removals")
        if num_removals > self.num_train:
            raise ValueError(f"num_removals ({num_removals}) exceeds the {self.num_train} training examples.")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
        if target == "mean" and num_removals < 2:
            raise ValueError('target="mean" gives one point per removal: num_removals must be at least 2.')
        self.test_loss = test_loss
        self.num_removals = num_removals
        self.selection = selection
        self.target = target
        self.warm_start = bool(warm_start)

    def evaluate(self, seeds: Sequence[int] = (0,)) -> LeaveOneOutReport:
        """Train, score and retrain once per seed; the metrics of every scorer (and baseline) over seeds."""
        return LeaveOneOutReport(self._results_per_seed(seeds), tuple(seeds))

    def evaluate_scores(self, model: Any, scores: dict[str, Any], *, seed: int = 0) -> dict[str, LeaveOneOutResult]:
        """The leave-one-out experiment for scores already computed on ``model`` (e.g. shared with an LDS run).

        Args:
            model: The model trained on the full training set (its ``get_weights()`` warm-start the retrainings).
            scores: ``{name: [N_test, N_train]}`` computed on ``model``.
            seed: Seed of the random selection, of the retrainings and of the ``"random"`` baseline.

        Returns:
            ``{name: LeaveOneOutResult}``, the baseline last.
        """
        scores = self._checked_scores(scores, seed)
        initial_weights = model.get_weights() if self.warm_start else None
        reference = self.train_procedure(self.inputs, self.labels, seed=seed, initial_weights=initial_weights)
        reference_loss = _per_example(
            self.test_loss(reference, self.test_inputs, self.test_labels), len(self.test_inputs), "test_loss"
        )
        chosen = {name: self._select(values, seed) for name, values in scores.items()}
        needed = np.unique(np.concatenate(list(chosen.values())))
        changes = leave_one_out(
            self.train_procedure,
            self.inputs,
            self.labels,
            self.test_inputs,
            self.test_labels,
            self.test_loss,
            needed,
            seed=seed,
            initial_weights=initial_weights,
            reference_loss=reference_loss,
            show_progress=self.show_progress,
        )
        row_of = {int(index): row for row, index in enumerate(needed)}
        results = {}
        for name, values in scores.items():
            indices = chosen[name]
            actual = changes[[row_of[int(index)] for index in indices]]  # [m, N_test]
            predicted = values[:, indices].T / self.num_train  # [m, N_test]
            if self.target == "mean":
                actual, predicted = actual.mean(axis=1), predicted.mean(axis=1)
            results[name] = LeaveOneOutResult.from_changes(indices, predicted, actual)
        return results

    def _select(self, scores: np.ndarray, seed: int) -> np.ndarray:
        if self.selection == "random":
            return np.sort(np.random.default_rng(seed).choice(self.num_train, size=self.num_removals, replace=False))
        effect = scores.mean(axis=0)
        key = {"largest": -np.abs(effect), "top": -effect, "bottom": effect}[self.selection]
        return np.argsort(key, kind="stable")[: self.num_removals]


class LinearDatamodelingEvaluator(_RetrainingEvaluator):
    """The linear datamodeling score (Park et al., 2023) of every scorer.

    Per seed: train on the full training set, score, draw ``num_subsets`` random subsets of ``subset_fraction`` of
    the training set, retrain on each (``seeds_per_subset`` times, outputs averaged) and, per test example, rank
    the subsets by actual output and by predicted output ``Σ_{z ∈ S} score(z, x)``; the LDS is the mean Spearman
    correlation. Subsets and retrainings are shared by all scorers.

    Args:
        inputs: Training inputs ``[N, ...]``.
        labels: Training labels ``[N, ...]``.
        test_inputs: Test inputs ``[N_test, ...]``.
        test_labels: Test labels ``[N_test, ...]``.
        train_procedure: ``train(inputs, labels, *, seed, initial_weights=None) -> model``.
        scorers: ``{name: (model, x, y, x_test, y_test) -> scores [N_test, N_train]}``, positive when the
            training example raises ``output_function``. May be empty if you only call :meth:`evaluate_scores`.
        output_function: ``(model, inputs, labels) -> outputs [N_test]``: minus the test loss for influence
            functions, or the margin of the label (Park et al.).
        num_subsets: ``K``, the number of subsets per seed.
        subset_fraction: ``α``, the fraction of the training set each subset keeps.
        seeds_per_subset: Trainings per subset, their outputs averaged.
        warm_start: Start every training from the trained model's ``get_weights()``; False (default, as in Park et
            al.) trains from scratch, which for networks also averages over training randomness.
        add_baselines: Also report ``"random"``: seeded standard-normal scores.
        show_progress: A progress bar over the subsets.

    Example:
        >>> minus_loss = lambda model, x, y: -test_loss(model, x, y)
        >>> evaluator = LinearDatamodelingEvaluator(x, y, x_test, y_test, train, {"exact": scorer}, minus_loss)
        >>> evaluator.evaluate(seeds=(0,)).summary()["exact"]["lds"]
    """

    def __init__(
        self,
        inputs: Any,
        labels: Any,
        test_inputs: Any,
        test_labels: Any,
        train_procedure: TrainProcedure,
        scorers: dict[str, PairwiseScorer],
        output_function: ExampleFunction,
        *,
        num_subsets: int = 32,
        subset_fraction: float = 0.5,
        seeds_per_subset: int = 1,
        warm_start: bool = False,
        add_baselines: bool = True,
        show_progress: bool = False,
    ) -> None:
        super().__init__(
            inputs,
            labels,
            test_inputs,
            test_labels,
            train_procedure,
            scorers,
            add_baselines=add_baselines,
            show_progress=show_progress,
        )
        _check_callable(output_function, "output_function")
        _check_positive_int(num_subsets, "num_subsets")
        if num_subsets < 3:
            raise ValueError(f"num_subsets must be at least 3 for a rank correlation, got {num_subsets}.")
        _check_positive_int(seeds_per_subset, "seeds_per_subset")
        random_subsets(self.num_train, 1, subset_fraction)  # validates the fraction against the training set
        self.output_function = output_function
        self.num_subsets = num_subsets
        self.subset_fraction = float(subset_fraction)
        self.seeds_per_subset = seeds_per_subset
        self.warm_start = bool(warm_start)

    def evaluate(self, seeds: Sequence[int] = (0,)) -> LinearDatamodelingReport:
        """Train, score and retrain on subsets once per seed; the LDS of every scorer (and baseline) over seeds."""
        return LinearDatamodelingReport(self._results_per_seed(seeds), tuple(seeds))

    def evaluate_scores(
        self, model: Any, scores: dict[str, Any], *, seed: int = 0
    ) -> dict[str, LinearDatamodelingResult]:
        """The LDS experiment for scores already computed on ``model``.

        Args:
            model: The model trained on the full training set (its weights warm-start the subsets if asked).
            scores: ``{name: [N_test, N_train]}`` computed on ``model``.
            seed: Seed of the subsets, of the retrainings and of the ``"random"`` baseline.

        Returns:
            ``{name: LinearDatamodelingResult}``, the baseline last.
        """
        scores = self._checked_scores(scores, seed)
        masks = random_subsets(self.num_train, self.num_subsets, self.subset_fraction, seed=seed)
        outputs = retrain_on_subsets(
            self.train_procedure,
            self.inputs,
            self.labels,
            self.test_inputs,
            self.test_labels,
            self.output_function,
            masks,
            seed=seed,
            seeds_per_subset=self.seeds_per_subset,
            initial_weights=model.get_weights() if self.warm_start else None,
            show_progress=self.show_progress,
        )
        results = {}
        for name, values in scores.items():
            correlations = datamodeling_correlations(values, masks, outputs)
            lds = float(np.nanmean(correlations)) if np.any(np.isfinite(correlations)) else float("nan")
            results[name] = LinearDatamodelingResult(lds=lds, per_example=correlations)
        return results
