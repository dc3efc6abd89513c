"""Faithfulness to retraining: leave-one-out and the linear datamodeling score (LDS).

Attribution scores are predictions about retraining; these harnesses retrain and compare.

* **Leave-one-out** (Koh & Liang, 2017): remove one training example ``z``, retrain to convergence (warm-started from
  the trained weights by default) and measure the change of the test losses; do it for ``m`` chosen examples and
  report the Pearson and Spearman correlations between predicted and actual changes, and their scale ratio.
* **Linear datamodeling score** (Park et al., 2023): retrain on ``K`` random subsets ``S_k`` holding a fraction
  ``α`` of the training set; for each test example ``x``, the Spearman correlation over subsets between the actual
  output ``f(x; θ_{S_k})`` and the additive prediction ``Σ_{z ∈ S_k} score(z, x)``, averaged over test examples.

Conventions (``docs/theory.md``). A score matrix ``scores [N_test, N_train]`` follows the sign of
``influence(z, x) = ∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z)``: positive means ``z`` is a **proponent** of ``x``. Removing ``z`` from the
``N`` training examples then *raises* the loss at ``x`` by about ``influence(z, x) / N``, so the leave-one-out
harness predicts

    Δℓ(x) = ℓ(x; θ_{-z}) - ℓ(x; θ) ≈ + score(z, x) / N

(Koh & Liang's ``I_up,loss`` has the opposite sign: ``Δℓ ≈ -I_up,loss / N``). The scale ratio (least-squares slope
of actual on predicted changes) is 1 for scores with the sign *and* scale of influence functions; methods on another
scale (TracIn, TRAK, representer points) are judged by the correlations only. In the LDS the output must *increase*
with proponents: minus the test loss, or the margin of the test label (Park et al.), both rank subsets alike for a
cross-entropy loss.

The user's training procedure has the signature ``train(inputs, labels, *, seed, initial_weights=None) -> model``:
``initial_weights`` (a ``model.get_weights()`` list) asks for a warm start. For faithful numbers it must train to
convergence: a full-batch second-order or L-BFGS fit for convex models, warm-started full-batch training with a
gradient-norm tolerance for networks. Every retraining is compared with a *reference* retraining on the full training
set by the same procedure from the same start, so that an unfinished optimization does not count as an effect.

The evaluators that run these experiments for several scorers and seeds are in :mod:`influenciae.evaluation.evaluators`.

Example:
    >>> def scorer(model, x, y, x_test, y_test):
    ...     calculator = FirstOrderInfluenceCalculator(InfluenceModel(model, loss_function=loss), from_numpy(x, y))
    ...     return calculator.influence_matrix(from_numpy(x_test, y_test), from_numpy(x, y))
    >>> evaluator = LeaveOneOutEvaluator(x, y, x_test, y_test, train, {"exact": scorer}, test_loss)
    >>> print(evaluator.evaluate(seeds=(0, 1)).to_markdown())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "LeaveOneOutResult",
    "LinearDatamodelingResult",
    "datamodeling_correlations",
    "leave_one_out",
    "linear_datamodeling_score",
    "pearson_correlation",
    "random_subsets",
    "retrain_on_subsets",
    "scale_ratio",
    "spearman_correlation",
]

TrainProcedure = Callable[..., Any]
"""``train(inputs, labels, *, seed, initial_weights=None) -> model``."""
PairwiseScorer = Callable[[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray], Any]
"""``(model, train_inputs, train_labels, test_inputs, test_labels) -> scores [N_test, N_train]``."""
ExampleFunction = Callable[[Any, np.ndarray, np.ndarray], Any]
"""``(model, inputs, labels) -> values [N]``: per-example test losses, or the output the LDS explains."""

SELECTIONS = ("random", "largest", "top", "bottom")
TARGETS = ("per_test", "mean")
RANDOM_SEED_OFFSET = 10_000  # the "random" baseline's scores never share a stream with the subsets or removals

_Item = TypeVar("_Item")


# ---------------------------------------------------------------------------------------------------- metrics


def pearson_correlation(first: Any, second: Any) -> float:
    """Pearson correlation of two arrays of the same size (flattened); ``nan`` when one of them is constant."""
    first, second = _paired(first, second)
    first, second = first - first.mean(), second - second.mean()
    denominator = np.sqrt((first * first).sum() * (second * second).sum())
    return float((first * second).sum() / denominator) if denominator > 0 else float("nan")


def spearman_correlation(first: Any, second: Any) -> float:
    """Spearman rank correlation (ties get their average rank); ``nan`` when one of the arrays is constant."""
    first, second = _paired(first, second)
    return pearson_correlation(rankdata(first), rankdata(second))


def scale_ratio(predicted: Any, actual: Any) -> float:
    """Least-squares slope through the origin of ``actual`` on ``predicted``: ``⟨p, a⟩ / ⟨p, p⟩``.

    1 when the predictions have the sign and scale of the actual changes, ``0.5`` when they are twice too large,
    negative when their sign is wrong; ``nan`` when every prediction is 0.
    """
    predicted, actual = _paired(predicted, actual)
    denominator = float((predicted * predicted).sum())
    return float((predicted * actual).sum() / denominator) if denominator > 0 else float("nan")


def _paired(first: Any, second: Any) -> tuple[np.ndarray, np.ndarray]:
    first = np.asarray(first, dtype=np.float64).reshape(-1)
    second = np.asarray(second, dtype=np.float64).reshape(-1)
    if first.shape != second.shape:
        raise ValueError(f"Both arrays must have the same number of values, got {first.size} and {second.size}.")
    if first.size < 2:
        raise ValueError(f"A correlation needs at least 2 pairs of values, got {first.size}.")
    return first, second


def datamodeling_correlations(scores: Any, masks: Any, outputs: Any) -> np.ndarray:
    """Per test example, the Spearman correlation over subsets between actual and additively predicted outputs.

    Args:
        scores: Attribution scores ``[N_test, N_train]`` (positive: the training example raises the output).
        masks: Which training examples each subset keeps, boolean ``[K, N_train]``.
        outputs: The actual outputs of the models retrained on each subset ``[K, N_test]``.

    Returns:
        ``[N_test]`` correlations; ``nan`` for a test example whose actual or predicted outputs are constant.
    """
    scores = _matrix(scores, "scores")
    masks = np.asarray(masks)
    outputs = _matrix(outputs, "outputs")
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(f"masks must be a boolean array [num_subsets, N_train], got {masks.dtype} {masks.shape}.")
    if masks.shape[1] != scores.shape[1]:
        raise ValueError(f"masks cover {masks.shape[1]} training examples but scores have {scores.shape[1]} columns.")
    if outputs.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"outputs must be [num_subsets, N_test] = {(masks.shape[0], scores.shape[0])}, got {outputs.shape}."
        )
    if masks.shape[0] < 3:
        raise ValueError(f"The LDS needs at least 3 subsets to rank, got {masks.shape[0]}.")
    predicted = masks.astype(np.float64) @ scores.T  # [K, N_test]
    predicted_ranks = rankdata(predicted, axis=0)
    actual_ranks = rankdata(outputs, axis=0)
    predicted_ranks -= predicted_ranks.mean(axis=0)
    actual_ranks -= actual_ranks.mean(axis=0)
    numerator = (predicted_ranks * actual_ranks).sum(axis=0)
    denominator = np.sqrt((predicted_ranks**2).sum(axis=0) * (actual_ranks**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def linear_datamodeling_score(scores: Any, masks: Any, outputs: Any) -> float:
    """The LDS (Park et al., 2023): :func:`datamodeling_correlations` averaged over test examples (``nan`` skipped).

    Args:
        scores: Attribution scores ``[N_test, N_train]``.
        masks: Boolean ``[K, N_train]``: the training examples each subset keeps.
        outputs: Actual outputs ``[K, N_test]`` of the models retrained on the subsets.

    Returns:
        The mean Spearman correlation, in ``[-1, 1]`` (``nan`` if no test example can be ranked).

    Example:
        >>> masks = random_subsets(len(x), 32, 0.5, seed=0)
        >>> outputs = retrain_on_subsets(train, x, y, x_test, y_test, minus_loss, masks)
        >>> linear_datamodeling_score(scores, masks, outputs)
    """
    correlations = datamodeling_correlations(scores, masks, outputs)
    return float(np.nanmean(correlations)) if np.any(np.isfinite(correlations)) else float("nan")


def _matrix(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values.")
    return array


# ---------------------------------------------------------------------------------------------------- retraining


def random_subsets(num_examples: int, num_subsets: int, fraction: float = 0.5, *, seed: int = 0) -> np.ndarray:
    """``num_subsets`` seeded random subsets, each keeping ``round(fraction · num_examples)`` examples.

    Returns:
        Boolean masks ``[num_subsets, num_examples]``.
    """
    _check_positive_int(num_examples, "num_examples")
    _check_positive_int(num_subsets, "num_subsets")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
    size = int(round(fraction * num_examples))
    if not 0 < size < num_examples:
        raise ValueError(
            f"A fraction of {fraction} of {num_examples} examples keeps {size}: choose a fraction that keeps at least "
            "one example and drops at least one."
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, num_examples), dtype=bool)
    for row in masks:
        row[rng.choice(num_examples, size=size, replace=False)] = True
    return masks


def leave_one_out(
    train_procedure: TrainProcedure,
    inputs: Any,
    labels: Any,
    test_inputs: Any,
    test_labels: Any,
    test_loss: ExampleFunction,
    indices: Any,
    *,
    seed: int = 0,
    initial_weights: list[Any] | None = None,
    reference_loss: Any | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Retrain without each chosen training example and measure the change of every test loss.

    Args:
        train_procedure: ``train(inputs, labels, *, seed, initial_weights=None) -> model``, to convergence.
        inputs: Training inputs ``[N, ...]``.
        labels: Training labels ``[N, ...]``.
        test_inputs: Test inputs ``[N_test, ...]``.
        test_labels: Test labels ``[N_test, ...]``.
        test_loss: ``(model, inputs, labels) -> losses [N_test]``.
        indices: The ``m`` training examples to remove, one at a time ``[m]``.
        seed: Seed given to every retraining.
        initial_weights: Warm start of every retraining (``model.get_weights()`` of the trained model), or None.
        reference_loss: Test losses ``[N_test]`` the changes are measured from. None: those of a model retrained by
            the same procedure on the full training set, from the same start.
        show_progress: A progress bar over the retrainings.

    Returns:
        ``[m, N_test]``: ``ℓ(x_j; θ_{-z_i}) - ℓ(x_j; θ_reference)`` for removal ``i`` and test example ``j``.
    """
    inputs, labels = _examples(inputs, labels, "inputs", "labels")
    test_inputs, test_labels = _examples(test_inputs, test_labels, "test_inputs", "test_labels")
    _check_callable(train_procedure, "train_procedure")
    _check_callable(test_loss, "test_loss")
    indices = np.asarray(indices).reshape(-1)
    if indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty array of integers, got {indices!r}.")
    if indices.min() < 0 or indices.max() >= len(inputs):
        raise ValueError(f"indices must lie in [0, {len(inputs)}), got range [{indices.min()}, {indices.max()}].")

    def losses(model: Any) -> np.ndarray:
        return _per_example(test_loss(model, test_inputs, test_labels), len(test_inputs), "test_loss")

    if reference_loss is None:
        reference = train_procedure(inputs, labels, seed=seed, initial_weights=initial_weights)
        reference_loss = losses(reference)
    reference_loss = _per_example(reference_loss, len(test_inputs), "reference_loss")
    changes = np.empty((indices.size, len(test_inputs)))
    everything = np.arange(len(inputs))
    for row, index in enumerate(_progress(indices, show_progress, "leave-one-out")):
        keep = everything != index
        model = train_procedure(inputs[keep], labels[keep], seed=seed, initial_weights=initial_weights)
        changes[row] = losses(model) - reference_loss
    return changes


