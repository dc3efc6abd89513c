"""TracIn (Pruthi, Liu, Kale & Sundararajan, 2020): training-data attribution from checkpoints, without a Hessian.

Score, sign and scale (``docs/theory.md``). For checkpoints ``θ_1 … θ_C`` of one training run, taken with learning
rates ``η_1 … η_C``,

    TracIn(z, x) = Σ_c η_c ∇ℓ(x; θ_c) · ∇ℓ(z; θ_c)

(TracInCP). A gradient step ``θ_c - η_c ∇ℓ(z; θ_c)`` on the training example ``z`` alone changes the loss at ``x``
by ``≈ -η_c ∇ℓ(x; θ_c) · ∇ℓ(z; θ_c)``, so the score is the first-order **decrease** of the loss at ``x`` that
single-example steps on ``z`` at the checkpoints cause. Positive means ``z`` is a **proponent** of ``x`` (a step on
``z`` lowers ``x``'s loss), negative an opponent, as for every other calculator; ``ORDER.DESCENDING`` lists
proponents first. There is no Hessian and no ``1/N``: scores are in loss units per (unit-batch) step.
Self-influence ``Σ_c η_c ‖∇ℓ(z; θ_c)‖² ≥ 0`` is large for examples the model keeps fighting (mislabeled, atypical).
Gradients are those of ``InfluenceModel.batch_jacobian_tensor``: per-example losses times sample weights, without
the regularizer.

Four calculators, all on the shared engine (self-influence, matrices, streaming, caches, top-k):

* :class:`TracIn`: checkpoints as Keras models (or ``InfluenceModel``) already in memory, over any watched layers.
* :class:`TracInCP`: checkpoints as files (``.keras``; ``.weights.h5`` with a ``model_factory``) or callables,
  loaded into **one** Keras model whose weights are swapped (see the memory notes on the class).
* :class:`TracInCPFast`: the last Dense layer only, through the outer-product identity
  ``∇_W ℓ = ã ⊗ g`` (``ã`` the layer input with a trailing 1 for the bias, ``g = ∂ℓ/∂(pre-activation)``), so
  ``∇ℓ(x)·∇ℓ(z) = (ã_x·ã_z)(g_x·g_z)`` without forming ``ã ⊗ g``.
* :class:`TracInCPFastRandProj`: the same gradients sketched to ``projection_dim`` numbers by a seeded random
  projection whose dot products are unbiased estimates of the scores, so the linear/faiss indices apply.

Influence vectors put the learning rate on the training side: ``v(z) = [η_c ∇ℓ(z; θ_c)]_c`` and the test transform
``t(x) = [∇ℓ(x; θ_c)]_c`` (concatenated over checkpoints), so ``t(x)·v(z)`` is the score, with no square roots of
the learning rates. Influence vectors have ``C × P`` entries (``C × (d + 1 + K)`` for the fast
variant, ``projection_dim`` for the sketch).
"""

from __future__ import annotations

import abc
import hashlib
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from influenciae._backend import is_keras3_object, keras, keras_module_of, tf, variable_tensor
from influenciae.cache import combine_hashes, fingerprint_arrays
from influenciae.data import check_dataset, unpack_batch, with_indices
from influenciae.influence.base import BaseInfluenceCalculator
from influenciae.language import Measurement, as_measurement, query_model
from influenciae.model import InfluenceModel

__all__ = ["TracIn", "TracInCP", "TracInCPFast", "TracInCPFastRandProj"]

Block = tuple[tf.Tensor, tf.Tensor]
Wrap = Callable[[Any, Any], InfluenceModel]  # (keras_model, loss_function or None) -> InfluenceModel
_T = TypeVar("_T")

_WEIGHTS_SUFFIXES = (".weights.h5", ".h5")
_MODEL_SUFFIXES = (".keras",)


# ---------------------------------------------------------------------- argument checks


def _checkpoint_list(checkpoints: Any, name: str) -> list[Any]:
    if isinstance(checkpoints, (str, os.PathLike)) or not isinstance(checkpoints, Iterable):
        raise TypeError(f"{name} must be a list (one entry per checkpoint), got {type(checkpoints).__name__}.")
    items = list(checkpoints)
    if not items:
        raise ValueError(f"{name} is empty: TracIn needs at least one checkpoint.")
    return items


def _learning_rates(learning_rates: Any, count: int) -> np.ndarray:
    try:
        rates = np.asarray(learning_rates, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"learning_rates must be a float or a list of floats, got {learning_rates!r}.") from error
    if rates.ndim == 0:
        rates = np.full([count], float(rates))
    elif rates.ndim != 1 or rates.shape[0] != count:
        raise ValueError(
            f"learning_rates has {rates.size} values for {count} checkpoints: pass one learning rate per checkpoint "
            "(the rate in use when each checkpoint was saved), or a single float for all of them."
        )
    if not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(f"learning_rates must be positive and finite, got {rates.tolist()}.")
    return rates


def _positive_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    return int(value)


def _chunks(items: Iterable[_T], size: int | None) -> Iterator[list[_T]]:
    """Consecutive groups of ``size`` items (all of them in one group when ``size`` is None)."""
    group: list[_T] = []
    for item in items:
        group.append(item)
        if size is not None and len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _is_model(obj: Any) -> bool:
    return isinstance(obj, InfluenceModel) or (hasattr(obj, "get_weights") and hasattr(obj, "trainable_weights"))


def _keras_model_and_loss(obj: Any) -> tuple[Any, Any]:
    """A Keras model and the per-example loss it carries (an InfluenceModel's resolved loss, else None)."""
    if isinstance(obj, InfluenceModel):
        return obj.model, obj.loss_function
    return obj, None


def _file_sha256(path: str) -> str:
    hasher = hashlib.sha256(b"influenciae.checkpoint_file.v1")
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------- checkpoint sources


