"""Hessian, Gauss-Newton and Fisher operators and the inverse-Hessian-vector-product solvers."""

from influenciae.hessian.arnoldi import ArnoldiIHVP, ArnoldiOptions
from influenciae.hessian.base import (
    STATE_KINDS,
    CurvatureRequest,
    FittedState,
    InverseHessianVectorProduct,
    get_ihvp,
    registered_solvers,
)
from influenciae.hessian.conjugate_gradient import CGOptions, ConjugateGradientDescentIHVP, ConvergenceInfo
from influenciae.hessian.diagonal import DiagonalIHVP, IdentityIHVP
from influenciae.hessian.exact import ExactIHVP, ExactOptions, PseudoInverseIHVP, PseudoInverseOptions
from influenciae.hessian.ggn import (
    CURVATURES,
    CurvatureOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GaussNewtonOperator,
    curvature_operator,
)
from influenciae.hessian.kfac import EKFACIHVP, KFACIHVP, BlockDiagonalIHVP, CurvatureBlock
from influenciae.hessian.kfac_fit import BlockDiagonalOptions
from influenciae.hessian.lissa import LissaIHVP, LissaOptions, largest_eigenvalue
from influenciae.hessian.low_rank import LowRankEigenIHVP, LowRankOptions
from influenciae.hessian.nystrom import NystromIHVP, NystromOptions
from influenciae.hessian.operator import DampedOperator, HessianOperator, RowOperator, as_row_operator, damped
from influenciae.hessian.registry import CURVATURE_REGISTRY, SOLVER_REGISTRY, Registry, resolve_solver

__all__ = [
    "CURVATURES",
    "CURVATURE_REGISTRY",
    "SOLVER_REGISTRY",
    "STATE_KINDS",
    "EKFACIHVP",
    "KFACIHVP",
    "ArnoldiIHVP",
    "ArnoldiOptions",
    "BlockDiagonalIHVP",
    "BlockDiagonalOptions",
    "CGOptions",
    "ConjugateGradientDescentIHVP",
    "ConvergenceInfo",
    "CurvatureBlock",
    "CurvatureOperator",
    "CurvatureRequest",
    "DampedOperator",
    "DiagonalIHVP",
    "EmpiricalFisherOperator",
    "FittedState",
    "ExactIHVP",
    "ExactOptions",
    "FisherOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "IdentityIHVP",
    "InverseHessianVectorProduct",
    "LissaIHVP",
    "LissaOptions",
    "LowRankEigenIHVP",
    "LowRankOptions",
    "NystromIHVP",
    "NystromOptions",
    "PseudoInverseIHVP",
    "PseudoInverseOptions",
    "Registry",
    "RowOperator",
    "as_row_operator",
    "curvature_operator",
    "damped",
    "get_ihvp",
    "largest_eigenvalue",
    "registered_solvers",
    "resolve_solver",
]
