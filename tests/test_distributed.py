"""Distributed kernels, the solver state and ``tf.distribute`` Hessian products (issue 8).

The kernels and the operator on the default strategy run in this process. The two strategies that need their own
TensorFlow runtime run in subprocesses of this very file (``python tests/test_distributed.py WORKER ...``), so the
pytest worker's TensorFlow state is untouched:

* ``MirroredStrategy`` over two logical CPU devices (configured before TensorFlow initializes its devices);
* ``MultiWorkerMirroredStrategy`` with two worker processes on 127.0.0.1 (free ports, ``TF_CONFIG``).

Both compare, in float64 and with uneven shards, the HVP (relative error ≤ 1e-6) and the influence scores of a
distributed CG solver to one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NUM_TRAIN, NUM_TEST, BATCH_SIZE, DAMPING = 53, 5, 8, 1e-2  # 7 batches: replica shards of 29 and 24 examples
SUBPROCESS_TIMEOUT = 300  # seconds; the runs take ~20-40 s on an idle machine


# ---------------------------------------------------------------------- shared problem (parent and workers)


def _data():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((NUM_TRAIN + NUM_TEST, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
    return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


def _datasets():
    from influenciae.data import from_numpy

    (x, y), (x_test, y_test) = _data()
    return from_numpy(x, y, batch_size=BATCH_SIZE), from_numpy(x_test, y_test, batch_size=2)


def _vectors(num_params: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((4, num_params))


def _influence_model(model):
    import keras

    from influenciae import InfluenceModel

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    return InfluenceModel(model, loss_function=loss)


def _save_trained_model(path: Path) -> None:
    import keras
    from helpers import fit

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            keras.layers.Dense(6, activation="tanh", dtype="float64", kernel_regularizer=keras.regularizers.L2(1e-3)),
            keras.layers.Dense(3, dtype="float64", kernel_regularizer=keras.regularizers.L2(1e-3)),
        ]
    )
    (x, y), _ = _data()
    fit(model, x, y, steps=150)
    model.save(path)


def _compute(strategy, model_path: str) -> dict[str, np.ndarray]:
    """What each process computes: HVPs, CG and Arnoldi solutions and influence scores on the strategy."""
    import tensorflow as tf

    from influenciae import FirstOrderInfluenceCalculator
    from influenciae.distributed import DistributedHessianOperator, distributed_ihvp, load_model_in_scope

    model = load_model_in_scope(strategy, model_path)
    im = _influence_model(model)
    train, test = _datasets()
    operator = DistributedHessianOperator(im, train, strategy)
    vectors = tf.constant(_vectors(im.nb_params))
    hvp = operator.matmul_rows(vectors).numpy()
    cg = distributed_ihvp(strategy, im, train, "cg", damping=DAMPING, tolerance=1e-12)
    calculator = FirstOrderInfluenceCalculator(im, train, ihvp_calculator=cg)
    scores = calculator.influence_matrix(test, train)
    arnoldi = distributed_ihvp(strategy, im, train, "arnoldi", damping=DAMPING, subspace_dim=12, k_largest_eig_vals=6)
    replicas = operator._shards  # the shard each local replica summed
    sizes = {r: sum(int(b[1].shape[0]) for b in shard) for r, shard in replicas.items()}
    return {
        "hvp": hvp,
        "scores": scores,
        "eigenvalues": arnoldi.eigenvalues.numpy(),
        "num_examples": np.array(operator.num_examples),
        "products": np.array(operator.num_products + cg.hessian.num_products),
        "collectives": np.array(json.dumps(operator.collective_ops())),
        "shard_sizes": np.array(json.dumps(sizes)),
    }


def _reference(model_path: str) -> dict[str, np.ndarray]:
    import keras
    import tensorflow as tf

    from influenciae import FirstOrderInfluenceCalculator
    from influenciae.hessian import ArnoldiIHVP, HessianOperator

    im = _influence_model(keras.models.load_model(model_path))
    train, test = _datasets()
    vectors = tf.constant(_vectors(im.nb_params))
    hvp = HessianOperator(im, train).matmul_rows(vectors).numpy()
    calculator = FirstOrderInfluenceCalculator(
        im, train, ihvp_calculator="cg", damping=DAMPING, ihvp_options={"tolerance": 1e-12}
    )
    arnoldi = ArnoldiIHVP(im, train, subspace_dim=12, k_largest_eig_vals=6, damping=DAMPING)
    return {
        "hvp": hvp,
        "scores": calculator.influence_matrix(test, train),
        "eigenvalues": arnoldi.eigenvalues.numpy(),
    }


def _worker_main(argv: list[str]) -> int:
    """Entry point of the subprocesses: ``mirrored MODEL OUT`` or ``multiworker MODEL OUT`` (TF_CONFIG set)."""
    kind, model_path, output = argv
    sys.path.insert(0, str(HERE))
    import tensorflow as tf

    if kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    results = _compute(strategy, model_path)
    np.savez(output, **results)
    return 0


# ---------------------------------------------------------------------- subprocess helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _environment(**extra: str) -> dict[str, str]:
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", **extra)
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), environment.get("PYTHONPATH", "")])
    return environment


def _start_worker(kind: str, model_path: Path, output: Path, **environment: str) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), kind, str(model_path), str(output)]
    return subprocess.Popen(
        command, env=_environment(**environment), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_all(processes: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process (killing them all, by pid, past ``timeout``) and return their outputs."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(output)
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.communicate()
        pytest.fail(f"distributed workers did not finish within {timeout} s")
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    return outputs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("distributed")
    model_path = directory / "model.keras"
    _save_trained_model(model_path)
    return model_path, _reference(str(model_path))


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _check_against_reference(result, reference) -> None:
    assert _relative_error(result["hvp"], reference["hvp"]) <= 1e-6
    assert _relative_error(result["scores"], reference["scores"]) <= 1e-6
    np.testing.assert_array_equal(np.argsort(-result["scores"], axis=1)[:, :5], np.argsort(-reference["scores"])[:, :5])
    np.testing.assert_allclose(result["eigenvalues"], reference["eigenvalues"], rtol=1e-6)
    assert int(result["num_examples"]) == NUM_TRAIN


# ---------------------------------------------------------------------- kernels and state, in this process


def _reference_top_k(indices, scores, k, descending=True):
    """Top-k by sorting (score, then smaller index first): the definition the merges must meet."""
    result_indices, result_values = [], []
    for row in scores:
        keys = -row if descending else row
        order = np.lexsort((indices, keys))[:k]
        result_indices.append(indices[order])
        result_values.append(row[order])
    return np.array(result_indices), np.array(result_values)


@pytest.mark.parametrize("descending", [True, False])
def test_merge_candidates_is_exact_and_order_independent_with_ties(descending):
    from influenciae import ORDER
    from influenciae.distributed import block_candidates, empty_candidates, merge_candidates

    order = ORDER.DESCENDING if descending else ORDER.ASCENDING
    rng = np.random.default_rng(0)
    num_train, k = 97, 9
    scores = rng.integers(-3, 4, size=(4, num_train)).astype("float64")  # many ties
    indices = rng.permutation(num_train).astype("int64") + 1000
    expected = _reference_top_k(indices, scores, k, descending)
    for trial in range(3):
        cuts = np.sort(rng.choice(np.arange(1, num_train), size=5, replace=False))
        shards = np.split(rng.permutation(num_train), cuts)
        partials = [block_candidates(indices[shard], scores[:, shard], k, order) for shard in shards]
        rng.shuffle(partials)
        merged = empty_candidates(4)
        for partial in partials:
            merged = (
                merge_candidates(partial, merged, k, order)
                if trial % 2
                else merge_candidates(merged, partial, k, order)
            )
        np.testing.assert_array_equal(merged[0], expected[0])
        np.testing.assert_array_equal(merged[1], expected[1])
    # a tree of merges gives the same answer as a chain
    left = merge_candidates(partials[0], partials[1], k, order)
    right = partials[2]
    for partial in partials[3:]:
        right = merge_candidates(right, partial, k, order)
    tree = merge_candidates(left, right, k, order)
    np.testing.assert_array_equal(tree[0], expected[0])


def test_score_kernels_match_numpy():
    from influenciae.distributed import score_block, self_scores

    rng = np.random.default_rng(1)
    transforms, vectors = rng.standard_normal((3, 7)), rng.standard_normal((5, 7))
    np.testing.assert_allclose(score_block(transforms, vectors).numpy(), transforms @ vectors.T, rtol=1e-14)
    gradients = rng.standard_normal((5, 7))
    np.testing.assert_allclose(self_scores(gradients, vectors).numpy(), np.sum(gradients * vectors, 1), rtol=1e-14)
    with pytest.raises(ValueError, match="same D"):
        score_block(transforms, vectors[:, :6])


def test_hvp_sum_is_the_unnormalized_batch_term():
    import tensorflow as tf
    from helpers import logistic_problem

    from influenciae.distributed import hvp_sum

    im, x, y, hessian, _ = logistic_problem(regularization=0.0)
    vectors = np.random.default_rng(2).standard_normal((2, im.nb_params))
    total, count = hvp_sum(im, (tf.constant(x[:13]), tf.constant(y[:13])), tf.constant(vectors))
    assert float(count) == 13.0
    full_total, full_count = hvp_sum(im, (tf.constant(x), tf.constant(y)), tf.constant(vectors))
    np.testing.assert_allclose(full_total.numpy() / float(full_count), vectors @ hessian, rtol=1e-10)
    assert not np.allclose(total.numpy(), full_total.numpy())


def test_distributed_operator_on_the_default_strategy_equals_the_hessian():
    import tensorflow as tf
    from helpers import dataset, ridge_problem

    from influenciae.distributed import DistributedHessianOperator, Sharding

    im, x, y, hessian = ridge_problem(num_examples=37)
    data = dataset(x, y, batch_size=8)
    operator = DistributedHessianOperator(im, data)
    vectors = np.random.default_rng(3).standard_normal((3, im.nb_params))
    np.testing.assert_allclose(operator.matmul_rows(tf.constant(vectors)).numpy(), vectors @ hessian, rtol=1e-12)
    assert operator.num_examples == 37 and operator.num_products == 1
    np.testing.assert_allclose(operator.to_dense().numpy(), hessian, rtol=1e-12)
    assert operator.collective_ops() == []  # one replica: nothing crosses processes

    # FILE sharding: each replica reads its own files through read_files
    halves = [(x[:20], y[:20]), (x[20:], y[20:])]

    def read_files(files):
        parts = [dataset(*halves[int(name[-1])], batch_size=8) for name in files]
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.concatenate(part)
        return merged

    by_file = DistributedHessianOperator(im, ["part0", "part1"], sharding=Sharding.FILE, read_files=read_files)
    np.testing.assert_allclose(by_file.to_dense().numpy(), hessian, rtol=1e-12)
    with pytest.raises(ValueError, match="Sharding.FILE splits files"):
        DistributedHessianOperator(im, data, sharding="file")
    with pytest.raises(ValueError, match="read_files"):
        DistributedHessianOperator(im, ["part0"])
    with pytest.raises(ValueError, match="sharding must be"):
        DistributedHessianOperator(im, data, sharding="rows")
    with pytest.raises(TypeError, match="dataset_fn"):
        DistributedHessianOperator(im, 3)  # type: ignore[arg-type]


@pytest.mark.slow
def test_distributed_ihvp_runs_every_solver_unchanged():
    import tensorflow as tf
    from helpers import dataset, ridge_problem

    from influenciae.distributed import distributed_ihvp

    im, x, y, hessian = ridge_problem(num_examples=30)
    data = dataset(x, y, batch_size=7)
    gradients = np.random.default_rng(4).standard_normal((2, im.nb_params))
    expected = np.linalg.solve(hessian + 0.1 * np.eye(im.nb_params), gradients.T).T
    for solver, options in (("cg", {"tolerance": 1e-12}), ("exact", {}), ("arnoldi", {"subspace_dim": 5})):
        ihvp = distributed_ihvp(None, im, data, solver, damping=0.1, **options)
        np.testing.assert_allclose(ihvp.solve(tf.constant(gradients)).numpy(), expected, rtol=1e-8, err_msg=solver)
    lissa = distributed_ihvp(None, im, data, "lissa", damping=0.1, tolerance=1e-10)
    np.testing.assert_allclose(lissa.solve(tf.constant(gradients)).numpy(), expected, rtol=1e-6)


@pytest.mark.slow
def test_solver_state_preconditioners_factors_and_files(tmp_path):
    import tensorflow as tf
    from helpers import dataset, logistic_problem

    from influenciae import FirstOrderInfluenceCalculator
    from influenciae.distributed import SolverState, score_batch
    from influenciae.hessian import ArnoldiIHVP, ConjugateGradientDescentIHVP, ExactIHVP

    im, x, y, hessian, gradients = logistic_problem()
    train, test = dataset(x, y, batch_size=16), dataset(x[:7], y[:7], batch_size=3)
    exact = ExactIHVP(im, train)
    state = SolverState.from_solver(im, exact, test_set=test)
    assert state.preconditioner == "inverse" and state.factors.shape == (7, im.nb_params)
    np.testing.assert_allclose(
        state.precondition(gradients).numpy(), np.linalg.solve(hessian, gradients.T).T, rtol=1e-9
    )

    calculator = FirstOrderInfluenceCalculator(im, train, ihvp_calculator="exact")
    expected_self = calculator.self_influence(train)
    expected_scores = calculator.influence_matrix(test, train)
    batch = next(iter(train))
    np.testing.assert_allclose(score_batch(im, state, batch, "self_influence")["self_influence"], expected_self[:16])
    np.testing.assert_allclose(score_batch(im, state, batch, "top_k")["scores"], expected_scores[:, :16], rtol=1e-9)
    vectors = score_batch(im, state, batch, "vectors")["vectors"]
    np.testing.assert_allclose(vectors, np.linalg.solve(hessian, gradients[:16].T).T, rtol=1e-9)

    path = state.save(tmp_path / "state.npz")
    loaded = SolverState.load(path, model=im)
    np.testing.assert_array_equal(loaded.inverse, state.inverse)
    np.testing.assert_array_equal(loaded.factors, state.factors)
    assert [p.name for p in tmp_path.iterdir()] == ["state.npz"]  # no temporary file left behind

    arnoldi = ArnoldiIHVP(im, train, subspace_dim=im.nb_params)
    eigen = SolverState.from_solver(im, arnoldi)
    assert eigen.preconditioner == "eigen" and eigen.factors is None
    np.testing.assert_allclose(eigen.precondition(gradients).numpy(), arnoldi.solve(gradients).numpy(), rtol=1e-9)
    with pytest.raises(ValueError, match="no test factors"):
        score_batch(im, eigen, batch, "top_k")

    cg_state = SolverState.from_solver(im, ConjugateGradientDescentIHVP(im, train), test_set=test)
    assert cg_state.preconditioner == "none"
    np.testing.assert_allclose(cg_state.factors, state.factors, rtol=1e-6)
    with pytest.raises(ValueError, match="no preconditioner"):
        score_batch(im, cg_state, batch, "vectors")

    im.model.layers[0].bias.assign([0.3])  # other weights: the saved state is refused
    with pytest.raises(ValueError, match="other model weights"):
        SolverState.load(path, model=im)
    with pytest.raises(FileNotFoundError):
        SolverState.load(tmp_path / "missing.npz")
    np.save(tmp_path / "other.npy", np.zeros(2))
    with pytest.raises(ValueError, match="not a solver state"):
        np.savez(tmp_path / "other.npz", x=np.zeros(2))
        SolverState.load(tmp_path / "other.npz")
    del tf


def test_held_batches_score_as_their_dataset_with_the_same_checks():
    """TensorBatches (what a worker hands the engine for each shard: no tf.data pipeline per batch) give every
    public method the dataset's results, run the same per-batch checks, and trace those checks once."""
    import keras

    from influenciae import ExactIHVP, FirstOrderInfluenceCalculator
    from influenciae.data import TensorBatches

    keras.utils.set_random_seed(0)
    train, test = _datasets()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    influence_model = _influence_model(model)
    calculator = FirstOrderInfluenceCalculator(
        influence_model, train, ihvp_calculator=ExactIHVP(influence_model, train, damping=1.0)
    )
    held_train = TensorBatches.of(*[(x.numpy(), y.numpy()) for x, y in train])
    held_test = TensorBatches.of(*[(x.numpy(), y.numpy()) for x, y in test])
    np.testing.assert_allclose(calculator.self_influence(held_train), calculator.self_influence(train), rtol=1e-12)
    np.testing.assert_allclose(
        calculator.influence_matrix(held_test, held_train), calculator.influence_matrix(test, train), rtol=1e-12
    )
    vectors = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(held_train)])
    expected = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(train)])
    np.testing.assert_allclose(vectors, expected, rtol=1e-12)
    indices, values = calculator.most_influential(held_test, held_train, k=3)
    expected_indices, expected_values = calculator.most_influential(test, train, k=3)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(values, expected_values, rtol=1e-12)
    for start in range(0, NUM_TRAIN, BATCH_SIZE):  # one shard at a time, as a worker scores them
        batch = TensorBatches.of(held_train.batches[start // BATCH_SIZE])
        calculator.self_influence(batch)
    (check,) = calculator._tensor_checks.values()
    assert check.experimental_get_tracing_count() <= 2  # full batches and the last, shorter one

    (x, y), _ = _data()
    broken = x[:16].copy()
    broken[11, 2] = np.nan
    with pytest.raises(ValueError, match=r"train_set: batch 1 \(examples from index 8 on\) has non-finite inputs"):
        calculator.self_influence(TensorBatches.of((broken[:8], y[:8]), (broken[8:], y[8:16])))
    with pytest.raises(TypeError, match="must be a tf.data.Dataset"):
        calculator.self_influence([(x[:8], y[:8])])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("tracin", {"learning_rate": 0.5}),
        ("trak", {"projection_dim": 8, "seed": 3}),
        ("arnoldi", {"subspace_dim": 15, "rank": 10, "damping": 1e-2}),
        ("representer", {"l2": 1e-2}),
        ("first_order", {"solver": "ekfac", "damping": 1e-2, "start_layer": 0}),
    ],
)
def test_a_worker_scores_shards_as_one_process_does(trained, tmp_path, method, options):
    """A scoring worker's calculator (built from files) scores shuffled shards of records as one process does."""
    import tensorflow as tf

    from influenciae.distributed.kernels import shard_scorer
    from influenciae.distributed.records import decode_records, read_tfrecords, write_sharded_tfrecords
    from influenciae.influence.registry import CalculatorOptions, CalculatorSetup, build_calculator
    from influenciae.model.loading import load_model, named_loss

    model_path, _ = trained
    (x, y), (x_test, y_test) = _data()
    write_sharded_tfrecords(tmp_path / "train", x, y, num_shards=3)
    write_sharded_tfrecords(tmp_path / "test", x_test, y_test, num_shards=1, prefix="test")
    train_pattern, test_pattern = str(tmp_path / "train" / "*.tfrecord"), str(tmp_path / "test" / "*.tfrecord")
    train = read_tfrecords(train_pattern, batch_size=BATCH_SIZE)
    test = read_tfrecords(test_pattern, batch_size=BATCH_SIZE)
    loss = named_loss("sparse_categorical_crossentropy", from_logits=True)  # the saved model is not compiled
    setup = CalculatorSetup(load_model(model_path, compile=False), train, loss, CalculatorOptions(**options))
    calculator = build_calculator(method, setup)
    expected = {"self_influence": calculator.self_influence(train), "top_k": calculator.influence_matrix(test, train)}
    assert np.all(np.isfinite(expected["top_k"])) and np.ptp(expected["self_influence"]) > 0

    records = [record.numpy() for record in tf.data.TFRecordDataset(sorted(map(str, (tmp_path / "train").iterdir())))]
    order = np.random.default_rng(0).permutation(NUM_TRAIN)
    bundles = [[records[i] for i in order[start : start + 7]] for start in range(0, NUM_TRAIN, 7)]  # any bundling
    for mode in ("self_influence", "top_k"):
        score = shard_scorer(
            mode, str(model_path), train_pattern, method=method, options=options, test_pattern=test_pattern,
            loss="sparse_categorical_crossentropy", from_logits=True, batch_size=BATCH_SIZE,
        )  # fmt: skip
        actual = np.zeros_like(expected[mode])
        for bundle in bundles:
            indices, batch = decode_records(bundle)
            if mode == "self_influence":
                actual[indices] = score(batch)["self_influence"]
            else:
                actual[:, indices] = score(batch)["scores"]
        np.testing.assert_allclose(actual, expected[mode], rtol=1e-9, atol=1e-12 * np.max(np.abs(expected[mode])))


