"""Exact inverse-HVPs through the dense Hessian (small models: P up to a few thousand)."""

from __future__ import annotations

from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.base import InverseHessianVectorProduct, relative_tolerance
from influenciae.model import InfluenceModel

__all__ = ["ExactIHVP"]


class ExactIHVP(InverseHessianVectorProduct, name="exact"):
    """Form ``H + λI`` densely and factorize it once (lazily, on first use).

    ``method="cholesky"`` (default) needs a positive-definite matrix and says how much damping would make it so;
    ``method="eigh"`` inverts through the eigendecomposition and can accept an indefinite (but non-singular) matrix
    with ``allow_indefinite=True``, as in Koh & Liang's non-convex experiments.

    Args:
        model: The wrapped model.
        dataset: The Hessian dataset.
        damping: λ ≥ 0.
        method: ``"cholesky"`` or ``"eigh"``.
        allow_indefinite: Accept negative eigenvalues with ``method="eigh"``.
        max_params: Refuse to form a dense matrix beyond this many parameters (P² memory).
        operator: See :class:`InverseHessianVectorProduct`.
        curvature: ``"hessian"`` (default), ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``: the matrix
            inverted (see :mod:`influenciae.hessian.ggn`).
        curvature_options: Options of the curvature operator (e.g. the Fisher's estimator).

    Example:
        >>> ihvp = ExactIHVP(im, train_ds, damping=1e-3)
        >>> x = ihvp.solve(gradients)  # [n, P]
    """

    def __init__(
        self,
        model: InfluenceModel | None,
        dataset: tf.data.Dataset | None = None,
        *,
        damping: float = 0.0,
        method: str = "cholesky",
        allow_indefinite: bool = False,
        max_params: int = 20_000,
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
        if method not in ("cholesky", "eigh"):
            raise ValueError(f"method must be 'cholesky' or 'eigh', got {method!r}.")
        if self.nb_params > max_params:
            raise ValueError(
                f"ExactIHVP forms a dense {self.nb_params}x{self.nb_params} Hessian, above max_params={max_params}. "
                "Use 'cg', 'lissa' or 'arnoldi', watch fewer weights (start_layer/last_layer), or raise max_params."
            )
        self.method = method
        self.allow_indefinite = allow_indefinite
        self._matrix: tf.Tensor | None = None
        self._factor: tf.Tensor | None = None
        self._eigenvalues: tf.Tensor | None = None
        self._eigenvectors: tf.Tensor | None = None

    @property
    def matrix(self) -> tf.Tensor:
        """The dense, symmetrized ``H + λI`` ``[P, P]``."""
        if self._matrix is None:
            dense = self.operator.to_dense()
            self._matrix = (dense + tf.transpose(dense)) / 2.0
        return self._matrix

    def _factorize(self) -> None:
        matrix = self.matrix
        if self.method == "cholesky":
            try:
                factor = tf.linalg.cholesky(matrix)
            except tf.errors.InvalidArgumentError:
                factor = None
            if factor is not None and bool(tf.reduce_all(tf.math.is_finite(factor))):
                self._factor = factor
                return
            self._raise_not_positive_definite(tf.linalg.eigvalsh(matrix))
        eigenvalues, eigenvectors = tf.linalg.eigh(matrix)
        magnitude = tf.abs(eigenvalues)
        threshold = relative_tolerance(self.dtype) * self.nb_params * float(tf.reduce_max(magnitude))
        if float(tf.reduce_min(magnitude)) <= threshold:
            raise ValueError(
                f"The Hessian is singular: its smallest eigenvalue magnitude is {float(tf.reduce_min(magnitude)):.3e} "
                f"(largest {float(tf.reduce_max(magnitude)):.3e}). Add damping, e.g. damping="
                f"{max(1e-3 * float(tf.reduce_max(magnitude)), 1e-8):.1e}."
            )
        if float(tf.reduce_min(eigenvalues)) < 0 and not self.allow_indefinite:
            self._raise_not_positive_definite(eigenvalues)
        self._eigenvalues, self._eigenvectors = eigenvalues, eigenvectors

    def _raise_not_positive_definite(self, eigenvalues: tf.Tensor) -> None:
        smallest = float(tf.reduce_min(eigenvalues))
        largest = float(tf.reduce_max(tf.abs(eigenvalues)))
        suggestion = self.damping + max(-smallest, 0.0) + max(1e-3 * largest, float(np.finfo(np.float32).eps))
        raise ValueError(
            f"The Hessian (damping {self.damping}) is not positive definite: smallest eigenvalue {smallest:.3e}, "
            f"largest magnitude {largest:.3e}. It is singular or indefinite (e.g. a model not at a minimum, or "
            f"unused parameters). Add damping (damping >= {suggestion:.1e} makes it positive definite), or use "
            "method='eigh' with allow_indefinite=True."
        )

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        if self._factor is None and self._eigenvalues is None:
            self._factorize()
        if self._factor is not None:
            return tf.transpose(tf.linalg.cholesky_solve(self._factor, tf.transpose(vectors)))
        coordinates = tf.matmul(vectors, self._eigenvectors) / self._eigenvalues
        return tf.matmul(coordinates, self._eigenvectors, transpose_b=True)
