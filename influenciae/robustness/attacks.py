"""Gradient attacks on the inputs of a Keras classifier: FGSM (Goodfellow et al., 2015) and PGD (Madry et al., 2018).

Conventions (Captum's): an **untargeted** attack *ascends* the loss of the true label ``y``; a **targeted** attack
*descends* the loss of the target label ``t``. With ``g = ∇_x ℓ(f(x), label)`` and ``s = +1`` (untargeted) or ``-1``
(targeted):

* FGSM: ``x' = clip(x + s · ε · sign(g))``,
* PGD, L∞: ``x ← clip(x₀ + Π_ε(x + s · α · sign(g) - x₀))`` with ``Π_ε`` clipping each coordinate to ``[-ε, ε]``,
* PGD, L2: ``x ← clip(x₀ + Π_ε(x + s · α · g / ‖g‖₂ - x₀))`` with ``Π_ε(δ) = δ · min(1, ε / ‖δ‖₂)``,

where ``clip`` clips to ``[lower_bound, upper_bound]``, ``‖·‖`` is taken per example over all its input features, and
``sign(0) = 0`` (a coordinate without gradient does not move). Since the box contains ``x₀`` whenever the clean
inputs are within bounds, clipping keeps every iterate inside the ε-ball. ε (and α) may be one value or one per
example. All work happens in ``tf.function``: one trace per input signature, any batch size.

Differences from Captum: PGD-L2 steps along the normalized gradient (Madry et al.); Captum's PGD-L2 takes FGSM sign
steps and projects them. Captum leaves coordinates with ``|g| ≤ 1e-6`` unchanged; here only ``g = 0`` does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.model.classifier import ModelFront, model_front
from influenciae.robustness._common import (
    as_batch,
    batch_size,
    check_bounds,
    check_non_negative,
    check_positive_int,
    is_dataset,
    iterate,
    known_cardinality,
    per_example,
    progress,
    rebuild_dataset,
)

__all__ = ["FGSM", "PGD", "check_norm"]

_NORMS = {"linf": "linf", "inf": "linf", "l_inf": "linf", "l2": "l2", "2": "l2"}


def check_norm(norm: Any) -> str:
    """``"linf"`` or ``"l2"`` from ``"linf"``, ``"Linf"``, ``"inf"``, ``numpy.inf``, ``"l2"``, ``"L2"`` or ``2``.

    Raises:
        ValueError: For any other value.
    """
    if isinstance(norm, (int, float, np.integer, np.floating)) and not isinstance(norm, bool):
        if float(norm) == math.inf:
            return "linf"
        if float(norm) == 2.0:
            return "l2"
    elif isinstance(norm, str) and norm.lower() in _NORMS:
        return _NORMS[norm.lower()]
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")


class _GradientAttack:
    """Shared front of the gradient attacks: model, loss, bounds, the loss gradient and the batch/dataset loop."""

    def __init__(
        self,
        model: Any,
        loss_function: Any | None = None,
        lower_bound: Any | None = None,
        upper_bound: Any | None = None,
    ) -> None:
        self.front: ModelFront = model_front(model, loss_function)
        self.loss_function = self.front.require_loss(type(self).__name__)
        self.lower_bound, self.upper_bound = check_bounds(lower_bound, upper_bound)
        self._gradient_function = tf.function(self._loss_gradient, reduce_retracing=True, autograph=False)
        self._attack_function = tf.function(self._attack, reduce_retracing=True, autograph=False)

    def _attack(self, *arguments: Any) -> Any:
        """The attack's traced body (FGSM's step, PGD's steps); attacks without one never call it."""
        raise NotImplementedError  # pragma: no cover

    @property
    def model(self) -> Any:
        """The Keras model (or callable) being attacked."""
        return self.front.model

    def loss_gradient(self, inputs: Any, targets: Any) -> Any:
        """``∇_x Σ_i ℓ(f(x_i), targets_i)``: each example's loss gradient with respect to its inputs (same structure).

        Args:
            inputs: ``[B, ...]`` floating tensor (or a nested structure of them).
            targets: ``[B]`` labels (or whatever the loss expects).
        """
        batch = as_batch(inputs, targets, type(self).__name__)
        return self._gradient_function(batch.inputs, batch.targets)

    def boundary_attack(
        self, max_epsilon: float = 1.0, *, arg_step: float | None = None, mode: str = "binary", **perturb_kwargs: Any
    ) -> Any:
        """A search for the smallest ε in ``[0, max_epsilon]`` with which this attack changes each prediction.

        This is what :class:`~influenciae.influence.boundary.SampleBoundaryCalculator` uses when given
        ``attack=`` this attack: the distance is then the norm of the attack's perturbation at that ε.

        Args:
            max_epsilon: Largest ε searched (examples still unflipped there get an infinite distance).
            arg_step: Resolution of the search; ``None``: ``max_epsilon / 1024`` (binary) or ``/ 100`` (linear).
            mode: ``"binary"`` or ``"linear"``.
            **perturb_kwargs: Further arguments of :meth:`perturb` (e.g. ``num_steps=10, norm="l2"`` for PGD).

        Returns:
            A :class:`~influenciae.robustness.MinParamPerturbation`: called on ``(inputs, labels)`` it returns the
            inputs perturbed with each example's minimal ε (unchanged where none flips it).
        """
        from influenciae.robustness.perturbation import MinParamPerturbation

        return MinParamPerturbation(
            self.front.model, self, 0.0, max_epsilon, arg_step, mode, attack_kwargs=perturb_kwargs
        )

    def clip(self, inputs: Any) -> Any:
        """Inputs clipped to ``[lower_bound, upper_bound]`` (no-op without bounds)."""
        return tf.nest.map_structure(self._clip_leaf, inputs)

    # ------------------------------------------------------------------ internals

    def _loss_gradient(self, inputs: Any, targets: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = self.front.graph_forward(inputs)
            losses = self.loss_function(targets, outputs)
            loss = tf.reduce_sum(tf.cast(losses, outputs.dtype))
        return tape.gradient(loss, inputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _clip_leaf(self, leaf: tf.Tensor) -> tf.Tensor:
        if self.lower_bound is not None:
            leaf = tf.maximum(leaf, tf.constant(self.lower_bound, leaf.dtype))
        if self.upper_bound is not None:
            leaf = tf.minimum(leaf, tf.constant(self.upper_bound, leaf.dtype))
        return leaf

    def _over_batches(
        self,
        inputs: Any,
        targets: Any,
        values: dict[str, np.ndarray],
        attack_batch: Any,
        show_progress: bool,
        description: str,
    ) -> Any:
        """Run ``attack_batch(inputs, targets, per-example values)`` on a tensor batch or every batch of a dataset.

        Returns the perturbed tensor (structure of ``inputs``), or for a dataset a new dataset of
        ``(perturbed inputs, targets[, sample_weight])`` with the same batches, computed once, here, in memory.
        """
        owner = type(self).__name__
        if not is_dataset(inputs):
            batch = as_batch(inputs, targets, owner)
            size = batch_size(batch.inputs)
            sliced = {name: per_example(value, size, name) for name, value in values.items()}
            return attack_batch(batch.inputs, batch.targets, sliced, show_progress)
        batches, offset = [], 0
        bar = progress(iterate(inputs, targets, owner), show_progress, f"{owner}", known_cardinality(inputs))
        for batch in bar:
            size = batch_size(batch.inputs)
            sliced = {}
            for name, value in values.items():
                if value.ndim == 0:
                    sliced[name] = np.full(size, float(value))
                elif value.shape[0] < offset + size:
                    raise ValueError(f"{name} has {value.shape[0]} values, fewer than the dataset's examples.")
                else:
                    sliced[name] = value[offset : offset + size]
            perturbed = attack_batch(batch.inputs, batch.targets, sliced, False)
            parts = (perturbed, batch.targets) if batch.sample_weight is None else (perturbed, *batch[1:])
            batches.append(parts)
            offset += size
        for name, value in values.items():
            if value.ndim == 1 and value.shape[0] != offset:
                raise ValueError(f"{name} has {value.shape[0]} values but the dataset has {offset} examples.")
        return rebuild_dataset(batches, inputs.element_spec)


def _broadcast(values: np.ndarray, leaf: tf.Tensor) -> tf.Tensor:
    """Per-example values ``[B]`` shaped ``[B, 1, ..., 1]`` to scale a leaf ``[B, ...]``."""
    return tf.reshape(tf.constant(values, leaf.dtype), [-1] + [1] * (leaf.shape.rank - 1))


def _prepare_mask(mask: Any, inputs: Any) -> Any:
    if mask is None:
        return tf.nest.map_structure(lambda leaf: tf.ones([1] * leaf.shape.rank, leaf.dtype), inputs)
    if tf.nest.is_nested(inputs) and not tf.nest.is_nested(mask):
        mask = tf.nest.map_structure(lambda _: mask, inputs)
    return tf.nest.map_structure(lambda m, leaf: tf.cast(tf.convert_to_tensor(m), leaf.dtype), mask, inputs)


class FGSM(_GradientAttack):
    """Fast Gradient Sign Method: one step of size ε along the sign of the input gradient of the loss.

    ``x' = clip(x + s · ε · sign(∇_x ℓ(f(x), label)))`` with ``s = +1`` for an untargeted attack (``targets`` are the
    true labels, their loss goes up) and ``s = -1`` for a targeted one (``targets`` are the wanted labels, their loss
    goes down). ``‖x' - x‖_∞ ≤ ε`` before clipping.

    Args:
        model: A Keras 3 (or ``tf_keras``) classifier, an :class:`~influenciae.InfluenceModel` (its Keras model and
            loss are used), or a callable ``inputs [B, ...] -> outputs [B, C]`` (then ``loss_function`` is needed).
        loss_function: ``(y_true, y_pred) -> [B]`` (a Keras loss object or function; a reduced loss works too, its
            scale does not change the attack). ``None``: the InfluenceModel's loss, else the compiled loss, else
            cross-entropy inferred from the last layer's activation (linear: from logits; softmax or sigmoid: from
            probabilities; sparse ``[B]`` or one-hot ``[B, C]`` targets; one output column: binary). A ``ValueError``
            says so when none of these applies.
        lower_bound: Smallest allowed input value: a scalar or an array broadcastable to the inputs (e.g. ``0.0``).
        upper_bound: Largest allowed input value (e.g. ``1.0`` or ``255.0``).

    Example:
        >>> fgsm = FGSM(model, lower_bound=0.0, upper_bound=1.0)
        >>> adversarial = fgsm.perturb(images, labels, epsilon=8 / 255)  # same shape as images
    """

    def perturb(
        self,
        inputs: Any,
        targets: Any,
        epsilon: Any,
        targeted: bool = False,
        *,
        mask: Any | None = None,
        show_progress: bool = False,
    ) -> Any:
        """The FGSM perturbation of ``inputs``.

        Args:
            inputs: A floating tensor ``[B, ...]`` (or nested structure), or a ``tf.data.Dataset`` of
                ``(inputs, targets[, sample_weight])`` batches (then ``targets=None``).
            targets: True labels ``[B]`` (untargeted) or target labels (targeted); ``None`` with a dataset.
            epsilon: ``ε ≥ 0``: one value, or one per example (``[B]``, or ``[N]`` over a dataset).
            targeted: Descend the loss of ``targets`` instead of ascending it.
            mask: Optional 0/1 array broadcastable to the inputs: only where it is 1 do inputs move.
            show_progress: A tqdm bar over the dataset's batches.

        Returns:
            The perturbed inputs: a tensor of the inputs' shape (structure), or for a dataset a new
            ``tf.data.Dataset`` of ``(perturbed inputs, targets[, sample_weight])`` with the same batches, computed
            once by this call and held in memory.

        Raises:
            ValueError: If ε is negative or not finite, or its length does not match the examples.
        """
        values = {"epsilon": check_non_negative(epsilon, "epsilon")}
        sign = -1.0 if targeted else 1.0

        def attack_batch(batch_inputs: Any, batch_targets: Any, sliced: dict[str, np.ndarray], _: bool) -> Any:
            epsilons = tf.nest.map_structure(lambda leaf: _broadcast(sliced["epsilon"], leaf), batch_inputs)
            masks = _prepare_mask(mask, batch_inputs)
            return self._attack_function(batch_inputs, batch_targets, epsilons, masks, tf.constant(sign))

        return self._over_batches(inputs, targets, values, attack_batch, show_progress, "FGSM")

    def _attack(self, inputs: Any, targets: Any, epsilons: Any, masks: Any, sign: tf.Tensor) -> Any:  # type: ignore[override]
        gradients = self._loss_gradient(inputs, targets)
        moved = tf.nest.map_structure(
            lambda x, g, e, m: x + tf.cast(sign, x.dtype) * e * tf.sign(g) * m, inputs, gradients, epsilons, masks
        )
        return self.clip(moved)


class PGD(_GradientAttack):
    """Projected Gradient Descent (Madry et al., 2018): ``num_steps`` gradient steps projected onto the ε-ball.

    Each step moves ``x`` by ``s · α · d(g)`` with ``d(g) = sign(g)`` (``norm="linf"``) or ``g / ‖g‖₂``
    (``norm="l2"``, per example), ``s = ±1`` as in :class:`FGSM`, then projects ``x - x₀`` onto the ball
    ``‖x - x₀‖ ≤ ε`` and clips to the bounds. With ``random_start`` the first iterate is drawn uniformly in the ball
    (L∞: each coordinate uniform in ``[-ε, ε]``; L2: a uniform direction times ``ε · u^(1/d)``, ``d`` the number of
    features). One PGD-L∞ step with ``α = ε`` and no random start equals FGSM.

    Args:
        model: As for :class:`FGSM`.
        loss_function: As for :class:`FGSM`.
        lower_bound: As for :class:`FGSM`.
        upper_bound: As for :class:`FGSM`.

    Example:
        >>> pgd = PGD(model, lower_bound=0.0, upper_bound=1.0)
        >>> adversarial = pgd.perturb(images, labels, epsilon=0.03, step_size=0.01, num_steps=20)
    """

    def perturb(
        self,
        inputs: Any,
        targets: Any,
        epsilon: Any,
        step_size: Any | None = None,
        num_steps: int = 10,
        norm: str = "linf",
        random_start: bool = False,
        targeted: bool = False,
        seed: int | None = None,
        *,
        mask: Any | None = None,
        show_progress: bool = False,
    ) -> Any:
        """The PGD perturbation of ``inputs``.

        Args:
            inputs: As for :meth:`FGSM.perturb` (a tensor batch or a dataset).
            targets: As for :meth:`FGSM.perturb`.
            epsilon: Radius ``ε ≥ 0`` of the ball: one value, or one per example (``[B]``; ``[N]`` over a dataset).
            step_size: ``α > 0``, one value or one per example; ``None``: ``2.5 · ε / num_steps`` (Madry et al.).
            num_steps: Number of projected steps.
            norm: ``"linf"`` or ``"l2"`` (``"Linf"``, ``"L2"``, ``numpy.inf`` and ``2`` are accepted too).
            random_start: Start from a uniform random point of the ball instead of ``x₀``.
            targeted: Descend the loss of ``targets`` instead of ascending it.
            seed: Seed of the random start (the same seed gives the same start); ``None``: nondeterministic.
            mask: Optional 0/1 array broadcastable to the inputs: only where it is 1 do inputs move.
            show_progress: A tqdm bar over the dataset's batches, or over the steps for a tensor batch.

        Returns:
            The perturbed inputs, as for :meth:`FGSM.perturb` (a tensor of the inputs' shape, or a dataset).

        Raises:
            ValueError: If ε or α is negative, ``num_steps`` is not a positive integer or ``norm`` is unknown.
        """
        resolved_norm = check_norm(norm)
        steps = check_positive_int(num_steps, "num_steps")
        radius = check_non_negative(epsilon, "epsilon")
        values = {"epsilon": radius}
        if step_size is not None:
            values["step_size"] = check_non_negative(step_size, "step_size", allow_zero=False)
        sign = -1.0 if targeted else 1.0
        generator = None
        if random_start:
            generator = _generator(seed)

        def attack_batch(batch_inputs: Any, batch_targets: Any, sliced: dict[str, np.ndarray], bar: bool) -> Any:
            radii = sliced["epsilon"]
            alphas = sliced.get("step_size", 2.5 * radii / steps)
            masks = _prepare_mask(mask, batch_inputs)
            epsilons = tf.nest.map_structure(lambda leaf: _broadcast(radii, leaf), batch_inputs)
            alpha = tf.nest.map_structure(lambda leaf: _broadcast(alphas, leaf), batch_inputs)
            start = batch_inputs
            if generator is not None:
                start = self.clip(_random_point(generator, batch_inputs, radii, resolved_norm, masks))
            arguments = (batch_inputs, batch_targets, epsilons, alpha, masks, tf.constant(sign), resolved_norm)
            if not bar:
                return self._attack_function(start, tf.constant(steps), *arguments)
            current = start
            for _ in progress(range(steps), True, "PGD", steps, unit="step"):
                current = self._attack_function(current, tf.constant(1), *arguments)
            return current

        return self._over_batches(inputs, targets, values, attack_batch, show_progress, "PGD")

    def _attack(  # type: ignore[override]
        self,
        start: Any,
        count: tf.Tensor,
        origin: Any,
        targets: Any,
        epsilons: Any,
        alpha: Any,
        masks: Any,
        sign: tf.Tensor,
        norm: str,
    ) -> Any:
        def body(index: tf.Tensor, current: Any) -> tuple[tf.Tensor, Any]:
            gradients = self._loss_gradient(current, targets)
            if norm == "linf":
                directions = tf.nest.map_structure(tf.sign, gradients)
            else:
                scale = tf.math.rsqrt(_squared_norm(gradients))  # inf for a zero gradient: guarded below
                directions = tf.nest.map_structure(
                    lambda g: tf.where(tf.equal(g, 0), tf.zeros_like(g), g * _broadcast_tensor(scale, g)), gradients
                )
            moved = tf.nest.map_structure(
                lambda x, d, a, m: x + tf.cast(sign, x.dtype) * a * d * m, current, directions, alpha, masks
            )
            offsets = tf.nest.map_structure(tf.subtract, moved, origin)
            if norm == "linf":
                offsets = tf.nest.map_structure(lambda o, e: tf.clip_by_value(o, -e, e), offsets, epsilons)
            else:
                length = tf.sqrt(_squared_norm(offsets))

                def shrink(offset: tf.Tensor, radius: tf.Tensor) -> tf.Tensor:
                    ratio = tf.math.divide_no_nan(radius, _broadcast_tensor(length, offset))
                    return offset * tf.minimum(tf.ones_like(ratio), ratio)

                offsets = tf.nest.map_structure(shrink, offsets, epsilons)
            projected = self.clip(tf.nest.map_structure(tf.add, origin, offsets))
            return index + 1, projected

        _, result = tf.while_loop(lambda index, _: index < count, body, (tf.constant(0), start))
        return result


def _squared_norm(tree: Any) -> tf.Tensor:
    """``Σ`` of squares over every feature of each example, all leaves together: ``[B]``."""
    leaves = tf.nest.flatten(tree)
    return tf.add_n([tf.reduce_sum(tf.reshape(tf.square(leaf), [tf.shape(leaf)[0], -1]), axis=1) for leaf in leaves])


def _broadcast_tensor(values: tf.Tensor, leaf: tf.Tensor) -> tf.Tensor:
    return tf.reshape(tf.cast(values, leaf.dtype), [-1] + [1] * (leaf.shape.rank - 1))


def _generator(seed: int | None) -> tf.random.Generator:
    if seed is None:
        return tf.random.Generator.from_non_deterministic_state()
    return tf.random.Generator.from_seed(seed)


def _random_point(generator: tf.random.Generator, inputs: Any, radii: np.ndarray, norm: str, masks: Any) -> Any:
    """A uniform random point of the ball of radius ``radii`` ``[B]`` around ``inputs`` (masked coordinates fixed)."""
    leaves = tf.nest.flatten(inputs)
    if norm == "linf":
        noise = [generator.uniform(tf.shape(x), -1.0, 1.0, dtype=x.dtype) * _broadcast(radii, x) for x in leaves]
    else:
        gaussian = [generator.normal(tf.shape(leaf), dtype=leaf.dtype) for leaf in leaves]
        length = tf.sqrt(_squared_norm(gaussian))
        dimension = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
        radius = radii * generator.uniform([len(radii)], dtype=tf.float64).numpy() ** (1.0 / dimension)
        noise = [g / _broadcast_tensor(length, g) * _broadcast(radius, g) for g in gaussian]
    noise_tree = tf.nest.pack_sequence_as(inputs, noise)
    return tf.nest.map_structure(lambda x, n, m: x + n * m, inputs, noise_tree, masks)
