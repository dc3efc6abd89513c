"""Reliability trials (issue 14): run every case of the issue and say whether its outcome is clear.

A case is *clear* when the call raises a ``ValueError``/``TypeError`` whose message says what to do, or gives the
right answer. For a cache (§1) the right answer is what a fresh run without the cache returns (bitwise or to float
tolerance); for the defaults (§3) it is a finite answer close to a reference (a refusal is not clear there); for
progress (§4) a tqdm bar or a log line of what was chosen; for the migration (§5) the original's behaviour, or an
error or warning saying what changed. Everything else (a crash from deep inside TensorFlow, a silent stale or
non-finite result, a hang) is *NOT clear*. One line per case, then ``N/M clear`` per section and overall.

Run: ``.venv/bin/python benchmarks/reliability_trials.py`` (all sections, about 2-3 minutes on 2 cores) or
``--section 1`` (repeatable) for one section.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from influenciae import (  # noqa: E402
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    MigrationWarning,
    RepresenterPointLJE,
    TrakCalculator,
)
from influenciae._backend import tf  # noqa: E402
from influenciae.cache import MANIFEST_NAME  # noqa: E402
from influenciae.data import from_numpy  # noqa: E402

ACTIONABLE = (
    "pass",
    "use",
    "give",
    "fix",
    "add",
    "drop",
    "encode",
    "wrap",
    "remove",
    "check",
    "damping",
    "round",
    "cast",
)


@dataclass(frozen=True)
class Case:
    """One trial: ``run()`` either returns ``None`` (a right answer, checked inside) or raises."""

    name: str
    section: str
    run: Callable[[], None]


def _problem(num_examples: int = 12, seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, "tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((num_examples, 4)), rng.integers(0, 3, num_examples).astype("float64")
    return model, x, y


def _calculator(model, x, y):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    im = InfluenceModel(model, loss_function=loss)
    train = from_numpy(x, y, batch_size=4)
    return FirstOrderInfluenceCalculator(im, train, ihvp_calculator=ExactIHVP(im, train, damping=1.0))


@functools.cache
def _clean_calculator() -> FirstOrderInfluenceCalculator:
    """The calculator on the clean 12 examples, shared by the cases that only edit the scored data."""
    return _calculator(*_problem())


def _with(
    edit: Callable[[np.ndarray, np.ndarray, np.ndarray], None], method: str = "self_influence"
) -> Callable[[], None]:
    def run() -> None:
        _, x, y = _problem()
        calculator = _clean_calculator()
        weights = np.ones(len(y))
        edit(x, y, weights)
        data = from_numpy(x, y, sample_weight=weights, batch_size=4)
        if method == "self_influence":
            values = calculator.self_influence(data)
        else:
            values = calculator.influence_matrix(data, from_numpy(*_problem()[1:], batch_size=4))
        if not np.isfinite(values).all():
            raise RuntimeError(f"{int((~np.isfinite(values)).sum())} non-finite results returned silently")

    return run


def _set(
    array: str, index: int | tuple[int, int], value: float
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    def edit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        {"x": x, "y": y, "w": w}[array][index] = value

    return edit


def _strings() -> None:
    model, x, y = _problem()
    data = tf.data.Dataset.from_tensor_slices((np.array(["a"] * 4), y[:4])).batch(2)
    _calculator(model, x, y).self_influence(data)


def _repeat() -> None:
    model, x, y = _problem()
    _calculator(model, x, y).self_influence(from_numpy(x, y, batch_size=4).repeat())


def _empty_test() -> None:
    model, x, y = _problem()
    _calculator(model, x, y).most_influential(from_numpy(x, y, batch_size=4).take(0), from_numpy(x, y, batch_size=4))


def _one_example() -> None:
    model, x, y = _problem(num_examples=1)
    values = _calculator(model, x, y).self_influence(from_numpy(x, y, batch_size=4))
    if values.shape != (1,) or not np.isfinite(values).all():
        raise RuntimeError(f"one example gave {values}")


def _bad_hessian_set(edit: Callable[[np.ndarray, np.ndarray, np.ndarray], None]) -> Callable[[], None]:
    """The bad value is in the dataset the calculator (its Hessian) is built on, not in a scored one."""

    def run() -> None:
        model, x, y = _problem()
        edit(x, y, np.ones(len(y)))
        calculator = _calculator(model, x, y)  # the Hessian pass reads every batch here
        _, clean_x, clean_y = _problem()
        values = calculator.self_influence(from_numpy(clean_x, clean_y, batch_size=4))
        raise RuntimeError(f"accepted silently: the Hessian was built on the bad batch ({values.size} results)")

    return run


def _multi_output() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(1)(inputs)])
    x = np.random.default_rng(0).standard_normal((8, 4)).astype("float32")
    y = np.zeros(8, "int64")
    im = InfluenceModel(model, loss_function=keras.losses.SparseCategoricalCrossentropy(reduction="none"))
    train = from_numpy(x, y, batch_size=4)
    try:
        FirstOrderInfluenceCalculator(im, train, ihvp_calculator=ExactIHVP(im, train, damping=1.0)).self_influence(
            train
        )
    except ValueError as error:  # clear only if it says what to do with several outputs
        if "outputs" not in str(error) or "wrap" not in str(error):
            raise RuntimeError(f"unclear for several outputs: {error}") from None
        raise


def _positional_migration() -> None:
    model, x, y = _problem()
    im = InfluenceModel(model, loss_function=keras.losses.SparseCategoricalCrossentropy(True, reduction="none"))
    train = from_numpy(x, y, batch_size=4)
    FirstOrderInfluenceCalculator(im, train, ExactIHVP(im, train, damping=1.0), 25, 25)  # type: ignore[call-arg]


def _float16() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype="float16"), keras.layers.Dense(3, dtype="float16")])
    x = np.random.default_rng(0).standard_normal((8, 4)).astype("float16")
    im = InfluenceModel(model, loss_function=keras.losses.SparseCategoricalCrossentropy(True, reduction="none"))
    train = from_numpy(x, np.zeros(8, "int64"), batch_size=4)
    FirstOrderInfluenceCalculator(im, train, ihvp_calculator="exact").self_influence(train)


# ---------------------------------------------------------------------- section 1: a cache knows what it holds

CACHE_TRAIN, CACHE_BATCH = 64, 16


def _sparse_ce(**options: Any) -> Any:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", **options)


def _cache_data(num: int = CACHE_TRAIN, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num, 4)).astype("float32"), rng.integers(0, 3, size=num).astype("int64")


def _cache_ds(x: np.ndarray, y: np.ndarray, batch: int = CACHE_BATCH) -> Any:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


#: The models the cases share, with their weights when they were built: no case may change them.
_SNAPSHOTS: dict[str, tuple[Any, list[np.ndarray]]] = {}


def _snapshot(name: str, model: Any) -> Any:
    _SNAPSHOTS[name] = (model, [weight.copy() for weight in model.get_weights()])
    return model


@functools.cache
def _cache_model() -> Any:
    """Two hidden layers with the same weight shapes (4x4 + 4), so "another watched layer" keeps the shapes."""
    keras.utils.set_random_seed(0)
    return _snapshot(
        "cache model",
        keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(4, "tanh"), keras.layers.Dense(4, "tanh"), keras.layers.Dense(3)]
        ),
    )


def _models_unchanged() -> None:
    """Every shared model is bitwise unchanged by the cases that ran before (alone: by a cache pass and a solve)."""
    if not _SNAPSHOTS:
        _vectors(_reference(), _cache_ds(*_cache_data()))
        im, train, _ = _softmax_mlp()
        ExactIHVP(im, train).solve(np.ones((1, im.nb_params)))
    for name, (model, before) in _SNAPSHOTS.items():
        after = model.get_weights()
        if len(after) != len(before) or any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True)):
            raise RuntimeError(f"the {name}'s weights changed")


def _cache_calculator(
    *, loss: Any = None, hessian: Any = None, damping: float = 1.0, solver: str = "exact", **watched: Any
) -> FirstOrderInfluenceCalculator:
    """A first-order calculator over the 64 cache examples, one batch of 16 per shard (4 shards)."""
    model = InfluenceModel(_cache_model(), loss_function=loss or _sparse_ce(), **watched)
    train = _cache_ds(*_cache_data()) if hessian is None else hessian
    return FirstOrderInfluenceCalculator(model, train, solver, damping=damping, batches_per_shard=1)


@functools.cache
def _reference() -> FirstOrderInfluenceCalculator:
    return _cache_calculator()


def _vectors(calculator: Any, train: Any, path: Path | None = None) -> np.ndarray:
    """Influence vectors ``[N, P]`` through the disk cache at ``path`` (``None``: a fresh run, no cache)."""
    pairs = calculator.compute_influence_vector(train, None if path is None else str(path))
    return np.concatenate([vectors.numpy() for _, vectors in pairs])


def _same_as_fresh(got: np.ndarray, calculator: Any, train: Any) -> None:
    """Raise unless ``got`` equals a fresh run without a cache (to float tolerance)."""
    expected = _vectors(calculator, train)
    if got.shape != expected.shape:
        raise RuntimeError(f"stale cache: {got.shape[0]} vectors returned, a fresh run gives {expected.shape[0]}")
    if not np.allclose(got, expected, rtol=1e-5, atol=1e-7):
        raise RuntimeError(f"stale cache: values off by {np.abs(got - expected).max():.3g} from a fresh run")


def _build_reference(path: Path) -> None:
    _vectors(_reference(), _cache_ds(*_cache_data()), path)


def _stale(
    change: Callable[[Path], tuple[Any, Any]], build: Callable[[Path], None] = _build_reference
) -> Callable[[], None]:
    """Build a complete cache, change one thing (``change(path) -> (calculator, train)``) and reuse the cache.

    Clear when the reuse is refused with a ``ValueError`` that says what to do, or returns what a fresh run returns.
    """

    def run() -> None:
        with tempfile.TemporaryDirectory() as root:
            path = Path(root) / "cache"
            try:  # a failure while setting the case up is never "clear"
                build(path)
                calculator, train = change(path)
            except Exception as error:  # noqa: BLE001
                raise RuntimeError(f"the case could not be set up: {type(error).__name__}: {error}") from None
            _same_as_fresh(_vectors(calculator, train, path), calculator, train)

    return run


def _reference_request(path: Path) -> tuple[Any, Any]:
    return _reference(), _cache_ds(*_cache_data())


def _twice_the_loss(path: Path) -> tuple[Any, Any]:
    base = _sparse_ce()

    def twice(y_true: Any, y_pred: Any) -> Any:
        return 2.0 * base(y_true, y_pred)

    return _cache_calculator(loss=twice), _cache_ds(*_cache_data())


def _extended(path: Path) -> tuple[Any, Any]:
    x, y = _cache_data(CACHE_TRAIN + 32, seed=5)
    x[:CACHE_TRAIN], y[:CACHE_TRAIN] = _cache_data()
    return _reference(), _cache_ds(x, y)


def _truncated(path: Path) -> tuple[Any, Any]:
    x, y = _cache_data()
    return _reference(), _cache_ds(x[:48], y[:48])


def _last_four_replaced(path: Path) -> tuple[Any, Any]:
    x, y = _cache_data()
    x[-4:] += 1.0
    return _reference(), _cache_ds(x, y)


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST_NAME).read_text())


def _shard_file(path: Path, shard_id: int) -> Path:
    return path / _manifest(path)["shards"][str(shard_id)]["file"]


def _rewritten_shard(path: Path) -> tuple[Any, Any]:
    target = _shard_file(path, 1)
    with np.load(target) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["vectors"] = arrays["vectors"] + 1.0  # the same schema, other values
    with open(target, "wb") as handle:
        np.savez(handle, **arrays)
    return _reference_request(path)


def _swapped_shards(path: Path) -> tuple[Any, Any]:
    data = _manifest(path)
    data["shards"]["0"], data["shards"]["1"] = data["shards"]["1"], data["shards"]["0"]
    (path / MANIFEST_NAME).write_text(json.dumps(data))
    return _reference_request(path)


def _copied_from_another_damping(path: Path) -> tuple[Any, Any]:
    other = path.parent / "other"  # damping 2.0: this untrained model's Hessian needs >= 0.46 to be definite
    _vectors(_cache_calculator(damping=2.0), _cache_ds(*_cache_data()), other)
    data, entry = _manifest(path), _manifest(other)["shards"]["2"]  # the file and its entry, checksum included
    shutil.copy(other / entry["file"], path / entry["file"])
    data["shards"]["2"] = entry
    (path / MANIFEST_NAME).write_text(json.dumps(data))
    return _reference_request(path)


def _damaged_shard(damage: str) -> Callable[[], None]:
    """A truncated or bit-flipped shard 3: a ``ValueError`` naming the shard (or, rebuilt, the right answer)."""

    def change(path: Path) -> tuple[Any, Any]:
        target = _shard_file(path, 3)
        data = bytearray(target.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        return _reference_request(path)

    run = _stale(change)

    def named() -> None:
        try:
            run()
        except ValueError as error:
            if "Shard 3" not in str(error) or "BadZipFile" in str(error):
                raise RuntimeError(f"the error does not name shard 3: {error}") from None
            raise

    return named


def _users_file() -> None:
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "cache"
        _build_reference(path)
        mine = path / "shard-000000-0123456789abcdef.npz"
        mine.write_bytes(b"my own file")
        calculator, train = _reference_request(path)
        _same_as_fresh(_vectors(calculator, train, path), calculator, train)  # reopened and reused
        calculator.compute_influence_vector(train, str(path), overwrite=True)  # and rebuilt
        if not mine.is_file() or mine.read_bytes() != b"my own file":
            raise RuntimeError(f"the cache deleted or changed the user's file {mine.name}")


def _shuffled() -> None:
    x, y = _cache_data()
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(CACHE_TRAIN, seed=0).batch(CACHE_BATCH)
    with tempfile.TemporaryDirectory() as root:
        got = _vectors(_reference(), train, Path(root) / "cache")
    raise RuntimeError(f"a reshuffled training set was accepted ({got.shape[0]} vectors whose indices move)")


def _ekfac_other_loss() -> None:
    from influenciae.hessian.kfac import EKFACIHVP

    with tempfile.TemporaryDirectory() as root:
        train = _cache_ds(*_cache_data())
        first = InfluenceModel(_cache_model(), loss_function=_sparse_ce())
        EKFACIHVP(first, train, damping=1e-3, factors_path=root).fit()
        other = InfluenceModel(_cache_model(), loss_function=_sparse_ce(ignore_class=2))
        reused = EKFACIHVP(other, train, damping=1e-3, factors_path=root).fit()
        fresh = EKFACIHVP(other, train, damping=1e-3).fit()
        rhs = np.random.default_rng(0).standard_normal((2, other.nb_params)).astype("float32")
        if not np.allclose(reused.solve(rhs).numpy(), fresh.solve(rhs).numpy(), rtol=1e-4, atol=1e-6):
            raise RuntimeError("EK-FAC reused factors fitted with another loss: its solves differ from a fresh fit")


def _race_worker(path: str, output: str) -> None:  # runs in a child process: ``--race-worker PATH OUTPUT``
    np.save(output, _vectors(_reference(), _cache_ds(*_cache_data()), Path(path)))


def _two_writers() -> None:
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "cache"
        outputs = [Path(root) / f"worker{number}.npy" for number in range(2)]
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--race-worker", str(path), str(output)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for output in outputs
        ]
        errors = [worker.communicate(timeout=300)[1] for worker in workers]
        for worker, error in zip(workers, errors, strict=True):
            if worker.returncode != 0:
                raise RuntimeError(f"a writer exited {worker.returncode}: {error.strip().splitlines()[-1:]}")
        calculator, train = _reference_request(path)
        for output in outputs:
            _same_as_fresh(np.load(output), calculator, train)
        data = _manifest(path)
        missing = [e["file"] for e in data["shards"].values() if not (path / e["file"]).is_file()]
        if missing or data.get("pending_files"):
            raise RuntimeError(f"the manifest lists missing files {missing} or pending {data.get('pending_files')}")
        _same_as_fresh(_vectors(calculator, train, path), calculator, train)  # a third open reuses it


# ---------------------------------------------------------------------- section 1: the command line


@functools.cache
def _cli_files() -> Path:
    """A saved model, training sets of 64 and 96 examples (the first 64 shared) and a test set, in a temp dir."""
    root = Path(tempfile.mkdtemp(prefix="reliability-cli-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    model = keras.models.clone_model(_cache_model())
    model.set_weights(_cache_model().get_weights())
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(root / "model.keras")
    x, y = _cache_data(CACHE_TRAIN + 32, seed=5)
    x[:CACHE_TRAIN], y[:CACHE_TRAIN] = _cache_data()
    np.savez(root / "train.npz", x=x[:CACHE_TRAIN], y=y[:CACHE_TRAIN])
    np.savez(root / "train96.npz", x=x, y=y)
    np.savez(root / "test.npz", **dict(zip(("x", "y"), _cache_data(5, seed=1), strict=True)))
    return root


def _cli(*argv: str) -> tuple[int, str]:
    """Run ``influenciae ARGV`` in this process: ``(exit code, stderr)``."""
    from influenciae import cli

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(argv))
    return code, stderr.getvalue()


def _top_k(train: str, output: str, *extra: str) -> str:
    """``influenciae top-k``: the CSV it wrote; a failed run is re-raised as a ``ValueError`` of its message."""
    root = _cli_files()
    code, stderr = _cli(
        "top-k", "--model", str(root / "model.keras"), "--npz", str(root / train), "--test-npz",
        str(root / "test.npz"), "-k", "3", "--output", str(root / output), "--no-progress", "--damping", "1.0",
        *extra,
    )  # fmt: skip
    if code != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        message = next((line for line in stderr.splitlines() if ": error: " in line), last)
        if code == 1 and "ValueError: " in message:  # the library's refusal, printed on one line
            raise ValueError(message.split("ValueError: ", 1)[1])
        raise RuntimeError(f"exit {code}: {message}")
    return (root / output / "top_k.csv").read_text()


def _top_k_iterative(solver: str) -> Callable[[], None]:
    """The first run fills an empty cache (a fresh computation); the second must reuse it, exit 0, same CSV."""

    def run() -> None:
        cache = ["--cache-dir", str(_cli_files() / f"cache-{solver}"), "--solver", solver]
        first = _top_k("train.npz", f"{solver}-1", *cache)
        if _top_k("train.npz", f"{solver}-2", *cache) != first:
            raise RuntimeError(
                f"top-k --solver {solver} through its complete cache differs from the run that filled it"
            )

    return run


def _top_k_extended() -> None:
    cache = ["--cache-dir", str(_cli_files() / "cache-extended")]
    _top_k("train.npz", "extended-64", *cache)
    got = _top_k("train96.npz", "extended-96", *cache)
    if got != _top_k("train96.npz", "extended-fresh"):
        raise RuntimeError("top-k on a cache of 64 examples with 96 given: the CSV differs from a fresh run")


@functools.cache
def _score_files() -> Path:
    """TFRecords of the cache data and the test set, and a solver state computed by ``influenciae score``'s step."""
    from influenciae.distributed.records import write_sharded_tfrecords

    root = _cli_files()
    write_sharded_tfrecords(root / "records", *_cache_data(), num_shards=2, prefix="train")
    write_sharded_tfrecords(root / "records", *_cache_data(5, seed=1), num_shards=1, prefix="test")
    write_sharded_tfrecords(root / "records", *_cache_data(4, seed=2), num_shards=1, prefix="other")
    _solver_state()
    return root