class _Checkpoints(abc.ABC):
    """The checkpoints of a calculator: ``activate(c)`` returns an InfluenceModel computing at checkpoint ``c``."""

    reference: InfluenceModel  # the calculator's ``model``: validation, dtype, nb_params
    loads: int = 0  # checkpoints read from disk or produced by a callable so far

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def activate(self, index: int) -> InfluenceModel: ...

    @abc.abstractmethod
    def fingerprints(self) -> list[str]: ...

    @property
    def expensive(self) -> bool:
        """Whether switching checkpoints reads a file (then passes over data go checkpoint by checkpoint)."""
        return False

    def order(self) -> list[int]:
        """Checkpoint indices in the order to visit them: starting from the active one saves a load."""
        return list(range(len(self)))


class _InMemoryCheckpoints(_Checkpoints):
    """One InfluenceModel per checkpoint, all in memory; switching costs nothing."""

    def __init__(self, models: list[InfluenceModel]) -> None:
        first = models[0]
        for index, model in enumerate(models[1:], start=1):
            if model.weight_shapes != first.weight_shapes or model.dtype != first.dtype:
                raise ValueError(
                    f"Checkpoint {index} watches weights of shapes {model.weight_shapes} ({model.dtype.name}) but "
                    f"checkpoint 0 watches {first.weight_shapes} ({first.dtype.name}): checkpoints must share one "
                    "architecture and the same watched layers."
                )
        self.models = models
        self.reference = first

    def __len__(self) -> int:
        return len(self.models)

    def activate(self, index: int) -> InfluenceModel:
        return self.models[index]

    def fingerprints(self) -> list[str]:
        return [fingerprint_arrays(weight.numpy() for weight in model.model.weights) for model in self.models]