def retrain_on_subsets(
    train_procedure: TrainProcedure,
    inputs: Any,
    labels: Any,
    test_inputs: Any,
    test_labels: Any,
    output_function: ExampleFunction,
    masks: Any,
    *,
    seed: int = 0,
    seeds_per_subset: int = 1,
    initial_weights: list[Any] | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Retrain on each subset and record the test outputs, averaged over ``seeds_per_subset`` trainings.

    Args:
        train_procedure: ``train(inputs, labels, *, seed, initial_weights=None) -> model``.
        inputs: Training inputs ``[N, ...]``.
        labels: Training labels ``[N, ...]``.
        test_inputs: Test inputs ``[N_test, ...]``.
        test_labels: Test labels ``[N_test, ...]``.
        output_function: ``(model, inputs, labels) -> outputs [N_test]``, e.g. minus the test loss.
        masks: Boolean ``[K, N]`` from :func:`random_subsets`.
        seed: Base seed; training ``r`` of subset ``k`` gets a seed derived from ``(seed, k, r)``.
        seeds_per_subset: Trainings per subset (their outputs are averaged, as in Park et al.).
        initial_weights: Warm start of every training, or None to train from scratch.
        show_progress: A progress bar over the subsets.

    Returns:
        ``[K, N_test]`` outputs.
    """
    inputs, labels = _examples(inputs, labels, "inputs", "labels")
    test_inputs, test_labels = _examples(test_inputs, test_labels, "test_inputs", "test_labels")
    _check_callable(train_procedure, "train_procedure")
    _check_callable(output_function, "output_function")
    _check_positive_int(seeds_per_subset, "seeds_per_subset")
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool or masks.shape[1] != len(inputs):
        raise ValueError(
            f"masks must be a boolean array [num_subsets, {len(inputs)}], got {masks.dtype} {masks.shape}."
        )
    outputs = np.zeros((masks.shape[0], len(test_inputs)))
    for subset, mask in enumerate(_progress(masks, show_progress, "subsets")):
        for repeat in range(seeds_per_subset):
            training_seed = int(np.random.SeedSequence([seed, subset, repeat]).generate_state(1)[0] >> 1)
            model = train_procedure(inputs[mask], labels[mask], seed=training_seed, initial_weights=initial_weights)
            outputs[subset] += _per_example(
                output_function(model, test_inputs, test_labels), len(test_inputs), "output_function"
            )
    return outputs / seeds_per_subset


# ---------------------------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True, eq=False)
class LeaveOneOutResult:
    """Predicted against actual leave-one-out changes of the test loss, for one scorer and one trained model.

    Attributes:
        pearson: Pearson correlation of predicted and actual changes.
        spearman: Spearman correlation of predicted and actual changes.
        scale_ratio: Least-squares slope of actual on predicted changes (1: right sign and scale).
        indices: The removed training examples ``[m]``.
        predicted: Predicted changes ``score / N``: ``[m, N_test]`` (target ``"per_test"``) or ``[m]`` (``"mean"``).
        actual: Actual changes, same shape.
    """

    METRICS: ClassVar[tuple[str, ...]] = ("pearson", "spearman", "scale_ratio")

    pearson: float
    spearman: float
    scale_ratio: float
    indices: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray

    @classmethod
    def from_changes(cls, indices: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> LeaveOneOutResult:
        """The metrics of predicted and actual changes of the same shape."""
        return cls(
            pearson=pearson_correlation(predicted, actual),
            spearman=spearman_correlation(predicted, actual),
            scale_ratio=scale_ratio(predicted, actual),
            indices=indices,
            predicted=predicted,
            actual=actual,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class LinearDatamodelingResult:
    """The LDS of one scorer on one trained model.

    Attributes:
        lds: Mean over test examples of the Spearman correlation over subsets.
        per_example: That correlation per test example ``[N_test]`` (``nan`` where undefined).
    """

    METRICS: ClassVar[tuple[str, ...]] = ("lds",)

    lds: float
    per_example: np.ndarray


# ---------------------------------------------------------------------------------------------------- validation


def _examples(inputs: Any, labels: Any, inputs_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    if inputs.ndim == 0 or labels.ndim == 0:
        raise ValueError(f"{inputs_name} and {labels_name} must be arrays with one row per example.")
    if len(inputs) != len(labels):
        raise ValueError(f"{inputs_name} and {labels_name} differ in length: {len(inputs)} vs {len(labels)}.")
    if len(inputs) == 0:
        raise ValueError(f"{inputs_name} is empty.")
    return inputs, labels


def _per_example(values: Any, size: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size != size:
        raise ValueError(f"{name} returned {array.size} values for {size} test examples: return one per example.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} returned non-finite values.")
    return array


def _check_callable(value: Any, name: str) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}.")


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _progress(iterable: Iterable[_Item], show: bool, description: str) -> Iterable[_Item]:
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description)