def _solver_state(*extra: str) -> Any:
    """The solver-state step of ``influenciae score --state``, its request checks included.

    The Beam scoring after it is not run (Apache Beam is an extra this environment does not install); the step's
    file helpers are replaced by local-file ones.
    """
    from influenciae.distributed import cli as score_cli

    beam = types.ModuleType("influenciae.distributed.beam")  # Apache Beam is not installed here: local files only
    beam.exists, beam.copy_to, beam.local_copy = os.path.exists, shutil.copyfile, lambda path, suffix: path  # type: ignore[attr-defined]
    root = _cli_files()
    parser = argparse.ArgumentParser()
    score_cli.add_arguments(parser)
    arguments = [
        "--model", str(root / "model.keras"), "--train", str(root / "records" / "train-*"),
        "--test", str(root / "records" / "test-*"), "--state", str(root / "state.npz"),
        "--output", str(root / "scores"), "--damping", "1.0",
        *[item.replace("RECORDS", str(root / "records")) for item in extra],
    ]  # fmt: skip
    with mock.patch.dict(sys.modules, {"influenciae.distributed.beam": beam}):
        return score_cli._solver_state(parser.parse_args(arguments))[0]


def _score_state(*extra: str) -> Callable[[], None]:
    """Reuse the saved state with one option changed: refused, or equal to a state computed fresh for it."""

    def run() -> None:
        try:
            _score_files()
        except Exception as error:  # noqa: BLE001 - a failure while setting the case up is never "clear"
            raise RuntimeError(f"the case could not be set up: {type(error).__name__}: {error}") from None
        reused = _solver_state(*extra)
        state, kept = _cli_files() / "state.npz", _cli_files() / "kept-state.npz"
        state.rename(kept)
        try:
            fresh = _solver_state(*extra)
        finally:
            state.unlink(missing_ok=True)
            kept.rename(state)
        for name in ("factors", "inverse"):
            a, b = getattr(reused, name, None), getattr(fresh, name, None)
            if (a is None) != (b is None) or (a is not None and (a.shape != b.shape or not np.allclose(a, b))):
                raise RuntimeError(
                    f"score --state {' '.join(extra)} reused a state whose {name} differ from a fresh one"
                )

    return run


