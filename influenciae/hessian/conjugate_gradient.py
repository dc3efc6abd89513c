"""Block conjugate gradient for many right-hand sides at once, with its loop on the device.

Every right-hand side runs its own (preconditioned) CG recursion; the block shares the operator products. When the
operator is :attr:`~influenciae.hessian.operator.RowOperator.traceable` and the preconditioner is too, the whole solve
is one ``tf.function`` around a ``tf.while_loop``; otherwise a Python loop applies the operator to the still-active
rows and does the rest of the iteration in one traced call (one scalar comes back to the host per iteration).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.base import InverseHessianVectorProduct
from influenciae.hessian.operator import RowOperator
from influenciae.hessian.preconditioners import (
    Preconditioner,
    apply_preconditioner,
    exact_diagonal,
    preconditioner_of,
)

__all__ = ["CGOptions", "ConjugateGradientDescentIHVP", "ConvergenceInfo", "default_tolerance"]

LOGGER = logging.getLogger("influenciae")

#: Preconditioners built by name (``preconditioner="diagonal"`` / ``"nystrom"``).
PRECONDITIONERS = ("diagonal", "nystrom")
#: Iterations a solve is assumed to take when ``dense=None`` weighs forming the matrix (``P`` products) against
#: passing over the data at every iteration (``rows`` products each).
DENSE_ITERATION_ESTIMATE = 32


@dataclasses.dataclass(frozen=True)
class ConvergenceInfo:
    """What an iterative solve did.

    Attributes:
        iterations: Number of operator products (passes over the Hessian dataset).
        residual_norms: Final relative residuals ``‖b - A x‖ / ‖b‖`` per right-hand side ``[n]``.
        converged: Whether each right-hand side reached the tolerance ``[n]``.
        row_iterations: Products each right-hand side took part in before it stopped ``[n]`` (CG only; a row
            stops moving once it has converged). None for solvers that do not track rows.
    """

    iterations: int
    residual_norms: np.ndarray
    converged: np.ndarray
    row_iterations: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class CGOptions:
    """The settings of :class:`ConjugateGradientDescentIHVP`, validated on construction.

    Attributes:
        tolerance: Stop a right-hand side when ``‖v - (H+λI)x‖ ≤ tolerance · ‖v‖``. None (default) scales it to
            the dtype: ``max(1e-8, 100 · eps)``, i.e. 1e-8 in float64 and about 1.2e-5 in float32 (a float32
            residual cannot go much below that, so a fixed 1e-8 never converges there).
        max_iterations: Most operator products per solve (None: ``min(P, 200)``).
        preconditioner: None, ``"diagonal"``, ``"nystrom"``, a callable on rows, a ``tf.linalg.LinearOperator`` or
            a dense matrix (see the solver). Named preconditioners are built on the first solve and kept.
        preconditioner_rank: Sketch size of ``preconditioner="nystrom"`` (clipped to P).
        dense: Whether CG iterates on the dense ``H + λI`` (formed once, ``P`` products in blocks, kept for later
            solves) instead of passing over the data at every iteration: the same system, a ``[P, P]`` matrix in
            memory, and far fewer passes when a block has many right-hand sides. None (default) decides per solve:
            dense when the operator reads a dataset, ``P ≤ base.DENSE_MAX_PARAMS`` and the rows times the expected
            iterations (``min(max_iterations, DENSE_ITERATION_ESTIMATE)``) are at least ``P``.
    """

    tolerance: float | None = None
    max_iterations: int | None = None
    preconditioner: Any | None = None
    preconditioner_rank: int = 50
    dense: bool | None = None

    def __post_init__(self) -> None:
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance!r}.")
        if self.max_iterations is not None and (not isinstance(self.max_iterations, int) or self.max_iterations <= 0):
            raise ValueError(f"max_iterations must be a positive integer, got {self.max_iterations!r}.")
        if isinstance(self.preconditioner, str) and self.preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"Unknown preconditioner {self.preconditioner!r}; choose one of {list(PRECONDITIONERS)}, a callable "
                "on rows, a tf.linalg.LinearOperator or a dense matrix."
            )
        rank = self.preconditioner_rank
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"preconditioner_rank must be a positive integer, got {rank!r}.")


class ConjugateGradientDescentIHVP(InverseHessianVectorProduct, name="cg"):
    """Preconditioned block conjugate gradient on ``(H + λI) x = v`` for every row of a block at once.

    Each right-hand side follows its own CG recursion, and every iteration applies the operator once to the rows that
    have not converged yet (one pass over the Hessian dataset for all of them); a converged row stops moving. Works
    for any model: it only needs Hessian-vector products. When the operator can be traced (closed-form or in-memory
    operators: :attr:`~influenciae.hessian.operator.RowOperator.traceable`) and so can the preconditioner, the whole
    solve is one ``tf.function`` (a ``tf.while_loop``), traced once per solver and dtype for any number of rows.
    Otherwise a Python loop calls the operator and one traced update per iteration.

    Preconditioners (``M ≈ (H+λI)⁻¹``; CG then solves the same system in fewer iterations when ``M`` captures the
    spread of the spectrum):

    - ``"diagonal"``: Jacobi, ``M = diag(C + λ)⁻¹`` with ``diag(C)`` the diagonal of the Gauss-Newton matrix fitted by
      :class:`~influenciae.hessian.diagonal.DiagonalIHVP` (one pass over the dataset; the empirical Fisher's for
      ``curvature="empirical_fisher"``). With an explicit ``operator=...`` it is the operator's exact diagonal.
    - ``"nystrom"``: Frangella, Tropp & Udell (2023), from the rank-``preconditioner_rank`` Nyström sketch
      ``Â = U diag(Λ) Uᵀ`` of the (undamped) curvature (:func:`~influenciae.hessian.nystrom.nystrom_sketch`, one
      block product): ``M = (Λ_r + λ) U (Λ + λ)⁻¹ Uᵀ + (I - U Uᵀ)``. The curvature must be positive semi-definite
      on the sketch (use ``curvature="ggn"`` otherwise). Without damping the sketch's smallest eigenvalue must be
      positive.
    - a callable on rows ``[n, P] -> [n, P]`` (applied eagerly: the solve then runs the Python loop), a
      ``tf.linalg.LinearOperator`` or a dense ``[P, P]`` matrix (both applied in the graph).

    Built like every solver (:class:`~influenciae.hessian.base.InverseHessianVectorProduct`: ``(model, dataset,
    options=None, *, damping=..., operator=..., curvature=..., curvature_options=..., **settings)``); its settings
    are the fields of :class:`CGOptions`, as keywords or as one ``options=`` instance. ``damping``: λ ≥ 0. CG needs
    a positive-definite operator; damping makes a PSD Hessian so.

    Attributes:
        info: :class:`ConvergenceInfo` of the last :meth:`solve`.

    Raises:
        ValueError: From :meth:`solve`, when CG meets a direction of non-positive curvature (the operator is not
            positive definite).

    Example:
        >>> ihvp = ConjugateGradientDescentIHVP(im, train_ds, damping=1e-3, preconditioner="nystrom")
        >>> x = ihvp.solve(v); ihvp.info.converged.all()
    """

    iterative = True  # every solve passes over the Hessian dataset: callers hand it large blocks

    options_class = CGOptions

    def _configure(self) -> None:
        options: CGOptions = self.options
        self.tolerance = float(default_tolerance(self.dtype) if options.tolerance is None else options.tolerance)
        self.max_iterations = options.max_iterations or min(self.nb_params, 200)
        preconditioner = options.preconditioner
        self._preconditioner_name = preconditioner if isinstance(preconditioner, str) else None
        self._preconditioner_rank = int(min(options.preconditioner_rank, self.nb_params))
        self._preconditioner: Preconditioner | None = (
            None if self._preconditioner_name is not None else preconditioner_of(preconditioner)
        )
        self.dense = options.dense
        self._graph_solves: dict[tuple[int, int | None], Any] = {}
        self._graph_failed = False
        self.info: ConvergenceInfo | None = None

    @property
    def preconditioner(self) -> Callable[[tf.Tensor], tf.Tensor] | None:
        """The preconditioner as a function on rows ``[n, P] -> [n, P]`` (built now if given by name), or None."""
        prepared = self._prepared_preconditioner()
        return None if prepared.kind == "none" else prepared.apply

    def configuration(self) -> dict[str, Any]:
        """See :meth:`InverseHessianVectorProduct.configuration`; a named preconditioner (and its rank) is a
        setting too."""
        configuration = super().configuration()
        if self._preconditioner_name is not None:
            configuration["preconditioner"] = self._preconditioner_name
            if self._preconditioner_name == "nystrom":
                configuration["preconditioner_rank"] = self._preconditioner_rank
        return configuration

    # ------------------------------------------------------------------ solve

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        preconditioner = self._prepared_preconditioner()
        operator = self._operator_for(int(vectors.shape[0]))
        bar = self.progress(self.max_iterations, "CG iterations")
        state = None
        if operator.traceable and preconditioner.traceable and not self._graph_failed:
            padded, length = self._static_rows(vectors)
            try:
                state = self._graph_function(operator, preconditioner, length)(
                    padded,  # zero rows: converged from the start
                    tf.constant(self.tolerance, self.dtype),
                    tf.constant(self.max_iterations, tf.int32),
                )
            except (ValueError, NotImplementedError, LookupError):
                # the operator's product could not be built inside the loop's graph (e.g. pfor cannot convert an
                # op): the Python loop calls it eagerly, where the operator falls back (and says so) itself
                self._graph_failed = True
            else:
                bar.update(int(state.iterations))
                state = _first_rows(state, int(vectors.shape[0]))
        if state is None:
            state = self._python_loop(operator, vectors, preconditioner, bar)
        iterations = int(state.iterations)
        bar.close()
        if bool(state.non_positive):
            raise ValueError(
                "Conjugate gradient met a direction of non-positive curvature: the Hessian (with damping "
                f"{self.damping}) is not positive definite. Add damping, or use ExactIHVP(method='eigh', "
                "allow_indefinite=True) or ArnoldiIHVP."
            )
        relative = (tf.norm(state.residual, axis=1) / state.norms).numpy()
        self.info = ConvergenceInfo(iterations, relative, relative <= self.tolerance, state.row_iterations.numpy())
        LOGGER.info(
            "CG: damping=%.3e, tolerance=%.1e, %d iterations, max relative residual %.2e, converged %d/%d.",
            self.damping,
            self.tolerance,
            iterations,
            float(relative.max()) if relative.size else 0.0,
            int(self.info.converged.sum()),
            int(relative.size),
        )
        if not self.info.converged.all():
            warnings.warn(
                f"Conjugate gradient stopped after {iterations} iterations with relative residuals up to "
                f"{relative.max():.2e} > tolerance {self.tolerance:.1e}. Raise max_iterations, add damping or "
                "use a preconditioner.",
                RuntimeWarning,
                stacklevel=3,
            )
        return state.solution

    def _operator_for(self, rows: int) -> RowOperator:
        """The operator CG iterates on for a block of ``rows`` right-hand sides (see :class:`CGOptions`)."""
        return self._dense_when_cheaper(rows * min(self.max_iterations, DENSE_ITERATION_ESTIMATE), self.dense)

    def _graph_function(self, operator: RowOperator, preconditioner: Preconditioner, length: int | None) -> Any:
        """The whole solve on ``operator`` as one ``tf.function``, traced once per solver, operator and static
        row count ``length`` (:meth:`_static_rows`): every iteration multiplies all ``length`` search directions
        (converged rows too), so the operator's vectorized product has a static shape and pads no further."""
        if (id(operator), length) not in self._graph_solves:
            product, apply = operator.matmul_rows, preconditioner.apply
            signature = [
                tf.TensorSpec([length, self.nb_params], self.dtype),
                tf.TensorSpec([], self.dtype),
                tf.TensorSpec([], tf.int32),
            ]

            def solve(right: tf.Tensor, tolerance: tf.Tensor, max_iterations: tf.Tensor) -> _State:
                state = _initial_state(right, apply, tolerance)

                def proceed(state: _State) -> tf.Tensor:
                    return tf.logical_and(
                        tf.logical_and(state.iterations < max_iterations, tf.reduce_any(state.active)),
                        tf.logical_not(state.non_positive),
                    )

                def iterate(state: _State) -> tuple[_State]:
                    rows = tf.where(state.active)[:, 0]
                    return (_step(state, rows, tf.gather(product(state.search), rows), apply, tolerance),)

                (state,) = tf.while_loop(proceed, iterate, (state,))
                return state

            self._graph_solves[(id(operator), length)] = tf.function(solve, input_signature=signature, autograph=False)
        return self._graph_solves[(id(operator), length)]

    def _python_loop(
        self, operator: RowOperator, vectors: tf.Tensor, preconditioner: Preconditioner, bar: Any
    ) -> _State:
        """Operator products in Python (only on the active rows); the rest of each iteration is one traced call."""
        tolerance = tf.constant(self.tolerance, self.dtype)
        by_tensors = preconditioner.function is None
        if by_tensors:
            functions = _loop_functions(self.dtype, preconditioner.kind)
            state = functions.initial(vectors, tolerance, *preconditioner.tensors)
        else:  # a function: applied eagerly, between the two traced halves of each step
            advance, finish = _halves()
            state = _initial_state(vectors, preconditioner.apply, tolerance)
        proceed, iterations = bool(tf.reduce_any(state.active)), 0
        while proceed and iterations < self.max_iterations:
            rows = tf.where(state.active)[:, 0]
            product = operator.matmul_rows(tf.gather(state.search, rows))
            iterations += 1
            bar.update(1)
            if by_tensors:
                state, flags = functions.step(state, rows, product, tolerance, *preconditioner.tensors)
            else:
                state, residual = advance(state, rows, product)
                state, flags = finish(state, rows, preconditioner.apply(residual), residual, tolerance)
            active, non_positive = flags.numpy()  # the one host round trip of the iteration
            proceed = bool(active) and not bool(non_positive)
        return state

    # ------------------------------------------------------------------ preconditioners

    def _prepared_preconditioner(self) -> Preconditioner:
        if self._preconditioner is None:
            if self._preconditioner_name == "diagonal":
                self._preconditioner = self._diagonal_preconditioner()
            elif self._preconditioner_name == "nystrom":
                self._preconditioner = self._nystrom_preconditioner()
            else:
                self._preconditioner = Preconditioner("none")
        return self._preconditioner

    def _diagonal_preconditioner(self) -> Preconditioner:
        if self.model is not None and self._hessian_dataset is not None and self.curvature != "operator":
            from influenciae.hessian.diagonal import DiagonalIHVP

            options: dict[str, Any] = {}
            if self.curvature != "hessian":  # the statistics of that curvature (expected, sampled or empirical)
                options["operator"] = self.hessian
            fitted = DiagonalIHVP(self.model, self._hessian_dataset, **options)
            fitted.show_progress = self.show_progress
            # the fitted curvature is diagonal: its product with a vector of ones is its diagonal
            diagonal = fitted.hessian.matmul_rows(tf.ones([1, self.nb_params], self.dtype))[0]
        else:
            diagonal = exact_diagonal(self.hessian)
        diagonal = diagonal + tf.constant(self.damping, self.dtype)
        # a direction without curvature in the estimate (a dead unit) keeps the identity's scale
        diagonal = tf.where(diagonal > 0, diagonal, tf.ones_like(diagonal))
        return Preconditioner("diagonal", (tf.math.reciprocal(diagonal),))

    def _nystrom_preconditioner(self) -> Preconditioner:
        from influenciae.hessian.nystrom import nystrom_sketch

        with self.pass_progress(f"rank-{self._preconditioner_rank} Nyström preconditioner"):
            values, vectors = nystrom_sketch(self.hessian, self._preconditioner_rank)
        damping = float(self.damping)
        smallest = float(values[-1]) + damping
        if not smallest > 0:
            raise ValueError(
                f"The rank-{self._preconditioner_rank} Nyström preconditioner has a zero eigenvalue (damping "
                f"{self.damping}): add damping (e.g. damping=1e-3) or lower preconditioner_rank."
            )
        # M v = v + U ((Λ_r + λ)/(Λ + λ) - 1) Uᵀ v  (Frangella et al., 2023, eq. 5.3)
        coefficients = smallest / (values + damping) - 1.0
        return Preconditioner(
            "low_rank", (tf.constant(vectors, dtype=self.dtype), tf.constant(coefficients, dtype=self.dtype))
        )


