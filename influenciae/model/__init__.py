"""InfluenceModel: per-sample losses, per-sample gradients and Hessian-vector products of a Keras model.

This subpackage is the only code that touches Keras objects. Everything downstream (solvers, calculators) sees flat
parameter vectors θ of length ``nb_params``, in the fixed order of the watched weights.

Conventions (``docs/theory.md``): the training objective is ``R(θ) = mean_i w_i ℓ(z_i; θ) + Ω(θ)`` where ``w_i`` is
the sample weight (1 when absent) and ``Ω`` the sum of the weight regularization losses of the model. Per-sample
gradients are gradients of ``w_i ℓ(z_i; θ)`` alone; the regularizer enters the Hessian once, through
:meth:`InfluenceModel.regularization_hvp`.

Modules: ``core`` (:class:`InfluenceModel`; its graph side in ``_autodiff``, its batch checks in ``_validation``),
``losses``, ``selection`` (watched weights, layer indices, the last Dense layer), ``graph`` (sub-models cut from a
Keras graph, :class:`~influenciae.model.graph.DenseHead`), ``loading`` (model files and checkpoint weights),
``checkpoints`` (TracIn's stored checkpoints), ``capture`` (layer inputs and output gradients for K-FAC),
``layer_probe`` (TCAV's activations and sensitivities), ``layer_graph`` (LRP's layer graph), ``classifier`` (the
robustness attacks' model front), ``training`` (the evaluation's reference classifiers), ``migration`` (the
original Influenciae's defaults) and ``_backend`` (Keras 3 and ``tf_keras``).
"""

from __future__ import annotations

from influenciae.model.core import InfluenceModel
from influenciae.model.migration import MigrationWarning

__all__ = ["InfluenceModel", "MigrationWarning"]
