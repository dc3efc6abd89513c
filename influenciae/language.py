"""Language models: token-level losses with padding masks, and query-side *measurements*.

**Token losses.** A causal language model maps token inputs ``[B, T]`` to logits ``[B, T, V]`` whose position ``t``
predicts target token ``t`` (shift the sequence when building the dataset: inputs ``s[:, :-1]``, targets
``s[:, 1:]``). :func:`token_cross_entropy` is a per-sequence loss ``ℓ(z) = Σ_t c_t CE_t(z)`` for
``InfluenceModel(..., loss_function=...)``: the masked mean (``c_t = m_t / Σ_s m_s``) or sum (``c_t = m_t``) of the
token cross-entropies, where the mask ``m`` is ``targets != pad_id`` or given explicitly by targets
``(token_ids, mask)`` (:func:`mask_in_targets` moves a ``[B, T]`` mask from the sample-weight slot there).

**Measurements.** By default an influence score is taken on the test example's loss. A *measurement* replaces it on
the query side only: ``measurement(outputs, targets) -> [B]`` is any differentiable function of the model's outputs
and the query's targets, e.g. the log-probability of a chosen completion (:func:`completion_log_probability`), a
logit margin (:func:`logit_margin`) or one logit (:func:`target_logit`). Calculators accept it as ``measurement=``
(:class:`~influenciae.FirstOrderInfluenceCalculator`, :class:`~influenciae.TracIn`, :class:`~influenciae.TracInCP`,
:class:`~influenciae.TrakCalculator`); training-side influence vectors (and their caches) do not change.

Sign convention. A :class:`Measurement` says whether higher is better; its *query loss* is ``q = f`` when lower is
better (a loss) and ``q = -f`` when higher is better (a log-probability, a margin, a logit). Every score is the
calculator's usual score with ``q`` in place of the test loss, e.g. for first-order influence

    score(z, x) = ∇q(x)ᵀ H⁻¹ ∇ℓ(z),      ℓ the training loss,

so **positive means z is a proponent of the measurement**: it moves ``f(x)`` in its good direction. Removing ``z``
from ``N`` training examples changes ``f(x)`` by about ``-score / N`` when higher is better (``+score / N`` for a
loss), i.e. up-weighting ``z`` by ``ε`` raises a higher-is-better ``f(x)`` by ``ε · score`` (Grosse et al. 2023's
influence on ``log p(completion | prompt)``). A plain callable counts as lower-is-better (a loss): then a
measurement equal to the training loss reproduces the ordinary scores exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from influenciae._backend import tf
from influenciae.model import InfluenceModel

__all__ = [
    "Measurement",
    "TokenCrossEntropy",
    "as_measurement",
    "completion_log_probability",
    "logit_margin",
    "mask_in_targets",
    "query_model",
    "target_logit",
    "token_cross_entropy",
]

MeasurementFunction = Callable[[Any, Any], Any]


# ---------------------------------------------------------------------- tokens and masks


def _tokens_and_mask(targets: Any, pad_id: int | None, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor]:
    """``(token_ids [B, T] int32 with pads replaced by 0, mask [B, T] in dtype)`` from targets of either form."""
    if isinstance(targets, (tuple, list)):
        if len(targets) != 2:
            raise ValueError(
                f"Token targets must be token ids [B, T] or a pair (token_ids [B, T], mask [B, T]); got a "
                f"{type(targets).__name__} of {len(targets)} parts."
            )
        ids, mask = tf.convert_to_tensor(targets[0]), tf.cast(tf.convert_to_tensor(targets[1]), dtype)
    else:
        ids = tf.convert_to_tensor(targets)
        mask = tf.ones_like(ids, dtype=dtype)
    if not (ids.dtype.is_integer or ids.dtype.is_floating):
        raise TypeError(f"Token targets must be integer token ids, got {ids.dtype.name}.")
    ids = tf.cast(tf.round(ids) if ids.dtype.is_floating else ids, tf.int32)  # Keras's fit passes float targets
    if pad_id is not None:
        mask = mask * tf.cast(tf.not_equal(ids, pad_id), dtype)
    ids = tf.where(mask > 0, ids, tf.zeros_like(ids))  # any pad id (e.g. -100) becomes a valid index
    return ids, mask


def _token_logits(outputs: Any, ids: tf.Tensor) -> tf.Tensor:
    logits = tf.convert_to_tensor(tf.nest.flatten(outputs)[0])
    if logits.shape.rank is not None and ids.shape.rank is not None and logits.shape.rank != ids.shape.rank + 1:
        raise ValueError(
            f"Logits of shape {tuple(logits.shape)} do not fit token targets of shape {tuple(ids.shape)}: the model "
            "must return logits [B, T, vocabulary] for targets [B, T] (or [B, classes] for targets [B])."
        )
    return logits


def _token_cross_entropies(outputs: Any, ids: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    logits = tf.cast(_token_logits(outputs, ids), dtype)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ids, logits=logits)


def mask_in_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Move a ``[B, T]`` token mask from the sample-weight slot into the targets: ``(x, y, m) -> (x, (y, m))``.

    Influence calculators read the sample-weight slot as one weight per sequence ``[B]``; a per-token mask belongs
    with the targets, where :func:`token_cross_entropy` and the measurements of this module read it.

    Args:
        dataset: Batched ``(inputs, token_ids [B, T], mask [B, T])`` elements.

    Returns:
        A dataset of ``(inputs, (token_ids, mask))``.
    """
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) != 3:
        raise ValueError(
            "mask_in_targets expects (inputs, token_ids, mask) elements; this dataset has no third (mask) part."
        )
    return dataset.map(lambda inputs, ids, mask: (inputs, (ids, mask)))


