"""InfluenceModel: per-sample losses, per-sample gradients and Hessian-vector products of a Keras model.

The public class of :mod:`influenciae.model` (imported from there): construction, flat parameter vectors and the
batch methods. Their graph-side implementations (vectorized maps, padding to static shapes, oneDNN fallbacks) are in
``_autodiff.py``, the checks of a batch in ``_validation.py``, the loss in ``losses.py`` and the choice of the
watched weights in ``selection.py``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from influenciae.model._autodiff import _Autodiff, _concat_batches, _pad_examples, _pad_zeros, _slice, _swap_first
from influenciae.model._backend import tf, variable_name, variable_tensor
from influenciae.model._validation import _Validation
from influenciae.model.losses import LossFunction, loss_family_of, needs_target_alignment, resolve_loss, single_output
from influenciae.model.migration import Removed, warn_default_watch_once, warn_start_layer_only
from influenciae.model.selection import check_model, resolve_gradient_dtype, resolve_weights

__all__ = ["InfluenceModel"]

_DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk of per-sample gradients


class InfluenceModel(_Autodiff, _Validation):
    """A Keras model seen as a function of its watched weights.

    Args:
        model: A built Keras 3 model (Sequential, Functional or subclassed) or a legacy ``tf_keras`` model.
        start_layer: Index or name of the first layer whose trainable weights are watched.
        last_layer: Index or name of the last layer (inclusive) whose trainable weights are watched.
        loss_function: Per-example loss ``(y_true, y_pred) -> [batch]``: a Keras loss object with
            ``reduction="none"`` or a function such as ``keras.losses.sparse_categorical_crossentropy``.
            ``None`` uses the compiled model's loss, turned into reduction none.
        weights_to_watch: Explicit list of the model's weights to watch (exclusive with the layer range).
        max_chunk_size: Largest number of examples whose per-sample gradients are computed at once. ``None``
            derives it from ``memory_budget``.
        memory_budget: Bytes allowed for one chunk of per-sample gradients (``chunk × nb_params`` values).
        hvp_chunk_size: Number of vectors pushed through one vectorized Hessian-vector product (and output JVP/VJP).
            ``None`` (default) derives it from ``memory_budget``: ``memory_budget / (16 · nb_params · itemsize)``
            clipped to ``[16, 256]``, i.e. 256 on small models (a CG solve of 1,000 right-hand sides on a P = 610
            MLP ran 3.7× faster than with 16, same results) and 16 from about 1M parameters on.
        hvp_mode: ``"back_over_back"`` (reverse-mode twice, the outer pass vectorized over vectors with pfor) or
            ``"forward_over_backward"`` (a ``ForwardAccumulator`` around a ``GradientTape``, vectorized with
            ``tf.vectorized_map``). Both are exact; ``docs/benchmarks.md`` measures them and back-over-back was
            as fast or faster on every model measured, so it is the default.
        gradient_dtype: ``"bfloat16"`` or ``"float16"`` to produce per-sample gradients in low precision: each
            example's gradient is rounded to this dtype where it is computed, inside the vectorized map, and
            :meth:`batch_jacobian_tensor` hands the block back in the model's dtype so that every consumer
            (kernels, Hessians, factors, matmuls) accumulates in float32/float64. ``None`` (default) keeps the
            model's dtype. For low-precision arithmetic in the forward and backward passes too, build the model
            under a Keras mixed-precision policy (``"mixed_bfloat16"``); ``docs/theory.md`` (Mixed precision)
            measures the fidelity of both against float32.
        per_example_gradients: How :meth:`batch_jacobian_tensor` forms per-sample gradients. ``"layers"``: from
            the layer structure (:class:`~influenciae.model.capture.LayerCapture`: one batched forward and
            backward pass records each layer's inputs ``a`` and output gradients ``g``, and each example's
            gradient is ``Σ_t a_t ⊗ g_t``); every watched weight must belong to a Dense, EinsumDense or Conv1D/2D
            layer (a ``ValueError`` names those that do not). ``"vectorized"``: one ``GradientTape`` per example
            in ``tf.vectorized_map``. ``"auto"`` (default): the layers for a model with a convolution whose
            watched weights are all covered (pfor loops over the examples for a convolution's filter gradient),
            the vectorized map otherwise (faster on Dense layers). Both agree up to rounding.

    Example:
        >>> im = InfluenceModel(model, loss_function=keras.losses.SparseCategoricalCrossentropy(
        ...     from_logits=True, reduction="none"))
        >>> grads = im.batch_jacobian_tensor((x, y))  # [batch, im.nb_params]
    """

    def __init__(
        self,
        model: Any,
        start_layer: int | str | None = None,
        last_layer: int | str | None = None,
        loss_function: LossFunction | str | None = None,
        weights_to_watch: Sequence[Any] | None = None,
        *,
        max_chunk_size: int | None = None,
        memory_budget: int = _DEFAULT_MEMORY_BUDGET,
        hvp_chunk_size: int | None = None,
        hvp_mode: str = "back_over_back",
        gradient_dtype: str | tf.DType | None = None,
        per_example_gradients: str = "auto",
    ) -> None:
        check_model(model)
        self.model = model
        self.weights = resolve_weights(model, start_layer, last_layer, weights_to_watch)
        if start_layer is not None and last_layer is None and weights_to_watch is None:
            warn_start_layer_only(model, start_layer, self.weights)
        elif start_layer is None and last_layer is None and weights_to_watch is None:
            warn_default_watch_once(model, self.weights)
        self._watched = [variable_tensor(weight) for weight in self.weights]
        self.dtype = tf.as_dtype(self._watched[0].dtype)
        self.weight_shapes = [tuple(int(d) for d in weight.shape) for weight in self._watched]
        self._sizes = [int(np.prod(shape)) for shape in self.weight_shapes]
        self.nb_params = int(sum(self._sizes))
        self.loss_function = resolve_loss(model, loss_function, self.dtype)
        self._align_targets = needs_target_alignment(self.loss_function)
        if max_chunk_size is not None and (not isinstance(max_chunk_size, int) or max_chunk_size <= 0):
            raise ValueError(f"max_chunk_size must be a positive integer or None, got {max_chunk_size!r}.")
        if hvp_mode not in ("back_over_back", "forward_over_backward"):
            raise ValueError(f"hvp_mode must be 'back_over_back' or 'forward_over_backward', got {hvp_mode!r}.")
        self.hvp_mode = hvp_mode
        if hvp_chunk_size is None:
            hvp_chunk_size = int(min(256, max(16, memory_budget // (16 * self.nb_params * self.dtype.size))))
        if not isinstance(hvp_chunk_size, int) or hvp_chunk_size <= 0:
            raise ValueError(f"hvp_chunk_size must be a positive integer or None, got {hvp_chunk_size!r}.")
        budget_rows = max(1, memory_budget // (self.nb_params * self.dtype.size))
        self.chunk_size = max_chunk_size or budget_rows
        self.hvp_chunk_size = hvp_chunk_size
        self.gradient_dtype = resolve_gradient_dtype(gradient_dtype, self.dtype)
        self._checked_signatures: set[str] = set()
        self._shared_functions: dict[Any, Callable[..., Any]] = {}
        self._shared_data: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()
        self._build_functions()
        self._layer_capture = self._per_example_capture(per_example_gradients)

    @property
    def weight_names(self) -> list[str]:
        """Names of the watched weights, in the order they are flattened."""
        return [variable_name(weight) for weight in self.weights]

    def get_weights_vector(self) -> tf.Tensor:
        """The current watched weights as one flat vector θ ``[nb_params]``."""
        return self.flatten(self._watched)

    @property
    def watched(self) -> list[tf.Variable]:
        """The ``tf.Variable`` behind each watched weight: what a ``GradientTape`` or ``ForwardAccumulator`` watches."""
        return list(self._watched)

    def flatten(self, tensors: Sequence[Any]) -> tf.Tensor:
        """Concatenate one tensor per watched weight into a flat vector ``[nb_params]``."""
        return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors], axis=0)

    def unflatten(self, vector: tf.Tensor) -> list[tf.Tensor]:
        """Split a flat vector ``[nb_params]`` into one tensor per watched weight."""
        parts = tf.split(vector, self._sizes, axis=-1)
        return [tf.reshape(part, shape) for part, shape in zip(parts, self.weight_shapes, strict=True)]

    def validate_batch(self, batch: Any) -> None:
        """Check a batch against the model and loss once, with errors that name the fix.

        Calculators call this eagerly on the first batch of every dataset before streaming it, so a mistake
        surfaces as a ``ValueError``/``TypeError`` here rather than deep inside a ``tf.data`` pipeline.
        """
        self._prepare(batch)

    def batch_parts(self, batch: Any) -> tuple[Any, Any, tf.Tensor]:
        """``(inputs, targets, sample weights [B])`` of a batch as tensors, validated like :meth:`validate_batch`.

        The weights are ones when the batch has none, in the model's dtype.
        """
        return self._prepare(batch)

    def with_loss(self, loss_function: Any) -> InfluenceModel:
        """An InfluenceModel of the same Keras model, watched weights and settings, with another loss.

        It shares the Keras model and the watched variables (weights swapped into them apply to both), so its
        per-sample gradients are in the same parameter order, e.g. the gradients of a query measurement.
        """
        return InfluenceModel(
            self.model,
            weights_to_watch=self.weights,
            loss_function=loss_function,
            max_chunk_size=self.chunk_size,
            hvp_chunk_size=self.hvp_chunk_size,
            hvp_mode=self.hvp_mode,
            gradient_dtype=self.gradient_dtype,
        )

    @property
    def layers(self) -> list[Any]:
        """The wrapped Keras model's layers (``model.layers``), as in the original Influenciae."""
        return list(self.model.layers)

    # attributes of the original Influenciae's InfluenceModel that have no counterpart: say what replaced them
    process_batch_for_loss_fn = Removed(
        "dataset elements are (inputs, targets) or (inputs, targets, sample_weight); map your dataset into that "
        "layout instead."
    )

    weights_processed = Removed("weights_to_watch is always a flat list of the model's variables (see .weights).")

    start_layer = Removed(
        "the watched weights are InfluenceModel.weights (their names in .weight_names), chosen at construction."
    )

    def batch_loss(self, batch: Any) -> tf.Tensor:
        """Per-example losses ``w_i ℓ(z_i)`` of a batch.

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)`` with ``batch`` examples, or a
                batched ``tf.data.Dataset`` of such elements (the original Influenciae's argument): the losses of
                all its examples, in order.

        Returns:
            Tensor ``[batch]`` (``[N]`` for a dataset).
        """
        if isinstance(batch, tf.data.Dataset):
            return _concat_batches([self.batch_loss(element) for element in batch])
        parts = self._prepare(batch)
        return self._loss_fn(*parts)

    def batch_jacobian(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Per-sample gradients of every example of a batched dataset (the original Influenciae's method).

        Args:
            dataset: A batched ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])`` with ``N`` examples.

        Returns:
            Tensor ``[N, nb_params]``, rows in dataset order.
        """
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(
                f"batch_jacobian takes a batched tf.data.Dataset, got {type(dataset).__name__}; for one batch "
                "use batch_jacobian_tensor(batch)."
            )
        blocks = [self.batch_jacobian_tensor(element) for element in dataset]
        return _concat_batches(blocks)

    def batch_jacobian_tensor(self, batch: Any) -> tf.Tensor:
        """Per-sample gradients ``∇_θ w_i ℓ(z_i; θ)`` of a batch, vectorized and chunked.

        Computed from the layer structure (``Σ_t a_t ⊗ g_t`` per layer, see ``per_example_gradients``) or with one
        ``GradientTape`` per example inside ``tf.vectorized_map``, ``chunk_size`` examples at a time so memory stays
        ``O(chunk_size × nb_params)``. With ``gradient_dtype`` set, each gradient is rounded
        to that dtype as it is produced and the result is returned in the model's dtype.

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)`` with ``batch`` examples.

        Returns:
            Tensor ``[batch, nb_params]``.
        """
        inputs, targets, weights = self._prepare(batch)
        if tf.inside_function():
            return tf.cast(self._in_graph("jacobian", inputs, targets, weights), self.dtype)
        size = int(tf.shape(weights)[0])
        if size == 0:
            return tf.zeros([0, self.nb_params], self.dtype)
        chunks = []
        for start in range(0, size, self.chunk_size):
            count = min(self.chunk_size, size - start)
            part = (
                (inputs, targets, weights)
                if count == size
                else _slice((inputs, targets, weights), start, start + count)
            )
            length = self._static_length("examples", count, self.chunk_size)
            if length == count:  # no eager slicing or padding ops for a block that is already static
                chunks.append(self._call_vectorized("jacobian", *part))
                continue
            padded = (*_pad_examples(part[:2], length), _pad_zeros(part[2], length))
            chunks.append(self._call_vectorized("jacobian", *padded)[:count])
        # chunks stay in gradient_dtype until here: the accumulation dtype is the model's
        return tf.cast(chunks[0] if len(chunks) == 1 else tf.concat(chunks, axis=0), self.dtype)

    def batch_gradient(self, batch: Any) -> tf.Tensor:
        """Gradient of the batch's mean loss ``(1/B) Σ_i ∇_θ w_i ℓ(z_i; θ)`` (no regularization term).

        The original Influenciae's ``batch_gradient(dataset)`` returned the **sum** over each batch of a dataset,
        ``[n_batches, nb_params]``; its per-batch sum is :meth:`batch_gradient_tensor` here (``B`` times this).

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``.

        Returns:
            Tensor ``[nb_params]``.
        """
        if isinstance(batch, tf.data.Dataset):
            raise TypeError(
                "batch_gradient takes one batch and returns the gradient of its mean loss [nb_params]. The original "
                "Influenciae's batch_gradient(dataset) returned per-batch sums [n_batches, nb_params]: use "
                "tf.stack([im.batch_gradient_tensor(batch) for batch in dataset])."
            )
        inputs, targets, weights = self._prepare(batch)
        total = self._gradient_fn(inputs, targets, weights)
        return total / tf.cast(tf.shape(weights)[0], self.dtype)

    def batch_gradient_tensor(self, batch: Any) -> tf.Tensor:
        """Gradient of the batch's summed loss ``Σ_i ∇_θ w_i ℓ(z_i; θ)``, the original Influenciae's method.

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``.

        Returns:
            Tensor ``[nb_params]``; :meth:`batch_gradient` is this divided by the batch size.
        """
        inputs, targets, weights = self._prepare(batch)
        return self._gradient_fn(inputs, targets, weights)

    def batch_hvp_sum(self, batch: Any, vectors: tf.Tensor) -> tf.Tensor:
        """Sum over a batch of per-example Hessian-vector products ``Σ_i ∇²_θ (w_i ℓ(z_i)) v`` for each row ``v``.

        Computed as chosen by ``hvp_mode`` (back-over-back by default), vectorized over the rows of ``vectors``
        in chunks of ``hvp_chunk_size``.

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``.
            vectors: Tensor ``[n, nb_params]``.

        Returns:
            Tensor ``[n, nb_params]``.
        """
        inputs, targets, weights = self._prepare(batch)
        vectors = self._check_vectors(vectors)
        if tf.inside_function():
            return self._in_graph("hvp", inputs, targets, weights, vectors)
        inputs, targets, weights = self._pad_batch(inputs, targets, weights)
        return self._map_vector_chunks(
            lambda block: self._call_vectorized("hvp", inputs, targets, weights, block), vectors
        )

    def batch_perturbation(self, batch: Any, vectors: tf.Tensor) -> tf.Tensor:
        """Input gradients of the projections ``v · ∇_θ (w_i ℓ(z_i))`` for each vector ``v`` and example ``i``.

        With ``v = H⁻¹∇ℓ(x)`` this is the perturbation influence of each input feature of each training example.

        Args:
            batch: ``(inputs, targets[, sample_weight])`` with a single floating-point input tensor ``[B, ...]``.
            vectors: Tensor ``[m, nb_params]``.

        Returns:
            Tensor ``[m, B, *input_shape]``.
        """
        inputs, targets, weights = self._prepare(batch)
        vectors = self._check_vectors(vectors)
        if not isinstance(inputs, tf.Tensor) or not inputs.dtype.is_floating:
            raise ValueError(
                "Perturbation influence differentiates with respect to the inputs, so it needs one floating-point "
                "input tensor (not integer tokens or several inputs)."
            )
        if tf.inside_function():
            return self._in_graph("perturbation", inputs, targets, weights, vectors)
        size = int(tf.shape(weights)[0])
        inputs, targets, weights = self._pad_batch(inputs, targets, weights)
        return self._map_vector_chunks(
            lambda block: self._call_vectorized("perturbation", inputs, targets, weights, block)[:, :size], vectors
        )

    def regularization_loss(self) -> tf.Tensor:
        """The regularization term Ω(θ): the sum of the model's weight regularization losses (0 if none)."""
        return self._regularization_loss()

    def regularization_gradient(self) -> tf.Tensor:
        """``∇_θ Ω(θ)`` as a flat vector ``[nb_params]``."""
        return self._regularization_gradient_fn()

    def regularization_hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        """``∇²_θ Ω(θ) v`` for each row of ``vectors`` ``[n, nb_params]``; returns ``[n, nb_params]``."""
        vectors = self._check_vectors(vectors)
        if not self._has_regularization():
            return tf.zeros_like(vectors)
        if tf.inside_function():
            return self._in_graph("regularization_hvp", vectors)
        return self._map_vector_chunks(lambda block: self._call_vectorized("regularization_hvp", block), vectors)

    def shared_function(self, key: Any, build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        """A function built once per ``key`` for this model and reused, e.g. a ``tf.function`` of a curvature product.

        Tracing dominates the first product of a new ``tf.function``; operators of the same model and settings
        (one per solver, calculator or test) share one traced function through this.

        Args:
            key: A hashable description of everything the function depends on besides its tensor arguments.
            build: Creates the function the first time ``key`` is seen.
        """
        if key not in self._shared_functions:
            self._shared_functions[key] = build()
        return self._shared_functions[key]

    def shared_data(self, dataset: Any, key: Any, build: Callable[[], Any]) -> Any:
        """A value computed once from ``dataset`` for this model and reused while the dataset object lives.

        For what only the dataset's content and the model's input preparation determine, e.g. a curvature
        dataset held as tensors: a new operator (one per solver and calculator) on the same dataset object takes it
        instead of reading the data again. Keyed weakly by the dataset object (it is not kept alive), so a new
        dataset, even with the same content, is read again; a pipeline that changes on every pass (random
        augmentation) is read once per model. An object that cannot be weakly referenced is not shared.

        Args:
            dataset: The dataset the value derives from.
            key: A hashable description of everything else the value depends on.
            build: Computes the value the first time (an exception propagates and nothing is kept).
        """
        try:
            values = self._shared_data.setdefault(dataset, {})
        except TypeError:  # not weakly referenceable or not hashable
            return build()
        if key not in values:
            values[key] = build()
        return values[key]

    @property
    def loss_family(self) -> str | None:
        """The loss when it is one whose output-space Hessian has a closed form, else ``None``.

        ``"softmax_cross_entropy"`` (Keras (sparse) categorical cross-entropy with ``from_logits=True``),
        ``"sigmoid_cross_entropy"`` (binary cross-entropy with ``from_logits=True``) or ``"squared_error"``
        (mean squared error). Curvature operators use it to skip differentiating the loss twice.
        """
        return loss_family_of(self.loss_function)

    def batch_outputs(self, batch: Any) -> tf.Tensor:
        """The model's outputs ``o_i = f(x_i; θ)`` on a batch (what the loss receives as ``y_pred``).

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)`` with ``batch`` examples.

        Returns:
            Tensor ``[batch, *output_shape]`` in the model's dtype.
        """
        inputs, _, _ = self._prepare(batch)
        return self._outputs(inputs) if tf.inside_function() else self._outputs_fn(inputs)

    def outputs(self, inputs: Any) -> tf.Tensor:
        """The model's outputs on inputs alone (no targets needed): ``[batch, *output_shape]`` in the model's dtype."""
        inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        return self._outputs(inputs) if tf.inside_function() else self._outputs_fn(inputs)

    def loss_from_outputs(self, outputs: Any, targets: Any, weights: Any | None = None) -> tf.Tensor:
        """Per-example losses ``w_i ℓ(y_i, o_i)`` as a differentiable function of the outputs ``o``.

        Args:
            outputs: ``[batch, *output_shape]``, e.g. from :meth:`batch_outputs`.
            targets: The batch's targets ``[batch, ...]``.
            weights: Sample weights ``[batch]`` (``None`` for ones).

        Returns:
            Tensor ``[batch]`` in the model's dtype; ``batch_loss(batch) == loss_from_outputs(batch_outputs(batch),
            targets, weights)``.
        """
        outputs = tf.cast(single_output(outputs), self.dtype)
        if weights is None:
            weights = tf.ones(tf.shape(outputs)[:1], self.dtype)
        return self._loss_from_outputs(outputs, targets, tf.cast(tf.reshape(weights, [-1]), self.dtype))

    def batch_output_jvp(self, batch: Any, vectors: tf.Tensor) -> tf.Tensor:
        """Directional derivatives of the outputs along each parameter vector, ``J_i v`` for every example ``i``.

        Forward-mode (a ``ForwardAccumulator``), vectorized over the rows of ``vectors`` in chunks of
        ``hvp_chunk_size``.

        Args:
            batch: ``(inputs, targets[, sample_weight])`` with ``batch`` examples.
            vectors: Tensor ``[n, nb_params]``.

        Returns:
            Tensor ``[n, batch, *output_shape]`` in the model's dtype.
        """
        inputs, _, weights = self._prepare(batch)
        vectors = self._check_vectors(vectors)
        if tf.inside_function():
            return self._in_graph("output_jvp", inputs, vectors)
        size = int(tf.shape(weights)[0])
        inputs = _pad_examples(inputs, self._static_length("examples", size, max(size, self.chunk_size)))
        return self._map_vector_chunks(
            lambda block: self._call_vectorized("output_jvp", inputs, block)[:, :size], vectors
        )

    def batch_output_vjp(self, batch: Any, cotangents: tf.Tensor) -> tf.Tensor:
        """Pull output-space vectors back to the parameters, summed over the batch: ``Σ_i J_iᵀ u_i``.

        Reverse-mode, vectorized over the leading axis of ``cotangents`` in chunks of ``hvp_chunk_size``.

        Args:
            batch: ``(inputs, targets[, sample_weight])`` with ``batch`` examples.
            cotangents: Tensor ``[n, batch, *output_shape]``: ``n`` output-space vectors per example.

        Returns:
            Tensor ``[n, nb_params]``.
        """
        inputs, _, _ = self._prepare(batch)
        cotangents = tf.convert_to_tensor(cotangents)
        if cotangents.shape.rank is None or cotangents.shape.rank < 2:
            raise ValueError(f"cotangents must have shape [n, batch, *output_shape], got {cotangents.shape}.")
        cotangents = tf.cast(cotangents, self.dtype)
        if tf.inside_function():
            return self._in_graph("output_vjp", inputs, cotangents)
        size = int(tf.shape(tf.nest.flatten(inputs)[0])[0])
        length = self._static_length("examples", size, max(size, self.chunk_size))
        inputs = _pad_examples(inputs, length)
        # zero cotangents for the padded examples: they add nothing to the sum
        cotangents = tf.transpose(
            _pad_zeros(tf.transpose(cotangents, _swap_first(cotangents)), length), _swap_first(cotangents)
        )
        return self._map_vector_chunks(lambda block: self._call_vectorized("output_vjp", inputs, block), cotangents)

    def batch_output_jacobian(self, inputs: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """The outputs of a batch of inputs and their full Jacobians with respect to the watched weights.

        One reverse pass per output value (``tape.jacobian``): meant for small models and exact references, e.g.
        a dense Gauss-Newton matrix ``Σ_i J_iᵀ H_i J_i``.

        Args:
            inputs: The model's inputs for ``batch`` examples (each example's outputs depend on it alone).

        Returns:
            ``(outputs [batch, *output_shape], jacobians [batch, *output_shape, nb_params])``, in the dtype the
            model computes in.
        """
        inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        with tf.GradientTape() as tape:
            tape.watch(self._watched)
            outputs = single_output(self.model(inputs, training=False))
        jacobians = tape.jacobian(outputs, self._watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        shape = tf.concat([tf.shape(outputs), [-1]], axis=0)
        return outputs, tf.concat([tf.reshape(jacobian, shape) for jacobian in jacobians], axis=-1)


InfluenceModel.__module__ = "influenciae.model"  # its documented, pickled and canonical path
