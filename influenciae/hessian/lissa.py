"""LiSSA: inverse-HVPs through a truncated Neumann series (Agarwal et al., 2017)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.base import InverseHessianVectorProduct
from influenciae.hessian.conjugate_gradient import ConvergenceInfo
from influenciae.hessian.operator import HessianOperator, RowOperator

LOGGER = logging.getLogger("influenciae")

__all__ = ["LissaIHVP", "LissaOptions", "largest_eigenvalue"]


@dataclasses.dataclass(frozen=True)
class LissaOptions:
    """The settings of :class:`LissaIHVP`, validated on construction.

    Attributes:
        scale: ``s``; ``None`` estimates ``1.1 · λ_max(H + λI)`` with ``power_iterations`` products.
        depth: Most recursion steps.
        tolerance: Stop when a step changes the estimate by less than ``tolerance`` (relative).
        batches_per_step: ``None`` for full-dataset steps, or an int for stochastic steps.
        num_repeats: Independent stochastic runs averaged (ignored for full-dataset steps).
        power_iterations: Products used to estimate the scale.
        seed: Seed of the power iteration's start vector.
        dense: Whether the deterministic recursion runs on the dense ``H + λI`` (formed once, ``P`` products, kept)
            instead of passing over the data at every step; None (default) when the rows times ``depth`` reach
            ``P`` (and ``P ≤ DENSE_MAX_PARAMS``, for an operator that reads a dataset), as CG decides.
    """

    scale: float | None = None
    depth: int = 1000
    tolerance: float = 1e-5
    batches_per_step: int | None = None
    num_repeats: int = 1
    power_iterations: int = 30
    seed: int = 0
    dense: bool | None = None

    def __post_init__(self) -> None:
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale!r}.")
        for argument in ("depth", "num_repeats", "power_iterations"):
            value = getattr(self, argument)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{argument} must be a positive integer, got {value!r}.")
        if self.batches_per_step is not None and (
            not isinstance(self.batches_per_step, int) or self.batches_per_step <= 0
        ):
            raise ValueError(f"batches_per_step must be a positive integer or None, got {self.batches_per_step!r}.")


class LissaIHVP(InverseHessianVectorProduct, name="lissa"):
    """Neumann-series recursion ``h ← v + (I - (H + λI)/s) h``, whose fixed point is ``s (H + λI)⁻¹ v``.

    The series converges when the scale ``s`` exceeds the largest eigenvalue of ``H + λI`` and the matrix is
    positive definite. By default ``s`` is estimated by power iteration and each step uses the whole Hessian dataset
    (a deterministic series, accurate to ``tolerance``); ``batches_per_step=k`` switches to the original stochastic
    LiSSA, each step using the next ``k`` batches of the dataset (cheaper steps, noisier answer; average with
    ``num_repeats``).

    Built like every solver (:class:`~influenciae.hessian.base.InverseHessianVectorProduct`: ``(model, dataset,
    options=None, *, damping=..., operator=..., curvature=..., curvature_options=..., **settings)``); its settings
    are the fields of :class:`LissaOptions`, as keywords or as one ``options=`` instance. ``damping``: λ ≥ 0.

    Raises:
        ValueError: From :meth:`solve`, when the series diverges (scale too small or an indefinite Hessian).

    Example:
        >>> ihvp = LissaIHVP(im, train_ds, damping=1e-2)
        >>> x = ihvp.solve(v)
    """

    iterative = True  # every solve passes over the Hessian dataset: callers hand it large blocks

    options_class = LissaOptions

    def _configure(self) -> None:
        options: LissaOptions = self.options
        if options.batches_per_step is not None and not isinstance(self.hessian, HessianOperator):
            raise ValueError("Stochastic LiSSA (batches_per_step) needs the Hessian of a model over a dataset.")
        self._scale = options.scale
        self.depth = options.depth
        self.tolerance = float(options.tolerance)
        self.batches_per_step = options.batches_per_step
        self.num_repeats = options.num_repeats
        self.power_iterations = options.power_iterations
        self.seed = options.seed
        self.dense = options.dense
        self._graph_recursions: dict[tuple[int, int | None], Any] = {}
        self._graph_failed = False
        self.info: ConvergenceInfo | None = None

    @property
    def scale(self) -> float:
        """The scale ``s`` (estimated on first use when not given)."""
        if self._scale is None:
            self._scale = 1.1 * largest_eigenvalue(self.operator, self.power_iterations, seed=self.seed)
        return self._scale

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        if self.batches_per_step is None:
            operator = self._dense_when_cheaper(int(vectors.shape[0]) * self.depth, self.dense)
            return self._recursion(vectors, operator.matmul_rows, operator)
        estimates = [self._recursion(vectors, self._stochastic_product(), None) for _ in range(self.num_repeats)]
        return tf.add_n(estimates) / float(self.num_repeats)

    def _stochastic_product(self) -> Any:
        hessian = self.hessian
        if not isinstance(hessian, HessianOperator):  # pragma: no cover - guarded in __init__
            raise TypeError("Stochastic LiSSA needs a HessianOperator.")
        batches = hessian.sampled_batches(self.seed)
        damping = tf.constant(self.damping, self.dtype)

        def product(rows: tf.Tensor) -> tf.Tensor:
            sample = [next(batches) for _ in range(self.batches_per_step or 1)]
            return hessian.sample_matmul_rows(sample, rows) + damping * rows

        return product

    def _recursion(self, vectors: tf.Tensor, product: Any, operator: RowOperator | None) -> tf.Tensor:
        scale = tf.constant(self.scale, self.dtype)
        start_norm = float(tf.reduce_max(tf.norm(vectors, axis=1))) or 1.0
        limit = 1e8 * start_norm * max(1.0, self.scale)
        bar = self.progress(self.depth, "LiSSA steps")
        graph = False
        if operator is not None and operator.traceable and not self._graph_failed:
            graph = True
            padded, length = self._static_rows(vectors)
            try:
                estimate, step, change, diverged = self._graph_function(operator, length)(
                    padded,  # zero rows stay zero
                    scale,
                    tf.constant(limit, tf.float64),
                    tf.constant(self.tolerance, tf.float64),
                    tf.constant(self.depth, tf.int32),
                )
            except (ValueError, NotImplementedError, LookupError):
                # the product could not be built inside the loop's graph: step eagerly (the operator falls back)
                self._graph_failed, graph = True, False
            else:
                estimate = estimate[: int(vectors.shape[0])]
                step, change, diverged = int(step), float(change), bool(diverged)
                bar.update(step)
        if not graph:
            estimate, step, change, diverged = vectors, 0, np.inf, False
            for step in range(1, self.depth + 1):  # noqa: B007 - the last step is reported in info
                updated, norm, change_tensor = _lissa_step(vectors, estimate, product(estimate), scale)
                bar.update(1)
                norm = float(norm)
                if not np.isfinite(norm) or norm > limit:
                    diverged = True
                    break
                change = float(change_tensor)
                estimate = updated
                if self.batches_per_step is None and change < self.tolerance:
                    break
        bar.close()
        if diverged:
            raise ValueError(
                f"LiSSA diverged after {step} steps (scale {self.scale:.3e}, damping {self.damping}): the scale "
                "must exceed the largest eigenvalue of H + damping·I, and H + damping·I must be positive "
                "definite. Raise scale, add damping, or use 'cg'."
            )
        converged = np.full([int(vectors.shape[0])], change < self.tolerance)
        self.info = ConvergenceInfo(step, np.full([int(vectors.shape[0])], change), converged)
        LOGGER.info(
            "LiSSA: damping=%.3e, scale=%.3e, %d steps, last relative change %.2e, converged=%s.",
            self.damping,
            self.scale,
            step,
            change,
            bool(converged.all()),
        )
        if self.batches_per_step is None and not converged.all():
            warnings.warn(
                f"LiSSA did not converge: after {step} steps (depth {self.depth}) the relative change is "
                f"{change:.2e} > tolerance {self.tolerance:.1e} (scale {self.scale:.3e}, damping {self.damping}); "
                "the result may be far from (H + damping·I)⁻¹ v. The series converges only when H + damping·I is "
                "positive definite: add damping (e.g. damping=1e-3), raise scale or depth, or use 'cg'/'exact'. "
                "See ihvp.info.",
                RuntimeWarning,
                stacklevel=4,
            )
        return estimate / scale

    def _graph_function(self, row_operator: RowOperator, length: int | None) -> Any:
        """The deterministic recursion over the whole block as one ``tf.function`` (a ``tf.while_loop``), for a
        traceable operator; traced once per solver, operator and static row count ``length``
        (:meth:`_static_rows`) for any scale, tolerance and depth."""
        if (id(row_operator), length) not in self._graph_recursions:
            operator = row_operator.matmul_rows
            signature = [
                tf.TensorSpec([length, self.nb_params], self.dtype),
                tf.TensorSpec([], self.dtype),
                tf.TensorSpec([], tf.float64),
                tf.TensorSpec([], tf.float64),
                tf.TensorSpec([], tf.int32),
            ]

            def recursion(
                vectors: tf.Tensor, scale: tf.Tensor, limit: tf.Tensor, tolerance: tf.Tensor, depth: tf.Tensor
            ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
                def proceed(estimate: Any, step: Any, change: Any, diverged: Any) -> tf.Tensor:
                    stopped = tf.logical_or(diverged, tf.logical_and(step > 0, change < tolerance))
                    return tf.logical_and(step < depth, tf.logical_not(stopped))

                def iterate(estimate: Any, step: Any, change: Any, diverged: Any) -> tuple[Any, Any, Any, Any]:
                    updated, norm, new_change = _lissa_step(vectors, estimate, operator(estimate), scale)
                    blown = tf.logical_or(tf.logical_not(tf.math.is_finite(norm)), norm > limit)
                    # a diverged step is not taken (the eager loop raises before it), as in the eager loop
                    estimate = tf.cond(blown, lambda: estimate, lambda: updated)
                    change = tf.where(blown, change, new_change)
                    return estimate, step + 1, change, blown

                start = (vectors, tf.constant(0, tf.int32), tf.constant(np.inf, tf.float64), tf.constant(False))
                return tf.while_loop(proceed, iterate, start)

            self._graph_recursions[(id(row_operator), length)] = tf.function(
                recursion, input_signature=signature, autograph=False
            )
        return self._graph_recursions[(id(row_operator), length)]


def _lissa_step(
    vectors: tf.Tensor, estimate: tf.Tensor, product: tf.Tensor, scale: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One recursion step ``h ← v + h - A h / s``; returns the new ``h`` and, in float64, its largest row norm and
    the relative change ``max ‖h_new - h‖ / max(max ‖h_new‖, 1e-300)`` (the arithmetic of Python floats)."""
    updated = vectors + estimate - product / scale
    norm = tf.cast(tf.reduce_max(tf.norm(updated, axis=1)), tf.float64)
    moved = tf.cast(tf.reduce_max(tf.norm(updated - estimate, axis=1)), tf.float64)
    return updated, norm, moved / tf.maximum(norm, tf.constant(1e-300, tf.float64))


def largest_eigenvalue(operator: Any, num_iterations: int = 30, *, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of a symmetric row operator by power iteration.

    Args:
        operator: A :class:`~influenciae.hessian.operator.RowOperator`.
        num_iterations: Operator products.
        seed: Seed of the random start vector.

    Returns:
        The Rayleigh quotient after ``num_iterations`` steps (a lower bound of ``|λ|_max`` up to convergence).
    """
    rng = np.random.default_rng(seed)
    vector = tf.constant(rng.standard_normal((1, operator.num_params)), dtype=operator.dtype)
    vector /= tf.norm(vector)
    value = 0.0
    for _ in range(num_iterations):
        product = operator.matmul_rows(vector)
        value = float(tf.reduce_sum(product * vector))
        norm = tf.norm(product)
        if float(norm) == 0.0:
            return 0.0
        vector = product / norm
    return abs(value)
