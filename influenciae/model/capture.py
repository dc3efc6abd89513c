"""Per-layer capture of layer inputs ``a`` and pre-activation output gradients ``g`` (Dense, EinsumDense, Conv, ...).

Kronecker-factored curvature (:mod:`influenciae.hessian.kfac`) needs more structure than flat parameter vectors: for
a layer ``y = φ(W a + b)`` the per-example gradient of the kernel is ``Σ_t a_t g_tᵀ``, a sum over the positions ``t``
where the layer is applied (one for a Dense layer on vectors, every output pixel of a convolution, every token of an
embedding, and every call of a layer used twice), with ``g_t = ∂ loss / ∂ (W a_t + b)``. Like the rest of
:mod:`influenciae.model` (the only subpackage allowed to know Keras), it maps each watched supported layer to its
slice of the flat parameter vector of :class:`~influenciae.model.InfluenceModel` and records ``a`` and ``g`` during
one forward and one backward pass.

How a pass works: for its duration, each supported layer's ``call`` is replaced on the layer instance (set with
``object.__setattr__`` so Keras' attribute tracker ignores it). The replacement runs the layer's own ``call`` with
its fused activation switched off, adds a zero *probe* tensor to the pre-activation output and re-applies the
activation; the gradient of the loss with respect to the probe is ``g``. Convolution inputs are unfolded with
``tf.image.extract_patches``, whose ``(kh, kw, c_in)`` order matches ``kernel.reshape(-1, c_out)``. The model runs
with ``training=False`` and the loss is summed over the batch, so each example's ``g`` is its own gradient.

Three kinds of backward pass (``fisher=``) give the three usual curvature matrices, through "pseudo-gradients"
``v`` in output space, back-propagated as ``∂ (vᵀ f(x)) / ∂ θ = J(x)ᵀ v``:

* ``"empirical"``: ``v = ∂ℓ/∂f``, the gradient of the loss with the given targets: ``Σ v vᵀ`` is the empirical
  Fisher, and ``J ᵀ v`` the true per-example gradient.
* ``"expected"``: the columns of a square root ``L`` of the output Hessian ``∂²ℓ/∂f² = L Lᵀ`` (negative eigenvalues
  clipped): ``Σ_k Jᵀ L_k L_kᵀ J = Jᵀ (∂²ℓ/∂f²) J`` is exactly the example's Gauss-Newton (GGN) matrix. For softmax
  cross-entropy this is the true Fisher in closed form (the expectation over the model's labels). Costs one
  backward pass per output unit.
* ``"sampled"``: ``v = L ε`` with Rademacher ``ε``: one backward pass whose outer product is the GGN in
  expectation (Martens' Monte-Carlo Fisher; drawing a label from the model for softmax cross-entropy is another
  estimator with the same expectation).

Weights not covered by a supported layer (BatchNorm scales, custom layers, a bias watched without its kernel) get
their per-example pseudo-gradients from a vectorized Jacobian instead, for a diagonal curvature block.

Which layers are captured, and how each maps to a block: ``_capture_layers.py``.

Every batch is traced in chunks of a fixed size (the last one padded with zero-weight copies), so the traced graphs,
and TensorFlow's vectorized Jacobians inside them, only see static shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from influenciae.data import unpack_batch
from influenciae.model import InfluenceModel
from influenciae.model._backend import tf, variable_name, variable_tensor
from influenciae.model._capture_layers import (
    CapturedLayer,
    LayerStatistics,
    _all_layers,
    _einsum_equations,
    _gradient_positions,
    _kernel_view,
    block_gradients,
    supported_layer_kind,
    traced_error_message,
)

__all__ = [
    "CapturedLayer",
    "LayerCapture",
    "LayerStatistics",
    "FISHER_TYPES",
    "supported_layer_kind",
    "block_gradients",
    "traced_error_message",
]

FISHER_TYPES = ("expected", "sampled", "empirical")
"""The statistics ``fisher=`` accepts: the exact expectation over the outputs (the GGN), labels sampled from the
model, or the dataset's labels (the empirical Fisher)."""


