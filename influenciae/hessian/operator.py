"""The Hessian of the training objective as a matrix-free ``tf.linalg.LinearOperator``.

``H = (1/N) Σ_i ∇²_θ (w_i ℓ(z_i; θ)) + ∇²_θ Ω(θ)`` over the N examples of the Hessian dataset, applied to a block of
vectors by streaming that dataset once per product. Damping is a separate tiny wrapper, :func:`damped`.
"""

from __future__ import annotations

import numbers
from typing import Any

from influenciae._backend import tf
from influenciae.data import CheckedBatches, check_dataset, sparse_classes
from influenciae.model import InfluenceModel

__all__ = ["RowOperator", "HessianOperator", "DampedOperator", "damped", "as_row_operator"]


class RowOperator(tf.linalg.LinearOperator):
    """A symmetric ``[P, P]`` linear operator whose subclasses implement one hook on rows of vectors.

    Solvers work with blocks of vectors stored as rows ``[n, P]`` (the library's convention), while
    ``tf.linalg.LinearOperator`` works on columns ``[P, n]``. Subclasses implement :meth:`_matmul_rows`; the public
    :meth:`matmul_rows` validates and the column-based ``matmul``/``matvec``/``to_dense`` of TensorFlow work too.
    """

    def __init__(self, num_params: int, dtype: tf.DType, name: str, parameters: dict[str, Any]) -> None:
        self._num_params = int(num_params)
        super().__init__(
            dtype=dtype,
            is_self_adjoint=True,
            is_square=True,
            is_non_singular=None,
            is_positive_definite=None,
            name=name,
            parameters=parameters,
        )

    @property
    def num_params(self) -> int:
        """P, the side of the operator."""
        return self._num_params

    @property
    def traceable(self) -> bool:
        """Whether :meth:`_matmul_rows` may run inside a ``tf.function`` (pure TensorFlow: no Python loop over a
        dataset, no eager-only checks), so that a solver can keep its whole iteration in one graph. False by
        default; closed-form operators are traceable, and a dataset operator once its data is held as tensors."""
        return False

    def matmul_rows(self, vectors: Any) -> tf.Tensor:
        """Apply the operator to each row: ``[n, P] -> [n, P]``."""
        vectors = tf.convert_to_tensor(vectors, dtype=self.dtype)
        if vectors.shape.rank != 2 or vectors.shape[-1] != self._num_params:
            raise ValueError(f"Expected vectors of shape [n, {self._num_params}], got {vectors.shape}.")
        return self._matmul_rows(vectors)

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def _shape(self) -> tf.TensorShape:
        return tf.TensorShape([self._num_params, self._num_params])

    def _shape_tensor(self) -> tf.Tensor:
        return tf.constant([self._num_params, self._num_params], dtype=tf.int32)

    def _matmul(self, x: tf.Tensor, adjoint: bool = False, adjoint_arg: bool = False) -> tf.Tensor:
        columns = tf.linalg.adjoint(x) if adjoint_arg else x  # the operator is self-adjoint: `adjoint` is moot
        batch_shape = tf.shape(columns)[:-2]
        flat = tf.reshape(columns, [-1, self._num_params, tf.shape(columns)[-1]])
        rows = tf.reshape(tf.transpose(flat, [0, 2, 1]), [-1, self._num_params])
        result = self._matmul_rows(rows)
        result = tf.transpose(tf.reshape(result, [tf.shape(flat)[0], -1, self._num_params]), [0, 2, 1])
        return tf.reshape(result, tf.concat([batch_shape, tf.shape(result)[-2:]], axis=0))

    def _to_dense(self) -> tf.Tensor:
        identity = tf.eye(self._num_params, dtype=self.dtype)
        return self._matmul_rows(identity)


