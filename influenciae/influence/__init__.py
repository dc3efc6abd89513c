"""Influence calculators, all built on the shared engine of :mod:`influenciae.influence.base`."""

from influenciae.influence.arnoldi import ArnoldiInfluenceCalculator
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.influence.boundary import SampleBoundaryCalculator, WeightsBoundaryCalculator
from influenciae.influence.first_order import FirstOrderInfluenceCalculator
from influenciae.influence.group import GroupInfluenceMixin, SecondOrderInfluenceCalculator
from influenciae.influence.representer import RepresenterPointL2, RepresenterPointLJE
from influenciae.influence.similarity import SimilarityInfluence
from influenciae.influence.tracin import TracIn, TracInCP, TracInCPFast, TracInCPFastRandProj
from influenciae.influence.trak import MarginOutput, ModelOutputFunction, RegressionOutput, TrakCalculator, TrakOptions

__all__ = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "GroupInfluenceMixin",
    "MarginOutput",
    "ModelOutputFunction",
    "RegressionOutput",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "SampleBoundaryCalculator",
    "SecondOrderInfluenceCalculator",
    "SimilarityInfluence",
    "TracIn",
    "TracInCP",
    "TracInCPFast",
    "TracInCPFastRandProj",
    "TrakCalculator",
    "TrakOptions",
    "WeightsBoundaryCalculator",
]
