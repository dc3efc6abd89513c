"""K-FAC/EK-FAC fast paths (traced per-batch updates, traced solves) against the plain formulas, and their traces.

The reference here is the formula the solver used before its fitting and solves were traced: the factors and
eigenvalues from the captured ``(a, g)`` of each batch, in numpy float64 (``A = Σ a aᵀ / positions``,
``S = Σ g gᵀ / N``, ``Λ = Σ (Q_Aᵀ G Q_S)² / N`` with the per-example ``G = Σ_t a_t g_tᵀ``), and the solve as a dense
``(Q_A ⊗ Q_S) diag(1 / (Λ + λ)) (Q_A ⊗ Q_S)ᵀ`` per block on the block's flat parameter positions.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import FLOAT, dataset, kron_basis, sparse_ce

from influenciae import EKFACIHVP, KFACIHVP, InfluenceModel
from influenciae.hessian import kfac, kfac_fit
from influenciae.model.capture import block_gradients

CLASSES = 3
DAMPING = 1e-3


def _conv_dense_model():
    """Conv2D (9 positions per example), an uncovered BatchNormalization between the covered layers (so the blocks'
    parameter order is not the model's), then two Dense layers."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((5, 5, 2), dtype=FLOAT)
    hidden = keras.layers.Conv2D(3, 3, padding="valid", activation="tanh", dtype=FLOAT)(inputs)
    hidden = keras.layers.Flatten(dtype=FLOAT)(hidden)
    hidden = keras.layers.BatchNormalization(dtype=FLOAT)(hidden)
    hidden = keras.layers.Dense(4, activation="tanh", dtype=FLOAT)(hidden)
    outputs = keras.layers.Dense(CLASSES, dtype=FLOAT)(hidden)
    rng = np.random.default_rng(4)
    return keras.Model(inputs, outputs), rng.standard_normal((10, 5, 5, 2)), rng.integers(0, CLASSES, 10)


def _reference_blocks(solver: kfac.BlockDiagonalIHVP, train) -> tuple[list, list, list, np.ndarray]:
    """``(A, S, Λ)`` per captured layer and the uncovered ``E[g²]``, from the captured statistics in numpy."""
    layers = solver.capture.layers
    rows = [0.0] * len(layers)
    columns = [0.0] * len(layers)
    positions = [0] * len(layers)
    gradients_per_batch, uncovered_sum, count = [], 0.0, 0
    for number, batch in enumerate(train):
        statistics, uncovered = solver.capture.capture(batch, fisher="expected", seed=solver._seed(number))
        for index, (activations, gradients) in enumerate(statistics):
            a = activations.numpy().reshape(-1, layers[index].num_rows)
            g = gradients.numpy().reshape(-1, layers[index].num_columns)
            rows[index] = rows[index] + a.T @ a
            columns[index] = columns[index] + g.T @ g
            positions[index] += a.shape[0]
        gradients_per_batch.append(
            [block_gradients(layer, s).numpy() for layer, s in zip(layers, statistics, strict=True)]
        )
        uncovered_sum = uncovered_sum + np.sum(uncovered.numpy() ** 2, axis=(0, 1))
        count += int(uncovered.shape[1])
    row_factors = [total / n for total, n in zip(rows, positions, strict=True)]
    column_factors = [total / count for total in columns]
    eigenvalues = []
    for index, (row_factor, column_factor) in enumerate(zip(row_factors, column_factors, strict=True)):
        row_basis = np.linalg.eigh((row_factor + row_factor.T) / 2)[1]
        column_basis = np.linalg.eigh((column_factor + column_factor.T) / 2)[1]
        total = 0.0
        for batch_gradients in gradients_per_batch:  # [K, B, rows, columns]
            rotated = np.einsum("ra,kbrc,cs->kbas", row_basis, batch_gradients[index], column_basis)
            total = total + np.sum(rotated**2, axis=(0, 1))
        eigenvalues.append(total / count)
    return row_factors, column_factors, eigenvalues, uncovered_sum / count


def _dense_solve(solver: kfac.BlockDiagonalIHVP, vectors: np.ndarray, *, inverse: bool) -> np.ndarray:
    result = np.zeros_like(vectors)
    for block in solver.blocks:
        indices = block.parameter_indices
        basis = kron_basis(block)
        scale = block.eigenvalues.ravel() + solver.block_damping(block)
        matrix = basis @ np.diag(1.0 / scale if inverse else scale) @ basis.T
        result[:, indices] = vectors[:, indices] @ matrix
    return result


def _kfac_traces(im: InfluenceModel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key, function in im._shared_functions.items():
        if isinstance(key, tuple) and str(key[0]).startswith(("influenciae.kfac.", "influenciae.model.capture")):
            # trace keys: "influenciae.kfac.<update>" and "influenciae.model.capture" (the capture moved into model/)
            name = key[0].removeprefix("influenciae.kfac.").removeprefix("influenciae.model.")
            counts[name] = counts.get(name, 0) + function.experimental_get_tracing_count()
    return counts


@pytest.fixture(scope="module")
def problem():
    model, x, y = _conv_dense_model()
    return model, x, y


@pytest.mark.parametrize("variant", ["default", "gather_and_chunks"])
def test_fast_paths_equal_the_plain_formulas(problem, variant, monkeypatch):
    model, x, y = problem
    if variant == "gather_and_chunks":  # the column gather instead of slices, and 2 examples per product chunk
        monkeypatch.setattr(kfac, "_MAX_SLICES", 0)
        monkeypatch.setattr(kfac_fit, "_CHUNK_ELEMENTS", 2 * CLASSES * 19 * 3)  # the fitting moved to kfac_fit
    im = InfluenceModel(model, loss_function=sparse_ce())
    train = dataset(x, y, batch_size=4)  # batches of 4, 4, 2
    solver = EKFACIHVP(im, train, damping=DAMPING, relative_damping=0.1).fit()
    permutation = np.concatenate([block.parameter_indices for block in solver.blocks])
    assert not np.array_equal(permutation, np.arange(im.nb_params))  # the reordering is exercised
    row_factors, column_factors, eigenvalues, uncovered = _reference_blocks(solver, train)
    *kronecker, diagonal = solver.blocks
    assert [block.kind for block in kronecker] == ["conv2d", "dense", "dense"] and diagonal.kind == "diagonal"
    for block, row_factor, column_factor, expected in zip(
        kronecker, row_factors, column_factors, eigenvalues, strict=True
    ):
        np.testing.assert_allclose(block.row_factor, row_factor, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(block.column_factor, column_factor, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(block.eigenvalues, expected, rtol=1e-10, atol=1e-14 * np.max(expected))
    np.testing.assert_allclose(diagonal.eigenvalues[:, 0], uncovered, rtol=1e-10, atol=1e-16)
    vectors = np.random.default_rng(0).standard_normal((5, im.nb_params))
    np.testing.assert_allclose(solver.solve(vectors).numpy(), _dense_solve(solver, vectors, inverse=True), rtol=1e-10)
    np.testing.assert_allclose(solver.hvp(vectors).numpy(), _dense_solve(solver, vectors, inverse=False), rtol=1e-10)


def test_fitting_and_solving_trace_a_bounded_number_of_functions(problem):
    model, x, y = problem
    im = InfluenceModel(model, loss_function=sparse_ce())
    solver = EKFACIHVP(im, dataset(x, y, batch_size=4), damping=DAMPING).fit()  # 3 batches, the last one smaller
    # one trace per phase for the full batches, one with relaxed shapes for the last: not one per batch or layer;
    # the capture pads every chunk to the first batch's size: one trace
    fitted = {"capture": 1, "factor_update": 2, "correction_update": 2}
    assert _kfac_traces(im) == fitted
    for count in (1, 3, 7, 2):
        solver.solve(np.ones((count, im.nb_params)))
    solver.hvp(np.ones((4, im.nb_params)))
    assert _kfac_traces(im) == {**fitted, "apply_blocks": 2}  # one for solves, one for products
    # a new solver of the same model on the same batches traces nothing again
    EKFACIHVP(im, dataset(x, y, batch_size=4), damping=DAMPING).solve(np.ones((2, im.nb_params)))
    assert _kfac_traces(im) == {**fitted, "apply_blocks": 2}
    # more batches of another size: only the capture of the new chunk size is traced
    other = KFACIHVP(im, dataset(np.concatenate([x, x]), np.concatenate([y, y]), batch_size=3), damping=DAMPING)
    other.solve(np.ones((2, im.nb_params)))
    assert _kfac_traces(im) == {**fitted, "capture": 2, "apply_blocks": 2}
