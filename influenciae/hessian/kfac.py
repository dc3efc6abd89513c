"""K-FAC and EK-FAC: block-diagonal, Kronecker-factored Gauss-Newton inverse-HVPs (Martens & Grosse 2015,
Grosse & Martens 2016, George et al. 2018, Grosse et al. 2023).

For a layer ``y = φ(W a + b)`` (Dense, EinsumDense, Conv1D, Conv2D, Embedding: :mod:`influenciae.model.capture`) with
``W`` seen as a matrix ``[rows, columns]`` (the bias as an appended row, ``a`` with an appended 1), the per-example
(pseudo-)gradient is ``G = Σ_t a_t g_tᵀ`` and the layer's block of the Gauss-Newton matrix is
``E[vec(G) vec(G)ᵀ]``. K-FAC approximates it by ``A ⊗ S`` with

* ``A = E[a aᵀ]``, averaged over examples and positions ``t`` (diagonal for an Embedding: token frequencies,
  never ``vocabulary²``),
* ``S = E[Σ_t g gᵀ]``, summed over positions and averaged over examples,

so that ``(A ⊗ S + λI)⁻¹ = (Q_A ⊗ Q_S) diag(1 / (λ_A λ_Sᵀ + λ)) (Q_A ⊗ Q_S)ᵀ`` from the float64 eigendecompositions
``A = Q_A diag(λ_A) Q_Aᵀ``, ``S = Q_S diag(λ_S) Q_Sᵀ``. EK-FAC keeps the Kronecker eigenbasis but replaces the
eigenvalues ``λ_A λ_Sᵀ`` by the exact second moments in that basis, ``Λ = E[(Q_Aᵀ G Q_S)²]``: the diagonal of the exact
Gauss-Newton block in the eigenbasis (one more pass over the data). Watched weights outside a supported layer get a
diagonal block ``E[g²]``. The regularizer Ω of the model is not included: damping plays its role.

Which curvature block each layer gets (positions ``t`` as in :mod:`influenciae.model.capture`):

* Kronecker blocks (K-FAC, EK-FAC): ``Dense`` on vectors or N-D inputs (``[B, T, D]``: statistics summed over
  tokens), ``EinsumDense`` as a Dense over its contracted axes (MultiHeadAttention's query/key/value
  ``"abc,cde->abde"`` and output ``"abcd,cde->abe"`` projections, found inside nested layers), ``Conv1D`` and
  ``Conv2D`` (unfolded patches), ``Embedding`` on token sequences (diagonal ``A``).
* Diagonal blocks ``E[g²]`` (no error): every other watched weight: ``LayerNormalization`` and ``BatchNormalization``
  scales and offsets, EinsumDense biases that are not on exactly the output axes, custom, LoRA or quantized layers.
  To leave them out of θ altogether, pass ``InfluenceModel(weights_to_watch=...)``.
* :class:`~influenciae.hessian.diagonal.DiagonalIHVP` uses diagonal blocks for every layer (exact GGN diagonal).

Damping per block is ``damping + relative_damping · mean(block eigenvalues)``: absolute, relative (kronfluence uses
``relative_damping=0.1``), or both.

Cost: each fitting phase is one capture pass whose per-batch update (every layer at once) is one traced call shared
by the solvers of a model: ``a aᵀ`` and ``g gᵀ`` summed in float64; the eigenvalue correction rotates ``a`` and ``g``
and forms the per-example ``Σ_t a_t g_tᵀ`` in the layer's dtype (float32 agrees with the float64 formula to about
3e-7 of the largest eigenvalue), summed in float64. A solve or product is one traced call for any number of vectors:
two small matmuls on each side of every block.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from influenciae._backend import tf
from influenciae.cache import DiskCache, combine_hashes, fingerprint_arrays, hash_batch
from influenciae.data import CheckedBatches, check_dataset, sparse_classes
from influenciae.hessian.base import CurvatureRequest, InverseHessianVectorProduct, refuse_half_precision
from influenciae.hessian.kfac_fit import BlockDiagonalOptions, CurvatureBlock, batch_seed, empty_blocks, fit_blocks
from influenciae.hessian.operator import RowOperator, damped
from influenciae.hessian.registry import curvature_of
from influenciae.model import InfluenceModel
from influenciae.model.capture import LayerCapture
from influenciae.model.identity import model_identity

__all__ = ["CurvatureBlock", "KFACIHVP", "EKFACIHVP", "BlockDiagonalIHVP"]

_MAX_SLICES = 256  # contiguous runs up to which a solve reorders parameters by slicing rather than a column gather


class _BlockOperator(RowOperator):
    """The block-diagonal curvature of a fitted solver as a row operator (damped or not)."""

    def __init__(self, solver: BlockDiagonalIHVP, damped: bool, num_params: int, dtype: tf.DType) -> None:
        self.solver = solver
        self.is_damped = damped
        super().__init__(num_params, dtype, "BlockDiagonalCurvature", parameters={"damped": damped})

    @property
    def traceable(self) -> bool:
        """True once the solver is fitted: its product is then one pure-TensorFlow function of the vectors."""
        return self.solver._blocks is not None

    def _matmul_rows(self, vectors: tf.Tensor) -> tf.Tensor:
        return self.solver._apply(vectors, power=1.0, damped=self.is_damped)


class BlockDiagonalIHVP(InverseHessianVectorProduct):
    """Shared machinery of the block-diagonal solvers (K-FAC, EK-FAC, diagonal): fitting, damping, save/load, solve.

    Subclasses set ``kronecker`` (fit ``A`` and ``S`` and use their eigenbases) and ``eigenvalue_correction``
    (re-estimate the eigenvalues in the basis with a second pass); the diagonal solver is the identity basis with
    the correction.

    Built like every solver (:class:`~influenciae.hessian.base.InverseHessianVectorProduct`); its settings are the
    fields of :class:`~influenciae.hessian.kfac_fit.BlockDiagonalOptions`, as keywords or as one ``options=``
    instance. ``damping`` is the absolute λ ≥ 0 added to every block. A curvature (``curvature="ggn"``, or the
    Gauss-Newton or Fisher ``operator=`` that ``get_ihvp(..., curvature=...)`` passes) only selects ``fisher``
    (``"ggn"``/``"fisher"`` → ``"expected"``, or ``"sampled"`` for a sampled Fisher; ``"empirical_fisher"`` →
    ``"empirical"``): the curvature itself is always rebuilt from the layers.

    Attributes:
        blocks: The fitted :class:`CurvatureBlock` list (fits on first access).
        timings: Seconds spent per fitting phase (``"factors"``, ``"eigendecomposition"``, ``"correction"``).
    """

    kronecker: ClassVar[bool] = True
    eigenvalue_correction: ClassVar[bool] = False
    takes_operator = False  # fits its blocks from the layers, whatever the operator

    options_class = BlockDiagonalOptions

    def _base_operator(self, request: CurvatureRequest) -> RowOperator:
        model, dataset = request.model, request.dataset
        if not isinstance(model, InfluenceModel):
            raise TypeError(
                f"{type(self).__name__} needs the InfluenceModel (it reads the layers), got {type(model).__name__}."
            )
        if dataset is None:
            raise ValueError(f"{type(self).__name__} needs a dataset to fit its curvature factors.")
        requested = request.named()
        if requested is not None:  # it selects the statistics; the curvature is always rebuilt from the layers
            self.options = dataclasses.replace(self.options, fisher=_fisher_of_operator(requested, type(self).__name__))
        # the curvature asked for (a Gauss-Newton or Fisher operator, or its name) or the one the statistics estimate
        self._asked_curvature = curvature_of(requested) if requested is not None else None
        refuse_half_precision(model.dtype, type(self).__name__, "eigendecompositions of its curvature blocks")
        return _BlockOperator(self, False, model.nb_params, model.dtype)

    def _configure(self) -> None:
        options: BlockDiagonalOptions = self.options
        model: InfluenceModel = self.model  # type: ignore[assignment]  # checked by _base_operator
        dataset = self._hessian_dataset
        self.relative_damping = float(options.relative_damping)
        self.dataset = check_dataset(dataset, name="dataset")
        self._hessian_dataset = self.dataset
        self._checked = CheckedBatches(self.dataset, num_classes=sparse_classes(model.model, dataset), name="dataset")
        self.fisher = options.fisher
        self.curvature = self._asked_curvature or _CURVATURE_OF_FISHER[self.fisher]
        self.seed = int(options.seed)
        self._factors_path = None if options.factors_path is None else Path(options.factors_path)
        self._overwrite_factors = bool(options.overwrite_factors)
        self._show_progress = options.show_progress
        self.capture = LayerCapture(model, max_output_size=options.max_output_size)
        self.timings: dict[str, float] = {}
        self._blocks: list[CurvatureBlock] | None = None
        self._prepared: dict[str, Any] | None = None
        self._permutation: np.ndarray | None = None
        self._inverse_permutation: np.ndarray | None = None

    def _damped_operator(self, base: RowOperator, damping: float) -> RowOperator:
        damped(base, damping)  # validates λ; the damping is per block (absolute + relative), in the blocks' product
        return _BlockOperator(self, True, base.num_params, base.dtype)

    # ------------------------------------------------------------------ public

    @property
    def blocks(self) -> list[CurvatureBlock]:
        """The fitted curvature blocks (fitting or loading them on first access)."""
        if self._blocks is None:
            self.fit()
        return self._blocks  # type: ignore[return-value]

    def fit(self) -> BlockDiagonalIHVP:
        """Fit (or load from ``factors_path``) the curvature blocks now rather than on the first solve."""
        if self._blocks is not None:
            return self
        loaded = self._load() if self._factors_path is not None and not self._overwrite_factors else None
        if loaded is not None:
            self._set_blocks(loaded)
            return self
        blocks, input_hash = self._fit()
        self._set_blocks(blocks)
        if self._factors_path is not None:
            self.save_factors(self._factors_path, input_hash=input_hash)
        return self

    def block_damping(self, block: CurvatureBlock) -> float:
        """The total damping of one block: ``damping + relative_damping · mean(block eigenvalues)``."""
        return self.damping + self.relative_damping * float(np.mean(block.eigenvalues))

    def factors_nbytes(self) -> int:
        """Bytes held by the fitted factors, bases and eigenvalues (float64)."""
        return sum(block.nbytes() for block in self.blocks)

    def factors_configuration(self) -> dict[str, Any]:
        """What the factors depend on (besides the weights and the dataset): stored in the factors' manifest."""
        return {
            "kind": "curvature_factors",
            "solver": self.name,
            "fisher": self.fisher,
            "seed": self.seed,
            "layers": [[layer.name, layer.kind, layer.num_rows, layer.num_columns] for layer in self.capture.layers],
            "uncovered": self.capture.uncovered_weight_names,
            # the loss configuration, watched weights and gradient dtype the factors were fitted with
            "model": model_identity(self.model),
        }

    def save_factors(self, path: str | Path, *, input_hash: str | None = None) -> None:
        """Save the fitted blocks atomically, with the settings, the weights' fingerprint and the dataset's hash.

        Uses the influence-vector cache's format (``manifest.json`` + a pickle-free ``.npz``, atomic writes): a later
        ``factors_path`` load is refused when any of them differs.
        """
        if input_hash is None:
            input_hash = self._dataset_hash()
        cache = DiskCache(
            path,
            configuration=self.factors_configuration(),
            weights_fingerprint=fingerprint_arrays(self.capture.model.weights),
            overwrite=True,
        )
        arrays: dict[str, np.ndarray] = {}
        for index, block in enumerate(self.blocks):
            for field in _SAVED_FIELDS:
                value = getattr(block, field)
                if value is not None:
                    arrays[f"block{index}.{field}"] = np.asarray(value)[None]  # one "row" per shard
        cache.write_shard(0, arrays, first_index=0, input_hash=input_hash)
        cache.mark_complete(1)

    # ------------------------------------------------------------------ solver hooks

    def _solve(self, vectors: tf.Tensor) -> tf.Tensor:
        return self._apply(vectors, power=-1.0, damped=True)

    def _apply(self, vectors: tf.Tensor, *, power: float, damped: bool) -> tf.Tensor:
        """``(C + λ)^power v`` for each row (``power`` 1 or -1), block by block in the eigenbasis: one graph call.

        Per Kronecker block, ``Q_A ((Q_Aᵀ V Q_S) ⊙ scale^power) Q_Sᵀ`` on the rows' ``[rows, columns]`` views, all
        vectors at once (:func:`_apply_blocks`, traced once per model, block layout and direction).
        """
        bases, scales, minimums = self._prepare_blocks(damped)
        if power < 0:
            for block, smallest in zip(self.blocks, minimums, strict=True):
                if smallest <= 0.0:
                    raise ValueError(
                        f"The curvature block of {block.name!r} is singular (smallest eigenvalue {smallest:.3e} after "
                        "damping): add damping, e.g. relative_damping=0.1 or damping=1e-3."
                    )
        assert self._permutation is not None  # noqa: S101 -- set with the blocks
        function = _apply_blocks(self.capture.model, self.blocks, self._permutation, inverse=power < 0)
        present = [basis for pair in bases for basis in pair if basis is not None]
        return function(tf.convert_to_tensor(vectors, self.dtype), present, scales)

    # ------------------------------------------------------------------ fitting

    def _fit(self) -> tuple[list[CurvatureBlock], str]:
        kinds = (self.kronecker, self.eigenvalue_correction)
        return fit_blocks(self.capture, self._batches, self.options, *kinds, self.dtype, self.timings)

    def _seed(self, batch_number: int) -> tf.Tensor:
        return batch_seed(self.seed, batch_number)

    def _batches(self, description: str) -> Iterator[Any]:
        iterator: Any = self._checked
        if self._show_progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"{type(self).__name__}: {description}", unit="batch")
        empty = True
        for batch in iterator:
            empty = False
            yield batch
        if empty:
            raise ValueError("The dataset is empty; pass a dataset with at least one example to fit the curvature.")

    def _dataset_hash(self) -> str:
        return combine_hashes(hash_batch(batch) for batch in self.dataset)

    def _set_blocks(self, blocks: list[CurvatureBlock]) -> None:
        self._blocks = blocks
        self._prepared = None
        permutation = np.concatenate([block.parameter_indices for block in blocks])
        if permutation.size != self.nb_params or np.unique(permutation).size != self.nb_params:
            raise ValueError(  # internal consistency: every parameter belongs to exactly one block
                f"The curvature blocks cover {np.unique(permutation).size} of {self.nb_params} parameters."
            )
        inverse = np.empty_like(permutation)
        inverse[permutation] = np.arange(permutation.size)
        self._permutation, self._inverse_permutation = permutation, inverse

    def _prepare_blocks(
        self, damped: bool
    ) -> tuple[list[tuple[tf.Tensor | None, tf.Tensor | None]], list[tf.Tensor], list[float]]:
        """``(bases, scales, minimums)``: ``(Q_A, Q_S)`` and ``Λ + λ`` (``λ = 0`` undamped) per block in the solver's
        dtype, made once (eagerly, even when called while tracing), and each block's smallest scale."""
        blocks = self.blocks
        with tf.init_scope():
            if self._prepared is None:
                self._prepared = {
                    "bases": [
                        (
                            None if block.row_basis is None else tf.constant(block.row_basis, self.dtype),
                            None if block.column_basis is None else tf.constant(block.column_basis, self.dtype),
                        )
                        for block in blocks
                    ]
                }
            key = "damped" if damped else "undamped"
            if key not in self._prepared:
                scales = [block.eigenvalues + (self.block_damping(block) if damped else 0.0) for block in blocks]
                self._prepared[key] = (
                    [tf.constant(scale, self.dtype) for scale in scales],
                    [float(np.min(scale)) if scale.size else float("inf") for scale in scales],
                )
        scales, minimums = self._prepared[key]
        return self._prepared["bases"], scales, minimums

    def _load(self) -> list[CurvatureBlock] | None:
        """The blocks saved at ``factors_path`` with these settings, weights and dataset; None when there are none."""
        path = self._factors_path
        assert path is not None  # noqa: S101 -- checked by the caller
        if not (path / "manifest.json").exists():
            return None
        cache = DiskCache(
            path,
            configuration=self.factors_configuration(),
            weights_fingerprint=fingerprint_arrays(self.capture.model.weights),
        )
        if not cache.is_complete:
            return None
        cache.check_input_hash(0, self._dataset_hash())
        arrays = cache.read_shard(0)
        blocks = empty_blocks(self.capture)
        for index, block in enumerate(blocks):
            for field in _SAVED_FIELDS:
                key = f"block{index}.{field}"
                if key in arrays:
                    setattr(block, field, np.array(arrays[key][0]))
        return blocks

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(nb_params={self.nb_params}, layers={len(self.capture.layers)}, "
            f"fisher={self.fisher!r}, damping={self.damping}, relative_damping={self.relative_damping})"
        )


