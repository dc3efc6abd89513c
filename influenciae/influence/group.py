"""Group influence: the effect of removing a whole group of training examples at once.

Notation (``docs/theory.md``): the training objective is ``R(θ) = (1/N) Σ_i ℓ(z_i; θ) + Ω(θ)`` over the N examples
of the training set, H its Hessian at the trained weights θ̂ (plus the solver's damping), U ⊂ training set a group of
``m = |U|`` examples, ``p = m / N``, and

    g_U = Σ_{z∈U} ∇ℓ(z)        (the group's summed per-example gradients, sample weights included)
    K_U = Σ_{z∈U} ∇²ℓ(z)       (the group's summed per-example Hessians, regularizer excluded).

"Removing U" means dropping its terms from the sum, i.e. retraining on ``(1/N) Σ_{z∉U} ℓ(z) + Ω`` (the group's
sample weights set to 0). Without regularization this is exactly retraining on the remaining examples; with it, it is
the perturbation the per-example influence ``∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z)`` linearizes, so group scores stay consistent with it.

Scale and sign, shared by both methods of this module: an influence vector ``v`` is N times the predicted parameter
change, ``θ̂_{-U} - θ̂ ≈ v / N``, and a group influence value is ``(Σ_{x∈E} ∇ℓ(x))ᵀ v`` for an evaluated group E, so
that removing U changes the summed loss of E by ``≈ value / N``. Positive values mean U is a proponent of E: removing
it raises E's loss. For a single training example and a single test example the first-order value is the pairwise
influence ``∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z)``.
"""

from __future__ import annotations

from typing import Any

from influenciae._backend import tf
from influenciae.data import batch_size_of, check_dataset
from influenciae.hessian.base import InverseHessianVectorProduct
from influenciae.hessian.registry import resolve_solver
from influenciae.model import InfluenceModel

__all__ = ["GroupInfluenceMixin", "SecondOrderInfluenceCalculator"]


