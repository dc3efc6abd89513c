"""Dataset curvature operators held as tensors: one graph call per product, equal to the streaming path."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf
from helpers import classification_data, dataset, small_mlp, sparse_ce

from influenciae import ExactIHVP, InfluenceModel
from influenciae.hessian import HessianOperator
from influenciae.hessian import held as held_module
from influenciae.hessian.operator import HELD_DATA_BUDGET, hold_batches

NUM_EXAMPLES, BATCH_SIZE = 76, 8  # 10 batches, the last one partial (4 examples: streamed, padded to 8 too)


@functools.cache  # one model per dtype for the module: its traced functions are shared
def _problem(dtype: str = "float64"):
    model = small_mlp(dtype=dtype)  # L2 kernel regularizers on both layers
    im = InfluenceModel(model, last_layer=-1, loss_function=sparse_ce(), hvp_chunk_size=16)  # blocks of 16
    x, y = classification_data(NUM_EXAMPLES)
    weights = np.random.default_rng(1).uniform(0.2, 3.0, NUM_EXAMPLES)
    data = dataset(x.astype(dtype), y, batch_size=BATCH_SIZE, sample_weight=weights.astype(dtype))
    vectors = np.random.default_rng(2).standard_normal((20, im.nb_params)).astype(dtype)  # two blocks of 16
    return im, data, vectors


@functools.cache
def _streamed(dtype: str, count: int) -> np.ndarray:
    """The streamed Hessian product of the first ``count`` vectors (the reference)."""
    im, data, vectors = _problem(dtype)
    return HessianOperator(im, data, held_data_budget=0).matmul_rows(vectors[:count]).numpy()


def _count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _held_functions(im):
    return {key: function for key, function in im._shared_functions.items() if key[0] == "held_matmul"}


@pytest.mark.parametrize("dtype, tolerance, counts", [("float64", 1e-10, (20, 1)), ("float32", 1e-5, (16,))])
def test_held_products_equal_the_streamed_ones(dtype, tolerance, counts):
    im, data, vectors = _problem(dtype)
    assert im._has_regularization()
    held = HessianOperator(im, data)
    streamed = HessianOperator(im, data, held_data_budget=0)
    expected = _streamed(dtype, counts[0])
    assert np.abs(expected).max() > 1e-2  # a product worth comparing
    for count in counts:  # two blocks of 16 (the second zero-padded), and one vector (Arnoldi's products)
        np.testing.assert_allclose(held.matmul_rows(vectors[:count]).numpy(), expected[:count], rtol=0, atol=tolerance)
    assert held.traceable and not streamed.traceable
    assert held.num_examples == streamed.num_examples == NUM_EXAMPLES  # N counted right: padding is not counted
    data_held = held.held_data()
    # a small model's 10 batches of 8 (a few KiB) are held as one batch of 80
    assert data_held is not None and tuple(data_held.weights.shape) == (1, 10 * BATCH_SIZE)
    assert np.all(data_held.weights.numpy().ravel()[NUM_EXAMPLES:] == 0)  # padding carries no weight
    np.testing.assert_array_equal(data_held.indices.numpy().ravel(), np.minimum(np.arange(80), NUM_EXAMPLES - 1))


@pytest.mark.parametrize("max_params, batch_bytes, layout", [(0, 2**20, (10, 8)), (10**6, 1100, (5, 16))])
def test_held_batches_are_merged_by_the_byte_budget_for_small_models(monkeypatch, max_params, batch_bytes, layout):
    # a larger model keeps the batches of 8; 76 examples of 64 bytes (6 float64 features, a label, a weight) in
    # 1,100-byte batches: two of the dataset's batches of 8 per held batch (a power of two), 5 of 16
    monkeypatch.setattr(held_module, "MERGE_MAX_PARAMS", max_params)
    monkeypatch.setattr(held_module, "HELD_BATCH_BYTES", batch_bytes)
    im, data, vectors = _problem("float64")
    held = HessianOperator(im, data.map(lambda *batch: batch))  # a new dataset object: its data is read again
    assert tuple(held.held_data().weights.shape) == layout
    np.testing.assert_allclose(held.matmul_rows(vectors[:20]).numpy(), _streamed("float64", 20), rtol=0, atol=1e-10)


def test_a_product_is_one_dispatch_and_new_operators_do_not_trace_again(monkeypatch):
    monkeypatch.setattr(held_module, "HELD_BATCH_BYTES", 1100)  # batches of 16 for any N (see below)
    im, data, vectors = _problem()
    first = HessianOperator(im, data)
    first.matmul_rows(vectors)
    block = f"TensorSpec(shape=(None, 16, {im.nb_params})"  # the function of blocks of 16 vectors
    (key,) = [key for key in _held_functions(im) if key[1] == "hessian" and block in key[-1]]
    function = im._shared_functions[key]
    traces = function.experimental_get_tracing_count()
    assert traces == 1
    per_batch = _count_calls(monkeypatch, im, "batch_hvp_sum")
    dispatches = []
    monkeypatch.setitem(im._shared_functions, key, lambda *args: dispatches.append(1) or function(*args))

    second = HessianOperator(im, data)  # a new operator: reads its data once, then one call per product
    second.matmul_rows(vectors)
    assert (len(dispatches), len(per_batch)) == (1, 0)
    more = dataset(*classification_data(150, seed=3), batch_size=BATCH_SIZE)  # 19 batches: same trace
    HessianOperator(im, more).matmul_rows(vectors)
    solver = ExactIHVP(im, data, damping=1.0)  # a solver on the same model: its dense build is one more call
    solution = solver.solve(vectors[:2]).numpy()
    assert len(per_batch) == 0 and len(dispatches) == 3
    assert function.experimental_get_tracing_count() == traces
    dense = second.to_dense().numpy()
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    np.testing.assert_allclose(solution, np.linalg.solve(dense + np.eye(len(dense)), vectors[:2].T).T, atol=1e-8)


def test_a_dataset_above_the_budget_streams_with_the_same_numbers(monkeypatch):
    im, data, vectors = _problem()
    held = HessianOperator(im, data).matmul_rows(vectors).numpy()
    assert HELD_DATA_BUDGET >= 2**20
    small = HessianOperator(im, data, held_data_budget=1000)  # a batch: 8 * (6 + 1 + 1) * 8 = 512 bytes
    assert not small.traceable and small.held_data() is None
    per_batch = _count_calls(monkeypatch, im, "batch_hvp_sum")
    np.testing.assert_allclose(small.matmul_rows(vectors).numpy(), held, rtol=0, atol=1e-10)
    assert len(per_batch) == 10
    fits = HessianOperator(im, data, held_data_budget=76 * 64)  # exactly the data's size: held
    assert fits.traceable
    with pytest.raises(ValueError, match="held_data_budget"):
        HessianOperator(im, data, held_data_budget=-1)


def test_bad_data_in_a_later_batch_is_refused_on_the_first_pass():
    im, _, vectors = _problem()
    x, y = classification_data(NUM_EXAMPLES)
    x[30, 2] = np.nan  # batch 3
    operator = HessianOperator(im, dataset(x, y, batch_size=BATCH_SIZE))
    with pytest.raises(ValueError, match=r"batch 3 \(examples from index 24 on\) has non-finite inputs"):
        operator.matmul_rows(vectors)
    with pytest.raises(ValueError, match=r"batch 3 .*non-finite inputs"):
        _ = operator.traceable  # still refused: nothing was held
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(im, dataset(x, y, batch_size=BATCH_SIZE).take(0)).matmul_rows(vectors)


def test_a_held_operator_runs_inside_a_callers_tf_function():
    im, data, vectors = _problem()
    operator = HessianOperator(im, data)
    assert operator.traceable
    expected = operator.matmul_rows(vectors).numpy()

    @tf.function
    def twice(block):
        return operator.matmul_rows(operator.matmul_rows(block))

    np.testing.assert_allclose(twice(tf.constant(vectors[:1])).numpy(), operator.matmul_rows(expected[:1]), atol=1e-12)
    dynamic = tf.function(operator.matmul_rows, input_signature=[tf.TensorSpec([None, im.nb_params], tf.float64)])
    np.testing.assert_allclose(dynamic(tf.constant(vectors)).numpy(), expected, rtol=0, atol=1e-10)


def test_batches_of_different_shapes_stream():
    """Sequences padded per batch have different lengths: they cannot be stacked, so the operator streams."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(7, 3, dtype="float64"),
            keras.layers.GlobalAveragePooling1D(dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    im = InfluenceModel(model, last_layer=-1, loss_function=sparse_ce())
    rng = np.random.default_rng(0)
    lengths = [3, 3, 5, 5, 2, 2]
    tokens = tf.ragged.constant([rng.integers(1, 7, n).tolist() for n in lengths], dtype=tf.int32)
    examples = tf.data.Dataset.from_tensor_slices((tokens, np.array([0, 1, 1, 0, 1, 0]))).map(lambda t, c: (t, c))
    data = examples.padded_batch(2)  # lengths 3, 5, 2
    assert hold_batches(im, data, HELD_DATA_BUDGET) is None
    uniform = hold_batches(im, examples.padded_batch(2, padded_shapes=([5], [])), HELD_DATA_BUDGET)
    assert uniform is not None and uniform.num_examples == 6  # one padded length: held
    operator = HessianOperator(im, data)
    assert not operator.traceable and operator.held_data() is None
    assert operator.num_examples == len(lengths)  # streamed as before (test_hessian covers its numbers)


@pytest.mark.parametrize(
    "curvature, options",
    [
        ("ggn", {}),
        ("fisher", {"estimator": "sampled", "num_samples": 2, "seed": 3}),  # per-example seeds from the positions
        ("empirical_fisher", {}),
    ],
)
def test_held_output_space_curvatures_equal_the_streamed_ones(curvature, options, monkeypatch):
    from influenciae.hessian.ggn import curvature_operator

    im, data, vectors = _problem()
    vectors = vectors[:16]  # one block
    streamed = curvature_operator(curvature, im, data, held_data_budget=0, **options)
    expected = streamed.matmul_rows(vectors).numpy()
    assert np.abs(expected).max() > 1e-2
    held = curvature_operator(curvature, im, data, **options)
    assert held.traceable and not streamed.traceable
    per_batch = _count_calls(monkeypatch, type(held), "_batch_sum")
    np.testing.assert_allclose(held.matmul_rows(vectors).numpy(), expected, rtol=0, atol=1e-10)
    assert len(per_batch) == 0 and held.num_examples == NUM_EXAMPLES


def test_a_held_product_that_cannot_be_built_streams_with_a_warning(monkeypatch):
    import influenciae.hessian.operator as operator_module

    im, data, vectors = _problem()
    operator = HessianOperator(im, data)
    assert operator.traceable

    def unconvertible(*args, **kwargs):
        raise ValueError("No pfor vectorization defined for SomeOp")

    monkeypatch.setattr(operator_module, "held_matmul", unconvertible)
    with pytest.warns(RuntimeWarning, match="SomeOp.*streaming the dataset"):
        product = operator.matmul_rows(vectors).numpy()
    np.testing.assert_allclose(product, _streamed("float64", 20), rtol=0, atol=1e-10)
    assert not operator.traceable  # streams from now on


def test_operators_on_the_same_dataset_object_share_its_held_data(monkeypatch):
    im, data, vectors = _problem()
    reads = _count_calls(monkeypatch, held_module, "hold_batches")
    monkeypatch.setattr("influenciae.hessian.operator.hold_batches", held_module.hold_batches)
    fresh = dataset(*classification_data(40, seed=9), batch_size=BATCH_SIZE)
    first, second = HessianOperator(im, fresh), HessianOperator(im, fresh)
    np.testing.assert_array_equal(first.matmul_rows(vectors).numpy(), second.matmul_rows(vectors).numpy())
    assert len(reads) == 1 and first.held_data() is second.held_data()
    same_content = dataset(*classification_data(40, seed=9), batch_size=BATCH_SIZE)  # another object: read again
    np.testing.assert_allclose(
        HessianOperator(im, same_content).matmul_rows(vectors).numpy(),
        first.matmul_rows(vectors).numpy(),
        rtol=0,
        atol=1e-12,
    )
    assert len(reads) == 2
    assert HessianOperator(im, fresh, held_data_budget=0).held_data() is None and len(reads) == 2  # streams
    entries = len(im._shared_data)
    del first, second, fresh
    import gc

    gc.collect()
    assert len(im._shared_data) == entries - 1  # the dataset is not kept alive by the model