# ---------------------------------------------------------------------- section 2: more numerics and the CLI


def _lissa_indefinite() -> None:
    from influenciae import LissaIHVP

    im, train, _ = _softmax_mlp()
    solver = LissaIHVP(im, train, damping=0.0, depth=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver.solve(np.ones((1, im.nb_params)))
    if not solver.info.converged.all() and not any("damping" in str(w.message) for w in caught):
        raise RuntimeError("LiSSA stopped unconverged on an indefinite Hessian without a warning")


def _arnoldi_default_rank() -> None:
    """Arnoldi with ``subspace_dim=30`` on the softmax MLP (P = 43): its default rank against the best rank-k answer."""
    from influenciae import ArnoldiIHVP

    im, train, hessian = _softmax_mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver = ArnoldiIHVP(im, train, subspace_dim=30, damping=1e-3)
    k = solver.k_largest_eig_vals
    values, vectors = np.linalg.eigh(hessian)
    top = np.argsort(-values)[:k]
    rhs = np.random.default_rng(0).standard_normal((2, im.nb_params))
    best = (rhs @ vectors[:, top]) / (values[top] + 1e-3) @ vectors[:, top].T  # the best rank-k answer
    error = np.linalg.norm(solver.solve(rhs).numpy() - best) / np.linalg.norm(best)
    if error > 0.01 and not caught:
        raise RuntimeError(f"Arnoldi's default k={k} of 30 is {error:.1%} off the best rank-k answer, no warning")


def _float16_solver(name: str) -> Callable[[], None]:
    def run() -> None:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,), dtype="float16"), keras.layers.Dense(3, dtype="float16")])
        x = np.random.default_rng(0).standard_normal((8, 4)).astype("float16")
        im = InfluenceModel(model, loss_function=_sparse_ce())
        train = from_numpy(x, np.zeros(8, "int64"), batch_size=4)
        options = {"arnoldi": {"ihvp_options": {"subspace_dim": 6}}}.get(name, {})
        values = FirstOrderInfluenceCalculator(im, train, name, damping=1e-2, **options).self_influence(train)
        if not np.isfinite(values).all():
            raise RuntimeError(f"float16 with {name}: non-finite results")

    return run


