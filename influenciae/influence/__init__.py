"""Influence calculators, all built on the shared engine of :mod:`influenciae.influence.base`."""

from influenciae.influence.arnoldi import ArnoldiInfluenceCalculator
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.influence.boundary import SampleBoundaryCalculator, WeightsBoundaryCalculator
from influenciae.influence.first_order import FirstOrderInfluenceCalculator
from influenciae.influence.group import GroupInfluenceMixin, SecondOrderInfluenceCalculator
from influenciae.influence.similarity import SimilarityInfluence
from influenciae.influence.tracin import TracIn, TracInCP, TracInCPFast, TracInCPFastRandProj

__all__ = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "GroupInfluenceMixin",
    "SampleBoundaryCalculator",
    "SecondOrderInfluenceCalculator",
    "SimilarityInfluence",
    "TracIn",
    "TracInCP",
    "TracInCPFast",
    "TracInCPFastRandProj",
    "WeightsBoundaryCalculator",
]
