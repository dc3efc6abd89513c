"""First-order influence functions (Koh & Liang, 2017), RelatIF, influence factors and perturbation influence."""

from __future__ import annotations

from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.cache import DiskCache, combine_hashes, hash_batch
from influenciae.data import check_dataset
from influenciae.hessian import InverseHessianVectorProduct, get_ihvp
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.influence.group import GroupInfluenceMixin
from influenciae.model import InfluenceModel

__all__ = ["FirstOrderInfluenceCalculator", "hessian_dataset", "build_ihvp"]


def hessian_dataset(dataset: tf.data.Dataset, n_samples: int | None, batch_size: int = 64) -> tf.data.Dataset:
    """The dataset whose objective defines H: all of ``dataset``, or its first ``n_samples`` examples re-batched."""
    if n_samples is None:
        return dataset
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples_for_hessian must be a positive integer or None, got {n_samples!r}.")
    return dataset.unbatch().take(n_samples).batch(batch_size)


def build_ihvp(
    model: InfluenceModel,
    dataset: tf.data.Dataset,
    ihvp_calculator: str | InverseHessianVectorProduct,
    *,
    n_samples_for_hessian: int | None,
    damping: float,
    ihvp_options: dict[str, Any] | None,
) -> InverseHessianVectorProduct:
    """Resolve the solver once, at the boundary, and check it fits the model."""
    if isinstance(ihvp_calculator, InverseHessianVectorProduct):
        if damping or ihvp_options:
            raise ValueError("damping and ihvp_options configure a solver given by name; set them on the instance.")
        solver = ihvp_calculator
    else:
        options = {"damping": damping, **(ihvp_options or {})}
        solver = get_ihvp(ihvp_calculator, model, hessian_dataset(dataset, n_samples_for_hessian), **options)
    if solver.nb_params != model.nb_params:
        raise ValueError(
            f"The solver works on {solver.nb_params} parameters but the model watches {model.nb_params}; build the "
            "solver from the same InfluenceModel."
        )
    return solver


