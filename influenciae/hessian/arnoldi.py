"""Arnoldi: a low-rank eigendecomposition of the Hessian from a Krylov subspace (Schioppa et al., 2022)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.base import refuse_half_precision, relative_tolerance
from influenciae.hessian.low_rank import LowRankEigenIHVP, LowRankOptions

LOGGER = logging.getLogger("influenciae")

__all__ = ["ArnoldiIHVP", "ArnoldiOptions", "arnoldi_iteration"]


@dataclasses.dataclass(frozen=True)
class ArnoldiOptions(LowRankOptions):
    """The settings of :class:`ArnoldiIHVP` (the ranges that depend on P are checked by the solver).

    Attributes:
        seed: Seed of the random start vector.
        subspace_dim: Krylov subspace dimension ``m`` (None: ``min(P, 200)``).
        k_largest_eig_vals: Eigenpairs kept, ``k ≤ m`` (None: ``m // 2``: the Ritz values of the last Krylov
            directions have not converged; ``m`` when ``m = P``, where all are exact). Asking ``k = m < P`` warns.
        force_hermitian: Symmetrize the projected matrix (the Hessian is symmetric; this removes round-off).
    """

    subspace_dim: int | None = None
    k_largest_eig_vals: int | None = None
    force_hermitian: bool = True


class ArnoldiIHVP(LowRankEigenIHVP, name="arnoldi"):
    """Invert ``H + λI`` on the span of its ``k_largest_eig_vals`` eigenpairs of LARGEST magnitude.

    Runs ``subspace_dim`` Arnoldi steps (one operator product each, with full re-orthogonalization), diagonalizes the
    projected matrix and keeps the ``k`` eigenpairs of largest ``|λ|``. Then ``solve(v) = U diag(1/λ) Uᵀ v``: exact
    when ``k = P``, and otherwise the directions of small curvature are dropped (Schioppa et al.).

    Built like every solver (:class:`~influenciae.hessian.base.InverseHessianVectorProduct`: ``(model, dataset,
    options=None, *, damping=..., operator=..., curvature=..., curvature_options=..., **settings)``); its settings
    are the fields of :class:`ArnoldiOptions`, as keywords or as one ``options=`` instance. ``damping``: λ ≥ 0.

    Attributes:
        eigenvalues: ``[k]`` kept eigenvalues of ``H + λI`` (computed lazily).
        eigenvectors: ``[k, P]`` orthonormal eigenvectors, one per row.

    Example:
        >>> ihvp = ArnoldiIHVP(im, train_ds, subspace_dim=100, k_largest_eig_vals=50)
        >>> ihvp.eigenvalues[:5]
    """

    damping_in_eigenvalues = True  # the eigenpairs of H + λI: solutions stay in their span
    fitted_state = "eigen"

    options_class = ArnoldiOptions

    def _configure(self) -> None:
        super()._configure()
        options: ArnoldiOptions = self.options
        subspace_dim, k_largest_eig_vals = options.subspace_dim, options.k_largest_eig_vals
        refuse_half_precision(self.dtype, "ArnoldiIHVP", "the eigendecomposition of its Krylov projection")
        subspace_dim = min(self.nb_params, 200) if subspace_dim is None else subspace_dim
        if k_largest_eig_vals is None:
            # the Ritz values of the last Krylov directions have not converged: keep the better half
            k_largest_eig_vals = subspace_dim if subspace_dim == self.nb_params else max(1, subspace_dim // 2)
        elif k_largest_eig_vals == subspace_dim < self.nb_params:
            warnings.warn(
                f"ArnoldiIHVP keeps all {subspace_dim} Ritz values of a {subspace_dim}-dimensional Krylov subspace "
                f"(P = {self.nb_params}): the smallest of them have not converged and can spoil the scores. Keep "
                f"about half (k_largest_eig_vals={max(1, subspace_dim // 2)}, the default) or raise subspace_dim.",
                RuntimeWarning,
                stacklevel=3,
            )
        if not isinstance(subspace_dim, int) or not 0 < subspace_dim <= self.nb_params:
            raise ValueError(
                f"subspace_dim must be an integer in [1, nb_params={self.nb_params}], got {subspace_dim!r}."
            )
        if not isinstance(k_largest_eig_vals, int) or not 0 < k_largest_eig_vals <= subspace_dim:
            raise ValueError(
                f"k_largest_eig_vals must be an integer in [1, subspace_dim={subspace_dim}], "
                f"got {k_largest_eig_vals!r}."
            )
        self.subspace_dim = subspace_dim
        self.k_largest_eig_vals = k_largest_eig_vals
        self.force_hermitian = options.force_hermitian

    def _decompose(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` eigenvalues of ``H + λI`` of largest magnitude, in decreasing magnitude, and their vectors."""
        bar = self.progress(self.subspace_dim, "Arnoldi steps")
        basis, projected = arnoldi_iteration(self.operator, self.subspace_dim, seed=self.seed, progress=bar)
        bar.close()
        if self.force_hermitian:
            projected = (projected + projected.T) / 2.0
            values, vectors = np.linalg.eigh(projected)
        else:
            values, vectors = np.linalg.eig(projected)
            if np.max(np.abs(values.imag)) > 1e-6 * np.max(np.abs(values)):
                warnings.warn(
                    "The projected matrix has complex eigenvalues; keeping their real parts. Use "
                    "force_hermitian=True for a symmetric Hessian.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            values, vectors = values.real, vectors.real
        order = np.argsort(-np.abs(values), kind="stable")[: self.k_largest_eig_vals]
        values, vectors = values[order], vectors[:, order]
        threshold = relative_tolerance(self.dtype) * self.nb_params * float(np.max(np.abs(values)))
        if np.min(np.abs(values)) <= threshold:
            raise ValueError(
                f"ArnoldiIHVP kept an eigenvalue of magnitude {np.min(np.abs(values)):.3e}, numerically zero: the "
                "Hessian is singular on the kept subspace. Add damping or lower k_largest_eig_vals."
            )
        LOGGER.info(
            "Arnoldi: damping=%.3e, subspace_dim=%d, kept k=%d eigenvalues in [%.3e, %.3e] (magnitude).",
            self.damping,
            self.subspace_dim,
            self.k_largest_eig_vals,
            float(np.min(np.abs(values))),
            float(np.max(np.abs(values))),
        )
        return values, vectors.T @ basis  # [k], [k, P]

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"eigenvalues": self.eigenvalues.numpy(), "eigenvectors": self.eigenvectors.numpy()}


