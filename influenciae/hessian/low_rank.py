"""The low-rank eigen solvers' base: ``k`` eigenpairs ``(λ_i, u_i)`` of a curvature, fitted once, solved in their span.

Arnoldi (:mod:`~influenciae.hessian.arnoldi`) decomposes ``H + λI`` on a Krylov subspace and inverts it on the span
of its eigenvectors; Nyström (:mod:`~influenciae.hessian.nystrom`) sketches ``H`` and inverts ``Â + λI`` on the whole
space (Woodbury). Both keep ``eigenvalues [k]`` and ``eigenvectors [k, P]`` (orthonormal rows), computed lazily by
their :meth:`LowRankEigenIHVP._decompose` hook, and solve with the same formula
``(v Uᵀ / (Λ + shift)) U (+ (v - v Uᵀ U) / λ)``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.base import InverseHessianVectorProduct

__all__ = ["LowRankEigenIHVP", "LowRankOptions"]


@dataclasses.dataclass(frozen=True)
class LowRankOptions:
    """The setting every low-rank eigen solver has.

    Attributes:
        seed: Seed of the random start (Arnoldi) or test matrix (Nyström).
    """

    seed: int = 0


class LowRankEigenIHVP(InverseHessianVectorProduct):
    """Base of the solvers that keep ``k`` eigenpairs of a curvature.

    Subclasses implement :meth:`_decompose` (returning numpy ``values [k]`` and ``vectors [k, P]``) and set
    :attr:`damping_in_eigenvalues`: True when the eigenvalues are those of the damped operator ``H + λI`` (the solve
    then stays in their span), False when they are those of ``H`` (the solve adds λ and inverts the complement of
    the span by ``1/λ``).

    Their settings are a :class:`LowRankOptions` subclass (at least the ``seed``).
    """

    damping_in_eigenvalues: ClassVar[bool] = True

    options_class: ClassVar[type | None] = LowRankOptions

    def _configure(self) -> None:
        self.seed = int(self.options.seed)
        self._eigenvalues: tf.Tensor | None = None
        self._eigenvectors: tf.Tensor | None = None

    @property
    def eigenvalues(self) -> tf.Tensor:
        """``[k]`` kept eigenvalues (see the subclass for their order and whether they include the damping)."""
        self._fit_eigenpairs()
        return self._eigenvalues

    @property
    def eigenvectors(self) -> tf.Tensor:
        """``[k, P]`` matching orthonormal eigenvectors (rows)."""
        self._fit_eigenpairs()
        return self._eigenvectors

    def _fit_eigenpairs(self) -> None:
        if self._eigenvalues is not None:
            return
        values, vectors = self._decompose()
        self._eigenvalues = tf.constant(values, dtype=self.dtype)
        self._eigenvectors = tf.constant(vectors, dtype=self.dtype)

    @abc.abstractmethod
    def _decompose(self) -> tuple[np.ndarray, np.ndarray]:
        """The eigenpairs ``(values [k], vectors [k, P])``, computed once, validated (no numerically zero value)."""

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        basis = self.eigenvectors  # [k, P]
        coordinates = tf.matmul(vectors, basis, transpose_b=True)  # [n, k]
        if self.damping_in_eigenvalues:
            return tf.matmul(coordinates / self.eigenvalues, basis)
        damping = tf.constant(self.damping, self.dtype)
        inside = tf.matmul(coordinates / (self.eigenvalues + damping), basis)
        if self.damping == 0.0:
            return inside
        return inside + (vectors - tf.matmul(coordinates, basis)) / damping
