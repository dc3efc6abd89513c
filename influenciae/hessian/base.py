"""The inverse-Hessian-vector-product interface and the registry every solver joins.

A solver sees a symmetric operator and vectors, nothing else: the constructor turns ``(model, dataset)`` into a
curvature operator once, at the boundary (the :class:`~influenciae.hessian.operator.HessianOperator` by default, or
a Gauss-Newton or Fisher operator of :mod:`influenciae.hessian.ggn` with ``curvature=...``), and the solver's
private hook ``_solve`` only ever calls ``self.operator.matmul_rows``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import numpy as np

from influenciae._backend import tf
from influenciae.cache.fingerprint import dataset_fingerprint
from influenciae.hessian.operator import RowOperator, as_row_operator, damped
from influenciae.hessian.registry import (
    SOLVER_REGISTRY,
    curvature_of,
    curvature_operator,
    get_ihvp,
    registered_solvers,
    resolve_solver,
)
from influenciae.model import InfluenceModel

__all__ = [
    "STATE_KINDS",
    "CurvatureRequest",
    "FittedState",
    "InverseHessianVectorProduct",
    "get_ihvp",
    "registered_solvers",
    "refuse_half_precision",
    "resolve_solver",
    "solver_options",
]


class InverseHessianVectorProduct(abc.ABC):
    """Base class of the inverse-HVP solvers: ``solve(V) = (H + damping·I)⁻¹ V`` row by row.

    Every solver is built the same way, ``Solver(model, dataset, options=None, *, damping=None, operator=None,
    curvature="hessian", curvature_options=None, **settings)``: its own settings are the fields of its
    :attr:`options_class` (a frozen dataclass validated on construction), given as keywords or as one instance.

    Args:
        model: The wrapped model whose training objective defines H.
        dataset: Batched dataset over which H is averaged (the training set, or a sample of it).
        options: The solver's settings as one :attr:`options_class` instance (instead of keywords).
        damping: Non-negative λ added to the diagonal, ``H + λI``; None for the solver's :attr:`default_damping`
            (0.0, or ``"auto"`` for the exact solver).
        operator: Use this symmetric operator (a ``RowOperator``, a ``tf.linalg.LinearOperator`` or a dense
            matrix) instead of the Hessian of ``model`` over ``dataset``; ``model``/``dataset`` may then be None.
        curvature: The matrix the solver inverts: ``"hessian"`` (default), ``"ggn"`` (generalized Gauss-Newton),
            ``"fisher"`` (true Fisher) or ``"empirical_fisher"``; see :mod:`influenciae.hessian.ggn`. Every
            registered solver accepts it through :func:`get_ihvp` (and the calculators' ``curvature=``).
        curvature_options: Options of the curvature operator, e.g. ``{"estimator": "sampled", "num_samples": 4}``
            for the Fisher.
        **settings: The fields of :attr:`options_class` as keywords.

    Attributes:
        curvature: The curvature's name (``"operator"`` for an explicit operator that is none of them).
        options: The validated :attr:`options_class` instance (None for a solver without settings).

    Subclasses register under a name (``class CG(InverseHessianVectorProduct, name="cg")``) and implement
    ``_solve(vectors [n, P]) -> [n, P]`` using only ``self.operator``; they set themselves up from
    :attr:`options` in ``_configure`` rather than in a constructor of their own.
    """

    name: ClassVar[str] = ""
    # True for solvers whose every solve passes over the Hessian dataset (CG, LiSSA): their cost per call does not
    # shrink with the number of right-hand sides, so callers should hand them large blocks.
    iterative: ClassVar[bool] = False
    # False for solvers that cannot work on an explicit curvature operator (operator=..., e.g. a distributed
    # Hessian): those that fit their own statistics from (model, dataset) (K-FAC, EK-FAC, diagonal) and the identity.
    takes_operator: ClassVar[bool] = True
    #: The kind of fitted state :meth:`export_state` hands to another process (one of :data:`STATE_KINDS`):
    #: ``"inverse"`` (the dense ``(H + λI)⁻¹``), ``"eigen"`` (eigenpairs of ``H + λI``) or ``"none"``.
    fitted_state: ClassVar[str] = "none"
    #: The solver registry's classes by name (:data:`~influenciae.hessian.registry.SOLVER_REGISTRY`).
    _registry: ClassVar[dict[str, type[InverseHessianVectorProduct]]] = SOLVER_REGISTRY.entries

    def __init_subclass__(cls, *, name: str | None = None, aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            SOLVER_REGISTRY.register(name, cls, aliases=aliases)

    #: The frozen dataclass of the solver's own settings (validated in its ``__post_init__``), or None when it has
    #: none besides the damping and the curvature. Its fields are accepted as keywords or as one ``options=``
    #: instance (:func:`solver_options`); the instance is kept in :attr:`options`.
    options_class: ClassVar[type | None] = None
    #: The damping used when none is given (``damping=None``).
    default_damping: ClassVar[float | str] = 0.0

    def __init__(
        self,
        model: InfluenceModel | None,
        dataset: tf.data.Dataset | None = None,
        options: Any | None = None,
        *,
        damping: float | str | None = None,
        operator: Any | None = None,
        curvature: str = "hessian",
        curvature_options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        if self.options_class is not None:
            options = solver_options(self.options_class, options, settings)  # takes the settings it names
        elif options is not None:
            settings["options"] = options
        if settings:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(settings)}.")
        self.options: Any = options
        self.model = model
        self._hessian_dataset = dataset
        self._hessian_dataset_fingerprint: dict[str, Any] | None = None
        self._show_progress = False
        self._dense_operator: RowOperator | None = None  # see _dense_when_cheaper
        base = self._base_operator(CurvatureRequest(model, dataset, operator, curvature, curvature_options))
        self.damping = self._damping_value(self.default_damping if damping is None else damping)
        self.hessian: RowOperator = base
        self.operator: RowOperator = self._damped_operator(base, self.damping)
        self.curvature = curvature_of(base)
        self._configure()

    def _base_operator(self, request: CurvatureRequest) -> RowOperator:
        """The undamped curvature the solver inverts: the explicit operator, or the named curvature of the model
        over the dataset (a solver that fits its own operator overrides this)."""
        named = request.named()
        if named is not None:
            return named
        if request.model is None or request.dataset is None:
            raise ValueError(
                f"{type(self).__name__} needs a model and a dataset to build the Hessian (or an explicit operator=...)."
            )
        return curvature_operator("hessian", request.model, request.dataset)

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The names of the solver's own settings (the fields of :attr:`options_class`), as keywords."""
        if cls.options_class is None:
            return ()
        return tuple(field.name for field in dataclasses.fields(cls.options_class))

    def _damping_value(self, damping: float | str) -> float:
        """The numeric λ of the ``damping`` argument (the exact solver's ``"auto"`` overrides this)."""
        if isinstance(damping, str):
            raise ValueError(f"damping must be a non-negative number, got {damping!r}.")
        return damping

    def _static_rows(self, vectors: tf.Tensor) -> tuple[tf.Tensor, int | None]:
        """``vectors`` padded with zero rows to the static row count a traced solve takes, and that count.

        With a model, one of :meth:`InfluenceModel._static_length`'s lengths (at most the next power of two): its
        vectorized product inside the loop then pads no further. Without one, ``None`` (plain matmuls: no padding).
        """
        if self.model is None:
            return vectors, None
        rows = int(vectors.shape[0])
        length = self.model._static_length("solve_rows", rows, 1 << max(rows - 1, 0).bit_length())
        return tf.pad(vectors, [[0, length - rows], [0, 0]]), length

    def _dense_when_cheaper(self, products: int, dense: bool | None) -> RowOperator:
        """The operator an iterative solve runs on: :attr:`operator`, or its dense matrix (formed once in blocks of
        products, then kept) when ``dense`` is True, or when it is None and the solve's ``products`` (rows times
        steps) reach the ``P`` products of forming it, for an operator that reads a dataset and ``P ≤
        DENSE_MAX_PARAMS``: the same system, with no pass over the data per step."""
        if self._dense_operator is not None:
            return self._dense_operator
        if dense is None:
            size = self.nb_params
            dense = self.operator.passes_over_data and size <= DENSE_MAX_PARAMS and products >= size
        if not dense:
            return self.operator
        self._dense_operator = as_row_operator(self._dense_matrix())
        return self._dense_operator

    def _dense_matrix(self) -> tf.Tensor:
        """``H + λI`` formed densely (``P`` products, in blocks) and symmetrized: ``[P, P]``."""
        with self.pass_progress(f"dense {self.nb_params}x{self.nb_params} curvature"):
            dense = self.operator.to_dense()
        return (dense + tf.transpose(dense)) / 2.0

    def _configure(self) -> None:  # noqa: B027  (a hook: solvers without settings have nothing to set up)
        """Set the solver up from :attr:`options` once the operator exists (``nb_params`` and ``dtype`` known)."""

    def _damped_operator(self, base: RowOperator, damping: float) -> RowOperator:
        """The operator the solver inverts, ``H + λI`` (a solver with its own damping rule overrides this)."""
        return damped(base, damping)

    @property
    def show_progress(self) -> bool:
        """Whether the solver's iterative phases (dense build, CG iterations, LiSSA steps, Arnoldi steps) show a
        tqdm bar. Not part of :meth:`configuration`; a calculator's ``show_progress=True`` sets it."""
        return self._show_progress

    @show_progress.setter
    def show_progress(self, value: bool) -> None:
        self._show_progress = bool(value)

    def progress(self, total: int, description: str) -> Any:
        """A tqdm bar over ``total`` steps when :attr:`show_progress`, else a silent stand-in (``update``, ``close``).

        Args:
            total: Expected number of steps.
            description: What the steps are (shown after the solver's name).
        """
        if not self._show_progress:
            return _NoProgress()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{type(self).__name__}: {description}", leave=False, dynamic_ncols=True)

    @contextlib.contextmanager
    def pass_progress(self, description: str) -> Iterator[None]:
        """Show a per-batch tqdm bar on the curvature's passes over the data inside the block (when
        :attr:`show_progress`): the one long pass of a dense Hessian build or a Nyström sketch.

        Args:
            description: What the pass computes (shown after the solver's name).
        """
        if not self._show_progress or not hasattr(self.hessian, "progress_description"):
            yield
            return
        previous = self.hessian.progress_description
        self.hessian.progress_description = f"{type(self).__name__}: {description}"
        try:
            yield
        finally:
            self.hessian.progress_description = previous

    #: Attributes that report what a solve did rather than how the solver is set up: never part of
    #: :meth:`configuration` (a CG solve sets ``info``; a cache written after it must still match the next pass).
    result_attributes: ClassVar[frozenset[str]] = frozenset({"info", "timings"})

    def configuration(self) -> dict[str, Any]:
        """The solver's name and settings (stored in cache manifests so different settings never mix).

        Settings only: the scalar attributes (damping, tolerance, ...) except the results of the last solve
        (:attr:`result_attributes`, e.g. CG's convergence ``info``), the curvature (``"curvature"``) and, for
        Gauss-Newton and Fisher operators, their options (``"curvature_options"``), and a fingerprint of the
        Hessian dataset (``"hessian_dataset"``: its examples as a multiset, so order and batching do not matter;
        computed once per solver, in one pass over the dataset).
        """
        settings = {
            name: value
            for name, value in vars(self).items()
            if not name.startswith("_")
            and name not in self.result_attributes
            and isinstance(value, (bool, int, float, str, type(None)))
        }
        described = getattr(self.hessian, "configuration", None)
        options = {key: value for key, value in described().items() if key != "curvature"} if described else {}
        dataset = self.hessian_dataset_fingerprint()
        return {
            "name": self.name,
            **settings,
            **({"curvature_options": options} if options else {}),
            **({"hessian_dataset": dataset} if dataset is not None else {}),
        }

    def hessian_dataset_fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint of the dataset H is averaged over
        (:func:`~influenciae.cache.fingerprint.dataset_fingerprint`, order-invariant), or None for an explicit
        operator without a dataset. Computed once, then kept."""
        if self._hessian_dataset_fingerprint is None:
            dataset = getattr(self, "_hessian_dataset", None)
            if dataset is None:
                dataset = getattr(self, "dataset", None)
            if dataset is None:
                return None
            self._hessian_dataset_fingerprint = dataset_fingerprint(dataset, order_invariant=True)
        return dict(self._hessian_dataset_fingerprint)

    @property
    def nb_params(self) -> int:
        """P, the number of parameters the vectors live in."""
        return self.operator.num_params

    @property
    def dtype(self) -> tf.DType:
        """The dtype solutions are computed in (that of the watched weights)."""
        return self.operator.dtype

    def solve(self, vectors: Any) -> tf.Tensor:
        """``(H + λI)⁻¹ v`` for each row ``v``.

        Args:
            vectors: ``[n, P]`` (a single ``[P]`` vector is accepted and returned as ``[1, P]``).

        Returns:
            Tensor ``[n, P]``.

        Raises:
            ValueError: On a shape mismatch, or when the solver produced a non-finite result.
        """
        vectors = self._check_vectors(vectors)
        solution = self._solve(vectors)
        if not bool(tf.reduce_all(tf.math.is_finite(solution))):
            raise ValueError(
                f"{type(self).__name__} produced non-finite values: the Hessian is probably singular or "
                "indefinite here. Add damping (e.g. damping=1e-3) or use another solver."
            )
        return solution

    def hvp(self, vectors: Any) -> tf.Tensor:
        """``(H + λI) v`` for each row ``v``: ``[n, P] -> [n, P]``."""
        return self.operator.matmul_rows(self._check_vectors(vectors))

    def export_state(self, kind: str = "auto") -> FittedState:
        """The solver's fitted state as arrays, for a process that solves without the data (distributed scoring).

        Args:
            kind: ``"auto"`` (the solver's own :attr:`fitted_state`), ``"none"`` (no arrays) or the solver's kind.

        Returns:
            The :class:`FittedState`; :meth:`from_state` solves with it.

        Raises:
            ValueError: For a kind this solver cannot export.
        """
        kind = self.fitted_state if kind == "auto" else kind
        if kind not in STATE_KINDS:
            raise ValueError(f"preconditioner must be 'auto' or one of {STATE_KINDS}, got {kind!r}.")
        if kind == "none":
            return FittedState("none", {})
        if kind != self.fitted_state:
            raise ValueError(
                f"preconditioner={kind!r} needs a solver that exports it ({_EXPORTERS[kind]}); "
                f"{type(self).__name__} exports {self.fitted_state!r}."
            )
        return FittedState(kind, self._state_arrays())

    def _state_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of :attr:`fitted_state` (solvers that export one override this)."""
        return {}

    @staticmethod
    def from_state(state: FittedState, dtype: Any = tf.float64) -> InverseHessianVectorProduct:
        """A solver that solves with an exported state, without data: ``v ↦ v Mᵀ`` for ``"inverse"``,
        ``v ↦ (v Uᵀ / Λ) U`` for ``"eigen"``; its operator is the matrix the state inverts.

        Args:
            state: From :meth:`export_state` (not ``"none"``).
            dtype: The dtype of the solutions.

        Raises:
            ValueError: For a ``"none"`` state.
        """
        if state.kind == "inverse":
            inverse = np.asarray(state.arrays["inverse"], dtype=np.float64)
            return _StoredSolver(state, np.linalg.inv(inverse), dtype)
        if state.kind == "eigen":
            values = np.asarray(state.arrays["eigenvalues"], dtype=np.float64)
            vectors = np.asarray(state.arrays["eigenvectors"], dtype=np.float64)
            return _StoredSolver(state, (vectors.T * values) @ vectors, dtype)
        raise ValueError("A 'none' state has nothing to solve with: export an 'inverse' or 'eigen' state.")

    @abc.abstractmethod
    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        """Solve for validated rows ``[n, P]`` in ``self.dtype``."""

    def _check_vectors(self, vectors: Any) -> tf.Tensor:
        vectors = tf.convert_to_tensor(vectors)
        if vectors.shape.rank == 1:
            vectors = vectors[None]
        if vectors.shape.rank != 2 or vectors.shape[-1] != self.nb_params:
            raise ValueError(
                f"vectors must have shape [n, {self.nb_params}] (one vector per row), got {vectors.shape}."
            )
        if not vectors.dtype.is_floating:
            raise TypeError(f"vectors must be floating point, got {vectors.dtype.name}.")
        return tf.cast(vectors, self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nb_params={self.nb_params}, damping={self.damping})"


@dataclasses.dataclass(frozen=True)
class CurvatureRequest:
    """What a solver was asked to invert, as given to its constructor (see :class:`InverseHessianVectorProduct`).

    Attributes:
        model: The wrapped model, or None with an explicit operator.
        dataset: The curvature dataset, or None.
        operator: An explicit operator, or None.
        curvature: The curvature's name.
        curvature_options: Options of the curvature operator, or None.
    """

    model: InfluenceModel | None
    dataset: Any | None
    operator: Any | None = None
    curvature: str = "hessian"
    curvature_options: dict[str, Any] | None = None

    def named(self) -> RowOperator | None:
        """The explicit operator (as a row operator), the named curvature built over ``(model, dataset)``, or None
        when neither was asked for (the default Hessian).

        Raises:
            ValueError: If both an operator and a curvature are given, or a curvature without a model and a dataset.
        """
        if self.operator is not None:
            if self.curvature != "hessian" or self.curvature_options:
                raise ValueError(
                    "Pass either operator=... or curvature=..., not both: an explicit operator is the curvature."
                )
            return as_row_operator(self.operator)
        if self.curvature == "hessian" and not self.curvature_options:
            return None
        if self.model is None or self.dataset is None:
            raise ValueError(f"curvature={self.curvature!r} needs a model and a dataset.")
        return curvature_operator(self.curvature, self.model, self.dataset, **(self.curvature_options or {}))


DENSE_MAX_PARAMS = 4096
"""Largest P for which an iterative solver's ``dense=None`` forms the dense matrix (``P²`` numbers: 64 MiB in float32
at 4,096)."""

OptionsT = TypeVar("OptionsT")


def solver_options(options_class: type[OptionsT], options: OptionsT | None, settings: dict[str, Any]) -> OptionsT:
    """A solver's frozen option dataclass: ``options`` as given, or built (and so validated, in its
    ``__post_init__``) from the keyword arguments in ``settings`` that name its fields, which are removed from
    ``settings`` (the rest go to :class:`InverseHessianVectorProduct`).

    Raises:
        TypeError: If ``options`` is not an ``options_class``.
        ValueError: If options come both as ``options=`` and as keyword arguments.
    """
    names = {field.name for field in dataclasses.fields(options_class)}  # type: ignore[arg-type]
    given = {name: settings.pop(name) for name in list(settings) if name in names}
    if options is None:
        return options_class(**given)
    if not isinstance(options, options_class):
        raise TypeError(f"options must be a {options_class.__name__}, got {type(options).__name__}.")
    if given:
        raise ValueError(f"Pass options either as options={options_class.__name__}(...) or as keywords, not both.")
    return options


STATE_KINDS = ("inverse", "eigen", "none")
"""The kinds of fitted state a solver exports (:meth:`InverseHessianVectorProduct.export_state`)."""

_EXPORTERS = {"inverse": "ExactIHVP, the dense inverse is P x P", "eigen": "ArnoldiIHVP, its low-rank eigenpairs"}


@dataclasses.dataclass(frozen=True)
class FittedState:
    """What a fitted solver hands to a process that solves without the data.

    Attributes:
        kind: One of :data:`STATE_KINDS`.
        arrays: ``{"inverse": [P, P]}`` (symmetrized ``(H + λI)⁻¹``), ``{"eigenvalues": [k], "eigenvectors": [k, P]}``
            (of ``H + λI``, orthonormal rows) or ``{}``.
    """

    kind: str
    arrays: dict[str, np.ndarray]


class _StoredSolver(InverseHessianVectorProduct):
    """Solves with a :class:`FittedState` (see :meth:`InverseHessianVectorProduct.from_state`)."""

    def __init__(self, state: FittedState, matrix: np.ndarray, dtype: Any) -> None:
        super().__init__(None, None, operator=tf.constant((matrix + matrix.T) / 2.0, dtype=dtype))
        self._kind = state.kind
        self._arrays = {key: tf.constant(value, dtype=dtype) for key, value in state.arrays.items()}

    def export_state(self, kind: str = "auto") -> FittedState:
        if kind not in ("auto", self._kind):
            return super().export_state(kind)  # "none", or refused
        return FittedState(self._kind, {key: value.numpy() for key, value in self._arrays.items()})

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        if self._kind == "inverse":
            return tf.matmul(vectors, self._arrays["inverse"], transpose_b=True)
        basis = self._arrays["eigenvectors"]
        return tf.matmul(tf.matmul(vectors, basis, transpose_b=True) / self._arrays["eigenvalues"], basis)


class _NoProgress:
    def update(self, count: int = 1) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


def relative_tolerance(dtype: tf.DType) -> float:
    """A size-aware threshold below which an eigenvalue counts as zero for ``dtype``."""
    return float(np.finfo(dtype.as_numpy_dtype).eps)


def refuse_half_precision(dtype: tf.DType, solver: str, what: str) -> None:
    """Refuse float16/bfloat16 curvature where the linear algebra has no accurate (or any) half-precision kernel.

    Args:
        dtype: The dtype the solver would factorize or decompose in (the watched weights').
        solver: The solver's name, for the message.
        what: What it computes in that dtype (e.g. ``"eigendecompositions of its Kronecker factors"``).

    Raises:
        TypeError: If ``dtype`` is not float32 or float64, with what to do.
    """
    if tf.as_dtype(dtype) not in (tf.float32, tf.float64):
        raise TypeError(
            f"{solver} computes {what} in {tf.as_dtype(dtype).name}, which TensorFlow/NumPy do not support "
            "accurately (or at all). Watch float32 weights (e.g. keras.mixed_precision with float32 variables), "
            "or cast the model to float32."
        )
