"""A cache knows exactly what it holds: every change its values depend on is refused, never silently reused.

Each test builds a complete ``CACHE.DISK`` cache (or a solver state, or K-FAC factors), changes one thing the stored
values depend on, and checks that reusing it raises a ``ValueError`` saying how to rebuild, while the unchanged
request still reuses it (so the refusal is about the change, not about reopening).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
from influenciae.cache import LOCK_NAME, MANIFEST_NAME, DiskCache
from influenciae.cache.fingerprint import loss_identity
from influenciae.model._backend import keras
from influenciae.model.identity import model_identity

NUM_TRAIN, NUM_FEATURES, CLASSES = 64, 4, 3


def make_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((NUM_FEATURES,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(CLASSES)]
    )
    return model


def loss(**options):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", **options)


def make_data(num: int = NUM_TRAIN, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, NUM_FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=num).astype("int64")
    return x, y


def ds(x: np.ndarray, y: np.ndarray, batch: int = 16) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


X, Y = make_data()
X_TEST, Y_TEST = make_data(5, seed=1)
MODEL = make_model()


_REFERENCE: list = []


def calculator(model=MODEL, *, loss_function=None, hessian=None, train=None, solver="exact", damping=1.0, **im):
    """A first-order calculator; the reference one (no arguments) is built once, so its functions trace once."""
    reference = model is MODEL and loss_function is None and hessian is None and train is None and not im
    if reference and solver == "exact" and damping == 1.0:
        if not _REFERENCE:
            _REFERENCE.append(calculator(MODEL, loss_function=loss(), solver="exact", damping=1.0))
        return _REFERENCE[0]
    im_model = InfluenceModel(model, loss_function=loss_function or loss(), **im)
    train = ds(X, Y) if train is None else train
    return FirstOrderInfluenceCalculator(
        im_model, train if hessian is None else hessian, solver, damping=damping, batches_per_shard=1
    )


def vectors(calc, train, path) -> np.ndarray:
    blocks = [v.numpy() for _, v in calc.compute_influence_vector(train, str(path))]
    return np.concatenate(blocks)


@pytest.fixture()
def built(tmp_path: Path) -> Path:
    """A complete cache of the reference calculator over the 64 reference training examples."""
    path = tmp_path / "cache"
    vectors(calculator(), ds(X, Y), path)
    return path


def refused(calc, train, path, match: str = "overwrite=True") -> None:
    with pytest.raises(ValueError, match=match):
        vectors(calc, train, path)


# ---------------------------------------------------------------------- what the values depend on


def test_unchanged_request_reuses_the_cache(built: Path) -> None:
    before = json.loads((built / MANIFEST_NAME).read_text())
    again = vectors(calculator(), ds(X, Y), built)
    assert again.shape == (NUM_TRAIN, MODEL_PARAMS)
    assert json.loads((built / MANIFEST_NAME).read_text()) == before  # nothing rewritten


MODEL_PARAMS = InfluenceModel(MODEL, loss_function=loss()).nb_params


def test_another_loss_is_refused(built: Path) -> None:
    refused(calculator(loss_function=loss(ignore_class=2)), ds(X, Y), built, match="ignore_class")
    base = loss()

    def twice(y_true, y_pred):
        return 2.0 * base(y_true, y_pred)

    refused(calculator(loss_function=twice), ds(X, Y), built, match="loss")


def test_loss_identity_tells_scales_and_options_apart() -> None:
    base = loss()
    two, three = (lambda s: lambda t, p: s * base(t, p))(2.0), (lambda s: lambda t, p: s * base(t, p))(3.0)
    identities = [loss_identity(item) for item in (base, loss(ignore_class=2), two, three)]
    assert len({json.dumps(identity, sort_keys=True) for identity in identities}) == 4
    assert loss_identity(loss()) == loss_identity(base)  # the same settings in another object: the same identity


def test_gradient_dtype_is_refused(built: Path) -> None:
    refused(calculator(gradient_dtype="bfloat16"), ds(X, Y), built, match="gradient_dtype")


def test_another_watched_layer_with_the_same_shapes_is_refused(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_FEATURES), keras.layers.Dense(NUM_FEATURES),
         keras.layers.Dense(CLASSES)]
    )  # fmt: skip
    path = tmp_path / "cache"
    vectors(calculator(model, start_layer=0, last_layer=0), ds(X, Y), path)
    assert model_identity(InfluenceModel(model, start_layer=0, last_layer=0, loss_function=loss())) != model_identity(
        InfluenceModel(model, start_layer=1, last_layer=1, loss_function=loss())
    )
    refused(calculator(model, start_layer=1, last_layer=1), ds(X, Y), path, match="watched_weights")


def test_another_hessian_dataset_is_refused(built: Path) -> None:
    refused(calculator(hessian=ds(X[:32], Y[:32])), ds(X, Y), built, match="hessian_dataset")
    # the Hessian is a mean: the same examples in another order and batching are the same Hessian dataset
    order = np.random.default_rng(3).permutation(NUM_TRAIN)
    assert vectors(calculator(hessian=ds(X[order], Y[order], batch=7)), ds(X, Y), built).shape[0] == NUM_TRAIN


# ---------------------------------------------------------------------- the training set itself


def test_extended_training_set_is_refused(built: Path) -> None:
    x, y = make_data(NUM_TRAIN + 32, seed=5)
    x[:NUM_TRAIN], y[:NUM_TRAIN] = X, Y
    refused(calculator(), ds(x, y), built, match="more examples")


def test_truncated_training_set_is_refused(built: Path) -> None:
    refused(calculator(), ds(X[:48], Y[:48]), built, match="48 examples")


def test_replaced_last_examples_are_refused(built: Path) -> None:
    x = X.copy()
    x[-4:] += 1.0
    refused(calculator(), ds(x, Y), built, match="training dataset differs")


def test_reshuffled_training_set_is_refused(tmp_path: Path) -> None:
    shuffled = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(NUM_TRAIN, seed=0).batch(16)
    with pytest.raises(ValueError, match="reshuffle_each_iteration=False"):
        vectors(calculator(), shuffled, tmp_path / "cache")
    once = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(NUM_TRAIN, seed=0, reshuffle_each_iteration=False)
    assert vectors(calculator(), once.batch(16), tmp_path / "cache").shape[0] == NUM_TRAIN


# ---------------------------------------------------------------------- the files


def manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def shard_file(path: Path, shard_id: int) -> Path:
    return path / manifest(path)["shards"][str(shard_id)]["file"]


def test_rewritten_shard_is_refused(built: Path) -> None:
    target = shard_file(built, 1)
    with np.load(target) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["vectors"] = arrays["vectors"] + 1.0
    with open(target, "wb") as handle:
        np.savez(handle, **arrays)
    refused(calculator(), ds(X, Y), built, match="Shard 1 .* checksum")


def test_swapped_shards_are_refused(built: Path) -> None:
    data = manifest(built)
    data["shards"]["0"], data["shards"]["1"] = data["shards"]["1"], data["shards"]["0"]
    (built / MANIFEST_NAME).write_text(json.dumps(data))
    refused(calculator(), ds(X, Y), built, match="Shard 0")
    # swapping only the files (each entry keeping its hash, the checksums moved along) is caught by the meta record
    data["shards"]["0"], data["shards"]["1"] = data["shards"]["1"], data["shards"]["0"]
    for field in ("file", "checksum"):
        data["shards"]["0"][field], data["shards"]["1"][field] = data["shards"]["1"][field], data["shards"]["0"][field]
    (built / MANIFEST_NAME).write_text(json.dumps(data))
    refused(calculator(), ds(X, Y), built, match="belongs to another cache or shard")


def test_shard_copied_from_another_cache_is_refused(built: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    vectors(calculator(damping=2.0), ds(X, Y), other)
    # copy the file and its manifest entry (checksum included): only the shard's own meta record can tell
    data = manifest(built)
    entry = manifest(other)["shards"]["2"]
    shutil.copy(other / entry["file"], built / entry["file"])
    data["shards"]["2"] = entry
    (built / MANIFEST_NAME).write_text(json.dumps(data))
    refused(calculator(), ds(X, Y), built, match="Shard 2 .*belongs to another cache")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_shard_is_a_clear_error(built: Path, damage: str) -> None:
    target = shard_file(built, 3)
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Shard 3 of the cache at .*checksum.*overwrite=True") as error:
        vectors(calculator(), ds(X, Y), built)
    assert "BadZipFile" not in str(error.value)
    rebuilt = calculator().compute_influence_vector(ds(X, Y), str(built), overwrite=True)
    assert sum(int(v.shape[0]) for _, v in rebuilt) == NUM_TRAIN


def test_opening_never_deletes_a_users_file(built: Path) -> None:
    mine = built / "shard-000000-0123456789abcdef.npz"
    mine.write_bytes(b"my own file")
    temporary = built / ".influenciae-tmp-notes.txt-0123456789abcdef.part"
    temporary.write_bytes(b"mine too")
    vectors(calculator(), ds(X, Y), built)
    DiskCache(built, configuration={"other": 1}, weights_fingerprint="x", overwrite=True)
    assert mine.read_bytes() == b"my own file" and temporary.read_bytes() == b"mine too"
    assert sorted(p.name for p in built.iterdir()) == sorted([MANIFEST_NAME, LOCK_NAME, mine.name, temporary.name])


# ---------------------------------------------------------------------- iterative solvers


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_cache_written_after_an_iterative_solve_is_reused(tmp_path: Path, solver: str) -> None:
    options = {"damping": 1.0}
    calc = calculator(solver=solver, **options)
    first = vectors(calc, ds(X, Y), tmp_path / "cache")
    assert getattr(calc.ihvp, "info", None) is not None  # the solve reported its convergence...
    assert "info" not in calc.ihvp.configuration()  # ...which is a result, not a setting
    np.testing.assert_array_equal(vectors(calc, ds(X, Y), tmp_path / "cache"), first)
    np.testing.assert_array_equal(vectors(calculator(solver=solver, **options), ds(X, Y), tmp_path / "cache"), first)


# ---------------------------------------------------------------------- solver states and K-FAC factors


def test_solver_state_records_and_checks_its_request(tmp_path: Path) -> None:
    from influenciae import ExactIHVP
    from influenciae.distributed.state import SolverState

    im = InfluenceModel(MODEL, loss_function=loss())
    train, test = ds(X, Y), ds(X_TEST, Y_TEST)
    request = {"solver": "exact", "damping": 1.0, "test": "test-*.tfrecord"}
    state = SolverState.from_solver(im, ExactIHVP(im, train, damping=1.0), test_set=test, request=request)
    path = state.save(tmp_path / "state.npz")
    loaded = SolverState.load(path, model=im, test_set=test, request=request)
    np.testing.assert_array_equal(loaded.factors, state.factors)
    with pytest.raises(ValueError, match="damping"):
        SolverState.load(path, model=im, request={**request, "damping": 0.5})
    with pytest.raises(ValueError, match="solver"):
        SolverState.load(path, model=im, request={**request, "solver": "cg"})
    with pytest.raises(ValueError, match="test"):
        SolverState.load(path, model=im, test_set=ds(X_TEST[:4], Y_TEST[:4]))
    with pytest.raises(ValueError, match="ignore_class"):
        SolverState.load(path, model=InfluenceModel(MODEL, loss_function=loss(ignore_class=2)))
    with pytest.raises(ValueError, match="damping"):
        SolverState.load(path, solver=ExactIHVP(im, train, damping=2.0))


@pytest.mark.slow
def test_ekfac_factors_fitted_with_another_loss_are_refused(tmp_path: Path) -> None:
    from influenciae.hessian.kfac import EKFACIHVP

    im = InfluenceModel(MODEL, loss_function=loss())
    EKFACIHVP(im, ds(X, Y), damping=1e-3, factors_path=tmp_path).fit()
    other = InfluenceModel(MODEL, loss_function=loss(ignore_class=2))
    with pytest.raises(ValueError, match="ignore_class"):
        EKFACIHVP(other, ds(X, Y), damping=1e-3, factors_path=tmp_path).fit()
    assert EKFACIHVP(im, ds(X, Y), damping=1e-3, factors_path=tmp_path).fit().timings == {}  # same loss: reused


# ---------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    model = make_model()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(root / "model.keras")
    x, y = make_data(NUM_TRAIN + 32, seed=5)
    x[:NUM_TRAIN], y[:NUM_TRAIN] = X, Y
    np.savez(root / "train.npz", x=X, y=Y)
    np.savez(root / "train96.npz", x=x, y=y)
    np.savez(root / "test.npz", x=X_TEST, y=Y_TEST)
    return {"root": root, "model": root / "model.keras", "test": root / "test.npz"}


def top_k(files: dict[str, Path], train: str, output: str, *extra: str) -> int:
    from influenciae import cli

    argv = ["top-k", "--model", files["model"], "--npz", files["root"] / train, "--test-npz", files["test"],
            "-k", "3", "--output", files["root"] / output, "--no-progress", "--damping", "1.0", *extra]  # fmt: skip
    return cli.main([str(item) for item in argv])


@pytest.mark.slow
def test_cli_top_k_refuses_a_cache_of_a_shorter_training_set(cli_files: dict[str, Path], capsys) -> None:
    cache = ["--cache-dir", str(cli_files["root"] / "cache")]
    assert top_k(cli_files, "train.npz", "out64", *cache) == 0
    capsys.readouterr()
    assert top_k(cli_files, "train96.npz", "out96", *cache) != 0
    err = capsys.readouterr().err  # the CLI names its own option, not the Python overwrite=True
    assert "delete the --cache-dir directory" in err and "overwrite=True" not in err
    assert top_k(cli_files, "train96.npz", "fresh96") == 0


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_cli_top_k_with_an_iterative_solver_reuses_its_cache(cli_files: dict[str, Path], solver: str) -> None:
    cache = ["--cache-dir", str(cli_files["root"] / f"cache-{solver}"), "--solver", solver]
    assert top_k(cli_files, "train.npz", f"{solver}-1", *cache) == 0
    assert top_k(cli_files, "train.npz", f"{solver}-2", *cache) == 0
    first = (cli_files["root"] / f"{solver}-1" / "top_k.csv").read_text()
    assert (cli_files["root"] / f"{solver}-2" / "top_k.csv").read_text() == first


# ---------------------------------------------------------------------- two writers


def _race_worker(path: str, queue) -> None:  # pragma: no cover - runs in a child process
    try:
        result = vectors(calculator(), ds(X, Y), path)
        queue.put(("ok", float(np.abs(result).sum()), result.shape[0]))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        queue.put(("error", repr(error), 0))


@pytest.mark.slow
def test_two_processes_filling_one_cache(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    path = str(tmp_path / "cache")
    workers = [context.Process(target=_race_worker, args=(path, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert all(status == "ok" for status, _, _ in results), results
    assert results[0][1] == pytest.approx(results[1][1]) and results[0][2] == NUM_TRAIN
    data = manifest(Path(path))
    assert data["num_shards"] == 4 and data["pending_files"] == []
    files = {entry["file"] for entry in data["shards"].values()}
    assert all((Path(path) / name).is_file() for name in files)
    assert sorted(p.name for p in Path(path).iterdir()) == sorted([MANIFEST_NAME, LOCK_NAME, *files])
    reference = vectors(calculator(), ds(X, Y), tmp_path / "reference")
    np.testing.assert_allclose(vectors(calculator(), ds(X, Y), path), reference, rtol=1e-6)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
