"""Layer capture, K-FAC, EK-FAC, diagonal and identity solvers: closed forms and exact Gauss-Newton blocks (float64)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import FLOAT, classification_data, dataset, exact_softmax_ggn, fit, kron_basis, small_mlp, sparse_ce

from influenciae import EKFACIHVP, KFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.hessian import DiagonalIHVP, ExactIHVP, IdentityIHVP, get_ihvp, registered_solvers
from influenciae.model.capture import LayerCapture

CLASSES = 3


# ---------------------------------------------------------------------- models covering every capture path


def _mlp():
    """Dense on vectors (one position per example), tanh fused into the layer."""
    model = small_mlp(seed=0, num_features=5, hidden=4, classes=CLASSES)
    x, y = classification_data(num_examples=24, num_features=5, classes=CLASSES, seed=0)
    return model, x, y


def _cnn():
    """Conv2D 'same' (dilated) and 'valid' with strides 2, an uncovered BatchNormalization, then Dense."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((7, 7, 2), dtype=FLOAT)
    hidden = keras.layers.Conv2D(3, 3, padding="same", dilation_rate=2, activation="relu", dtype=FLOAT)(inputs)
    hidden = keras.layers.Conv2D(2, 2, strides=2, padding="valid", activation="tanh", dtype=FLOAT)(hidden)
    hidden = keras.layers.Conv2D(2, 3, strides=(2, 1), padding="same", use_bias=False, dtype=FLOAT)(hidden)
    hidden = keras.layers.Flatten(dtype=FLOAT)(hidden)
    hidden = keras.layers.BatchNormalization(dtype=FLOAT)(hidden)
    outputs = keras.layers.Dense(CLASSES, dtype=FLOAT)(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    return model, rng.standard_normal((10, 7, 7, 2)), rng.integers(0, CLASSES, 10)


def _embedding():
    """Embedding on token sequences, a Dense applied per token (several positions), pooling, Dense."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 3, dtype=FLOAT),
            keras.layers.Dense(4, activation="tanh", dtype=FLOAT),
            keras.layers.GlobalAveragePooling1D(dtype=FLOAT),
            keras.layers.Dense(CLASSES, dtype=FLOAT),
        ]
    )
    rng = np.random.default_rng(2)
    return model, rng.integers(0, 7, (12, 5)).astype("int32"), rng.integers(0, CLASSES, 12)


class SharedDense(keras.Model):
    """A subclassed model that calls the same Dense layer twice."""

    def __init__(self) -> None:
        super().__init__(dtype=FLOAT)
        self.shared = keras.layers.Dense(4, activation="tanh", dtype=FLOAT)
        self.head = keras.layers.Dense(CLASSES, dtype=FLOAT)

    def call(self, inputs):
        return self.head(self.shared(self.shared(inputs)))


def _shared():
    keras.utils.set_random_seed(3)
    model = SharedDense()
    model(np.zeros((1, 4)))
    x, y = classification_data(num_examples=9, num_features=4, classes=CLASSES, seed=3)
    return model, x, y


MODELS = {"mlp": _mlp, "cnn": _cnn, "embedding": _embedding, "shared": _shared}


@pytest.fixture(scope="module", params=sorted(MODELS))
def problem(request):
    model, x, y = MODELS[request.param]()
    return request.param, InfluenceModel(model, loss_function=sparse_ce()), x, y


def _tape_loop_gradients(im: InfluenceModel, x, y, weights=None) -> np.ndarray:
    rows = []
    for index in range(len(x)):
        with tf.GradientTape() as tape:
            logits = im.model(x[index : index + 1], training=False)
            loss = im.loss_function(y[index : index + 1], logits)[0] * (1.0 if weights is None else weights[index])
        gradients = tape.gradient(loss, im.weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        rows.append(im.flatten([tf.convert_to_tensor(g) for g in gradients]).numpy())
    return np.stack(rows)


# ---------------------------------------------------------------------- capture


def test_captured_per_example_gradients_equal_a_tape_loop(problem):
    name, im, x, y = problem
    capture = LayerCapture(im)
    expected_kinds = {"mlp": {"dense"}, "cnn": {"conv2d", "dense"}, "embedding": {"embedding", "dense"}}
    assert {layer.kind for layer in capture.layers} == expected_kinds.get(name, {"dense"})
    assert (len(capture.uncovered_weight_names) == 2) == (name == "cnn")  # BatchNormalization's gamma and beta
    reference = _tape_loop_gradients(im, x, y)
    np.testing.assert_allclose(capture.per_example_gradients((x, y)).numpy(), reference, rtol=1e-10, atol=1e-12)


def test_capture_with_sample_weights_and_uncovered_weights():
    model, x, y = _cnn()
    im = InfluenceModel(model, loss_function=sparse_ce())
    capture = LayerCapture(im)
    assert [name.split("/")[-1] for name in capture.uncovered_weight_names] == ["gamma", "beta"]
    weights = np.linspace(0.5, 2.0, len(x))
    reference = _tape_loop_gradients(im, x, y, weights)
    np.testing.assert_allclose(capture.per_example_gradients((x, y, weights)).numpy(), reference, atol=1e-12)
    # the model's layers are left untouched after a pass
    assert all("call" not in vars(layer.layer) for layer in capture.layers)


@pytest.mark.slow
def test_sampled_pseudo_gradients_have_the_output_hessian_as_covariance():
    model, x, y = _mlp()
    im = InfluenceModel(model, loss_function=sparse_ce())
    capture = LayerCapture(im)
    probabilities = tf.nn.softmax(model(x[:1])).numpy()[0]
    output_hessian = np.diag(probabilities) - np.outer(probabilities, probabilities)
    expected = capture.capture((x[:1], y[:1]), fisher="expected")[0][-1].gradients.numpy()[:, 0, 0]  # [K, C]
    np.testing.assert_allclose(expected.T @ expected, output_hessian, atol=1e-12)  # last layer: g = L_k exactly
    samples = np.stack(
        [
            capture.capture((x[:1], y[:1]), fisher="sampled", seed=s)[0][-1].gradients.numpy()[0, 0, 0]
            for s in range(300)
        ]
    )
    assert np.abs(samples.T @ samples / len(samples) - output_hessian).max() < 0.25 * np.abs(output_hessian).max()


# ---------------------------------------------------------------------- factors against closed forms and the GGN


@pytest.mark.slow
def test_kfac_factors_closed_form():
    model, x, y = _mlp()
    im = InfluenceModel(model, loss_function=sparse_ce())
    for fisher in ("expected", "empirical"):
        solver = KFACIHVP(im, dataset(x, y, batch_size=5), fisher=fisher).fit()
        first, last = solver.blocks
        augmented = np.hstack([x, np.ones((len(x), 1))])
        np.testing.assert_allclose(first.row_factor, augmented.T @ augmented / len(x), atol=1e-12)
        kernel, bias = model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()
        hidden = np.hstack([np.tanh(x @ kernel + bias), np.ones((len(x), 1))])
        np.testing.assert_allclose(last.row_factor, hidden.T @ hidden / len(x), atol=1e-12)
        probabilities = tf.nn.softmax(model(x)).numpy()
        if fisher == "expected":  # S of the last layer: the mean output Hessian diag(p) - p pᵀ
            column = np.mean([np.diag(p) - np.outer(p, p) for p in probabilities], axis=0)
        else:  # the empirical Fisher: mean (p - e_y)(p - e_y)ᵀ
            residual = probabilities - np.eye(CLASSES)[y]
            column = residual.T @ residual / len(x)
        np.testing.assert_allclose(last.column_factor, column, atol=1e-12)
        np.testing.assert_allclose(last.eigenvalues, np.outer(last.row_eigenvalues, last.column_eigenvalues))


@pytest.mark.slow
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_eigenbasis(problem):
    name, im, x, y = problem
    ggn = exact_softmax_ggn(im, x, CLASSES)
    ekfac = EKFACIHVP(im, dataset(x, y, batch_size=4)).fit()
    diagonal = DiagonalIHVP(im, dataset(x, y, batch_size=5)).fit()
    for block, plain in zip(ekfac.blocks, diagonal.blocks, strict=True):
        indices = block.parameter_indices
        basis = kron_basis(block)
        in_basis = np.diag(basis.T @ ggn[np.ix_(indices, indices)] @ basis).reshape(block.rows, block.columns)
        np.testing.assert_allclose(block.eigenvalues, in_basis, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(plain.eigenvalues.ravel(), np.diag(ggn)[plain.parameter_indices], atol=1e-14)
    if name == "embedding":
        embedding = ekfac.blocks[0]
        assert embedding.row_factor.shape == (7,) and embedding.row_basis is None  # diagonal A, never vocab²


@pytest.mark.slow
@pytest.mark.parametrize("solver_class", [KFACIHVP, EKFACIHVP])
@pytest.mark.parametrize("damping, relative_damping", [(1e-3, 0.0), (1e-3, 0.1)])
def test_eigenbasis_solve_equals_a_dense_solve(solver_class, damping, relative_damping):
    model, x, y = _cnn()
    im = InfluenceModel(model, loss_function=sparse_ce())
    solver = solver_class(im, dataset(x, y, batch_size=4), damping=damping, relative_damping=relative_damping)
    dense = np.zeros((im.nb_params, im.nb_params))
    for block in solver.blocks:
        indices = block.parameter_indices
        if block.kind == "diagonal":
            matrix = np.diag(block.eigenvalues[:, 0])
        elif solver_class is KFACIHVP:  # the K-FAC matrix itself, A ⊗ S
            matrix = np.kron(block.row_factor, block.column_factor)
        else:
            basis = kron_basis(block)
            matrix = basis @ np.diag(block.eigenvalues.ravel()) @ basis.T
        mean_eigenvalue = np.trace(matrix) / len(indices)
        dense[np.ix_(indices, indices)] = matrix + (damping + relative_damping * mean_eigenvalue) * np.eye(len(indices))
    vectors = np.random.default_rng(0).standard_normal((3, im.nb_params))
    np.testing.assert_allclose(solver.solve(vectors).numpy(), np.linalg.solve(dense, vectors.T).T, rtol=1e-8)
    np.testing.assert_allclose(solver.hvp(vectors).numpy(), vectors @ dense, atol=1e-10)
    # the exact solver on the K-FAC operator agrees too (the operator is the damped block-diagonal matrix)
    exact = ExactIHVP(None, operator=solver.operator, method="eigh")
    np.testing.assert_allclose(exact.solve(vectors).numpy(), solver.solve(vectors).numpy(), rtol=1e-7)


# ---------------------------------------------------------------------- integration, save/load, errors


@pytest.mark.slow
def test_solvers_are_registered_and_work_in_the_calculator():
    assert {"kfac", "ekfac", "diagonal", "identity"} <= set(registered_solvers())
    model, x, y = _mlp()
    fit(model, x, y, steps=100)
    im = InfluenceModel(model, loss_function=sparse_ce())
    train = dataset(x, y, batch_size=7)
    test = dataset(x[:4], y[:4], batch_size=4)
    gradients = im.batch_jacobian_tensor((x, y)).numpy()
    for name in ("kfac", "ekfac", "diagonal", "identity"):
        calculator = FirstOrderInfluenceCalculator(im, train, ihvp_calculator=name, damping=1e-3)
        scores = calculator.influence_matrix(test, train)
        solved = calculator.ihvp.solve(gradients).numpy()
        np.testing.assert_allclose(scores, gradients[:4] @ solved.T, rtol=1e-8, atol=1e-12)
    identity = get_ihvp("identity", im, None, damping=1.0)
    np.testing.assert_allclose(identity.solve(gradients[:2]).numpy(), gradients[:2] / 2.0)
    empirical = get_ihvp("ekfac", im, train, curvature="empirical_fisher", damping=1e-3)
    assert empirical.fisher == "empirical"


@pytest.mark.slow
def test_factors_are_saved_and_loaded_with_the_cache_rules(tmp_path):
    model, x, y = _mlp()
    im = InfluenceModel(model, loss_function=sparse_ce())
    train = dataset(x, y, batch_size=6)
    vectors = np.random.default_rng(1).standard_normal((2, im.nb_params))
    first = EKFACIHVP(im, train, damping=1e-3, factors_path=tmp_path).fit()
    assert (tmp_path / "manifest.json").exists() and first.timings["correction"] > 0
    loaded = EKFACIHVP(im, train, damping=1e-2, factors_path=tmp_path).fit()  # damping is not part of the factors
    assert loaded.timings == {}
    for block, other in zip(first.blocks, loaded.blocks, strict=True):
        np.testing.assert_array_equal(block.eigenvalues, other.eigenvalues)
    reference = EKFACIHVP(im, train, damping=1e-2)
    np.testing.assert_allclose(loaded.solve(vectors).numpy(), reference.solve(vectors).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="fisher"):
        EKFACIHVP(im, train, fisher="empirical", factors_path=tmp_path).fit()
    with pytest.raises(ValueError, match="other input batches"):
        EKFACIHVP(im, dataset(x[:-1], y[:-1], batch_size=6), factors_path=tmp_path).fit()
    model.layers[-1].bias.assign(model.layers[-1].bias + 1.0)
    with pytest.raises(ValueError, match="weights_fingerprint"):
        EKFACIHVP(im, train, factors_path=tmp_path).fit()
    refit = EKFACIHVP(im, train, factors_path=tmp_path, overwrite_factors=True).fit()
    assert refit.timings["factors"] > 0


def test_errors_name_the_fix():
    model, x, y = _mlp()
    im = InfluenceModel(model, loss_function=sparse_ce())
    train = dataset(x, y)
    with pytest.raises(ValueError, match="fisher must be one of"):
        KFACIHVP(im, train, fisher="true")
    with pytest.raises(ValueError, match="relative_damping"):
        KFACIHVP(im, train, relative_damping=-1.0)
    with pytest.raises(ValueError, match="cannot use"):
        get_ihvp("kfac", im, train, operator=np.eye(im.nb_params))
    keras.utils.set_random_seed(0)
    dead = keras.Sequential([keras.Input((5,), dtype=FLOAT), keras.layers.Dense(CLASSES, dtype=FLOAT)])
    dead_im = InfluenceModel(dead, loss_function=sparse_ce())
    with pytest.raises(ValueError, match="singular.*add damping"):
        KFACIHVP(dead_im, dataset(x, y)).solve(np.ones((1, dead_im.nb_params)))
    assert isinstance(IdentityIHVP(im).solve(np.ones(im.nb_params)), tf.Tensor)
