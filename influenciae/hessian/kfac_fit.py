"""Fitting the K-FAC, EK-FAC and diagonal curvature blocks from the model's layers (:mod:`influenciae.model.capture`).

The block-diagonal solvers of :mod:`influenciae.hessian.kfac` fit their curvature here: :func:`fit_blocks` runs the
capture passes (Kronecker factors ``A = E[a aᵀ]``, ``S = E[Σ_t g gᵀ]``, their float64 eigendecompositions and the
eigenvalue correction) and returns :class:`CurvatureBlock` lists; the solver then only applies them to vectors.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.cache import combine_hashes, hash_batch
from influenciae.model import InfluenceModel
from influenciae.model.capture import FISHER_TYPES, CapturedLayer, LayerCapture, LayerStatistics

__all__ = ["BlockDiagonalOptions", "CurvatureBlock", "batch_seed", "empty_blocks", "fit_blocks"]

_CHUNK_ELEMENTS = 2**24  # per-example rotated gradients held at once by the eigenvalue pass


@dataclasses.dataclass(frozen=True)
class BlockDiagonalOptions:
    """The settings of the block-diagonal solvers (K-FAC, EK-FAC, diagonal), validated on construction.

    Attributes:
        relative_damping: Add ``relative_damping × mean eigenvalue`` of each block (≥ 0).
        fisher: ``"expected"`` (exact Gauss-Newton statistics, one backward pass per model output),
            ``"sampled"`` (one backward pass with random pseudo-gradients: the GGN in expectation) or
            ``"empirical"`` (gradients with the given targets: the empirical Fisher). See
            :mod:`influenciae.model.capture`.
        seed: Seed of ``fisher="sampled"``.
        factors_path: Directory to load the fitted factors from (when it holds factors fitted with the same
            settings, weights and dataset) or to save them to after fitting. Damping is not part of the factors.
        overwrite_factors: Refit and replace the factors at ``factors_path`` even if they do not match.
        max_output_size: See :class:`~influenciae.model.capture.LayerCapture`.
        show_progress: A progress bar over batches while fitting.
    """

    relative_damping: float = 0.0
    fisher: str = "expected"
    seed: int = 0
    factors_path: str | Path | None = None
    overwrite_factors: bool = False
    max_output_size: int = 1024
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {self.fisher!r}.")
        damping = self.relative_damping
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not 0.0 <= damping < float("inf"):
            raise ValueError(f"relative_damping must be a finite non-negative number, got {damping!r}.")


@dataclasses.dataclass
class CurvatureBlock:
    """One diagonal block of the curvature: ``(Q_rows ⊗ Q_columns) diag(vec(eigenvalues)) (Q_rows ⊗ Q_columns)ᵀ``.

    Attributes:
        name: The layer name (``"<uncovered>"`` for the diagonal block of weights outside supported layers).
        kind: ``"dense"``, ``"einsum_dense"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"`` or ``"diagonal"``.
        parameter_indices: ``[rows * columns]`` flat parameter positions, row-major on ``[rows, columns]``.
        rows, columns: Shape of the block's weight matrix.
        row_factor: ``A`` ``[rows, rows]`` (``[rows]`` when diagonal), float64; None for a diagonal block.
        column_factor: ``S`` ``[columns, columns]``, float64; None for a diagonal block.
        row_basis: ``Q_A`` ``[rows, rows]`` or None (identity).
        column_basis: ``Q_S`` ``[columns, columns]`` or None (identity).
        row_eigenvalues, column_eigenvalues: ``λ_A [rows]`` and ``λ_S [columns]`` (None for a diagonal block).
        eigenvalues: ``[rows, columns]``: ``λ_A λ_Sᵀ`` (K-FAC), the corrected ``E[(Q_Aᵀ G Q_S)²]`` (EK-FAC) or the
            diagonal ``E[G²]``.
    """

    name: str
    kind: str
    parameter_indices: np.ndarray
    rows: int
    columns: int
    eigenvalues: np.ndarray
    row_factor: np.ndarray | None = None
    column_factor: np.ndarray | None = None
    row_basis: np.ndarray | None = None
    column_basis: np.ndarray | None = None
    row_eigenvalues: np.ndarray | None = None
    column_eigenvalues: np.ndarray | None = None

    def nbytes(self) -> int:
        """Bytes held by the block's arrays (factors, bases and eigenvalues)."""
        arrays = (self.eigenvalues, self.row_factor, self.column_factor, self.row_basis, self.column_basis)
        return int(sum(array.nbytes for array in arrays if array is not None))


