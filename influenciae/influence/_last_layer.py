"""The last layer of a representer-point model: its training objective, Hessian and the shared calculator base.

:class:`_RepresenterCalculator` splits the model at its last Dense layer (a :class:`~influenciae.model.graph.DenseHead`)
and keeps the training features; :class:`_LastLayerObjective` is the last layer's objective on them (losses,
gradients, Hessian-vector products), :class:`_LastLayerHessian` its Hessian as a solver operator. The two methods
built on them are in :mod:`influenciae.influence.representer`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.cache import fingerprint_arrays
from influenciae.data import check_dataset, unpack_batch
from influenciae.hessian import (
    RowOperator,
)
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.model import InfluenceModel
from influenciae.model.graph import DenseHead

_Chunk = tuple[tf.Tensor, Any, tf.Tensor]  # (augmented features [b, D̃], targets, sample weights [b])
_EXAMPLES_PER_CHUNK = 1024
_VECTORS_PER_CHUNK = 16


class _Penalty:
    """A weight penalty ``Ω(θ)`` on the flat last-layer weights, with its gradient and Hessian-vector products."""

    def value(self, theta: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def gradient(self, theta: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def hvp(self, theta: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError


class _SquaredNorm(_Penalty):
    """``λ‖θ‖²`` in closed form, in θ's dtype (a Keras L2 regularizer would round λ to float32)."""

    def __init__(self, factor: float) -> None:
        self.factor = float(factor)

    def value(self, theta: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.factor, theta.dtype) * tf.reduce_sum(tf.square(theta))

    def gradient(self, theta: tf.Tensor) -> tf.Tensor:
        return tf.cast(2.0 * self.factor, theta.dtype) * theta

    def hvp(self, theta: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        return tf.cast(2.0 * self.factor, theta.dtype) * vectors


class _LayerRegularizers(_Penalty):
    """The last layer's own ``kernel_regularizer``/``bias_regularizer``, differentiated automatically."""

    def __init__(self, kernel_regularizer: Any, bias_regularizer: Any, kernel_shape: tuple[int, ...]) -> None:
        self.kernel_regularizer = kernel_regularizer
        self.bias_regularizer = bias_regularizer
        self.kernel_shape = kernel_shape
        self.kernel_size = int(np.prod(kernel_shape))
        self._value_and_gradient = tf.function(self._value_and_gradient_graph, reduce_retracing=True, autograph=False)
        self._hvp = tf.function(self._hvp_graph, reduce_retracing=True, autograph=False)

    def value(self, theta: tf.Tensor) -> tf.Tensor:
        return self._value_and_gradient(theta)[0]

    def gradient(self, theta: tf.Tensor) -> tf.Tensor:
        return self._value_and_gradient(theta)[1]

    def hvp(self, theta: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        return self._hvp(theta, vectors)

    def _total(self, theta: tf.Tensor) -> tf.Tensor:
        total = tf.zeros([], theta.dtype)
        if self.kernel_regularizer is not None:
            kernel = tf.reshape(theta[: self.kernel_size], self.kernel_shape)
            total += tf.cast(self.kernel_regularizer(kernel), theta.dtype)
        if self.bias_regularizer is not None:
            total += tf.cast(self.bias_regularizer(theta[self.kernel_size :]), theta.dtype)
        return total

    def _value_and_gradient_graph(self, theta: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(theta)
            value = self._total(theta)
        return value, tape.gradient(value, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _hvp_graph(self, theta: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as outer:
            outer.watch(theta)
            gradient = self._value_and_gradient_graph(theta)[1]
            projections = tf.linalg.matvec(vectors, gradient)  # [n] = V · ∇Ω
        products = outer.jacobian(projections, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.reshape(products, tf.shape(vectors))


class _LastLayerObjective:
    """``R(θ) = (1/N) Σ_i w_i ℓ(y_i, act(Θᵀ f̃_i)) + Ω(θ)`` over in-memory features, ``θ = vec(Θ)``, ``Θ [D̃, C]``.

    Everything goes through the logits: ``g_i = w_i ∂ℓ_i/∂logits_i`` gives the gradients (``∇_θ (w_i ℓ_i) =
    vec(f̃_i g_iᵀ)``) and its forward-mode derivative along ``F̃V`` gives Hessian-vector products, for a block of
    vectors at once (the examples are repeated once per vector, so no per-vector loop or ``pfor`` is needed).
    """

    def __init__(
        self,
        chunks: list[_Chunk],
        num_outputs: int,
        activation: Callable[[tf.Tensor], tf.Tensor],
        loss_function: Any,
        penalty: _Penalty | None,
    ) -> None:
        self.chunks = chunks
        self.num_train = sum(int(chunk[0].shape[0]) for chunk in chunks)
        self.num_outputs = num_outputs
        self.activation = activation
        self.loss_function = loss_function
        self.penalty = penalty
        self.logit_gradients = tf.function(self._logit_gradients, reduce_retracing=True, autograph=False)
        self._loss_sum = tf.function(self._data_loss, reduce_retracing=True, autograph=False)
        self._gradient_sum = tf.function(self._data_gradient, reduce_retracing=True, autograph=False)
        self._hvp_sum = tf.function(self._data_hvp, reduce_retracing=True, autograph=False)

    def value(self, theta: tf.Tensor) -> float:
        """``R(θ)``."""
        total = sum(float(self._loss_sum(theta, *chunk)) for chunk in self.chunks) / self.num_train
        return total + (0.0 if self.penalty is None else float(self.penalty.value(theta)))

    def gradient(self, theta: tf.Tensor) -> tf.Tensor:
        """``∇R(θ)`` ``[P]``."""
        total = tf.add_n([self._gradient_sum(theta, *chunk) for chunk in self.chunks]) / self.num_train
        return total + self.penalty_gradient(theta)

    def penalty_gradient(self, theta: tf.Tensor) -> tf.Tensor:
        """``∇Ω(θ)`` ``[P]``."""
        return tf.zeros_like(theta) if self.penalty is None else self.penalty.gradient(theta)

    def hvp(self, theta: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        """``∇²R(θ) v`` for each row of ``vectors`` ``[n, P]``."""
        parts = []
        for start in range(0, int(vectors.shape[0]), _VECTORS_PER_CHUNK):
            block = vectors[start : start + _VECTORS_PER_CHUNK]
            total = tf.add_n([self._hvp_sum(theta, block, *chunk) for chunk in self.chunks]) / self.num_train
            parts.append(total if self.penalty is None else total + self.penalty.hvp(theta, block))
        return tf.concat(parts, axis=0) if parts else tf.zeros_like(vectors)

    def per_example_gradients(
        self, theta: tf.Tensor, features: tf.Tensor, targets: Any, weights: tf.Tensor
    ) -> tf.Tensor:
        """``∇_θ (w_i ℓ_i)`` ``[B, P]``."""
        gradients = self.logit_gradients(theta, features, targets, weights)
        return tf.reshape(features[:, :, None] * gradients[:, None, :], [tf.shape(features)[0], -1])

    # ------------------------------------------------------------------ graph-side implementations

    def _logits(self, theta: tf.Tensor, features: tf.Tensor) -> tf.Tensor:
        return tf.matmul(features, tf.reshape(theta, [-1, self.num_outputs]))

    def _gradients_at(self, logits: tf.Tensor, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(logits)
            total = tf.reduce_sum(_per_example_loss(self.loss_function, targets, self.activation(logits), weights))
        return tape.gradient(total, logits, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _logit_gradients(self, theta: tf.Tensor, features: tf.Tensor, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        return self._gradients_at(self._logits(theta, features), targets, weights)

    def _data_loss(self, theta: tf.Tensor, features: tf.Tensor, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        activations = self.activation(self._logits(theta, features))
        return tf.reduce_sum(_per_example_loss(self.loss_function, targets, activations, weights))

    def _data_gradient(self, theta: tf.Tensor, features: tf.Tensor, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        gradients = self._logit_gradients(theta, features, targets, weights)
        return tf.reshape(tf.matmul(features, gradients, transpose_a=True), [-1])

    def _data_hvp(
        self, theta: tf.Tensor, vectors: tf.Tensor, features: tf.Tensor, targets: Any, weights: tf.Tensor
    ) -> tf.Tensor:
        count, size = tf.shape(vectors)[0], tf.shape(features)[0]
        directions = tf.reshape(vectors, [count, -1, self.num_outputs])  # [n, D̃, C]
        tangents = tf.reshape(tf.einsum("bd,ndc->nbc", features, directions), [count * size, self.num_outputs])
        logits = tf.tile(self._logits(theta, features), [count, 1])  # examples repeated once per vector
        repeated = tf.nest.map_structure(lambda t: tf.tile(t, tf.one_hot(0, tf.rank(t), count, 1)), targets)
        with tf.autodiff.ForwardAccumulator(logits, tangents) as accumulator:
            gradients = self._gradients_at(logits, repeated, tf.tile(weights, [count]))
        curvature = tf.reshape(accumulator.jvp(gradients), [count, size, self.num_outputs])  # w_i A_i (F̃V)_i
        return tf.reshape(tf.einsum("bd,nbc->ndc", features, curvature), [count, -1])


class _LastLayerHessian(RowOperator):
    """``∇²R(θ)`` of a :class:`_LastLayerObjective` at fixed weights, for the library's inverse-HVP solvers."""

    def __init__(self, objective: _LastLayerObjective, theta: tf.Tensor) -> None:
        self.objective = objective
        self.theta = tf.identity(theta)
        super().__init__(
            int(theta.shape[0]), theta.dtype, "LastLayerHessian", parameters={"objective": objective, "theta": theta}
        )

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        return self.objective.hvp(self.theta, vectors)


class _RepresenterCalculator(BaseInfluenceCalculator):
    """What both representer methods share: the model split, the features and the explained output."""

    def __init__(
        self,
        model: Any,
        train_set: tf.data.Dataset,
        loss_function: Any,
        explained_class: str | int,
        show_progress: bool,
        batches_per_shard: int,
    ) -> None:
        keras_model, loss_function = _unwrap(model, loss_function)
        self.head = DenseHead(keras_model, at_output=True, purpose="Representer points")
        influence_model = InfluenceModel(
            keras_model, weights_to_watch=self.head.trainable_weights, loss_function=loss_function
        )
        super().__init__(influence_model, show_progress=show_progress, batches_per_shard=batches_per_shard)
        check_dataset(train_set, name="train_set")
        self.layer = self.head.layer
        self.use_bias = self.head.use_bias
        self.num_outputs = self.head.num_outputs
        self.explained_class = _check_explained_class(explained_class, self.num_outputs)
        # the model's last layer when the calculator was built: the trained weights, and the predicted class
        self.trained_weights = tf.identity(self.model.get_weights_vector())
        self._chunks = self._collect_features(train_set)
        self.num_train = sum(int(chunk[0].shape[0]) for chunk in self._chunks)

    # ------------------------------------------------------------------ shared pieces

    def _objective(self, penalty: _Penalty | None) -> _LastLayerObjective:
        return _LastLayerObjective(
            self._chunks, self.num_outputs, self.head.activation, self.model.loss_function, penalty
        )

    def _features(self, inputs: Any) -> tf.Tensor:
        """``f̃(x)`` ``[B, D̃]``: the features entering the last layer, with a trailing 1 if it has a bias."""
        return self.head.features(inputs, self.model.dtype, augment=True)

    def _parts(self, batch: Any) -> _Chunk:
        structure = unpack_batch(batch)
        features = self._features(structure.inputs)
        if structure.sample_weight is None:
            weights = tf.ones([tf.shape(features)[0]], self.model.dtype)
        else:
            weights = tf.cast(tf.reshape(structure.sample_weight, [-1]), self.model.dtype)
        return features, tf.nest.map_structure(tf.convert_to_tensor, structure.targets), weights

    def _collect_features(self, train_set: tf.data.Dataset) -> list[_Chunk]:
        parts = []
        for _, batch in self._stream(train_set, "train_set").batches(self._bar("features")):
            parts.append(self._parts(batch))
            if len(parts) == 1:
                self._check_split(unpack_batch(batch).inputs, parts[0][0])
        if not parts:
            raise ValueError("train_set is empty.")
        features, targets, weights = (
            tf.nest.map_structure(lambda *tensors: tf.concat(tensors, axis=0), *column)
            for column in zip(*parts, strict=True)
        )
        return [
            tf.nest.map_structure(lambda t, s=start: t[s : s + _EXAMPLES_PER_CHUNK], (features, targets, weights))
            for start in range(0, int(features.shape[0]), _EXAMPLES_PER_CHUNK)
        ]

    def _check_split(self, inputs: Any, features: tf.Tensor) -> None:
        """The model's output must be its last Dense layer applied to the extracted features."""
        expected = self.model.outputs(inputs)
        rebuilt = self.head.activation(self._logits(self.trained_weights, features))
        if expected.shape != rebuilt.shape or not np.allclose(rebuilt.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"The model's output (shape {tuple(expected.shape)}) is not its last Dense layer applied to the "
                "features entering it: representer points need a model that ends with that Dense layer."
            )

    def _logits(self, theta: tf.Tensor, features: tf.Tensor) -> tf.Tensor:
        return tf.matmul(features, tf.reshape(theta, [-1, self.num_outputs]))

    def _directions(self, features: tf.Tensor, targets: Any) -> tf.Tensor:
        """``s · e_c`` ``[B, C]``: the explained output unit ``c`` of each example and its sign ``s = ±1``."""
        dtype = self.model.dtype
        size = tf.shape(features)[0]
        if isinstance(self.explained_class, int):
            return tf.tile(tf.one_hot([self.explained_class], self.num_outputs, dtype=dtype), [size, 1])
        if self.explained_class == "prediction":
            logits = self._logits(self.trained_weights, features)
            if self.num_outputs == 1:
                return tf.where(logits > 0, tf.ones_like(logits), -tf.ones_like(logits))
            return tf.one_hot(tf.argmax(logits, axis=1), self.num_outputs, dtype=dtype)
        labels = tf.convert_to_tensor(tf.nest.flatten(targets)[0])
        if self.num_outputs == 1:
            positive = tf.reshape(tf.cast(labels, dtype), [-1, 1]) > 0.5
            return tf.where(positive, tf.ones([size, 1], dtype), -tf.ones([size, 1], dtype))
        if labels.shape.rank == 2 and labels.shape[-1] == self.num_outputs:
            classes = tf.argmax(labels, axis=1)
        else:
            classes = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        return tf.one_hot(classes, self.num_outputs, dtype=dtype)

    @abc.abstractmethod
    def _surrogate_weights(self) -> tf.Tensor:
        """The last-layer weights ``θ`` ``[nb_params]`` whose pre-activation outputs the scores sum to."""

    def surrogate_logits(self, dataset: tf.data.Dataset) -> np.ndarray:
        """Pre-activation outputs of the last layer that the decomposition reproduces.

        For every example ``x`` with explained output ``s · e_c``, the scores of all training examples sum to
        ``s · surrogate_logits(x)[c]``.

        Args:
            dataset: Batched ``(inputs, targets[, sample_weight])`` dataset.

        Returns:
            Array ``[N, num_outputs]`` in dataset order.
        """
        check_dataset(dataset, name="dataset")
        theta = self._surrogate_weights()
        rows = [self._logits(theta, self._parts(batch)[0]).numpy() for batch in dataset]
        return np.concatenate(rows) if rows else np.zeros([0, self.num_outputs])

    def _base_configuration(self) -> dict[str, Any]:
        return {
            "explained_class": self.explained_class,
            "num_train": self.num_train,
            "surrogate": fingerprint_arrays([self._surrogate_weights()]),
        }


# ---------------------------------------------------------------------- helpers


def _unwrap(model: Any, loss_function: Any) -> tuple[Any, Any]:
    if isinstance(model, InfluenceModel):
        return model.model, model.loss_function if loss_function is None else loss_function
    return model, loss_function


def _layer_penalty(head: DenseHead) -> _Penalty | None:
    """``Ω(θ)`` from the last layer's own weight regularizers, on its flat weights (kernel, then bias)."""
    kernel_regularizer, bias_regularizer = head.regularizers
    if kernel_regularizer is None and bias_regularizer is None:
        return None
    return _LayerRegularizers(kernel_regularizer, bias_regularizer, head.kernel_shape)


def _check_explained_class(explained_class: Any, num_outputs: int) -> str | int:
    if isinstance(explained_class, str) and explained_class in ("prediction", "label"):
        return explained_class
    if isinstance(explained_class, (int, np.integer)) and not isinstance(explained_class, bool):
        if 0 <= explained_class < num_outputs:
            return int(explained_class)
        raise ValueError(f"explained_class={explained_class} is out of range for {num_outputs} outputs.")
    raise ValueError(
        f"explained_class must be 'prediction', 'label' or an output index in [0, {num_outputs}), "
        f"got {explained_class!r}."
    )


def _per_example_loss(loss_function: Any, targets: Any, predictions: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """``w_i ℓ(y_i, predictions_i)`` ``[B]``, reduced over extra axes like :class:`InfluenceModel`."""
    losses = tf.cast(tf.convert_to_tensor(loss_function(targets, predictions)), predictions.dtype)
    if losses.shape.rank is not None and losses.shape.rank > 1:
        losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
    return losses * weights
