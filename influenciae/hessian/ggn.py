"""Gauss-Newton and Fisher curvatures: positive semi-definite stand-ins for the Hessian, usable by every solver.

With ``o_i = f(x_i; θ)`` the model's outputs, ``J_i = ∂o_i/∂θ`` and ``H_out,i = ∇²_o (w_i ℓ(y_i, o_i))``:

* **Generalized Gauss-Newton** ``G = (1/N) Σ_i J_iᵀ H_out,i J_i + ∇²Ω`` drops the second-order term of the network
  from the Hessian. It is positive semi-definite whenever the loss is convex in the outputs (cross-entropy on
  logits, squared error), so CG, LiSSA and Nyström behave where the Hessian of a non-convex model does not.
* **True Fisher** ``F = (1/N) Σ_i w_i E_{ŷ ~ p(·|x_i)} [∇_θ ℓ(ŷ, o_i) ∇_θ ℓ(ŷ, o_i)ᵀ] + ∇²Ω`` with labels drawn
  from the model's own predictive distribution: either the exact expectation over the classes or a seeded Monte
  Carlo estimate. For cross-entropy on logits (and for squared error) the exact Fisher equals the GGN.
* **Empirical Fisher** ``F_emp = (1/N) Σ_i w_i ∇_θ ℓ(y_i) ∇_θ ℓ(y_i)ᵀ + ∇²Ω`` with the dataset's own labels, from
  per-sample gradients. Cheap, but not a curvature of the objective (Kunstner et al., 2019): use with care.

All products are matrix-free: the output-space operators run a forward-mode JVP ``J v``, multiply by the small
per-example output-space matrix, and pull the result back with one vectorized VJP; the dataset is held as tensors (one
graph call per product) or streamed once per product, exactly as :class:`~influenciae.hessian.operator.HessianOperator`
does (:class:`~influenciae.hessian.operator.DatasetOperator`). The regularizer's Hessian ``∇²Ω``
(weight regularizers) is added as for the Hessian. Select a curvature for any solver with
``get_ihvp(name, model, dataset, curvature="ggn")`` or ``FirstOrderInfluenceCalculator(..., curvature="ggn")``.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.operator import (
    BatchSum,
    DatasetOperator,
    HeldBatches,
    HessianOperator,
    batches_with_progress,
)
from influenciae.hessian.output_space import (
    _batch_parts,
    _class_scores,
    _looks_like_class_labels,
    _outer_product_sum,
    _pad_indices,
    _per_example_normal,
    _sample_classes,
    autodiff_output_hessian,
    closed_form_output_hessian,
)
from influenciae.hessian.registry import CURVATURE_REGISTRY, curvature_of, curvature_operator
from influenciae.model import InfluenceModel

__all__ = [
    "CURVATURES",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GaussNewtonOperator",
    "curvature_operator",
    "curvature_of",
]


_LIKELIHOODS = ("auto", "categorical", "gaussian")
_OUTPUT_HESSIANS = ("auto", "autodiff")
_PROBABILITY_TOLERANCE = 1e-3  # |Σ_c exp(-ℓ(c)) - 1| allowed for a loss to count as a negative log-likelihood


class OutputBatch(NamedTuple):
    """One batch as the output-space products see it: the model's ``outputs [B, *output_shape]``, the ``targets``,
    the sample ``weights [B]``, the examples' ``indices [B]`` in the dataset and the products' ``seed``."""

    outputs: tf.Tensor
    targets: Any
    weights: tf.Tensor
    indices: tf.Tensor
    seed: tf.Tensor


class CurvatureOperator(DatasetOperator):
    """A curvature averaged over a dataset: ``(1/N) Σ_batches batch_sum + ∇²Ω``, held as tensors or streamed.

    Subclasses implement :meth:`_batch_sum`, the sum of their per-example curvature products over one batch (eager,
    for the streamed path), and :meth:`_held_product` (pure TensorFlow, for the held path, see
    :class:`~influenciae.hessian.operator.DatasetOperator`), and set ``curvature`` to their name in
    :data:`CURVATURES` (and register it in the curvature registry).

    Args:
        model: The wrapped model.
        dataset: Batched ``(inputs, targets[, sample_weight])`` dataset defining the mean.
        held_data_budget: Bytes up to which the data is held as tensors (default
            :data:`~influenciae.hessian.operator.HELD_DATA_BUDGET`; 0 always streams).
    """

    curvature: ClassVar[str] = ""

    def __init__(self, model: InfluenceModel, dataset: tf.data.Dataset, *, held_data_budget: int | None = None) -> None:
        super().__init__(model, dataset, type(self).__name__, held_data_budget=held_data_budget)

    def configuration(self) -> dict[str, Any]:
        """The curvature's name and options (part of the solvers' configuration, hence of cache manifests)."""
        return {"curvature": self.curvature}

    def batch_sum(self, batch: Any, vectors: tf.Tensor, *, first_index: int = 0) -> tf.Tensor:
        """Sum over one batch of the per-example curvature products, without the regularizer.

        Args:
            batch: ``(inputs, targets[, sample_weight])``.
            vectors: ``[n, P]``.
            first_index: Position of the batch's first example in the dataset (seeds sampled labels, so that
                a sampled Fisher does not depend on the batching).

        Returns:
            Tensor ``[n, P]``.
        """
        self.model.validate_batch(batch)
        vectors = tf.convert_to_tensor(vectors, dtype=self.dtype)
        return self._batch_sum(batch, vectors, first_index)

    def _batch_sum(self, batch: Any, vectors: tf.Tensor, first_index: int) -> tf.Tensor:
        raise NotImplementedError

    def _streamed_matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        total = tf.zeros_like(vectors)
        count = 0
        for batch in batches_with_progress(self):
            total += self.batch_sum(batch, vectors, first_index=count)
            count += int(tf.shape(tf.nest.flatten(batch[1])[0])[0])
        if count == 0:
            raise ValueError(self._empty_message)
        self._num_examples = count
        return total / tf.cast(count, self.dtype) + self.model.regularization_hvp(vectors)


class _OutputSpaceOperator(CurvatureOperator):
    """``Σ_i J_iᵀ M_i J_i v`` for a per-example output-space matrix ``M_i`` given by :meth:`_output_product`."""

    def _batch_sum(self, batch: Any, vectors: tf.Tensor, first_index: int) -> tf.Tensor:
        inputs, targets, weights = _batch_parts(self.model, batch)
        size = int(tf.shape(weights)[0])
        indices = tf.range(first_index, first_index + size, dtype=tf.int64)
        # one traced function per model and settings, shared by every operator alike (tracing is the slow part, a
        # minute on a small transformer): traced on static shapes so that the vectorized JVP/VJP inside never see an
        # unknown dimension, and on few of them: a partial batch is padded with zero-weight copies of its last
        # example and a partial block of vectors with zeros (the model's own rule for static lengths)
        product = self.model.shared_function(
            (type(self).__name__, *self._trace_key()), lambda: tf.function(self._batch_product, autograph=False)
        )
        inputs, targets, weights = self.model._pad_batch(inputs, targets, weights)
        indices = _pad_indices(indices, int(tf.shape(weights)[0]))
        chunk = self.model.hvp_chunk_size
        parts = []
        for start in range(0, int(vectors.shape[0]), chunk):
            block = vectors[start : start + chunk]
            rows = int(block.shape[0])
            length = self.model._static_length("vectors", rows, chunk)
            padded = tf.concat([block, tf.zeros([length - rows, block.shape[1]], block.dtype)], 0)
            parts.append(product(inputs, targets, weights, indices, self._seed_tensor(), padded)[:rows])
        return tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]

    def _trace_key(self) -> tuple[Any, ...]:
        """The settings baked into the traced product (all but the seed, passed as a tensor)."""
        return ()

    def _held_product(self) -> tuple[tuple[Any, ...], BatchSum, tuple[tf.Tensor, ...]]:
        def batch_sum(batch: tuple[Any, Any, tf.Tensor, tf.Tensor], extra: Any, vectors: tf.Tensor) -> tf.Tensor:
            inputs, targets, weights, indices = batch
            return self._batch_product(inputs, targets, weights, indices, extra[0], vectors)

        return (type(self).__name__, *self._trace_key()), batch_sum, (self._seed_tensor(),)

    def _seed_tensor(self) -> tf.Tensor:
        return tf.constant(0, tf.int64)

    def _batch_product(
        self, inputs: Any, targets: Any, weights: tf.Tensor, indices: tf.Tensor, seed: tf.Tensor, vectors: tf.Tensor
    ) -> tf.Tensor:
        batch = (inputs, targets, weights)
        outputs = self.model.batch_outputs(batch)
        tangents = self.model.batch_output_jvp(batch, vectors)  # [n, B, *output_shape]
        products = self._output_product(OutputBatch(outputs, targets, weights, indices, seed), tangents)
        return self.model.batch_output_vjp(batch, tf.stop_gradient(products))

    def _output_product(self, batch: OutputBatch, tangents: tf.Tensor) -> tf.Tensor:
        """``M_i t`` for every example ``i`` of ``batch`` and tangent ``t``: ``[n, B, *output_shape]`` -> same shape."""
        raise NotImplementedError


class GaussNewtonOperator(_OutputSpaceOperator):
    """The generalized Gauss-Newton matrix ``G = (1/N) Σ_i J_iᵀ H_out,i J_i + ∇²Ω``.

    ``H_out,i`` is the Hessian of the (weighted) loss with respect to the model's outputs: in closed form for
    Keras cross-entropy on logits (softmax: ``diag(p) - ppᵀ``; sigmoid: ``σ(1-σ)/K``) and mean squared error
    (``2/K · I``), otherwise by differentiating the loss twice with respect to the outputs (cheap: output-sized).
    When the model's last layer applies a softmax and the loss takes probabilities, the split happens after the
    softmax; prefer logits and ``from_logits=True``, where the GGN equals the exact Fisher.

    Args:
        model: The wrapped model (one output tensor).
        dataset: The curvature dataset.
        output_hessian: ``"auto"`` (closed form when the loss is recognized, see
            :attr:`InfluenceModel.loss_family`) or ``"autodiff"`` (always differentiate the loss).

    Example:
        >>> ggn = GaussNewtonOperator(im, train_ds)
        >>> gv = ggn.matmul_rows(v)  # [n, P] -> [n, P]
        >>> ihvp = ConjugateGradientDescentIHVP(None, operator=ggn, damping=1e-3)
    """

    curvature = "ggn"

    def __init__(
        self,
        model: InfluenceModel,
        dataset: tf.data.Dataset,
        *,
        output_hessian: str = "auto",
        held_data_budget: int | None = None,
    ) -> None:
        if output_hessian not in _OUTPUT_HESSIANS:
            raise ValueError(f"output_hessian must be one of {_OUTPUT_HESSIANS}, got {output_hessian!r}.")
        super().__init__(model, dataset, held_data_budget=held_data_budget)
        self.output_hessian = output_hessian
        self._closed_form = model.loss_family if output_hessian == "auto" else None

    def configuration(self) -> dict[str, Any]:
        return {**super().configuration(), "output_hessian": self.output_hessian}

    def _trace_key(self) -> tuple[Any, ...]:
        return (self._closed_form,)

    def _output_product(self, batch: OutputBatch, tangents: tf.Tensor) -> tf.Tensor:
        outputs, targets, weights, _, _ = batch
        if self._closed_form is not None and outputs.shape.rank == 2:
            return closed_form_output_hessian(self._closed_form, outputs, weights, tangents)
        return autodiff_output_hessian(self.model, outputs, targets, weights, tangents)


class FisherOperator(_OutputSpaceOperator):
    """The true Fisher ``F = (1/N) Σ_i w_i E_{ŷ ~ p(·|x_i)}[∇ℓ(ŷ) ∇ℓ(ŷ)ᵀ] + ∇²Ω``, labels from the model.

    The predictive distribution is read off the loss itself: for a classification loss that is a negative
    log-likelihood (cross-entropy on logits or probabilities, binary cross-entropy), ``p(c|x) = exp(-ℓ(c, o))``,
    which is checked to sum to one over the classes. A regression loss is treated as a Gaussian negative
    log-likelihood of precision ``H_out`` (``y ~ N(o, H_out⁻¹)``), whose exact Fisher is the GGN.

    Args:
        model: The wrapped model (one output tensor; ``[B, C]`` for classification, ``[B, 1]`` binary).
        dataset: The curvature dataset.
        estimator: ``"exact"`` (the expectation over the classes: ``Jᵀ (Σ_c p_c s_c s_cᵀ) J`` with ``s_c`` the
            output-space gradient for class ``c``) or ``"sampled"`` (``num_samples`` labels per example drawn from
            the model, seeded by ``seed`` and the example's position in the dataset, so repeated products, and
            any batching of the same dataset, see the same labels).
        num_samples: Labels drawn per example with ``estimator="sampled"``.
        seed: Seed of the sampled labels.
        likelihood: ``"auto"`` (classification when the targets are class labels or one-hot rows, else
            Gaussian), ``"categorical"`` or ``"gaussian"``.

    Raises:
        ValueError: From the first product, when a classification loss is not a negative log-likelihood (its
            ``exp(-loss)`` do not sum to one over the classes).

    Example:
        >>> fisher = FisherOperator(im, train_ds, estimator="sampled", num_samples=4, seed=0)
        >>> ihvp = get_ihvp("cg", im, train_ds, curvature="fisher", damping=1e-3)
    """

    curvature = "fisher"

    def __init__(
        self,
        model: InfluenceModel,
        dataset: tf.data.Dataset,
        *,
        estimator: str = "exact",
        num_samples: int = 1,
        seed: int = 0,
        likelihood: str = "auto",
        held_data_budget: int | None = None,
    ) -> None:
        if estimator not in ("exact", "sampled"):
            raise ValueError(f"estimator must be 'exact' or 'sampled', got {estimator!r}.")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}.")
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}.")
        super().__init__(model, dataset, held_data_budget=held_data_budget)
        self.estimator = estimator
        self.num_samples = num_samples
        self.seed = seed
        self.likelihood = likelihood
        self._resolved: str | None = None if likelihood == "auto" else likelihood
        self._checked = False

    def configuration(self) -> dict[str, Any]:
        options: dict[str, Any] = {"estimator": self.estimator, "likelihood": self.likelihood}
        if self.estimator == "sampled":
            options.update(num_samples=self.num_samples, seed=self.seed)
        return {**super().configuration(), **options}

    def _batch_sum(self, batch: Any, vectors: tf.Tensor, first_index: int) -> tf.Tensor:
        if not self._checked:  # eagerly, once: the likelihood and the negative-log-likelihood check
            self._check_likelihood(batch)
        return super()._batch_sum(batch, vectors, first_index)

    def _prepare_held(self, held: HeldBatches) -> None:
        if not self._checked:  # on the first held batch, as the streamed path checks the dataset's first batch
            self._check_likelihood(tf.nest.map_structure(lambda tensor: tensor[0], held[:3]))

    def _check_likelihood(self, batch: Any) -> None:
        inputs, targets, weights = _batch_parts(self.model, batch)
        outputs = self.model.batch_outputs((inputs, targets, weights))
        if self._resolved is None:
            self._resolved = "categorical" if _looks_like_class_labels(outputs, targets) else "gaussian"
        if self._resolved == "categorical":
            _, log_probabilities = _class_scores(self.model, outputs, targets)
            totals = tf.reduce_sum(tf.exp(log_probabilities), axis=0).numpy()
            worst = float(np.max(np.abs(totals - 1.0)))
            if not worst <= _PROBABILITY_TOLERANCE:
                raise ValueError(
                    "The true Fisher reads the model's class probabilities off the loss as exp(-loss(class)), but "
                    f"these sum to {totals[np.argmax(np.abs(totals - 1.0))]:.4f} over the classes instead of 1: "
                    "the loss is not a negative log-likelihood over the outputs' classes (check from_logits, or "
                    "a weighted/smoothed loss). Use curvature='ggn' or 'empirical_fisher', or "
                    "likelihood='gaussian' for a regression loss."
                )
        self._checked = True

    def _trace_key(self) -> tuple[Any, ...]:
        return (self._resolved, self.estimator, self.num_samples)

    def _seed_tensor(self) -> tf.Tensor:
        return tf.constant(self.seed, tf.int64)

    def _output_product(self, batch: OutputBatch, tangents: tf.Tensor) -> tf.Tensor:
        outputs, targets, weights, indices, seed = batch
        if self._resolved == "gaussian":
            if self.estimator == "exact":  # the Fisher of a Gaussian likelihood is the GGN
                return autodiff_output_hessian(self.model, outputs, targets, weights, tangents)
            scores, coefficients = self._gaussian_samples(outputs, targets, weights, indices, seed)
            flat = tf.reshape(tangents, tf.concat([tf.shape(tangents)[:2], [-1]], axis=0))
            return tf.reshape(_outer_product_sum(scores, coefficients, flat), tf.shape(tangents))
        scores, log_probabilities = _class_scores(self.model, outputs, targets)
        if self.estimator == "exact":
            coefficients = tf.exp(log_probabilities) * weights[None]
        else:
            classes = _sample_classes(log_probabilities, indices, self.num_samples, seed)  # [K, B]
            scores = tf.gather(tf.transpose(scores, [1, 0, 2]), tf.transpose(classes), batch_dims=1)
            scores = tf.transpose(scores, [1, 0, 2])  # [K, B, O]
            coefficients = tf.tile(weights[None], [self.num_samples, 1]) / float(self.num_samples)
        return _outer_product_sum(scores, coefficients, tangents)

    def _gaussian_samples(
        self, outputs: tf.Tensor, targets: Any, weights: tf.Tensor, indices: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """``s = L ε`` with ``L Lᵀ = H_out``: the output-space gradient at a label drawn from ``N(o, H_out⁻¹)``."""
        flat = tf.reshape(outputs, [tf.shape(outputs)[0], -1])
        with tf.GradientTape() as outer:
            outer.watch(flat)
            with tf.GradientTape() as inner:
                inner.watch(flat)
                loss = tf.reduce_sum(self.model.loss_from_outputs(tf.reshape(flat, tf.shape(outputs)), targets))
            gradients = inner.gradient(loss, flat)
        hessians = outer.batch_jacobian(gradients, flat)  # [B, O, O]: the loss is a sum of per-example terms
        values, vectors = tf.linalg.eigh((hessians + tf.linalg.matrix_transpose(hessians)) / 2.0)
        roots = vectors * tf.sqrt(tf.maximum(values, 0.0))[:, None, :]  # [B, O, O], roots rootsᵀ = H_out
        size = tf.shape(flat)[1]
        noise = _per_example_normal(indices, tf.stack([self.num_samples, size]), seed, self.dtype)  # [B, K, O]
        scores = tf.transpose(tf.linalg.matmul(noise, roots, transpose_b=True), [1, 0, 2])  # [K, B, O]
        coefficients = tf.tile(weights[None], [self.num_samples, 1]) / float(self.num_samples)
        return scores, coefficients


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher ``F_emp = (1/N) Σ_i w_i ∇ℓ(y_i) ∇ℓ(y_i)ᵀ + ∇²Ω`` from per-sample gradients.

    Each product computes the batch's per-sample gradients ``G [B, P]`` (chunked, as
    :meth:`InfluenceModel.batch_jacobian_tensor`, honouring ``gradient_dtype``) and applies ``Gᵀ diag(1/w) G``.

    Example:
        >>> ihvp = get_ihvp("exact", im, train_ds, curvature="empirical_fisher", damping=1e-3)
    """

    curvature = "empirical_fisher"
    _blocked = False  # the per-sample gradients of a held batch are computed once for all the vectors

    def _batch_sum(self, batch: Any, vectors: tf.Tensor, first_index: int) -> tf.Tensor:
        _, _, weights = _batch_parts(self.model, batch)
        gradients = self.model.batch_jacobian_tensor(batch)  # rows w_i ∇ℓ_i
        return _gradient_outer_product(gradients, weights, vectors)

    def _held_product(self) -> tuple[tuple[Any, ...], BatchSum, tuple[tf.Tensor, ...]]:
        model = self.model

        def batch_sum(batch: tuple[Any, Any, tf.Tensor, tf.Tensor], extra: Any, vectors: tf.Tensor) -> tf.Tensor:
            inputs, targets, weights, _ = batch
            gradients = tf.cast(model._in_graph("jacobian", inputs, targets, weights), model.dtype)
            return _gradient_outer_product(gradients, weights, vectors)

        return ("EmpiricalFisherOperator", str(model.gradient_dtype)), batch_sum, ()