class _StoredCheckpoints(_Checkpoints):
    """Checkpoints loaded one at a time into a single Keras model whose weights are swapped in place.

    One model means one traced ``tf.function`` for all checkpoints. With ``keep_in_memory`` the weights of every
    checkpoint are kept as host arrays after their first load (``C ×`` the model's weights), so each file is read
    once per calculator and switching is an in-memory assignment; without it only the active checkpoint exists.
    """

    def __init__(
        self,
        specs: list[Any],
        wrap: Wrap,
        *,
        model_factory: Callable[[], Any] | None,
        keep_in_memory: bool,
        custom_objects: dict[str, Any] | None,
        explicit_loss: bool,
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
        return not self.keep_in_memory

    def order(self) -> list[int]:
        start = self.current or 0
        return [(start + step) % len(self) for step in range(len(self))]

    def activate(self, index: int) -> InfluenceModel:
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
        return [self._fingerprint(index) for index in range(len(self))]

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_spec(index: int, spec: Any) -> Any:
        if isinstance(spec, (str, os.PathLike)):
            path = os.fspath(spec)
            if not path.endswith(_MODEL_SUFFIXES + _WEIGHTS_SUFFIXES):
                raise ValueError(
                    f"Checkpoint {index} ({path}) must be a .keras model file or a .weights.h5 weights file."
                )
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Checkpoint {index} ({path}) does not exist.")
            return path
        if callable(spec) or _is_model(spec):
            return spec
        raise TypeError(
            f"Checkpoint {index} must be a path (.keras or .weights.h5), a Keras model or a callable returning "
            f"one, got {type(spec).__name__}."
        )

    def _build_reference(self, model_factory: Callable[[], Any] | None, explicit_loss: bool) -> tuple[Any, Any]:
        if model_factory is not None:
            return _keras_model_and_loss(model_factory())
        first = self._specs[0]
        if isinstance(first, str) and first.endswith(_WEIGHTS_SUFFIXES):
            raise ValueError(
                f"Checkpoint 0 ({first}) holds weights only: pass model_factory=... (a function building the "
                "architecture to load them into), or save full models with model.save('....keras')."
            )
        self.loads += 1
        self.current = 0
        if isinstance(first, str):
            return keras.models.load_model(first, compile=not explicit_loss, custom_objects=self._custom_objects), None
        model, loss = _keras_model_and_loss(first() if callable(first) and not _is_model(first) else first)
        # A private copy: weights of the other checkpoints are assigned into it, never into the user's model.
        module = keras_module_of(model)
        try:
            clone = module.models.clone_model(model)
        except (ValueError, TypeError, NotImplementedError) as error:
            raise ValueError(
                f"Could not copy the model of checkpoint 0 ({_first_line(error)}): pass model_factory=... building "
                "the architecture."
            ) from error
        clone.set_weights(model.get_weights())
        if loss is None and not explicit_loss and getattr(model, "loss", None) is not None:
            clone.compile(loss=model.loss)
        return clone, loss

    def _load(self, index: int) -> None:
        spec = self._specs[index]
        self.loads += 1
        if isinstance(spec, str):
            try:
                self._keras_model.load_weights(spec)
            except (ValueError, OSError, KeyError, TypeError) as error:
                raise ValueError(
                    f"Checkpoint {index} ({spec}) does not fit the model: {_first_line(error)}. All checkpoints "
                    "must share one architecture."
                ) from error
            return
        weights = self._weights_of(index, spec)
        self._keras_model.set_weights(weights)

    def _weights_of(self, index: int, spec: Any) -> list[np.ndarray]:
        model, _ = _keras_model_and_loss(spec() if callable(spec) and not _is_model(spec) else spec)
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


# ---------------------------------------------------------------------- the shared checkpoint calculator


class _CheckpointCalculator(BaseInfluenceCalculator):
    """Scores summed over checkpoints, from per-checkpoint *features* of a batch.

    Subclasses compute ``_features(model, index, batch)`` at one checkpoint and assemble the features of all
    checkpoints into influence vectors and transforms. Self-influence is a sum over checkpoints of small per-batch
    *terms* (``_self_terms``), reduced by ``_self_from_terms``, so it never needs the vectors.

    When switching checkpoints reads files (:class:`TracInCP` with ``keep_in_memory=False``), the engine's passes
    are reorganised checkpoint by checkpoint so that no checkpoint is loaded per batch:

    * influence vectors and transforms: the dataset is cut into blocks of ``batches_per_load`` batches (the whole
      pass when ``None``); for each block every checkpoint is loaded once and applied to all its batches. Memory:
      one model, the block's batches and the block's vectors.
    * disk caches: the block is the cache shard (``batches_per_shard`` batches), so each checkpoint is loaded
      once per shard and memory holds one shard of vectors, as the engine's own disk cache does.
    * self-influence: each checkpoint is loaded once per pass and applied to the whole dataset (one iteration of
      the dataset per checkpoint, plus one to return the batches); memory holds only the ``[N]`` running sums
      (``[N, projection_dim]`` for the random projection). The dataset must iterate in the same order each time.
    * ``top_k`` scores test batches lazily, one at a time, so it loads every checkpoint (but the active one) per
      test batch: prefer ``most_influential``, or ``keep_in_memory=True``.
    """

    def __init__(
        self,
        checkpoints: _Checkpoints,
        learning_rates: np.ndarray,
        *,
        batches_per_load: int | None,
        show_progress: bool,
        batches_per_shard: int,
    ) -> None:
        super().__init__(checkpoints.reference, show_progress=show_progress, batches_per_shard=batches_per_shard)
        self.checkpoints = checkpoints
        self.learning_rates = learning_rates
        self.batches_per_load = batches_per_load
        self._rates = [tf.constant(rate, self.model.dtype) for rate in learning_rates]

    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoints)

    @property
    def checkpoint_loads(self) -> int:
        """How many times a checkpoint was read from disk (or produced by a callable) so far."""
        return self.checkpoints.loads

    # ------------------------------------------------------------------ per-checkpoint hooks

    @abc.abstractmethod
    def _features(self, model: InfluenceModel, index: int, batch: Any) -> Any:
        """What the scores need from checkpoint ``index`` for ``batch`` (``model`` computes at that checkpoint)."""

    @abc.abstractmethod
    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        """Influence vectors ``[B, D]`` from the features of every checkpoint, in checkpoint order."""

    @abc.abstractmethod
    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        """Transforms ``[B, D]`` from the features of every checkpoint, in checkpoint order."""

    @abc.abstractmethod
    def _self_terms(self, features: Any, index: int) -> tuple[tf.Tensor, ...]:
        """Per-checkpoint terms of the self-influence, summed over checkpoints."""

    def _self_from_terms(self, terms: tuple[tf.Tensor, ...]) -> tf.Tensor:
        return terms[0]

    def _query_features(self, model: InfluenceModel, index: int, batch: Any) -> Any:
        """Features of a test batch (the transforms' side); the training features unless a measurement is set."""
        return self._features(model, index, batch)

    # ------------------------------------------------------------------ engine hooks (one batch at a time)

    def _all_features(self, batch: Any, features_of: Callable[..., Any] | None = None) -> list[Any]:
        compute = features_of or self._features
        features: list[Any] = [None] * len(self.checkpoints)
        for index in self.checkpoints.order():
            features[index] = compute(self.checkpoints.activate(index), index, batch)
        return features

    def _influence_vectors(self, batch: Any) -> tf.Tensor:
        return self._vectors_from(self._all_features(batch))

    def _transforms(self, batch: Any) -> tf.Tensor:
        return self._transforms_from(self._all_features(batch, self._query_features))

    def _self_influence(self, batch: Any) -> tf.Tensor:
        features = self._all_features(batch)
        return self._self_from_terms(_sum_terms(self._self_terms(f, c) for c, f in enumerate(features)))

    def _configuration(self) -> dict[str, Any]:
        return {
            "learning_rates": self.learning_rates.tolist(),
            "num_checkpoints": len(self.checkpoints),
            "checkpoint_fingerprints": self.checkpoints.fingerprints(),
        }

    def weights_fingerprint(self) -> str:
        """A hash of every checkpoint's weights (file contents for files), in checkpoint order."""
        return combine_hashes(self.checkpoints.fingerprints())

    # ------------------------------------------------------------------ passes, checkpoint by checkpoint

    def _block_features(self, batches: list[Any], features_of: Callable[..., Any] | None = None) -> list[list[Any]]:
        compute = features_of or self._features
        table: list[list[Any]] = [[None] * len(self.checkpoints) for _ in batches]
        for index in self.checkpoints.order():
            model = self.checkpoints.activate(index)
            for row, batch in zip(table, batches, strict=True):
                row[index] = compute(model, index, batch)
        return table

    def _blockwise(
        self,
        indexed: Iterable[tuple[tf.Tensor, Any]],
        assemble: Callable[[list[Any]], tf.Tensor],
        size: int | None,
        features_of: Callable[..., Any] | None = None,
    ) -> Iterator[Block]:
        for group in _chunks(indexed, size):
            table: list[list[Any] | None] = list(self._block_features([batch for _, batch in group], features_of))
            for position, (indices, _) in enumerate(group):
                features, table[position] = table[position], None  # keep ~one copy of the block's vectors
                yield indices, assemble(features or [])

    def _compute_vectors(self, train_set: tf.data.Dataset) -> Iterator[Block]:
        if not self.checkpoints.expensive:
            yield from super()._compute_vectors(train_set)
            return
        indexed = self._indexed(train_set, "train_set", "influence vectors")
        yield from self._blockwise(indexed, self._vectors_from, self.batches_per_load)

    def _transform_stream(
        self, test_set: tf.data.Dataset, *, validate: bool = True
    ) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        if not self.checkpoints.expensive:
            yield from super()._transform_stream(test_set, validate=validate)
            return
        check_dataset(test_set, name="test_set")
        if validate:
            self._validate_first_batch(test_set)
        indexed = self._indexed(test_set, "test_set", "test transforms")
        yield from self._blockwise(indexed, self._transforms_from, self.batches_per_load, self._query_features)

    def _self_influence_stream(
        self, train_set: tf.data.Dataset, *, validate: bool = True, with_index: bool = False
    ) -> Iterator[tuple[Any, tf.Tensor]]:
        if not self.checkpoints.expensive:
            yield from super()._self_influence_stream(train_set, validate=validate, with_index=with_index)
            return
        check_dataset(train_set, name="train_set")
        if validate:
            self._validate_first_batch(train_set)
        order = self.checkpoints.order()
        totals: list[tuple[tf.Tensor, ...]] = []
        index_blocks: list[tf.Tensor] = []
        for step, index in enumerate(order):
            model = self.checkpoints.activate(index)
            description = f"self-influence, checkpoint {step + 1}/{len(order)}"
            position = -1
            for position, (indices, batch) in enumerate(self._indexed(train_set, "train_set", description)):
                terms = self._self_terms(self._features(model, index, batch), index)
                if step == 0:
                    totals.append(terms)
                    index_blocks.append(indices)
                elif position >= len(totals) or not _same_indices(index_blocks[position], indices):
                    raise _reordered_dataset_error()
                else:
                    totals[position] = _sum_terms([totals[position], terms])
            if position + 1 != len(totals):
                raise _reordered_dataset_error()
        if with_index:
            for indices, terms in zip(index_blocks, totals, strict=True):
                yield indices, self._self_from_terms(terms)
            return
        position = -1
        for position, (indices, batch) in enumerate(with_indices(train_set)):
            if position >= len(totals) or not _same_indices(index_blocks[position], indices):
                raise _reordered_dataset_error()
            yield batch, self._self_from_terms(totals[position])
        if position + 1 != len(totals):
            raise _reordered_dataset_error()

    def _shard_influence_vectors(self, group: list[tuple[tf.Tensor, Any]]) -> np.ndarray:
        # One load per checkpoint and shard (the engine's shard layout), so a cache written this way and one written
        # with keep_in_memory=True are interchangeable.
        if not self.checkpoints.expensive:
            return super()._shard_influence_vectors(group)
        return np.concatenate([vectors.numpy() for _, vectors in self._blockwise(group, self._vectors_from, None)])


