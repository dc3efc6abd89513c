"""Which training examples drive a concept's sensitivity: TCAV's directional derivative as an influence query.

For a class's examples ``X``, a layer and a CAV ``v`` (held fixed), the concept sensitivity of the model is the
mean directional derivative

    f(θ) = (1/|X|) Σ_{x ∈ X} ∇_a h_t(x; θ) · v,

a function of the watched weights ``θ`` of an ``InfluenceModel``. Up-weighting a training example ``z`` by ``ε``
in the training objective moves the optimum by ``-ε H⁻¹ ∇_θ ℓ(z)`` (Koh & Liang), hence

    score(z) = df/dε = -∇_θ f ᵀ H⁻¹ ∇_θ ℓ(z).

**Sign**: positive means up-weighting ``z`` *raises* the concept sensitivity (z pushes the class toward the
concept); removing ``z`` from ``n`` training examples changes ``f`` by about ``-score / n``.
This is the library's influence convention with the test loss replaced by :math:`-f`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.concepts.cav import CAV
from influenciae.concepts.concept import Concept, _as_batched_dataset
from influenciae.concepts.tcav import TCAV
from influenciae.hessian.base import InverseHessianVectorProduct, get_ihvp
from influenciae.model import InfluenceModel
from influenciae.model.layer_probe import LayerProbe, resolve_layer_names

__all__ = ["concept_influence", "concept_sensitivity_gradient"]


def _resolve_cav(tcav_or_cav: TCAV | CAV, concepts: Sequence[Concept] | None, layer: str | int | None) -> CAV:
    if isinstance(tcav_or_cav, CAV):
        if concepts is not None:
            raise ValueError("Pass concepts=... only with a TCAV; a CAV already knows its concepts.")
        return tcav_or_cav
    if isinstance(tcav_or_cav, TCAV):
        if concepts is None:
            raise ValueError("With a TCAV, pass concepts=[concept, random] to say which CAV to use.")
        return tcav_or_cav.cav(concepts, layer)
    raise TypeError(f"Expected a TCAV or a CAV, got {type(tcav_or_cav).__name__}.")


def concept_sensitivity_gradient(
    cav: CAV,
    influence_model: InfluenceModel,
    class_inputs: Any,
    target: int | None,
    *,
    concept_index: int = 0,
    batch_size: int = 64,
) -> tf.Tensor:
    """Value and gradient over the watched weights of the mean directional derivative ``f(θ)``.

    Args:
        cav: the CAV (its ``layer`` must be a layer of ``influence_model.model``).
        influence_model: the wrapped model; ``θ`` are its watched weights.
        class_inputs: the class examples ``[N, ...]`` (array or batched dataset of inputs).
        target: the output unit whose derivative is taken (``None`` for a one-unit output).
        concept_index: which row of ``cav.vectors`` (which concept of the set) to use.
        batch_size: batch size for array inputs.

    Returns:
        ``(f, gradient)``: a scalar tensor and a ``[nb_params]`` tensor, in the model's dtype.
    """
    if not isinstance(influence_model, InfluenceModel):
        raise TypeError(f"influence_model must be an influenciae.InfluenceModel, got {type(influence_model).__name__}.")
    if isinstance(concept_index, bool) or not isinstance(concept_index, int):
        raise TypeError(f"concept_index must be an integer, got {type(concept_index).__name__}.")
    if not 0 <= concept_index < len(cav.vectors):
        raise ValueError(f"concept_index={concept_index} is out of range for a CAV of {len(cav.vectors)} concepts.")
    [layer] = resolve_layer_names(influence_model.model, cav.layer)
    probe = LayerProbe(influence_model.model, [layer])
    target_index = probe.check_target(target)
    num_features = probe.feature_sizes[layer]
    if num_features is not None and num_features != cav.vectors.shape[1]:
        raise ValueError(
            f"The CAV has {cav.vectors.shape[1]} features but layer {layer!r} of this model has {num_features}: "
            "was it trained on another model?"
        )
    dtype = influence_model.dtype
    vector = tf.constant(cav.vectors[concept_index], dtype)
    watched = influence_model.watched

    @tf.function(reduce_retracing=True, autograph=False)
    def batch_sum(inputs: Any) -> tuple[tf.Tensor, list[tf.Tensor], tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(watched)
            derivatives = tf.cast(probe.sensitivity_of(inputs, target_index, 0, vector), dtype)
            total = tf.reduce_sum(derivatives)
        gradients = tape.gradient(total, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return total, gradients, tf.shape(derivatives)[0]

    dataset = _as_batched_dataset(class_inputs, batch_size, "class_inputs")
    value = tf.zeros([], dtype)
    gradient = tf.zeros([influence_model.nb_params], dtype)
    count = 0
    for batch in dataset:
        total, gradients, size = batch_sum(batch)
        value += total
        gradient += influence_model.flatten(gradients)
        count += int(size)
    if count == 0:
        raise ValueError("class_inputs is empty; give the examples of the target class.")
    return value / count, gradient / count


def concept_influence(
    tcav_or_cav: TCAV | CAV,
    influence_model: InfluenceModel,
    train_dataset: tf.data.Dataset,
    class_inputs: Any,
    target: int | None,
    *,
    concepts: Sequence[Concept] | None = None,
    layer: str | int | None = None,
    concept_index: int = 0,
    ihvp: str | InverseHessianVectorProduct = "exact",
    ihvp_options: Mapping[str, Any] | None = None,
    hessian_dataset: tf.data.Dataset | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Influence of each training example on a concept's sensitivity: ``-∇_θ f ᵀ H⁻¹ ∇_θ ℓ(z)``.

    ``f(θ)`` is the mean over ``class_inputs`` of the directional derivative ``∇_a h_target · v`` of the CAV
    ``v`` (module docstring). The CAV is held fixed: only the dependence of the derivatives on ``θ`` counts.

    Sign: **positive = up-weighting z raises the concept sensitivity** ``f``; removing z from the ``n`` training
    examples changes ``f`` by about ``-score / n``.

    Args:
        tcav_or_cav: a :class:`~influenciae.concepts.CAV`, or a :class:`~influenciae.concepts.TCAV` together with
            ``concepts`` (and ``layer`` when it has several).
        influence_model: the wrapped model; the Hessian and gradients are over its watched weights.
        train_dataset: the batched training set ``(inputs, targets[, sample_weight])``; one score per example,
            in iteration order.
        class_inputs: the examples of the class whose sensitivity is explained ``[N, ...]`` (array or batched
            dataset of inputs).
        target: the class (output unit).
        concepts: with a TCAV, the experimental set whose CAV is used, e.g. ``[stripes, random_0]``.
        layer: with a TCAV, the layer of the CAV.
        concept_index: which concept of the set the CAV points to (0: the first).
        ihvp: a solver name (``"exact"``, ``"cg"``, ``"lissa"``, ...) or a built solver.
        ihvp_options: constructor options for a named solver (e.g. ``{"damping": 1e-3}``).
        hessian_dataset: the dataset of the Hessian for a named solver (default: ``train_dataset``).
        batch_size: batch size for array ``class_inputs``.

    Returns:
        ``[N_train]`` numpy array of scores.

    Example:
        >>> im = InfluenceModel(model, loss_function=loss)
        >>> scores = concept_influence(tcav, im, train_ds, zebras, zebra_class, concepts=[stripes, random_0])
        >>> np.argsort(-scores)[:10]   # the training examples that most raise the stripes sensitivity
    """
    cav = _resolve_cav(tcav_or_cav, concepts, layer)
    _, gradient = concept_sensitivity_gradient(
        cav, influence_model, class_inputs, target, concept_index=concept_index, batch_size=batch_size
    )
    if not isinstance(train_dataset, tf.data.Dataset):
        raise TypeError(f"train_dataset must be a batched tf.data.Dataset, got {type(train_dataset).__name__}.")
    solver = get_ihvp(ihvp, influence_model, hessian_dataset or train_dataset, **dict(ihvp_options or {}))
    direction = solver.solve(gradient[None])[0]  # H⁻¹ ∇f  [P]
    scores = []
    for batch in train_dataset:
        jacobian = influence_model.batch_jacobian_tensor(batch)  # [B, P]
        scores.append(-tf.linalg.matvec(jacobian, tf.cast(direction, jacobian.dtype)).numpy())
    if not scores:
        raise ValueError("train_dataset is empty.")
    return np.concatenate(scores)