def default_tolerance(dtype: tf.DType) -> float:
    """CG's default relative-residual tolerance for ``dtype``: ``max(1e-8, 100 · eps)``."""
    return max(1e-8, 100.0 * float(np.finfo(dtype.as_numpy_dtype).eps))


# ---------------------------------------------------------------------- the iteration, in TensorFlow


class _State(tf.experimental.ExtensionType):
    """The block's CG state: per-row iterates and masks (rows ``[n]``, vectors ``[n, P]``)."""

    solution: tf.Tensor
    residual: tf.Tensor
    search: tf.Tensor
    residual_dot: tf.Tensor  # rᵀ M r per row
    norms: tf.Tensor  # ‖v‖ per row (1 for a zero row)
    active: tf.Tensor  # rows still moving
    row_iterations: tf.Tensor
    iterations: tf.Tensor
    non_positive: tf.Tensor  # a direction of non-positive curvature was met


def _first_rows(state: _State, rows: int) -> _State:
    """The state of the first ``rows`` rows (dropping a block's zero padding)."""
    return _State(
        solution=state.solution[:rows],
        residual=state.residual[:rows],
        search=state.search[:rows],
        residual_dot=state.residual_dot[:rows],
        norms=state.norms[:rows],
        active=state.active[:rows],
        row_iterations=state.row_iterations[:rows],
        iterations=state.iterations,
        non_positive=state.non_positive,
    )


