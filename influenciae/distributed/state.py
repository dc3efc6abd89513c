"""The solver state: what a scoring worker needs besides the model, computed once, saved, and reloaded.

Scoring a training example ``z`` is embarrassingly parallel once the expensive, global part, the inverse Hessian, is
summarized in a few arrays that every worker loads:

* a **preconditioner** that applies ``(H + λI)⁻¹`` to per-sample gradients without touching the data again: the
  dense inverse ``[P, P]`` (from :class:`~influenciae.hessian.ExactIHVP`) or a low-rank eigendecomposition
  ``(eigenvalues [r], eigenvectors [r, P])`` (from :class:`~influenciae.hessian.ArnoldiIHVP`). Influence vectors and
  self-influence need it.
* **test factors** ``H⁻¹∇ℓ(x)`` ``[m, P]`` of the test examples (any solver, including CG/LiSSA on a
  ``tf.distribute`` strategy). Scores and top-k against those test examples need only them: one gradient per
  training example and a matmul.

The state is saved as one pickle-free ``.npz`` file written atomically (temporary name, fsync, rename), its
manifest (the library's one format, :mod:`influenciae.cache`) a member of it with the fingerprint of the model's
weights, so that a restarted job reloads it instead of recomputing it, and a state made with other
weights is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.cache import atomic_write, manifest_array, parse_manifest, write_npz
from influenciae.cache.fingerprint import canonical_configuration, dataset_fingerprint, describe_differences
from influenciae.data import check_dataset
from influenciae.hessian import InverseHessianVectorProduct, RowOperator
from influenciae.hessian.base import STATE_KINDS
from influenciae.model import InfluenceModel
from influenciae.model.checkpoints import weights_fingerprint
from influenciae.model.identity import model_identity as _model_identity
from influenciae.model.loading import load_influence_model

__all__ = ["SavedSolver", "SolverState", "model_fingerprint", "load_influence_model"]

_KIND = "influenciae.solver_state"
_FORMAT_VERSION = 2  # 1: a JSON string member "meta" written by np.savez
_MANIFEST_MEMBER = "manifest"
_PRECONDITIONERS = STATE_KINDS


def model_fingerprint(model: InfluenceModel) -> str:
    """Fingerprint of all the Keras model's weights (the same as the calculators' ``weights_fingerprint``)."""
    return weights_fingerprint(model)


@dataclasses.dataclass(frozen=True)
class SolverState:
    """Preconditioner and test factors of one model, as arrays.

    Attributes:
        preconditioner: ``"inverse"`` (``inverse`` is ``(H + λI)⁻¹`` ``[P, P]``), ``"eigen"`` (``eigenvalues [r]`` and
            orthonormal ``eigenvectors [r, P]`` of ``H + λI``) or ``"none"``.
        weights_fingerprint: :func:`model_fingerprint` of the model the state was computed with.
        configuration: The solver's settings (informative; stored in the file).
        inverse: ``[P, P]`` or None.
        eigenvalues: ``[r]`` or None.
        eigenvectors: ``[r, P]`` or None.
        factors: Test factors ``H⁻¹∇ℓ(x)`` ``[m, P]`` (test examples in dataset order) or None.
        identity: What the arrays depend on, checked by :meth:`load`: ``"model"`` (loss configuration, watched
            weights, ``gradient_dtype``: :func:`~influenciae.model.identity.model_identity`), ``"solver"``
            (the solver's settings, damping and Hessian dataset fingerprint included), ``"test"`` (the test set's
            fingerprint) and
            ``"request"`` (what a command line asked for, e.g. ``--solver``, ``--damping``, ``--test``).

    Example:
        >>> state = SolverState.from_solver(im, ExactIHVP(im, train_ds, damping=1e-3), test_set=test_ds)
        >>> state.save("runs/state.npz")
        >>> state = SolverState.load("runs/state.npz", model=im)  # refused if the weights changed
    """

    preconditioner: str
    weights_fingerprint: str
    configuration: dict[str, Any] = dataclasses.field(default_factory=dict)
    inverse: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    eigenvectors: np.ndarray | None = None
    factors: np.ndarray | None = None
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preconditioner not in _PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {_PRECONDITIONERS}, got {self.preconditioner!r}.")
        if self.preconditioner == "inverse" and (self.inverse is None or self.inverse.ndim != 2):
            raise ValueError("An 'inverse' preconditioner needs the dense inverse [P, P].")
        if self.preconditioner == "eigen" and (
            self.eigenvalues is None
            or self.eigenvectors is None
            or self.eigenvectors.ndim != 2
            or self.eigenvalues.shape != (self.eigenvectors.shape[0],)
        ):
            raise ValueError("An 'eigen' preconditioner needs eigenvalues [r] and eigenvectors [r, P].")
        if self.factors is not None and self.factors.ndim != 2:
            raise ValueError(f"factors must have shape [m, P], got {self.factors.shape}.")

    # ------------------------------------------------------------------ building

    @classmethod
    def from_solver(
        cls,
        model: InfluenceModel,
        ihvp: InverseHessianVectorProduct,
        *,
        test_set: tf.data.Dataset | None = None,
        preconditioner: str = "auto",
        request: dict[str, Any] | None = None,
    ) -> SolverState:
        """Summarize a solver (and optionally the test examples) as arrays.

        Args:
            model: The wrapped model.
            ihvp: Any solver of the model (its ``solve`` computes the test factors).
            test_set: Batched test dataset whose factors ``H⁻¹∇ℓ(x)`` are stored (needed for ``"top_k"`` scoring).
            preconditioner: ``"auto"`` (what the solver's ``export_state()`` gives: ``"inverse"`` for ExactIHVP,
                ``"eigen"`` for ArnoldiIHVP, ``"none"`` otherwise), or one of those names.
            request: What the caller asked for (JSON-able), recorded and compared by :meth:`load`'s ``request``.

        Raises:
            ValueError: For a preconditioner the solver cannot provide, or a solver of another model.
        """
        if ihvp.nb_params != model.nb_params:
            raise ValueError(f"The solver works on {ihvp.nb_params} parameters, the model on {model.nb_params}.")
        exported = ihvp.export_state(preconditioner)  # each solver exports its own fitted state
        preconditioner, arrays = exported.kind, dict(exported.arrays)
        if test_set is not None:
            check_dataset(test_set, name="test_set")
            blocks = [ihvp.solve(model.batch_jacobian_tensor(batch)).numpy() for batch in test_set]
            arrays["factors"] = np.concatenate(blocks) if blocks else np.zeros([0, model.nb_params])
        configuration = _json_safe(ihvp.configuration())
        identity = {
            "model": _model_identity(model),
            "solver": canonical_configuration(configuration),
            "test": None if test_set is None else dataset_fingerprint(test_set),
            "request": None if request is None else canonical_configuration(request),
        }
        return cls(
            preconditioner=preconditioner,
            weights_fingerprint=model_fingerprint(model),
            configuration=configuration,
            identity=identity,
            **arrays,
        )

    def check_identity(
        self,
        *,
        model: InfluenceModel | None = None,
        solver: InverseHessianVectorProduct | None = None,
        test_set: tf.data.Dataset | None = None,
        request: dict[str, Any] | None = None,
    ) -> None:
        """Refuse the state when what its arrays depend on differs from what is given (each check only if given).

        Raises:
            ValueError: Naming every difference (loss, watched weights, solver settings, test set, request).
        """
        given: dict[str, Any] = {}
        if model is not None:
            self.check_model(model)
            given["model"] = _model_identity(model)
        if solver is not None:
            given["solver"] = canonical_configuration(_json_safe(solver.configuration()))
        if test_set is not None:
            given["test"] = dataset_fingerprint(test_set)
        if request is not None:
            given["request"] = canonical_configuration(request)
        stored = {key: self.identity.get(key, "<not recorded>") for key in given}
        differences = describe_differences(stored, given)
        if differences:
            raise ValueError(
                "The solver state was computed for another request: " + "; ".join(differences[:6]) + ". Recompute "
                "it (delete the state file, or pass another --state path)."
            )

    # ------------------------------------------------------------------ kernels

    def check_model(self, model: InfluenceModel) -> None:
        """Refuse a model whose weights differ from those the state was computed with.

        Raises:
            ValueError: If the fingerprints differ.
        """
        if model_fingerprint(model) != self.weights_fingerprint:
            raise ValueError(
                "The solver state was computed with other model weights: recompute it for this model "
                "(delete the state file, or pass another --state path)."
            )

    def precondition(self, gradients: Any) -> tf.Tensor:
        """``(H + λI)⁻¹ g`` for each row ``g`` of ``gradients [B, P]`` (``[B, P]``).

        Raises:
            ValueError: If the state has no preconditioner.
        """
        gradients = tf.convert_to_tensor(gradients)
        if self.preconditioner == "inverse":
            inverse = tf.constant(self.inverse, dtype=gradients.dtype)
            return tf.matmul(gradients, inverse, transpose_b=True)
        if self.preconditioner == "eigen":
            vectors = tf.constant(self.eigenvectors, dtype=gradients.dtype)
            values = tf.constant(self.eigenvalues, dtype=gradients.dtype)
            return tf.matmul(tf.matmul(gradients, vectors, transpose_b=True) / values, vectors)
        raise ValueError(
            "This solver state has no preconditioner, so it cannot compute influence vectors or self-influence: "
            "build it from an ExactIHVP (dense inverse) or ArnoldiIHVP (low rank) solver, or score with mode "
            "'top_k' against test factors."
        )

    def factors_tensor(self, dtype: tf.DType) -> tf.Tensor:
        """The test factors ``[m, P]`` as a tensor.

        Raises:
            ValueError: If the state has no test factors.
        """
        if self.factors is None:
            raise ValueError(
                "This solver state has no test factors, so it cannot score against test examples: build it with "
                "SolverState.from_solver(..., test_set=test_ds)."
            )
        return tf.constant(self.factors, dtype=dtype)

    def calculator(self, model: InfluenceModel, dataset: tf.data.Dataset) -> Any:
        """The first-order calculator a scoring worker runs: its solver is this state (:class:`SavedSolver`).

        Influence vectors and self-influence go through the calculator's own methods with ``H⁻¹`` applied by the
        saved preconditioner; scores against the test examples through
        :meth:`~influenciae.FirstOrderInfluenceCalculator.influence_from_factors` with :attr:`factors`.

        Args:
            model: The wrapped model (checked against the state's weights).
            dataset: A batched dataset of the training examples' structure (the calculator's data; its Hessian is
                the state's, never recomputed).

        Returns:
            A :class:`~influenciae.FirstOrderInfluenceCalculator`.
        """
        from influenciae.influence.first_order import FirstOrderInfluenceCalculator

        self.check_model(model)
        return FirstOrderInfluenceCalculator(model, dataset, ihvp_calculator=SavedSolver(self, model))

    @property
    def nb_params(self) -> int:
        """P, read from whichever array the state holds (0 when it holds none)."""
        for array in (self.inverse, self.eigenvectors, self.factors):
            if array is not None:
                return int(array.shape[1])
        return 0

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the state to one ``.npz`` file atomically (a crash never leaves a readable partial file)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "preconditioner": self.preconditioner,
            "weights_fingerprint": self.weights_fingerprint,
            "configuration": self.configuration,
            "identity": self.identity,
        }
        arrays = {_MANIFEST_MEMBER: manifest_array(_KIND, _FORMAT_VERSION, meta)}
        for name in ("inverse", "eigenvalues", "eigenvectors", "factors"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value)
        atomic_write(target, lambda handle: write_npz(handle, arrays))
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model: InfluenceModel | None = None,
        solver: InverseHessianVectorProduct | None = None,
        test_set: tf.data.Dataset | None = None,
        request: dict[str, Any] | None = None,
    ) -> SolverState:
        """Read a state written by :meth:`save`, checked (:meth:`check_identity`) against what is given.

        ``model`` checks the weights, the loss, the watched weights and ``gradient_dtype``; ``solver`` the solver's
        settings (damping, Hessian dataset...); ``test_set`` the test examples of the factors; ``request`` what a
        command line asked for.

        Raises:
            FileNotFoundError: If there is no file.
            ValueError: If the file is not a solver state, or the model's weights differ.
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"No solver state at {source}.")
        with np.load(source, allow_pickle=False) as archive:
            if _MANIFEST_MEMBER not in archive:
                older = " of an older format: recompute it" if "meta" in archive else " written by SolverState.save"
                raise ValueError(f"{source} is not a solver state{older}.")
            meta = parse_manifest(archive[_MANIFEST_MEMBER].tobytes(), _KIND, source=str(source), what="a solver state")
            if meta.get("format_version") != _FORMAT_VERSION:
                raise ValueError(
                    f"{source} has solver-state format {meta.get('format_version')!r}, expected {_FORMAT_VERSION}."
                )
            arrays = {
                name: archive[name] for name in ("inverse", "eigenvalues", "eigenvectors", "factors") if name in archive
            }
        state = cls(
            preconditioner=meta["preconditioner"],
            weights_fingerprint=meta["weights_fingerprint"],
            configuration=meta.get("configuration", {}),
            identity=meta.get("identity", {}),
            **arrays,
        )
        state.check_identity(model=model, solver=solver, test_set=test_set, request=request)
        return state