def _sum_terms(terms: Iterable[tuple[tf.Tensor, ...]]) -> tuple[tf.Tensor, ...]:
    total: tuple[tf.Tensor, ...] | None = None
    for term in terms:
        total = term if total is None else tuple(a + b for a, b in zip(total, term, strict=True))
    if total is None:
        raise ValueError("No checkpoint to sum over.")
    return total


def _same_indices(first: tf.Tensor, second: tf.Tensor) -> bool:
    return bool(first.shape == second.shape and np.array_equal(first.numpy(), second.numpy()))


def _reordered_dataset_error() -> ValueError:
    return ValueError(
        "The training set changed between passes (another number or size of batches), but with checkpoints loaded "
        "one at a time it is read once per checkpoint. Make its iteration deterministic (e.g. "
        "shuffle(..., reshuffle_each_iteration=False)) or pass keep_in_memory=True."
    )


# ---------------------------------------------------------------------- TracIn over watched weights


class _GradientTracIn(_CheckpointCalculator):
    """Per-sample gradients of the watched weights at each checkpoint (of the measurement's ``q`` on the test side)."""

    measurement: Measurement | None = None

    def _features(self, model: InfluenceModel, index: int, batch: Any) -> tf.Tensor:
        return model.batch_jacobian_tensor(batch)

    def _query_features(self, model: InfluenceModel, index: int, batch: Any) -> tf.Tensor:
        if self.measurement is None:
            return model.batch_jacobian_tensor(batch)
        queries: dict[int, InfluenceModel] = self.__dict__.setdefault("_query_models", {})
        if id(model) not in queries:  # one query model per checkpoint model, sharing its watched weights
            queries[id(model)] = query_model(model, self.measurement)
        return queries[id(model)].batch_jacobian_tensor(batch)

    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        return tf.concat([rate * gradients for rate, gradients in zip(self._rates, features, strict=True)], axis=1)

    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        return tf.concat(features, axis=1)

    def _self_terms(self, features: Any, index: int) -> tuple[tf.Tensor, ...]:
        return (self._rates[index] * tf.reduce_sum(tf.square(features), axis=1),)


def _gradient_wrap(start_layer: int | str | None, last_layer: int | str | None, loss_function: Any) -> Wrap:
    def wrap(model: Any, loss: Any) -> InfluenceModel:
        return InfluenceModel(model, start_layer, last_layer, loss_function if loss_function is not None else loss)

    return wrap