class KFACIHVP(BlockDiagonalIHVP, name="kfac"):
    """K-FAC inverse-HVPs: ``(A ⊗ S + λI)⁻¹`` per layer (Martens & Grosse 2015; Grosse & Martens 2016 for Conv2D).

    One pass over the dataset fits ``A = E[a aᵀ]`` and ``S = E[Σ_t g gᵀ]`` per captured layer (float64),
    then each solve is four small matmuls per layer. Cheap and memory-light (two ``d × d`` factors per layer instead of
    ``(d_in d_out)²``), but the Kronecker eigenvalues ``λ_A λ_Sᵀ`` can be far from the true curvature in the
    eigenbasis: prefer :class:`EKFACIHVP`, which costs one more pass.

    See :class:`BlockDiagonalIHVP` for the arguments.

    Example:
        >>> ihvp = KFACIHVP(im, train_ds, relative_damping=0.1)
        >>> calculator = FirstOrderInfluenceCalculator(im, train_ds, ihvp_calculator=ihvp)
    """

    kronecker = True
    eigenvalue_correction = False


class EKFACIHVP(BlockDiagonalIHVP, name="ekfac"):
    """EK-FAC inverse-HVPs: K-FAC's eigenbasis with corrected eigenvalues (George et al. 2018, Grosse et al. 2023).

    A second pass over the dataset replaces ``λ_A λ_Sᵀ`` by ``Λ = E[(Q_Aᵀ G Q_S)²]``, the diagonal of the exact
    Gauss-Newton block in the Kronecker eigenbasis (exact with ``fisher="expected"``), which makes the approximation
    the best diagonal one in that basis. With ``damping`` relative to the mean eigenvalue it needs no tuning to the
    scale of the loss.

    See :class:`BlockDiagonalIHVP` for the arguments.

    Example:
        >>> calculator = FirstOrderInfluenceCalculator(im, train_ds, ihvp_calculator="ekfac", damping=1e-3)
    """

    kronecker = True
    eigenvalue_correction = True


