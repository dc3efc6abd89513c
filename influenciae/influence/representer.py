"""Representer point selection: RPS-L2 (Yeh et al., 2018) and RPS-LJE (Sui, Wu & Wang, 2021).

Both methods split the model into a feature extractor ``x ↦ f(x)`` (everything before the last ``Dense`` layer) and
that last layer, ``logits(x) = Θᵀ f̃(x)``, where ``f̃ = [f, 1]`` when the layer has a bias (the bias is the weight of
a constant feature, ``Θ = [kernel; bias]``, flattened kernel first like :class:`InfluenceModel`) and ``f̃ = f``
otherwise. A training example ``z_i`` gets a score for a test example ``x`` such that the scores of all training
examples **sum to a pre-activation output** of a last layer: the representer decomposition.

Which output is explained (``explained_class``):

* ``"prediction"`` (default, as in Yeh et al. and Influenciae): the class the model predicts for ``x``, the argmax
  of its pre-activation outputs. For a single-output binary classifier (one logit ``s``), the predicted class is 1
  when ``s > 0`` and the explained quantity is the log-odds of that class, ``+s`` or ``-s``.
* ``"label"``: the label of ``x`` (sparse or one-hot targets; ``{0, 1}`` targets for a single-output model,
  explained as ``+s`` or ``-s`` likewise).
* an ``int`` ``k``: output unit ``k`` itself, unsigned (e.g. ``0`` for a regression output).

Write ``s · e_c`` for the explained output of ``x`` (unit ``c``, sign ``s = ±1``). Sign, in every case: a positive
score means the training example is **excitatory**, a proponent: it pushes the explained output of ``x`` up (towards
its explained class); negative scores are inhibitory (opponents). ``ORDER.DESCENDING`` lists proponents first. Each
class documents its scale.

The last layer's computations (losses, gradients, Hessian-vector products) run on the training features, computed
once and kept in memory (``N × D`` values); the Hessian is inverted by the library's solvers, through an operator.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import check_dataset
from influenciae.hessian import (
    ConjugateGradientDescentIHVP,
    InverseHessianVectorProduct,
    resolve_solver,
)

__all__ = ["RepresenterPointL2", "RepresenterPointLJE"]

from influenciae.influence._last_layer import (
    _LastLayerHessian,
    _layer_penalty,
    _RepresenterCalculator,
    _SquaredNorm,
)


class RepresenterPointL2(_RepresenterCalculator):
    """Representer point selection with an L2-regularized last layer (Yeh, Kim, Yen & Ravikumar, NeurIPS 2018).

    The last layer is refit, from the model's weights, to a stationary point ``Θ*`` of

        R(Θ) = (1/N) Σ_i w_i ℓ(y_i, act(Θᵀ f̃_i)) + λ ‖Θ‖²

    (Newton's method with conjugate-gradient steps, to a relative gradient of ``tolerance``; weights that are
    already stationary are kept). Stationarity, ``2λΘ* = -(1/N) Σ_i f̃_i (w_i ∂ℓ_i/∂logits_i)ᵀ``, is the
    representer theorem:

        Θ*ᵀ f̃(x) = Σ_i α_i f̃_iᵀ f̃(x),      α_i = -w_i / (2λN) · ∂ℓ(z_i)/∂logits_i   ∈ R^C.

    The bias is the weight of the constant feature 1 and is penalized like the kernel: that is what puts it inside
    the sum (an unpenalized bias would stay outside it). The model's own regularizers are replaced by the penalty.
    ``loss_function`` sees the true labels; to follow Yeh et al., who fit the model's own predicted probabilities,
    pass a ``train_set`` whose targets are those probabilities and a loss that accepts soft targets.

    Sign and scale: the score of training example ``z_i`` for test example ``x`` is the representer value

        score(z_i, x) = s · α_{i,c} · f̃_iᵀ f̃(x)

    for the explained output ``s · e_c`` of ``x`` (module docstring). Positive = excitatory (a proponent: it pushes
    the explained logit of ``x`` up). The scores of the ``N`` training examples sum to ``s`` times the explained
    logit of the refit layer (:meth:`surrogate_logits`), in logit units, up to the stationarity residual
    (``fit_info["relative_gradient"]`` bounds the relative error). The score is also
    ``-1/(2λN) ∇_Θ ℓ(z_i) · ∇_Θ (s · logit_c(x))``: an influence function whose Hessian is the penalty's ``2λI``.
    Self-influence is ``s · α_{i,c} ‖f̃_i‖²`` with the class of ``z_i`` picked the same way; with
    ``explained_class="label"`` and cross-entropy it is ``w_i (1 - p_{y_i}) ‖f̃_i‖² / (2λN) ≥ 0``, large for
    examples the model gets wrong, so mislabeled examples rank high. :meth:`global_importance` returns the ``α_i``.

    Influence vectors are ``[α_i, f̃_i]`` (``C + D̃`` numbers rather than the ``C·D̃`` of an equivalent dot
    product), scored by :meth:`_inner`; top-k therefore uses the engine's exact brute-force search (no
    ``nearest_neighbors`` strategy).

    Args:
        model: A trained Keras model (Sequential or functional) that ends with a ``Dense`` layer, or an
            :class:`InfluenceModel` wrapping one (its loss is used when ``loss_function`` is None).
        train_set: The batched training set ``(inputs, targets[, sample_weight])``.
        loss_function: Per-example loss ``(y_true, y_pred) -> [batch]`` on the model's outputs (after the last
            layer's activation), or None for the compiled (or InfluenceModel's) loss.
        lambda_regularization: λ > 0 of the penalty ``λ‖Θ‖²``.
        explained_class: ``"prediction"``, ``"label"`` or an output index (module docstring).
        tolerance: Stop when ``‖∇R(Θ)‖ ≤ tolerance · 2λ‖Θ‖``, the relative error of ``Θ = Σ_i f̃_i α_iᵀ``.
            None: ``eps^(2/3)`` of the model's dtype (3.7e-11 in float64, 5e-5 in float32).
        max_iterations: Most Newton steps.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Attributes:
        fitted_weights: ``Θ*`` flattened like the layer's weights (kernel, then bias) ``[nb_params]``.
        fit_info: ``{"iterations", "relative_gradient", "converged"}`` of the refit.
        trained_weights: The model's own last-layer weights (they pick the predicted class).

    Example:
        >>> rps = RepresenterPointL2(model, train_ds, loss_fn, lambda_regularization=1e-3)
        >>> indices, values = rps.most_influential(test_ds, train_ds, k=5)  # excitatory examples first
    """

    method_name = "representer_l2"

    def __init__(
        self,
        model: Any,
        train_set: tf.data.Dataset,
        loss_function: Any,
        lambda_regularization: float,
        *,
        explained_class: str | int = "prediction",
        tolerance: float | None = None,
        max_iterations: int = 50,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        if (
            isinstance(lambda_regularization, bool)
            or not isinstance(lambda_regularization, (int, float, np.floating))
            or not math.isfinite(lambda_regularization)
            or lambda_regularization <= 0
        ):
            raise ValueError(
                f"lambda_regularization must be a positive finite number (the λ of λ‖Θ‖²), got "
                f"{lambda_regularization!r}: the representer theorem divides by it, α_i = -∂ℓ_i/∂logits / (2λN)."
            )
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
            raise ValueError(f"max_iterations must be a non-negative integer, got {max_iterations!r}.")
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance!r}.")
        super().__init__(model, train_set, loss_function, explained_class, show_progress, batches_per_shard)
        self.lambda_regularization = float(lambda_regularization)
        epsilon = float(np.finfo(self.model.dtype.as_numpy_dtype).eps)
        self.tolerance = epsilon ** (2 / 3) if tolerance is None else float(tolerance)
        self.max_iterations = max_iterations
        self.objective = self._objective(_SquaredNorm(self.lambda_regularization))
        self.fitted_weights, self.fit_info = self._fit(self.trained_weights)

    # ------------------------------------------------------------------ the refit

    def _relative_gradient(self, gradient: tf.Tensor, theta: tf.Tensor) -> float:
        scale = 2.0 * self.lambda_regularization * float(tf.norm(theta))
        norm = float(tf.norm(gradient))
        return norm / scale if scale > 0 else (0.0 if norm == 0 else math.inf)

    def _fit(self, theta: tf.Tensor) -> tuple[tf.Tensor, dict[str, Any]]:
        """Newton's method (CG directions) with a backtracking line search on R(Θ)."""
        epsilon = float(np.finfo(self.model.dtype.as_numpy_dtype).eps)
        gradient = self.objective.gradient(theta)
        first_norm = max(float(tf.norm(gradient)), epsilon)
        relative = self._relative_gradient(gradient, theta)
        iterations = 0
        while relative > self.tolerance and iterations < self.max_iterations:
            # inexact Newton: solve H d = g to a relative residual that shrinks with the gradient
            solver = ConjugateGradientDescentIHVP(
                None,
                operator=_LastLayerHessian(self.objective, theta),
                tolerance=max(min(0.5, math.sqrt(float(tf.norm(gradient)) / first_norm)), 100 * epsilon),
            )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    direction = solver.solve(gradient[None])[0]
            except ValueError:  # a loss that is not convex in the logits: fall back to the gradient
                direction = gradient
            candidate = self._line_search(theta, gradient, direction)
            if candidate is None:  # no decrease left at this precision
                break
            theta, gradient = candidate
            relative = self._relative_gradient(gradient, theta)
            iterations += 1
        converged = relative <= self.tolerance
        if not converged:
            warnings.warn(
                f"RepresenterPointL2: the refit of the last layer stopped after {iterations} Newton steps with "
                f"‖∇R‖/(2λ‖Θ‖) = {relative:.2e} > tolerance {self.tolerance:.1e}; the representer decomposition "
                "holds to that relative accuracy. Raise max_iterations or lambda_regularization, or use float64.",
                RuntimeWarning,
                stacklevel=3,
            )
        return theta, {"iterations": iterations, "relative_gradient": relative, "converged": converged}

    def _line_search(
        self, theta: tf.Tensor, gradient: tf.Tensor, direction: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor] | None:
        value = self.objective.value(theta)
        slope = float(tf.reduce_sum(gradient * direction))
        step = 1.0
        while step > 1e-10:
            candidate = theta - step * direction
            if self.objective.value(candidate) <= value - 1e-4 * step * slope:
                return candidate, self.objective.gradient(candidate)
            if step == 1.0:
                # near the optimum R changes below its rounding error: accept the Newton step on the gradient norm
                new_gradient = self.objective.gradient(candidate)
                if float(tf.norm(new_gradient)) < 0.5 * float(tf.norm(gradient)):
                    return candidate, new_gradient
            step /= 2
        return None

    # ------------------------------------------------------------------ α and the hooks

    def _alpha(self, features: tf.Tensor, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        """``α_i = -w_i/(2λN) ∂ℓ_i/∂logits_i`` ``[B, C]`` at the refit weights."""
        gradients = self.objective.logit_gradients(self.fitted_weights, features, targets, weights)
        return -gradients / (2.0 * self.lambda_regularization * self.num_train)

    def global_importance(self, train_set: tf.data.Dataset) -> np.ndarray:
        """The representer weights ``α_i`` of training examples (Yeh et al.'s global sample importance).

        Args:
            train_set: Batched training dataset (the one the last layer was refit on, or part of it).

        Returns:
            Array ``[N, num_outputs]`` in dataset order.
        """
        check_dataset(train_set, name="train_set")
        rows = [self._alpha(*self._parts(batch)).numpy() for batch in train_set]
        return np.concatenate(rows) if rows else np.zeros([0, self.num_outputs])

    def _surrogate_weights(self) -> tf.Tensor:
        return self.fitted_weights

    def _configuration(self) -> dict[str, Any]:
        return {**self._base_configuration(), "lambda_regularization": self.lambda_regularization}

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        features, targets, weights = self._parts(batch)
        return tf.concat([self._alpha(features, targets, weights), features], axis=1)

    def _transforms(self, batch: Any) -> tf.Tensor:
        features, targets, _ = self._parts(batch)
        return tf.concat([self._directions(features, targets), features], axis=1)

    def _inner(self, transforms: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        classes = self.num_outputs
        signed_alpha = tf.matmul(transforms[:, :classes], vectors[:, :classes], transpose_b=True)  # s · α_{i,c}
        kernel = tf.matmul(transforms[:, classes:], vectors[:, classes:], transpose_b=True)  # f̃(x) · f̃_i
        return signed_alpha * kernel

    def _self_influence(self, batch: Any) -> tf.Tensor:
        features, targets, weights = self._parts(batch)
        signed_alpha = tf.reduce_sum(self._directions(features, targets) * self._alpha(features, targets, weights), 1)
        return signed_alpha * tf.reduce_sum(tf.square(features), axis=1)


class RepresenterPointLJE(_RepresenterCalculator):
    """Representer points via a local Jacobian expansion (Sui, Wu & Wang, NeurIPS 2021: RPS-LJE).

    No refit: the trained last layer ``θ̂`` is moved one gradient-ascent step away, ``θ₀ = θ̂ + η ∇R(θ̂)``, and the
    first-order expansion of the gradient around ``θ₀`` (one Newton step back) decomposes the last layer:

        θ_N = θ₀ - H⁻¹ ∇R(θ₀) = Σ_i (1/N) [θ₀ - H⁻¹∇Ω(θ₀) - H⁻¹ ∇(w_i ℓ_i)(θ₀)],

    where ``R = (1/N) Σ_i w_i ℓ_i + Ω`` is the last layer's training objective (``Ω`` its own weight regularizers,
    often none), ``H = ∇²R(θ₀) + damping·I`` (inverted by ``ihvp_calculator``) and ``η = step_size`` (Sui et al. take
    one step of gradient ascent; ``step_size=0`` expands at ``θ̂`` itself). The influence vector of ``z_i`` is its
    term of that sum (``[nb_params]`` of the last layer); the transform of ``x`` is ``s·∇_θ logit_c(x)``, that is
    ``s·vec(f̃(x) e_cᵀ)``, so scores are dot products and every top-k strategy applies.

    Sign and scale: the score of training example ``z_i`` for test example ``x`` is

        score(z_i, x) = s·[(θ₀ - H⁻¹∇Ω(θ₀))ᵀ f̃(x)]_c / N  -  s·∇_θ logit_c(x)ᵀ H⁻¹ ∇(w_i ℓ_i)(θ₀) / N.

    The first term is the same for every training example (an equal share of the expansion point's output); the
    second is the first-order change of the explained logit of ``x`` when ``z_i`` is up-weighted by ``1/N``.
    Positive = excitatory (a proponent). The scores of the ``N`` training examples sum exactly to ``s`` times the
    explained logit of the Newton-step layer ``θ_N`` (:meth:`surrogate_logits`), in logit units; ``θ_N = θ̂`` when
    ``step_size=0`` and ``θ̂`` is a stationary point of ``R``, and ``θ_N - θ̂ = O(η²)`` near one.

    ``H`` must be invertible. A softmax layer whose bias is not regularized has a singular Hessian (adding the same
    constant to every logit changes no probability; likewise for kernel columns without a penalty): pass
    ``damping > 0`` there. The exact solver may not notice a matrix that is singular only up to rounding.

    Args:
        model: A trained Keras model (Sequential or functional) that ends with a ``Dense`` layer, or an
            :class:`InfluenceModel` wrapping one.
        train_set: The batched training set ``(inputs, targets[, sample_weight])``.
        loss_function: Per-example loss on the model's outputs, or None for the compiled (or InfluenceModel's) loss.
        step_size: η of the gradient-ascent step away from the trained weights.
        ihvp_calculator: Name of the solver of the last layer's Hessian: ``"exact"`` (default: a last layer is
            usually small), ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
        damping: δ ≥ 0 added to that Hessian; None (default) keeps the solver's default (the exact solver's
            ``"auto"``: none unless the Hessian is singular, then 1e-3 of its mean eigenvalue).
        ihvp_options: Other options of the solver (e.g. ``{"tolerance": 1e-10}`` for CG).
        explained_class: ``"prediction"``, ``"label"`` or an output index (module docstring).
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Attributes:
        expansion_point: ``θ₀`` ``[nb_params]``, flattened like the layer's weights (kernel, then bias).
        trained_weights: ``θ̂``, the model's own last-layer weights.
        ihvp: The solver of ``H``.

    Example:
        >>> lje = RepresenterPointLJE(model, train_ds, loss_fn, step_size=1e-2)
        >>> scores = lje.influence_matrix(test_ds, train_ds)  # rows sum to the explained logits
    """

    method_name = "representer_lje"

    def __init__(
        self,
        model: Any,
        train_set: tf.data.Dataset,
        loss_function: Any = None,
        *,
        step_size: float = 1e-2,
        ihvp_calculator: str = "exact",
        damping: float | None = None,
        ihvp_options: dict[str, Any] | None = None,
        explained_class: str | int = "prediction",
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not math.isfinite(step_size):
            raise ValueError(f"step_size must be a finite number, got {step_size!r}.")
        if not isinstance(ihvp_calculator, str):
            raise TypeError(
                "ihvp_calculator must be a solver name ('exact', 'cg', 'lissa', 'arnoldi'): the solver works on the "
                f"last layer's Hessian at the expansion point, which this calculator builds; got {ihvp_calculator!r}."
            )
        super().__init__(model, train_set, loss_function, explained_class, show_progress, batches_per_shard)
        self.step_size = float(step_size)
        self.objective = self._objective(_layer_penalty(self.head))
        self.expansion_point = self.trained_weights + self.step_size * self.objective.gradient(self.trained_weights)
        self.ihvp: InverseHessianVectorProduct = resolve_solver(  # the solver only sees the operator
            ihvp_calculator,
            self.model,
            None,
            damping=damping,
            operator=_LastLayerHessian(self.objective, self.expansion_point),
            **(ihvp_options or {}),
        )
        constant = self.expansion_point
        regularization_gradient = self.objective.penalty_gradient(self.expansion_point)
        if float(tf.norm(regularization_gradient)) > 0:
            constant -= self.ihvp.solve(regularization_gradient[None])[0]
        self._constant = constant / self.num_train
        self._newton_weights: tf.Tensor | None = None

    def _surrogate_weights(self) -> tf.Tensor:
        if self._newton_weights is None:
            step = self.ihvp.solve(self.objective.gradient(self.expansion_point)[None])[0]
            self._newton_weights = self.expansion_point - step
        return self._newton_weights

    def _configuration(self) -> dict[str, Any]:
        return {**self._base_configuration(), "step_size": self.step_size, "ihvp": self.ihvp.configuration()}

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        gradients = self.objective.per_example_gradients(self.expansion_point, *self._parts(batch))
        return self._constant[None] - self.ihvp.solve(gradients) / self.num_train

    def _transforms(self, batch: Any) -> tf.Tensor:
        features, targets, _ = self._parts(batch)
        directions = self._directions(features, targets)
        return tf.reshape(features[:, :, None] * directions[:, None, :], [tf.shape(features)[0], -1])
