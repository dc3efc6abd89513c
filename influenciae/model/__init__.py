"""InfluenceModel: per-sample losses, per-sample gradients and Hessian-vector products of a Keras model.

This is the only module that touches Keras objects. Everything downstream (solvers, calculators) sees flat parameter
vectors θ of length ``nb_params``, in the fixed order of the watched weights.

Conventions (``docs/theory.md``): the training objective is ``R(θ) = mean_i w_i ℓ(z_i; θ) + Ω(θ)`` where ``w_i`` is
the sample weight (1 when absent) and ``Ω`` the sum of the weight regularization losses of the model. Per-sample
gradients are gradients of ``w_i ℓ(z_i; θ)`` alone; the regularizer enters the Hessian once, through
:meth:`InfluenceModel.regularization_hvp`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from influenciae.data import Batch, unpack_batch
from influenciae.model._backend import (
    is_keras3_object,
    is_legacy_keras_object,
    keras,
    keras_module_of,
    tf,
    variable_name,
    variable_tensor,
)
from influenciae.model.selection import layer_index as _layer_index
from influenciae.model.selection import original_default_layer

__all__ = ["InfluenceModel", "MigrationWarning"]

LossFunction = Callable[[Any, Any], Any]

_DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk of per-sample gradients
_MAX_EXACT_LENGTHS = 6  # distinct padded lengths traced exactly per axis before falling back to powers of two


class _Removed:
    """A class attribute the original Influenciae had: reading it raises ``AttributeError`` naming its replacement."""

    def __init__(self, replacement: str) -> None:
        self.replacement = replacement

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = f"{owner.__name__}.{name}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        raise AttributeError(f"{self.name} (original Influenciae) is gone: {self.replacement}")


class InfluenceModel:
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
    ) -> None:
        _check_model(model)
        self.model = model
        self.weights = _resolve_weights(model, start_layer, last_layer, weights_to_watch)
        if start_layer is not None and last_layer is None and weights_to_watch is None:
            _warn_start_layer_only(model, start_layer, self.weights)
        elif start_layer is None and last_layer is None and weights_to_watch is None:
            _warn_default_watch_once(model, self.weights)
        self._watched = [variable_tensor(weight) for weight in self.weights]
        self.dtype = tf.as_dtype(self._watched[0].dtype)
        self.weight_shapes = [tuple(int(d) for d in weight.shape) for weight in self._watched]
        self._sizes = [int(np.prod(shape)) for shape in self.weight_shapes]
        self.nb_params = int(sum(self._sizes))
        self.loss_function = _resolve_loss(model, loss_function, self.dtype)
        self._align_targets = _needs_target_alignment(self.loss_function)
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
        self.gradient_dtype = _resolve_gradient_dtype(gradient_dtype, self.dtype)
        self._checked_signatures: set[str] = set()
        self._shared_functions: dict[Any, Callable[..., Any]] = {}
        # Functions without a vectorized map may relax their shapes (fewer traces, nothing to break).
        self._loss_fn = tf.function(self._per_example_loss, reduce_retracing=True)
        self._gradient_fn = tf.function(self._gradient_sum, reduce_retracing=True)
        self._regularization_gradient_fn = tf.function(self._regularization_gradient, reduce_retracing=True)
        self._outputs_fn = tf.function(self._outputs, reduce_retracing=True)
        # Vectorized functions (tf.vectorized_map / pfor jacobians) are traced on fully static shapes only: pfor on
        # unknown dimensions (a relaxed batch axis) has aborted the interpreter on attention models (docs/
        # transformers.md). Their callers pad every block to a length from _static_length and slice the results.
        # Each has a looped twin (tf.map_fn / while-loop jacobians), used when pfor cannot convert an op.
        self._graphs: dict[str, Callable[..., Any]] = {
            "jacobian": self._jacobian,
            "hvp": self._hvp_sum,
            "perturbation": self._perturbation,
            "regularization_hvp": self._regularization_hvp,
            "output_jvp": self._output_jvp,
            "output_vjp": self._output_vjp,
        }
        self._vectorized = {
            name: (
                tf.function(functools.partial(graph, vectorize=True)),
                tf.function(functools.partial(graph, vectorize=False)),
            )
            for name, graph in self._graphs.items()
        }
        self._static_lengths: dict[str, list[int]] = {}
        self._looped: set[str] = set()
        self._unsafe_ops: dict[str, list[str]] = {}  # per vectorized function, once checked (see below)

    # ------------------------------------------------------------------ flat parameter vectors

    @property
    def weight_names(self) -> list[str]:
        """Names of the watched weights, in the order they are flattened."""
        return [variable_name(weight) for weight in self.weights]

    def get_weights_vector(self) -> tf.Tensor:
        """The current watched weights as one flat vector θ ``[nb_params]``."""
        return self.flatten(self._watched)

    def flatten(self, tensors: Sequence[Any]) -> tf.Tensor:
        """Concatenate one tensor per watched weight into a flat vector ``[nb_params]``."""
        return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors], axis=0)

    def unflatten(self, vector: tf.Tensor) -> list[tf.Tensor]:
        """Split a flat vector ``[nb_params]`` into one tensor per watched weight."""
        parts = tf.split(vector, self._sizes, axis=-1)
        return [tf.reshape(part, shape) for part, shape in zip(parts, self.weight_shapes, strict=True)]

    # ------------------------------------------------------------------ public batch methods

    def validate_batch(self, batch: Any) -> None:
        """Check a batch against the model and loss once, with errors that name the fix.

        Calculators call this eagerly on the first batch of every dataset before streaming it, so a mistake
        surfaces as a ``ValueError``/``TypeError`` here rather than deep inside a ``tf.data`` pipeline.
        """
        self._prepare(batch)

    @property
    def layers(self) -> list[Any]:
        """The wrapped Keras model's layers (``model.layers``), as in the original Influenciae."""
        return list(self.model.layers)

    # attributes of the original Influenciae's InfluenceModel that have no counterpart: say what replaced them
    process_batch_for_loss_fn = _Removed(
        "dataset elements are (inputs, targets) or (inputs, targets, sample_weight); map your dataset into that "
        "layout instead."
    )
    weights_processed = _Removed("weights_to_watch is always a flat list of the model's variables (see .weights).")
    start_layer = _Removed(
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

        Computed with one ``GradientTape`` per example inside ``tf.vectorized_map``, ``chunk_size`` examples at a
        time so memory stays ``O(chunk_size × nb_params)``. With ``gradient_dtype`` set, each gradient is rounded
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
            part = _slice((inputs, targets, weights), start, start + self.chunk_size)
            count = min(self.chunk_size, size - start)
            length = self._static_length("examples", count, self.chunk_size)
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

    # ------------------------------------------------------------------ outputs (Gauss-Newton and Fisher curvatures)

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

    @property
    def loss_family(self) -> str | None:
        """The loss when it is one whose output-space Hessian has a closed form, else ``None``.

        ``"softmax_cross_entropy"`` (Keras (sparse) categorical cross-entropy with ``from_logits=True``),
        ``"sigmoid_cross_entropy"`` (binary cross-entropy with ``from_logits=True``) or ``"squared_error"``
        (mean squared error). Curvature operators use it to skip differentiating the loss twice.
        """
        return _loss_family(self.loss_function)

    def batch_outputs(self, batch: Any) -> tf.Tensor:
        """The model's outputs ``o_i = f(x_i; θ)`` on a batch (what the loss receives as ``y_pred``).

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)`` with ``batch`` examples.

        Returns:
            Tensor ``[batch, *output_shape]`` in the model's dtype.
        """
        inputs, _, _ = self._prepare(batch)
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
        outputs = tf.cast(_single_output(outputs), self.dtype)
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

    # ------------------------------------------------------------------ graph-side implementations

    def _outputs(self, inputs: Any) -> tf.Tensor:
        return tf.cast(_single_output(self.model(inputs, training=False)), self.dtype)

    def _output_jvp(self, inputs: Any, vectors: tf.Tensor, vectorize: bool = True) -> tf.Tensor:
        def one_vector(vector: tf.Tensor) -> tf.Tensor:
            with tf.autodiff.ForwardAccumulator(self._watched, self.unflatten(vector)) as accumulator:
                outputs = _single_output(self.model(inputs, training=False))
            return tf.cast(accumulator.jvp(outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO), self.dtype)

        if vectorize:
            return tf.vectorized_map(one_vector, vectors)
        return tf.map_fn(one_vector, vectors, fn_output_signature=tf.TensorSpec(None, self.dtype))

    def _output_vjp(self, inputs: Any, cotangents: tf.Tensor, vectorize: bool = True) -> tf.Tensor:
        count = tf.shape(cotangents)[0]
        with tf.GradientTape() as tape:
            tape.watch(self._watched)
            outputs = tf.cast(_single_output(self.model(inputs, training=False)), self.dtype)
            projections = tf.reduce_sum(tf.reshape(cotangents, [count, -1]) * tf.reshape(outputs, [1, -1]), axis=1)
        rows = tape.jacobian(
            projections,
            self._watched,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
            experimental_use_pfor=vectorize,
        )
        return tf.concat([tf.reshape(row, [count, -1]) for row in rows], axis=1)

    def _call_loss(self, targets: Any, outputs: Any) -> Any:
        if self._align_targets:
            targets, outputs = _align_legacy_targets(targets, outputs)
        return self.loss_function(targets, outputs)

    def _per_example_loss(self, inputs: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        return self._loss_from_outputs(self.model(inputs, training=False), targets, weights)

    def _loss_from_outputs(self, outputs: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        losses = tf.cast(tf.convert_to_tensor(self._call_loss(targets, outputs)), self.dtype)
        rank = losses.shape.rank
        if rank is not None and rank > 1:  # e.g. per-pixel losses: mean over the non-batch axes, like Keras
            losses = tf.reduce_mean(losses, axis=list(range(1, rank)))
        return losses * weights

    def _jacobian(self, inputs: Any, targets: Any, weights: tf.Tensor, vectorize: bool = True) -> tf.Tensor:
        def one_example(example: tuple[Any, Any, tf.Tensor]) -> tf.Tensor:
            single = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), example)
            with tf.GradientTape() as tape:
                tape.watch(self._watched)
                loss = tf.reduce_sum(self._per_example_loss(*single))
            gradients = tape.gradient(loss, self._watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.cast(self.flatten(gradients), self.gradient_dtype)

        if vectorize:
            return tf.vectorized_map(one_example, (inputs, targets, weights))
        signature = tf.TensorSpec([self.nb_params], self.gradient_dtype)
        return tf.map_fn(one_example, (inputs, targets, weights), fn_output_signature=signature)

    def _gradient_sum(self, inputs: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(self._watched)
            loss = tf.reduce_sum(self._per_example_loss(inputs, targets, weights))
        gradients = tape.gradient(loss, self._watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.flatten(gradients)

    def _forward_over_backward(
        self, objective: Callable[[], tf.Tensor], vectors: tf.Tensor, vectorize: bool = True
    ) -> tf.Tensor:
        def one_vector(vector: tf.Tensor) -> tf.Tensor:
            with tf.autodiff.ForwardAccumulator(self._watched, self.unflatten(vector)) as accumulator:
                with tf.GradientTape() as tape:
                    tape.watch(self._watched)
                    value = objective()
                gradients = tape.gradient(value, self._watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            tangents = accumulator.jvp(gradients, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return self.flatten(tangents)

        if vectorize:
            return tf.vectorized_map(one_vector, vectors)
        return tf.map_fn(one_vector, vectors, fn_output_signature=tf.TensorSpec([self.nb_params], self.dtype))

    def _back_over_back(
        self, objective: Callable[[], tf.Tensor], vectors: tf.Tensor, vectorize: bool = True
    ) -> tf.Tensor:
        with tf.GradientTape() as outer:
            outer.watch(self._watched)
            with tf.GradientTape() as inner:
                inner.watch(self._watched)
                value = objective()
            gradients = inner.gradient(value, self._watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            projections = tf.linalg.matvec(vectors, self.flatten(gradients))  # [n] = V · ∇f
        rows = outer.jacobian(
            projections,
            self._watched,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
            experimental_use_pfor=vectorize,
        )
        count = tf.shape(vectors)[0]
        return tf.concat([tf.reshape(row, [count, -1]) for row in rows], axis=1)

    def _second_order(self, objective: Callable[[], tf.Tensor], vectors: tf.Tensor, vectorize: bool) -> tf.Tensor:
        if self.hvp_mode == "back_over_back":
            return self._back_over_back(objective, vectors, vectorize)
        return self._forward_over_backward(objective, vectors, vectorize)

    def _hvp_sum(
        self, inputs: Any, targets: Any, weights: tf.Tensor, vectors: tf.Tensor, vectorize: bool = True
    ) -> tf.Tensor:
        objective = lambda: tf.reduce_sum(self._per_example_loss(inputs, targets, weights))  # noqa: E731
        return self._second_order(objective, vectors, vectorize)

    def _perturbation(
        self, inputs: tf.Tensor, targets: Any, weights: tf.Tensor, vectors: tf.Tensor, vectorize: bool = True
    ) -> tf.Tensor:
        with tf.GradientTape() as outer:
            outer.watch(inputs)
            with tf.GradientTape() as inner:
                inner.watch(self._watched)
                loss = tf.reduce_sum(self._per_example_loss(inputs, targets, weights))
            gradients = inner.gradient(loss, self._watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            projections = tf.linalg.matvec(vectors, self.flatten(gradients))  # [m]
        # example i's inputs only reach its own loss, so the batch sum separates per example
        return outer.jacobian(
            projections, inputs, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=vectorize
        )

    def _regularization_loss(self) -> tf.Tensor:
        terms = [tf.cast(term, self.dtype) for term in _regularization_terms(self.model)]
        return tf.add_n(terms) if terms else tf.zeros([], self.dtype)

    def _regularization_gradient(self) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(self._watched)
            value = self._regularization_loss()
        gradients = tape.gradient(value, self._watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.flatten(gradients)

    def _regularization_hvp(self, vectors: tf.Tensor, vectorize: bool = True) -> tf.Tensor:
        return self._second_order(self._regularization_loss, vectors, vectorize)

    def _has_regularization(self) -> bool:
        return bool(_regularization_terms(self.model))

    # ------------------------------------------------------------------ validation at the boundary

    def _check_vectors(self, vectors: Any) -> tf.Tensor:
        vectors = tf.convert_to_tensor(vectors)
        if vectors.shape.rank != 2 or vectors.shape[-1] != self.nb_params:
            raise ValueError(
                f"vectors must have shape [n, nb_params] = [n, {self.nb_params}], got {vectors.shape}. "
                "Stack single vectors with tf.stack or add a leading axis with v[None]."
            )
        if not vectors.dtype.is_floating:
            raise TypeError(f"vectors must be floating point, got {vectors.dtype.name}.")
        return tf.cast(vectors, self.dtype)

    # ------------------------------------------------------------------ static shapes for vectorized functions

    def _map_vector_chunks(self, function: Callable[[tf.Tensor], tf.Tensor], vectors: tf.Tensor) -> tf.Tensor:
        """Apply ``function`` to blocks of at most ``hvp_chunk_size`` rows, each zero-padded to a static length."""
        count = int(vectors.shape[0])
        if count == 0:
            return function(vectors)
        parts = []
        for start in range(0, count, self.hvp_chunk_size):
            block = vectors[start : start + self.hvp_chunk_size]
            rows = int(block.shape[0])
            parts.append(function(_pad_zeros(block, self._static_length("vectors", rows, self.hvp_chunk_size)))[:rows])
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)

    def _static_length(self, axis: str, size: int, cap: int) -> int:
        """The static length a block of ``size`` rows is padded to (``size <= length <= cap``).

        A length already traced is reused when it wastes at most half of the block (a partial last batch pads to
        the full batch); otherwise the block is traced at its own size, and past ``_MAX_EXACT_LENGTHS`` distinct
        lengths at the next power of two, so the number of traces stays bounded whatever the batch sizes.
        """
        if size <= 0:
            return size
        lengths = self._static_lengths.setdefault(axis, [])
        fitting = [length for length in lengths if size <= length <= min(cap, 2 * size)]
        if fitting:
            return min(fitting)
        length = size if len(lengths) < _MAX_EXACT_LENGTHS else min(cap, 1 << (size - 1).bit_length())
        lengths.append(length)
        return length

    def _pad_batch(self, inputs: Any, targets: Any, weights: tf.Tensor) -> tuple[Any, Any, tf.Tensor]:
        """Pad a batch to a static length with copies of its last example carrying sample weight 0."""
        size = int(tf.shape(weights)[0])
        length = self._static_length("examples", size, max(size, self.chunk_size))
        inputs, targets = _pad_examples((inputs, targets), length)
        return inputs, targets, _pad_zeros(weights, length)

    def _call_vectorized(self, name: str, *args: Any) -> Any:
        """Run a vectorized function on static shapes, or its looped twin once pfor has failed on this model."""
        vectorized, looped = self._vectorized[name]
        self._loop_if_onednn_unsafe(name, args)
        if name not in self._looped:
            try:
                return vectorized(*args)
            except (ValueError, NotImplementedError, LookupError) as error:
                self._warn_looped(name, f"an op could not be vectorized ({_first_line(error)})")
        return looped(*args)

    def _loop_if_onednn_unsafe(self, name: str, args: tuple[Any, ...]) -> None:
        """Switch ``name`` to its looped twin (with a warning) when its vectorized graph is unsafe under oneDNN.

        With oneDNN on (TensorFlow's default on x86 CPUs), the vectorized per-example backward pass of attention
        (Keras ``MultiHeadAttention``, KerasHub's BERT and GPT-2) aborts the interpreter (``free(): invalid
        pointer`` / segmentation fault) on some CPUs (measured on AMD EPYC with AVX-512, TF 2.21), even on static
        shapes; the same graph runs with ``TF_ENABLE_ONEDNN_OPTS=0``. What those graphs have and dense/conv models
        lack are batched products of rank 5 and more (``Einsum``/``BatchMatMul`` over examples × heads × tokens).
        Tracing (without running) shows whether the graph has such ops; the answer is kept per function, since
        every trace of one function on one model has the same op types.
        """
        if name in self._looped or name in self._unsafe_ops:
            return
        unsafe: list[str] = []
        if _onednn_enabled():
            graph = self._vectorized[name][0].get_concrete_function(*args).graph
            unsafe = sorted(
                {
                    operation.type
                    for operation in graph.get_operations()
                    if operation.type in _ONEDNN_PFOR_UNSAFE
                    and any((tensor.shape.rank or 0) >= 5 for tensor in operation.inputs)
                }
            )
        self._unsafe_ops[name] = unsafe
        if unsafe:
            self._warn_looped(name, _onednn_reason(unsafe))

    def _in_graph(self, name: str, *args: Any) -> Any:
        """The vectorized function inlined in a caller's graph, looped instead when a shape there is not static."""
        graph = self._graphs[name]
        static = all(t.shape.is_fully_defined() for t in tf.nest.flatten(args))
        if not static and name not in self._looped:
            self._warn_looped(
                name,
                "it was called inside a tf.function whose shapes are not all static. Vectorizing on unknown shapes "
                "can abort the interpreter on attention models; call the InfluenceModel method eagerly (it pads "
                "every block to a static shape) or trace the caller with a fully static input_signature",
            )
        self._loop_if_onednn_unsafe(name, args)
        return graph(*args, vectorize=static and name not in self._looped)

    def _warn_looped(self, name: str, reason: str) -> None:
        self._looped.add(name)
        warnings.warn(
            f"InfluenceModel: {name} runs as a loop (tf.map_fn / while-loop jacobian), which is slower than the "
            f"vectorized map, because {reason}.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _prepare(self, batch: Any) -> tuple[Any, Any, tf.Tensor]:
        structure = unpack_batch(batch)
        inputs = tf.nest.map_structure(tf.convert_to_tensor, structure.inputs)
        targets = tf.nest.map_structure(tf.convert_to_tensor, structure.targets)
        if any(t.shape.rank == 0 for t in tf.nest.flatten(targets)):
            raise ValueError(
                "The targets are scalars, so the batch has no batch dimension: the dataset looks unbatched. "
                "Call `dataset.batch(batch_size)` (or pass arrays with a leading batch axis)."
            )
        size = tf.shape(tf.nest.flatten(targets)[0])[0]
        if structure.sample_weight is None:
            weights = tf.ones([size], self.dtype)
        else:
            weights = tf.cast(tf.reshape(structure.sample_weight, [-1]), self.dtype)
        if not tf.inside_function():
            self._check_batch(Batch(inputs, targets, weights))
        return inputs, targets, weights

    def _check_batch(self, batch: Batch) -> None:
        """Validate a batch once per input signature, eagerly, with error messages that name the fix."""
        signature = repr([(t.dtype.name, tuple(t.shape[1:])) for t in tf.nest.flatten((batch.inputs, batch.targets))])
        if signature in self._checked_signatures:
            return
        _check_batch_dimensions(self.model, batch)
        probe = _slice(tuple(batch), 0, 2)
        self._check_loss(probe)
        self._check_connected(probe)
        self._checked_signatures.add(signature)

    def _check_loss(self, probe: tuple[Any, Any, tf.Tensor]) -> None:
        inputs, targets, weights = probe
        size = int(tf.shape(weights)[0])
        predictions: Any = None
        try:
            predictions = self.model(inputs, training=False)
            losses = tf.convert_to_tensor(self._call_loss(targets, predictions))
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            shapes = tf.nest.map_structure(lambda t: tuple(t.shape), (inputs, targets))
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            outputs = tf.nest.flatten(predictions) if predictions is not None else []
            if len(outputs) > 1 and _is_keras_loss(self.loss_function):
                raise ValueError(
                    f"The model has {len(outputs)} outputs (shapes {[tuple(t.shape) for t in outputs]}) and its loss "
                    f"failed on them with targets of shapes {shapes[1]}: {reason}. Influence needs one loss value "
                    "per example: pass loss_function=a callable (targets, outputs) -> [B] that combines the outputs "
                    "(e.g. a weighted sum of per-output losses, targets as a matching tuple), or wrap the model to "
                    "keep one output: keras.Model(model.inputs, model.outputs[0])."
                ) from error
            raise ValueError(
                f"The model or its loss failed on a batch with (inputs, targets) shapes {shapes}: {reason}. Check "
                "that the targets fit the model outputs and the loss (sparse integer labels for sparse losses, "
                "one-hot for categorical)."
            ) from error
        output_shapes = [tuple(t.shape) for t in tf.nest.flatten(predictions)]
        target_shapes = [tuple(t.shape) for t in tf.nest.flatten(targets)]
        if losses.shape.rank == 0 or losses.shape[0] != size:
            raise ValueError(
                f"The loss returned shape {tuple(losses.shape)} for a batch of {size}: it must return one value per "
                "example. Use a loss with reduction='none', e.g. "
                "keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='none')."
            )
        batched = self._per_example_loss(inputs, targets, weights)
        if not np.all(np.isfinite(batched.numpy())):
            raise ValueError(
                f"The loss is not finite on the first examples ({batched.numpy()}). Check the inputs for NaN/inf, "
                "that the labels are in range and that `from_logits` matches the model's last activation."
            )
        for index in range(size):
            alone = self._per_example_loss(*_slice(probe, index, index + 1))
            if not np.allclose(alone.numpy()[0], batched.numpy()[index], rtol=1e-3, atol=1e-6):
                raise ValueError(
                    f"Targets of shape {target_shapes} do not fit model outputs of shape {output_shapes}: the loss "
                    "of an example changes with the other examples of its batch (broadcasting across the batch). "
                    "Reshape the targets to match the outputs, e.g. y[:, None] for a single-output regression."
                )

    def _check_connected(self, probe: tuple[Any, Any, tf.Tensor]) -> None:
        with tf.GradientTape() as tape:
            tape.watch(self._watched)
            loss = tf.reduce_sum(self._per_example_loss(*probe))
        gradients = tape.gradient(loss, self._watched)
        missing = [name for name, g in zip(self.weight_names, gradients, strict=True) if g is None]
        if missing:
            raise ValueError(
                f"No gradient flows from the loss to the watched weights {missing}: the path from these weights to "
                "the loss is not differentiable (or they are not used by the model). Leave them out with "
                "weights_to_watch or start_layer/last_layer, or make the path differentiable."
            )


# ---------------------------------------------------------------------- helpers


def _slice(structure: Any, start: int, stop: int) -> Any:
    return tf.nest.map_structure(lambda t: t[start:stop], structure)


def _pad_examples(structure: Any, length: int) -> Any:
    """Pad every tensor of a batch structure to ``length`` rows by repeating its last row (a valid example)."""

    def pad(tensor: tf.Tensor) -> tf.Tensor:
        missing = length - int(tf.shape(tensor)[0])
        if missing <= 0 or int(tf.shape(tensor)[0]) == 0:
            return tensor
        return tf.concat([tensor, tf.repeat(tensor[-1:], missing, axis=0)], axis=0)

    return tf.nest.map_structure(pad, structure)


def _pad_zeros(tensor: tf.Tensor, length: int) -> tf.Tensor:
    """Pad ``tensor`` to ``length`` rows with zeros."""
    missing = length - int(tf.shape(tensor)[0])
    if missing <= 0:
        return tensor
    return tf.concat([tensor, tf.zeros(tf.concat([[missing], tf.shape(tensor)[1:]], 0), tensor.dtype)], axis=0)


def _swap_first(tensor: tf.Tensor) -> list[int]:
    """The permutation exchanging the first two axes of ``tensor``."""
    return [1, 0, *range(2, int(tensor.shape.rank))]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _single_output(outputs: Any) -> tf.Tensor:
    if not isinstance(outputs, tf.Tensor):
        flat = tf.nest.flatten(outputs)
        if len(flat) != 1:
            raise ValueError(
                f"Gauss-Newton and Fisher curvatures need a model with one output tensor, got {len(flat)} outputs. "
                "Use curvature='hessian', or wrap the model so that it returns one tensor."
            )
        outputs = flat[0]
    return tf.convert_to_tensor(outputs)


def _resolve_gradient_dtype(gradient_dtype: Any, dtype: tf.DType) -> tf.DType:
    if gradient_dtype is None:
        return dtype
    try:
        resolved = tf.as_dtype(gradient_dtype)
    except TypeError as error:
        raise ValueError(f"gradient_dtype must be 'bfloat16', 'float16' or None, got {gradient_dtype!r}.") from error
    if not resolved.is_floating or resolved.size > dtype.size:
        raise ValueError(
            f"gradient_dtype must be a floating dtype no wider than the weights' {dtype.name} (e.g. 'bfloat16' or "
            f"'float16'), got {resolved.name}; per-sample gradients are always accumulated in {dtype.name}."
        )
    return resolved


def _loss_family(loss_function: Any) -> str | None:
    loss_classes = tuple(cls for cls in (keras.losses.Loss, _legacy_loss_class()) if cls is not None)
    if not isinstance(loss_function, loss_classes):
        return None
    config: dict[str, Any] = dict(loss_function.get_config())  # type: ignore[union-attr]
    name = type(loss_function).__name__
    last_axis = config.get("axis", -1) in (-1, None)
    from_logits = bool(config.get("from_logits", False))
    if name in ("SparseCategoricalCrossentropy", "CategoricalCrossentropy"):
        if from_logits and last_axis and config.get("ignore_class") is None:
            return "softmax_cross_entropy"
    elif name == "BinaryCrossentropy":
        if from_logits and last_axis:
            return "sigmoid_cross_entropy"
    elif name == "MeanSquaredError":
        return "squared_error"
    return None


def _check_model(model: Any) -> None:
    if not (is_keras3_object(model) or is_legacy_keras_object(model)) or not hasattr(model, "trainable_weights"):
        raise TypeError(
            f"InfluenceModel wraps a Keras model (Keras 3 or tf_keras), got {type(model).__name__}. "
            "Build your model with keras.Sequential, the functional API or by subclassing keras.Model."
        )
    if not model.built or not model.weights:
        raise ValueError(
            "The model is not built, so it has no weights yet. Call `model.build(input_shape)` or call the model "
            "once on a batch (`model(x[:1])`) before wrapping it."
        )


def _resolve_weights(
    model: Any,
    start_layer: int | str | None,
    last_layer: int | str | None,
    weights_to_watch: Sequence[Any] | None,
) -> list[Any]:
    if weights_to_watch is not None:
        if start_layer is not None or last_layer is not None:
            raise ValueError("Pass either weights_to_watch or start_layer/last_layer, not both.")
        candidates = list(weights_to_watch)
        owned = {id(variable_tensor(weight)) for weight in model.weights}
        foreign = [variable_name(w) for w in candidates if id(variable_tensor(w)) not in owned]
        if foreign:
            raise ValueError(f"weights_to_watch contains weights that are not the model's: {foreign}.")
    elif start_layer is None and last_layer is None:
        candidates = list(model.trainable_weights)
    else:
        layers = list(model.layers)
        first = 0 if start_layer is None else _layer_index(model, start_layer, "start_layer")
        last = len(layers) - 1 if last_layer is None else _layer_index(model, last_layer, "last_layer")
        if first > last:
            raise ValueError(f"start_layer ({first}) comes after last_layer ({last}).")
        candidates = [weight for layer in layers[first : last + 1] for weight in layer.trainable_weights]
    unique: dict[int, Any] = {}
    for weight in candidates:
        unique.setdefault(id(variable_tensor(weight)), weight)
    weights = list(unique.values())
    if not weights:
        raise ValueError(
            "There are no weights to watch: the chosen layers have no trainable weights. Pick other layers with "
            "start_layer/last_layer or pass weights_to_watch explicitly."
        )
    dtypes = set()
    for weight in weights:
        dtype = tf.as_dtype(variable_tensor(weight).dtype)
        if not dtype.is_floating:
            raise TypeError(
                f"Weight {variable_name(weight)} has dtype {dtype.name}; influence needs floating-point weights. "
                "Leave it out of weights_to_watch."
            )
        dtypes.add(dtype.name)
    if len(dtypes) > 1:
        raise TypeError(f"The watched weights mix dtypes {sorted(dtypes)}; watch weights of one dtype.")
    return weights


def _resolve_loss(model: Any, loss_function: Any, dtype: tf.DType) -> LossFunction:
    keras_module = keras_module_of(model)
    explicit = loss_function is not None
    if loss_function is None:
        loss_function = getattr(model, "loss", None)
        if loss_function is None:
            raise ValueError(
                "The model is not compiled with a loss and no loss_function was given. Pass a per-example loss, "
                "e.g. loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='none')."
            )
    if isinstance(loss_function, (dict, list, tuple)):
        raise ValueError(
            "Models with several losses (one per output) are not supported directly: pass one per-example "
            "loss_function(y_true, y_pred) -> [batch] that combines them."
        )
    if isinstance(loss_function, str):
        loss_function = keras_module.losses.get(loss_function)
    loss_classes = tuple(cls for cls in (keras.losses.Loss, _legacy_loss_class()) if cls is not None)
    if isinstance(loss_function, loss_classes):
        reduction = getattr(loss_function, "reduction", None)
        if reduction not in (None, "none"):
            if explicit:
                raise ValueError(
                    f"loss_function has reduction={reduction!r}, but influence needs one loss per example. "
                    f"Create it with reduction='none', e.g. {type(loss_function).__name__}(..., reduction='none')."
                )
            loss_function = _rebuild_loss(loss_function, reduction="none")
        loss_dtype = getattr(loss_function, "dtype", None)
        if isinstance(loss_function, keras.losses.Loss) and loss_dtype not in (None, dtype.name):
            # Keras 3 losses cast predictions to their own dtype (floatx by default): a float64 model would
            # silently get float32 losses and gradients.
            loss_function = _rebuild_loss(loss_function, dtype=dtype.name)
    if not callable(loss_function):
        raise TypeError(f"loss_function must be callable (y_true, y_pred) -> [batch], got {type(loss_function)}.")
    return loss_function  # type: ignore[no-any-return]


def _rebuild_loss(loss_function: Any, **changes: Any) -> Any:
    config = dict(loss_function.get_config())
    config.update({"reduction": getattr(loss_function, "reduction", None), **changes})
    if "dtype" not in changes and isinstance(loss_function, keras.losses.Loss):
        config["dtype"] = loss_function.dtype
    return type(loss_function).from_config(config)


def _legacy_loss_class() -> type | None:
    try:
        import tf_keras
    except ImportError:
        return None
    return tf_keras.losses.Loss  # type: ignore[no-any-return]


def _regularization_terms(model: Any) -> list[tf.Tensor]:
    """The weight regularization losses of a model, recomputed from the current weights.

    ``model.losses`` may also hold activity-regularization tensors from the last call (possibly of another graph),
    so the terms are recomputed from the weights' regularizers instead.
    """
    if is_keras3_object(model):
        return [
            weight.regularizer(weight)
            for weight in model.trainable_weights
            if getattr(weight, "regularizer", None) is not None
        ]
    terms: list[tf.Tensor] = []
    for layer in [model, *model.submodules]:
        terms.extend(loss() for loss in getattr(layer, "_callable_losses", []))
    return terms


def _check_batch_dimensions(model: Any, batch: Batch) -> None:
    inputs = tf.nest.flatten(batch.inputs)
    targets = tf.nest.flatten(batch.targets)
    expected = getattr(model, "inputs", None) or []
    try:
        expected_ranks = [len(tensor.shape) for tensor in tf.nest.flatten(expected)]
    except (TypeError, ValueError):  # pragma: no cover - symbolic inputs without shapes
        expected_ranks = []
    if expected_ranks and len(expected_ranks) == len(inputs):
        for tensor, rank in zip(inputs, expected_ranks, strict=True):
            if tensor.shape.rank == rank - 1:
                raise ValueError(
                    f"The inputs have shape {tuple(tensor.shape)} but the model expects rank {rank} with a batch "
                    "dimension first: the dataset looks unbatched. Call `dataset.batch(batch_size)`."
                )
    sizes = {int(t.shape[0]) for t in inputs + targets if t.shape.rank and t.shape[0] is not None}
    weights = batch.sample_weight
    if weights is not None and weights.shape.rank and weights.shape[0] is not None:
        sizes.add(int(weights.shape[0]))
    if len(sizes) > 1:
        raise ValueError(
            f"Inputs, targets and sample weights disagree on the batch size ({sorted(sizes)}). If the dataset is "
            "unbatched, call `dataset.batch(batch_size)`; otherwise check how the targets are built."
        )


def _concat_batches(blocks: list[tf.Tensor]) -> tf.Tensor:
    if not blocks:
        raise ValueError("The dataset is empty: there is nothing to compute.")
    return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=0)


def _needs_target_alignment(loss_function: Any) -> bool:
    """Whether targets one rank below the outputs must get a trailing axis before the loss sees them.

    ``tf_keras`` losses squeeze a ``[B, 1]`` prediction to ``[B]`` when the targets are ``[B]`` and then reduce
    the last axis, returning one scalar for the batch (Keras 3 expands the targets instead). Sparse losses take
    targets one rank below the outputs on purpose and are left alone.
    """
    legacy = _legacy_loss_class()
    return (
        legacy is not None
        and isinstance(loss_function, legacy)
        and not type(loss_function).__name__.startswith("Sparse")
        and "sparse" not in str(getattr(loss_function, "name", "")).lower()
    )


def _align_legacy_targets(targets: Any, outputs: Any) -> tuple[Any, Any]:
    if not isinstance(targets, tf.Tensor) or not isinstance(outputs, tf.Tensor):
        return targets, outputs
    target_rank, output_rank = targets.shape.rank, outputs.shape.rank
    if (
        target_rank is not None
        and output_rank is not None
        and target_rank == output_rank - 1
        and outputs.shape[-1] == 1
    ):
        targets = tf.expand_dims(targets, -1)
    return targets, outputs


def _warn_start_layer_only(model: Any, start_layer: int | str, weights: list[Any]) -> None:
    """Warn when ``start_layer`` alone watches more than the original Influenciae's "layer k only"."""
    first = _layer_index(model, start_layer, "start_layer")
    own = {id(variable_tensor(weight)) for weight in model.layers[first].trainable_weights}
    if all(id(variable_tensor(weight)) in own for weight in weights):
        return
    layer_only = sum(int(np.prod(variable_tensor(w).shape)) for w in model.layers[first].trainable_weights)
    watched = sum(int(np.prod(variable_tensor(w).shape)) for w in weights)
    warnings.warn(
        f"start_layer={start_layer!r} without last_layer watches layers {first} to the end ({watched} parameters). "
        f"The original Influenciae watched layer {first} only ({layer_only} parameters). Pass "
        f"last_layer={start_layer!r} for that layer only, or last_layer=-1 to keep every layer from "
        f"{start_layer!r} to the end; either silences this warning.",
        MigrationWarning,
        stacklevel=3,
    )


_DEFAULT_WATCH_WARNED = False  # the default-selection warning is shown once per process


def _warn_default_watch_once(model: Any, weights: list[Any]) -> None:
    """Say once per process what ``InfluenceModel(model)`` watches, where the original Influenciae watched less.

    The original's ``InfluenceModel(model)`` watched only the last layer with weights before the output layer; code
    moved over unchanged would silently compute influence over other weights. Nothing is said when both rules pick
    the same weights (one weighted layer) or when the caller chose the weights (any of ``start_layer``,
    ``last_layer``, ``weights_to_watch``).
    """
    global _DEFAULT_WATCH_WARNED
    if _DEFAULT_WATCH_WARNED:
        return
    layers = list(model.layers)
    original = original_default_layer(layers)
    if original is None:
        return
    original_ids = {id(variable_tensor(weight)) for weight in layers[original].trainable_weights}
    if {id(variable_tensor(weight)) for weight in weights} == original_ids:
        return
    _DEFAULT_WATCH_WARNED = True
    watched = sum(int(np.prod(variable_tensor(w).shape)) for w in weights)
    original_count = sum(int(np.prod(variable_tensor(w).shape)) for w in layers[original].trainable_weights)
    warnings.warn(
        f"InfluenceModel(model) watches every trainable weight ({watched:,} parameters). Code written for the "
        f"original Influenciae watched only layer {original} ({layers[original].name!r}, {original_count:,} "
        "parameters) there: build it with influenciae.compat.original_influence_model(model) for that selection. "
        "Choosing the weights (start_layer=, last_layer= or weights_to_watch=; last_layer=-1 means all of them) "
        "silences this warning, which is shown once per process.",
        MigrationWarning,
        stacklevel=3,
    )


class MigrationWarning(UserWarning):
    """Code written for the original Influenciae would watch other weights or compute another quantity here."""


def _is_keras_loss(loss: Any) -> bool:
    """Whether ``loss`` is a Keras ``Loss`` object (of Keras 3 or tf_keras), not a user's own callable."""
    return any(cls.__name__ == "Loss" and "keras" in cls.__module__ for cls in type(loss).__mro__)


# Batched products whose vectorized (pfor) forms of rank >= 5 abort the interpreter under oneDNN (see
# InfluenceModel._loop_if_onednn_unsafe).
_ONEDNN_PFOR_UNSAFE = frozenset({"Einsum", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"})


def _onednn_enabled() -> bool:
    """Whether TensorFlow's oneDNN kernels are on in this process (``TF_ENABLE_ONEDNN_OPTS``, read at import)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # noqa: PLC0415 - private, guarded

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # pragma: no cover - another TensorFlow build: assume the default (on)
        return True


def _onednn_reason(ops: list[str]) -> str:
    return (
        f"TensorFlow's oneDNN kernels can abort the interpreter on the rank-5 vectorized {'/'.join(ops)} ops of "
        "this model (attention over examples, heads and tokens). For the vectorized path, set the environment "
        "variable TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is imported (the results are the same)"
    )