def _initial_state(right: tf.Tensor, precondition: Callable[[tf.Tensor], tf.Tensor], tolerance: tf.Tensor) -> _State:
    norms = tf.norm(right, axis=1)
    norms = tf.where(norms == 0, tf.ones_like(norms), norms)
    search = precondition(right)
    count = tf.shape(right)[0]
    return _State(
        solution=tf.zeros_like(right),
        residual=right,
        search=search,
        residual_dot=tf.reduce_sum(right * search, axis=1),
        norms=norms,
        active=tf.norm(right, axis=1) / norms > tolerance,
        row_iterations=tf.zeros([count], tf.int32),
        iterations=tf.constant(0, tf.int32),
        non_positive=tf.constant(False),
    )


def _advance(state: _State, rows: tf.Tensor, product: tf.Tensor) -> tuple[_State, tf.Tensor]:
    """The step along the search directions of the active ``rows``; returns the new state and their residuals."""
    search = tf.gather(state.search, rows)
    curvature = tf.reduce_sum(search * product, axis=1)
    step = tf.gather(state.residual_dot, rows) / curvature
    solution = tf.gather(state.solution, rows) + step[:, None] * search
    residual = tf.gather(state.residual, rows) - step[:, None] * product
    index = rows[:, None]
    state = _State(
        solution=tf.tensor_scatter_nd_update(state.solution, index, solution),
        residual=tf.tensor_scatter_nd_update(state.residual, index, residual),
        search=state.search,
        residual_dot=state.residual_dot,
        norms=state.norms,
        active=state.active,
        row_iterations=tf.tensor_scatter_nd_add(state.row_iterations, index, tf.ones_like(rows, tf.int32)),
        iterations=state.iterations + 1,
        non_positive=tf.logical_or(state.non_positive, tf.reduce_any(curvature <= 0)),
    )
    return state, residual