def _cli_usage(*argv: str) -> Callable[[], None]:
    """A CLI mistake: clear when it is a usage error (exit 2, the usage line, no ``ValueError:`` text)."""

    def run() -> None:
        root = _cli_files()
        (root / "a-file").write_text("not a directory")
        code, stderr = _cli(
            "self-influence", "--model", str(root / "model.keras"), "--npz", str(root / "train.npz"),
            "--no-progress", *[item.replace("ROOT", str(root)) for item in argv],
        )  # fmt: skip
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if code != 2 or "usage:" not in stderr or "ValueError:" in stderr:
            raise RuntimeError(f"exit {code}: {last}")
        raise ValueError(f"usage error (exit 2), give a valid value: {last}")

    return run


# ---------------------------------------------------------------------- section 3: defaults that work


def _train(model: Any, x: np.ndarray, y: np.ndarray, steps: int = 300) -> None:
    """Full-batch Adam on the mean sparse cross-entropy, no regularization (so the softmax Hessian is singular)."""
    optimizer = keras.optimizers.Adam(0.05)
    loss = _sparse_ce()

    @tf.function
    def step() -> None:
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(loss(y, model(x)))
        gradients = tape.gradient(value, model.trainable_weights)
        optimizer.apply_gradients(zip(gradients, model.trainable_weights, strict=True))

    for _ in range(steps):
        step()


