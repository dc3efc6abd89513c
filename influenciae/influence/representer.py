"""Representer point selection: RPS-L2 (Yeh et al., 2018) and RPS-LJE (Sui, Wu & Wang, 2021).

Both methods split the model into a feature extractor ``x ↦ f(x)`` (everything before the last ``Dense`` layer) and
that last layer, ``logits(x) = Θᵀ f̃(x)``, where ``f̃ = [f, 1]`` when the layer has a bias (the bias is the weight of
a constant feature, ``Θ = [kernel; bias]``, flattened kernel first like :class:`InfluenceModel`) and ``f̃ = f``
otherwise. A training example ``z_i`` gets a score for a test example ``x`` such that the scores of all training
examples **sum to a pre-activation output** of a last layer: the representer decomposition.

Which output is explained (``explained_class``):

* ``"prediction"`` (default, as in Yeh et al. and Influenciae): the class the model predicts for ``x``, the argmax
  of its pre-activation outputs. For a single-output binary classifier (one logit ``s``), the predicted class is 1
  when ``s > 0`` and the explained quantity is the log-odds of that class, ``+s`` or ``-s``.
* ``"label"``: the label of ``x`` (sparse or one-hot targets; ``{0, 1}`` targets for a single-output model,
  explained as ``+s`` or ``-s`` likewise).
* an ``int`` ``k``: output unit ``k`` itself, unsigned (e.g. ``0`` for a regression output).

Write ``s · e_c`` for the explained output of ``x`` (unit ``c``, sign ``s = ±1``). Sign, in every case: a positive
score means the training example is **excitatory**, a proponent: it pushes the explained output of ``x`` up (towards
its explained class); negative scores are inhibitory (opponents). ``ORDER.DESCENDING`` lists proponents first. Each
class documents its scale.

The last layer's computations (losses, gradients, Hessian-vector products) run on the training features, computed
once and kept in memory (``N × D`` values); the Hessian is inverted by the library's solvers, through an operator.
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from influenciae._backend import keras_module_of, tf
from influenciae.cache import fingerprint_arrays
from influenciae.data import check_dataset, unpack_batch
from influenciae.hessian import (
    ConjugateGradientDescentIHVP,
    InverseHessianVectorProduct,
    RowOperator,
    resolve_solver,
)
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.model import InfluenceModel
from influenciae.model.selection import last_dense_layer

__all__ = ["RepresenterPointL2", "RepresenterPointLJE"]

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
    """``λ‖θ‖²`` in closed form, in θ's dtype (``keras.regularizers.L2`` would round λ to float32)."""

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
        self._value_and_gradient = tf.function(self._value_and_gradient_graph, reduce_retracing=True)
        self._hvp = tf.function(self._hvp_graph, reduce_retracing=True)

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
        self.logit_gradients = tf.function(self._logit_gradients, reduce_retracing=True)
        self._loss_sum = tf.function(self._data_loss, reduce_retracing=True)
        self._gradient_sum = tf.function(self._data_gradient, reduce_retracing=True)
        self._hvp_sum = tf.function(self._data_hvp, reduce_retracing=True)

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
        *,
        explained_class: str | int,
        show_progress: bool,
        batches_per_shard: int,
    ) -> None:
        keras_model, loss_function = _unwrap(model, loss_function)
        layer = last_dense_layer(keras_model, at_output=True, purpose="Representer points")
        influence_model = InfluenceModel(
            keras_model, weights_to_watch=layer.trainable_weights, loss_function=loss_function
        )
        super().__init__(influence_model, show_progress=show_progress, batches_per_shard=batches_per_shard)
        check_dataset(train_set, name="train_set")
        self.layer = layer
        self.use_bias = bool(layer.use_bias)
        self.num_outputs = int(layer.kernel.shape[-1])
        self.explained_class = _check_explained_class(explained_class, self.num_outputs)
        self._extractor = _feature_extractor(keras_model, layer)
        # the model's last layer when the calculator was built: the trained weights, and the predicted class
        self.trained_weights = tf.identity(self.model.get_weights_vector())
        self._validate_first_batch(train_set)
        self._chunks = self._collect_features(train_set)
        self.num_train = sum(int(chunk[0].shape[0]) for chunk in self._chunks)

    # ------------------------------------------------------------------ shared pieces

    def _objective(self, penalty: _Penalty | None) -> _LastLayerObjective:
        return _LastLayerObjective(
            self._chunks, self.num_outputs, self.layer.activation, self.model.loss_function, penalty
        )

    def _features(self, inputs: Any) -> tf.Tensor:
        """``f̃(x)`` ``[B, D̃]``: the features entering the last layer, with a trailing 1 if it has a bias."""
        features = tf.cast(self._extractor(inputs, training=False), self.model.dtype)
        if features.shape.rank != 2:
            raise ValueError(
                f"The last Dense layer receives features of shape {tuple(features.shape)}; representer points need "
                "one feature vector per example ([batch, features]). Flatten or pool before the last Dense layer."
            )
        if self.use_bias:
            features = tf.concat([features, tf.ones_like(features[:, :1])], axis=1)
        return features

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
        for batch in self._progress(train_set, "features"):
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
        expected = tf.cast(self.model.model(inputs, training=False), self.model.dtype)
        rebuilt = self.layer.activation(self._logits(self.trained_weights, features))
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