class TokenCrossEntropy:
    """Per-sequence loss from token cross-entropies with a padding mask (use :func:`token_cross_entropy`).

    ``ℓ(z) = Σ_t c_t CE_t(z)`` with ``c_t = m_t / max(Σ_s m_s, 1)`` (``reduction="mean"``) or ``c_t = m_t``
    (``"sum"``). :meth:`token_losses` returns the terms ``c_t CE_t`` ``[B, T]``, which sum to the loss: they are what
    :func:`~influenciae.influence.breakdown.per_token_influence` differentiates.

    Args:
        pad_id: Target id that marks padding (masked out), or ``None`` when every target counts.
        reduction: ``"mean"`` or ``"sum"`` over the unmasked tokens of each sequence.
        dtype: Compute dtype of the cross-entropies (``None``: the logits' dtype).
    """

    def __init__(self, pad_id: int | None = None, reduction: str = "mean", dtype: Any = None) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
            raise TypeError(f"pad_id must be an integer token id or None, got {pad_id!r}.")
        self.pad_id = pad_id
        self.reduction = reduction
        self.dtype = None if dtype is None else tf.as_dtype(dtype)

    def token_losses(self, y_true: Any, y_pred: Any) -> tf.Tensor:
        """The weighted token terms ``c_t CE_t`` ``[B, T]`` (zero on masked tokens); they sum to :meth:`__call__`.

        Args:
            y_true: Token ids ``[B, T]`` or ``(token_ids [B, T], mask [B, T])``.
            y_pred: Logits ``[B, T, V]``.
        """
        dtype = self.dtype or tf.as_dtype(tf.convert_to_tensor(tf.nest.flatten(y_pred)[0]).dtype)
        ids, mask = _tokens_and_mask(y_true, self.pad_id, dtype)
        if ids.shape.rank == 1:  # one token per example: a classification loss
            ids, mask, y_pred = ids[:, None], mask[:, None], tf.convert_to_tensor(y_pred)[:, None]
        terms = _token_cross_entropies(y_pred, ids, dtype) * mask
        if self.reduction == "mean":
            terms = terms / tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), tf.ones([], dtype))
        return terms

    def __call__(self, y_true: Any, y_pred: Any) -> tf.Tensor:
        """Per-sequence losses ``[B]`` (Keras loss argument order: targets first)."""
        return tf.reduce_sum(self.token_losses(y_true, y_pred), axis=1)

    def get_config(self) -> dict[str, Any]:
        """Settings (for manifests and ``repr``)."""
        return {"pad_id": self.pad_id, "reduction": self.reduction}

    def __repr__(self) -> str:
        return f"TokenCrossEntropy(pad_id={self.pad_id!r}, reduction={self.reduction!r})"