class FirstOrderInfluenceCalculator(GroupInfluenceMixin, BaseInfluenceCalculator):
    """Koh & Liang's up-weighting influence ``∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z)``.

    Sign and scale (``docs/theory.md``): positive means the training example ``z`` is a proponent of the test
    example ``x``: removing ``z`` from the ``N`` training examples raises the loss at ``x`` by about
    ``influence / N``. Self-influence ``∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z)`` is large for atypical or mislabeled examples. With
    ``normalize=True`` the training side is divided by ``‖H⁻¹∇ℓ(z)‖`` (RelatIF, Barshan et al. 2020), which stops
    a few high-loss outliers from dominating every ranking.

    Influence vectors are ``H⁻¹∇ℓ(z)`` (training side) and transforms ``∇ℓ(x)`` (test side). The reverse split,
    *influence factors* ``H⁻¹∇ℓ(x)``, costs one solve per test example instead of one per training example:
    :meth:`compute_influence_factors` and :meth:`influence_from_factors` use it, and factors can be saved and
    applied to other training subsets. Group influence (Koh et al. 2019) comes from :class:`GroupInfluenceMixin`:
    ``compute_influence_vector_group`` and ``estimate_influence_values_group``.

    Args:
        model: The wrapped model.
        dataset: The training dataset (defines the Hessian).
        ihvp_calculator: ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"`` or a solver instance.
        n_samples_for_hessian: Use only the first ``n`` training examples for the Hessian.
        normalize: RelatIF normalization of the training side.
        damping: λ for a solver given by name.
        ihvp_options: Other options for a solver given by name (e.g. ``{"tolerance": 1e-8}``).
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Example:
        >>> calculator = FirstOrderInfluenceCalculator(im, train_ds, ihvp_calculator="cg", damping=1e-3)
        >>> indices, values = calculator.most_influential(test_ds, train_ds, k=5)
    """

    method_name = "first_order"

    def __init__(
        self,
        model: InfluenceModel,
        dataset: tf.data.Dataset,
        ihvp_calculator: str | InverseHessianVectorProduct = "exact",
        n_samples_for_hessian: int | None = None,
        normalize: bool = False,
        *,
        damping: float = 0.0,
        ihvp_options: dict[str, Any] | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        super().__init__(model, show_progress=show_progress, batches_per_shard=batches_per_shard)
        self.train_dataset = check_dataset(dataset, name="dataset")
        self.n_samples_for_hessian = n_samples_for_hessian
        self.normalize = bool(normalize)
        self.ihvp = build_ihvp(
            model,
            dataset,
            ihvp_calculator,
            n_samples_for_hessian=n_samples_for_hessian,
            damping=damping,
            ihvp_options=ihvp_options,
        )

    def _configuration(self) -> dict[str, Any]:
        return {
            "ihvp": self.ihvp.configuration(),
            "normalize": self.normalize,
            "n_samples_for_hessian": self.n_samples_for_hessian,
        }

    # ------------------------------------------------------------------ hooks

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        return self._precondition(self.model.batch_jacobian_tensor(batch))

    def _transforms(self, batch: Any) -> tf.Tensor:
        return self.model.batch_jacobian_tensor(batch)

    def _self_influence(self, batch: Any) -> tf.Tensor:
        gradients = self.model.batch_jacobian_tensor(batch)
        return tf.reduce_sum(gradients * self._precondition(gradients), axis=1)

    def _precondition(self, gradients: tf.Tensor) -> tf.Tensor:
        vectors = self.ihvp.solve(gradients)
        if self.normalize:
            norms = tf.norm(vectors, axis=1, keepdims=True)
            vectors = tf.math.divide_no_nan(vectors, norms)
        return vectors

    # ------------------------------------------------------------------ influence factors (test side preconditioned)

    def compute_influence_factors(self, test_set: tf.data.Dataset) -> np.ndarray:
        """Influence factors ``H⁻¹∇ℓ(x)`` of every test example: one solve per test example.

        Args:
            test_set: Batched test dataset.

        Returns:
            Array ``[N_test, P]``.
        """
        self._require_unnormalized("compute_influence_factors")
        factors = [self.ihvp.solve(transforms).numpy() for _, transforms in self._transform_stream(test_set)]
        return np.concatenate(factors) if factors else np.zeros([0, self.model.nb_params])

    def influence_from_factors(self, factors: Any, train_set: tf.data.Dataset) -> np.ndarray:
        """Scores of training examples against precomputed influence factors (one gradient pass, no solve).

        Args:
            factors: ``[m, P]`` from :meth:`compute_influence_factors` (or :meth:`load_influence_factors`).
            train_set: Any batched training subset.

        Returns:
            Array ``[m, N_train]``, equal to :meth:`influence_matrix` of the factors' test examples.
        """
        self._require_unnormalized("influence_from_factors")
        factors = tf.convert_to_tensor(np.asarray(factors), dtype=self.model.dtype)
        if factors.shape.rank != 2 or factors.shape[1] != self.model.nb_params:
            raise ValueError(f"factors must have shape [m, {self.model.nb_params}], got {factors.shape}.")
        check_dataset(train_set, name="train_set")
        self._validate_first_batch(train_set)
        blocks = [
            tf.matmul(factors, gradients, transpose_b=True).numpy()
            for _, gradients in self._stream(train_set, self.model.batch_jacobian_tensor, "gradients")
        ]
        return np.concatenate(blocks, axis=1) if blocks else np.zeros([int(factors.shape[0]), 0])

    def save_influence_factors(self, factors: np.ndarray, path: str, test_set: tf.data.Dataset) -> None:
        """Save factors atomically with this calculator's configuration and the model's weight fingerprint."""
        cache = DiskCache(
            path,
            configuration={**self.configuration(), "kind": "influence_factors"},
            weights_fingerprint=self.weights_fingerprint(),
            overwrite=True,
        )
        input_hash = combine_hashes(hash_batch(batch) for batch in test_set)
        cache.write_shard(0, {"factors": np.asarray(factors)}, first_index=0, input_hash=input_hash)
        cache.mark_complete(1)

    def load_influence_factors(self, path: str) -> np.ndarray:
        """Load factors saved by :meth:`save_influence_factors`; refused if the model or configuration differ."""
        cache = DiskCache(
            path,
            configuration={**self.configuration(), "kind": "influence_factors"},
            weights_fingerprint=self.weights_fingerprint(),
        )
        if not cache.is_complete:
            raise ValueError(f"No complete influence factors at {path}.")
        return cache.read_shard(0)["factors"]

    # ------------------------------------------------------------------ perturbation influence

    def perturbation_influence(self, test_set: tf.data.Dataset, train_set: tf.data.Dataset) -> np.ndarray:
        """Gradient of each score with respect to each input feature of each training example.

        ``∇_{x_z} [∇ℓ(x)ᵀ H⁻¹ ∇_θ ℓ(z)]`` (pyDVL's "perturbation" influence, Koh & Liang's ``I_pert,loss`` with our
        sign: moving ``z``'s features along it makes ``z`` more helpful to ``x``).

        Args:
            test_set: Batched test dataset (``m`` examples).
            train_set: Batched training dataset with one floating-point input tensor.

        Returns:
            Array ``[m, N_train, *input_shape]``.
        """
        factors = tf.constant(self.compute_influence_factors(test_set), dtype=self.model.dtype)
        blocks = [
            perturbation.numpy()
            for _, perturbation in self._stream(
                train_set, lambda batch: self.model.batch_perturbation(batch, factors), "perturbation"
            )
        ]
        return np.concatenate(blocks, axis=1)

    def _stream(self, dataset: tf.data.Dataset, function: Any, description: str) -> Any:
        for indices, batch in self._indexed(dataset, "train_set", description):
            yield indices, function(batch)

    def _require_unnormalized(self, method: str) -> None:
        if self.normalize:
            raise ValueError(
                f"{method} moves H⁻¹ to the test side, which RelatIF's per-training-example normalization does not "
                "allow. Use influence_matrix/top_k, or a calculator with normalize=False."
            )
