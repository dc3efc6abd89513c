"""Two baselines for the curvature approximations: the Gauss-Newton diagonal and the identity."""

from __future__ import annotations

from typing import Any

from influenciae._backend import tf
from influenciae.hessian.base import CurvatureRequest, InverseHessianVectorProduct
from influenciae.hessian.kfac import BlockDiagonalIHVP
from influenciae.hessian.operator import RowOperator
from influenciae.hessian.registry import curvature_of
from influenciae.model import InfluenceModel

__all__ = ["DiagonalIHVP", "IdentityIHVP"]


class DiagonalIHVP(BlockDiagonalIHVP, name="diagonal"):
    """``(diag(C) + λI)⁻¹`` with ``diag(C) = E[g²]`` the diagonal of the Gauss-Newton matrix (or Fisher).

    One pass over the dataset with the layer capture of :mod:`influenciae.model.capture`: for a Dense, Conv2D or
    Embedding layer the per-example gradients are rebuilt from ``a ⊗ g`` and squared (``fisher="expected"`` gives the
    exact GGN diagonal); other watched weights use a vectorized Jacobian. A cheap baseline for K-FAC and EK-FAC: it
    ignores every correlation between parameters.

    Takes the arguments of :class:`~influenciae.hessian.kfac.BlockDiagonalIHVP`.

    Example:
        >>> ihvp = DiagonalIHVP(im, train_ds, damping=1e-3)
    """

    kronecker = False
    eigenvalue_correction = True


class _IdentityOperator(RowOperator):
    def __init__(self, num_params: int, dtype: tf.DType) -> None:
        super().__init__(num_params, dtype, "IdentityOperator", parameters={})

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        return vectors


class IdentityIHVP(InverseHessianVectorProduct, name="identity"):
    """``H = I``: influence becomes the gradient dot product ``∇ℓ(x)ᵀ∇ℓ(z) / (1 + λ)`` (the curvature-free baseline).

    Needs no dataset. Scores keep the sign convention of influence functions but not their ``1/N`` retraining scale.

    Args:
        model: The wrapped model (only its number of parameters and dtype are used).
        dataset: Ignored (accepted so that every solver is built the same way).
        damping: λ ≥ 0; solutions are ``v / (1 + λ)``.
        operator: A curvature operator (``get_ihvp("identity", ..., curvature=...)``): the identity stands in for
            it, so only its name is kept (in :attr:`curvature` and the configuration) and it is never applied.
        curvature: The same by name (``"ggn"``, ...; then ``dataset`` is needed to build it).

    Example:
        >>> calculator = FirstOrderInfluenceCalculator(im, train_ds, ihvp_calculator="identity")
    """

    takes_operator = False

    def _base_operator(self, request: CurvatureRequest) -> RowOperator:
        model = request.model
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"IdentityIHVP needs the InfluenceModel (for P and the dtype), got {type(model).__name__}.")
        requested = request.named()
        self._named_curvature = "operator" if requested is None else curvature_of(requested)
        self._hessian_dataset = None  # the identity does not depend on the data
        return _IdentityOperator(model.nb_params, model.dtype)

    def _configure(self) -> None:
        self.curvature = self._named_curvature

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        return vectors / tf.constant(1.0 + self.damping, self.dtype)

    def configuration(self) -> dict[str, Any]:
        named = {"curvature": self.curvature} if self.curvature != "operator" else {}
        return {"name": self.name, "damping": self.damping, **named}