# ---------------------------------------------------------------------- strategies in subprocesses


@pytest.mark.slow
def test_mirrored_strategy_two_logical_cpus_matches_one_process(trained, tmp_path):
    model_path, reference = trained
    output = tmp_path / "mirrored.npz"
    _wait_all([_start_worker("mirrored", model_path, output)], SUBPROCESS_TIMEOUT)
    result = np.load(output)
    _check_against_reference(result, reference)
    assert json.loads(str(result["shard_sizes"])) == {"0": 29, "1": 24}  # uneven shards


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_two_workers_matches_one_process(trained, tmp_path):
    model_path, reference = trained
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    outputs = [tmp_path / f"worker{index}.npz" for index in range(2)]
    processes = [
        _start_worker(
            "multiworker",
            model_path,
            outputs[index],
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        for index in range(2)
    ]
    _wait_all(processes, SUBPROCESS_TIMEOUT)
    results = [np.load(path) for path in outputs]
    for result in results:
        _check_against_reference(result, reference)
        assert json.loads(str(result["collectives"])) == ["CollectiveReduceV2"]  # one all-reduce per product
    # every worker holds the same reduced values, so iterative solvers stay in lockstep
    np.testing.assert_array_equal(results[0]["hvp"], results[1]["hvp"])
    np.testing.assert_array_equal(results[0]["scores"], results[1]["scores"])
    assert int(results[0]["products"]) == int(results[1]["products"])
    sizes = [json.loads(str(result["shard_sizes"])) for result in results]
    assert sizes == [{"0": 29}, {"1": 24}]  # worker 0 holds replica 0, worker 1 replica 1: uneven shards


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