def fit_blocks(
    capture: LayerCapture,
    batches: Callable[[str], Iterator[Any]],
    options: BlockDiagonalOptions,
    kronecker: bool,
    eigenvalue_correction: bool,
    dtype: tf.DType,
    timings: dict[str, float],
) -> tuple[list[CurvatureBlock], str]:
    """Fit the curvature blocks of the layers of ``capture``: one capture pass per phase, each batch's update one
    traced call (:func:`_factor_update`, :func:`_correction_update`), with float64 sums kept as tensors between
    batches.

    Args:
        capture: The layer capture of the model.
        batches: ``batches(phase) -> iterator`` over the checked batches of the dataset (one pass per phase).
        options: The solver's settings (its ``fisher`` statistics and their ``seed`` are used here).
        kronecker: Fit ``A`` and ``S`` and use their eigenbases (K-FAC, EK-FAC); else identity bases (diagonal).
        eigenvalue_correction: Re-estimate the eigenvalues in the basis with a second pass (EK-FAC, diagonal).
        dtype: The dtype of the rotations of the eigenvalue pass.
        timings: Filled with the seconds of each phase (``"factors"``, ``"eigendecomposition"``, ``"correction"``).

    Returns:
        ``(blocks, input_hash)``: the blocks (the uncovered weights' diagonal block last) and the batches' hash.
    """

    def capture_batch(batch: Any, batch_number: int) -> Any:
        return capture.capture(batch, fisher=options.fisher, seed=batch_seed(options.seed, batch_number))

    layers = capture.layers
    num_uncovered = int(capture.uncovered_parameter_indices.size)
    started = time.perf_counter()
    hashes: list[str] = []
    uncovered_diagonal = None
    if kronecker:
        update = _factor_update(capture.model, layers, num_uncovered)
        row_sums = [
            tf.zeros([layer.num_rows] if layer.kind == "embedding" else [layer.num_rows] * 2, tf.float64)
            for layer in layers
        ]
        column_sums = [tf.zeros([layer.num_columns] * 2, tf.float64) for layer in layers]
        uncovered_sum = tf.zeros([num_uncovered], tf.float64)
        positions, num_examples = np.zeros([len(layers)], np.int64), 0
        for batch_number, batch in enumerate(batches("factors")):
            hashes.append(hash_batch(batch))
            statistics, uncovered = capture_batch(batch, batch_number)
            row_sums, column_sums, uncovered_sum = update(row_sums, column_sums, uncovered_sum, statistics, uncovered)
            positions += _positions_per_layer(statistics)
            num_examples += int(uncovered.shape[1])
        uncovered_diagonal = uncovered_sum.numpy() / max(num_examples, 1)
    timings["factors"] = time.perf_counter() - started

    started = time.perf_counter()
    blocks = []
    for index, layer in enumerate(layers):
        if kronecker:
            row_factor = row_sums[index].numpy() / max(int(positions[index]), 1)
            column_factor = column_sums[index].numpy() / max(num_examples, 1)
            blocks.append(_kronecker_block(layer, row_factor, column_factor))
        else:
            blocks.append(_identity_block(layer))
    timings["eigendecomposition"] = time.perf_counter() - started

    started = time.perf_counter()
    if eigenvalue_correction:
        correct = _correction_update(capture.model, layers, num_uncovered)
        row_bases = [None if b.row_basis is None else tf.constant(b.row_basis, dtype) for b in blocks]
        column_bases = [None if b.column_basis is None else tf.constant(b.column_basis, dtype) for b in blocks]
        sums = [tf.zeros([block.rows, block.columns], tf.float64) for block in blocks]
        uncovered_sum = tf.zeros([num_uncovered], tf.float64)
        num_examples, check_hashes = 0, bool(hashes)
        for batch_number, batch in enumerate(batches("eigenvalues")):
            if not check_hashes:
                hashes.append(hash_batch(batch))
            statistics, uncovered = capture_batch(batch, batch_number)
            sums, uncovered_sum = correct(sums, uncovered_sum, statistics, uncovered, row_bases, column_bases)
            num_examples += int(uncovered.shape[1])
        for block, total in zip(blocks, sums, strict=True):
            block.eigenvalues = total.numpy() / max(num_examples, 1)
        if uncovered_diagonal is None:
            uncovered_diagonal = uncovered_sum.numpy() / max(num_examples, 1)
    timings["correction"] = time.perf_counter() - started
    if num_uncovered:
        assert uncovered_diagonal is not None  # noqa: S101 -- internal invariant, set by one of the passes
        blocks.append(_diagonal_block(capture.uncovered_parameter_indices, uncovered_diagonal))
    return blocks, combine_hashes(hashes)