def arnoldi_iteration(
    operator: Any, subspace_dim: int, *, seed: int = 0, progress: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal Krylov basis and projected matrix of a square row operator.

    Classical Gram-Schmidt applied twice per step (numerically as good as modified Gram-Schmidt, and one matmul).
    When the Krylov space becomes invariant before ``subspace_dim`` steps, it continues from a fresh random vector
    orthogonal to the basis, so the basis always reaches ``subspace_dim`` vectors.

    Args:
        operator: A :class:`~influenciae.hessian.operator.RowOperator` ``[P, P]``.
        subspace_dim: ``m ≤ P`` basis vectors.
        seed: Seed of the random start (and restart) vectors.
        progress: Optional bar with ``update(1)`` called once per operator product.

    Returns:
        ``basis [m, P]`` with orthonormal rows and ``projected [m, m] = basis A basisᵀ`` (upper Hessenberg).
    """
    rng = np.random.default_rng(seed)
    num_params = operator.num_params
    dtype = operator.dtype.as_numpy_dtype
    basis = np.zeros((subspace_dim, num_params), dtype=dtype)
    projected = np.zeros((subspace_dim, subspace_dim), dtype=dtype)
    basis[0] = _unit(rng.standard_normal(num_params).astype(dtype))
    scale = 0.0
    for step in range(subspace_dim):
        product = operator.matmul_rows(tf.constant(basis[step : step + 1])).numpy()[0]
        if progress is not None:
            progress.update(1)
        scale = max(scale, float(np.linalg.norm(product)))
        residual = product
        for _ in range(2):
            coefficients = basis[: step + 1] @ residual
            residual = residual - coefficients @ basis[: step + 1]
            projected[: step + 1, step] += coefficients
        if step + 1 == subspace_dim:
            break
        norm = float(np.linalg.norm(residual))
        if norm > 1e3 * relative_tolerance(operator.dtype) * max(scale, 1e-300):
            projected[step + 1, step] = norm
            basis[step + 1] = residual / norm
        else:  # invariant subspace: restart from a random direction orthogonal to the basis
            fresh = rng.standard_normal(num_params).astype(dtype)
            for _ in range(2):
                fresh = fresh - (basis[: step + 1] @ fresh) @ basis[: step + 1]
            basis[step + 1] = _unit(fresh)
    return basis, projected


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)