class LayerCapture:
    """Records ``(a, g)`` of every watched supported layer of an :class:`InfluenceModel` in one pass.

    Args:
        model: The wrapped model. Its loss (with sample weights) defines the pseudo-gradients.
        max_output_size: Largest number of model outputs per example for ``fisher="expected"``/``"sampled"``, which
            form the ``[C, C]`` output Hessian of each example.
        chunk_size: Examples per traced pass (None: the size of the first captured batch). Every batch is split
            into chunks of exactly this many examples, the last one padded by repeating its last example with sample
            weight 0 (and trimmed from the results), so the traced function only ever sees static shapes: this
            keeps TensorFlow's vectorized Jacobians (pfor) off the dynamic-shape paths that can abort the
            interpreter on attention models, and traces once per input shape.

    Attributes:
        layers: The captured layers (:class:`CapturedLayer`), in the model's layer order.
        uncovered_parameter_indices: ``[U]`` flat positions of the watched weights no captured layer covers.
        uncovered_weight_names: Their names.

    Example:
        >>> capture = LayerCapture(im)
        >>> statistics, uncovered = capture.capture((x, y), fisher="expected")
        >>> per_example = capture.per_example_gradients((x, y))  # [B, P], rebuilt from a ⊗ g
    """

    def __init__(self, model: InfluenceModel, *, max_output_size: int = 1024, chunk_size: int | None = None) -> None:
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        invalid = isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        if chunk_size is not None and invalid:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        self.model = model
        self.max_output_size = int(max_output_size)
        self.chunk_size = chunk_size
        sizes = [int(np.prod(shape)) for shape in model.weight_shapes]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        position = {id(variable_tensor(weight)): index for index, weight in enumerate(model.weights)}
        claimed: set[int] = set()
        self.layers: list[CapturedLayer] = []
        for layer in _all_layers(model.model):
            kind = supported_layer_kind(layer)
            if kind is None:
                continue
            kernel = layer.embeddings if kind == "embedding" else layer.kernel
            kernel_index = position.get(id(variable_tensor(kernel)))
            if kernel_index is None or kernel_index in claimed:
                continue
            shape = tuple(int(d) for d in model.weight_shapes[kernel_index])
            order, columns, bias_is_column = _kernel_view(kind, layer, shape)
            bias = None if kind == "embedding" or not bias_is_column else layer.bias
            bias_index = None if bias is None else position.get(id(variable_tensor(bias)))
            if bias_index in claimed:
                bias_index = None
            rows = int(np.prod(shape)) // columns
            indices = [offsets[kernel_index] + order]
            names = [variable_name(model.weights[kernel_index])]
            if bias_index is not None:
                indices.append(np.arange(offsets[bias_index], offsets[bias_index + 1], dtype=np.int64))
                names.append(variable_name(model.weights[bias_index]))
                rows += 1
            claimed.update(index for index in (kernel_index, bias_index) if index is not None)
            self.layers.append(
                CapturedLayer(
                    name=layer.name,
                    kind=kind,
                    num_rows=rows,
                    num_columns=columns,
                    has_bias=bias_index is not None,
                    parameter_indices=np.concatenate(indices),
                    weight_names=tuple(names),
                    layer=layer,
                    einsum=_einsum_equations(layer) if kind == "einsum_dense" else None,
                )
            )
        self._uncovered = [index for index in range(len(model.weights)) if index not in claimed]
        self.uncovered_weight_names = [variable_name(model.weights[index]) for index in self._uncovered]
        uncovered_ranges = [np.arange(offsets[i], offsets[i + 1], dtype=np.int64) for i in self._uncovered]
        self.uncovered_parameter_indices = (
            np.concatenate(uncovered_ranges) if uncovered_ranges else np.zeros([0], np.int64)
        )
        self._records: list[list[tuple[tf.Tensor, tf.Tensor]]] | None = None
        self._tape: tf.GradientTape | None = None
        # traced per static chunk shape (no relaxed shapes), once per model: the captures of its solvers share it
        key = ("influenciae.model.capture", self.max_output_size, tuple((b.name, b.kind) for b in self.layers))
        self._capture_fn = model.shared_function(key, lambda: tf.function(self._capture, autograph=False))

    # ------------------------------------------------------------------ public

    def capture(
        self, batch: Any, *, fisher: str = "empirical", seed: int | tf.Tensor = 0
    ) -> tuple[list[LayerStatistics], tf.Tensor]:
        """One forward and backward pass over a batch.

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, sample_weight)`` with ``B`` examples.
            fisher: ``"empirical"``, ``"expected"`` or ``"sampled"`` (see the module docstring).
            seed: Seed of the Rademacher draws of ``fisher="sampled"`` (an int or an int32 tensor ``[2]``).

        Returns:
            ``(statistics, uncovered)``: one :class:`LayerStatistics` per captured layer, and the per-example
            pseudo-gradients of the uncovered weights ``[K, B, U]`` (columns in ``uncovered_parameter_indices``
            order).

        Raises:
            ValueError: For an unknown ``fisher``, a layer the batch never calls, or (expected/sampled) a model
                with more than ``max_output_size`` outputs per example.
        """
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
        inputs, targets, weights = self._prepare(batch)
        seed_tensor = tf.constant([0, int(seed)], tf.int32) if isinstance(seed, int) else tf.cast(seed, tf.int32)
        size = int(weights.shape[0])
        if size == 0:
            raise ValueError("The batch has no examples; remove empty batches from the dataset.")
        if self.chunk_size is None:
            self.chunk_size = max(size, 1)  # fixed by the first batch: later batches are split and padded to it
        chunk = self.chunk_size
        pieces = []
        for number, start in enumerate(range(0, size, chunk)):
            count = min(chunk, size - start)
            rows = np.minimum(np.arange(start, start + chunk), start + count - 1)  # pad by repeating the last row
            padded = tf.nest.map_structure(lambda t, rows=rows: tf.gather(t, rows), (inputs, targets))
            mask = tf.constant(np.arange(chunk) < count, self.model.dtype)
            chunk_seed = seed_tensor if number == 0 else tf.random.experimental.stateless_fold_in(seed_tensor, number)
            try:
                statistics, uncovered = self._capture_fn(*padded, tf.gather(weights, rows) * mask, chunk_seed, fisher)
            except ValueError as error:  # raised while tracing: autograph buries the message under "in user code"
                raise ValueError(traced_error_message(error)) from error
            pieces.append(([(a[:count], g[:, :count]) for a, g in statistics], uncovered[:, :count]))
        if len(pieces) == 1:
            statistics, uncovered = pieces[0]
        else:
            statistics = [
                (tf.concat([p[0][i][0] for p in pieces], 0), tf.concat([p[0][i][1] for p in pieces], 1))
                for i in range(len(self.layers))
            ]
            uncovered = tf.concat([p[1] for p in pieces], 1)
        return [LayerStatistics(a, g) for a, g in statistics], uncovered

    def per_example_gradients(self, batch: Any) -> tf.Tensor:
        """Per-example gradients ``∇_θ w_i ℓ(z_i)`` ``[B, P]`` rebuilt from ``Σ_t a_t ⊗ g_t`` (empirical pass).

        Equal to :meth:`InfluenceModel.batch_jacobian_tensor` (the tests check it against a GradientTape loop);
        much cheaper than ``tape.jacobian`` because only ``a`` and ``g`` are back-propagated.
        """
        statistics, uncovered = self.capture(batch, fisher="empirical")
        return self._flat_gradients(statistics, uncovered[0])

    def covered_gradients(self, inputs: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        """:meth:`per_example_gradients` inside a caller's graph, for a model whose watched weights are all
        captured (what :meth:`InfluenceModel.batch_jacobian_tensor` runs with ``per_example_gradients="layers"``).

        Args:
            inputs: The batch's inputs (``B`` examples).
            targets: Its targets.
            weights: ``[B]`` sample weights.

        Returns:
            ``[B, P]`` in the model's flattening order.
        """
        statistics, uncovered = self._capture(inputs, targets, weights, tf.zeros([2], tf.int32), "empirical")
        return self._flat_gradients([LayerStatistics(a, g) for a, g in statistics], uncovered[0])

    def _flat_gradients(self, statistics: list[LayerStatistics], uncovered: tf.Tensor) -> tf.Tensor:
        """``[B, P]`` in the flattening order from the blocks' ``Σ_t a_t ⊗ g_t`` and the uncovered ``[B, U]``."""
        size = tf.shape(uncovered)[0]
        parts = [uncovered]
        order = [self.uncovered_parameter_indices]
        for block, stats in zip(self.layers, statistics, strict=True):
            parts.append(tf.reshape(block_gradients(block, stats)[0], [size, -1]))
            order.append(block.parameter_indices)
        permutation = np.concatenate(order)
        gradients = tf.concat(parts, axis=1)
        if np.array_equal(permutation, np.arange(permutation.size)):  # e.g. every layer's kernel then its bias
            return gradients
        inverse = np.empty_like(permutation)
        inverse[permutation] = np.arange(permutation.size)
        return tf.gather(gradients, inverse, axis=1)

    # ------------------------------------------------------------------ graph side

    def _prepare(self, batch: Any) -> tuple[Any, Any, tf.Tensor]:
        self.model.validate_batch(batch)
        structure = unpack_batch(batch)
        inputs = tf.nest.map_structure(tf.convert_to_tensor, structure.inputs)
        targets = tf.nest.map_structure(tf.convert_to_tensor, structure.targets)
        size = tf.shape(tf.nest.flatten(targets)[0])[0]
        if structure.sample_weight is None:
            weights = tf.ones([size], self.model.dtype)
        else:
            weights = tf.cast(tf.reshape(structure.sample_weight, [-1]), self.model.dtype)
        return inputs, targets, weights

    def _capture(
        self, inputs: Any, targets: Any, weights: tf.Tensor, seed: tf.Tensor, fisher: str
    ) -> tuple[list[tuple[tf.Tensor, tf.Tensor]], tf.Tensor]:
        uncovered = [variable_tensor(self.model.weights[index]) for index in self._uncovered]
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(uncovered)
            with self._patched(tape) as records:
                predictions = self.model.model(inputs, training=False)
            outputs = tf.nest.flatten(predictions)
            flat = tf.concat([tf.reshape(tf.cast(t, self.model.dtype), [tf.shape(t)[0], -1]) for t in outputs], 1)
            vectors = tf.stop_gradient(self._output_vectors(flat, predictions, targets, weights, seed, fisher))
            surrogate = tf.einsum("kbc,bc->kb", vectors, flat)  # [K, B]: vᵀ f(x) per example and pass
            totals = tf.reduce_sum(surrogate, axis=1)  # [K]
        missing = [self.layers[index].name for index, calls in enumerate(records) if not calls]
        if missing:
            raise ValueError(
                f"The layers {missing} are watched but were not called on this batch, so their inputs cannot be "
                "captured. Leave their weights out of the watched weights."
            )
        probes = [[probe for _, probe in calls] for calls in records]
        if vectors.shape[0] == 1:
            gradients = tape.gradient(totals, probes, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            gradients = tf.nest.map_structure(lambda g: g[None], gradients)
        else:
            gradients = tape.jacobian(totals, probes, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        statistics = []
        for block, calls, block_gradients_ in zip(self.layers, records, gradients, strict=True):
            activations = tf.concat([_positions(block, a) for a, _ in calls], axis=1)
            pseudo = tf.concat([_gradient_positions(g, block.num_columns) for g in block_gradients_], axis=2)
            statistics.append((activations, tf.cast(pseudo, self.model.dtype)))
        size = tf.shape(weights)[0]
        if uncovered:
            jacobians = tape.jacobian(surrogate, uncovered, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            count = tf.shape(surrogate)[0]
            uncovered_gradients = tf.concat([tf.reshape(j, [count, size, -1]) for j in jacobians], axis=2)
        else:
            uncovered_gradients = tf.zeros([tf.shape(surrogate)[0], size, 0], self.model.dtype)
        del tape
        return statistics, uncovered_gradients

    def _output_vectors(
        self, flat: tf.Tensor, predictions: Any, targets: Any, weights: tf.Tensor, seed: tf.Tensor, fisher: str
    ) -> tf.Tensor:
        """Pseudo-gradients ``[K, B, C]`` in the flattened output space."""
        outputs = tf.nest.flatten(predictions)
        shapes = [tf.shape(t) for t in outputs]
        sizes = [int(np.prod(t.shape[1:])) for t in outputs]
        detached = tf.stop_gradient(flat)

        def loss_sum(values: tf.Tensor) -> tf.Tensor:
            parts = tf.split(values, sizes, axis=1)
            rebuilt = [tf.cast(tf.reshape(p, s), t.dtype) for p, s, t in zip(parts, shapes, outputs, strict=True)]
            structured = tf.nest.pack_sequence_as(predictions, rebuilt)
            return tf.reduce_sum(self.model._loss_from_outputs(structured, targets, weights))  # as InfluenceModel

        if fisher == "empirical":
            with tf.GradientTape() as tape:
                tape.watch(detached)
                value = loss_sum(detached)
            return tape.gradient(value, detached)[None]
        if sum(sizes) > self.max_output_size:
            raise ValueError(
                f"fisher={fisher!r} forms the [C, C] output Hessian of each example, but the model has C = "
                f"{sum(sizes)} outputs per example (max_output_size={self.max_output_size}). Use "
                "fisher='empirical' or raise max_output_size."
            )
        with tf.GradientTape() as outer:
            outer.watch(detached)
            with tf.GradientTape() as inner:
                inner.watch(detached)
                value = loss_sum(detached)
            first = inner.gradient(value, detached)
        hessian = outer.batch_jacobian(first, detached)  # [B, C, C]: examples do not mix
        hessian = (hessian + tf.linalg.matrix_transpose(hessian)) / 2.0
        eigenvalues, eigenvectors = tf.linalg.eigh(hessian)
        root = eigenvectors * tf.sqrt(tf.maximum(eigenvalues, 0.0))[:, None, :]  # [B, C, K]: H = root rootᵀ
        if fisher == "expected":
            return tf.transpose(root, [2, 0, 1])
        signs = tf.random.stateless_uniform(tf.shape(root)[:2], seed, minval=0, maxval=2, dtype=tf.int32)
        rademacher = tf.cast(2 * signs - 1, root.dtype)
        return tf.einsum("bck,bk->bc", root, rademacher)[None]

    @contextlib.contextmanager
    def _patched(self, tape: tf.GradientTape) -> Iterator[list[list[tuple[tf.Tensor, tf.Tensor]]]]:
        records: list[list[tuple[tf.Tensor, tf.Tensor]]] = [[] for _ in self.layers]
        saved = []
        for index, block in enumerate(self.layers):
            layer = block.layer
            saved.append((layer, layer.__dict__.get("call", _MISSING)))
            object.__setattr__(
                layer, "call", _capturing_call(block, type(layer).call.__get__(layer), tape, records[index])
            )
        try:
            yield records
        finally:
            for layer, previous in saved:
                if previous is _MISSING:
                    object.__delattr__(layer, "call")
                else:
                    object.__setattr__(layer, "call", previous)


_MISSING = object()


def _capturing_call(block: CapturedLayer, original: Any, tape: tf.GradientTape, records: list[Any]) -> Any:
    layer = block.layer

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        activation = getattr(layer, "activation", None)
        if activation is not None:
            object.__setattr__(layer, "activation", None)
        try:
            pre_activation = original(inputs, *args, **kwargs)
        finally:
            if activation is not None:
                object.__setattr__(layer, "activation", activation)
        if block.einsum is None:
            probe = tf.zeros_like(pre_activation)
            tape.watch(probe)
            output = pre_activation + probe
        else:  # the probe in [batch, tokens..., columns...] order, so its gradient needs no transpose
            probe = tf.zeros_like(tf.einsum(block.einsum[1], pre_activation))
            tape.watch(probe)
            output = pre_activation + tf.einsum(block.einsum[2], probe)
        records.append((_layer_input(block, inputs), probe))
        return output if activation is None else activation(output)

    return call


def _layer_input(block: CapturedLayer, inputs: Any) -> tf.Tensor:
    """The per-position inputs ``a`` of one call: ``[B, ..., d_in]`` (patches for Conv2D) or token ids."""
    inputs = tf.convert_to_tensor(inputs)
    if block.kind == "embedding":
        return tf.cast(inputs, tf.int64)
    if block.kind == "einsum_dense":
        assert block.einsum is not None  # noqa: S101 -- set for every einsum_dense block
        return tf.einsum(block.einsum[0], inputs)
    if block.kind == "conv1d":  # a Conv2D of height 1: [B, L, C] -> [B, 1, L', k * C]
        layer = block.layer
        if layer.padding == "causal":
            inputs = tf.pad(inputs, layer._compute_causal_padding())
        return tf.image.extract_patches(
            inputs[:, None],
            sizes=[1, 1, layer.kernel_size[0], 1],
            strides=[1, 1, layer.strides[0], 1],
            rates=[1, 1, layer.dilation_rate[0], 1],
            padding="VALID" if layer.padding == "causal" else layer.padding.upper(),
        )
    if block.kind == "conv2d":
        layer = block.layer
        kernel_h, kernel_w = layer.kernel_size
        stride_h, stride_w = layer.strides
        rate_h, rate_w = layer.dilation_rate
        inputs = tf.image.extract_patches(
            inputs,
            sizes=[1, kernel_h, kernel_w, 1],
            strides=[1, stride_h, stride_w, 1],
            rates=[1, rate_h, rate_w, 1],
            padding=layer.padding.upper(),
        )
    return inputs


def _positions(block: CapturedLayer, inputs: tf.Tensor) -> tf.Tensor:
    """``[B, T, num_rows]`` activations (with the bias 1) or ``[B, T]`` token ids."""
    size = tf.shape(inputs)[0]
    if block.kind == "embedding":
        return tf.reshape(inputs, [size, -1])
    features = block.num_rows - int(block.has_bias)
    flat = tf.reshape(inputs, [size, -1, features])
    if block.has_bias:
        flat = tf.concat([flat, tf.ones_like(flat[..., :1])], axis=-1)
    return flat
