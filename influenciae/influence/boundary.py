"""Boundary-based self-influence: how far an example, or the last layer's weights, must move to change a prediction.

Both calculators run DeepFool (Moosavi-Dezfooli et al., 2016), vectorized over the batch: at each step every
example still classified as its original class ``k`` linearizes the score differences ``f_l - f_k`` and moves to the
nearest linearized boundary. Examples close to the decision boundary are ambiguous, atypical or mislabeled, so a
**small distance means influential**: the self-influence score is ``-distance`` (``≤ 0``) and ``ORDER.DESCENDING``
lists the examples nearest to the boundary first.

These methods score training examples one at a time; there is no score between a training and a test example, so
only :meth:`~BoundaryCalculator.self_influence`, :meth:`~BoundaryCalculator.compute_influence_values`,
:meth:`~BoundaryCalculator.compute_top_k_from_training_dataset` and :meth:`~BoundaryCalculator.distance_to_boundary`
are available; the pairwise methods raise a ``ValueError`` saying so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import unpack_batch
from influenciae.influence.base import BaseInfluenceCalculator, Block
from influenciae.model import InfluenceModel
from influenciae.model.graph import DenseHead, as_influence_model
from influenciae.types import CACHE

__all__ = ["BoundaryCalculator", "DeepFool", "SampleBoundaryCalculator", "WeightsBoundaryCalculator"]

LogitsFunction = Callable[..., tf.Tensor]  # (points [b, D], *context [b, ...]) -> scores [b, C]


# ---------------------------------------------------------------------- DeepFool, batched


def _check_norm(norm: Any) -> float:
    if isinstance(norm, str) and norm.lower() in ("inf", "infinity"):
        return math.inf
    numeric = isinstance(norm, (int, float, np.integer, np.floating)) and not isinstance(norm, bool)
    if numeric and float(norm) in (1.0, 2.0, math.inf):
        return float(norm)
    raise ValueError(f"norm must be 1, 2 or numpy.inf, got {norm!r}.")


class DeepFool:
    """Multi-class DeepFool, vectorized over a batch of points (Moosavi-Dezfooli et al., 2016, Algorithm 2).

    For each point ``x`` with original class ``k = argmax f(x)`` and candidate classes ``l``: while ``k`` still
    wins by more than ``eps · max(1, |f_k|)`` and fewer than ``step_nbr`` steps were taken, with
    ``f'_l = f_l - f_k`` and ``w'_l = ∇f_l - ∇f_k`` at the current point, pick
    ``l̂ = argmin_l |f'_l| / ‖w'_l‖_q`` (``q`` the dual norm of ``p``) and step onto its linearized boundary:

    * ``p = 2``: ``r = |f'| / ‖w'‖₂² · w'``,
    * ``p = ∞``: ``r = |f'| / ‖w'‖₁ · sign(w')``,
    * ``p = 1``: ``r = |f'| / |w'_j| · sign(w'_j) e_j`` with ``j = argmax |w'_j|``.

    No overshoot is applied, so for an affine ``f`` the first step lands exactly on the boundary and the distance
    is exact. A single output column ``s`` is read as the logit of a binary classifier (scores ``[0, s]``, boundary
    ``s = 0``). Points that stop early (class changed or on the boundary) leave the batch, so later steps only
    differentiate the points still moving.

    Args:
        logits_fn: ``(points [b, D], *context) -> scores [b, C]``, each row depending on its own point only.
        step_nbr: Maximum number of steps.
        norm: ``p``: 1, 2 or ``math.inf``.
        eps: Relative margin under which a point counts as on the boundary.
        max_candidate_classes: Only the classes with the highest initial scores compete (the paper uses 10 on
            ImageNet); ``None`` for all. Each step differentiates that many scores.
    """

    def __init__(
        self,
        logits_fn: LogitsFunction,
        *,
        step_nbr: int,
        norm: float,
        eps: float,
        max_candidate_classes: int | None = None,
    ) -> None:
        self.logits_fn = logits_fn
        self.step_nbr = step_nbr
        self.norm = norm
        self.eps = eps
        self.max_candidate_classes = max_candidate_classes
        self._scores_function: Any = None
        self._step_function: Any = None

    def run(self, start: tf.Tensor, context: tuple[tf.Tensor, ...] = ()) -> tuple[tf.Tensor, np.ndarray]:
        """DeepFool from ``start`` ``[B, D]``.

        Returns:
            ``(perturbations [B, D], unreachable [B] bool)``: the total step of each point, and whether the
            scores did not depend on the point (no boundary in reach: the distance is infinite).
        """
        scores = self.scores(start, context)
        count = int(scores.shape[1])
        kept = count if self.max_candidate_classes is None else min(self.max_candidate_classes, count)
        candidates = tf.math.top_k(scores, k=kept).indices  # column 0 is the original class
        total = tf.zeros_like(start)
        active = np.ones(int(start.shape[0]), dtype=bool)
        unreachable = np.zeros_like(active)
        for _ in range(self.step_nbr):
            rows = np.flatnonzero(active)
            if rows.size == 0:
                break
            points = tf.gather(start + total, rows)
            subset = tuple(tf.gather(part, rows) for part in context)
            steps, still, reachable = self.step(points, subset, tf.gather(candidates, rows))
            total = tf.tensor_scatter_nd_add(total, rows[:, None], steps)
            still, reachable = still.numpy(), reachable.numpy()
            unreachable[rows] = still & ~reachable
            active[rows] = still & reachable
        return total, unreachable

    def scores(self, points: tf.Tensor, context: tuple[tf.Tensor, ...] = ()) -> tf.Tensor:
        """The class scores ``[B, C]`` (two columns for a single logit)."""
        if self._scores_function is None:
            signature = [_batch_spec(points), tuple(_batch_spec(part) for part in context)]
            self._scores_function = tf.function(self._scores, input_signature=signature, autograph=False)
        return self._scores_function(points, context)

    def step(
        self, points: tf.Tensor, context: tuple[tf.Tensor, ...], candidates: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """One DeepFool step for the points still moving: ``(steps [b, D], still [b], reachable [b])``."""
        if self._step_function is None:  # traced once, for any number of points
            signature = [_batch_spec(points), tuple(_batch_spec(part) for part in context), _batch_spec(candidates)]
            self._step_function = tf.function(self._step, input_signature=signature, autograph=False)
        return self._step_function(points, context, candidates)  # type: ignore[no-any-return]

    def _scores(self, points: tf.Tensor, context: tuple[tf.Tensor, ...]) -> tf.Tensor:
        scores = self.logits_fn(points, *context)
        if scores.shape.rank != 2:
            raise ValueError(
                f"The model must output scores [batch, classes] (logits preferred), got shape {scores.shape}."
            )
        if scores.shape[1] == 1:  # binary logit s: class 1 iff s > 0
            scores = tf.concat([tf.zeros_like(scores), scores], axis=1)
        return scores

    def _step(
        self, points: tf.Tensor, context: tuple[tf.Tensor, ...], candidates: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(points)
            scores = tf.gather(self._scores(points, context), candidates, batch_dims=1)  # [b, n]
        jacobian = tape.batch_jacobian(scores, points)  # [b, n, D]
        differences = scores[:, 1:] - scores[:, :1]  # f'_l ≤ 0 while the original class wins
        gradients = jacobian[:, 1:] - jacobian[:, :1]  # w'_l
        margin = -tf.reduce_max(differences, axis=1)
        still = margin > self.eps * tf.maximum(tf.ones_like(margin), tf.abs(scores[:, 0]))
        dual = _dual_norm(gradients, self.norm)  # [b, n - 1]
        safe = tf.where(dual > 0, dual, tf.ones_like(dual))
        ratio = tf.where(dual > 0, tf.abs(differences) / safe, tf.constant(math.inf, dual.dtype))
        target = tf.argmin(ratio, axis=1, output_type=tf.int32)
        reachable = tf.math.is_finite(tf.reduce_min(ratio, axis=1))
        gap = tf.abs(tf.gather(differences, target, batch_dims=1))  # [b]
        direction = tf.gather(gradients, target, batch_dims=1)  # [b, D]
        steps = self._step_onto_boundary(gap, direction)
        moving = tf.logical_and(still, reachable)
        steps = tf.where(moving[:, None], steps, tf.zeros_like(steps))
        return steps, still, reachable

    def _step_onto_boundary(self, gap: tf.Tensor, direction: tf.Tensor) -> tf.Tensor:
        """The smallest ``p``-norm step ``r`` with ``direction · r = gap``."""
        dual = _dual_norm(direction, self.norm)
        safe = tf.where(dual > 0, dual, tf.ones_like(dual))
        if self.norm == 2:
            return (gap / tf.square(safe))[:, None] * direction
        if self.norm == math.inf:
            return (gap / safe)[:, None] * tf.sign(direction)
        coordinate = tf.argmax(tf.abs(direction), axis=1, output_type=tf.int32)
        value = tf.gather(direction, coordinate, batch_dims=1)
        one_hot = tf.one_hot(coordinate, tf.shape(direction)[1], dtype=direction.dtype)
        return (gap / safe * tf.sign(value))[:, None] * one_hot


def _dual_norm(vectors: tf.Tensor, norm: float) -> tf.Tensor:
    """``‖v‖_q`` over the last axis, ``q`` the dual of ``p = norm`` (2 ↔ 2, ∞ ↔ 1, 1 ↔ ∞)."""
    if norm == 2:
        return tf.norm(vectors, axis=-1)
    if norm == math.inf:
        return tf.reduce_sum(tf.abs(vectors), axis=-1)
    return tf.reduce_max(tf.abs(vectors), axis=-1)


def _batch_spec(tensor: tf.Tensor) -> tf.TensorSpec:
    return tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype)


# ---------------------------------------------------------------------- the calculators


class BoundaryCalculator(BaseInfluenceCalculator):
    """Self-influence only: ``-distance`` to the decision boundary, computed by :class:`DeepFool`.

    Subclasses implement :meth:`_distances` ``(batch) -> [B]``. The pairwise methods of the engine
    (``influence_matrix``, ``most_influential``, ``top_k``, ``estimate_influence_values_in_batches``,
    ``compute_influence_vector``) raise a ``ValueError``: a distance to the boundary belongs to one example.
    """

    method_name = "boundary"
    infinite_results_allowed = True  # an unreachable boundary is at distance inf

    def __init__(
        self,
        model: InfluenceModel | Any,
        step_nbr: int = 100,
        norm: float | str = 2,
        *,
        eps: float = 1e-6,
        max_candidate_classes: int | None = None,
        show_progress: bool = False,
    ) -> None:
        super().__init__(as_influence_model(model), show_progress=show_progress)
        if not isinstance(step_nbr, (int, np.integer)) or isinstance(step_nbr, bool) or step_nbr <= 0:
            raise ValueError(f"step_nbr must be a positive integer, got {step_nbr!r}.")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}.")
        if max_candidate_classes is not None and (
            not isinstance(max_candidate_classes, (int, np.integer)) or max_candidate_classes < 2
        ):
            raise ValueError(f"max_candidate_classes must be an integer ≥ 2 or None, got {max_candidate_classes!r}.")
        self.step_nbr = int(step_nbr)
        self.norm = _check_norm(norm)
        self.eps = float(eps)
        self.max_candidate_classes = None if max_candidate_classes is None else int(max_candidate_classes)
        self._build()

    def _build(self) -> None:
        """What a subclass prepares once the settings are checked (the model's parts it runs DeepFool on)."""

    def distance_to_boundary(self, train_set: tf.data.Dataset) -> np.ndarray:
        """The DeepFool distance of every training example to the decision boundary, in dataset order.

        Returns:
            Array ``[N_train]`` of non-negative distances (``inf`` when the scores do not depend on what moves).
            Equal to ``-self_influence(train_set)``.
        """
        return -self.self_influence(train_set)

    def _configuration(self) -> dict[str, Any]:
        return {
            "step_nbr": self.step_nbr,
            "norm": "inf" if self.norm == math.inf else self.norm,
            "eps": self.eps,
            "max_candidate_classes": self.max_candidate_classes,
        }

    def _deepfool(self, logits_fn: LogitsFunction) -> DeepFool:
        return DeepFool(
            logits_fn,
            step_nbr=self.step_nbr,
            norm=self.norm,
            eps=self.eps,
            max_candidate_classes=self.max_candidate_classes,
        )

    # ------------------------------------------------------------------ hooks

    def _distances(self, batch: Any) -> tf.Tensor:
        raise NotImplementedError  # pragma: no cover

    def _self_influence(self, batch: Any) -> tf.Tensor:
        return -tf.cast(self._distances(batch), self.model.dtype)

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        raise self._pairwise_error()

    def _transforms(self, batch: Any) -> tf.Tensor:
        raise self._pairwise_error()

    def _vector_source(
        self,
        train_set: tf.data.Dataset,
        mode: CACHE,
        path: str | None,
        *,
        overwrite: bool = False,
        per_batch: bool = False,
    ) -> Callable[[], Iterator[Block]]:
        # Every pairwise method starts here: fail before any work, with the alternative.
        raise self._pairwise_error()

    def _pairwise_error(self) -> ValueError:
        return ValueError(
            f"{type(self).__name__} measures each example's own distance to the decision boundary, so there is no "
            "score between a training and a test example (no influence matrix, top-k against test examples or "
            "influence vectors). Use self_influence(train_set), distance_to_boundary(train_set), "
            "compute_influence_values(train_set) or compute_top_k_from_training_dataset(train_set, k)."
        )


class SampleBoundaryCalculator(BoundaryCalculator):
    """Distance from each example to the decision boundary in **input** space (DeepFool).

    Score: ``-‖r‖_p ≤ 0`` where ``r`` is the DeepFool perturbation that brings the input onto the boundary
    between its predicted class and the nearest competing class (no overshoot). Examples near the boundary
    (ambiguous, atypical, mislabeled ones) score highest; ``ORDER.DESCENDING`` lists them first. The scale is the
    input's: a distance in input units (``p = 2``: Euclidean norm over all input features). For a linear classifier
    the distance is exact: ``min_l |(w_k - w_l)·x + b_k - b_l| / ‖w_k - w_l‖_q``. For a network it is DeepFool's
    estimate after at most ``step_nbr`` steps (an upper bound on the true distance once on the boundary).

    The decision is ``argmax`` of the model's output; a single output column is a binary logit (boundary at 0).
    Prefer a model that outputs logits: DeepFool on softmax probabilities needs more steps. Every input of the
    model must be floating point (all inputs move together; norms are taken over all their features).
    Steps run on whole batches: memory per step is ``batch × classes × input size`` (see
    ``max_candidate_classes`` for many classes).

    Args:
        model: An :class:`~influenciae.InfluenceModel` or a Keras classifier (any kind; no loss needed).
        step_nbr: Maximum DeepFool steps per example.
        norm: ``p`` of the distance: 2 (default), ``numpy.inf`` or 1.
        eps: An example counts as on the boundary when its winning margin is ``≤ eps · max(1, |top score|)``.
        max_candidate_classes: Let only this many top-scoring classes compete (``None``: all).
        show_progress: Progress bars on every pass.
        attack: ``None`` (default): DeepFool. Otherwise the distance of an example is ``‖x' - x‖_p`` for the
            perturbed input ``x'`` this attack returns, when it changes the prediction (``inf`` when it does not):
            a function ``attack(inputs, labels) -> perturbed inputs`` (``labels`` ``[B]`` are the model's
            predictions), e.g. a :class:`~influenciae.robustness.MinParamPerturbation`; or an attack with a
            ``boundary_attack()`` method (:class:`~influenciae.robustness.FGSM`, :class:`~influenciae.robustness.PGD`),
            which searches the smallest ε in ``[0, 1]`` that flips each prediction (use
            ``FGSM(model).boundary_attack(max_epsilon=...)`` for another range). ``step_nbr``, ``eps`` and
            ``max_candidate_classes`` only concern DeepFool.

    Example:
        >>> calculator = SampleBoundaryCalculator(keras_model, step_nbr=50)
        >>> indices, scores = calculator.compute_top_k_from_training_dataset(train_ds, k=10)  # nearest first
    """

    method_name = "sample_boundary"

    def __init__(
        self,
        model: InfluenceModel | Any,
        step_nbr: int = 100,
        norm: float | str = 2,
        *,
        eps: float = 1e-6,
        max_candidate_classes: int | None = None,
        show_progress: bool = False,
        attack: Any | None = None,
    ) -> None:
        super().__init__(
            model, step_nbr, norm, eps=eps, max_candidate_classes=max_candidate_classes, show_progress=show_progress
        )
        self._runners: dict[str, DeepFool] = {}
        boundary_attack = getattr(attack, "boundary_attack", None)  # FGSM/PGD: search the smallest flipping ε
        self.attack: Any = boundary_attack() if callable(boundary_attack) else attack
        if self.attack is not None and not callable(self.attack):
            raise TypeError(
                f"attack must be None (DeepFool), a function (inputs, labels) -> perturbed inputs, or an attack of "
                f"influenciae.robustness; got {type(attack).__name__}."
            )

    def _configuration(self) -> dict[str, Any]:
        configuration = super()._configuration()
        if self.attack is not None:  # cached scores of another attack must not be reused
            configuration["attack"] = repr(self.attack)
        return configuration

    def _batch_check(self) -> tuple[Callable[[Any], Any], str]:
        return self._check_outputs, "the model's class scores"

    def _check_outputs(self, batch: Any) -> None:
        inputs = unpack_batch(batch).inputs
        start = self._flatten(inputs)
        self._runner(inputs).scores(start)

    def _distances(self, batch: Any) -> tf.Tensor:
        inputs = unpack_batch(batch).inputs
        if self.attack is not None:
            return self._attack_distances(inputs)
        perturbations, unreachable = self._runner(inputs).run(self._flatten(inputs))
        distances = tf.norm(perturbations, ord=self.norm, axis=1)
        return tf.where(unreachable, tf.constant(math.inf, distances.dtype), distances)

    def _attack_distances(self, inputs: Any) -> tf.Tensor:
        """``‖x' - x‖_p`` where ``x' = attack(x, predicted labels)`` changes the prediction, ``inf`` elsewhere."""
        runner, start = self._runner(inputs), self._flatten(inputs)
        labels = tf.argmax(runner.scores(start), axis=1)  # DeepFool's decision: one column s reads as [0, s]
        moved = self._flatten(self.attack(inputs, labels))
        distances = tf.norm(moved - start, ord=self.norm, axis=1)
        flipped = tf.argmax(runner.scores(moved), axis=1) != labels
        return tf.where(flipped, distances, tf.constant(math.inf, distances.dtype))

    def _flatten(self, inputs: Any) -> tf.Tensor:
        """All input features of each example in one row ``[B, D]``, in the model's dtype."""
        leaves = [tf.convert_to_tensor(leaf) for leaf in tf.nest.flatten(inputs)]
        for leaf in leaves:
            if not leaf.dtype.is_floating:
                raise TypeError(
                    f"SampleBoundaryCalculator moves the inputs, so they must be floating point; got an input of "
                    f"dtype {leaf.dtype.name}. For token ids or other discrete inputs use WeightsBoundaryCalculator."
                )
        size = tf.shape(leaves[0])[0]
        return tf.concat([tf.reshape(tf.cast(leaf, self.model.dtype), [size, -1]) for leaf in leaves], axis=1)

    def _runner(self, inputs: Any) -> DeepFool:
        """One DeepFool per input signature: its logits function rebuilds the inputs from a flat row."""
        specs = tf.nest.map_structure(lambda t: (tf.as_dtype(t.dtype), tuple(int(d) for d in t.shape[1:])), inputs)
        key = repr(specs)
        if key not in self._runners:
            leaves = tf.nest.flatten(inputs)
            shapes = [tuple(int(d) for d in leaf.shape[1:]) for leaf in leaves]
            dtypes = [tf.as_dtype(leaf.dtype) for leaf in leaves]
            sizes = [int(np.prod(shape)) for shape in shapes]
            model = self.model.model

            def logits(points: tf.Tensor) -> tf.Tensor:
                parts = tf.split(points, sizes, axis=1) if len(sizes) > 1 else [points]
                rebuilt = [
                    tf.cast(tf.reshape(part, [-1, *shape]), dtype)
                    for part, shape, dtype in zip(parts, shapes, dtypes, strict=True)
                ]
                outputs = model(tf.nest.pack_sequence_as(inputs, rebuilt), training=False)
                if len(tf.nest.flatten(outputs)) != 1:
                    raise ValueError("SampleBoundaryCalculator needs a model with a single output [batch, classes].")
                return tf.cast(tf.nest.flatten(outputs)[0], self.model.dtype)

            self._runners[key] = self._deepfool(logits)
        return self._runners[key]


class WeightsBoundaryCalculator(BoundaryCalculator):
    """Distance in the **weight space of the last Dense layer** that changes each example's prediction (DeepFool).

    With ``a`` the input features of the last Dense layer (kernel ``W``, bias ``b``) for an example and
    ``ã = [a, 1]`` (``a`` without bias), the logits ``z = ãθ`` are linear in ``θ = [W; b]``, and every gradient
    ``∇_θ(z_l - z_k) = ã ⊗ (e_l - e_k)`` has rank one. DeepFool in ``θ``-space therefore reduces exactly to DeepFool
    on ``u ↦ z + u`` in the ``C``-dimensional logit space, with ``‖Δθ‖_p = ‖u‖_p / ‖ã‖_q`` (``q`` dual to ``p``).
    Being linear, it reaches the boundary in one step, so the distance is exact; for ``p = 2``:

        distance = (z_k - z_l) / (√2 ‖[a, 1]‖)   with ``l`` the runner-up class

    (one output column: ``|z| / ‖[a, 1]‖``). The score is ``-distance ≤ 0``: examples whose prediction flips
    with the smallest change of the last layer score highest, and ``ORDER.DESCENDING`` lists them first. The
    scale is that of the weights.

    The prediction is ``argmax`` of the last Dense layer's **pre-activation** logits, so its activation and any
    weightless layers after it (softmax, sigmoid, ``Activation``) must preserve that argmax. The weights are only
    read, never assigned: the model is never modified, even if a run is interrupted. Unlike Influenciae, which
    moved all trainable weights, only the last Dense layer moves.

    Args:
        model: An :class:`~influenciae.InfluenceModel` or a Sequential/functional Keras classifier whose last layer
            with weights is a ``Dense`` layer on ``[batch, features]``.
        step_nbr: Maximum DeepFool steps (one suffices here; kept for the shared algorithm and Influenciae).
        norm: ``p`` of the distance over the layer's weights: 2 (default), ``numpy.inf`` or 1.
        eps: An example counts as on the boundary when its winning margin is ``≤ eps · max(1, |top logit|)``.
        max_candidate_classes: Let only this many top-scoring classes compete (``None``: all).
        show_progress: Progress bars on every pass.

    Example:
        >>> calculator = WeightsBoundaryCalculator(keras_model)
        >>> scores = calculator.self_influence(train_ds)  # -distance; highest = most fragile prediction
    """

    method_name = "weights_boundary"

    def _build(self) -> None:
        self.head = DenseHead(self.model.model, purpose="WeightsBoundaryCalculator")
        self.layer = self.head.layer
        self._features = tf.function(self._layer_inputs, reduce_retracing=True, autograph=False)
        self._runner = self._deepfool(lambda offsets, logits: logits + offsets)

    def _batch_check(self) -> tuple[Callable[[Any], Any], str]:
        return self._features, f"the inputs of the last Dense layer {self.layer.name!r}"

    def _distances(self, batch: Any) -> tf.Tensor:
        features, logits = self._features(batch)
        offsets, unreachable = self._runner.run(tf.zeros_like(logits), (logits,))
        dual = _dual_norm(features, self.norm)
        distances = tf.math.divide_no_nan(tf.norm(offsets, ord=self.norm, axis=1), dual)
        unreachable = tf.logical_or(unreachable, tf.logical_and(dual == 0, tf.norm(offsets, axis=1) > 0))
        return tf.where(unreachable, tf.constant(math.inf, distances.dtype), distances)

    def _layer_inputs(self, batch: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """``(ã [B, d(+1)], pre-activation logits z [B, C])`` of the last Dense layer, from its current weights."""
        features = self.head.features(unpack_batch(batch).inputs, self.model.dtype)
        return self.head.augment(features), self.head.logits(features)
