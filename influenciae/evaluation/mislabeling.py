"""Mislabeled-sample detection: flip labels, train, score every training example, measure how many flips are found.

A calculator is good at finding wrong labels when the flipped examples rank at the top of its self-influence.
:class:`MislabelingDetectorEvaluator` runs that experiment over several seeds with any training procedure and any
scoring function, and reports the true ROC AUC, the area under the "fraction of flipped labels found vs fraction
inspected" curve (the original Influenciae metric) and the fraction found in the top 10 % and 20 %.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DetectionResult",
    "EvaluationReport",
    "MislabelingDetectorEvaluator",
    "detection_curve",
    "detection_metrics",
    "flip_labels",
    "load_tfds_arrays",
    "roc_auc",
]


def flip_labels(labels: Any, fraction: float, num_classes: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Give a seeded ``fraction`` of the examples a different, uniformly drawn wrong label.

    Args:
        labels: Integer labels ``[N]``.
        fraction: Fraction of examples to flip, in ``[0, 1]``.
        num_classes: Number of classes (labels are in ``[0, num_classes)``).
        seed: Seed of the choice of examples and of the wrong labels.

    Returns:
        ``(noisy_labels [N], flipped [N] bool)``.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 to flip labels, got {num_classes!r}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}].")
    rng = np.random.default_rng(seed)
    count = int(round(fraction * labels.size))
    chosen = rng.choice(labels.size, size=count, replace=False)
    noisy = labels.copy()
    offsets = rng.integers(1, num_classes, size=count)  # never 0: the new label always differs
    noisy[chosen] = (labels[chosen] + offsets) % num_classes
    flipped = np.zeros(labels.size, dtype=bool)
    flipped[chosen] = True
    return noisy, flipped


def roc_auc(scores: Any, positives: Any) -> float:
    """ROC AUC of ``scores`` for the boolean ``positives`` (rank-based, ties counted one half).

    Returns:
        The probability that a random positive scores above a random negative; ``nan`` without both classes.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if scores.shape != positives.shape:
        raise ValueError(f"scores and positives must have the same length, got {scores.shape} and {positives.shape}.")
    num_positive = int(positives.sum())
    num_negative = positives.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[positives].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def detection_curve(scores: Any, flipped: Any) -> np.ndarray:
    """Fraction of flipped labels found after inspecting the ``i`` highest-scoring examples, ``i = 0..N``.

    Returns:
        Array ``[N + 1]`` from 0 to 1 (ties are inspected in index order).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    flipped = np.asarray(flipped, dtype=bool).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(flipped[order])])
    return found / max(int(flipped.sum()), 1)


@dataclasses.dataclass(frozen=True)
class DetectionResult:
    """How well one scoring finds the flipped labels.

    Attributes:
        roc_auc: True ROC AUC of the scores for the flipped examples.
        curve_auc: Area under the detection curve (fraction found vs fraction inspected); 0.5 for random scores.
        found_at_10: Fraction of flipped labels among the top 10 % of scores.
        found_at_20: Fraction of flipped labels among the top 20 % of scores.
    """

    roc_auc: float
    curve_auc: float
    found_at_10: float
    found_at_20: float


def detection_metrics(scores: Any, flipped: Any) -> DetectionResult:
    """Every detection metric for one scoring (higher score = more suspicious)."""
    curve = detection_curve(scores, flipped)
    size = curve.size - 1
    inspected = np.linspace(0.0, 1.0, size + 1)
    return DetectionResult(
        roc_auc=roc_auc(scores, flipped),
        curve_auc=float(np.trapezoid(curve, inspected)),
        found_at_10=float(curve[int(np.ceil(0.1 * size))]),
        found_at_20=float(curve[int(np.ceil(0.2 * size))]),
    )


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Detection metrics over several seeds, per scoring method.

    Attributes:
        per_seed: ``{method: [DetectionResult per seed]}``.
        seeds: The seeds used.
    """

    per_seed: dict[str, list[DetectionResult]]
    seeds: tuple[int, ...]

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """``{method: {metric: (mean, standard deviation)}}`` over seeds."""
        table: dict[str, dict[str, tuple[float, float]]] = {}
        for method, results in self.per_seed.items():
            table[method] = {}
            for field in dataclasses.fields(DetectionResult):
                values = np.array([getattr(result, field.name) for result in results])
                table[method][field.name] = (float(values.mean()), float(values.std()))
        return table

    def to_markdown(self) -> str:
        """A table: one row per method, ``mean ± std`` per metric."""
        fields = [field.name for field in dataclasses.fields(DetectionResult)]
        lines = ["| Method | " + " | ".join(fields) + " |", "|---" * (len(fields) + 1) + "|"]
        for method, metrics in self.summary().items():
            cells = [f"{mean:.3f} ± {std:.3f}" for mean, std in (metrics[name] for name in fields)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


TrainProcedure = Callable[[np.ndarray, np.ndarray, int], Any]
ScoreFunction = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]