class TracIn(_GradientTracIn):
    """TracInCP over checkpoints held in memory: ``Σ_c η_c ∇ℓ(x; θ_c) · ∇ℓ(z; θ_c)``.

    Sign and scale (module docstring): positive means ``z`` is a proponent of ``x`` (single-example gradient steps
    on ``z`` at the checkpoints lower ``x``'s loss, by about the score to first order); self-influence
    ``Σ_c η_c ‖∇ℓ(z; θ_c)‖²``. Gradients are taken with respect to the watched weights (all trainable weights, or
    ``start_layer``..``last_layer``), per-example losses times sample weights, no regularizer.

    Influence vectors ``[η_c ∇ℓ(z; θ_c)]_c`` and transforms ``[∇ℓ(x; θ_c)]_c`` are concatenated over checkpoints
    (``D = C × nb_params``), so scores are dot products and every neighbour strategy applies. With one checkpoint
    and ``learning_rates=1`` this is the plain gradient dot product ("TracIn-last" with the last checkpoint).

    Args:
        models: One Keras model (or :class:`~influenciae.InfluenceModel`) per checkpoint, same architecture.
        learning_rates: The learning rate at each checkpoint (one float for all, or one per checkpoint).
        start_layer: First watched layer (index or name) of each Keras model.
        last_layer: Last watched layer (inclusive) of each Keras model.
        loss_function: Per-example loss; ``None`` uses each model's compiled loss.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.
        measurement: What the test side measures instead of its loss (:mod:`influenciae.language`): transforms
            become ``[∇q(x; θ_c)]_c`` with ``q`` the measurement's query loss, so positive scores mark proponents of
            the measurement; influence vectors and self-influence are unchanged. ``None``: the test loss.

    Example:
        >>> tracin = TracIn([model_epoch_1, model_epoch_5, model_epoch_10], learning_rates=[0.1, 0.05, 0.01],
        ...                 loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
        ...                                                                          reduction="none"))
        >>> indices, values = tracin.most_influential(test_ds, train_ds, k=5)
    """

    method_name = "tracin"

    def __init__(
        self,
        models: Sequence[Any],
        learning_rates: float | Sequence[float],
        *,
        start_layer: int | str | None = None,
        last_layer: int | str | None = None,
        loss_function: Any = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
        measurement: Measurement | Any = None,
    ) -> None:
        self.measurement = as_measurement(measurement)
        items = _checkpoint_list(models, "models")
        rates = _learning_rates(learning_rates, len(items))
        for index, item in enumerate(items):
            if not _is_model(item):
                raise TypeError(
                    f"models[{index}] is a {type(item).__name__}, not a Keras model or InfluenceModel. For checkpoint "
                    "files or callables use TracInCP."
                )
            options = (start_layer, last_layer, loss_function)
            if isinstance(item, InfluenceModel) and any(option is not None for option in options):
                raise ValueError(
                    f"start_layer, last_layer and loss_function configure Keras models; models[{index}] is already "
                    "an InfluenceModel (configure it there)."
                )
        models_ = [
            item
            if isinstance(item, InfluenceModel)
            else _gradient_wrap(start_layer, last_layer, loss_function)(item, None)
            for item in items
        ]
        super().__init__(
            _InMemoryCheckpoints(models_),
            rates,
            batches_per_load=None,
            show_progress=show_progress,
            batches_per_shard=batches_per_shard,
        )

    @property
    def models(self) -> list[InfluenceModel]:
        """The checkpoints' :class:`InfluenceModel` objects, in order (the original Influenciae's ``TracIn.models``)."""
        checkpoints = self.checkpoints
        assert isinstance(checkpoints, _InMemoryCheckpoints)  # noqa: S101 - TracIn builds nothing else
        return list(checkpoints.models)


class TracInCP(_GradientTracIn):
    """TracInCP from saved checkpoints: the score of :class:`TracIn`, loading one checkpoint at a time.

    Checkpoints are paths to ``.keras`` files, paths to ``.weights.h5`` files (then ``model_factory()`` builds the
    architecture), Keras models, or callables returning a Keras model. They are loaded into **one** Keras model
    (built from ``model_factory`` or from checkpoint 0, a private copy for callables) whose weights are swapped in
    place, so there is a single traced gradient function for all checkpoints. Same score, sign and scale as
    :class:`TracIn`; equal to it on the same weights.

    Memory and loading:

    * ``keep_in_memory=True``: each checkpoint is read once (on first use) and its weights kept as host arrays,
      ``C ×`` the model's weights (the size of a single influence vector row when all weights are watched). Every
      engine method then behaves as with :class:`TracIn`; switching checkpoints is an in-memory assignment.
    * ``keep_in_memory=False`` (default): one set of weights in memory. Passes over a dataset go checkpoint by
      checkpoint: each checkpoint is loaded once per block of ``batches_per_load`` batches (once per pass when
      ``None``, the default: memory then holds that pass's vectors, which ``CACHE.MEMORY`` keeps anyway), once
      per cache shard when writing a disk cache, once per pass for self-influence (``O(N)`` memory). Set
      ``batches_per_load`` to bound memory with ``CACHE.NO_CACHE``. ``top_k`` loads per test batch.

    ``checkpoint_loads`` counts the loads. Disk caches are keyed by the learning rates and by the SHA-256 of each
    checkpoint file (weights of callables, assumed to return the same weights every call).

    Args:
        checkpoints: One entry per checkpoint (see above), same architecture.
        learning_rates: The learning rate at each checkpoint (one float for all, or one per checkpoint).
        model_factory: Builds a new model with the architecture (required for ``.weights.h5`` files); its weights
            are overwritten by each checkpoint in turn.
        start_layer: First watched layer (index or name).
        last_layer: Last watched layer (inclusive).
        loss_function: Per-example loss; ``None`` uses the compiled loss stored in checkpoint 0 (or the model
            from ``model_factory``).
        keep_in_memory: Keep every checkpoint's weights in host memory after their first load.
        batches_per_load: Batches per block when loading checkpoints one at a time (``None``: a whole pass).
        custom_objects: Passed to ``keras.models.load_model`` for ``.keras`` files.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.
        measurement: What the test side measures instead of its loss (:mod:`influenciae.language`): transforms
            become ``[∇q(x; θ_c)]_c`` with ``q`` the measurement's query loss, so positive scores mark proponents of
            the measurement; influence vectors and self-influence are unchanged. ``None``: the test loss.

    Example:
        >>> tracin = TracInCP(["ckpt/epoch_02.keras", "ckpt/epoch_06.keras", "ckpt/epoch_10.keras"],
        ...                   learning_rates=0.01, loss_function=loss)
        >>> scores = tracin.influence_matrix(test_ds, train_ds)
        >>> indices, self_influence = tracin.compute_top_k_from_training_dataset(train_ds, k=20)
    """

    method_name = "tracin"

    def __init__(
        self,
        checkpoints: Sequence[Any],
        learning_rates: float | Sequence[float],
        model_factory: Callable[[], Any] | None = None,
        *,
        start_layer: int | str | None = None,
        last_layer: int | str | None = None,
        loss_function: Any = None,
        keep_in_memory: bool = False,
        batches_per_load: int | None = None,
        custom_objects: dict[str, Any] | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
        measurement: Measurement | Any = None,
    ) -> None:
        self.measurement = as_measurement(measurement)
        items = _checkpoint_list(checkpoints, "checkpoints")
        rates = _learning_rates(learning_rates, len(items))
        batches_per_load = _positive_or_none(batches_per_load, "batches_per_load")
        source = _StoredCheckpoints(
            items,
            _gradient_wrap(start_layer, last_layer, loss_function),
            model_factory=model_factory,
            keep_in_memory=keep_in_memory,
            custom_objects=custom_objects,
            explicit_loss=loss_function is not None,
        )
        super().__init__(
            source,
            rates,
            batches_per_load=batches_per_load,
            show_progress=show_progress,
            batches_per_shard=batches_per_shard,
        )


