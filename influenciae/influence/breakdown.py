"""Breakdowns of influence scores: per token of a training sequence and per watched layer.

Both rest on writing a calculator's score as a sum over checkpoints ``c`` of dot products between a *query factor*
``u_c(x)`` ``[P]`` and the training loss's gradient at that checkpoint:

    score(x, z) = Σ_c u_c(x) · ∇_θ ℓ(z; θ_c),

with ``u(x) = H⁻¹∇q(x)`` for :class:`~influenciae.FirstOrderInfluenceCalculator` (one solve per query, ``q`` the
test loss or the measurement's query loss) and ``u_c(x) = η_c ∇q(x; θ_c)`` for :class:`~influenciae.TracIn` and
:class:`~influenciae.TracInCP`.

* Per token: the training loss of :func:`~influenciae.language.token_cross_entropy` is ``ℓ(z) = Σ_t c_t CE_t(z)``
  (times the sample weight), so ``score_t = Σ_c u_c · ∇(w c_t CE_t)(z; θ_c)`` and ``Σ_t score_t = score``. Each
  ``score_t`` is a directional derivative of the token terms along ``u_c``: one forward-mode pass per query factor
  gives every token of a training batch at once, with no per-token gradient.
* Per layer: the parameter vector splits into the blocks of the watched weights, grouped by layer, and
  ``score_L = Σ_c u_c[L] · ∇ℓ(z; θ_c)[L]``, so ``Σ_L score_L = score``. For
  :class:`~influenciae.TrakCalculator` without projection (``projection_dim=None``) the same split is applied to its
  transforms and influence vectors.

With a solver whose ``solve`` is symmetric (exact, CG, EK-FAC, ...) the totals equal
:meth:`~influenciae.influence.base.BaseInfluenceCalculator.influence_matrix`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import check_dataset, unpack_batch
from influenciae.influence.first_order import FirstOrderInfluenceCalculator
from influenciae.influence.tracin import _GradientTracIn
from influenciae.influence.trak import TrakCalculator
from influenciae.model import InfluenceModel
from influenciae.model.losses import token_loss_jvp

__all__ = ["per_layer_influence", "per_token_influence", "layer_blocks"]


def _as_dataset(data: Any, name: str) -> tf.data.Dataset:
    if isinstance(data, tf.data.Dataset):
        return check_dataset(data, name=name)
    unpack_batch(data)  # a single batch: (inputs, targets[, sample_weight])
    return tf.data.Dataset.from_tensors(tuple(data))


def layer_blocks(model: InfluenceModel, by: str = "layer") -> dict[str, list[tuple[int, int]]]:
    """The slices of the flat parameter vector that belong to each watched layer (or weight).

    Args:
        model: The wrapped model.
        by: ``"layer"`` (a layer's kernel, bias, ... together; the layer is the weight path without its last part)
            or ``"weight"`` (one block per watched variable).

    Returns:
        ``{name: [(start, stop), ...]}`` in the order of the watched weights; the slices tile ``[0, nb_params)``.
    """
    if by not in ("layer", "weight"):
        raise ValueError(f"by must be 'layer' or 'weight', got {by!r}.")
    blocks: dict[str, list[tuple[int, int]]] = {}
    start = 0
    for name, shape in zip(model.weight_names, model.weight_shapes, strict=True):
        size = int(np.prod(shape))
        key = name.rsplit("/", 1)[0] if by == "layer" and "/" in name else name
        blocks.setdefault(key, []).append((start, start + size))
        start += size
    return blocks


# ---------------------------------------------------------------------- query factors


def _terms(calculator: Any, test_set: tf.data.Dataset, operation: str) -> Iterator[tuple[InfluenceModel, tf.Tensor]]:
    """``(training model at checkpoint c, u_c [N_test, P])`` for every checkpoint, activating each one in turn."""
    if isinstance(calculator, FirstOrderInfluenceCalculator):
        if calculator.normalize:
            raise ValueError(
                f"{operation} writes scores as H⁻¹∇q(x) · ∇ℓ(z), which RelatIF's normalization by ‖H⁻¹∇ℓ(z)‖ does not "
                "allow: use a calculator with normalize=False."
            )
        factors = calculator.compute_influence_factors(test_set)
        yield calculator.model, tf.constant(factors, calculator.model.dtype)
        return
    if isinstance(calculator, _GradientTracIn):
        check_dataset(test_set, name="test_set")
        checkpoints = calculator.checkpoints
        for index in checkpoints.order():
            model = checkpoints.activate(index)
            rows = [calculator._query_features(model, index, batch) for batch in test_set]
            factors = tf.concat(rows, axis=0) if rows else tf.zeros([0, model.nb_params], model.dtype)
            yield model, calculator._rates[index] * factors
        return
    raise ValueError(
        f"{operation} supports FirstOrderInfluenceCalculator, TracIn and TracInCP (scores that are dot products "
        f"with training-loss gradients); got {type(calculator).__name__}."
        + (
            " For TRAK, per_layer_influence works with projection_dim=None."
            if operation == "per_token_influence"
            else ""
        )
    )


# ---------------------------------------------------------------------- per token


def per_token_influence(calculator: Any, test_set: Any, train_set: Any) -> np.ndarray:
    """Scores broken down over the tokens of each training sequence.

    ``score_t(x, z) = Σ_c u_c(x) · ∇_θ [w_z c_t CE_t(z)]`` (module docstring), so summing over ``t`` gives the
    calculator's score; masked (padding) tokens get 0. The training ``InfluenceModel``'s loss must be a
    :class:`~influenciae.language.TokenCrossEntropy`.

    Args:
        calculator: A :class:`~influenciae.FirstOrderInfluenceCalculator` (``normalize=False``),
            :class:`~influenciae.TracIn` or :class:`~influenciae.TracInCP`, possibly with a ``measurement``.
        test_set: Batched test dataset or a single batch (``N_test`` examples).
        train_set: Batched training dataset or a single batch (``N_train`` sequences of ``T`` tokens; every batch
            with the same ``T``).

    Returns:
        Array ``[N_test, N_train, T]``.

    Example:
        >>> tokens = per_token_influence(calculator, query_ds, train_ds)  # [N_test, N_train, T]
        >>> np.allclose(tokens.sum(-1), calculator.influence_matrix(query_ds, train_ds))
        True
    """
    test_set = _as_dataset(test_set, "test_set")
    train_set = _as_dataset(train_set, "train_set")
    total: np.ndarray | None = None
    for model, factors in _terms(calculator, test_set, "per_token_influence"):
        jvp = token_loss_jvp(model)
        blocks = []
        for batch in train_set:
            inputs, targets, weights = model.batch_parts(batch)
            rows = [jvp(inputs, targets, weights, factors[i]).numpy() for i in range(int(factors.shape[0]))]
            blocks.append(np.stack(rows))
        if not blocks or factors.shape[0] == 0:
            raise ValueError("test_set and train_set must not be empty.")
        lengths = {block.shape[2] for block in blocks}
        if len(lengths) > 1:
            raise ValueError(f"Training batches have different sequence lengths {sorted(lengths)}: pad them to one T.")
        contribution = np.concatenate(blocks, axis=1)
        total = contribution if total is None else total + contribution
    if total is None:
        raise ValueError("The calculator has no checkpoint.")
    return total


# ---------------------------------------------------------------------- per layer


def _split(left: np.ndarray, right: np.ndarray, blocks: dict[str, list[tuple[int, int]]]) -> dict[str, np.ndarray]:
    return {
        name: sum((left[:, a:b] @ right[:, a:b].T for a, b in slices), np.zeros([left.shape[0], right.shape[0]]))
        for name, slices in blocks.items()
    }


def per_layer_influence(calculator: Any, test_set: Any, train_set: Any, *, by: str = "layer") -> dict[str, np.ndarray]:
    """Scores broken down over the watched layers (or weights): ``Σ_L score_L = score``.

    ``score_L(x, z) = Σ_c u_c(x)[L] · ∇ℓ(z; θ_c)[L]`` with the query factors of the module docstring; for
    :class:`~influenciae.TrakCalculator` (``projection_dim=None``) the per-checkpoint blocks of its transforms and
    influence vectors are split the same way.

    Args:
        calculator: A :class:`~influenciae.FirstOrderInfluenceCalculator` (``normalize=False``),
            :class:`~influenciae.TracIn`, :class:`~influenciae.TracInCP` or a :class:`~influenciae.TrakCalculator`
            with ``projection_dim=None``.
        test_set: Batched test dataset or a single batch.
        train_set: Batched training dataset or a single batch.
        by: ``"layer"`` or ``"weight"`` (see :func:`layer_blocks`).

    Returns:
        ``{layer name: array [N_test, N_train]}`` in the order of the watched weights; ``np.stack(list(d.values()),
        axis=-1)`` is ``[N_test, N_train, L]``.
    """
    test_set = _as_dataset(test_set, "test_set")
    train_set = _as_dataset(train_set, "train_set")
    blocks = layer_blocks(calculator.model, by)
    if isinstance(calculator, TrakCalculator):
        if calculator.projection_dim is not None:
            raise ValueError(
                "Projected TRAK features mix every parameter, so they do not split by layer: use projection_dim=None."
            )
        test, train = calculator._stream(test_set, "test_set"), calculator._stream(train_set, "train_set")
        transforms = np.concatenate([t.numpy() for _, t in calculator._transform_stream(test)])
        vectors = np.concatenate([v.numpy() for _, v in calculator._compute_vectors(train)])
        size = calculator.model.nb_params
        per_checkpoint = [
            _split(transforms[:, m * size : (m + 1) * size], vectors[:, m * size : (m + 1) * size], blocks)
            for m in range(calculator.num_checkpoints)
        ]
        return {name: np.sum([split[name] for split in per_checkpoint], axis=0) for name in blocks}
    total: dict[str, np.ndarray] | None = None
    for model, factors in _terms(calculator, test_set, "per_layer_influence"):
        left = factors.numpy()
        columns: dict[str, list[np.ndarray]] = {name: [] for name in blocks}
        for batch in train_set:
            gradients = model.batch_jacobian_tensor(batch).numpy()
            for name, value in _split(left, gradients, blocks).items():
                columns[name].append(value)
        contribution = {name: np.concatenate(values, axis=1) for name, values in columns.items()}
        total = contribution if total is None else {name: total[name] + contribution[name] for name in blocks}
    if total is None:
        raise ValueError("The calculator has no checkpoint.")
    return total