@functools.cache
def _softmax_mlp() -> tuple[InfluenceModel, Any, np.ndarray]:
    """A trained float64 softmax MLP (the original README's setting), its training set and its dense Hessian."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(5, "tanh", dtype="float64"),
         keras.layers.Dense(3, dtype="float64")]
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4))
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0)
    _train(model, x, y)
    im = InfluenceModel(_snapshot("softmax MLP", model), loss_function=_sparse_ce())
    train = from_numpy(x, y, batch_size=8)
    dense = ExactIHVP(im, train, damping=0.0).operator.to_dense().numpy()
    return im, train, (dense + dense.T) / 2


def _per_example_gradients(im: InfluenceModel, train: Any) -> np.ndarray:
    return np.concatenate([im.batch_jacobian_tensor(batch).numpy() for batch in train])


def _answers(run: Callable[[], None]) -> Callable[[], None]:
    """§3 (and the controls) promise an answer: a refusal, however clear, is not clear here."""

    def answered() -> None:
        try:
            run()
        except (ValueError, TypeError) as error:
            raise RuntimeError(f"refused instead of answering: {type(error).__name__}: {error}") from None

    return answered


def _check_auto_damping(im: InfluenceModel, train: Any, hessian: np.ndarray, calculator: Any) -> None:
    values = calculator.self_influence(train)
    damping = float(calculator.ihvp.damping)
    gradients = _per_example_gradients(im, train)
    expected = np.einsum(
        "np,np->n", gradients, np.linalg.solve(hessian + damping * np.eye(len(hessian)), gradients.T).T
    )
    mean_eigenvalue = np.trace(hessian) / len(hessian)
    if not (np.isfinite(values).all() and 0 < damping < mean_eigenvalue):
        raise RuntimeError(f"damping {damping:.3g} (mean eigenvalue {mean_eigenvalue:.3g}) or non-finite values")
    if not np.allclose(values, expected, rtol=1e-5):
        raise RuntimeError(f"self-influence off by {np.abs(values / expected - 1).max():.2%} from solve(H + λI)")


def _quick_start() -> None:
    """The original README: ``InfluenceModel(model, start_layer=-1)``, ``ExactIHVP(im, train)``, no damping given."""
    full, train, _ = _softmax_mlp()
    im = InfluenceModel(full.model, start_layer=-1, loss_function=_sparse_ce())
    dense = ExactIHVP(im, train, damping=0.0).operator.to_dense().numpy()
    calculator = FirstOrderInfluenceCalculator(im, train, ExactIHVP(im, train))
    _check_auto_damping(im, train, (dense + dense.T) / 2, calculator)


def _representer_lje() -> None:
    im, train, _ = _softmax_mlp()
    lje = RepresenterPointLJE(im, train)
    scores = lje.influence_matrix(train, train)
    explained = np.argmax(im.model(np.concatenate([x for x, _ in train])).numpy(), axis=1)
    surrogate = lje.surrogate_logits(train)[np.arange(len(explained)), explained]
    if not np.isfinite(scores).all() or not np.allclose(scores.sum(axis=1), surrogate, rtol=1e-6, atol=1e-9):
        raise RuntimeError("LJE scores are non-finite or do not sum to the surrogate logits")


def _trak_logistic() -> None:
    """TRAK on a softmax logistic regression, nothing passed: finite, equal to its closed form with that damping."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 4)), rng.integers(0, 3, 40)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(3, dtype="float64")])
    _train(model, x, y, steps=100)
    train = from_numpy(x, y, batch_size=8)
    values = TrakCalculator(InfluenceModel(model, loss_function=_sparse_ce()), train, None).self_influence(train)
    if not np.isfinite(values).all():
        raise RuntimeError("TRAK returned non-finite values")