# ---------------------------------------------------------------------- the last Dense layer


def _dense_classes(model: Any) -> tuple[type, ...]:
    classes: list[type] = [keras.layers.Dense]
    if not is_keras3_object(model):
        classes.append(keras_module_of(model).layers.Dense)
    return tuple(classes)


def _last_dense_layer(model: Any) -> Any:
    """The Dense layer producing the single output of a Sequential or functional model.

    Raises:
        ValueError: If the model has no symbolic graph (subclassed), several outputs, or its output does not come
            straight from a Dense layer on ``[batch, features]`` inputs (an activation may be fused into it).
    """
    try:
        outputs = list(model.outputs or [])
    except (AttributeError, ValueError):
        outputs = []
    if len(outputs) != 1:
        raise ValueError(
            "The fast TracIn variants need a Sequential or functional Keras model with one output (they read the "
            f"input of its last layer); got {type(model).__name__} with {len(outputs) or 'no symbolic'} outputs."
        )
    history = getattr(outputs[0], "_keras_history", None)
    layer: Any = history[0] if history is not None else None
    if not isinstance(layer, _dense_classes(model)):
        name = getattr(layer, "name", None)
        raise ValueError(
            f"The last layer of the model ({name!r}, {type(layer).__name__}) is not Dense: the fast TracIn variants "
            "use the identity ∇_W ℓ = a ⊗ g of a final Dense layer (its activation may be fused, e.g. "
            "Dense(k, activation='softmax')). Fold a trailing Activation/Softmax layer into the Dense layer, or "
            "use TracIn(..., start_layer=...) on the last layers."
        )
    dense: Any = layer  # isinstance against a tuple of classes narrows to object
    if getattr(dense, "lora_enabled", False):
        raise ValueError("The last Dense layer has LoRA enabled: use TracIn(..., start_layer=-1) instead.")
    if not dense.trainable:
        raise ValueError(f"The last Dense layer {dense.name!r} is not trainable: there is no gradient to trace.")
    rank = len(dense.input.shape)
    if rank != 2:
        raise ValueError(
            f"The last Dense layer {dense.name!r} gets inputs of rank {rank}; the outer-product identity needs "
            "[batch, features] inputs. Use TracIn(..., start_layer=-1) instead."
        )
    return dense


def _last_dense_wrap(loss_function: Any) -> Wrap:
    def wrap(model: Any, loss: Any) -> InfluenceModel:
        dense = _last_dense_layer(model)
        index = list(model.layers).index(dense)
        return InfluenceModel(model, index, index, loss_function if loss_function is not None else loss)

    return wrap


def _reuse_or_wrap(item: Any, wrap: Wrap) -> InfluenceModel:
    """An InfluenceModel that already watches exactly the last Dense layer is reused (and so is its traced head)."""
    if isinstance(item, InfluenceModel):
        dense = _last_dense_layer(item.model)
        watched = [id(variable_tensor(weight)) for weight in item.weights]
        if watched == [id(variable_tensor(weight)) for weight in dense.trainable_weights]:
            return item
    return wrap(*_keras_model_and_loss(item))


def _symbolic_inputs(model: Any) -> Any:
    """The model's symbolic inputs, in the structure its call expects (a Sequential has no ``.input`` until called)."""
    try:
        return model.input
    except (AttributeError, ValueError):
        inputs = list(model.inputs)
        return inputs[0] if len(inputs) == 1 else inputs