class RepresenterPointL2(_RepresenterCalculator):
    """Representer point selection with an L2-regularized last layer (Yeh, Kim, Yen & Ravikumar, NeurIPS 2018).

    The last layer is refit, from the model's weights, to a stationary point ``Θ*`` of

        R(Θ) = (1/N) Σ_i w_i ℓ(y_i, act(Θᵀ f̃_i)) + λ ‖Θ‖²

    (Newton's method with conjugate-gradient steps, to a relative gradient of ``tolerance``; weights that are
    already stationary are kept). Stationarity, ``2λΘ* = -(1/N) Σ_i f̃_i (w_i ∂ℓ_i/∂logits_i)ᵀ``, is the
    representer theorem:

        Θ*ᵀ f̃(x) = Σ_i α_i f̃_iᵀ f̃(x),      α_i = -w_i / (2λN) · ∂ℓ(z_i)/∂logits_i   ∈ R^C.

    The bias is the weight of the constant feature 1 and is penalized like the kernel: that is what puts it inside
    the sum (an unpenalized bias would stay outside it). The model's own regularizers are replaced by the penalty.
    ``loss_function`` sees the true labels; to follow Yeh et al., who fit the model's own predicted probabilities,
    pass a ``train_set`` whose targets are those probabilities and a loss that accepts soft targets.

    Sign and scale: the score of training example ``z_i`` for test example ``x`` is the representer value

        score(z_i, x) = s · α_{i,c} · f̃_iᵀ f̃(x)

    for the explained output ``s · e_c`` of ``x`` (module docstring). Positive = excitatory (a proponent: it pushes
    the explained logit of ``x`` up). The scores of the ``N`` training examples sum to ``s`` times the explained
    logit of the refit layer (:meth:`surrogate_logits`), in logit units, up to the stationarity residual
    (``fit_info["relative_gradient"]`` bounds the relative error). The score is also
    ``-1/(2λN) ∇_Θ ℓ(z_i) · ∇_Θ (s · logit_c(x))``: an influence function whose Hessian is the penalty's ``2λI``.
    Self-influence is ``s · α_{i,c} ‖f̃_i‖²`` with the class of ``z_i`` picked the same way; with
    ``explained_class="label"`` and cross-entropy it is ``w_i (1 - p_{y_i}) ‖f̃_i‖² / (2λN) ≥ 0``, large for
    examples the model gets wrong, so mislabeled examples rank high. :meth:`global_importance` returns the ``α_i``.

    Influence vectors are ``[α_i, f̃_i]`` (``C + D̃`` numbers rather than the ``C·D̃`` of an equivalent dot
    product), scored by :meth:`_inner`; top-k therefore uses the engine's exact brute-force search (no
    ``nearest_neighbors`` strategy).

    Args:
        model: A trained Keras model (Sequential or functional) that ends with a ``Dense`` layer, or an
            :class:`InfluenceModel` wrapping one (its loss is used when ``loss_function`` is None).
        train_set: The batched training set ``(inputs, targets[, sample_weight])``.
        loss_function: Per-example loss ``(y_true, y_pred) -> [batch]`` on the model's outputs (after the last
            layer's activation), or None for the compiled (or InfluenceModel's) loss.
        lambda_regularization: λ > 0 of the penalty ``λ‖Θ‖²``.
        explained_class: ``"prediction"``, ``"label"`` or an output index (module docstring).
        tolerance: Stop when ``‖∇R(Θ)‖ ≤ tolerance · 2λ‖Θ‖``, the relative error of ``Θ = Σ_i f̃_i α_iᵀ``.
            None: ``eps^(2/3)`` of the model's dtype (3.7e-11 in float64, 5e-5 in float32).
        max_iterations: Most Newton steps.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Attributes:
        fitted_weights: ``Θ*`` flattened like the layer's weights (kernel, then bias) ``[nb_params]``.
        fit_info: ``{"iterations", "relative_gradient", "converged"}`` of the refit.
        trained_weights: The model's own last-layer weights (they pick the predicted class).

    Example:
        >>> rps = RepresenterPointL2(model, train_ds, loss_fn, lambda_regularization=1e-3)
        >>> indices, values = rps.most_influential(test_ds, train_ds, k=5)  # excitatory examples first
    """

    method_name = "representer_l2"

    def __init__(
        self,
        model: Any,
        train_set: tf.data.Dataset,
        loss_function: Any,
        lambda_regularization: float,
        *,
        explained_class: str | int = "prediction",
        tolerance: float | None = None,
        max_iterations: int = 50,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        if (
            isinstance(lambda_regularization, bool)
            or not isinstance(lambda_regularization, (int, float, np.floating))
            or not math.isfinite(lambda_regularization)
            or lambda_regularization <= 0
        ):
            raise ValueError(
                f"lambda_regularization must be a positive finite number (the λ of λ‖Θ‖²), got "
                f"{lambda_regularization!r}: the representer theorem divides by it, α_i = -∂ℓ_i/∂logits / (2λN)."
            )
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
            raise ValueError(f"max_iterations must be a non-negative integer, got {max_iterations!r}.")
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance!r}.")
        super().__init__(
            model,
            train_set,
            loss_function,
            explained_class=explained_class,
            show_progress=show_progress,
            batches_per_shard=batches_per_shard,
        )
        self.lambda_regularization = float(lambda_regularization)
        epsilon = float(np.finfo(self.model.dtype.as_numpy_dtype).eps)
        self.tolerance = epsilon ** (2 / 3) if tolerance is None else float(tolerance)
        self.max_iterations = max_iterations
        self.objective = self._objective(_SquaredNorm(self.lambda_regularization))
        self.fitted_weights, self.fit_info = self._fit(self.trained_weights)

    # ------------------------------------------------------------------ the refit

    def _relative_gradient(self, gradient: tf.Tensor, theta: tf.Tensor) -> float:
        scale = 2.0 * self.lambda_regularization * float(tf.norm(theta))
        norm = float(tf.norm(gradient))
        return norm / scale if scale > 0 else (0.0 if norm == 0 else math.inf)

    def _fit(self, theta: tf.Tensor) -> tuple[tf.Tensor, dict[str, Any]]:
        """Newton's method (CG directions) with a backtracking line search on R(Θ)."""
        epsilon = float(np.finfo(self.model.dtype.as_numpy_dtype).eps)
        gradient = self.objective.gradient(theta)
        first_norm = max(float(tf.norm(gradient)), epsilon)
        relative = self._relative_gradient(gradient, theta)
        iterations = 0
        while relative > self.tolerance and iterations < self.max_iterations:
            # inexact Newton: solve H d = g to a relative residual that shrinks with the gradient
            solver = ConjugateGradientDescentIHVP(
                None,
                operator=_LastLayerHessian(self.objective, theta),
                tolerance=max(min(0.5, math.sqrt(float(tf.norm(gradient)) / first_norm)), 100 * epsilon),
            )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    direction = solver.solve(gradient[None])[0]
            except ValueError:  # a loss that is not convex in the logits: fall back to the gradient
                direction = gradient
            candidate = self._line_search(theta, gradient, direction)
            if candidate is None:  # no decrease left at this precision
                break
            theta, gradient = candidate
            relative = self._relative_gradient(gradient, theta)
            iterations += 1
        converged = relative <= self.tolerance
        if not converged:
            warnings.warn(
                f"RepresenterPointL2: the refit of the last layer stopped after {iterations} Newton steps with "
                f"‖∇R‖/(2λ‖Θ‖) = {relative:.2e} > tolerance {self.tolerance:.1e}; the representer decomposition "
                "holds to that relative accuracy. Raise max_iterations or lambda_regularization, or use float64.",
                RuntimeWarning,
                stacklevel=3,
            )
        return theta, {"iterations": iterations, "relative_gradient": relative, "converged": converged}

    def _line_search(
        self, theta: tf.Tensor, gradient: tf.Tensor, direction: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor] | None:
        value = self.objective.value(theta)
        slope = float(tf.reduce_sum(gradient * direction))
        step = 1.0
        while step > 1e-10:
            candidate = theta - step * direction
            if self.objective.value(candidate) <= value - 1e-4 * step * slope:
                return candidate, self.objective.gradient(candidate)
            if step == 1.0:
                # near the optimum R changes below its rounding error: accept the Newton step on the gradient norm
                new_gradient = self.objective.gradient(candidate)
                if float(tf.norm(new_gradient)) < 0.5 * float(tf.norm(gradient)):
                    return candidate, new_gradient
            step /= 2
        return None

    # ------------------------------------------------------------------ α and the hooks

    def _alpha(self, features: tf.Tensor, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        """``α_i = -w_i/(2λN) ∂ℓ_i/∂logits_i`` ``[B, C]`` at the refit weights."""
        gradients = self.objective.logit_gradients(self.fitted_weights, features, targets, weights)
        return -gradients / (2.0 * self.lambda_regularization * self.num_train)

    def global_importance(self, train_set: tf.data.Dataset) -> np.ndarray:
        """The representer weights ``α_i`` of training examples (Yeh et al.'s global sample importance).

        Args:
            train_set: Batched training dataset (the one the last layer was refit on, or part of it).

        Returns:
            Array ``[N, num_outputs]`` in dataset order.
        """
        check_dataset(train_set, name="train_set")
        rows = [self._alpha(*self._parts(batch)).numpy() for batch in train_set]
        return np.concatenate(rows) if rows else np.zeros([0, self.num_outputs])

    def _surrogate_weights(self) -> tf.Tensor:
        return self.fitted_weights

    def _configuration(self) -> dict[str, Any]:
        return {**self._base_configuration(), "lambda_regularization": self.lambda_regularization}

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        features, targets, weights = self._parts(batch)
        return tf.concat([self._alpha(features, targets, weights), features], axis=1)

    def _transforms(self, batch: Any) -> tf.Tensor:
        features, targets, _ = self._parts(batch)
        return tf.concat([self._directions(features, targets), features], axis=1)

    def _inner(self, transforms: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        classes = self.num_outputs
        signed_alpha = tf.matmul(transforms[:, :classes], vectors[:, :classes], transpose_b=True)  # s · α_{i,c}
        kernel = tf.matmul(transforms[:, classes:], vectors[:, classes:], transpose_b=True)  # f̃(x) · f̃_i
        return signed_alpha * kernel

    def _self_influence(self, batch: Any) -> tf.Tensor:
        features, targets, weights = self._parts(batch)
        signed_alpha = tf.reduce_sum(self._directions(features, targets) * self._alpha(features, targets, weights), 1)
        return signed_alpha * tf.reduce_sum(tf.square(features), axis=1)


class RepresenterPointLJE(_RepresenterCalculator):
    """Representer points via a local Jacobian expansion (Sui, Wu & Wang, NeurIPS 2021: RPS-LJE).

    No refit: the trained last layer ``θ̂`` is moved one gradient-ascent step away, ``θ₀ = θ̂ + η ∇R(θ̂)``, and the
    first-order expansion of the gradient around ``θ₀`` (one Newton step back) decomposes the last layer:

        θ_N = θ₀ - H⁻¹ ∇R(θ₀) = Σ_i (1/N) [θ₀ - H⁻¹∇Ω(θ₀) - H⁻¹ ∇(w_i ℓ_i)(θ₀)],

    where ``R = (1/N) Σ_i w_i ℓ_i + Ω`` is the last layer's training objective (``Ω`` its own weight regularizers,
    often none), ``H = ∇²R(θ₀) + damping·I`` (inverted by ``ihvp_calculator``) and ``η = step_size`` (Sui et al. take
    one step of gradient ascent; ``step_size=0`` expands at ``θ̂`` itself). The influence vector of ``z_i`` is its
    term of that sum (``[nb_params]`` of the last layer); the transform of ``x`` is ``s·∇_θ logit_c(x)``, that is
    ``s·vec(f̃(x) e_cᵀ)``, so scores are dot products and every top-k strategy applies.

    Sign and scale: the score of training example ``z_i`` for test example ``x`` is

        score(z_i, x) = s·[(θ₀ - H⁻¹∇Ω(θ₀))ᵀ f̃(x)]_c / N  -  s·∇_θ logit_c(x)ᵀ H⁻¹ ∇(w_i ℓ_i)(θ₀) / N.

    The first term is the same for every training example (an equal share of the expansion point's output); the
    second is the first-order change of the explained logit of ``x`` when ``z_i`` is up-weighted by ``1/N``.
    Positive = excitatory (a proponent). The scores of the ``N`` training examples sum exactly to ``s`` times the
    explained logit of the Newton-step layer ``θ_N`` (:meth:`surrogate_logits`), in logit units; ``θ_N = θ̂`` when
    ``step_size=0`` and ``θ̂`` is a stationary point of ``R``, and ``θ_N - θ̂ = O(η²)`` near one.

    ``H`` must be invertible. A softmax layer whose bias is not regularized has a singular Hessian (adding the same
    constant to every logit changes no probability; likewise for kernel columns without a penalty): pass
    ``damping > 0`` there. The exact solver may not notice a matrix that is singular only up to rounding.

    Args:
        model: A trained Keras model (Sequential or functional) that ends with a ``Dense`` layer, or an
            :class:`InfluenceModel` wrapping one.
        train_set: The batched training set ``(inputs, targets[, sample_weight])``.
        loss_function: Per-example loss on the model's outputs, or None for the compiled (or InfluenceModel's) loss.
        step_size: η of the gradient-ascent step away from the trained weights.
        ihvp_calculator: Name of the solver of the last layer's Hessian: ``"exact"`` (default: a last layer is
            usually small), ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
        damping: δ ≥ 0 added to that Hessian; None (default) keeps the solver's default (the exact solver's
            ``"auto"``: none unless the Hessian is singular, then 1e-3 of its mean eigenvalue).
        ihvp_options: Other options of the solver (e.g. ``{"tolerance": 1e-10}`` for CG).
        explained_class: ``"prediction"``, ``"label"`` or an output index (module docstring).
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Attributes:
        expansion_point: ``θ₀`` ``[nb_params]``, flattened like the layer's weights (kernel, then bias).
        trained_weights: ``θ̂``, the model's own last-layer weights.
        ihvp: The solver of ``H``.

    Example:
        >>> lje = RepresenterPointLJE(model, train_ds, loss_fn, step_size=1e-2)
        >>> scores = lje.influence_matrix(test_ds, train_ds)  # rows sum to the explained logits
    """

    method_name = "representer_lje"

    def __init__(
        self,
        model: Any,
        train_set: tf.data.Dataset,
        loss_function: Any = None,
        *,
        step_size: float = 1e-2,
        ihvp_calculator: str = "exact",
        damping: float | None = None,
        ihvp_options: dict[str, Any] | None = None,
        explained_class: str | int = "prediction",
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not math.isfinite(step_size):
            raise ValueError(f"step_size must be a finite number, got {step_size!r}.")
        if not isinstance(ihvp_calculator, str):
            raise TypeError(
                "ihvp_calculator must be a solver name ('exact', 'cg', 'lissa', 'arnoldi'): the solver works on the "
                f"last layer's Hessian at the expansion point, which this calculator builds; got {ihvp_calculator!r}."
            )
        super().__init__(
            model,
            train_set,
            loss_function,
            explained_class=explained_class,
            show_progress=show_progress,
            batches_per_shard=batches_per_shard,
        )
        self.step_size = float(step_size)
        self.objective = self._objective(_layer_penalty(self.layer, self.use_bias))
        self.expansion_point = self.trained_weights + self.step_size * self.objective.gradient(self.trained_weights)
        self.ihvp: InverseHessianVectorProduct = resolve_solver(  # the solver only sees the operator
            ihvp_calculator,
            self.model,
            None,
            damping=damping,
            operator=_LastLayerHessian(self.objective, self.expansion_point),
            **(ihvp_options or {}),
        )
        constant = self.expansion_point
        regularization_gradient = self.objective.penalty_gradient(self.expansion_point)
        if float(tf.norm(regularization_gradient)) > 0:
            constant -= self.ihvp.solve(regularization_gradient[None])[0]
        self._constant = constant / self.num_train
        self._newton_weights: tf.Tensor | None = None

    def _surrogate_weights(self) -> tf.Tensor:
        if self._newton_weights is None:
            step = self.ihvp.solve(self.objective.gradient(self.expansion_point)[None])[0]
            self._newton_weights = self.expansion_point - step
        return self._newton_weights

    def _configuration(self) -> dict[str, Any]:
        return {**self._base_configuration(), "step_size": self.step_size, "ihvp": self.ihvp.configuration()}

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        gradients = self.objective.per_example_gradients(self.expansion_point, *self._parts(batch))
        return self._constant[None] - self.ihvp.solve(gradients) / self.num_train

    def _transforms(self, batch: Any) -> tf.Tensor:
        features, targets, _ = self._parts(batch)
        directions = self._directions(features, targets)
        return tf.reshape(features[:, :, None] * directions[:, None, :], [tf.shape(features)[0], -1])


# ---------------------------------------------------------------------- helpers


def _unwrap(model: Any, loss_function: Any) -> tuple[Any, Any]:
    if isinstance(model, InfluenceModel):
        return model.model, model.loss_function if loss_function is None else loss_function
    return model, loss_function


def _feature_extractor(model: Any, layer: Any) -> Any:
    try:
        inputs = model.inputs  # a list: Sequential models have no structured `model.input`
        if len(inputs) == 1:
            inputs = inputs[0]
        else:
            with contextlib.suppress(AttributeError, ValueError):
                inputs = model.input  # keeps a functional model's dict or nested input structure
        return keras_module_of(model).Model(inputs, layer.input)
    except (AttributeError, ValueError, TypeError) as error:
        raise ValueError(
            "Representer points read the features entering the last Dense layer, which needs a Sequential or "
            f"functional model with a defined input ({type(error).__name__}: {error}). Rebuild subclassed models "
            "with the functional API."
        ) from error


def _layer_penalty(layer: Any, use_bias: bool) -> _Penalty | None:
    """``Ω(θ)`` from the last layer's own weight regularizers, on its flat weights (kernel, then bias)."""
    kernel_regularizer = getattr(layer, "kernel_regularizer", None)
    bias_regularizer = getattr(layer, "bias_regularizer", None) if use_bias else None
    if kernel_regularizer is None and bias_regularizer is None:
        return None
    return _LayerRegularizers(kernel_regularizer, bias_regularizer, tuple(int(d) for d in layer.kernel.shape))


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