_SAVED_FIELDS = (
    "eigenvalues",
    "row_factor",
    "column_factor",
    "row_basis",
    "column_basis",
    "row_eigenvalues",
    "column_eigenvalues",
)


_CURVATURE_OF_FISHER = {"expected": "ggn", "sampled": "ggn", "empirical": "empirical_fisher"}


def _fisher_of_operator(operator: Any, solver: str) -> str:
    """The ``fisher`` setting matching a curvature operator from ``get_ihvp(..., curvature=...)``."""
    curvature = curvature_of(operator) if isinstance(operator, RowOperator) else "operator"
    if curvature == "empirical_fisher":
        return "empirical"
    if curvature == "fisher" and getattr(operator, "estimator", "exact") == "sampled":
        return "sampled"
    if curvature in ("ggn", "fisher"):
        return "expected"
    raise ValueError(
        f"{solver} builds its Kronecker-factored Gauss-Newton curvature from the model's layers, so it cannot use "
        f"an explicit operator or curvature {curvature!r}. Choose the statistics with fisher='expected' (exact "
        "Gauss-Newton), 'sampled' or 'empirical', or use a matrix-free solver ('cg', 'nystrom') for that operator."
    )


def _apply_blocks(
    model: InfluenceModel, blocks: list[CurvatureBlock], permutation: np.ndarray, *, inverse: bool
) -> Any:
    """The traced ``apply(vectors [n, P], bases, scales) -> [n, P]`` of :meth:`BlockDiagonalIHVP._apply`.

    ``bases`` lists the blocks' ``Q_A``, ``Q_S`` in order, leaving out identities; ``scales`` ``Λ + λ``
    ``[rows, columns]`` per block. Each block's coordinates ``Q_Aᵀ V Q_S`` are divided (``inverse``) or multiplied by
    the scale and rotated back: two small matmuls per side, batched over the vectors. The flat parameters are
    reordered to the blocks' layout by contiguous slices (a sequential model's layout is the identity), not by a
    column gather. One trace per model, block layout and direction, for any number of vectors.
    """
    layout = tuple((block.kind, block.rows, block.columns) for block in blocks)
    dtype = model.dtype
    has_bases = [
        (row is not None, column is not None) for row, column in ((b.row_basis, b.column_basis) for b in blocks)
    ]
    key = ("influenciae.kfac.apply_blocks", layout, tuple(has_bases), _digest(permutation), bool(inverse))

    def build() -> Any:
        sizes = [rows * columns for _, rows, columns in layout]
        inverse_permutation = np.empty_like(permutation)
        inverse_permutation[permutation] = np.arange(permutation.size)
        to_blocks, from_blocks = _column_selection(permutation), _column_selection(inverse_permutation)

        def apply(vectors: tf.Tensor, bases: list[tf.Tensor], scales: list[tf.Tensor]) -> tf.Tensor:
            count = tf.shape(vectors)[0]
            remaining = iter(bases)
            outputs = []
            for (_, rows, columns), part, (has_row, has_column), scale in zip(
                layout, tf.split(to_blocks(vectors), sizes, axis=1), has_bases, scales, strict=True
            ):
                row_basis = next(remaining) if has_row else None
                column_basis = next(remaining) if has_column else None
                matrices = tf.reshape(part, [count, rows, columns])
                rotated = _rotate(matrices, row_basis, column_basis, transpose=True)
                rotated = rotated / scale if inverse else rotated * scale
                outputs.append(tf.reshape(_rotate(rotated, row_basis, column_basis, transpose=False), [count, -1]))
            return from_blocks(tf.concat(outputs, axis=1))

        basis_specs = []
        for block, (has_row, has_column) in zip(blocks, has_bases, strict=True):
            basis_specs += [tf.TensorSpec([block.rows] * 2, dtype)] if has_row else []
            basis_specs += [tf.TensorSpec([block.columns] * 2, dtype)] if has_column else []
        scale_specs = [tf.TensorSpec([rows, columns], dtype) for _, rows, columns in layout]
        signature = [tf.TensorSpec([None, int(permutation.size)], dtype), basis_specs, scale_specs]
        return tf.function(apply, input_signature=signature, autograph=False)

    return model.shared_function(key, build)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _column_selection(order: np.ndarray) -> Any:
    """``vectors [n, P] -> vectors[:, order]`` by at most ``_MAX_SLICES`` contiguous slices (a gather otherwise)."""
    if np.array_equal(order, np.arange(order.size)):
        return lambda vectors: vectors
    starts = np.concatenate([[0], np.flatnonzero(np.diff(order) != 1) + 1])
    ends = np.concatenate([starts[1:], [order.size]])
    runs = [(int(order[start]), int(order[end - 1]) + 1) for start, end in zip(starts, ends, strict=True)]
    if len(runs) <= _MAX_SLICES:
        return lambda vectors: tf.concat([vectors[:, start:stop] for start, stop in runs], axis=1)
    indices = tf.constant(order)
    return lambda vectors: tf.gather(vectors, indices, axis=1)


def _rotate(
    matrices: tf.Tensor, row_basis: tf.Tensor | None, column_basis: tf.Tensor | None, *, transpose: bool
) -> tf.Tensor:
    """``Q_Aᵀ M Q_S`` (``transpose=True``) or ``Q_A M Q_Sᵀ`` for matrices ``[n, rows, columns]``."""
    if row_basis is not None:
        matrices = tf.matmul(row_basis, matrices, transpose_a=transpose)
    if column_basis is not None:
        matrices = tf.matmul(matrices, column_basis, transpose_b=not transpose)
    return matrices
