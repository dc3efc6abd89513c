"""The smallest perturbation that changes each prediction: linear or binary search over one perturbation parameter.

Same idea as Captum's ``MinParamPerturbation``, but **per example**: every example gets its own minimal value, and
examples that are already fooled leave the search while the others go on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.model.classifier import ModelFront, model_front
from influenciae.robustness._common import (
    batch_size,
    check_positive_int,
    is_dataset,
    iterate,
    known_cardinality,
    progress,
)

__all__ = ["MinParamPerturbation", "MinParamResult"]

CorrectFunction = Callable[[tf.Tensor, tf.Tensor], Any]  # (outputs [b, C], labels [b]) -> still correct [b] bool

_MODES = ("linear", "binary")


@dataclass(frozen=True)
class MinParamResult:
    """Per-example minimal perturbation parameters.

    Attributes:
        values: ``[N]`` float64: the smallest grid value of the parameter that fools the model on each example,
            ``+inf`` where no value in ``[arg_min, arg_max]`` does.
        perturbed_inputs: ``[N, ...]`` numpy arrays (structure of the inputs): each example perturbed with its
            minimal value; the unperturbed input where ``values`` is ``inf``.
        found: ``[N]`` bool: ``values < inf``.
    """

    values: np.ndarray
    perturbed_inputs: Any
    found: np.ndarray


class MinParamPerturbation:
    """Per example, the smallest value ``p`` of a perturbation parameter for which the model is fooled.

    ``p`` runs over the grid ``arg_min, arg_min + arg_step, ...`` up to ``arg_max`` (included when it is on the grid).
    "Fooled" means ``correct_fn(outputs, labels)`` is ``False``; by default, the predicted class (argmax; one output
    column: logit ``> 0``, or probability ``> 0.5`` after a sigmoid) differs from ``labels``: the targets when given,
    else the model's own predictions on the clean inputs ("the prediction changes"). With ``num_attempts > 1`` (random
    perturbations) an example counts as fooled at ``p`` when any of the attempts fools it.

    * ``mode="linear"``: every grid value in increasing order until each example is fooled: the first grid value
      that fools it, exactly.
    * ``mode="binary"``: bisection on the grid, per example, from a first check at ``arg_max``: ``1 + ⌈log₂ G⌉``
      evaluations for ``G`` grid values. It assumes monotonicity (fooled at ``p`` ⇒ fooled at every larger ``p``),
      under which it returns the same value as the linear search.

    In both modes the true threshold ``p*`` (the infimum of fooling values) satisfies ``value - arg_step < p* ≤
    value`` when the problem is monotone. Examples fooled at ``arg_min`` (already misclassified, for ``arg_min = 0``)
    get ``arg_min``; examples never fooled get ``+inf``.

    Args:
        model: The classifier (Keras model, :class:`~influenciae.InfluenceModel` or callable ``inputs -> [B, C]``).
        perturb: What ``p`` parametrizes: an attack with a ``perturb(inputs, targets, epsilon, **kwargs)`` method
            (:class:`~influenciae.robustness.FGSM`, :class:`~influenciae.robustness.PGD`; ``p`` is ε, one value per
            example, and the labels are its targets), or any function ``perturb(inputs, p, **attack_kwargs)``
            (e.g. Gaussian noise of scale ``p``, ``tf.image.adjust_brightness``), called with a Python float on the
            examples that share that value.
        arg_min: Smallest value searched.
        arg_max: Largest value searched (must be ``> arg_min``).
        arg_step: Grid spacing, the search's resolution; ``None``: ``(arg_max - arg_min) / 100`` for a linear search,
            ``/ 1024`` for a binary one.
        mode: ``"linear"`` or ``"binary"``.
        correct_fn: ``(outputs [b, C], labels [b]) -> [b] bool``, ``True`` where the model is still right (e.g. a
            metric above a threshold). ``None``: the predicted class equals the label.
        num_attempts: Draws per value, for random perturbations.
        preproc_fn: Applied to the inputs before the model.
        apply_before_preproc: Perturb the raw inputs and feed ``preproc_fn(perturbed)`` to the model (a gradient
            attack then differentiates its own model, so build it on a model that includes the preprocessing);
            ``False`` (default): perturb ``preproc_fn(inputs)`` and feed the result to the model directly.
        arg_name: Pass ``p`` to a function as this keyword instead of the second positional argument.
        attack_kwargs: Further keyword arguments of every ``perturb`` call (e.g. ``{"num_steps": 10, "norm": "l2"}``).
        values_per_call: Linear search with an attack: this many grid values are tried in one call, on the batch
            repeated that many times (Captum's ``perturbations_per_eval``; memory grows with it). Functions always
            get one value per call.

    Example:
        >>> search = MinParamPerturbation(model, FGSM(model), arg_min=0.0, arg_max=1.0, arg_step=0.01, mode="binary")
        >>> result = search.evaluate(x, y)
        >>> result.values  # [N] smallest ε that flips each example (inf: none up to 1.0)
    """

    def __init__(
        self,
        model: Any,
        perturb: Any,
        arg_min: float,
        arg_max: float,
        arg_step: float | None = None,
        mode: str = "linear",
        correct_fn: CorrectFunction | None = None,
        num_attempts: int = 1,
        preproc_fn: Callable[[Any], Any] | None = None,
        *,
        apply_before_preproc: bool = False,
        arg_name: str | None = None,
        attack_kwargs: dict[str, Any] | None = None,
        values_per_call: int = 8,
    ) -> None:
        self.front: ModelFront = model_front(model)
        if not (hasattr(perturb, "perturb") or callable(perturb)):
            raise TypeError(f"perturb must be an attack (with .perturb) or a function, got {type(perturb).__name__}.")
        if not isinstance(mode, str) or mode.lower() not in _MODES:
            raise ValueError(f"mode must be 'linear' or 'binary', got {mode!r}.")
        for name, value in (("arg_min", arg_min), ("arg_max", arg_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number, got {value!r}.")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}.")
        if not arg_max > arg_min:
            raise ValueError(f"arg_max ({arg_max}) must be larger than arg_min ({arg_min}).")
        self.mode = mode.lower()
        if arg_step is None:
            arg_step = (arg_max - arg_min) / (100 if self.mode == "linear" else 1024)
        if isinstance(arg_step, bool) or not isinstance(arg_step, (int, float, np.integer, np.floating)):
            raise TypeError(f"arg_step must be a number, got {arg_step!r}.")
        if not (math.isfinite(arg_step) and arg_step > 0):
            raise ValueError(f"arg_step must be a positive number, got {arg_step!r}.")
        if isinstance(num_attempts, bool) or not isinstance(num_attempts, (int, np.integer)) or num_attempts <= 0:
            raise ValueError(f"num_attempts must be a positive integer, got {num_attempts!r}.")
        if (
            isinstance(values_per_call, bool)
            or not isinstance(values_per_call, (int, np.integer))
            or values_per_call <= 0
        ):
            raise ValueError(f"values_per_call must be a positive integer, got {values_per_call!r}.")
        self.values_per_call = int(values_per_call)
        self.perturb = perturb
        self.arg_min, self.arg_max, self.arg_step = float(arg_min), float(arg_max), float(arg_step)
        count = int(math.floor((self.arg_max - self.arg_min) / self.arg_step + 1e-9)) + 1
        self.grid = self.arg_min + self.arg_step * np.arange(count, dtype=np.float64)
        self.correct_fn = correct_fn
        self.num_attempts = check_positive_int(num_attempts, "num_attempts")
        self.preproc_fn = preproc_fn
        self.apply_before_preproc = bool(apply_before_preproc)
        self.arg_name = arg_name
        self.attack_kwargs = dict(attack_kwargs or {})

    def __repr__(self) -> str:
        perturb = getattr(self.perturb, "__name__", None) or type(self.perturb).__name__
        return (
            f"MinParamPerturbation(perturb={perturb}, arg_min={self.arg_min}, arg_max={self.arg_max}, "
            f"arg_step={self.arg_step}, mode={self.mode!r}, num_attempts={self.num_attempts}, "
            f"apply_before_preproc={self.apply_before_preproc}, arg_name={self.arg_name!r}, "
            f"attack_kwargs={self.attack_kwargs!r})"
        )

    def evaluate(self, inputs: Any, targets: Any | None = None, *, show_progress: bool = False) -> MinParamResult:
        """Search the minimal parameter of every example.

        Args:
            inputs: Tensor ``[B, ...]`` (or nested structure), or a ``tf.data.Dataset`` of
                ``(inputs, targets[, sample_weight])`` batches (then ``targets=None``; the dataset's targets are the
                labels).
            targets: Labels ``[B]`` the model must keep predicting; ``None``: the model's predictions on the clean
                inputs (for a dataset, pass a dataset of ``(inputs, labels)``).
            show_progress: A tqdm bar over the dataset's batches, or over the search steps for a tensor batch.

        Returns:
            A :class:`MinParamResult` (numpy arrays in example order).
        """
        if not is_dataset(inputs):
            batch = next(iterate(inputs, targets, type(self).__name__, targets_required=False))
            values, perturbed = self._search(batch.inputs, batch.targets, show_progress)
            return MinParamResult(values, tf.nest.map_structure(np.asarray, perturbed), np.isfinite(values))
        all_values, all_perturbed = [], []
        batches = iterate(inputs, targets, type(self).__name__)
        bar = progress(batches, show_progress, "MinParamPerturbation", known_cardinality(inputs))
        for batch in bar:
            values, perturbed = self._search(batch.inputs, batch.targets, False)
            all_values.append(values)
            all_perturbed.append(tf.nest.map_structure(np.asarray, perturbed))
        if not all_values:
            raise ValueError("The dataset is empty.")
        merged = tf.nest.map_structure(lambda *parts: np.concatenate(parts), *all_perturbed)
        values = np.concatenate(all_values)
        return MinParamResult(values, merged, np.isfinite(values))

    def __call__(self, inputs: Any, targets: Any | None = None) -> Any:
        """The inputs perturbed with each example's minimal value (unchanged where none fools the model).

        This makes a search usable wherever a function ``(inputs, labels) -> perturbed inputs`` is expected, e.g.
        ``SampleBoundaryCalculator(model, attack=search)``.
        """
        result = self.evaluate(inputs, targets)
        return tf.nest.map_structure(tf.convert_to_tensor, result.perturbed_inputs)

    # ------------------------------------------------------------------ the searches

    def _search(self, inputs: Any, targets: Any | None, show_progress: bool) -> tuple[np.ndarray, Any]:
        source = self.preproc_fn(inputs) if (self.preproc_fn is not None and not self.apply_before_preproc) else inputs
        if targets is None:
            labels = self.front.predicted_labels(self.front.forward(self._model_inputs(source)))
        else:
            labels = tf.convert_to_tensor(targets)
        size = batch_size(source)
        perturbed = tf.nest.map_structure(tf.identity, source)
        values = np.full(size, math.inf)
        if self.mode == "linear":
            width = self.values_per_call if hasattr(self.perturb, "perturb") else 1
            chunks = [self.grid[i : i + width] for i in range(0, len(self.grid), width)]
            for chunk in progress(chunks, show_progress, "MinParamPerturbation", len(chunks), unit="call"):
                rows = np.flatnonzero(~np.isfinite(values))
                if rows.size == 0:
                    break
                # every example of `rows` at every value of the chunk, in one call: [len(chunk) * rows.size]
                fooled, candidates = self._fooled(
                    source, labels, np.tile(rows, len(chunk)), np.repeat(chunk, rows.size)
                )
                fooled = fooled.reshape(len(chunk), rows.size)
                hit = fooled.any(axis=0)
                first = fooled.argmax(axis=0)[hit]
                values[rows[hit]] = chunk[first]
                perturbed = _scatter(perturbed, rows[hit], candidates, first * rows.size + np.flatnonzero(hit))
            return values, perturbed
        low = np.full(size, -1)
        high = np.full(size, len(self.grid) - 1)
        everyone = np.arange(size)
        fooled, candidates = self._fooled(source, labels, everyone, self.grid[high])
        perturbed = _scatter(perturbed, everyone[fooled], candidates, np.flatnonzero(fooled))
        reachable = fooled
        rounds = int(math.ceil(math.log2(len(self.grid)))) if len(self.grid) > 1 else 0
        for _ in progress(range(rounds), show_progress, "MinParamPerturbation", rounds, unit="round"):
            rows = np.flatnonzero(reachable & (high - low > 1))
            if rows.size == 0:
                break
            middle = (low[rows] + high[rows]) // 2
            fooled, candidates = self._fooled(source, labels, rows, self.grid[middle])
            high[rows[fooled]] = middle[fooled]
            low[rows[~fooled]] = middle[~fooled]
            perturbed = _scatter(perturbed, rows[fooled], candidates, np.flatnonzero(fooled))
        values[reachable] = self.grid[high[reachable]]
        return values, perturbed

    def _fooled(self, source: Any, labels: tf.Tensor, rows: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, Any]:
        """Whether each of ``rows`` is fooled with its ``params`` (any attempt), and the fooling perturbed inputs."""
        subset = _gather(source, rows)
        subset_labels = tf.gather(labels, rows)
        fooled = np.zeros(rows.size, dtype=bool)
        kept = None
        for _ in range(self.num_attempts):
            attempt = self._apply(subset, subset_labels, params)
            outputs = self.front.forward(self._model_inputs(attempt))
            if self.correct_fn is None:
                correct = self.front.predicted_labels(outputs) == tf.cast(tf.reshape(subset_labels, [-1]), tf.int64)
            else:
                correct = self.correct_fn(outputs, subset_labels)
            correct = np.asarray(correct.numpy() if hasattr(correct, "numpy") else correct, dtype=bool).reshape(-1)
            if correct.shape[0] != rows.size:
                raise ValueError(f"correct_fn must return one boolean per example ({rows.size}), got {correct.shape}.")
            new = ~correct & ~fooled
            kept = attempt if kept is None else _where_rows(new, attempt, kept)
            fooled |= ~correct
            if fooled.all():
                break
        return fooled, kept

    def _model_inputs(self, perturbed: Any) -> Any:
        if self.preproc_fn is not None and self.apply_before_preproc:
            return self.preproc_fn(perturbed)
        return perturbed

    def _apply(self, inputs: Any, labels: tf.Tensor, params: np.ndarray) -> Any:
        if hasattr(self.perturb, "perturb"):  # an attack: one ε per example, in one call
            return self.perturb.perturb(inputs, labels, params, **self.attack_kwargs)
        result = None
        for value in np.unique(params):  # a function takes one value: call it once per distinct value
            rows = np.flatnonzero(params == value)
            part = _gather(inputs, rows)
            if self.arg_name is None:
                moved = self.perturb(part, float(value), **self.attack_kwargs)
            else:
                moved = self.perturb(part, **{self.arg_name: float(value)}, **self.attack_kwargs)
            moved = tf.nest.map_structure(tf.convert_to_tensor, moved)
            if rows.size == params.size:
                return moved
            if result is None:
                result = tf.nest.map_structure(tf.zeros_like, inputs)
            result = _scatter(result, rows, moved, np.arange(rows.size))
        return result


def _gather(tree: Any, rows: np.ndarray) -> Any:
    return tf.nest.map_structure(lambda leaf: tf.gather(leaf, rows), tree)


def _scatter(target: Any, rows: np.ndarray, source: Any, picked: np.ndarray) -> Any:
    """``target[rows] = source[picked]`` for every leaf."""
    if rows.size == 0:
        return target

    def one(leaf: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        return tf.tensor_scatter_nd_update(leaf, rows[:, None], tf.cast(tf.gather(values, picked), leaf.dtype))

    return tf.nest.map_structure(one, target, source)


def _where_rows(condition: np.ndarray, first: Any, second: Any) -> Any:
    def one(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        mask = tf.reshape(tf.constant(condition), [-1] + [1] * (a.shape.rank - 1))
        return tf.where(mask, a, b)

    return tf.nest.map_structure(one, first, second)