_HEADS: weakref.WeakKeyDictionary[InfluenceModel, Callable[..., tuple[tf.Tensor, tf.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _head(model: InfluenceModel) -> Callable[..., tuple[tf.Tensor, tf.Tensor]]:
    """``(inputs, targets, weights) -> (ã [B, d(+1)], g [B, K])`` for the last Dense layer of ``model``.

    One forward pass to the Dense input ``a`` and one batched backward pass through the Dense layer's activation
    and the loss to ``g = ∂(w ℓ)/∂z`` at the pre-activation ``z = aW + b``: each example's loss depends on its own
    row of ``z`` only, so the gradient of the summed loss holds every per-example ``g``.
    """
    cached = _HEADS.get(model)
    if cached is not None:
        return cached
    keras_model = model.model
    dense = _last_dense_layer(keras_model)
    extractor = keras_module_of(keras_model).Model(_symbolic_inputs(keras_model), dense.input)
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

    function = tf.function(head, reduce_retracing=True)
    _HEADS[model] = function
    return function


class _LastDenseCalculator(_CheckpointCalculator):
    """Features ``(ã, g)`` of the last Dense layer at each checkpoint (``ã`` ends with 1 when there is a bias)."""

    def __init__(
        self,
        checkpoints: Any,
        learning_rates: Any,
        model_factory: Callable[[], Any] | None,
        *,
        loss_function: Any,
        keep_in_memory: bool,
        batches_per_load: int | None,
        custom_objects: dict[str, Any] | None,
        show_progress: bool,
        batches_per_shard: int,
    ) -> None:
        items = _checkpoint_list(checkpoints, "checkpoints")
        rates = _learning_rates(learning_rates, len(items))
        batches_per_load = _positive_or_none(batches_per_load, "batches_per_load")
        wrap = _last_dense_wrap(loss_function)
        source: _Checkpoints
        if model_factory is None and all(_is_model(item) for item in items):
            if loss_function is not None and any(isinstance(item, InfluenceModel) for item in items):
                raise ValueError("loss_function configures Keras models; configure the InfluenceModels instead.")
            source = _InMemoryCheckpoints([_reuse_or_wrap(item, wrap) for item in items])
        else:
            source = _StoredCheckpoints(
                items,
                wrap,
                model_factory=model_factory,
                keep_in_memory=keep_in_memory,
                custom_objects=custom_objects,
                explicit_loss=loss_function is not None,
            )
        super().__init__(
            source,
            rates,
            batches_per_load=batches_per_load,
            show_progress=show_progress,
            batches_per_shard=batches_per_shard,
        )
        kernel_shape = self.model.weight_shapes[0]
        dense = _last_dense_layer(self.model.model)
        self.feature_dim = int(kernel_shape[0]) + (1 if dense.use_bias else 0)
        self.output_dim = int(kernel_shape[1])

    def _features(self, model: InfluenceModel, index: int, batch: Any) -> Any:
        structure = unpack_batch(batch)
        inputs = tf.nest.map_structure(tf.convert_to_tensor, structure.inputs)
        targets = tf.nest.map_structure(tf.convert_to_tensor, structure.targets)
        size = tf.shape(tf.nest.flatten(targets)[0])[0]
        if structure.sample_weight is None:
            weights = tf.ones([size], model.dtype)
        else:
            weights = tf.cast(tf.reshape(structure.sample_weight, [-1]), model.dtype)
        return _head(model)(inputs, targets, weights)


class TracInCPFast(_LastDenseCalculator):
    """TracInCP on the last Dense layer, exactly, without per-sample backward passes through the network.

    For a final Dense layer ``z = aW + b`` (any fused activation, e.g. softmax or sigmoid), the per-example
    gradient of the loss is ``∇_W ℓ = a ⊗ g`` and ``∇_b ℓ = g`` with ``g = ∂ℓ/∂z``, so

        ∇ℓ(x)·∇ℓ(z) = (a_x·a_z)(g_x·g_z) + g_x·g_z = (ã_x·ã_z)(g_x·g_z),   ã = [a, 1].

    ``a`` comes from one forward pass to the Dense input and ``g`` from one batched gradient with respect to the
    pre-activation. The score equals :class:`TracIn` with ``start_layer=-1`` (the last Dense layer's kernel and
    bias): same sign (positive = proponent) and scale, ``Σ_c η_c (ã_x·ã_z)(g_x·g_z)``; self-influence
    ``Σ_c η_c ‖ã_z‖²‖g_z‖²``.

    Influence vectors ``[ã_c, η_c g_c]_c`` and transforms ``[ã_c, g_c]_c`` hold ``C × (d + 1 + K)`` numbers instead
    of ``C × (d + 1) K``; the score is not their dot product, so top-k runs by brute force over blocks (neighbour
    strategies do not apply: use :class:`TracInCPFastRandProj` for an index).

    Args:
        checkpoints: Keras models or InfluenceModels in memory, or paths/callables as for :class:`TracInCP`.
            The model must be Sequential or functional with one output produced by a Dense layer on
            ``[batch, features]`` inputs.
        learning_rates: The learning rate at each checkpoint (one float for all, or one per checkpoint).
        model_factory: Builds the architecture for ``.weights.h5`` files.
        loss_function: Per-example loss on the model's outputs; ``None`` uses the compiled loss.
        keep_in_memory: For checkpoints on disk, as in :class:`TracInCP`.
        batches_per_load: For checkpoints on disk, as in :class:`TracInCP`.
        custom_objects: Passed to ``keras.models.load_model`` for ``.keras`` files.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Example:
        >>> fast = TracInCPFast([model_a, model_b], learning_rates=[0.1, 0.01], loss_function=loss)
        >>> proponents, values = fast.most_influential(test_ds, train_ds, k=10)
    """

    method_name = "tracin_cp_fast"

    def __init__(
        self,
        checkpoints: Sequence[Any],
        learning_rates: float | Sequence[float],
        model_factory: Callable[[], Any] | None = None,
        *,
        loss_function: Any = None,
        keep_in_memory: bool = False,
        batches_per_load: int | None = None,
        custom_objects: dict[str, Any] | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        super().__init__(
            checkpoints,
            learning_rates,
            model_factory,
            loss_function=loss_function,
            keep_in_memory=keep_in_memory,
            batches_per_load=batches_per_load,
            custom_objects=custom_objects,
            show_progress=show_progress,
            batches_per_shard=batches_per_shard,
        )

    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        parts = [tf.concat([a, rate * g], axis=1) for rate, (a, g) in zip(self._rates, features, strict=True)]
        return tf.concat(parts, axis=1)

    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        return tf.concat([tf.concat([a, g], axis=1) for a, g in features], axis=1)

    def _inner(self, transforms: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        width = self.feature_dim + self.output_dim
        shape = [len(self.checkpoints), width]
        left = tf.reshape(transforms, [-1, *shape])
        right = tf.reshape(vectors, [-1, *shape])
        d = self.feature_dim
        features = tf.einsum("mcd,ncd->cmn", left[..., :d], right[..., :d])
        gradients = tf.einsum("mck,nck->cmn", left[..., d:], right[..., d:])
        return tf.reduce_sum(features * gradients, axis=0)

    def _self_terms(self, features: Any, index: int) -> tuple[tf.Tensor, ...]:
        a, g = features
        return (self._rates[index] * tf.reduce_sum(tf.square(a), axis=1) * tf.reduce_sum(tf.square(g), axis=1),)

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "layer": "last_dense"}


class TracInCPFastRandProj(_LastDenseCalculator):
    """:class:`TracInCPFast` through a seeded random projection: dot products estimate the scores without bias.

    Each checkpoint ``c`` gets independent Gaussian matrices ``A_c [d + 1, k]`` and ``B_c [K, k]`` (``k =
    projection_dim``, from ``seed``) and sketches the last-layer gradient ``u = ã ⊗ g`` as

        s_c = (ã A_c) ⊙ (g B_c) / √k   ∈ R^k,

    a linear map of ``u`` whose rows are rank-one Gaussian matrices, so ``E[s_c(x)·s_c(z)] = (ã_x·ã_z)(g_x·g_z)``
    (never materializing ``ã ⊗ g`` nor a ``k × (d + 1) K`` matrix). Influence vectors ``Σ_c η_c s_c(z)`` and
    transforms ``Σ_c s_c(x)`` have ``k`` entries whatever the number of checkpoints: the cross-checkpoint terms
    have zero mean because the projections are independent. Hence

        E[t(x)·v(z)] = Σ_c η_c ∇ℓ_c(x)·∇ℓ_c(z)   (the TracInCPFast score: same sign and scale),

    with a relative error shrinking like ``1/√k``. Scores are plain dot products, so the ``"linear"``,
    ``"streaming"`` and ``"faiss"`` neighbour strategies index the training vectors for fast repeated queries.
    Self-influence is the estimate ``t(z)·v(z)`` (the diagonal of the estimated scores).

    Args:
        checkpoints: As for :class:`TracInCPFast`.
        learning_rates: The learning rate at each checkpoint (one float for all, or one per checkpoint).
        model_factory: Builds the architecture for ``.weights.h5`` files.
        projection_dim: ``k``, the length of the sketched vectors.
        seed: Seed of the projections (the same seed gives the same vectors).
        loss_function: Per-example loss on the model's outputs; ``None`` uses the compiled loss.
        keep_in_memory: For checkpoints on disk, as in :class:`TracInCP`.
        batches_per_load: For checkpoints on disk, as in :class:`TracInCP`.
        custom_objects: Passed to ``keras.models.load_model`` for ``.keras`` files.
        show_progress: Progress bars on every pass.
        batches_per_shard: Training batches per disk-cache shard.

    Example:
        >>> sketch = TracInCPFastRandProj(checkpoint_paths, 0.01, projection_dim=256, seed=0, loss_function=loss)
        >>> top = sketch.top_k(test_ds, train_ds, k=10, nearest_neighbors="faiss")
    """

    method_name = "tracin_cp_fast_rand_proj"

    def __init__(
        self,
        checkpoints: Sequence[Any],
        learning_rates: float | Sequence[float],
        model_factory: Callable[[], Any] | None = None,
        *,
        projection_dim: int,
        seed: int = 0,
        loss_function: Any = None,
        keep_in_memory: bool = False,
        batches_per_load: int | None = None,
        custom_objects: dict[str, Any] | None = None,
        show_progress: bool = False,
        batches_per_shard: int = 16,
    ) -> None:
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, (int, np.integer)) or projection_dim <= 0:
            raise ValueError(f"projection_dim must be a positive integer, got {projection_dim!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {seed!r}.")
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        super().__init__(
            checkpoints,
            learning_rates,
            model_factory,
            loss_function=loss_function,
            keep_in_memory=keep_in_memory,
            batches_per_load=batches_per_load,
            custom_objects=custom_objects,
            show_progress=show_progress,
            batches_per_shard=batches_per_shard,
        )
        generator = np.random.default_rng(self.seed)
        scale = 1.0 / np.sqrt(self.projection_dim)
        self._projections = []
        for _ in range(len(self.checkpoints)):
            left = generator.standard_normal((self.feature_dim, self.projection_dim)) * scale
            right = generator.standard_normal((self.output_dim, self.projection_dim))
            self._projections.append((tf.constant(left, self.model.dtype), tf.constant(right, self.model.dtype)))

    def _features(self, model: InfluenceModel, index: int, batch: Any) -> Any:
        a, g = super()._features(model, index, batch)
        left, right = self._projections[index]
        return tf.matmul(a, left) * tf.matmul(g, right)

    def _vectors_from(self, features: list[Any]) -> tf.Tensor:
        return tf.add_n([rate * sketch for rate, sketch in zip(self._rates, features, strict=True)])

    def _transforms_from(self, features: list[Any]) -> tf.Tensor:
        return tf.add_n(features)

    def _self_terms(self, features: Any, index: int) -> tuple[tf.Tensor, ...]:
        return features, self._rates[index] * features

    def _self_from_terms(self, terms: tuple[tf.Tensor, ...]) -> tf.Tensor:
        transforms, vectors = terms
        return tf.reduce_sum(transforms * vectors, axis=1)

    def _configuration(self) -> dict[str, Any]:
        return {
            **super()._configuration(),
            "layer": "last_dense",
            "projection": "gaussian_khatri_rao",
            "projection_dim": self.projection_dim,
            "seed": self.seed,
        }