def batch_seed(seed: int, batch_number: int) -> tf.Tensor:
    """The seed of the ``fisher="sampled"`` draws of one batch: ``[seed, batch_number]``."""
    return tf.constant([seed, batch_number], tf.int32)


def empty_blocks(capture: LayerCapture) -> list[CurvatureBlock]:
    """Blocks with the layout of ``capture`` and no values yet (filled by a load)."""
    blocks = [
        CurvatureBlock(layer.name, layer.kind, layer.parameter_indices, layer.num_rows, layer.num_columns, np.zeros(0))
        for layer in capture.layers
    ]
    indices = capture.uncovered_parameter_indices
    if indices.size:
        blocks.append(_diagonal_block(indices, np.zeros(indices.size)))
    return blocks


# ---------------------------------------------------------------------- statistics


def _positions_per_layer(statistics: list[LayerStatistics]) -> np.ndarray:
    """``[layers]`` positions ``B × T`` of each layer in one batch (``A`` is their mean), from the static shapes."""
    return np.array([int(np.prod(stats.activations.shape[:2])) for stats in statistics], dtype=np.int64)


def _layer_structure(layers: list[CapturedLayer], num_uncovered: int) -> tuple[Any, ...]:
    """What the traced per-batch updates depend on besides their tensors: the key they are shared under."""
    return (*((layer.kind, layer.num_rows, layer.num_columns) for layer in layers), num_uncovered)