def _finish(
    state: _State, rows: tf.Tensor, preconditioned: tf.Tensor, residual: tf.Tensor, tolerance: tf.Tensor
) -> _State:
    """New search directions and masks of the active ``rows`` from their preconditioned residuals."""
    preconditioned = tf.convert_to_tensor(preconditioned, state.residual.dtype)
    new_dot = tf.reduce_sum(residual * preconditioned, axis=1)
    search = preconditioned + (new_dot / tf.gather(state.residual_dot, rows))[:, None] * tf.gather(state.search, rows)
    index = rows[:, None]
    still = tf.norm(residual, axis=1) / tf.gather(state.norms, rows) > tolerance
    return _State(
        solution=state.solution,
        residual=state.residual,
        search=tf.tensor_scatter_nd_update(state.search, index, search),
        residual_dot=tf.tensor_scatter_nd_update(state.residual_dot, index, new_dot),
        norms=state.norms,
        active=tf.tensor_scatter_nd_update(state.active, index, still),
        row_iterations=state.row_iterations,
        iterations=state.iterations,
        non_positive=state.non_positive,
    )


def _step(
    state: _State,
    rows: tf.Tensor,
    product: tf.Tensor,
    precondition: Callable[[tf.Tensor], tf.Tensor],
    tolerance: tf.Tensor,
) -> _State:
    state, residual = _advance(state, rows, product)
    return _finish(state, rows, precondition(residual), residual, tolerance)


