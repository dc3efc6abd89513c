"""Nyström sketch: a randomized low-rank approximation of a PSD curvature, inverted with damping.

``A ≈ Â = (AΩ)(ΩᵀAΩ)⁺(AΩ)ᵀ`` for a Gaussian test matrix ``Ω [P, r]`` (one block product ``AΩ``, i.e. one pass over
the curvature dataset for ``r`` vectors), computed stably as in Tropp, Yurtsever, Udell & Cevher (2017, Alg. 3) and
Frangella, Tropp & Udell (2023, Alg. 2.1): shift by ``ν = √P · eps · ‖AΩ‖``, Cholesky of the small core, SVD.
The result ``Â = U diag(Λ) Uᵀ`` is inverted with damping by the Woodbury identity.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.base import relative_tolerance
from influenciae.hessian.low_rank import LowRankEigenIHVP, LowRankOptions

__all__ = ["NystromIHVP", "NystromOptions", "nystrom_sketch"]


@dataclasses.dataclass(frozen=True)
class NystromOptions(LowRankOptions):
    """The settings of :class:`NystromIHVP`.

    Attributes:
        seed: Seed of the Gaussian test matrix.
        rank: Sketch size ``r`` (values above ``P`` are clipped to ``P``).
    """

    rank: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}.")


class NystromIHVP(LowRankEigenIHVP, name="nystrom"):
    """Invert ``Â + λI`` where ``Â = U diag(Λ) Uᵀ`` is a rank-``r`` randomized Nyström approximation of the curvature.

    ``solve(v) = U diag(1/(Λ + λ)) Uᵀ v + (v - U Uᵀ v) / λ`` (Woodbury): directions outside the sketch are
    treated as having zero curvature, so they are divided by the damping alone (Frangella et al.'s
    "sketch-and-solve"). With ``damping=0`` only the sketched subspace is inverted, as Arnoldi does. The sketch costs
    one product with ``r`` vectors (one pass over the curvature dataset); every solve is then two ``[n, P] × [P, r]``
    matmuls. With ``rank ≥ P`` the sketch is exact (up to round-off).

    The curvature must be positive semi-definite: the Hessian of a convex model, or ``curvature="ggn"`` /
    ``"fisher"`` / ``"empirical_fisher"`` for any model. Indefinite Hessians are refused with a message.

    Built like every solver (:class:`~influenciae.hessian.base.InverseHessianVectorProduct`: ``(model, dataset,
    options=None, *, damping=..., operator=..., curvature=..., curvature_options=..., **settings)``); its settings
    are the fields of :class:`NystromOptions`, as keywords or as one ``options=`` instance. ``damping``: λ ≥ 0,
    added to ``Â``. Positive damping is recommended below full rank.

    Attributes:
        eigenvalues: ``[r]`` eigenvalues ``Λ`` of the sketch (without damping), in decreasing order.
        eigenvectors: ``[r, P]`` orthonormal eigenvectors ``Uᵀ``, one per row.

    Example:
        >>> ihvp = NystromIHVP(im, train_ds, rank=100, damping=1e-3, curvature="ggn")
        >>> x = ihvp.solve(gradients)  # [n, P]
    """

    damping_in_eigenvalues = False  # the sketch of H: the solve adds λ and inverts the complement by 1/λ

    options_class = NystromOptions

    def _configure(self) -> None:
        super()._configure()
        self.rank = int(min(self.options.rank, self.nb_params))

    def _decompose(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``r`` eigenvalues of the sketch ``Â`` (damping not included), decreasing, and their vectors."""
        with self.pass_progress(f"rank-{self.rank} sketch"):
            values, vectors = nystrom_sketch(self.hessian, self.rank, seed=self.seed)
        if self.damping == 0.0:
            threshold = relative_tolerance(self.dtype) * self.nb_params * float(np.max(values, initial=0.0))
            if not float(np.min(values)) > threshold:
                raise ValueError(
                    f"The Nyström sketch has an eigenvalue {float(np.min(values)):.3e}, numerically zero: without "
                    "damping the sketched curvature cannot be inverted. Add damping (e.g. damping=1e-3) or lower "
                    "the rank."
                )
        return values, vectors


def nystrom_sketch(operator: Any, rank: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Randomized Nyström approximation ``A ≈ U diag(Λ) Uᵀ`` of a PSD row operator from one block product.

    Follows Tropp et al. (2017, Alg. 3): an orthonormalized Gaussian test matrix ``Ω``, the sketch ``Y = AΩ``, a
    shift ``ν = √P · eps · ‖Y‖`` that keeps the Cholesky factorization of the core ``Ωᵀ(Y + νΩ)`` well-posed, then
    ``B = (Y + νΩ) C⁻¹``, its thin SVD ``B = U Σ Vᵀ`` and ``Λ = max(Σ² - ν, 0)``. The linear algebra runs in
    float64 whatever the operator's dtype.

    Args:
        operator: A symmetric positive semi-definite :class:`~influenciae.hessian.operator.RowOperator` ``[P, P]``.
        rank: ``r ≤ P``.
        seed: Seed of ``Ω``.

    Returns:
        ``(eigenvalues [r], eigenvectors [r, P])``: decreasing eigenvalues, orthonormal rows.

    Raises:
        ValueError: If the core is not positive definite (the operator is indefinite on the sketch).
    """
    num_params = operator.num_params
    if not 0 < rank <= num_params:
        raise ValueError(f"rank must be in [1, {num_params}], got {rank}.")
    rng = np.random.default_rng(seed)
    test_matrix, _ = np.linalg.qr(rng.standard_normal((num_params, rank)))  # Ω [P, r], orthonormal columns
    product = operator.matmul_rows(tf.constant(test_matrix.T, dtype=operator.dtype)).numpy().astype(np.float64).T
    shift = np.sqrt(num_params) * np.finfo(operator.dtype.as_numpy_dtype).eps * np.linalg.norm(product, 2)
    shift = max(shift, np.finfo(np.float64).tiny)
    shifted = product + shift * test_matrix  # Y_ν [P, r]
    core = test_matrix.T @ shifted
    core = (core + core.T) / 2.0
    try:
        factor = np.linalg.cholesky(core)  # core = C Cᵀ, C lower
    except np.linalg.LinAlgError:
        smallest = float(np.min(np.linalg.eigvalsh(core))) - shift
        raise ValueError(
            f"The Nyström sketch needs a positive semi-definite curvature, but it has negative curvature "
            f"({smallest:.3e}) on the sketched subspace: the Hessian is indefinite here. Use curvature='ggn' (or "
            "'fisher'), which is positive semi-definite for any model, or another solver (e.g. 'arnoldi')."
        ) from None
    triangular = np.linalg.solve(factor, shifted.T).T  # B = Y_ν C⁻ᵀ [P, r]
    left, singular, _ = np.linalg.svd(triangular, full_matrices=False)
    eigenvalues = np.maximum(singular**2 - shift, 0.0)
    return eigenvalues, left.T