def _factor_update(model: InfluenceModel, layers: list[CapturedLayer], num_uncovered: int) -> Any:
    """The traced update of one factor pass: float64 running sums of ``a aᵀ`` per layer, ``g gᵀ`` and ``g²``.

    ``update(row_sums, column_sums, uncovered_sum, statistics, uncovered)`` returns the three sums with one batch
    added (``row_sums[i]`` ``[rows, rows]``, ``[rows]`` for an Embedding: token counts; ``column_sums[i]``
    ``[columns, columns]``; ``uncovered_sum`` ``[U]``). One graph call per batch for every layer; shared by the
    solvers of one model (``InfluenceModel.shared_function``), traced again only for a new batch shape, then
    with relaxed shapes.
    """
    kinds = [(layer.kind, layer.num_rows, layer.num_columns) for layer in layers]

    def update(
        row_sums: list[tf.Tensor],
        column_sums: list[tf.Tensor],
        uncovered_sum: tf.Tensor,
        statistics: list[LayerStatistics],
        uncovered: tf.Tensor,
    ) -> tuple[list[tf.Tensor], list[tf.Tensor], tf.Tensor]:
        rows_out, columns_out = [], []
        for (kind, rows, columns), row_sum, column_sum, (activations, gradients) in zip(
            kinds, row_sums, column_sums, statistics, strict=True
        ):
            if kind == "embedding":
                tokens = tf.reshape(activations, [-1])
                row = tf.math.unsorted_segment_sum(tf.ones_like(tokens, tf.float64), tokens, rows)
            else:
                flat = tf.reshape(tf.cast(activations, tf.float64), [-1, rows])
                row = tf.matmul(flat, flat, transpose_a=True)
            flat_gradients = tf.reshape(tf.cast(gradients, tf.float64), [-1, columns])
            rows_out.append(row_sum + row)
            columns_out.append(column_sum + tf.matmul(flat_gradients, flat_gradients, transpose_a=True))
        squares = tf.reduce_sum(tf.square(tf.cast(uncovered, tf.float64)), axis=[0, 1])
        return rows_out, columns_out, uncovered_sum + squares

    key = ("influenciae.kfac.factor_update", _layer_structure(layers, num_uncovered))
    return model.shared_function(key, lambda: tf.function(update, reduce_retracing=True, autograph=False))