class MislabelingDetectorEvaluator:
    """Flip labels, train, score every training example and measure how many flips each scoring finds.

    Args:
        inputs: Training inputs ``[N, ...]``.
        labels: Clean integer labels ``[N]``.
        num_classes: Number of classes.
        train_procedure: ``(inputs, noisy_labels, seed) -> model``: the user's own training.
        scorers: ``{name: (model, inputs, noisy_labels) -> scores [N]}``; higher = more suspicious. Self-influence
            of any calculator fits: ``lambda m, x, y: calculator_for(m).self_influence(from_numpy(x, y))``.
        flip_fraction: Fraction of labels flipped per seed.
        add_baselines: Also score with ``"random"`` (a seeded uniform draw); the training loss is a scorer the
            caller can add, since only the caller knows the model's loss.

    Example:
        >>> evaluator = MislabelingDetectorEvaluator(x, y, 10, train, {"self-influence": score})
        >>> print(evaluator.evaluate(seeds=(0, 1, 2)).to_markdown())
    """

    def __init__(
        self,
        inputs: Any,
        labels: Any,
        num_classes: int,
        train_procedure: TrainProcedure,
        scorers: dict[str, ScoreFunction],
        *,
        flip_fraction: float = 0.1,
        add_baselines: bool = True,
    ) -> None:
        self.inputs = np.asarray(inputs)
        self.labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"inputs and labels differ in length: {len(self.inputs)} vs {len(self.labels)}.")
        if not scorers:
            raise ValueError("Give at least one scorer: {name: (model, inputs, labels) -> scores}.")
        self.num_classes = num_classes
        self.train_procedure = train_procedure
        self.scorers = dict(scorers)
        self.flip_fraction = flip_fraction
        self.add_baselines = add_baselines

    def evaluate(self, seeds: Sequence[int] = (0, 1, 2)) -> EvaluationReport:
        """Run the experiment once per seed (new flips, new training) and collect every scorer's metrics."""
        per_seed: dict[str, list[DetectionResult]] = {name: [] for name in self.scorers}
        if self.add_baselines:
            per_seed["random"] = []
        for seed in seeds:
            noisy, flipped = flip_labels(self.labels, self.flip_fraction, self.num_classes, seed=seed)
            model = self.train_procedure(self.inputs, noisy, seed)
            for name, scorer in self.scorers.items():
                scores = np.asarray(scorer(model, self.inputs, noisy), dtype=np.float64).reshape(-1)
                if scores.shape != flipped.shape:
                    raise ValueError(f"Scorer {name!r} returned {scores.shape[0]} scores for {flipped.size} examples.")
                if not np.all(np.isfinite(scores)):
                    raise ValueError(f"Scorer {name!r} returned non-finite scores (seed {seed}).")
                per_seed[name].append(detection_metrics(scores, flipped))
            if self.add_baselines:
                random_scores = np.random.default_rng(10_000 + seed).random(flipped.size)
                per_seed["random"].append(detection_metrics(random_scores, flipped))
        return EvaluationReport(per_seed, tuple(seeds))


def load_tfds_arrays(
    name: str, split: str = "train", *, data_dir: str | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load an image-classification dataset from TensorFlow Datasets as ``(images float32 in [0, 1], labels)``.

    Real ``tfds.load``: it needs the dataset prepared in ``data_dir`` (or network access to download it). Tests use
    ``tfds.testing.mock_data``.

    Args:
        name: A tfds name with ``image`` and ``label`` features, e.g. ``"mnist"`` or ``"cifar10"``.
        split: The split.
        data_dir: Where the prepared dataset lives.
        limit: Keep only the first ``limit`` examples.

    Returns:
        ``(images [N, H, W, C] float32, labels [N] int64)``.
    """
    import tensorflow_datasets as tfds

    dataset = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True, shuffle_files=False)
    if limit is not None:
        dataset = dataset.take(limit)
    images, labels = [], []
    for image, label in tfds.as_numpy(dataset):
        images.append(image)
        labels.append(label)
    if not images:
        raise ValueError(f"tfds dataset {name!r} split {split!r} is empty.")
    stacked = np.stack(images).astype(np.float32)
    if np.issubdtype(np.stack(images).dtype, np.integer):
        stacked /= 255.0
    return stacked, np.asarray(labels, dtype=np.int64)
