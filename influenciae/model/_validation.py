"""The checks of InfluenceModel at the boundary: a batch is validated once per signature, eagerly, with errors
that name the fix (unbatched data, targets that do not fit, a loss without reduction none, disconnected weights)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from influenciae.data import Batch, unpack_batch
from influenciae.model._autodiff import _slice
from influenciae.model._backend import tf
from influenciae.model.losses import is_keras_loss


class _Validation:
    """Mixin of :class:`~influenciae.model.InfluenceModel`: turning user batches into checked tensors."""

    if TYPE_CHECKING:
        model: Any
        loss_function: Any
        dtype: tf.DType
        nb_params: int

        @property
        def weight_names(self) -> list[str]: ...

        _watched: list[tf.Variable]
        _checked_signatures: set[str]

        def _call_loss(self, targets: Any, outputs: Any) -> Any: ...

        def _per_example_loss(self, inputs: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor: ...

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
            if len(outputs) > 1 and is_keras_loss(self.loss_function):
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
