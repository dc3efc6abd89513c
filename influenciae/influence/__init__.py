"""Influence calculators, all built on the shared engine of :mod:`influenciae.influence.base`."""

from influenciae.influence.arnoldi import ArnoldiInfluenceCalculator
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.influence.first_order import FirstOrderInfluenceCalculator
from influenciae.influence.group import GroupInfluenceMixin, SecondOrderInfluenceCalculator

__all__ = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "GroupInfluenceMixin",
    "SecondOrderInfluenceCalculator",
]
