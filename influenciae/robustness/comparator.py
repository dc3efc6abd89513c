"""Compare a classifier's accuracy, loss and prediction flips under several attacks and perturbations."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from influenciae._backend import tf
from influenciae.model.classifier import ModelFront, model_front
from influenciae.robustness._common import is_dataset, iterate, known_cardinality

__all__ = ["AttackComparator", "ORIGINAL"]

ORIGINAL = "Original"
"""The name under which :meth:`AttackComparator.evaluate` reports the unperturbed inputs."""

MetricFunction = Callable[[tf.Tensor, tf.Tensor], Any]  # (outputs [b, C], targets [b]) -> [b] or {name: [b]}

# For the default metrics, the per-example worst case over draws: the smallest accuracy, the largest loss or flip.
_WORST = {"accuracy": np.minimum, "loss": np.maximum, "flip_rate": np.maximum}


@dataclass
class _Perturbation:
    function: Any
    name: str
    num_attempts: int
    apply_before_preproc: bool
    attack_kwargs: dict[str, Any]
    pass_targets: bool


@dataclass
class _Totals:
    """Running sums over examples, per metric: one sum per draw, and the sum of the per-example worst case."""

    count: int = 0
    per_draw: dict[str, np.ndarray] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)


class AttackComparator:
    """Metrics of a classifier on clean inputs and under each added attack or perturbation.

    Each perturbation runs ``num_attempts`` times on every batch (a "draw"; useful for random perturbations). For
    every metric the report gives, over the whole data:

    * ``mean``: the metric averaged over examples and draws,
    * ``min`` / ``max``: the smallest / largest over draws of the metric averaged over examples,
    * ``worst`` (default metrics only): the per-example worst case over draws, averaged over examples: accuracy
      counts an example only if *every* draw leaves it correct, loss takes each example's largest loss, and the flip
      rate counts an example flipped by *any* draw.

    The default metrics, per example: ``accuracy`` (predicted class = target; argmax, or for one output column
    logit ``> 0`` / sigmoid probability ``> 0.5``), ``loss`` (the attacks' loss: the given ``loss_function``, the
    InfluenceModel's or compiled loss, or the cross-entropy inferred from the last activation; left out when none
    can be inferred) and ``flip_rate`` (predicted class differs from the prediction on the clean input). Examples
    count equally (sample weights are not used).

    Args:
        model: A Keras classifier, an :class:`~influenciae.InfluenceModel` or a callable ``inputs -> [B, C]``.
        metric: ``None`` for the default metrics, or ``(outputs [b, C], targets [b]) -> [b]`` values (reported as
            ``"metric"``) or a dict ``{name: [b] values}``; scalars count as the value of every example of the batch.
        preproc_fn: Applied to the inputs before the model (see ``apply_before_preproc`` in :meth:`add_attack`).
        loss_function: Loss for the default ``loss`` metric (see :class:`~influenciae.robustness.FGSM`).

    Example:
        >>> comparator = AttackComparator(model)
        >>> comparator.add_attack(FGSM(model), "FGSM 0.1", attack_kwargs={"epsilon": 0.1})
        >>> comparator.add_attack(lambda x: x + 0.1 * tf.random.normal(tf.shape(x), dtype=x.dtype), "noise", 10)
        >>> comparator.add_attack(tf.image.flip_left_right, "flip")
        >>> results = comparator.evaluate(test_ds, show_progress=True)
        >>> results["noise"]["accuracy"]["worst"]  # fraction correct under all 10 noise draws
    """

    def __init__(
        self,
        model: Any,
        metric: MetricFunction | None = None,
        preproc_fn: Callable[[Any], Any] | None = None,
        loss_function: Any | None = None,
    ) -> None:
        self.front: ModelFront = model_front(model, loss_function)
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be a function (outputs, targets) -> values, got {type(metric).__name__}.")
        if preproc_fn is not None and not callable(preproc_fn):
            raise TypeError(f"preproc_fn must be a function, got {type(preproc_fn).__name__}.")
        self.metric = metric
        self.preproc_fn = preproc_fn
        self.attacks: dict[str, _Perturbation] = {}
        self.results: dict[str, dict[str, dict[str, float]]] = {}

    def add_attack(
        self,
        attack: Any,
        name: str | None = None,
        num_attempts: int = 1,
        apply_before_preproc: bool = True,
        attack_kwargs: dict[str, Any] | None = None,
        *,
        pass_targets: bool = False,
    ) -> None:
        """Register a perturbation to evaluate.

        Args:
            attack: An attack with ``perturb(inputs, targets, **attack_kwargs)`` (:class:`FGSM`, :class:`PGD`; it
                gets the batch's targets), or a function ``attack(inputs, **attack_kwargs) -> perturbed inputs``
                such as ``tf.image.flip_left_right`` or a random noise.
            name: Unique key of the results; ``None``: the attack's class or function name.
            num_attempts: Draws per batch (``> 1`` only makes sense for random perturbations).
            apply_before_preproc: With a ``preproc_fn``: perturb the raw inputs and feed ``preproc_fn(perturbed)``
                (default), or perturb ``preproc_fn(inputs)`` and feed it directly (``False``).
            attack_kwargs: Keyword arguments of every call, e.g. ``{"epsilon": 0.1}`` for FGSM.
            pass_targets: Call a function as ``attack(inputs, targets, **attack_kwargs)``.

        Raises:
            ValueError: If the name is taken or ``num_attempts`` is not a positive integer.
        """
        if not (hasattr(attack, "perturb") or callable(attack)):
            raise TypeError(f"attack must be an attack (with .perturb) or a function, got {type(attack).__name__}.")
        if name is None:
            name = getattr(attack, "__name__", None) or type(attack).__name__
        if name in self.attacks or name == ORIGINAL:
            raise ValueError(f"An attack named {name!r} is already registered (or reserved); pick another name.")
        if isinstance(num_attempts, bool) or not isinstance(num_attempts, (int, np.integer)) or num_attempts <= 0:
            raise ValueError(f"num_attempts must be a positive integer, got {num_attempts!r}.")
        self.attacks[name] = _Perturbation(
            attack, name, int(num_attempts), bool(apply_before_preproc), dict(attack_kwargs or {}), pass_targets
        )

    def evaluate(
        self, inputs: Any, targets: Any | None = None, *, show_progress: bool = False
    ) -> dict[str, dict[str, dict[str, float]]]:
        """Run every perturbation on every batch and report the metrics.

        Args:
            inputs: Tensor ``[B, ...]`` (or nested structure), or a ``tf.data.Dataset`` of
                ``(inputs, targets[, sample_weight])`` batches (then ``targets=None``).
            targets: Labels ``[B]``; ``None`` with a dataset.
            show_progress: A tqdm bar over (batch, perturbation) runs.

        Returns:
            ``{name: {metric: {"mean", "min", "max"[, "worst"]: float}}}`` with ``"Original"`` first (the clean
            inputs), then the perturbations in the order they were added. Also kept in :attr:`results` for
            :meth:`summary`.
        """
        totals = {name: _Totals() for name in (ORIGINAL, *self.attacks)}
        batches = known_cardinality(inputs) if is_dataset(inputs) else 1
        total = None if batches is None else batches * (1 + len(self.attacks))
        bar = tqdm(total=total, desc="AttackComparator", unit="run", dynamic_ncols=True, disable=not show_progress)
        with bar:
            for batch in iterate(inputs, targets, type(self).__name__):
                clean_inputs = self._model_inputs(batch.inputs)
                clean_outputs = self.front.forward(clean_inputs)
                clean_labels = self.front.predicted_labels(clean_outputs)
                _accumulate(totals[ORIGINAL], [self._metrics(clean_outputs, batch.targets, clean_labels)])
                bar.update(1)
                for perturbation in self.attacks.values():
                    draws = []
                    for _ in range(perturbation.num_attempts):
                        outputs = self.front.forward(self._perturbed_model_inputs(perturbation, batch))
                        draws.append(self._metrics(outputs, batch.targets, clean_labels))
                    _accumulate(totals[perturbation.name], draws)
                    bar.update(1)
        if totals[ORIGINAL].count == 0:
            raise ValueError("There are no examples to evaluate (empty dataset).")
        self.results = {name: _report(total_) for name, total_ in totals.items()}
        return self.results

    def summary(self) -> list[dict[str, Any]]:
        """The last :meth:`evaluate` as table rows: one dict per (perturbation, metric).

        Returns:
            ``[{"perturbation", "metric", "attempts", "mean", "min", "max", "worst"}, ...]`` (``worst`` is NaN for
            a custom metric).
        """
        if not self.results:
            raise ValueError("Nothing evaluated yet: call evaluate(inputs, targets) first.")
        rows = []
        for name, metrics in self.results.items():
            attempts = 1 if name == ORIGINAL else self.attacks[name].num_attempts
            for metric, values in metrics.items():
                rows.append(
                    {
                        "perturbation": name,
                        "metric": metric,
                        "attempts": attempts,
                        **{key: values.get(key, math.nan) for key in ("mean", "min", "max", "worst")},
                    }
                )
        return rows

    def to_dataframe(self) -> Any:
        """:meth:`summary` as a ``pandas.DataFrame`` (needs pandas, which influenciae does not install)."""
        try:
            import pandas
        except ImportError as error:
            raise ImportError("to_dataframe needs pandas: `pip install pandas`, or use summary() rows.") from error
        return pandas.DataFrame(self.summary())

    # ------------------------------------------------------------------ internals

    def _model_inputs(self, inputs: Any) -> Any:
        return inputs if self.preproc_fn is None else self.preproc_fn(inputs)

    def _perturbed_model_inputs(self, perturbation: _Perturbation, batch: Any) -> Any:
        before = self.preproc_fn is None or perturbation.apply_before_preproc
        source = batch.inputs if before else self._model_inputs(batch.inputs)
        function, kwargs = perturbation.function, perturbation.attack_kwargs
        if hasattr(function, "perturb"):
            perturbed = function.perturb(source, batch.targets, **kwargs)
        elif perturbation.pass_targets:
            perturbed = function(source, batch.targets, **kwargs)
        else:
            perturbed = function(source, **kwargs)
        perturbed = tf.nest.map_structure(tf.convert_to_tensor, perturbed)
        return self._model_inputs(perturbed) if (before and self.preproc_fn is not None) else perturbed

    def _metrics(self, outputs: tf.Tensor, targets: tf.Tensor, clean_labels: tf.Tensor) -> dict[str, np.ndarray]:
        size = int(outputs.shape[0])
        if self.metric is not None:
            values = self.metric(outputs, targets)
            named = values if isinstance(values, dict) else {"metric": values}
            return {name: _per_example(value, size, name) for name, value in named.items()}
        labels = self.front.predicted_labels(outputs)
        if targets.shape.rank == 2 and targets.shape[-1] == outputs.shape[-1] and outputs.shape[-1] > 1:
            truth = tf.argmax(targets, axis=-1, output_type=tf.int64)  # one-hot targets
        else:
            truth = tf.cast(tf.reshape(targets, [-1]), tf.int64)
        metrics = {"accuracy": (labels == truth).numpy().astype(np.float64)}
        if self.front.loss_function is not None:
            metrics["loss"] = _per_example(self.front.loss_function(targets, outputs), size, "loss")
        metrics["flip_rate"] = (labels != clean_labels).numpy().astype(np.float64)
        return metrics


def _per_example(values: Any, size: int, name: str) -> np.ndarray:
    array = np.asarray(values.numpy() if hasattr(values, "numpy") else values, dtype=np.float64)
    if array.ndim == 0:
        return np.full(size, float(array))
    array = array.reshape(-1)
    if array.shape[0] != size:
        raise ValueError(f"Metric {name!r} returned {array.shape[0]} values for a batch of {size} examples.")
    return array


def _accumulate(totals: _Totals, draws: list[dict[str, np.ndarray]]) -> None:
    size = next(iter(draws[0].values())).shape[0]
    totals.count += size
    for name in draws[0]:
        stacked = np.stack([draw[name] for draw in draws])  # [draws, b]
        sums = stacked.sum(axis=1)
        totals.per_draw[name] = totals.per_draw.get(name, np.zeros_like(sums)) + sums
        if name in _WORST:
            worst = _WORST[name].reduce(stacked, axis=0)
            totals.worst[name] = totals.worst.get(name, 0.0) + float(worst.sum())


def _report(totals: _Totals) -> dict[str, dict[str, float]]:
    report = {}
    for name, sums in totals.per_draw.items():
        means = sums / totals.count
        entry = {"mean": float(means.mean()), "min": float(means.min()), "max": float(means.max())}
        if name in totals.worst:
            entry["worst"] = totals.worst[name] / totals.count
        report[name] = entry
    return report
