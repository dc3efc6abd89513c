"""Checkpoints of one training run as Keras objects: loaded into one model whose weights are swapped, and the
last Dense layer's per-example features (what TracIn's calculators need from Keras, and nothing else).

:class:`StoredCheckpoints` has the interface of :class:`influenciae.influence._contexts.Contexts` (``activate(c)``
returns an :class:`~influenciae.model.InfluenceModel` computing at checkpoint ``c``); :func:`last_dense_head` is the
traced ``(inputs, targets, weights) -> (ã, g)`` of the fast TracIn variants.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from influenciae.cache.fingerprint import fingerprint_arrays, loss_identity
from influenciae.model import InfluenceModel
from influenciae.model._backend import tf, variable_tensor
from influenciae.model.graph import layer_input_model
from influenciae.model.loading import MODEL_SUFFIXES, WEIGHTS_SUFFIXES, copy_model, is_model, load_model, load_weights
from influenciae.model.selection import check_outer_product_layer, last_dense_layer

__all__ = [
    "StoredCheckpoints",
    "keras_model_and_loss",
    "weights_fingerprint",
    "fast_tracin_dense",
    "last_dense_wrap",
    "reuse_or_wrap",
    "last_dense_head",
]

Wrap = Callable[[Any, Any], InfluenceModel]  # (keras_model, loss_function or None) -> InfluenceModel
_FAST = "The fast TracIn variants"


def keras_model_and_loss(obj: Any) -> tuple[Any, Any]:
    """A Keras model and the per-example loss it carries (an InfluenceModel's resolved loss, else None)."""
    if isinstance(obj, InfluenceModel):
        return obj.model, obj.loss_function
    return obj, None


def weights_fingerprint(model: InfluenceModel) -> str:
    """A hash of all the weights of ``model``'s Keras model."""
    return fingerprint_arrays(weight.numpy() for weight in model.model.weights)


def _file_sha256(path: str) -> str:
    hasher = hashlib.sha256(b"influenciae.checkpoint_file.v1")
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


class StoredCheckpoints:
    """Checkpoints loaded one at a time into a single Keras model whose weights are swapped in place.

    One model means one traced ``tf.function`` for all checkpoints. With ``keep_in_memory`` the weights of every
    checkpoint are kept as host arrays after their first load (``C ×`` the model's weights), so each file is read
    once per calculator and switching is an in-memory assignment; without it only the active checkpoint exists.

    Args:
        specs: One entry per checkpoint: a ``.keras`` or ``.weights.h5`` path, a Keras model or InfluenceModel, or
            a callable returning one.
        wrap: Builds the InfluenceModel of the loaded Keras model.
        model_factory: Builds the architecture (required for weights files).
        keep_in_memory: Keep every checkpoint's weights after its first load.
        custom_objects: Passed to ``keras.models.load_model``.
        explicit_loss: Whether the caller brings its own loss (then files are loaded without compiling).
    """

    batches_per_load: int | None = None

    def __init__(
        self,
        specs: list[Any],
        wrap: Wrap,
        model_factory: Callable[[], Any] | None = None,
        keep_in_memory: bool = False,
        custom_objects: dict[str, Any] | None = None,
        explicit_loss: bool = False,
    ) -> None:
        if model_factory is not None and not callable(model_factory):
            raise TypeError(f"model_factory must be a callable returning a Keras model, got {model_factory!r}.")
        self._specs = [self._check_spec(index, spec) for index, spec in enumerate(specs)]
        self.keep_in_memory = bool(keep_in_memory)
        self._custom_objects = custom_objects
        self._kept: dict[int, list[np.ndarray]] = {}
        self._file_fingerprints: dict[int, tuple[tuple[int, int], str]] = {}
        self._other_fingerprints: dict[int, str] = {}
        self.loads = 0
        self.current: int | None = None
        keras_model, loss = self._build_reference(model_factory, explicit_loss)
        self._keras_model = keras_model
        self.reference = wrap(keras_model, loss)
        if self.current == 0 and self.keep_in_memory:
            self._kept[0] = [np.array(weight) for weight in keras_model.get_weights()]
        self.activate(0)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def expensive(self) -> bool:
        """Whether switching checkpoints reads a file (then passes over data go checkpoint by checkpoint)."""
        return not self.keep_in_memory

    def order(self) -> list[int]:
        """Checkpoint indices in the order to visit them, starting from the loaded one (it saves a load)."""
        start = self.current or 0
        return [(start + step) % len(self) for step in range(len(self))]

    def activate(self, index: int) -> InfluenceModel:
        """The InfluenceModel computing at checkpoint ``index`` (its weights loaded if needed)."""
        if index == self.current:
            return self.reference
        self.current = None  # a failed load leaves the weights half-assigned
        if index in self._kept:
            self._keras_model.set_weights(self._kept[index])
        else:
            self._load(index)
            if self.keep_in_memory:
                self._kept[index] = [np.array(weight) for weight in self._keras_model.get_weights()]
        self.current = index
        return self.reference

    def fingerprints(self) -> list[str]:
        """One hash per checkpoint: the SHA-256 of its file, or of its weights for models and callables."""
        return [self._fingerprint(index) for index in range(len(self))]

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_spec(index: int, spec: Any) -> Any:
        if isinstance(spec, (str, os.PathLike)):
            path = os.fspath(spec)
            if not path.endswith(MODEL_SUFFIXES + WEIGHTS_SUFFIXES):
                raise ValueError(
                    f"Checkpoint {index} ({path}) must be a .keras model file or a .weights.h5 weights file."
                )
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Checkpoint {index} ({path}) does not exist.")
            return path
        if callable(spec) or is_model(spec):
            return spec
        raise TypeError(
            f"Checkpoint {index} must be a path (.keras or .weights.h5), a Keras model or a callable returning "
            f"one, got {type(spec).__name__}."
        )

    def _build_reference(self, model_factory: Callable[[], Any] | None, explicit_loss: bool) -> tuple[Any, Any]:
        if model_factory is not None:
            return keras_model_and_loss(model_factory())
        first = self._specs[0]
        if isinstance(first, str) and first.endswith(WEIGHTS_SUFFIXES):
            raise ValueError(
                f"Checkpoint 0 ({first}) holds weights only: pass model_factory=... (a function building the "
                "architecture to load them into), or save full models with model.save('....keras')."
            )
        self.loads += 1
        self.current = 0
        if isinstance(first, str):
            model = load_model(
                first, compile=not explicit_loss, custom_objects=self._custom_objects, what="checkpoint 0"
            )
            return model, None
        model, loss = keras_model_and_loss(first() if callable(first) and not is_model(first) else first)
        # A private copy: weights of the other checkpoints are assigned into it, never into the user's model.
        compiled = getattr(model, "loss", None) if loss is None and not explicit_loss else None
        return copy_model(model, loss=compiled, what="the model of checkpoint 0"), loss

    def _load(self, index: int) -> None:
        spec = self._specs[index]
        self.loads += 1
        if isinstance(spec, str):
            load_weights(self._keras_model, spec, what=f"Checkpoint {index}")
            return
        self._keras_model.set_weights(self._weights_of(index, spec))

    def _weights_of(self, index: int, spec: Any) -> list[np.ndarray]:
        model, _ = keras_model_and_loss(spec() if callable(spec) and not is_model(spec) else spec)
        weights = [np.asarray(weight) for weight in model.get_weights()]
        expected = [tuple(weight.shape) for weight in self._keras_model.get_weights()]
        if [tuple(weight.shape) for weight in weights] != expected:
            raise ValueError(
                f"Checkpoint {index} has weights of shapes {[w.shape for w in weights]}, the model {expected}: all "
                "checkpoints must share one architecture."
            )
        return weights

    def _fingerprint(self, index: int) -> str:
        spec = self._specs[index]
        if isinstance(spec, str):
            status = os.stat(spec)
            key = (status.st_size, status.st_mtime_ns)
            known = self._file_fingerprints.get(index)
            if known is None or known[0] != key:
                known = (key, _file_sha256(spec))
                self._file_fingerprints[index] = known
            return known[1]
        if index not in self._other_fingerprints:  # callables are assumed to return the same weights every time
            if index in self._kept:
                weights = self._kept[index]
            else:
                self.loads += 1
                weights = self._weights_of(index, spec)
            self._other_fingerprints[index] = fingerprint_arrays(weights)
        return self._other_fingerprints[index]


# ---------------------------------------------------------------------- the last Dense layer


def fast_tracin_dense(model: Any) -> Any:
    """The last Dense layer of a Keras model, checked for the outer-product identity ``∇_W ℓ = ã ⊗ g``."""
    dense = last_dense_layer(model, at_output=True, purpose=_FAST)
    check_outer_product_layer(model, dense, purpose=_FAST)
    return dense


def last_dense_wrap(loss_function: Any) -> Wrap:
    """Builds the InfluenceModel watching only the last Dense layer of a Keras model."""

    def wrap(model: Any, loss: Any) -> InfluenceModel:
        index = list(model.layers).index(fast_tracin_dense(model))
        return InfluenceModel(model, index, index, loss_function if loss_function is not None else loss)

    return wrap


def reuse_or_wrap(item: Any, wrap: Wrap) -> InfluenceModel:
    """An InfluenceModel that already watches exactly the last Dense layer is reused (and so is its traced head)."""
    if isinstance(item, InfluenceModel):
        dense = fast_tracin_dense(item.model)
        watched = [id(variable_tensor(weight)) for weight in item.weights]
        if watched == [id(variable_tensor(weight)) for weight in dense.trainable_weights]:
            return item
    return wrap(*keras_model_and_loss(item))


_HEADS: weakref.WeakKeyDictionary[Any, dict[str, Callable[..., tuple[tf.Tensor, tf.Tensor]]]] = (
    weakref.WeakKeyDictionary()
)  # Keras model -> {loss identity and dtype: traced head}


def last_dense_head(model: InfluenceModel) -> Callable[..., tuple[tf.Tensor, tf.Tensor]]:
    """``(inputs, targets, weights) -> (ã [B, d(+1)], g [B, K])`` for the last Dense layer of ``model``.

    One forward pass to the Dense input ``a`` and one batched backward pass through the Dense layer's activation
    and the loss to ``g = ∂(w ℓ)/∂z`` at the pre-activation ``z = aW + b``: each example's loss depends on its own
    row of ``z`` only, so the gradient of the summed loss holds every per-example ``g``. Traced once per Keras
    model, loss (:func:`~influenciae.cache.fingerprint.loss_identity`) and dtype, so a new calculator on the same
    checkpoints reuses the trace.
    """
    key = json.dumps([loss_identity(model.loss_function), model.dtype.name])
    heads = _HEADS.setdefault(model.model, {})
    cached = heads.get(key)
    if cached is not None:
        return cached
    keras_model = model.model
    dense = fast_tracin_dense(keras_model)
    extractor = layer_input_model(keras_model, dense)
    kernel = variable_tensor(dense.kernel)
    bias = variable_tensor(dense.bias) if dense.use_bias else None
    activation = dense.activation
    loss_function, dtype = model.loss_function, model.dtype

    def head(inputs: Any, targets: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = tf.cast(extractor(inputs, training=False), dtype)
        with tf.GradientTape() as tape:
            logits = tf.matmul(features, tf.cast(kernel, dtype))
            if bias is not None:
                logits = logits + tf.cast(bias, dtype)
            tape.watch(logits)
            outputs = activation(logits) if activation is not None else logits
            losses = tf.cast(tf.convert_to_tensor(loss_function(targets, outputs)), dtype)
            rank = losses.shape.rank
            if rank is not None and rank > 1:  # as InfluenceModel: mean over the non-batch axes
                losses = tf.reduce_mean(losses, axis=list(range(1, rank)))
            total = tf.reduce_sum(losses * weights)
        gradients = tape.gradient(total, logits)
        if bias is not None:
            features = tf.concat([features, tf.ones_like(features[:, :1])], axis=1)
        return features, gradients

    function = tf.function(head, reduce_retracing=True, autograph=False)
    heads[key] = function
    return function
