"""First-order influence functions (Koh & Liang, 2017), RelatIF, influence factors and perturbation influence."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from influenciae._backend import tf
from influenciae.cache import DiskCache, combine_hashes, hash_batch
from influenciae.data import check_dataset
from influenciae.data.streams import Stream
from influenciae.hessian import InverseHessianVectorProduct, resolve_solver
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.influence.group import GroupInfluenceMixin
from influenciae.language import Measurement, as_measurement, query_model
from influenciae.model import InfluenceModel

__all__ = ["FirstOrderInfluenceCalculator", "LowRankFactors", "build_ihvp", "compress_factors", "hessian_dataset"]


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
    damping: float | None,
    ihvp_options: dict[str, Any] | None,
    curvature: str = "hessian",
    curvature_options: dict[str, Any] | None = None,
) -> InverseHessianVectorProduct:
    """Resolve the solver once, at the boundary (:func:`~influenciae.hessian.registry.resolve_solver`'s rule)."""
    if isinstance(ihvp_calculator, str):
        dataset = hessian_dataset(dataset, n_samples_for_hessian)
    return resolve_solver(
        ihvp_calculator,
        model,
        dataset,
        damping=damping,
        curvature=curvature,
        curvature_options=curvature_options,
        **(ihvp_options or {}),
    )


@dataclasses.dataclass(frozen=True)
class LowRankFactors:
    """A rank-``r`` compression of ``Q`` influence factors: ``factors ≈ coefficients @ directions``.

    Attributes:
        coefficients: ``[Q, r]``: ``U_r Σ_r`` of the truncated SVD of the factors.
        directions: ``[r, P]``: the top right singular vectors ``V_rᵀ`` (orthonormal rows).
        singular_values: All singular values of the ``[Q, P]`` factors, decreasing.
        relative_error: ``‖factors - coefficients @ directions‖_F / ‖factors‖_F`` (0 at full rank); a score's
            error is at most this times ``‖factors‖_F ‖∇ℓ(z)‖`` by Cauchy-Schwarz.
    """

    coefficients: np.ndarray
    directions: np.ndarray
    singular_values: np.ndarray
    relative_error: float

    @property
    def rank(self) -> int:
        """r, the number of directions kept."""
        return int(self.directions.shape[0])


def compress_factors(factors: Any, rank: int) -> LowRankFactors:
    """Truncated SVD of influence factors ``[Q, P]`` (preconditioned test gradients ``H⁻¹∇ℓ(x)``) to rank ``r``.

    Scoring ``N`` training examples against all ``Q`` queries then needs the training gradients' coordinates on
    ``r`` directions (``[N, P] × [P, r]``) and one ``[N, r] × [r, Q]`` product, instead of ``[N, P] × [P, Q]``.
    Exact when ``rank ≥ min(Q, P)``; the discarded singular values bound the error (``relative_error``).

    Args:
        factors: ``[Q, P]``.
        rank: ``r ≥ 1`` (values above ``min(Q, P)`` keep every direction).

    Returns:
        A :class:`LowRankFactors`.
    """
    array = np.asarray(factors)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"factors must have shape [Q, P] with Q ≥ 1, got {array.shape}.")
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    matrix = array.astype(np.float64)
    # Through the eigenvectors of the smaller Gram matrix: one BLAS product, much faster than an SVD of the [Q, P]
    # block when Q ≪ P. The result is the orthogonal projection of the factors on the kept singular subspace, so it
    # is exact at full rank whatever the accuracy of the small singular values.
    wide = matrix.shape[0] <= matrix.shape[1]
    values, vectors = np.linalg.eigh(matrix @ matrix.T if wide else matrix.T @ matrix)
    vectors = vectors[:, ::-1][:, : int(rank)]
    if wide:  # rows of Uᵀ F are Σ Vᵀ: their norms are the singular values
        projected = vectors.T @ matrix  # [r, P]
        norms = np.linalg.norm(projected, axis=1)
        nonzero = norms > 0
        coefficients = vectors[:, nonzero] * norms[nonzero]  # U Σ
        directions = projected[nonzero] / norms[nonzero, None]  # Vᵀ
    else:
        directions = vectors.T  # Vᵀ
        coefficients = matrix @ vectors  # F V = U Σ
    total = float(np.linalg.norm(matrix))
    residual = float(np.linalg.norm(matrix - coefficients @ directions))  # direct: a difference of norms cancels
    return LowRankFactors(
        coefficients=coefficients.astype(array.dtype),
        directions=directions.astype(array.dtype),
        singular_values=np.sqrt(np.maximum(values[::-1], 0.0)),
        relative_error=residual / total if total > 0 else 0.0,
    )


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
        ihvp_calculator: ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"nystrom"`` or a solver instance.
        n_samples_for_hessian: Use only the first ``n`` training examples for the Hessian.
        normalize: RelatIF normalization of the training side.
        damping: λ for a solver given by name; None (default) keeps the solver's own default (ExactIHVP's
            ``"auto"``: no damping unless H is singular, then 1e-3 of its mean eigenvalue; 0.0 for the others).
        ihvp_options: Other options for a solver given by name (e.g. ``{"tolerance": 1e-8}``).
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.
        curvature: The matrix standing for H, for a solver given by name: ``"hessian"`` (default), ``"ggn"``,
            ``"fisher"`` or ``"empirical_fisher"`` (:mod:`influenciae.hessian.ggn`).
        curvature_options: Options of the curvature operator (e.g. ``{"estimator": "sampled"}`` for the Fisher).
        query_rank: Query batching for :meth:`influence_matrix`: compute the test side's influence factors
            ``H⁻¹∇ℓ(x)`` (one solve per test example), compress them to rank ``r`` (:func:`compress_factors`) and
            score the whole training set in one pass of ``[N, r] × [r, Q]`` products, with no solve per training
            example. Exact for ``r ≥ min(N_test, P)``. ``None`` (default) keeps the training-side influence vectors.
        measurement: What the test side measures instead of its loss (:mod:`influenciae.language`): a
            :class:`~influenciae.language.Measurement` or a callable ``(outputs, targets) -> [B]`` (a loss, lower is
            better). Transforms become ``∇q(x)`` with ``q`` the measurement's query loss; the score
            ``∇q(x)ᵀ H⁻¹ ∇ℓ(z)`` is positive for proponents of the measurement. Influence vectors, self-influence
            and their caches are unchanged. ``None`` (default): the test loss.

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
        damping: float | None = None,
        ihvp_options: dict[str, Any] | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
        curvature: str = "hessian",
        curvature_options: dict[str, Any] | None = None,
        query_rank: int | None = None,
        measurement: Measurement | Any = None,
    ) -> None:
        super().__init__(model, show_progress=show_progress, batches_per_shard=batches_per_shard)
        self.measurement = as_measurement(measurement)
        self.query_model = query_model(model, self.measurement)
        self.train_dataset = check_dataset(dataset, name="dataset")
        self.n_samples_for_hessian = n_samples_for_hessian
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(
                f"normalize (RelatIF) must be True or False, got {normalize!r}. The original Influenciae took "
                "(model, dataset, ihvp_calculator, n_samples_for_hessian, shuffle_buffer_size, normalize): "
                "shuffle_buffer_size is gone here and the fifth positional argument is normalize. Pass "
                "n_samples_for_hessian= and normalize= by keyword, and shuffle the dataset yourself to sample it."
            )
        self.normalize = bool(normalize)
        if query_rank is not None:
            if not isinstance(query_rank, int) or isinstance(query_rank, bool) or query_rank <= 0:
                raise ValueError(f"query_rank must be a positive integer or None, got {query_rank!r}.")
            if self.normalize:
                raise ValueError(
                    "query_rank moves H⁻¹ to the test side, which RelatIF's per-training-example normalization "
                    "does not allow. Use normalize=False, or query_rank=None."
                )
        self.query_rank = query_rank
        #: Which side carries H⁻¹ in influence matrices: "training" (influence vectors) or "test" (factors).
        self.inverse_side = "training" if query_rank is None else "test"
        self.ihvp = build_ihvp(
            model,
            dataset,
            ihvp_calculator,
            n_samples_for_hessian=n_samples_for_hessian,
            damping=damping,
            ihvp_options=ihvp_options,
            curvature=curvature,
            curvature_options=curvature_options,
        )
        if show_progress:  # the solver's own phases (CG iterations, LiSSA/Arnoldi steps) show bars too
            self.ihvp.show_progress = True

    def _configuration(self) -> dict[str, Any]:
        return {
            "ihvp": self.ihvp.configuration(),
            "normalize": self.normalize,
            "n_samples_for_hessian": self.n_samples_for_hessian,
        }

    # ------------------------------------------------------------------ hooks

    def _blocks_cross_shards(self) -> bool:
        # An iterative solve costs the same passes over the Hessian dataset for 50 right-hand sides as for 1,000.
        return self.ihvp.iterative

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        return self._precondition(self.model.batch_jacobian_tensor(batch))

    def _transforms(self, batch: Any) -> tf.Tensor:
        return self.query_model.batch_jacobian_tensor(batch)

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
        return self._factors(self._stream(test_set, "test_set"))

    def _factors(self, test: Stream) -> np.ndarray:
        factors = [self.ihvp.solve(transforms).numpy() for _, transforms in self._transform_stream(test)]
        return np.concatenate(factors) if factors else np.zeros([0, self.model.nb_params])

    def _test_side_scores(self, test: Stream) -> Callable[[Any], tf.Tensor]:
        """With ``query_rank`` (``inverse_side == "test"``): the rank-``query_rank`` compression of the test examples'
        influence factors scores each training batch (:meth:`influence_from_factors`); no training influence
        vector is computed, so :meth:`influence_matrix`'s cache options do not apply."""
        factors = self._factors(test)
        if factors.shape[0] == 0:
            return lambda batch: tf.zeros([0, 0], self.model.dtype)
        return self._low_rank_scores(compress_factors(factors, cast(int, self.query_rank)))

    def influence_from_factors(self, factors: Any, train_set: tf.data.Dataset) -> np.ndarray:
        """Scores of training examples against precomputed influence factors (one gradient pass, no solve).

        With :class:`LowRankFactors` (from :func:`compress_factors`), each training batch's gradients are first
        projected on the ``r`` kept directions, so the pass costs ``[N, P] × [P, r]`` plus ``[N, r] × [r, m]``
        instead of ``[N, P] × [P, m]``: many queries at the price of ``r``.

        Args:
            factors: ``[m, P]`` from :meth:`compute_influence_factors` (or :meth:`load_influence_factors`), or
                their :class:`LowRankFactors` compression.
            train_set: Any batched training subset.

        Returns:
            Array ``[m, N_train]``, equal to :meth:`influence_matrix` of the factors' test examples (up to the
            compression's error for :class:`LowRankFactors`).
        """
        self._require_unnormalized("influence_from_factors")
        if isinstance(factors, LowRankFactors):
            return self._influence_from_low_rank(factors, train_set)
        factors = tf.convert_to_tensor(np.asarray(factors), dtype=self.model.dtype)
        if factors.shape.rank != 2 or factors.shape[1] != self.model.nb_params:
            raise ValueError(f"factors must have shape [m, {self.model.nb_params}], got {factors.shape}.")
        blocks = [
            tf.matmul(factors, gradients, transpose_b=True).numpy()
            for gradients in self._scores_pass(train_set, self.model.batch_jacobian_tensor, "gradients")
        ]
        return np.concatenate(blocks, axis=1) if blocks else np.zeros([int(factors.shape[0]), 0])

    def _influence_from_low_rank(self, factors: LowRankFactors, train_set: tf.data.Dataset) -> np.ndarray:
        scores = self._low_rank_scores(factors)
        blocks = [block.numpy() for block in self._scores_pass(train_set, scores, "gradients (low-rank queries)")]
        return np.concatenate(blocks, axis=1) if blocks else np.zeros([int(factors.coefficients.shape[0]), 0])

    def _low_rank_scores(self, factors: LowRankFactors) -> Callable[[Any], tf.Tensor]:
        """``batch -> [m, B]`` scores of a training batch against rank-``r`` factors (``[B, P] × [P, r]`` first)."""
        directions = tf.constant(factors.directions, dtype=self.model.dtype)  # [r, P]
        coefficients = tf.constant(factors.coefficients, dtype=self.model.dtype)  # [m, r]
        if directions.shape[1] != self.model.nb_params:
            raise ValueError(f"factors live in {directions.shape[1]} parameters, the model has {self.model.nb_params}.")

        def scores(batch: Any) -> tf.Tensor:
            coordinates = tf.matmul(self.model.batch_jacobian_tensor(batch), directions, transpose_b=True)  # [B, r]
            return tf.matmul(coefficients, coordinates, transpose_b=True)  # [m, B]

        return scores

    def save_influence_factors(self, factors: np.ndarray, path: str, test_set: tf.data.Dataset) -> None:
        """Save factors atomically with this calculator's configuration and the model's weight fingerprint."""
        cache = DiskCache(
            path,
            configuration={**self.configuration(), "kind": "influence_factors", **self._measurement_configuration()},
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
            configuration={**self.configuration(), "kind": "influence_factors", **self._measurement_configuration()},
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
            for perturbation in self._scores_pass(
                train_set, lambda batch: self.model.batch_perturbation(batch, factors), "perturbation"
            )
        ]
        return np.concatenate(blocks, axis=1)

    def _scores_pass(self, train_set: tf.data.Dataset, function: Callable[[Any], Any], description: str) -> Any:
        for _, batch in self._stream(train_set, "train_set").batches(self._bar(description)):
            yield function(batch)

    def _measurement_configuration(self) -> dict[str, Any]:
        # factors depend on the measurement; training-side vectors do not, so only factor caches record it
        return {} if self.measurement is None else {"measurement": self.measurement.configuration()}

    def _require_unnormalized(self, method: str) -> None:
        if self.normalize:
            raise ValueError(
                f"{method} moves H⁻¹ to the test side, which RelatIF's per-training-example normalization does not "
                "allow. Use influence_matrix/top_k, or a calculator with normalize=False."
            )
