"""InfluenceModel: per-sample losses, per-sample gradients and Hessian-vector products of a Keras model.

This subpackage is the only code that touches Keras objects. Everything downstream (solvers, calculators) sees flat
parameter vectors θ of length ``nb_params``, in the fixed order of the watched weights.

Conventions (``docs/theory.md``): the training objective is ``R(θ) = mean_i w_i ℓ(z_i; θ) + Ω(θ)`` where ``w_i`` is
the sample weight (1 when absent) and ``Ω`` the sum of the weight regularization losses of the model. Per-sample
gradients are gradients of ``w_i ℓ(z_i; θ)`` alone; the regularizer enters the Hessian once, through
:meth:`InfluenceModel.regularization_hvp`.

Modules: ``core`` (:class:`InfluenceModel`), ``losses``, ``selection`` (watched weights, layers, the last Dense
layer), ``loading`` (model files and checkpoints), ``graph`` (sub-models cut from a Keras graph), ``capture``
(layer inputs and output gradients for K-FAC), ``migration`` (the original Influenciae's defaults).
"""

from __future__ import annotations

from influenciae.model.core import InfluenceModel
from influenciae.model.migration import MigrationWarning

__all__ = ["InfluenceModel", "MigrationWarning"]
