"""The preconditioners of the conjugate-gradient solver (:mod:`~influenciae.hessian.conjugate_gradient`): ``M`` on
rows, in a form its device loop can trace (diagonal, low rank, dense, a traceable operator) or, for a callable,
applied eagerly."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from influenciae._backend import tf
from influenciae.hessian.operator import DampedOperator, RowOperator, as_row_operator

__all__ = ["Preconditioner", "apply_preconditioner", "exact_diagonal", "preconditioner_of"]


@dataclasses.dataclass(frozen=True)
class Preconditioner:
    """``M`` on rows. ``kind`` is ``"none"``, ``"diagonal"`` (``tensors = (inverse diagonal [P],)``), ``"low_rank"``
    (``(U [r, P], c [r])``: ``M v = v + U diag(c) Uᵀ v``), ``"dense"`` (``(M [P, P],)``), ``"operator"`` (a
    traceable :class:`RowOperator`) or ``"callable"`` (eager only)."""

    kind: str
    tensors: tuple[tf.Tensor, ...] = ()
    function: Callable[[tf.Tensor], Any] | None = None

    @property
    def traceable(self) -> bool:
        """Whether ``M`` can run inside the solver's traced loop (everything but a callable)."""
        return self.kind != "callable"

    def apply(self, rows: tf.Tensor) -> tf.Tensor:
        """``M v`` for each row ``v`` of ``rows [n, P]``."""
        if self.function is not None:
            return tf.convert_to_tensor(self.function(rows), rows.dtype)
        return apply_preconditioner(self.kind, rows, *self.tensors)


def apply_preconditioner(kind: str, rows: tf.Tensor, *tensors: tf.Tensor) -> tf.Tensor:
    """``M rows`` for a traceable ``kind`` of :class:`Preconditioner` and its ``tensors``."""
    if kind == "none":
        return rows
    if kind == "diagonal":
        return rows * tensors[0]
    if kind == "low_rank":
        basis, coefficients = tensors
        return rows + tf.matmul(tf.matmul(rows, basis, transpose_b=True) * coefficients, basis)
    if kind == "dense":
        return tf.matmul(rows, tensors[0], transpose_b=True)
    raise ValueError(f"Unknown preconditioner kind {kind!r}.")  # pragma: no cover - internal


def preconditioner_of(preconditioner: Any) -> Preconditioner:
    """The :class:`Preconditioner` of a user's ``preconditioner=`` (None, a row operator, a callable on rows, a
    ``tf.linalg.LinearOperator`` or a dense matrix)."""
    if preconditioner is None:
        return Preconditioner("none")
    if isinstance(preconditioner, RowOperator):
        if preconditioner.traceable:
            return Preconditioner("operator", function=preconditioner.matmul_rows)
        return Preconditioner("callable", function=preconditioner.matmul_rows)
    if callable(preconditioner) and not isinstance(preconditioner, tf.linalg.LinearOperator):
        return Preconditioner("callable", function=preconditioner)
    dense = as_row_operator(preconditioner)
    matrix = getattr(dense, "matrix", None)
    if matrix is None:  # pragma: no cover - as_row_operator makes dense operators of matrices
        return Preconditioner("operator", function=dense.matmul_rows)
    return Preconditioner("dense", (matrix,))


def exact_diagonal(operator: RowOperator, block: int = 256) -> tf.Tensor:
    """The diagonal of a symmetric row operator: read off a dense matrix, else products with unit-vector blocks."""
    if isinstance(operator, DampedOperator):
        return exact_diagonal(operator.operator, block) + tf.constant(operator.damping, operator.dtype)
    matrix = getattr(operator, "matrix", None)
    if matrix is not None:
        return tf.linalg.diag_part(tf.convert_to_tensor(matrix, operator.dtype))
    parts = []
    for start in range(0, operator.num_params, block):
        stop = min(start + block, operator.num_params)
        units = tf.roll(tf.eye(stop - start, operator.num_params, dtype=operator.dtype), start, axis=1)
        parts.append(tf.reduce_sum(operator.matmul_rows(units) * units, axis=1))
    return tf.concat(parts, axis=0)
