"""TRAK: Tracing with the Randomly-projected After Kernel (Park, Georgiev, Ilyas, Leclerc & Mądry, ICML 2023).

For each checkpoint ``m`` (independently trained models, or checkpoints of one run) TRAK linearizes a *model output
function* ``f(z; θ)`` around the trained weights, projects its per-sample gradients to ``k`` dimensions,
``φ(z) = Pᵀ ∇_θ f(z; θ)`` with a random ``P ∈ R^{p×k}``, and estimates the effect of training example ``z_i`` on
``f(x)`` by one Newton step of the linearized (logistic) model:

    τ_m(x, z_i) = φ_m(x)ᵀ (Φ_mᵀ Φ_m)⁻¹ φ_m(z_i),          Q_m(z_i) = -∂ℓ/∂f (z_i) = 1 - p(z_i),
    score(x, z_i) = [(1/M) Σ_m τ_m(x, z_i)] · [(1/M) Σ_m Q_m(z_i)],

where ``Φ_m`` stacks the ``φ_m`` of the training set and, for classification, ``f`` is the margin
``log(p / (1 - p))`` of the correct class (``p`` its softmax or sigmoid probability). The two averages over
checkpoints are taken separately, as in the paper and its reference implementation.

Sign and scale: ``score(x, z)`` estimates ``f(x; θ) - f(x; θ_{-z})``, how much training on ``z`` raises the output
function of ``x`` (its margin, in logits), without a ``1/N`` factor: ``ΦᵀΦ`` is a sum over the training set.
Positive means ``z`` is a **proponent** of ``x`` (it raises the margin of ``x``'s label), so ``ORDER.DESCENDING``
lists proponents first, as for the influence functions of ``docs/theory.md``. Self-influence
``φ(z)ᵀ(ΦᵀΦ)⁻¹φ(z) · Q(z) ≥ 0`` is a leverage score times ``1 - p(z)``: high for atypical, badly fit examples.

Exact relation to influence functions (tested): with ``projection_dim=None`` (no projection) or any square
invertible projection, ``τ(x, z) = ∇f(x)ᵀ G⁻¹ ∇f(z)`` with ``G = Σ_i ∇f_i ∇f_iᵀ + damping·I`` (damping needs
``projection_dim=None`` for this identity). For a logistic loss ``∇ℓ(z) = -(1 - p_z) ∇f(z)``, so
``score = -∇f(x)ᵀ G⁻¹ ∇ℓ(z)``: an influence function on ``f(x)`` with the Gauss-Newton matrix of unit output
curvature. ``kernel="gauss_newton"`` weights the kernel by the loss curvature ``∂²ℓ/∂f² = p(1 - p)``,
``G = Σ_i p_i(1 - p_i) ∇f_i ∇f_iᵀ + damping·I``: for an L2-regularized logistic regression ``(λ/2)‖θ‖²`` with
``damping = Nλ`` this is ``N`` times its exact Hessian, and ``score(x, z) = influence(z, x) / (N (1 - p_x))`` with
the first-order influence of :class:`~influenciae.FirstOrderInfluenceCalculator`.

Projections are generated in pure TensorFlow, block by block: rows ``[b·B, (b+1)·B)`` of ``P`` come from
``tf.random.stateless_normal`` (or a Rademacher draw) seeded by ``(seed, checkpoint)`` folded with the block index
``b``, scaled by ``1/sqrt(k)`` so that ``E[PPᵀ] = I``. No projection matrix is stored: memory is
``O(projection_block_size × k)`` and the same seed always gives the same scores. The kernels ``ΦᵀΦ`` (``k × k``)
are accumulated in float64 over one pass of the training set, lazily on first use, and cached.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, cast

import numpy as np

from influenciae._backend import tf
from influenciae.cache import combine_hashes, fingerprint_arrays
from influenciae.data import check_dataset, split_batch
from influenciae.hessian.exact import AUTO_DAMPING_FRACTION
from influenciae.influence._contexts import ContextHooks, ModelContexts
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.influence.trak_outputs import (
    MarginOutput,
    ModelOutputFunction,
    RegressionOutput,
    resolve_output_function,
)
from influenciae.language import Measurement, as_measurement, query_model
from influenciae.model import InfluenceModel

LOGGER = logging.getLogger("influenciae")

__all__ = ["ModelOutputFunction", "MarginOutput", "RegressionOutput", "TrakCalculator", "TrakOptions"]


@dataclasses.dataclass(frozen=True)
class TrakOptions:
    """The settings of :class:`TrakCalculator` (see its arguments), validated once, here.

    Example:
        >>> options = TrakOptions(projection_dim=2048, seed=0, kernel="gauss_newton")
        >>> trak = TrakCalculator([model_a, model_b], train_ds, options=options)
    """

    projection_dim: int | None
    seed: int = 0
    damping: float | str = "auto"
    output_function: str | ModelOutputFunction = "margin"
    projection: str = "gaussian"
    kernel: str = "trak"
    projection_block_size: int = 1024

    def __post_init__(self) -> None:
        dim, seed, damping = self.projection_dim, self.seed, self.damping
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0):
            raise ValueError(f"projection_dim must be a positive integer or None (no projection), got {dim!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        if damping != "auto" and (
            isinstance(damping, bool) or not isinstance(damping, (int, float, np.floating)) or not 0 <= damping < np.inf
        ):
            raise ValueError(f"damping must be 'auto' or a non-negative finite number, got {damping!r}.")
        if self.projection not in ("gaussian", "rademacher"):
            raise ValueError(f"projection must be 'gaussian' or 'rademacher', got {self.projection!r}.")
        if self.kernel not in ("trak", "gauss_newton"):
            raise ValueError(f"kernel must be 'trak' or 'gauss_newton', got {self.kernel!r}.")
        block = self.projection_block_size
        if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
            raise ValueError(f"projection_block_size must be a positive integer, got {block!r}.")
        object.__setattr__(self, "projection_dim", None if dim is None else int(dim))
        object.__setattr__(self, "seed", int(seed))
        object.__setattr__(self, "damping", damping if damping == "auto" else float(damping))
        object.__setattr__(self, "output_function", resolve_output_function(self.output_function))

    @classmethod
    def of(cls, options: TrakOptions | None, projection_dim: Any, settings: dict[str, Any]) -> TrakOptions:
        """The options given as an instance, or as :class:`TrakCalculator`'s keyword arguments (not both)."""
        if options is None:
            if projection_dim is _UNSET:
                raise TypeError("TrakCalculator needs projection_dim (an int, or None for no projection) or options=.")
            return cls(projection_dim, **settings)
        if not isinstance(options, TrakOptions):
            raise TypeError(f"options must be a TrakOptions, got {type(options).__name__}.")
        if projection_dim is not _UNSET or settings:
            raise ValueError("Pass the settings either as options=TrakOptions(...) or as keyword arguments, not both.")
        return options