class _StateCurvature(RowOperator):
    """``H + λI`` as a state's preconditioner knows it (dense, or low rank on its eigenvectors' span)."""

    def __init__(self, state: SolverState, dtype: tf.DType) -> None:
        self.state = state
        super().__init__(state.nb_params, dtype, "SolverStateCurvature", parameters={"state": state})

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        state = self.state
        if state.preconditioner == "inverse":
            inverse = tf.constant(state.inverse, dtype=vectors.dtype)
            return tf.transpose(tf.linalg.solve(inverse, tf.transpose(vectors)))
        if state.preconditioner == "eigen":
            eigenvectors = tf.constant(state.eigenvectors, dtype=vectors.dtype)
            eigenvalues = tf.constant(state.eigenvalues, dtype=vectors.dtype)
            return tf.matmul(tf.matmul(vectors, eigenvectors, transpose_b=True) * eigenvalues, eigenvectors)
        return state.precondition(vectors)  # raises: no preconditioner


class SavedSolver(InverseHessianVectorProduct):
    """A saved :class:`SolverState` as a solver: ``solve(V)`` is :meth:`SolverState.precondition`.

    What a scoring worker hands a calculator instead of recomputing ``H``; its configuration is the saved solver's.

    Args:
        state: The state (an ``"inverse"`` or ``"eigen"`` preconditioner to solve; ``"none"`` refuses to).
        model: The wrapped model of the state.
    """

    def __init__(self, state: SolverState, model: InfluenceModel) -> None:
        super().__init__(model, operator=_StateCurvature(state, model.dtype))
        self.state = state

    def configuration(self) -> dict[str, Any]:
        """The settings of the solver the state was computed with."""
        return dict(self.state.configuration)

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        return self.state.precondition(vectors)


def _json_safe(configuration: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(configuration, default=str))