class GroupInfluenceMixin:
    """First-order group influence (Koh, Ang, Teo & Liang 2019, arXiv:1905.13289) for any calculator.

    The group's influence vector is ``H⁻¹ g_U``: the sum of the members' first-order influence vectors, so a group
    value is the sum of the pairwise influences ``Σ_{x∈E} Σ_{z∈U} ∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z)``. See the module docstring for
    the sign and scale.

    Relies only on two attributes of the class it is mixed into: ``model`` (an :class:`InfluenceModel`) and ``ihvp``
    (an :class:`InverseHessianVectorProduct` whose Hessian is that of the training objective). Subclasses change the
    approximation by overriding the private hook :meth:`_group_influence_vector`.

    Example:
        >>> value = calculator.estimate_influence_values_group(group_ds, test_ds)  # a float
        >>> predicted_change_of_summed_test_loss = value / num_train_examples
    """

    model: InfluenceModel
    ihvp: InverseHessianVectorProduct

    def compute_influence_vector_group(self, group_train: tf.data.Dataset) -> tf.Tensor:
        """The influence vector of a whole group, N times the predicted parameter change of removing it.

        Args:
            group_train: Batched dataset ``(inputs, targets[, sample_weight])`` of the group U to remove; any
                batching, streamed once (twice for second order).

        Returns:
            Tensor ``[nb_params]``; ``H⁻¹ Σ_{z∈U} ∇ℓ(z)`` at first order.

        Raises:
            TypeError: If ``group_train`` is not a ``tf.data.Dataset`` of the expected structure.
            ValueError: If the group is empty (or unbatched).
        """
        group = check_dataset(group_train, name="group_train")
        gradient, size = self._group_gradient(group, name="group_train")
        return self._group_influence_vector(group, gradient, size)

    def estimate_influence_values_group(
        self,
        group_train: tf.data.Dataset,
        group_to_evaluate: tf.data.Dataset | None = None,
    ) -> float:
        """Influence of removing the group ``group_train`` on the summed loss of ``group_to_evaluate``.

        ``value = (Σ_{x∈E} ∇ℓ(x))ᵀ v_U`` with ``v_U`` from :meth:`compute_influence_vector_group`; removing U changes
        ``Σ_{x∈E} ℓ(x)`` by ``≈ value / N``. The two groups may have different sizes.

        Args:
            group_train: Batched dataset of the group U to remove.
            group_to_evaluate: Batched dataset of the evaluated group E; ``None`` evaluates U itself (group
                self-influence).

        Returns:
            The group influence value, a Python float.

        Raises:
            TypeError: If an argument is not a ``tf.data.Dataset`` of the expected structure.
            ValueError: If a group is empty (or unbatched).
        """
        group = check_dataset(group_train, name="group_train")
        gradient, size = self._group_gradient(group, name="group_train")
        vector = self._group_influence_vector(group, gradient, size)
        if group_to_evaluate is None:
            evaluated = gradient
        else:
            evaluated, _ = self._group_gradient(
                check_dataset(group_to_evaluate, name="group_to_evaluate"), name="group_to_evaluate"
            )
        return float(tf.tensordot(tf.cast(evaluated, vector.dtype), vector, axes=1))

    # ------------------------------------------------------------------ hooks and helpers

    def _group_influence_vector(self, group: tf.data.Dataset, gradient: tf.Tensor, size: int) -> tf.Tensor:
        """The group's influence vector ``[P]`` from its summed gradient ``g_U`` ``[P]`` and size ``m``."""
        del group, size  # the first-order vector depends on the group only through g_U
        return self.ihvp.solve(gradient[None])[0]

    def _group_gradient(self, group: tf.data.Dataset, *, name: str) -> tuple[tf.Tensor, int]:
        """``(Σ_{z∈group} ∇ℓ(z) [P], number of examples)``, streamed over the group's batches."""
        total = tf.zeros([self.model.nb_params], self.model.dtype)
        size = 0
        for batch in group:
            count = int(batch_size_of(batch))
            if count == 0:
                continue
            # batch_gradient is one backward pass over the batch's mean loss: cheaper than per-sample gradients.
            total += self.model.batch_gradient(batch) * tf.cast(count, self.model.dtype)
            size += count
        if size == 0:
            raise ValueError(f"{name} is empty: a group needs at least one example.")
        return total, size