def token_cross_entropy(pad_id: int | None = None, reduction: str = "mean") -> TokenCrossEntropy:
    """A per-sequence language-model loss for ``InfluenceModel(..., loss_function=...)``.

    Args:
        pad_id: Target id of padding tokens (masked out), e.g. 0 or -100; ``None`` when every token counts (or the
            targets carry an explicit mask, ``(token_ids, mask)``).
        reduction: ``"mean"`` (average over the sequence's unmasked tokens, as Hugging Face's causal LM loss) or
            ``"sum"``.

    Returns:
        A :class:`TokenCrossEntropy` mapping ``(targets [B, T], logits [B, T, V]) -> [B]``.

    Example:
        >>> im = InfluenceModel(lm, loss_function=token_cross_entropy(pad_id=0))
    """
    return TokenCrossEntropy(pad_id=pad_id, reduction=reduction)


# ---------------------------------------------------------------------- measurements


class Measurement:
    """A query-side measurement ``f(outputs, targets) -> [B]`` and the direction in which it is good.

    Args:
        function: ``(outputs, targets) -> [B]``, differentiable in the outputs (Captum's ``test_loss_fn`` order,
            outputs first).
        higher_is_better: ``True`` for a log-probability, margin or logit (proponents raise it); ``False`` for a
            loss (proponents lower it).
        name: A name for manifests and ``repr``.

    Attributes:
        sign: ``-1`` when higher is better, else ``+1``: :meth:`query_loss` is ``sign · f``.
    """

    def __init__(self, function: MeasurementFunction, *, higher_is_better: bool, name: str | None = None) -> None:
        if not callable(function):
            raise TypeError(f"A measurement must be callable (outputs, targets) -> [batch], got {function!r}.")
        self.function = function
        self.higher_is_better = bool(higher_is_better)
        self.name = name or getattr(function, "__qualname__", type(function).__name__)

    @property
    def sign(self) -> float:
        """``-1.0`` when higher is better, else ``+1.0``."""
        return -1.0 if self.higher_is_better else 1.0

    def __call__(self, outputs: Any, targets: Any) -> tf.Tensor:
        """The measurement ``f`` ``[B]``."""
        return tf.convert_to_tensor(self.function(outputs, targets))

    def query_loss(self, outputs: Any, targets: Any) -> tf.Tensor:
        """``q = sign · f`` ``[B]``: the quantity whose gradient replaces the test loss's gradient."""
        values = self(outputs, targets)
        return values if not self.higher_is_better else -values

    def configuration(self) -> dict[str, Any]:
        """Settings stored with saved influence factors."""
        return {"name": self.name, "higher_is_better": self.higher_is_better}

    def __repr__(self) -> str:
        return f"Measurement({self.name}, higher_is_better={self.higher_is_better})"


def as_measurement(measurement: Measurement | MeasurementFunction | None) -> Measurement | None:
    """A :class:`Measurement` from a measurement or a plain callable (taken as lower-is-better, like a loss).

    Args:
        measurement: ``None`` (the training loss), a :class:`Measurement`, or ``(outputs, targets) -> [B]``.
    """
    if measurement is None or isinstance(measurement, Measurement):
        return measurement
    if not callable(measurement):
        raise TypeError(
            "measurement must be None (the training loss), a Measurement or a callable (outputs, targets) -> [batch], "
            f"got {type(measurement).__name__}."
        )
    return Measurement(measurement, higher_is_better=False)


