"""Robustness of Keras classifiers to input perturbations.

* :class:`FGSM` and :class:`PGD`: gradient attacks on the inputs (untargeted: ascend the loss of the true label;
  targeted: descend the loss of the target label), with input bounds and per-example radii.
* :class:`MinParamPerturbation`: per example, the smallest value of a perturbation parameter (attack ε, noise σ,
  any ``perturb(inputs, p)``) that changes the prediction, by linear or binary search.
* :class:`AttackComparator`: accuracy, loss and prediction flips under several attacks and perturbations, with the
  mean and worst case over random draws.

See ``docs/robustness.md`` for the conventions and examples.
"""

from __future__ import annotations

from influenciae.robustness.attacks import FGSM, PGD
from influenciae.robustness.comparator import ORIGINAL, AttackComparator
from influenciae.robustness.perturbation import MinParamPerturbation, MinParamResult

__all__ = ["FGSM", "PGD", "MinParamPerturbation", "MinParamResult", "AttackComparator", "ORIGINAL"]
