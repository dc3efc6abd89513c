"""Conjugate gradient for many right-hand sides at once."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.base import InverseHessianVectorProduct
from influenciae.hessian.operator import as_row_operator
from influenciae.model import InfluenceModel

__all__ = ["ConjugateGradientDescentIHVP", "ConvergenceInfo", "default_tolerance"]

LOGGER = logging.getLogger("influenciae")


@dataclasses.dataclass(frozen=True)
class ConvergenceInfo:
    """What an iterative solve did.

    Attributes:
        iterations: Number of operator products (passes over the Hessian dataset).
        residual_norms: Final relative residuals ``‖b - A x‖ / ‖b‖`` per right-hand side ``[n]``.
        converged: Whether each right-hand side reached the tolerance ``[n]``.
    """

    iterations: int
    residual_norms: np.ndarray
    converged: np.ndarray


class ConjugateGradientDescentIHVP(InverseHessianVectorProduct, name="cg"):
    """Preconditioned conjugate gradient on ``(H + λI) x = v`` for a block of right-hand sides.

    Every iteration applies the operator once to the block of still-unconverged vectors (one pass over the Hessian
    dataset for all of them). Works for any model: it only needs Hessian-vector products.

    Args:
        model: The wrapped model.
        dataset: The Hessian dataset.
        damping: λ ≥ 0. CG needs a positive-definite operator; damping makes a PSD Hessian so.
        tolerance: Stop a right-hand side when ``‖v - (H+λI)x‖ ≤ tolerance · ‖v‖``. None (default) scales it to
            the dtype: ``max(1e-8, 100 · eps)``, i.e. 1e-8 in float64 and about 1.2e-5 in float32 (a float32
            residual cannot go much below that, so a fixed 1e-8 never converges there).
        max_iterations: Most operator products per solve (default: ``min(P, 200)``).
        preconditioner: Optional ``M ≈ (H+λI)⁻¹``: a callable on rows ``[n, P] -> [n, P]``, a
            ``tf.linalg.LinearOperator`` or a dense matrix.
        operator: See :class:`InverseHessianVectorProduct`.
        curvature: ``"hessian"`` (default), ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``: the matrix
            inverted (see :mod:`influenciae.hessian.ggn`).
        curvature_options: Options of the curvature operator (e.g. the Fisher's estimator).

    Attributes:
        info: :class:`ConvergenceInfo` of the last :meth:`solve`.

    Example:
        >>> ihvp = ConjugateGradientDescentIHVP(im, train_ds, damping=1e-3, tolerance=1e-8)
        >>> x = ihvp.solve(v); ihvp.info.converged.all()
    """

    def __init__(
        self,
        model: InfluenceModel | None,
        dataset: tf.data.Dataset | None = None,
        *,
        damping: float = 0.0,
        tolerance: float | None = None,
        max_iterations: int | None = None,
        preconditioner: Any | None = None,
        operator: Any | None = None,
        curvature: str = "hessian",
        curvature_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model,
            dataset,
            damping=damping,
            operator=operator,
            curvature=curvature,
            curvature_options=curvature_options,
        )
        if tolerance is None:
            tolerance = default_tolerance(self.dtype)
        if not tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance!r}.")
        if max_iterations is not None and (not isinstance(max_iterations, int) or max_iterations <= 0):
            raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}.")
        self.tolerance = float(tolerance)
        self.max_iterations = max_iterations or min(self.nb_params, 200)
        self.preconditioner = _as_row_function(preconditioner)
        self.info: ConvergenceInfo | None = None

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        right = np.array(vectors, copy=True)
        norms = np.linalg.norm(right, axis=1)
        norms[norms == 0] = 1.0
        solution = np.zeros_like(right)
        residual = right.copy()
        search = self._precondition(residual)
        residual_dot = np.einsum("ij,ij->i", residual, search)
        active = np.linalg.norm(residual, axis=1) / norms > self.tolerance
        iterations = 0
        bar = self.progress(self.max_iterations, "CG iterations")
        while active.any() and iterations < self.max_iterations:
            rows = np.flatnonzero(active)
            product = self.operator.matmul_rows(tf.constant(search[rows])).numpy()
            iterations += 1
            bar.update(1)
            curvature = np.einsum("ij,ij->i", search[rows], product)
            if np.any(curvature <= 0):
                raise ValueError(
                    "Conjugate gradient met a direction of non-positive curvature: the Hessian (with damping "
                    f"{self.damping}) is not positive definite. Add damping, or use ExactIHVP(method='eigh', "
                    "allow_indefinite=True) or ArnoldiIHVP."
                )
            step = residual_dot[rows] / curvature
            solution[rows] += step[:, None] * search[rows]
            residual[rows] -= step[:, None] * product
            preconditioned = self._precondition(residual[rows])
            new_dot = np.einsum("ij,ij->i", residual[rows], preconditioned)
            search[rows] = preconditioned + (new_dot / residual_dot[rows])[:, None] * search[rows]
            residual_dot[rows] = new_dot
            active[rows] = np.linalg.norm(residual[rows], axis=1) / norms[rows] > self.tolerance
        bar.close()
        relative = np.linalg.norm(residual, axis=1) / norms
        self.info = ConvergenceInfo(iterations, relative, relative <= self.tolerance)
        LOGGER.info(
            "CG: damping=%.3e, tolerance=%.1e, %d iterations, max relative residual %.2e, converged %d/%d.",
            self.damping,
            self.tolerance,
            iterations,
            float(relative.max()) if relative.size else 0.0,
            int(self.info.converged.sum()),
            int(relative.size),
        )
        if not self.info.converged.all():
            warnings.warn(
                f"Conjugate gradient stopped after {iterations} iterations with relative residuals up to "
                f"{relative.max():.2e} > tolerance {self.tolerance:.1e}. Raise max_iterations, add damping or "
                "use a preconditioner.",
                RuntimeWarning,
                stacklevel=3,
            )
        return tf.constant(solution, dtype=self.dtype)

    def _precondition(self, rows: np.ndarray) -> np.ndarray:
        if self.preconditioner is None:
            return rows.copy()
        return np.array(self.preconditioner(tf.constant(rows, dtype=self.dtype)), copy=True)


def default_tolerance(dtype: tf.DType) -> float:
    """CG's default relative-residual tolerance for ``dtype``: ``max(1e-8, 100 · eps)``."""
    return max(1e-8, 100.0 * float(np.finfo(dtype.as_numpy_dtype).eps))


def _as_row_function(preconditioner: Any | None) -> Callable[[tf.Tensor], Any] | None:
    if preconditioner is None or callable(preconditioner) and not isinstance(preconditioner, tf.linalg.LinearOperator):
        return preconditioner
    return as_row_operator(preconditioner).matmul_rows
