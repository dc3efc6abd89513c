"""The Hessian of the training objective as a matrix-free ``tf.linalg.LinearOperator``.

``H = (1/N) Σ_i ∇²_θ (w_i ℓ(z_i; θ)) + ∇²_θ Ω(θ)`` over the N examples of the Hessian dataset, applied to a block of
vectors. The first product reads the dataset once through its per-batch checks; a dataset that fits
:data:`HELD_DATA_BUDGET` is then held as stacked tensors and every product is one ``tf.function`` call that loops
over the batches inside the graph (:func:`held_matmul`); a larger one is streamed once per product. Damping is a
separate tiny wrapper, :func:`damped`.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from influenciae._backend import tf
from influenciae.data import CheckedBatches, check_dataset, sparse_classes
from influenciae.hessian.held import HELD_DATA_BUDGET, BatchSum, HeldBatches, held_matmul, hold_batches
from influenciae.model import InfluenceModel

__all__ = [
    "HELD_DATA_BUDGET",
    "DampedOperator",
    "DatasetOperator",
    "HeldBatches",
    "HessianOperator",
    "RowOperator",
    "as_row_operator",
    "damped",
    "held_matmul",
    "hold_batches",
]


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

    @property
    def passes_over_data(self) -> bool:
        """Whether every product reads the curvature's dataset (so a solver with many right-hand sides may form the
        dense matrix once, ``P`` products in blocks, instead of passing over the data at every iteration)."""
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


class DatasetOperator(RowOperator):
    """A curvature averaged over a dataset: ``(1/N) Σ_batches (per-batch sum) + ∇²Ω``.

    The first product reads the dataset through its per-batch checks (:class:`CheckedBatches`: bad data in any
    batch is refused there). When the data fits ``held_data_budget`` bytes it is held as stacked tensors
    (:func:`hold_batches`) and every product, the first included, is one graph call (:func:`held_matmul`); the
    operator is then :attr:`traceable`. Otherwise each product streams the dataset. Held data is the first pass's,
    shared by the model's operators on the same dataset object (:meth:`InfluenceModel.shared_data`): a pipeline that
    changes on every pass, e.g. random augmentation, is read once.

    Subclasses implement :meth:`_held_product` (a per-batch sum in pure TensorFlow, on static shapes) and
    :meth:`_streamed_matmul_rows`.

    Args:
        model: The wrapped model.
        dataset: Batched ``(inputs, targets[, sample_weight])`` dataset defining the mean.
        name: The operator's name.
        held_data_budget: Bytes of inputs, targets and weights up to which the data is held
            (default :data:`HELD_DATA_BUDGET`; 0 always streams).
    """

    _empty_message = "The curvature dataset is empty; pass a dataset with at least one example."
    _blocked = True  # see held_matmul's ``blocked``

    def __init__(
        self, model: InfluenceModel, dataset: tf.data.Dataset, name: str, *, held_data_budget: int | None = None
    ) -> None:
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        budget = HELD_DATA_BUDGET if held_data_budget is None else held_data_budget
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(f"held_data_budget must be a non-negative integer, got {held_data_budget!r}.")
        self.model = model
        self.dataset = check_dataset(dataset, name="dataset")
        self.batches = CheckedBatches(self.dataset, num_classes=sparse_classes(model.model, dataset), name="dataset")
        self.progress_description: str | None = None  # a solver's show_progress sets it around its long passes
        self.held_data_budget = budget
        self._num_examples: int | None = None
        self._held: HeldBatches | None = None
        self._read = False
        super().__init__(model.nb_params, model.dtype, name, parameters={"model": model, "dataset": dataset})

    @property
    def num_examples(self) -> int:
        """N, the number of examples in the dataset (counted on the first pass)."""
        if self._num_examples is None:
            self._num_examples = sum(int(tf.shape(tf.nest.flatten(b[1])[0])[0]) for b in self.dataset)
        return self._num_examples

    @property
    def passes_over_data(self) -> bool:
        return True

    @property
    def traceable(self) -> bool:
        """True once the data is held as tensors. Asking reads the data on its first, checked pass (eagerly; it
        raises the checks' ``ValueError`` on bad data), so that a solver can decide before its first product."""
        return self.held_data() is not None

    def held_data(self) -> HeldBatches | None:
        """The data as :class:`HeldBatches`, or ``None`` when it streams (over the budget, or batches of
        different shapes). The first call, eager, reads the dataset through its checks.

        Raises:
            ValueError: If a batch fails a check, or the dataset is empty.
        """
        if not self._read and not tf.inside_function():
            held = None
            if self.held_data_budget > 0:
                budget = self.held_data_budget  # a new operator on the same dataset object does not read it again
                read = lambda: hold_batches(self.model, batches_with_progress(self), budget)  # noqa: E731
                held = self.model.shared_data(self.dataset, ("held", budget), read)
                if held is not None and held.num_examples == 0:
                    raise ValueError(self._empty_message)
                if held is not None:
                    self._prepare_held(held)
                    self._num_examples = held.num_examples
            self._held, self._read = held, True
        return self._held

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        held = self.held_data()
        if held is None:
            return self._streamed_matmul_rows(vectors)
        key, batch_sum, extra = self._held_product()
        if tf.inside_function():
            return held_matmul(self.model, key, batch_sum, held, vectors, extra, blocked=self._blocked)
        try:
            return held_matmul(self.model, key, batch_sum, held, vectors, extra, blocked=self._blocked)
        except (ValueError, NotImplementedError, LookupError) as error:  # pfor could not convert an op in the loop
            warnings.warn(
                f"{type(self).__name__}: the one-call product over the held data failed to build "
                f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}); "
                "streaming the dataset per batch instead (slower).",
                RuntimeWarning,
                stacklevel=3,
            )
            self._held = None
            return self._streamed_matmul_rows(vectors)

    def _prepare_held(self, held: HeldBatches) -> None:
        """Eager checks on the held data before its first product (none by default)."""

    def _held_product(self) -> tuple[tuple[Any, ...], BatchSum, tuple[tf.Tensor, ...]]:
        """The key, per-batch sum and extra tensors of :func:`held_matmul` for this operator."""
        raise NotImplementedError

    def _streamed_matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError


class HessianOperator(DatasetOperator):
    """Matrix-free Hessian of the training objective over a dataset.

    Each product sums the model's Hessian-vector products (``hvp_mode``) per batch, so any batching works. A
    dataset within ``held_data_budget`` bytes is held as tensors after its first, checked pass and a product is one
    graph call (:class:`DatasetOperator`); a larger one streams once per product, so memory does not grow with it.

    Args:
        model: The wrapped model.
        dataset: Batched ``(inputs, targets[, sample_weight])`` dataset defining the objective's mean.
        held_data_budget: Bytes up to which the data is held as tensors (default :data:`HELD_DATA_BUDGET`; 0 always
            streams).

    Example:
        >>> operator = HessianOperator(im, train_ds)
        >>> hv = operator.matmul_rows(v)  # [n, P] -> [n, P]
    """

    curvature: ClassVar[str] = "hessian"  # its name in the curvature registry
    _empty_message = "The Hessian dataset is empty; pass a dataset with at least one example."

    def __init__(self, model: InfluenceModel, dataset: tf.data.Dataset, *, held_data_budget: int | None = None) -> None:
        super().__init__(model, dataset, "HessianOperator", held_data_budget=held_data_budget)

    def _held_product(self) -> tuple[tuple[Any, ...], BatchSum, tuple[tf.Tensor, ...]]:
        model = self.model

        def batch_sum(batch: tuple[Any, Any, tf.Tensor, tf.Tensor], extra: Any, vectors: tf.Tensor) -> tf.Tensor:
            inputs, targets, weights, _ = batch
            return model._in_graph("hvp", inputs, targets, weights, vectors)

        return ("hessian", model.hvp_mode), batch_sum, ()

    def _streamed_matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        product, count = self._mean_over(batches_with_progress(self), vectors)
        self._num_examples = count
        return product

    def sample_matmul_rows(self, batches: Iterable[Any], vectors: tf.Tensor) -> tf.Tensor:
        """``(1/n) Σ_{i ∈ batches} ∇²ℓ_i v + ∇²Ω v`` ``[m, P]`` for ``vectors [m, P]``: the Hessian of the objective
        on a sample of checked ``batches`` (``n`` examples, e.g. from :meth:`sampled_batches`)."""
        return self._mean_over(batches, vectors)[0]

    def sampled_batches(self, seed: int, shuffle_buffer: int = 256) -> Iterator[Any]:
        """An endless iterator over the dataset's batches, shuffled with ``seed`` and checked (stochastic steps)."""
        shuffled = self.dataset.shuffle(shuffle_buffer, seed=seed).repeat()
        num_classes = sparse_classes(self.model.model, self.dataset)
        return iter(CheckedBatches(shuffled, num_classes=num_classes, name="dataset"))

    def _mean_over(self, batches: Iterable[Any], vectors: tf.Tensor) -> tuple[tf.Tensor, int]:
        total = tf.zeros_like(vectors)
        count = 0
        for batch in batches:
            total += self.model.batch_hvp_sum(batch, vectors)
            count += int(tf.shape(tf.nest.flatten(batch[1])[0])[0])
        if count == 0:
            raise ValueError(self._empty_message)
        return total / tf.cast(count, self.dtype) + self.model.regularization_hvp(vectors), count


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

    @property
    def passes_over_data(self) -> bool:
        return self.operator.passes_over_data

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