class HessianOperator(RowOperator):
    """Matrix-free Hessian of the training objective over a dataset.

    Each product streams the dataset once and sums forward-over-backward Hessian-vector products per batch, so any
    batching works and memory does not grow with the dataset.

    Args:
        model: The wrapped model.
        dataset: Batched ``(inputs, targets[, sample_weight])`` dataset defining the objective's mean.

    Example:
        >>> operator = HessianOperator(im, train_ds)
        >>> hv = operator.matmul_rows(v)  # [n, P] -> [n, P]
    """

    def __init__(self, model: InfluenceModel, dataset: tf.data.Dataset) -> None:
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        self.model = model
        self.dataset = check_dataset(dataset, name="dataset")
        self.batches = CheckedBatches(self.dataset, num_classes=sparse_classes(model.model, dataset), name="dataset")
        self.progress_description: str | None = None  # a solver's show_progress sets it around its long passes
        self._num_examples: int | None = None
        super().__init__(
            model.nb_params, model.dtype, "HessianOperator", parameters={"model": model, "dataset": dataset}
        )

    @property
    def num_examples(self) -> int:
        """N, the number of examples in the Hessian dataset (counted on the first pass)."""
        if self._num_examples is None:
            self._num_examples = sum(int(tf.shape(tf.nest.flatten(b[1])[0])[0]) for b in self.dataset)
        return self._num_examples

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        total = tf.zeros_like(vectors)
        count = 0
        for batch in batches_with_progress(self):
            total += self.model.batch_hvp_sum(batch, vectors)
            count += int(tf.shape(tf.nest.flatten(batch[1])[0])[0])
        if count == 0:
            raise ValueError("The Hessian dataset is empty; pass a dataset with at least one example.")
        self._num_examples = count
        return total / tf.cast(count, self.dtype) + self.model.regularization_hvp(vectors)


class DampedOperator(RowOperator):
    """``A + damping · I`` for a symmetric row operator ``A``."""

    def __init__(self, operator: RowOperator, damping: float) -> None:
        self.operator = operator
        self.damping = float(damping)
        super().__init__(
            operator.num_params,
            operator.dtype,
            "DampedOperator",
            parameters={"operator": operator, "damping": damping},
        )

    @property
    def traceable(self) -> bool:
        return self.operator.traceable

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        return self.operator.matmul_rows(vectors) + tf.constant(self.damping, self.dtype) * vectors


def damped(operator: RowOperator, damping: float) -> RowOperator:
    """``operator + damping · I`` (the operator itself when damping is 0).

    Raises:
        ValueError: If damping is negative or not finite.
    """
    if not isinstance(damping, numbers.Real) or isinstance(damping, bool) or not damping >= 0.0:
        raise ValueError(f"damping must be a non-negative number, got {damping!r}.")
    if damping == float("inf"):
        raise ValueError("damping must be finite.")
    return operator if damping == 0.0 else DampedOperator(operator, float(damping))


class _DenseRowOperator(RowOperator):
    def __init__(self, matrix: tf.Tensor) -> None:
        self.matrix = matrix
        super().__init__(int(matrix.shape[0]), matrix.dtype, "DenseRowOperator", parameters={"matrix": matrix})

    @property
    def traceable(self) -> bool:
        return True

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        return tf.matmul(vectors, self.matrix, transpose_b=True)


def as_row_operator(operator: Any) -> RowOperator:
    """Accept a :class:`RowOperator`, any square ``tf.linalg.LinearOperator`` or a dense symmetric matrix.

    Lets solvers run on closed-form matrices (tests, Gauss-Newton approximations) exactly as on a Hessian.
    """
    if isinstance(operator, RowOperator):
        return operator
    if isinstance(operator, tf.linalg.LinearOperator):
        return _DenseRowOperator(operator.to_dense())
    matrix = tf.convert_to_tensor(operator)
    if matrix.shape.rank != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"A dense operator must be a square matrix, got shape {matrix.shape}.")
    return _DenseRowOperator(matrix)


def batches_with_progress(operator: Any) -> Any:
    """``operator.batches``, behind a tqdm bar while a solver has set ``operator.progress_description``."""
    description = getattr(operator, "progress_description", None)
    if description is None:
        return operator.batches
    from tqdm.auto import tqdm

    return tqdm(operator.batches, desc=description, unit="batch", leave=False, dynamic_ncols=True)