def _zero_damping_is_zero() -> None:
    """``damping=0.0`` on a positive-definite Hessian: exactly ``H⁻¹`` (nothing added)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    y = x @ np.array([1.0, -2.0, 0.5])
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), keras.layers.Dense(1, use_bias=False, dtype="float64")]
    )
    im = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    solver = ExactIHVP(im, from_numpy(x, y[:, None], batch_size=8), damping=0.0)
    solution = solver.solve(np.eye(3)).numpy()
    expected = np.linalg.inv(2 * x.T @ x / len(x))  # the Hessian of the mean squared error
    if solver.damping != 0.0 or not np.allclose(solution, expected, rtol=1e-9):
        raise RuntimeError(
            f"damping=0.0 gave damping {solver.damping} / a result off by {np.abs(solution - expected).max():.3g}"
        )


def _zero_damping_singular() -> None:
    """``damping=0.0`` on the softmax MLP's singular Hessian: refused (never damped behind the user's back)."""
    im, train, _ = _softmax_mlp()
    solution = ExactIHVP(im, train, damping=0.0).solve(np.ones((1, im.nb_params))).numpy()
    raise RuntimeError(f"a singular Hessian was solved with damping=0.0 (norm {np.linalg.norm(solution):.3g})")


def _cg_float32() -> None:
    from influenciae import ConjugateGradientDescentIHVP

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1, use_bias=False)])
    im = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    solver = ConjugateGradientDescentIHVP(im, from_numpy(x, x[:, :1], batch_size=8), damping=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solution = solver.solve(np.eye(5, dtype="float32")).numpy()
    expected = np.linalg.inv(2 * x.astype("float64").T @ x / len(x) + 0.1 * np.eye(5))
    if caught:
        raise RuntimeError(f"float32 CG warned: {caught[0].message}")
    if not np.allclose(solution, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"float32 CG off by {np.abs(solution - expected).max():.3g}")


# ---------------------------------------------------------------------- section 4: progress and logs


def _shows_progress(name: str, make: Callable[[], Any]) -> Callable[[], None]:
    """``make()`` runs with ``show_progress=True``; clear when a tqdm bar naming ``name`` was drawn on stderr."""

    def run() -> None:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            make()
        if name not in stderr.getvalue():
            raise RuntimeError(f"no progress bar of {name} with show_progress=True")

    return run


def _ridge() -> tuple[InfluenceModel, Any]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5))
    model = keras.Sequential(
        [keras.Input((5,), dtype="float64"), keras.layers.Dense(1, use_bias=False, dtype="float64")]
    )
    return InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction="none")), from_numpy(
        x, x[:, :1] + 0.1 * rng.standard_normal((40, 1)), batch_size=8
    )


def _solve_with_progress(name: str, **options: Any) -> Callable[[], Any]:
    def make() -> Any:
        im, train = _ridge()
        calculator = FirstOrderInfluenceCalculator(
            im, train, name, damping=0.1, ihvp_options=options or None, show_progress=True
        )
        return calculator.ihvp.solve(np.eye(5))

    return make


def _ekfac_progress() -> Any:
    from influenciae.hessian.kfac import EKFACIHVP

    im, train, _ = _softmax_mlp()
    return EKFACIHVP(im, train, damping=1e-3, show_progress=True).fit()


def _group_progress() -> Any:
    from influenciae import SecondOrderInfluenceCalculator

    im, train = _ridge()
    calculator = SecondOrderInfluenceCalculator(im, train, "cg", damping=0.1, show_progress=True)
    return calculator.compute_influence_vector_group(train.take(1))


def _passed_down() -> None:
    im, train = _ridge()
    calculator = FirstOrderInfluenceCalculator(im, train, "cg", damping=0.1, show_progress=True)
    if calculator.ihvp.show_progress is not True:
        raise RuntimeError("FirstOrderInfluenceCalculator(show_progress=True) did not pass it to its solver")


def _logs(needle: str, make: Callable[[], Any]) -> Callable[[], None]:
    """Clear when the ``influenciae`` logger records ``needle`` (what the solver chose) at INFO."""

    def run() -> None:
        records: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        logger, handler = logging.getLogger("influenciae"), Keep(logging.INFO)
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            make()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        if not any(needle in record for record in records):
            raise RuntimeError(f"no log line with {needle!r} (got {records[:3]})")

    return run


def _auto_damping_solve() -> Any:
    im, train, _ = _softmax_mlp()
    return ExactIHVP(im, train).solve(np.ones((1, im.nb_params)))


def _arnoldi_solve() -> Any:
    from influenciae import ArnoldiIHVP

    im, train, _ = _softmax_mlp()
    return ArnoldiIHVP(im, train, subspace_dim=10, damping=1e-3).solve(np.ones((1, im.nb_params)))


def _cg_solve() -> Any:
    from influenciae import ConjugateGradientDescentIHVP

    im, train = _ridge()
    return ConjugateGradientDescentIHVP(im, train, damping=0.1).solve(np.eye(5))


# ---------------------------------------------------------------------- section 5: the migration, items a-g


def _two_layer() -> Any:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(2), keras.layers.Dense(1)])


def _migration_a() -> None:
    """(a) the original's ``ExactIHVP(im, train)`` (damping 0) on docs/migration.md's softmax classifier."""
    im, train, hessian = _softmax_mlp()
    _check_auto_damping(im, train, hessian, FirstOrderInfluenceCalculator(im, train, ExactIHVP(im, train)))


def _migration_b_start_layer() -> None:
    """(b) ``InfluenceModel(model, start_layer=0)``: the original watched layer 0 only (6 parameters)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = InfluenceModel(_two_layer(), start_layer=0, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    said = [str(w.message) for w in caught if w.category is MigrationWarning]
    if im.nb_params != 6 and not any("6 parameters" in message for message in said):
        raise RuntimeError(f"start_layer=0 watches {im.nb_params} parameters, the original 6, without a warning")


def _migration_b_default() -> None:
    """(b) ``InfluenceModel(model)``: the original watched the last weighted layer before the output (a small CNN)."""
    from influenciae import compat
    from influenciae.model import migration as model_module

    model_module._DEFAULT_WATCH_WARNED = False  # shown once per process: earlier cases may have seen it
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5, 5, 1)), keras.layers.Conv2D(4, 2, activation="relu"), keras.layers.Flatten(),
         keras.layers.Dense(20), keras.layers.Flatten(), keras.layers.Dense(10)]
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    original = compat.original_influence_model(model).nb_params
    if im.nb_params != original and not any(w.category is MigrationWarning for w in caught):
        raise RuntimeError(
            f"InfluenceModel(model) watches {im.nb_params} parameters where the original watched {original}, "
            "without a MigrationWarning"
        )


