"""Concept-based explanations: TCAV (Kim et al., 2018) for Keras models, linked to training-data attribution.

- :class:`Concept`: a named set of example inputs; :func:`random_concepts` draws random ones from a pool.
- :class:`CAVClassifier`, :func:`train_cav`, :class:`CAV`, :class:`CAVStore`: concept activation vectors (unit
  normals of linear boundaries in a layer's activation space, pointing toward the concept), stored on disk under
  manifest rules.
- :class:`TCAV`: directional derivatives, TCAV scores (``interpret``, Captum's result layout) and the significance
  test against random concepts.
- :func:`concept_influence`: which training examples drive a concept's sensitivity, through any IHVP solver.
"""

from influenciae.concepts.cav import CAV, CAVClassifier, CAVStore, train_cav
from influenciae.concepts.concept import Concept, random_concepts
from influenciae.concepts.influence import concept_influence, concept_sensitivity_gradient
from influenciae.concepts.tcav import TCAV, tcav_scores

__all__ = [
    "CAV",
    "CAVClassifier",
    "CAVStore",
    "TCAV",
    "Concept",
    "concept_influence",
    "concept_sensitivity_gradient",
    "random_concepts",
    "tcav_scores",
    "train_cav",
]
