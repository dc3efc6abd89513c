"""Arnoldi influence embeddings (Schioppa et al., 2022): scores as dot products of k-dimensional embeddings."""

from __future__ import annotations

from typing import Any

from influenciae._backend import tf
from influenciae.data import check_dataset
from influenciae.hessian import ArnoldiIHVP
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.influence.first_order import hessian_dataset
from influenciae.model import InfluenceModel

__all__ = ["ArnoldiInfluenceCalculator"]


class ArnoldiInfluenceCalculator(BaseInfluenceCalculator):
    """Low-rank influence: ``∇ℓ(x)ᵀ U diag(1/λ) Uᵀ ∇ℓ(z)`` with the ``k`` eigenpairs of LARGEST magnitude of H.

    Each example is embedded once into ``k`` dimensions: the transform of a test example is ``Uᵀ∇ℓ(x)`` and the
    influence vector of a training example ``diag(1/λ) Uᵀ∇ℓ(z)``, so a score is a dot product of two
    ``k``-vectors and top-k over millions of training examples is a small matrix search. With ``k = P`` it equals
    :class:`~influenciae.FirstOrderInfluenceCalculator` with the exact solver; same sign and scale.

    Args:
        model: The wrapped model.
        train_dataset: The training dataset (defines the Hessian).
        subspace_dim: Arnoldi iterations (Krylov dimension).
        force_hermitian: Symmetrize the projected matrix.
        k_largest_eig_vals: Eigenpairs kept (``≤ subspace_dim``).
        damping: λ added to H.
        n_samples_for_hessian: Use only the first ``n`` training examples for the Hessian.
        seed: Seed of the Arnoldi start vector.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Example:
        >>> calculator = ArnoldiInfluenceCalculator(im, train_ds, subspace_dim=200, force_hermitian=True,
        ...                                         k_largest_eig_vals=50)
        >>> scores = calculator.influence_matrix(test_ds, train_ds)
    """

    method_name = "arnoldi"

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        subspace_dim: int | None = None,
        force_hermitian: bool = True,
        k_largest_eig_vals: int | None = None,
        *,
        damping: float = 0.0,
        n_samples_for_hessian: int | None = None,
        seed: int = 0,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        super().__init__(model, show_progress=show_progress, batches_per_shard=batches_per_shard)
        check_dataset(train_dataset, name="train_dataset")
        self.n_samples_for_hessian = n_samples_for_hessian
        self.ihvp = ArnoldiIHVP(
            model,
            hessian_dataset(train_dataset, n_samples_for_hessian),
            subspace_dim=subspace_dim,
            k_largest_eig_vals=k_largest_eig_vals,
            force_hermitian=force_hermitian,
            damping=damping,
            seed=seed,
        )

    def _configuration(self) -> dict[str, Any]:
        return {"ihvp": self.ihvp.configuration(), "n_samples_for_hessian": self.n_samples_for_hessian}

    def _transforms(self, batch: Any) -> tf.Tensor:
        return tf.matmul(self.model.batch_jacobian_tensor(batch), self.ihvp.eigenvectors, transpose_b=True)

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        return self._transforms(batch) / self.ihvp.eigenvalues

    def _self_influence(self, batch: Any) -> tf.Tensor:
        embedding = self._transforms(batch)
        return tf.reduce_sum(embedding * embedding / self.ihvp.eigenvalues, axis=1)
