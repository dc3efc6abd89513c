"""Relevance: layer-wise relevance propagation (LRP) for Keras 3 models and metrics for feature attributions.

``LRP`` and ``LayerLRP`` walk the model's layer graph (a recorded forward pass, then a backward relevance pass layer
by layer) with per-layer rules; ``infidelity`` and ``sensitivity_max`` evaluate any feature attribution.
"""

from influenciae.relevance.lrp import LRP, LayerLRP
from influenciae.relevance.metrics import infidelity, sensitivity_max
from influenciae.relevance.rules import (
    AlphaBetaRule,
    EpsilonRule,
    GammaRule,
    IdentityRule,
    PropagationRule,
    ZPlusRule,
)

__all__ = [
    "LRP",
    "AlphaBetaRule",
    "EpsilonRule",
    "GammaRule",
    "IdentityRule",
    "LayerLRP",
    "PropagationRule",
    "ZPlusRule",
    "infidelity",
    "sensitivity_max",
]