def _correction_update(model: InfluenceModel, layers: list[CapturedLayer], num_uncovered: int) -> Any:
    """The traced update of the eigenvalue pass: ``Σ_{k,i} (Q_Aᵀ G_ik Q_S)²`` per layer, and ``g²`` of the rest.

    ``update(sums, uncovered_sum, statistics, uncovered, row_bases, column_bases)`` returns the sums
    (``[rows, columns]`` per layer, float64) with one batch added; a basis is None for the identity. The bases
    rotate ``a`` and ``g`` and the per-example products ``Σ_t a_t g_tᵀ`` are formed in the layer's dtype (these
    are the pass's ``O(B T r c)`` products); each batch's sum of squares is accumulated in float64. Shared and
    traced as :func:`_factor_update`.
    """
    kinds = [layer.kind for layer in layers]

    def update(
        sums: list[tf.Tensor],
        uncovered_sum: tf.Tensor,
        statistics: list[LayerStatistics],
        uncovered: tf.Tensor,
        row_bases: list[tf.Tensor | None],
        column_bases: list[tf.Tensor | None],
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        out = []
        for kind, total, (activations, gradients), row_basis, column_basis in zip(
            kinds, sums, statistics, row_bases, column_bases, strict=True
        ):
            if column_basis is not None:
                gradients = tf.matmul(gradients, tf.cast(column_basis, gradients.dtype))  # [K, B, T, columns]
            if kind == "embedding":
                out.append(total + _embedding_squares(activations, gradients, int(total.shape[0])))
                continue
            activations = tf.cast(activations, gradients.dtype)  # [B, T, rows]
            if row_basis is not None:
                activations = tf.matmul(activations, tf.cast(row_basis, gradients.dtype))
            out.append(total + _dense_squares(activations, gradients))
        squares = tf.reduce_sum(tf.square(tf.cast(uncovered, tf.float64)), axis=[0, 1])
        return out, uncovered_sum + squares

    key = ("influenciae.kfac.correction_update", _layer_structure(layers, num_uncovered))
    return model.shared_function(key, lambda: tf.function(update, reduce_retracing=True, autograph=False))


def _dense_squares(activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
    """``Σ_{k,i} (Σ_t a_it g_iktᵀ)²`` ``[rows, columns]`` float64 from activations ``[B, T, r]``, gradients
    ``[K, B, T, c]`` (both in the layer's dtype).

    One position per example: ``(a ⊗ g)² = a² ⊗ g²``, one matmul. Otherwise the per-example products are formed
    ``_CHUNK_ELEMENTS`` at a time, in a graph loop over chunks of examples when the batch is larger.
    """
    if activations.shape[1] == 1:
        squared_gradients = tf.reduce_sum(tf.square(gradients[:, :, 0]), axis=0)  # [B, c]
        return tf.cast(tf.matmul(tf.square(activations[:, 0]), squared_gradients, transpose_a=True), tf.float64)
    count, rows, columns = int(gradients.shape[0]), int(activations.shape[-1]), int(gradients.shape[-1])
    chunk = max(1, _CHUNK_ELEMENTS // max(count * rows * columns, 1))

    def squares(start: tf.Tensor | int) -> tf.Tensor:
        per_example = tf.einsum(
            "btr,kbtc->kbrc", activations[start : start + chunk], gradients[:, start : start + chunk]
        )
        return tf.cast(tf.reduce_sum(tf.square(per_example), axis=[0, 1]), tf.float64)

    size = activations.shape[0]
    if size is not None and size <= chunk:
        return squares(0)
    _, total = tf.while_loop(
        lambda start, _: start < tf.shape(activations)[0],
        lambda start, total: (start + chunk, total + squares(start)),
        (tf.constant(0), tf.zeros([rows, columns], tf.float64)),
    )
    return total


def _embedding_squares(tokens: tf.Tensor, gradients: tf.Tensor, vocabulary: int) -> tf.Tensor:
    """``Σ_{k,i} G_ik²`` ``[vocabulary, columns]`` float64 with ``G_ik[v] = Σ_{t: token_it = v} g_ikt``, never dense
    in v (tokens ``[B, T]``, gradients ``[K, B, T, columns]``)."""
    count, columns = int(gradients.shape[0]), int(gradients.shape[-1])
    size, positions = tf.shape(gradients)[1], tf.shape(gradients)[2]
    example = tf.repeat(tf.range(tf.cast(size, tf.int64), dtype=tf.int64), positions)
    keys = example * vocabulary + tf.reshape(tokens, [-1])
    unique, segment = tf.unique(keys)
    values = tf.reshape(tf.transpose(gradients, [1, 2, 0, 3]), [-1, count * columns])
    summed = tf.math.unsorted_segment_sum(values, segment, tf.shape(unique)[0])  # [U, K * columns]
    squares = tf.reduce_sum(tf.reshape(tf.square(summed), [-1, count, columns]), axis=1)
    return tf.cast(tf.math.unsorted_segment_sum(squares, unique % vocabulary, vocabulary), tf.float64)


def _symmetric_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return np.maximum(values, 0.0), vectors


def _kronecker_block(layer: CapturedLayer, row_factor: np.ndarray, column_factor: np.ndarray) -> CurvatureBlock:
    column_eigenvalues, column_basis = _symmetric_eigh(column_factor)
    if layer.kind == "embedding":  # A is diagonal: its eigenbasis is the identity
        row_eigenvalues, row_basis = np.maximum(row_factor, 0.0), None
    else:
        row_eigenvalues, row_basis = _symmetric_eigh(row_factor)
    return CurvatureBlock(
        name=layer.name,
        kind=layer.kind,
        parameter_indices=layer.parameter_indices,
        rows=layer.num_rows,
        columns=layer.num_columns,
        eigenvalues=np.outer(row_eigenvalues, column_eigenvalues),
        row_factor=row_factor,
        column_factor=column_factor,
        row_basis=row_basis,
        column_basis=column_basis,
        row_eigenvalues=row_eigenvalues,
        column_eigenvalues=column_eigenvalues,
    )


def _identity_block(layer: CapturedLayer) -> CurvatureBlock:
    return CurvatureBlock(
        layer.name,
        layer.kind,
        layer.parameter_indices,
        layer.num_rows,
        layer.num_columns,
        np.zeros([layer.num_rows, layer.num_columns]),
    )


def _diagonal_block(indices: np.ndarray, diagonal: np.ndarray) -> CurvatureBlock:
    return CurvatureBlock("<uncovered>", "diagonal", indices, int(indices.size), 1, np.asarray(diagonal)[:, None])