def _gradient_outer_product(gradients: tf.Tensor, weights: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
    """``Gᵀ diag(1/w) G vᵀ`` for per-sample gradient rows ``G = [w_i ∇ℓ_i]`` ``[B, P]`` and vectors ``[n, P]``."""
    projections = tf.math.divide_no_nan(tf.matmul(gradients, vectors, transpose_b=True), weights[:, None])
    return tf.matmul(projections, gradients, transpose_a=True)


# ---------------------------------------------------------------------- registry


def _hessian(model: InfluenceModel, dataset: tf.data.Dataset, **options: Any) -> HessianOperator:
    if options:
        raise ValueError(f"The Hessian takes no curvature options, got {sorted(options)}.")
    return HessianOperator(model, dataset)


CURVATURE_REGISTRY.register("hessian", _hessian)
CURVATURE_REGISTRY.register("ggn", GaussNewtonOperator)
CURVATURE_REGISTRY.register("fisher", FisherOperator)
CURVATURE_REGISTRY.register("empirical_fisher", EmpiricalFisherOperator)

CURVATURES = CURVATURE_REGISTRY.names()
"""The built-in curvature names (accepted by :func:`curvature_operator` and by the solvers' and calculators'
``curvature=`` keyword); ``CURVATURE_REGISTRY.names()`` also lists curvatures registered later."""
