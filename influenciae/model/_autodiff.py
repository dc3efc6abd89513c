"""The graph side of InfluenceModel: vectorized gradients and curvature products on static shapes.

Vectorized functions (``tf.vectorized_map`` / pfor jacobians) are traced on fully static shapes only: pfor on
unknown dimensions (a relaxed batch axis) has aborted the interpreter on attention models (``docs/transformers.md``).
Their callers pad every block to a length from ``_static_length`` and slice the results. Each has a looped twin
(``tf.map_fn`` / while-loop jacobians), used when pfor cannot convert an op or oneDNN makes it unsafe.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from influenciae.model._backend import tf
from influenciae.model.losses import align_legacy_targets, regularization_terms, single_output


class _Autodiff:
    """Mixin of :class:`~influenciae.model.InfluenceModel`: the tensors in, tensors out implementations."""

    if TYPE_CHECKING:
        model: Any
        loss_function: Any
        dtype: tf.DType
        gradient_dtype: tf.DType
        nb_params: int
        chunk_size: int
        hvp_chunk_size: int
        hvp_mode: str
        _watched: list[tf.Variable]
        _align_targets: bool
        _layer_capture: Any  # a LayerCapture when per-sample gradients come from the layers (see core)

        def flatten(self, tensors: Sequence[Any]) -> tf.Tensor: ...

        def unflatten(self, vector: tf.Tensor) -> list[tf.Tensor]: ...

    def _build_functions(self) -> None:
        """Create the traced functions (called once, at the end of ``__init__``)."""
        # Functions without a vectorized map may relax their shapes (fewer traces, nothing to break).
        self._loss_fn = tf.function(self._per_example_loss, reduce_retracing=True, autograph=False)
        self._gradient_fn = tf.function(self._gradient_sum, reduce_retracing=True, autograph=False)
        self._regularization_gradient_fn = tf.function(
            self._regularization_gradient, reduce_retracing=True, autograph=False
        )
        self._outputs_fn = tf.function(self._outputs, reduce_retracing=True, autograph=False)
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
                tf.function(functools.partial(graph, vectorize=True), autograph=False),
                tf.function(functools.partial(graph, vectorize=False), autograph=False),
            )
            for name, graph in self._graphs.items()
        }
        self._static_lengths: dict[str, list[int]] = {}
        self._looped: set[str] = set()
        self._unsafe_ops: dict[str, list[str]] = {}  # per vectorized function, once checked (see below)

    def _outputs(self, inputs: Any) -> tf.Tensor:
        return tf.cast(single_output(self.model(inputs, training=False)), self.dtype)

    def _output_jvp(self, inputs: Any, vectors: tf.Tensor, vectorize: bool = True) -> tf.Tensor:
        def one_vector(vector: tf.Tensor) -> tf.Tensor:
            with tf.autodiff.ForwardAccumulator(self._watched, self.unflatten(vector)) as accumulator:
                outputs = single_output(self.model(inputs, training=False))
            return tf.cast(accumulator.jvp(outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO), self.dtype)

        if vectorize:
            return tf.vectorized_map(one_vector, vectors)
        return tf.map_fn(one_vector, vectors, fn_output_signature=tf.TensorSpec(None, self.dtype))

    def _output_vjp(self, inputs: Any, cotangents: tf.Tensor, vectorize: bool = True) -> tf.Tensor:
        count = tf.shape(cotangents)[0]
        with tf.GradientTape() as tape:
            tape.watch(self._watched)
            outputs = tf.cast(single_output(self.model(inputs, training=False)), self.dtype)
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
            targets, outputs = align_legacy_targets(targets, outputs)
        return self.loss_function(targets, outputs)

    def _per_example_loss(self, inputs: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        return self._loss_from_outputs(self.model(inputs, training=False), targets, weights)

    def _loss_from_outputs(self, outputs: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        losses = tf.cast(tf.convert_to_tensor(self._call_loss(targets, outputs)), self.dtype)
        rank = losses.shape.rank
        if rank is not None and rank > 1:  # e.g. per-pixel losses: mean over the non-batch axes, like Keras
            losses = tf.reduce_mean(losses, axis=list(range(1, rank)))
        return losses * weights

    def _per_example_capture(self, mode: str) -> Any:
        """The :class:`LayerCapture` that rebuilds per-example gradients, or ``None`` (vectorized map)."""
        if mode not in ("auto", "vectorized", "layers"):
            raise ValueError(f"per_example_gradients must be 'auto', 'vectorized' or 'layers', got {mode!r}.")
        if mode == "vectorized":
            return None
        from influenciae.model.capture import LayerCapture  # capture builds on this class

        capture = LayerCapture(self)  # type: ignore[arg-type]
        # an Embedding's per-example gradient from the capture is a dense one-hot product: the tape is cheaper
        missing = list(capture.uncovered_weight_names)
        missing += [name for block in capture.layers if block.kind == "embedding" for name in block.weight_names]
        if not missing:
            # measured (docs/benchmarks.md §1): the capture wins where pfor loops over the examples (convolutions'
            # filter gradients) and loses to the vectorized map's batched matmuls on Dense-only models
            convolutional = any(block.kind.startswith("conv") for block in capture.layers)
            return capture if mode == "layers" or convolutional else None
        if mode == "layers":
            raise ValueError(
                "per_example_gradients='layers' needs every watched weight in a Dense, EinsumDense or Conv1D/2D "
                f"layer (channels last, no groups); these are not: {missing}. Use per_example_gradients='auto'."
            )
        return None

    def _jacobian(self, inputs: Any, targets: Any, weights: tf.Tensor, vectorize: bool = True) -> tf.Tensor:
        if vectorize and self._layer_capture is not None:
            try:
                return tf.cast(self._layer_capture.covered_gradients(inputs, targets, weights), self.gradient_dtype)
            except (ValueError, TypeError, NotImplementedError) as error:  # raised while tracing the capture
                self._layer_capture = None
                warnings.warn(
                    "InfluenceModel: per-sample gradients from the layer structure failed to build "
                    f"({_first_line(error)}); using the vectorized map instead (per_example_gradients='vectorized').",
                    RuntimeWarning,
                    stacklevel=2,
                )

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
        terms = [tf.cast(term, self.dtype) for term in regularization_terms(self.model)]
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
        return bool(regularization_terms(self.model))

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


_MAX_EXACT_LENGTHS = 6  # distinct padded lengths traced exactly per axis before falling back to powers of two


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


def _concat_batches(blocks: list[tf.Tensor]) -> tf.Tensor:
    if not blocks:
        raise ValueError("The dataset is empty: there is nothing to compute.")
    return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=0)
