"""The two registries of :mod:`influenciae.hessian`: inverse-HVP solvers and curvatures, and the one way to resolve a
solver.

* :data:`SOLVER_REGISTRY`: every solver class joins it by subclassing
  ``InverseHessianVectorProduct`` with a name (``class CG(InverseHessianVectorProduct, name="cg")``);
  :func:`registered_solvers` lists the names.
* :data:`CURVATURE_REGISTRY`: the curvature operators a solver can invert (``"hessian"``, ``"ggn"``, ``"fisher"``,
  ``"empirical_fisher"``, registered by :mod:`influenciae.hessian.ggn`); :func:`curvature_operator` builds one by
  name and :func:`curvature_of` names an operator.
* :func:`resolve_solver`: the one rule for turning a name or an instance (plus ``damping`` and options) into a
  solver, used by every calculator, the CLI and the distributed code.

The damping rule (the same everywhere):

* **a name** builds the registered solver with ``damping`` when it is given; ``damping=None`` keeps that solver's
  own default (:class:`~influenciae.hessian.exact.ExactIHVP`: ``"auto"``, every other solver: 0);
* **an instance** is returned as is and keeps its own damping: ``damping`` must then be None or 0 (nothing asked),
  and neither options nor a curvature other than the Hessian may be given (they configure a solver given by name);
  otherwise :class:`ValueError`.

This module imports no TensorFlow and nothing else of the package at import time, so any module may import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from influenciae.hessian.base import InverseHessianVectorProduct
    from influenciae.hessian.operator import RowOperator
    from influenciae.model import InfluenceModel

__all__ = [
    "CURVATURE_REGISTRY",
    "SOLVER_REGISTRY",
    "Registry",
    "curvature_of",
    "curvature_operator",
    "get_ihvp",
    "registered_solvers",
    "resolve_solver",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (solver classes, curvature factories), with optional aliases.

    Names keep their registration order; an alias resolves to its name but is not listed by :meth:`names`.

    Args:
        kind: What the entries are, for error messages (e.g. ``"inverse-HVP solver"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T, *, aliases: tuple[str, ...] = ()) -> T:
        """Add (or replace) ``entry`` under ``name`` and its ``aliases``; returns ``entry``.

        Raises:
            ValueError: If an alias is already a registered name.
        """
        self.entries[name] = entry
        for alias in aliases:
            if alias in self.entries:
                raise ValueError(f"Alias {alias!r} is already a registered {self.kind}.")
            self._aliases[alias] = name
        return entry

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (itself or the name an alias stands for).

        Raises:
            ValueError: For an unknown name, listing the registered ones.
        """
        name = self._aliases.get(name, name)
        if name not in self.entries:
            raise ValueError(f"Unknown {self.kind} {name!r}; choose one of {sorted(self.entries)}.")
        return name

    def get(self, name: str) -> T:
        """The entry registered under ``name`` (or an alias). Raises ValueError for an unknown name."""
        return self.entries[self.canonical(name)]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (aliases excluded)."""
        return tuple(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.entries)})"


SOLVER_REGISTRY: Registry[type[InverseHessianVectorProduct]] = Registry("inverse-HVP solver")
"""Solver classes by name; a subclass of ``InverseHessianVectorProduct`` with ``name=...`` joins it."""

CURVATURE_REGISTRY: Registry[Any] = Registry("curvature")
"""Curvature operator factories ``(model, dataset, **options) -> RowOperator`` by name (:mod:`~.ggn` fills it)."""


def registered_solvers(*, operator_only: bool = False) -> list[str]:
    """Names accepted by :func:`resolve_solver`, sorted.

    Args:
        operator_only: Only the solvers that work on any curvature operator (``operator=...``, e.g. a distributed
            Hessian), leaving out those that fit their own statistics from the data (K-FAC, EK-FAC, diagonal) and
            the identity.
    """
    return sorted(name for name, cls in SOLVER_REGISTRY.entries.items() if cls.takes_operator or not operator_only)


def resolve_solver(
    spec: str | InverseHessianVectorProduct,
    model: InfluenceModel | None,
    dataset: Any | None,
    *,
    damping: float | None = None,
    curvature: str = "hessian",
    curvature_options: dict[str, Any] | None = None,
    **options: Any,
) -> InverseHessianVectorProduct:
    """The solver for a registered name or an instance, by the one damping rule of this module.

    Args:
        spec: A registered name (``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``, ...) or an already built solver.
        model: The wrapped model (may be None for a name given with ``operator=...``).
        dataset: The Hessian dataset ``tf.data.Dataset`` (may be None likewise).
        damping: λ ≥ 0 for a solver built by name (None: the solver's own default); with an instance, None or 0.
        curvature: For a name: the curvature to invert, one of :data:`CURVATURE_REGISTRY` (default the Hessian).
            Every solver takes it (``InverseHessianVectorProduct``'s ``curvature=``).
        curvature_options: Options of that curvature operator (e.g. ``{"estimator": "sampled"}`` for the Fisher).
        **options: Other options of the solver's constructor (``tolerance``, ``subspace_dim``, ``operator``...).

    Returns:
        The solver. An instance given with a ``model`` must work on ``model.nb_params`` parameters.

    Raises:
        ValueError: For an unknown name, options or damping next to an instance, ``operator`` with a curvature, or
            an instance built for another model.
        TypeError: If ``spec`` is neither a name nor a solver.
    """
    from influenciae.hessian.base import InverseHessianVectorProduct

    if isinstance(spec, InverseHessianVectorProduct):
        if damping or options:
            given = sorted({**options, **({"damping": damping} if damping else {})})
            raise ValueError(
                f"Solver options {given} cannot be applied to an already built solver: damping and options "
                "configure a solver given by name; set them on the instance."
            )
        if curvature != "hessian" or curvature_options:
            raise ValueError(
                "curvature configures a solver given by name; build the instance with curvature=... instead "
                "(e.g. resolve_solver('cg', model, dataset, curvature='ggn'))."
            )
        if model is not None and spec.nb_params != model.nb_params:
            raise ValueError(
                f"The solver works on {spec.nb_params} parameters but the model watches {model.nb_params}; build "
                "the solver from the same InfluenceModel."
            )
        return spec
    if isinstance(spec, str):
        solver_class = SOLVER_REGISTRY.get(spec)
        if damping is not None:
            options["damping"] = damping
        # every solver takes the curvature itself (InverseHessianVectorProduct's CurvatureRequest checks it)
        return solver_class(model, dataset, curvature=curvature, curvature_options=curvature_options, **options)
    raise TypeError(
        f"ihvp_calculator must be a solver name {registered_solvers()} or an InverseHessianVectorProduct, "
        f"got {type(spec).__name__}."
    )


def get_ihvp(
    spec: str | InverseHessianVectorProduct,
    model: InfluenceModel | None,
    dataset: Any | None,
    **kwargs: Any,
) -> InverseHessianVectorProduct:
    """:func:`resolve_solver` under its historical name (same arguments, same rule)."""
    return resolve_solver(spec, model, dataset, **kwargs)


def curvature_operator(curvature: str, model: InfluenceModel, dataset: Any, **options: Any) -> RowOperator:
    """Build the curvature operator named ``curvature`` over ``dataset``.

    Args:
        curvature: A name of :data:`CURVATURE_REGISTRY`: ``"hessian"``, ``"ggn"``, ``"fisher"`` or
            ``"empirical_fisher"``.
        model: The wrapped model.
        dataset: The curvature dataset.
        **options: Options of the operator (e.g. ``estimator="sampled", num_samples=4`` for the Fisher).

    Raises:
        ValueError: For an unknown name or options the operator does not take.
    """
    import influenciae.hessian.ggn  # noqa: F401  (registers the built-in curvatures)

    if curvature not in CURVATURE_REGISTRY:
        raise ValueError(f"Unknown curvature {curvature!r}; choose one of {list(CURVATURE_REGISTRY.names())}.")
    factory = CURVATURE_REGISTRY.get(curvature)
    try:
        return factory(model, dataset, **options)  # type: ignore[no-any-return]
    except TypeError as error:
        if "unexpected keyword" not in str(error):
            raise
        raise ValueError(f"Invalid options {sorted(options)} for curvature {curvature!r}: {error}.") from error


def curvature_of(operator: Any) -> str:
    """The curvature name of an operator (its class's ``curvature`` when registered), or ``"operator"``."""
    name = getattr(type(operator), "curvature", "")
    return name if isinstance(name, str) and name in CURVATURE_REGISTRY.entries else "operator"
