"""Hessian operators and inverse-Hessian-vector-product solvers."""

from influenciae.hessian.arnoldi import ArnoldiIHVP
from influenciae.hessian.base import InverseHessianVectorProduct, get_ihvp, registered_solvers
from influenciae.hessian.conjugate_gradient import ConjugateGradientDescentIHVP, ConvergenceInfo
from influenciae.hessian.exact import ExactIHVP
from influenciae.hessian.lissa import LissaIHVP, largest_eigenvalue
from influenciae.hessian.operator import DampedOperator, HessianOperator, RowOperator, as_row_operator, damped

__all__ = [
    "ArnoldiIHVP",
    "ConjugateGradientDescentIHVP",
    "ConvergenceInfo",
    "DampedOperator",
    "ExactIHVP",
    "HessianOperator",
    "InverseHessianVectorProduct",
    "LissaIHVP",
    "RowOperator",
    "as_row_operator",
    "damped",
    "get_ihvp",
    "largest_eigenvalue",
    "registered_solvers",
]