def _flags(state: _State) -> tf.Tensor:
    return tf.stack([tf.reduce_any(state.active), state.non_positive])


# ---------------------------------------------------------------------- preconditioners


# ---------------------------------------------------------------------- traced functions shared across solvers


@dataclasses.dataclass(frozen=True)
class _LoopFunctions:
    initial: Any
    step: Any


_LOOP_FUNCTIONS: dict[tuple[str, str], _LoopFunctions] = {}
_HALVES: dict[str, Any] = {}


def _loop_functions(dtype: tf.DType, kind: str) -> _LoopFunctions:
    """The Python loop's traced start and step for one dtype and preconditioner kind given by tensors, shared by
    every solver: the preconditioner's tensors are arguments, so a new solver does not trace again."""
    key = (tf.as_dtype(dtype).name, kind)
    if key not in _LOOP_FUNCTIONS:

        def initial(right: tf.Tensor, tolerance: tf.Tensor, *tensors: tf.Tensor) -> _State:
            return _initial_state(right, lambda rows: apply_preconditioner(kind, rows, *tensors), tolerance)

        def step(
            state: _State, rows: tf.Tensor, product: tf.Tensor, tolerance: tf.Tensor, *tensors: tf.Tensor
        ) -> tuple[_State, tf.Tensor]:
            state = _step(state, rows, product, lambda block: apply_preconditioner(kind, block, *tensors), tolerance)
            return state, _flags(state)

        _LOOP_FUNCTIONS[key] = _LoopFunctions(
            tf.function(initial, reduce_retracing=True, autograph=False),
            tf.function(step, reduce_retracing=True, autograph=False),
        )
    return _LOOP_FUNCTIONS[key]


def _halves() -> tuple[Any, Any]:
    """The step split around an eagerly applied preconditioner: ``advance`` (the step along the search directions)
    and ``finish`` (new directions and masks from the preconditioned residuals), each one traced call."""
    if not _HALVES:

        def finish(
            state: _State, rows: tf.Tensor, preconditioned: tf.Tensor, residual: tf.Tensor, tolerance: tf.Tensor
        ) -> tuple[_State, tf.Tensor]:
            state = _finish(state, rows, preconditioned, residual, tolerance)
            return state, _flags(state)

        _HALVES["advance"] = tf.function(_advance, reduce_retracing=True, autograph=False)
        _HALVES["finish"] = tf.function(finish, reduce_retracing=True, autograph=False)
    return _HALVES["advance"], _HALVES["finish"]