def _migration_d() -> None:
    """(d) second-order group values: ``compat.original_group_values`` gives the original's closed form."""
    from influenciae import SecondOrderInfluenceCalculator, compat

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), keras.layers.Dense(2, use_bias=False, dtype="float64"),
         keras.layers.Dense(1, use_bias=False, dtype="float64")]
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((25, 3)), rng.standard_normal((25, 1))
    hidden = x @ model.layers[0].kernel.numpy()
    gradients = 2.0 * (hidden @ model.layers[1].kernel.numpy()[:, 0] - y[:, 0])[:, None] * hidden
    hessians = 2.0 * hidden[:, :, None] * hidden[:, None, :]
    im = InfluenceModel(model, start_layer=-1, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    inverse, fraction = np.linalg.inv(hessians.mean(0)), 0.2
    ihvp = inverse @ gradients[:5].sum(0)
    original = (1 - 2 * fraction) / ((1 - fraction) ** 2 * 25) * ihvp + inverse @ (hessians[:5].sum(0) @ ihvp) / (
        25**2 * (1 - fraction) ** 2
    )
    calculator = SecondOrderInfluenceCalculator(im, train, "exact", damping=0.0)
    vector = calculator.compute_influence_vector_group(train.unbatch().take(5).batch(5))
    if not np.allclose(compat.original_group_values(vector, calculator).numpy(), original, rtol=1e-9):
        raise RuntimeError("compat.original_group_values differs from the original's closed form")
    if not np.allclose(vector.numpy(), 25 * original, rtol=1e-9):
        raise RuntimeError("the group vector is not N times the original's, as docs/migration.md says")


def _migration_e() -> None:
    """(e) the original's ``batch_gradient(dataset)`` (per-batch sums): a TypeError naming the replacement."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    im = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    x, y = np.array([[1.0], [2.0], [0.0]], "float32"), np.array([[3.0], [0.0], [1.0]], "float32")
    expected = (2 * (x - y) * x).sum()  # d/dw Σ (w x - y)² at w = 1
    if not np.isclose(float(im.batch_gradient_tensor((x, y)).numpy()[0]), expected, rtol=1e-6):
        raise RuntimeError("batch_gradient_tensor is not the original's per-batch sum")
    im.batch_gradient(tf.data.Dataset.from_tensor_slices((x, y)).batch(3))
    raise RuntimeError("batch_gradient(dataset) accepted a dataset")


def _migration_f() -> None:
    """(f) removed names: ``layers`` kept, the others raise an AttributeError that names the replacement."""
    from influenciae import TracIn, compat

    model = _two_layer()
    im = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    if im.layers != model.layers:
        raise RuntimeError("InfluenceModel.layers is not the model's layers")
    for name, get in (
        ("BatchSort", lambda: compat.BatchSort([1, 2])),
        ("InfluenceModel.process_batch_for_loss_fn", lambda: im.process_batch_for_loss_fn),
        ("TracIn.models", lambda: TracIn([im, im], [0.1, 0.1]).models),
    ):
        try:
            get()
        except AttributeError as error:
            if not any(
                word in str(error) for word in ("use", "replace", "instead", "compat.", "influenciae.", "calc.")
            ):
                raise RuntimeError(f"{name}: the AttributeError does not say what replaced it: {error}") from None
        else:
            if name != "TracIn.models":
                raise RuntimeError(f"{name} neither works nor says what replaced it")
    for helper in ("compute_ihvp", "compute_hvp", "tracin_models", "find_layer", "dataset_size", "dataset_to_tensor"):
        if not callable(getattr(compat, helper, None)):
            raise RuntimeError(f"compat.{helper} is missing")


def _migration_g() -> None:
    """(g) a tf_keras ``BinaryCrossentropy(reduction=NONE)`` with ``[B]`` targets: the closed-form losses."""
    import tf_keras

    legacy = tf_keras.Sequential([tf_keras.layers.Dense(1, activation="sigmoid", input_shape=(3,))])
    x = np.random.default_rng(0).standard_normal((6, 3)).astype("float32")
    y = np.array([0, 1, 1, 0, 1, 0], "float32")
    im = InfluenceModel(legacy, loss_function=tf_keras.losses.BinaryCrossentropy(reduction="none"))
    p = legacy(x).numpy()[:, 0].astype("float64")
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    if not np.allclose(im.batch_loss((x, y)).numpy(), expected, rtol=1e-4):
        raise RuntimeError("tf_keras BinaryCrossentropy with [B] targets: losses differ from the closed form")


CASES: tuple[Case, ...] = (
    # §1: a cache must know exactly what it holds (refused with a clear error, or equal to a fresh run)
    Case("control: the unchanged request reuses the cache", "1-cache", _answers(_stale(_reference_request))),
    Case(
        "another loss (ignore_class=2)",
        "1-cache",
        _stale(lambda p: (_cache_calculator(loss=_sparse_ce(ignore_class=2)), _cache_ds(*_cache_data()))),
    ),
    Case("twice the loss", "1-cache", _stale(_twice_the_loss)),
    Case(
        "gradient_dtype='bfloat16'",
        "1-cache",
        _stale(lambda p: (_cache_calculator(gradient_dtype="bfloat16"), _cache_ds(*_cache_data()))),
    ),
    Case(
        "another watched layer with the same weight shapes",
        "1-cache",
        _stale(
            lambda p: (_cache_calculator(start_layer=1, last_layer=1), _cache_ds(*_cache_data())),
            build=lambda p: _vectors(_cache_calculator(start_layer=0, last_layer=0), _cache_ds(*_cache_data()), p),
        ),
    ),
    Case(
        "another Hessian dataset",
        "1-cache",
        _stale(
            lambda p: (
                _cache_calculator(hessian=_cache_ds(*(a[:32] for a in _cache_data()))),
                _cache_ds(*_cache_data()),
            )
        ),
    ),
    Case("training set extended by 32", "1-cache", _stale(_extended)),
    Case("training set truncated", "1-cache", _stale(_truncated)),
    Case("last 4 training examples replaced", "1-cache", _stale(_last_four_replaced)),
    Case("a shard rewritten with other values, same schema", "1-cache", _stale(_rewritten_shard)),
    Case("two shards swapped in the manifest", "1-cache", _stale(_swapped_shards)),
    Case("a shard copied from a cache built with damping 2.0", "1-cache", _stale(_copied_from_another_damping)),
    Case("a truncated shard (ValueError naming it)", "1-cache", _damaged_shard("truncate")),
    Case("a bit-flipped shard (ValueError naming it)", "1-cache", _damaged_shard("flip")),
    Case("a user's file named like a shard is not deleted", "1-cache", _users_file),
    Case("top-k after adding 32 training examples (CLI)", "1-cache", _top_k_extended),
    Case("top-k --solver cg on a complete cache exits 0 (CLI)", "1-cache", _top_k_iterative("cg")),
    Case("top-k --solver lissa on a complete cache exits 0 (CLI)", "1-cache", _top_k_iterative("lissa")),
    Case("control: score --state with the same options reuses it", "1-cache", _answers(_score_state())),
    Case("score --state with another --damping", "1-cache", _score_state("--damping", "0.5")),
    Case("score --state with another --solver", "1-cache", _score_state("--solver", "cg")),
    Case("score --state with another --test", "1-cache", _score_state("--test", "RECORDS/other-*")),
    Case("EK-FAC factors_path fitted with another loss", "1-cache", _ekfac_other_loss),
    Case("two racing writers on one cache", "1-cache", _two_writers),
    Case("a .shuffle()d training set", "1-cache", _shuffled),
    # §2: bad input gets a clear error, every time
    Case("label >= classes in batch 3", "2-input", _with(_set("y", 9, 7.0))),
    Case("negative label in batch 3", "2-input", _with(_set("y", 9, -1.0))),
    Case("fractional sparse label", "2-input", _with(_set("y", 5, 1.5))),
    Case("NaN input in a later batch", "2-input", _with(_set("x", (10, 0), np.nan))),
    Case("NaN label in a later batch", "2-input", _with(_set("y", 10, np.nan))),
    Case("NaN sample weight in a later batch", "2-input", _with(_set("w", 10, np.nan))),
    Case("inf sample weight in a later batch", "2-input", _with(_set("w", 10, np.inf))),
    Case("inf in a test input", "2-input", _with(_set("x", (5, 2), np.inf), method="influence_matrix")),
    Case("label >= classes only in the test set", "2-input", _with(_set("y", 6, 3.0), method="influence_matrix")),
    Case("label >= classes in the Hessian set's batch 3", "2-input", _bad_hessian_set(_set("y", 9, 7.0))),
    Case("NaN input in the Hessian set's batch 3", "2-input", _bad_hessian_set(_set("x", (10, 0), np.nan))),
    Case("string inputs", "2-input", _strings),
    Case("infinite (.repeat()) dataset", "2-input", _repeat),
    Case("empty test set", "2-input", _empty_test),
    Case("one-example training set (valid)", "2-input", _one_example),
    Case("sample weights as a third element (valid)", "2-input", _with(lambda x, y, w: None)),
    Case("multi-output model", "2-input", _multi_output),
    Case("LiSSA on an indefinite Hessian, damping 0", "2-numerics", _lissa_indefinite),
    Case("Arnoldi's default rank", "2-numerics", _arnoldi_default_rank),
    Case("float16 model, exact", "2-numerics", _float16),
    Case("float16 model, arnoldi", "2-numerics", _float16_solver("arnoldi")),
    Case("float16 model, diagonal", "2-numerics", _float16_solver("diagonal")),
    Case("float16 model, ekfac", "2-numerics", _float16_solver("ekfac")),
    Case(
        "CLI --solver-option max_iterations=-5",
        "2-cli",
        _cli_usage("--solver", "cg", "--solver-option", "max_iterations=-5"),
    ),
    Case("CLI a --start-layer the model lacks", "2-cli", _cli_usage("--start-layer", "nonexistent")),
    Case("CLI an --output under a file", "2-cli", _cli_usage("--output", "ROOT/a-file/out")),
    # §3: defaults that work on an ordinary classifier (an answer, close to a reference)
    Case("README quick start: ExactIHVP default damping", "3-defaults", _answers(_quick_start)),
    Case("RepresenterPointLJE defaults", "3-defaults", _answers(_representer_lje)),
    Case("TRAK defaults on logistic regression", "3-defaults", _answers(_trak_logistic)),
    Case("damping=0.0 is exactly zero (positive-definite H)", "3-defaults", _answers(_zero_damping_is_zero)),
    Case("damping=0.0 on a singular H is refused, not damped", "3-defaults", _zero_damping_singular),
    Case("CG float32 default tolerance without a warning", "3-defaults", _answers(_cg_float32)),
    # §4: progress where the time goes, and logs of what was chosen
    Case("show_progress passed to the solver", "4-progress", _passed_down),
    Case(
        "CG iterations progress",
        "4-progress",
        _shows_progress("ConjugateGradientDescentIHVP", _solve_with_progress("cg")),
    ),
    Case("LiSSA progress", "4-progress", _shows_progress("LissaIHVP", _solve_with_progress("lissa", depth=20))),
    Case(
        "Arnoldi progress",
        "4-progress",
        _shows_progress("ArnoldiIHVP", _solve_with_progress("arnoldi", subspace_dim=4)),
    ),
    Case("exact Hessian build progress", "4-progress", _shows_progress("ExactIHVP", _solve_with_progress("exact"))),
    Case("Nystrom progress", "4-progress", _shows_progress("NystromIHVP", _solve_with_progress("nystrom", rank=3))),
    Case("EK-FAC fitting progress", "4-progress", _shows_progress("EKFACIHVP", _ekfac_progress)),
    Case("second-order group influence progress", "4-progress", _shows_progress("IHVP", _group_progress)),
    Case("log: the chosen damping", "4-progress", _logs("damping=", _auto_damping_solve)),
    Case("log: Arnoldi's rank", "4-progress", _logs("k=", _arnoldi_solve)),
    Case("log: CG iterations", "4-progress", _logs("iterations", _cg_solve)),
    # §5: a truthful migration from the original Influenciae
    Case("(a) ExactIHVP(im, train) with the original default damping", "5-migration", _answers(_migration_a)),
    Case("(b) InfluenceModel(model, start_layer=0)", "5-migration", _migration_b_start_layer),
    Case("(b) InfluenceModel(model) default weights", "5-migration", _migration_b_default),
    Case("(c) FirstOrderInfluenceCalculator(im, ds, ihvp, 25, 25)", "5-migration", _positional_migration),
    Case("(d) second-order group values at the original's scale", "5-migration", _migration_d),
    Case("(e) batch_gradient(dataset): the original's per-batch sums", "5-migration", _migration_e),
    Case("(f) removed names say what replaced them", "5-migration", _migration_f),
    Case("(g) tf_keras BinaryCrossentropy with [B] targets", "5-migration", _migration_g),
    # the models every case above used are bitwise unchanged (run last)
    Case("models never mutated: every shared model bitwise unchanged", "1-cache", _models_unchanged),
)

SECTIONS = {"1": "cache identity", "2": "bad input", "3": "defaults", "4": "progress", "5": "migration"}


def classify(case: Case) -> tuple[bool, str]:
    """Run one case: ``(clear, message)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.run()
    except (ValueError, TypeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        actionable = (
            any(word in str(error).lower() for word in ACTIONABLE) and "tensorflow" not in type(error).__module__
        )
        return actionable, f"{type(error).__name__}: {message}"
    except Exception as error:  # noqa: BLE001 - anything else is by definition not clear
        return False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return True, "right answer"


def main(argv: list[str] | None = None, cases: tuple[Case, ...] = CASES) -> int:
    """Print one line per case, ``N/M clear`` per section and overall; return the number of cases not clear."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append", help="run only this section")
    parser.add_argument("--race-worker", nargs=2, metavar=("PATH", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.race_worker:
        _race_worker(*args.race_worker)
        return 0
    chosen = [case for case in cases if args.section is None or case.section.split("-")[0] in args.section]
    totals: dict[str, list[int]] = {}
    for case in chosen:
        started = time.perf_counter()
        ok, message = classify(case)
        seconds = time.perf_counter() - started
        total = totals.setdefault(case.section.split("-")[0], [0, 0])
        total[0] += ok
        total[1] += 1
        verdict = "clear" if ok else "NOT clear"
        print(f"[{case.section}] {case.name}: {verdict} ({seconds:.1f} s) - {message[:300]}", flush=True)
    for section, (clear, count) in totals.items():
        print(f"section {section} ({SECTIONS[section]}): {clear}/{count} clear")
    clear = sum(total[0] for total in totals.values())
    print(f"{clear}/{len(chosen)} clear")
    return len(chosen) - clear


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