class SecondOrderInfluenceCalculator(GroupInfluenceMixin):
    """Second-order group influence of Basu, You & Feizi (2020).

    ("On second-order group influence functions for black-box predictions", ICML 2020, arXiv:1911.00418.)
    Removing a large group moves the parameters far, and the first-order vector ``H⁻¹ g_U`` ignores how the removed
    examples interact through the curvature they contribute. Basu et al. expand the parameter change to second order
    in ``p = m / N``:

        θ̂_{-U} - θ̂ ≈ (1 - 2p) / ((1 - p)² N) · H⁻¹ g_U  +  1 / ((1 - p)² N²) · H⁻¹ K_U H⁻¹ g_U,

    (the coefficients of Basu et al.'s I⁽¹⁾ and I′ as written in the original Influenciae documentation), so that,
    at the scale of this module (N times the parameter change),

        v_U = (1 - 2p) / (1 - p)² · H⁻¹ g_U  +  1 / ((1 - p)² N) · H⁻¹ K_U H⁻¹ g_U.

    It agrees with the exact change to second order in p (whose expansion is
    ``(1/N) H⁻¹ g_U + (1/N²) H⁻¹ K_U H⁻¹ g_U + O(p³)``), and is exact for a quadratic objective when the group's
    mean Hessian equals the training mean Hessian. As ``p → 0`` it tends to the first-order vector ``H⁻¹ g_U``.
    The sign convention is the library's: positive values mean removing the group raises the evaluated loss, by
    ``≈ value / N`` for the summed loss (see the module docstring). Costs: two inverse-HVPs and one pass of
    Hessian-vector products over the group.

    Args:
        model: The wrapped model.
        dataset: The batched training set: defines N and, unless ``n_samples_for_hessian`` is given, the Hessian.
        ihvp_calculator: ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"`` or an already built solver.
        n_samples_for_hessian: Estimate H on the first ``n`` examples of ``dataset`` only (re-batched with the
            dataset's first batch size); N stays the size of the whole dataset. ``None`` uses all of it.
        damping: λ ≥ 0 added to the Hessian's diagonal (only for solvers given by name).
        ihvp_options: Extra options for the solver's constructor (e.g. ``{"subspace_dim": 50}``).
        show_progress: Progress bars of the solver's iterative phases (CG iterations, LiSSA/Arnoldi steps).

    Raises:
        TypeError: If ``model`` is not an :class:`InfluenceModel` or ``dataset`` not a batched ``tf.data.Dataset``.
        ValueError: If ``n_samples_for_hessian`` is not a positive integer, or for invalid solver options.

    Example:
        >>> calc = SecondOrderInfluenceCalculator(im, train_ds, "cg", damping=1e-3)
        >>> vector = calc.compute_influence_vector_group(group_ds)      # [nb_params], ≈ N·(θ̂_{-U} - θ̂)
        >>> value = calc.estimate_influence_values_group(group_ds, test_ds)
    """

    def __init__(
        self,
        model: InfluenceModel,
        dataset: tf.data.Dataset,
        ihvp_calculator: str | InverseHessianVectorProduct = "exact",
        n_samples_for_hessian: int | None = None,
        *,
        damping: float = 0.0,
        ihvp_options: dict[str, Any] | None = None,
        show_progress: bool = False,
    ) -> None:
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        self.model = model
        self.train_set = check_dataset(dataset, name="dataset")
        if n_samples_for_hessian is None:
            self.hessian_set = self.train_set
        else:
            self.hessian_set = _first_examples(self.train_set, n_samples_for_hessian)
        # an already built solver keeps its own damping (resolve_solver's rule)
        self.ihvp = resolve_solver(ihvp_calculator, model, self.hessian_set, damping=damping, **(ihvp_options or {}))
        if show_progress:
            self.ihvp.show_progress = True
        self._train_size: int | None = None

    @property
    def train_size(self) -> int:
        """N, the number of examples of the training set (counted on first use)."""
        if self._train_size is None:
            self._train_size = sum(int(batch_size_of(batch)) for batch in self.train_set)
        return self._train_size

    def _group_influence_vector(self, group: tf.data.Dataset, gradient: tf.Tensor, size: int) -> tf.Tensor:
        num_train = self.train_size
        if size >= num_train:
            raise ValueError(
                f"The group has {size} examples but the training set only {num_train}: removing it would leave no "
                "training data (p = |U|/N must be below 1). Pass a group drawn from the training set."
            )
        fraction = size / num_train
        first = self.ihvp.solve(gradient[None])  # [1, P]: H⁻¹ g_U
        curvature = tf.zeros_like(first)
        for batch in group:
            if int(batch_size_of(batch)) > 0:
                curvature += self.model.batch_hvp_sum(batch, first)  # K_U H⁻¹ g_U
        second = self.ihvp.solve(curvature)  # H⁻¹ K_U H⁻¹ g_U
        scale = 1.0 / (1.0 - fraction) ** 2
        return (scale * (1.0 - 2.0 * fraction)) * first[0] + (scale / num_train) * second[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ihvp={self.ihvp!r})"


def _first_examples(dataset: tf.data.Dataset, count: int) -> tf.data.Dataset:
    """The first ``count`` examples of a batched dataset, re-batched with its first batch's size."""
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise ValueError(f"n_samples_for_hessian must be a positive integer or None, got {count!r}.")
    first_batch = next(iter(dataset), None)
    if first_batch is None:
        raise ValueError("dataset is empty; pass the training set the Hessian is estimated on.")
    batch_size = max(int(batch_size_of(first_batch)), 1)
    return dataset.unbatch().take(count).batch(batch_size)