_UNSET: Any = object()


class TrakCalculator(ContextHooks, BaseInfluenceCalculator):
    """TRAK scores (Park et al., 2023) of training examples, on the shared engine.

    See the module docstring for the estimator, its sign and scale and its exact relation to influence functions.
    The test-side transform of ``x`` is ``[φ_1(x), ..., φ_M(x)]`` and the influence vector of ``z`` is
    ``w_z Q̄(z) / M · [K_1⁻¹ φ_1(z), ..., K_M⁻¹ φ_M(z)]`` (``M·k`` numbers), with ``Q̄`` the mean of ``Q_m`` and
    ``K_m = Φ_mᵀ W Φ_m + damping·I`` (``W`` the sample weights, 1 when absent, times the loss curvature with
    ``kernel="gauss_newton"``); scores are dot products, so every top-k strategy applies. The kernels need one pass
    over ``train_set`` before the first influence vector; they are computed lazily and cached.

    Args:
        model: The trained model: a Keras model, an :class:`InfluenceModel` (its watched weights are the ``θ`` of
            ``∇_θ f``; its loss is not used) or a list of them, one per checkpoint, for the ensemble.
        train_set: The batched training set ``(inputs, targets[, sample_weight])`` that defines the kernels.
        projection_dim: ``k``, the dimension of the projected gradients, or None for no projection (``k = p``,
            exact gradients: small models and tests).
        seed: Seed of the projections (same seed, same scores).
        damping: ``δ ≥ 0`` added to the diagonal of each kernel (TRAK's ``lambda_reg``), in the units of
            ``φ = Pᵀ∇f`` with ``E[PPᵀ] = I``. ``"auto"`` (default): none when the kernel is positive definite,
            else ``1e-3 × trace(K)/k`` (its mean eigenvalue), logged and in ``damping_used``; ``0.0`` is exactly
            zero and refuses a singular kernel (e.g. softmax logistic regression without projection, whose
            kernel has the logit-shift null directions).
        output_function: ``"margin"`` (classification, default), ``"output"`` (single-output regression) or a
            :class:`ModelOutputFunction`.
        projection: ``"gaussian"`` or ``"rademacher"`` entries, both scaled by ``1/sqrt(k)``.
        kernel: ``"trak"`` (``ΦᵀΦ``, the paper) or ``"gauss_newton"`` (``Φᵀ diag(∂²ℓ/∂f²) Φ``).
        projection_block_size: Rows of ``P`` generated at once (part of the projection's definition).
        options: All of the settings above (``projection_dim`` to ``projection_block_size``) as one
            :class:`TrakOptions`, instead of the keyword arguments (a setting left out takes the default of
            :class:`TrakOptions`).
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.
        measurement: What the test side measures instead of the output function (:mod:`influenciae.language`):
            transforms become ``Pᵀ∇(-q)(x)`` with ``q`` the measurement's query loss (``-q`` is the measurement
            oriented so that higher is better), so the score estimates how much training on ``z`` moves the
            measurement in its good direction: positive for proponents. ``Measurement(margin,
            higher_is_better=True)`` reproduces the default. The kernels and influence vectors are unchanged.

    Example:
        >>> trak = TrakCalculator([model_a, model_b], train_ds, projection_dim=2048, seed=0)
        >>> indices, values = trak.most_influential(test_ds, train_ds, k=5)
    """

    method_name = "trak"

    def __init__(
        self,
        model: Any,
        train_set: tf.data.Dataset,
        projection_dim: int | None = _UNSET,
        *,
        seed: int = _UNSET,
        damping: float | str = _UNSET,
        output_function: str | ModelOutputFunction = _UNSET,
        projection: str = _UNSET,
        kernel: str = _UNSET,
        projection_block_size: int = _UNSET,
        options: TrakOptions | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
        measurement: Measurement | Any = None,
    ) -> None:
        given = {
            "seed": seed,
            "damping": damping,
            "output_function": output_function,
            "projection": projection,
            "kernel": kernel,
            "projection_block_size": projection_block_size,
        }
        settings = {name: value for name, value in given.items() if value is not _UNSET}
        self.options = TrakOptions.of(options, projection_dim, settings)
        self.output_function = cast(ModelOutputFunction, self.options.output_function)
        members = list(model) if isinstance(model, (list, tuple)) else [model]
        if not members:
            raise ValueError("model is an empty list: pass a model or a list of checkpoints.")
        self.checkpoints = [self._wrap(member) for member in members]
        self.measurement = as_measurement(measurement)
        self.query_checkpoints = [
            query_model(checkpoint, self.measurement, goodness=True) for checkpoint in self.checkpoints
        ]
        super().__init__(self.checkpoints[0], show_progress=show_progress, batches_per_shard=batches_per_shard)
        if len({checkpoint.dtype for checkpoint in self.checkpoints}) > 1:
            raise TypeError("All checkpoints must have weights of the same dtype.")
        self.contexts = ModelContexts(self.checkpoints, _weights_fingerprint)
        self.train_set = check_dataset(train_set, name="train_set")
        self.projection_dim = self.options.projection_dim
        self.seed = self.options.seed
        self.damping: float | str = self.options.damping
        self.damping_used: list[float] | None = None  # per checkpoint, once the kernels are factorized
        self.projection = self.options.projection
        self.kernel = self.options.kernel
        self.projection_block_size = self.options.projection_block_size
        self._factors: list[tf.Tensor] | None = None
        self._project_fn = tf.function(self._blocked_projection, reduce_retracing=True)  # autograph: its tf.range loop

    # ------------------------------------------------------------------ public extras

    @property
    def num_checkpoints(self) -> int:
        """M, the number of models in the ensemble."""
        return len(self.checkpoints)

    def kernel_matrices(self) -> list[np.ndarray]:
        """The kernels ``K_m = Φ_mᵀ W Φ_m + damping·I`` ``[k, k]`` (float64), one per checkpoint."""
        return [(factor @ tf.transpose(factor)).numpy() for factor in self._kernel_factors()]

    def projection_matrix(self, checkpoint: int = 0) -> np.ndarray:
        """The projection ``P`` ``[p, k]`` of a checkpoint, materialized (for inspection and tests; it is never
        stored otherwise)."""
        if self.projection_dim is None:
            return np.eye(self.checkpoints[checkpoint].nb_params)
        num_params = self.checkpoints[checkpoint].nb_params
        blocks = -(-num_params // self.projection_block_size)
        seed = self._base_seed(checkpoint)
        rows = [self._block(tf.random.experimental.stateless_fold_in(seed, b, alg="philox")) for b in range(blocks)]
        return tf.concat(rows, axis=0)[:num_params].numpy()

    def project(self, gradients: Any, checkpoint: int = 0) -> tf.Tensor:
        """``Pᵀ g`` for each row ``g`` of ``gradients`` ``[n, p]``: ``[n, k]``, block by block."""
        gradients = tf.convert_to_tensor(gradients, self.model.dtype)
        if self.projection_dim is None:
            return gradients
        return self._project_fn(gradients, self._base_seed(checkpoint))

    # ------------------------------------------------------------------ hooks

    def _configuration(self) -> dict[str, Any]:
        return {
            "projection_dim": self.projection_dim,
            "projection": self.projection,
            "projection_block_size": self.projection_block_size,
            "seed": self.seed,
            "damping": self.damping,
            "kernel": self.kernel,
            "output_function": self.output_function.configuration(),
            "num_checkpoints": self.num_checkpoints,
            "kernels": fingerprint_arrays(self._kernel_factors()),
        }

    def weights_fingerprint(self) -> str:
        """A hash of the weights of every checkpoint."""
        return combine_hashes(self.contexts.fingerprints())

    # ------------------------------------------------------------------ hooks: the ensemble's members are the contexts

    def _features(self, model: InfluenceModel, index: int, batch: Any) -> tuple[tf.Tensor, ...]:
        """``(φ_m, K_m⁻¹φ_m, Q_m, w)`` of a training batch at member ``m`` (float64 but ``φ_m``)."""
        inputs, targets, weights = split_batch(batch, self.model.dtype)
        features = self._projected(index, inputs, targets)
        solved = _cholesky_solve_rows(self._kernel_factors()[index], features)
        out_to_loss = tf.cast(self.output_function.out_to_loss(self._outputs(index, inputs), targets), tf.float64)
        return features, solved, out_to_loss, tf.cast(weights, tf.float64)

    def _query_features(self, model: InfluenceModel, index: int, batch: Any) -> tf.Tensor:
        inputs, targets, _ = split_batch(batch, self.model.dtype)
        return self.project(self.query_checkpoints[index].batch_jacobian_tensor((inputs, targets)), index)

    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        solved = tf.concat([member[1] for member in features], axis=1)
        return tf.cast(solved * self._scale(features)[:, None], self.model.dtype)

    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        return tf.concat(features, axis=1)

    def _self_influence(self, batch: Any) -> tf.Tensor:
        features = [self._features(model, m, batch) for m, model in enumerate(self.checkpoints)]
        leverage = tf.add_n([tf.reduce_sum(tf.cast(phi, tf.float64) * solved, axis=1) for phi, solved, *_ in features])
        return tf.cast(leverage * self._scale(features), self.model.dtype)

    def _scale(self, features: list[Any]) -> tf.Tensor:
        """``w Σ_m Q_m / M²`` ``[B]``: the training side's weight and mean ``Q``, and the ``1/M`` of the mean ``τ``."""
        return tf.add_n([member[2] for member in features]) * features[0][3] / float(self.num_checkpoints**2)

    # ------------------------------------------------------------------ internals

    def _wrap(self, member: Any) -> InfluenceModel:
        """An InfluenceModel whose per-example "loss" is the output function f: its Jacobian is ``∇_θ f``."""

        def output(targets: Any, predictions: tf.Tensor) -> tf.Tensor:
            return self.output_function.output(predictions, targets)

        if isinstance(member, InfluenceModel):
            return InfluenceModel(
                member.model, weights_to_watch=member.weights, loss_function=output, max_chunk_size=member.chunk_size
            )
        return InfluenceModel(member, loss_function=output)

    def _projected(self, checkpoint: int, inputs: Any, targets: Any) -> tf.Tensor:
        """``φ_m`` ``[B, k]`` of a batch for checkpoint ``m`` (sample weights stay out of ``∇f``)."""
        gradients = self.checkpoints[checkpoint].batch_jacobian_tensor((inputs, targets))
        return self.project(gradients, checkpoint)

    def _outputs(self, checkpoint: int, inputs: Any) -> tf.Tensor:
        return self.checkpoints[checkpoint].model(inputs, training=False)

    def _kernel_factors(self) -> list[tf.Tensor]:
        """Cholesky factors of the kernels, from one pass over the training set (computed once)."""
        if self._factors is not None:
            return self._factors
        kernels: dict[int, tf.Tensor] = {}
        for _, batch in self._stream(self.train_set, "train_set").batches(self._bar("TRAK kernel")):
            inputs, targets, weights = split_batch(batch, self.model.dtype)
            for m in range(self.num_checkpoints):
                features = self._projected(m, inputs, targets)
                row_weights = tf.cast(weights, tf.float64)
                if self.kernel == "gauss_newton":
                    curvature = self.output_function.curvature(self._outputs(m, inputs), targets)
                    row_weights *= tf.cast(curvature, tf.float64)
                features = tf.cast(features, tf.float64)
                block = tf.matmul(features * row_weights[:, None], features, transpose_a=True)
                kernels[m] = kernels[m] + block if m in kernels else block
        if not kernels:
            raise ValueError("train_set is empty.")
        factors, used = [], []
        for m in range(self.num_checkpoints):
            symmetric = (kernels[m] + tf.transpose(kernels[m])) / 2
            eigenvalues = np.linalg.eigvalsh(symmetric.numpy())  # once: damping shifts them all by itself
            damping = self._damping_for(m, symmetric, eigenvalues)
            used.append(damping)
            damped = symmetric + damping * tf.eye(int(symmetric.shape[0]), dtype=tf.float64)
            factors.append(self._factorize(m, damped, eigenvalues + damping))
        self._factors, self.damping_used = factors, used
        return factors

    def _damping_for(self, checkpoint: int, kernel: tf.Tensor, eigenvalues: np.ndarray) -> float:
        """The damping of one kernel: the given number, or for ``"auto"`` none unless the kernel is singular."""
        if self.damping != "auto":
            return float(self.damping)
        if not _singular(eigenvalues):
            return 0.0
        size = int(kernel.shape[0])
        damping = max(AUTO_DAMPING_FRACTION * float(np.trace(kernel.numpy())) / size, np.finfo(np.float64).tiny)
        LOGGER.info(
            "TrakCalculator: kernel %d (k=%d) is singular (smallest eigenvalue %.3e); damping='auto' adds %.3e "
            "(%.0e x its mean eigenvalue).",
            checkpoint,
            size,
            float(eigenvalues.min()),
            damping,
            AUTO_DAMPING_FRACTION,
        )
        return damping

    def _factorize(self, checkpoint: int, kernel: tf.Tensor, eigenvalues: np.ndarray) -> tf.Tensor:
        size = int(kernel.shape[0])
        largest = _largest_magnitude(eigenvalues)
        if _singular(eigenvalues):
            raise ValueError(
                f"The TRAK kernel of checkpoint {checkpoint} (k={size}, damping={self.damping!r}) is singular or not "
                f"positive definite: eigenvalues in [{eigenvalues.min():.3e}, {eigenvalues.max():.3e}]. It has rank "
                "at most min(number of training examples, number of parameters): lower projection_dim or add "
                f"damping (e.g. damping={max(1e-6 * largest, 1e-12):.1e})."
            )
        return tf.linalg.cholesky(kernel)

    def _base_seed(self, checkpoint: int) -> tf.Tensor:
        return tf.constant([self.seed, checkpoint], dtype=tf.int64)

    def _block(self, seed: tf.Tensor) -> tf.Tensor:
        """Rows ``[block, k]`` of the projection for a block seed: N(0, 1/k) or ±1/sqrt(k) entries."""
        dim = cast(int, self.projection_dim)  # only called with a projection
        shape = [self.projection_block_size, dim]
        dtype = self.model.dtype
        if self.projection == "gaussian":
            values = tf.random.stateless_normal(shape, seed, dtype=dtype, alg="philox")
        else:
            bits = tf.random.stateless_uniform(shape, seed, minval=0, maxval=2, dtype=tf.int32, alg="philox")
            values = tf.cast(2 * bits - 1, dtype)
        return values * tf.constant(1.0 / math.sqrt(dim), dtype)  # a Python scale: exact in float64

    def _blocked_projection(self, gradients: tf.Tensor, base_seed: tf.Tensor) -> tf.Tensor:
        block = self.projection_block_size
        num_params = gradients.shape[-1]
        num_blocks = -(-num_params // block)
        padded = tf.pad(gradients, [[0, 0], [0, num_blocks * block - num_params]])
        result = tf.zeros([tf.shape(gradients)[0], self.projection_dim], gradients.dtype)
        for index in tf.range(num_blocks):
            seed = tf.random.experimental.stateless_fold_in(base_seed, index, alg="philox")
            rows = padded[:, index * block : (index + 1) * block]
            result += tf.matmul(rows, self._block(seed))
        return result


# ---------------------------------------------------------------------- helpers


def _weights_fingerprint(model: InfluenceModel) -> str:
    return fingerprint_arrays(weight.numpy() for weight in model.model.weights)


def _cholesky_solve_rows(factor: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
    """``K⁻¹ φ`` for each row ``φ`` ``[n, k]`` (float64), from the Cholesky factor of ``K``."""
    return tf.transpose(tf.linalg.cholesky_solve(factor, tf.transpose(tf.cast(rows, tf.float64))))


def _largest_magnitude(eigenvalues: np.ndarray) -> float:
    return max(float(np.abs(eigenvalues).max()), np.finfo(np.float64).tiny)


def _singular(eigenvalues: np.ndarray) -> bool:
    """Whether a symmetric kernel with these eigenvalues ``[k]`` is singular or not positive definite (float64)."""
    return bool(
        float(eigenvalues.min()) <= eigenvalues.size * np.finfo(np.float64).eps * _largest_magnitude(eigenvalues)
    )
