"""Exact inverse-HVPs through the dense Hessian (small models: P up to a few thousand)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np

from influenciae._backend import tf
from influenciae.hessian.base import InverseHessianVectorProduct, refuse_half_precision, relative_tolerance
from influenciae.hessian.operator import damped

__all__ = ["AUTO_DAMPING_FRACTION", "ExactIHVP", "ExactOptions", "PseudoInverseIHVP", "PseudoInverseOptions"]

LOGGER = logging.getLogger("influenciae")

AUTO_DAMPING_FRACTION = 1e-3
"""``damping="auto"`` (exact solver, TRAK) uses this fraction of the curvature's mean eigenvalue ``trace / P``
when the matrix is singular."""


@dataclasses.dataclass(frozen=True)
class ExactOptions:
    """The settings of :class:`ExactIHVP`, validated on construction.

    Attributes:
        method: ``"cholesky"`` or ``"eigh"``.
        allow_indefinite: Accept negative eigenvalues with ``method="eigh"``.
        pseudo_inverse: Moore-Penrose pseudo-inverse through ``eigh``: eigenvalues of magnitude at most
            ``eps · P · max|λ|`` are dropped (their directions map to 0).
        max_params: Refuse to form a dense matrix beyond this many parameters (P² memory).
    """

    method: str = "cholesky"
    allow_indefinite: bool = False
    pseudo_inverse: bool = False
    max_params: int = 20_000

    def __post_init__(self) -> None:
        if not isinstance(self.pseudo_inverse, (bool, np.bool_)):
            raise TypeError(f"pseudo_inverse must be True or False, got {self.pseudo_inverse!r}.")
        if self.method not in ("cholesky", "eigh"):
            raise ValueError(f"method must be 'cholesky' or 'eigh', got {self.method!r}.")


@dataclasses.dataclass(frozen=True)
class PseudoInverseOptions(ExactOptions):
    """:class:`ExactOptions` of the ``"pinv"`` solver: ``pseudo_inverse`` defaults to True."""

    pseudo_inverse: bool = True


class ExactIHVP(InverseHessianVectorProduct, name="exact"):
    """Form ``H + λI`` densely and factorize it once (lazily, on first use).

    ``method="cholesky"`` (default) needs a positive-definite matrix and says how much damping would make it so;
    ``method="eigh"`` inverts through the eigendecomposition and can accept an indefinite (but non-singular) matrix
    with ``allow_indefinite=True``, as in Koh & Liang's non-convex experiments.

    ``damping="auto"`` (the default) inverts H itself when it is numerically positive definite and, when it is not
    (a softmax classifier's Hessian has an exact null direction, which rounding makes slightly negative), adds
    ``λ = max(AUTO_DAMPING_FRACTION · trace(H) / P, 2 · max(-λ_min, 0))``: 1e-3 of its mean eigenvalue (the exact
    trace of the built matrix) for a singular H, twice the most negative eigenvalue for weights not at a minimum,
    logs the choice (logger ``"influenciae"``) and records it in :attr:`info` and :attr:`damping`. ``damping=0.0``
    means exactly zero (and refuses a singular H); ``pseudo_inverse=True`` (or the solver name ``"pinv"``) inverts
    only the eigenvalues above rounding and sends the null space to zero.

    Built like every solver (:class:`~influenciae.hessian.base.InverseHessianVectorProduct`: ``(model, dataset,
    options=None, *, damping=..., operator=..., curvature=..., curvature_options=..., **settings)``); its settings
    are the fields of :class:`ExactOptions`, as keywords or as one ``options=`` instance. ``damping``: λ ≥ 0, or
    ``"auto"`` (default; see above).

    Example:
        >>> ihvp = ExactIHVP(im, train_ds, damping=1e-3)
        >>> x = ihvp.solve(gradients)  # [n, P]
    """

    fitted_state = "inverse"

    options_class = ExactOptions
    default_damping: ClassVar[float | str] = "auto"

    def _damping_value(self, damping: float | str) -> float:
        if isinstance(damping, str) and damping != "auto":
            raise ValueError(f"damping must be a non-negative number or 'auto', got {damping!r}.")
        self.auto_damping = damping == "auto" and not self.options.pseudo_inverse
        return 0.0 if isinstance(damping, str) else damping

    def _configure(self) -> None:
        options: ExactOptions = self.options
        if self.nb_params > options.max_params:
            raise ValueError(
                f"ExactIHVP forms a dense {self.nb_params}x{self.nb_params} Hessian, above "
                f"max_params={options.max_params}. Use 'cg', 'lissa' or 'arnoldi', watch fewer weights "
                "(start_layer/last_layer), or raise max_params."
            )
        self.method = "eigh" if options.pseudo_inverse else options.method
        self.allow_indefinite = options.allow_indefinite
        self.pseudo_inverse = bool(options.pseudo_inverse)
        #: What the factorization chose: ``{"damping", "auto_damping", "mean_eigenvalue", "dropped_eigenvalues"}``.
        self.info: dict[str, Any] = {}
        self._matrix: tf.Tensor | None = None
        self._factor: tf.Tensor | None = None
        self._eigenvalues: tf.Tensor | None = None
        self._eigenvectors: tf.Tensor | None = None

    @property
    def matrix(self) -> tf.Tensor:
        """The dense, symmetrized ``H + λI`` ``[P, P]``."""
        if self._matrix is None:
            self._matrix = self._dense_matrix()
        return self._matrix

    def _state_arrays(self) -> dict[str, np.ndarray]:
        inverse = self.solve(tf.eye(self.nb_params, dtype=self.dtype)).numpy()
        return {"inverse": (inverse + inverse.T) / 2.0}

    def configuration(self) -> dict[str, Any]:
        """See :meth:`InverseHessianVectorProduct.configuration`; with ``damping="auto"`` the chosen damping is
        part of it, so the matrix is factorized first."""
        if self.auto_damping:
            self._ensure_factorized()
        return super().configuration()

    def _ensure_factorized(self) -> None:
        if self._factor is None and self._eigenvalues is None:
            self._factorize()

    def _factorize(self) -> None:
        self._check_dtype()
        if self.pseudo_inverse:
            self._factorize_pseudo_inverse()
            return
        if self.auto_damping:
            try:
                self._factorize_damped()
                self._record(auto=False)
                return
            except ValueError:
                undamped = self.matrix
                mean = float(tf.linalg.trace(undamped)) / self.nb_params
                if not mean > 0:
                    raise
                smallest = float(tf.reduce_min(tf.linalg.eigvalsh(undamped)))
                # a singular H (rounding makes its null directions about -1e-9): a small fraction of the mean
                # eigenvalue; a truly indefinite H (weights not at a minimum): twice its most negative eigenvalue
                chosen = max(AUTO_DAMPING_FRACTION * mean, 2.0 * max(-smallest, 0.0))
                self.damping = chosen
                self._matrix = undamped + chosen * tf.eye(self.nb_params, dtype=undamped.dtype)
                self.operator = damped(self.hessian, chosen)
                self._factorize_damped()
                self._record(auto=True, mean=mean, smallest=smallest)
                return
        self._factorize_damped()
        self._record(auto=False)

    def _record(self, *, auto: bool, mean: float | None = None, smallest: float | None = None) -> None:
        self.info = {
            "damping": self.damping,
            "auto_damping": auto,
            "mean_eigenvalue": mean,
            "smallest_eigenvalue": smallest,
        }
        if auto:
            LOGGER.info(
                "ExactIHVP: the Hessian is singular or not positive definite; damping='auto' chose damping=%.3e "
                "= max(%.0e x mean eigenvalue %.3e, 2 x -smallest eigenvalue %.3e).",
                self.damping,
                AUTO_DAMPING_FRACTION,
                mean,
                smallest,
            )
        else:
            LOGGER.info("ExactIHVP: damping=%.3e, method=%s.", self.damping, self.method)

    def _check_dtype(self) -> None:
        refuse_half_precision(self.dtype, "ExactIHVP", "a Cholesky factorization / eigendecomposition of H")

    def _factorize_pseudo_inverse(self) -> None:
        eigenvalues, eigenvectors = tf.linalg.eigh(self.matrix)
        magnitude = tf.abs(eigenvalues)
        threshold = relative_tolerance(self.dtype) * self.nb_params * float(tf.reduce_max(magnitude))
        keep = magnitude > threshold
        self._eigenvalues = tf.boolean_mask(eigenvalues, keep)
        self._eigenvectors = tf.boolean_mask(eigenvectors, keep, axis=1)
        dropped = int(self.nb_params - int(tf.reduce_sum(tf.cast(keep, tf.int32))))
        self.info = {"damping": self.damping, "auto_damping": False, "dropped_eigenvalues": dropped}
        LOGGER.info("ExactIHVP: pseudo-inverse, %d of %d eigenvalues dropped as zero.", dropped, self.nb_params)

    def _factorize_damped(self) -> None:
        matrix = self.matrix
        if self.method == "cholesky":
            try:
                factor = tf.linalg.cholesky(matrix)
            except tf.errors.InvalidArgumentError:
                factor = None
            if factor is not None and bool(tf.reduce_all(tf.math.is_finite(factor))):
                self._factor = factor
                return
            self._raise_not_positive_definite(tf.linalg.eigvalsh(matrix))
        eigenvalues, eigenvectors = tf.linalg.eigh(matrix)
        magnitude = tf.abs(eigenvalues)
        threshold = relative_tolerance(self.dtype) * self.nb_params * float(tf.reduce_max(magnitude))
        if float(tf.reduce_min(magnitude)) <= threshold:
            raise ValueError(
                f"The Hessian is singular: its smallest eigenvalue magnitude is {float(tf.reduce_min(magnitude)):.3e} "
                f"(largest {float(tf.reduce_max(magnitude)):.3e}). Add damping, e.g. damping="
                f"{max(1e-3 * float(tf.reduce_max(magnitude)), 1e-8):.1e}."
            )
        if float(tf.reduce_min(eigenvalues)) < 0 and not self.allow_indefinite:
            self._raise_not_positive_definite(eigenvalues)
        self._eigenvalues, self._eigenvectors = eigenvalues, eigenvectors

    def _raise_not_positive_definite(self, eigenvalues: tf.Tensor) -> None:
        smallest = float(tf.reduce_min(eigenvalues))
        largest = float(tf.reduce_max(tf.abs(eigenvalues)))
        suggestion = self.damping + max(-smallest, 0.0) + max(1e-3 * largest, float(np.finfo(np.float32).eps))
        raise ValueError(
            f"The Hessian (damping {self.damping}) is not positive definite: smallest eigenvalue {smallest:.3e}, "
            f"largest magnitude {largest:.3e}. It is singular or indefinite (e.g. a model not at a minimum, or "
            f"unused parameters). Add damping (damping >= {suggestion:.1e} makes it positive definite), or use "
            "method='eigh' with allow_indefinite=True."
        )

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        self._ensure_factorized()
        if self._factor is not None:
            return tf.transpose(tf.linalg.cholesky_solve(self._factor, tf.transpose(vectors)))
        coordinates = tf.matmul(vectors, self._eigenvectors) / self._eigenvalues
        return tf.matmul(coordinates, self._eigenvectors, transpose_b=True)


class PseudoInverseIHVP(ExactIHVP, name="pinv"):
    """:class:`ExactIHVP` with ``pseudo_inverse=True``: the Moore-Penrose pseudo-inverse of the dense H (its null
    space maps to zero). Registered as ``"pinv"``.

    Example:
        >>> ihvp = get_ihvp("pinv", im, train_ds)
    """

    options_class = PseudoInverseOptions
    default_damping: ClassVar[float | str] = 0.0