def completion_log_probability(pad_id: int | None = None) -> Measurement:
    """``f = Σ_t m_t log p(y_t | prefix)``: the log-probability of the completion tokens (higher is better).

    The query's targets mark the completion: the prompt's positions hold ``pad_id`` (or mask 0 in ``(token_ids,
    mask)`` targets), the completion's positions the tokens whose probability is measured. With classification
    logits ``[B, C]`` and labels ``[B]`` it is ``log p(y | x)``.

    Args:
        pad_id: Target id of the positions that are not measured (prompt and padding).

    Returns:
        A :class:`Measurement` with ``higher_is_better=True``: positive scores mark training sequences that raise
        the completion's probability.
    """

    def log_probability(outputs: Any, targets: Any) -> tf.Tensor:
        dtype = tf.as_dtype(tf.convert_to_tensor(tf.nest.flatten(outputs)[0]).dtype)
        ids, mask = _tokens_and_mask(targets, pad_id, dtype)
        if ids.shape.rank == 1:
            ids, mask, outputs = ids[:, None], mask[:, None], tf.convert_to_tensor(outputs)[:, None]
        return -tf.reduce_sum(_token_cross_entropies(outputs, ids, dtype) * mask, axis=1)

    return Measurement(log_probability, higher_is_better=True, name=f"completion_log_probability(pad_id={pad_id})")


def _gather_target(logits: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(logits * tf.one_hot(ids, tf.shape(logits)[-1], dtype=logits.dtype), axis=-1)


def _masked_logits(outputs: Any, targets: Any, pad_id: int | None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    logits = tf.convert_to_tensor(tf.nest.flatten(outputs)[0])
    ids, mask = _tokens_and_mask(targets, pad_id, logits.dtype)
    if ids.shape.rank == 1:
        ids, mask, logits = ids[:, None], mask[:, None], logits[:, None]
    return _token_logits(logits, ids), ids, mask


def _summed_over_tokens(score: Callable[..., tf.Tensor], pad_id: int | None, name: str) -> Measurement:
    """The measurement ``f = Σ_t m_t score(z_t, y_t)`` over the measured (non-padding) target tokens."""

    def measure(outputs: Any, targets: Any) -> tf.Tensor:
        logits, ids, mask = _masked_logits(outputs, targets, pad_id)
        return tf.reduce_sum(score(logits, ids) * mask, axis=1)

    return Measurement(measure, higher_is_better=True, name=f"{name}(pad_id={pad_id})")


def _margin(logits: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    hot = tf.one_hot(ids, tf.shape(logits)[-1], on_value=True, off_value=False)
    others = tf.reduce_max(tf.where(hot, tf.fill(tf.shape(logits), logits.dtype.min), logits), axis=-1)
    return _gather_target(logits, ids) - others


def logit_margin(pad_id: int | None = None) -> Measurement:
    """``f = Σ_t m_t (z_{t, y_t} - max_{v ≠ y_t} z_{t, v})``: the margin of the target token's logit (higher is better).

    Args:
        pad_id: Target id of the positions that are not measured.

    Returns:
        A :class:`Measurement` with ``higher_is_better=True``.
    """
    return _summed_over_tokens(_margin, pad_id, "logit_margin")


def target_logit(pad_id: int | None = None) -> Measurement:
    """``f = Σ_t m_t z_{t, y_t}``, the raw logit of the target token (higher is better); ``pad_id`` marks the target
    positions that are not measured. Returns a :class:`Measurement` with ``higher_is_better=True``."""
    return _summed_over_tokens(_gather_target, pad_id, "target_logit")


def query_model(
    model: InfluenceModel,
    measurement: Measurement | MeasurementFunction | None,
    *,
    goodness: bool = False,
) -> InfluenceModel:
    """The query side of a calculator: an :class:`InfluenceModel` on the same watched weights whose "loss" is ``q``.

    It shares the Keras model and the watched variables of ``model`` (weights swapped into them, e.g. by
    :class:`~influenciae.TracInCP`, apply to both), so ``query_model(model, f).batch_jacobian_tensor(batch)`` is
    ``∇_θ [w_i q(x_i)]`` ``[B, P]`` in the same parameter order.

    Args:
        model: The training-side model.
        measurement: ``None`` returns ``model`` itself (the training loss).
        goodness: Differentiate ``-q`` (the measurement oriented so that higher is better) instead of ``q``: the
            query side of TRAK, whose output function is a margin.

    Returns:
        An :class:`InfluenceModel` (``model`` when ``measurement`` is None).
    """
    resolved = as_measurement(measurement)
    if resolved is None:
        return model
    sign = -1.0 if goodness else 1.0

    def loss(targets: Any, outputs: Any) -> tf.Tensor:
        return sign * resolved.query_loss(outputs, targets)

    return model.with_loss(loss)
