"""`influenciae self-influence` and `influenciae top-k`: scores equal the library's, every input format agrees, errors.

Models and data are made here (small synthetic tabular data, a few scikit-learn digits, tfds mock data); the commands
run in-process through ``influenciae.cli.main`` and once as a real ``python -m influenciae.cli`` subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from influenciae import FirstOrderInfluenceCalculator, InfluenceModel, cli
from influenciae.app import io, plots, report
from influenciae.data import from_numpy
from influenciae.model._backend import keras

NUM_TRAIN, NUM_TEST, NUM_FEATURES, NUM_CLASSES = 40, 6, 5, 3
DAMPING = 1e-3  # the commands' default


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def _tabular_arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_TRAIN + NUM_TEST, NUM_FEATURES)).astype("float32")
    y = ((x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 0.8)).astype("int64")
    y[[3, 11]] = (y[[3, 11]] + 1) % NUM_CLASSES  # two flipped labels
    return x, y


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """A trained 5-6-3 tanh MLP saved as .keras, compiled with a from-logits sparse cross-entropy, and its data."""
    root = tmp_path_factory.mktemp("tabular")
    x, y = _tabular_arrays()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((NUM_FEATURES,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(NUM_CLASSES)]
    )
    model.compile(keras.optimizers.Adam(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:NUM_TRAIN], y[:NUM_TRAIN], epochs=30, batch_size=16, verbose=0)
    model.save(root / "model.keras")
    np.savez(root / "train.npz", x=x[:NUM_TRAIN], y=y[:NUM_TRAIN])
    np.savez(root / "test.npz", x=x[NUM_TRAIN:], y=y[NUM_TRAIN:])
    return {
        "root": root,
        "model_path": str(root / "model.keras"),
        "train": str(root / "train.npz"),
        "test": str(root / "test.npz"),
        "x": x[:NUM_TRAIN],
        "y": y[:NUM_TRAIN],
        "x_test": x[NUM_TRAIN:],
        "y_test": y[NUM_TRAIN:],
        "model": keras.models.load_model(root / "model.keras"),
    }


def main(argv):
    return cli.main([str(a) for a in argv])


def run(argv, capsys=None):
    code = main(argv)
    captured = capsys.readouterr() if capsys is not None else None
    return code, captured


def read_csv(path):
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        return reader.fieldnames, list(reader)


def csv_scores(path):
    return np.array([float(row["score"]) for row in read_csv(path)[1]])


def self_influence_command(data, output, *extra):
    return ["self-influence", "--model", data["model_path"], "--npz", data["train"], "--output", output,
            "--no-progress", *extra]  # fmt: skip


def api_first_order(model, x, y, *, batch_size=64, **options):
    im = InfluenceModel(model, start_layer=-1, loss_function=_loss())
    train = from_numpy(x, y, batch_size=batch_size)
    return FirstOrderInfluenceCalculator(im, train, "exact", damping=DAMPING, **options), train


# ---------------------------------------------------------------------- self-influence


@pytest.fixture(scope="module")
def npz_run(tabular, tmp_path_factory):
    output = tmp_path_factory.mktemp("si-npz")
    assert main(self_influence_command(tabular, output, "-k", "7")) == 0
    return output


@pytest.mark.slow
def test_self_influence_csv_equals_the_api(tabular, npz_run):
    columns, rows = read_csv(npz_run / "self_influence.csv")
    assert columns == ["index", "score", "label", "predicted", "loss", "rank"]
    assert [int(r["index"]) for r in rows] == list(range(NUM_TRAIN))
    calculator, train = api_first_order(tabular["model"], tabular["x"], tabular["y"])
    expected = calculator.self_influence(train)
    np.testing.assert_allclose(csv_scores(npz_run / "self_influence.csv"), expected, rtol=1e-6)
    assert np.all(expected > 0)  # the damped Hessian of the last layer is positive definite
    logits = np.asarray(tabular["model"](tabular["x"]))
    assert [int(r["predicted"]) for r in rows] == list(np.argmax(logits, axis=1))
    assert [int(r["label"]) for r in rows] == list(tabular["y"])
    losses = calculator.model.batch_loss((tabular["x"], tabular["y"])).numpy()
    np.testing.assert_allclose([float(r["loss"]) for r in rows], losses, rtol=1e-5)
    ranks = np.array([int(r["rank"]) for r in rows])
    assert sorted(ranks) == list(range(1, NUM_TRAIN + 1))
    np.testing.assert_array_equal(np.argsort(ranks), np.argsort(-expected, kind="stable"))


@pytest.mark.slow
def test_self_influence_metrics_and_report(npz_run):
    metrics = json.loads((npz_run / "metrics.json").read_text())
    assert metrics["model"]["num_watched_params"] == 6 * NUM_CLASSES + NUM_CLASSES  # the last Dense layer
    assert metrics["model"]["loss"] == "sparse_categorical_crossentropy (compiled)"
    assert metrics["model"]["from_logits"] is True
    assert metrics["method"]["solver"] == "exact" and metrics["method"]["damping"] == DAMPING
    assert metrics["method"]["start_layer"] == -1
    scores = csv_scores(npz_run / "self_influence.csv")
    assert metrics["ranking"]["indices"] == [int(i) for i in np.argsort(-scores, kind="stable")[:7]]
    assert metrics["summary"]["max"] == pytest.approx(scores.max())
    assert set(metrics["timings_seconds"]) >= {"loading", "setup", "self_influence", "report", "total"}
    assert set(metrics["files"]) == {"self_influence.csv", "report.html", "score_histogram.png", "metrics.json"}
    page = (npz_run / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1  # the histogram; tabular rows are a table, not images
    assert "<script" not in page and 'src="http' not in page
    assert "x[4]" in page and "x[5]" not in page  # the 5 feature values of each ranked example
    top = metrics["ranking"]["indices"][0]
    assert f"<td>{top}</td>" in page


# ---------------------------------------------------------------------- other methods agree with their API


def _api_scores(method, model, x, y):
    import influenciae

    train = from_numpy(x, y, batch_size=64)
    im = InfluenceModel(model, start_layer=-1, loss_function=_loss())
    calculators = {
        "tracin": lambda: influenciae.TracIn([im], 0.5),
        "arnoldi": lambda: influenciae.ArnoldiInfluenceCalculator(im, train, 8, True, 5, damping=DAMPING),
        "relatif": lambda: FirstOrderInfluenceCalculator(
            im, train, "cg", normalize=True, damping=DAMPING, ihvp_options={"tolerance": 1e-4}
        ),
        "representer": lambda: influenciae.RepresenterPointL2(model, train, _loss(), 0.01),
        "similarity": lambda: influenciae.SimilarityInfluence(model, 0, similarity="dot"),
    }
    return calculators[method]().self_influence(train)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "flags"),
    [
        ("tracin", ["--learning-rate", "0.5"]),
        ("arnoldi", ["--subspace-dim", "8", "--rank", "5"]),
        ("relatif", ["--solver", "cg", "--solver-option", "tolerance=1e-4"]),
        ("representer", ["--l2", "0.01"]),
        ("similarity", ["--layer", "0", "--similarity", "dot"]),
    ],
)
def test_other_methods_equal_their_api(tabular, tmp_path, method, flags):
    assert main(self_influence_command(tabular, tmp_path, "--method", method, *flags)) == 0
    expected = _api_scores(method, tabular["model"], tabular["x"], tabular["y"])
    np.testing.assert_allclose(csv_scores(tmp_path / "self_influence.csv"), expected, rtol=1e-5, atol=1e-7)
    assert json.loads((tmp_path / "metrics.json").read_text())["method"]["name"] == method


# ---------------------------------------------------------------------- the other input formats


@pytest.mark.slow
def test_tfrecords_give_the_npz_scores(tabular, npz_run, tmp_path):
    x, y = tabular["x"], tabular["y"]
    io.write_tfrecords(tmp_path / "records" / "train-0.tfrecord", x[:25], y[:25])  # two shards, read in sorted order
    io.write_tfrecords(tmp_path / "records" / "train-1.tfrecord", x[25:], y[25:])
    output = tmp_path / "out"
    argv = ["self-influence", "--model", tabular["model_path"], "--tfrecords", str(tmp_path / "records" / "*.tfrecord"),
            "--output", str(output), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    np.testing.assert_array_equal(csv_scores(output / "self_influence.csv"), csv_scores(npz_run / "self_influence.csv"))
    assert read_csv(output / "self_influence.csv")[1] == read_csv(npz_run / "self_influence.csv")[1]


@pytest.mark.slow
def test_tfds_mock_data_gives_the_npz_scores(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])  # iris: 4 features, 3 classes
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(tmp_path / "iris.keras")
    with tfds.testing.mock_data(num_examples=30):
        # the mock generates the same examples on every load, so the npz holds exactly what the command reads
        arrays = list(tfds.as_numpy(tfds.load("iris", split="train", as_supervised=True, data_dir=str(tmp_path))))
        x = np.stack([a for a, _ in arrays])
        y = np.array([b for _, b in arrays])
        np.savez(tmp_path / "iris.npz", x=x, y=y)
        common = ["--model", tmp_path / "iris.keras", "--no-progress", "--batch-size", "8"]
        assert main(["self-influence", "--tfds", "iris", "--data-dir", tmp_path, "--output", tmp_path / "a",
                         *common]) == 0  # fmt: skip
    assert main(["self-influence", "--npz", tmp_path / "iris.npz", "--output", tmp_path / "b", *common]) == 0
    from_tfds = read_csv(tmp_path / "a" / "self_influence.csv")[1]
    assert len(from_tfds) == 30
    assert from_tfds == read_csv(tmp_path / "b" / "self_influence.csv")[1]
    calculator, train = api_first_order(model, x, y, batch_size=8)
    expected = calculator.self_influence(train)
    np.testing.assert_allclose(csv_scores(tmp_path / "a" / "self_influence.csv"), expected, rtol=1e-5)
    assert "tfds iris[train]" in json.loads((tmp_path / "a" / "metrics.json").read_text())["train_data"]["source"]


def test_tfrecords_round_trip_and_numeric_features(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, size=(7, 4, 4, 1)).astype("uint8")
    y = rng.integers(0, 10, size=7)
    w = rng.random(7).astype("float32")
    io.write_tfrecords(tmp_path / "a.tfrecord", x, y, w)
    batches = list(io.load_tfrecords(str(tmp_path / "a.tfrecord"), weight_key="sample_weight", batch_size=3))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)  # dtype and shape kept
    assert batches[0][0].dtype.name == "uint8"
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), w)
    # plain tf.train.Example numeric lists, reshaped by x_shape
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as writer:
        for image, label in zip(x, y, strict=True):
            feature = {
                "pixels": tf.train.Feature(float_list=tf.train.FloatList(value=image.reshape(-1).astype(float))),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    (inputs, labels), = io.load_tfrecords(str(tmp_path / "b.tfrecord"), x_key="pixels", y_key="label",
                                          x_shape=(4, 4, 1), batch_size=10)  # fmt: skip
    np.testing.assert_array_equal(inputs, x.astype("float32"))
    np.testing.assert_array_equal(labels, y)
    with pytest.raises(io.InputError, match=r"have no feature 'image' \(they have label, pixels\)"):
        io.load_tfrecords(str(tmp_path / "b.tfrecord"), x_key="image", y_key="label")
    with pytest.raises(io.InputError, match="does not fit the 16 values"):
        io.load_tfrecords(str(tmp_path / "b.tfrecord"), x_key="pixels", y_key="label", x_shape=(3, 3))


# ---------------------------------------------------------------------- top-k


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small CNN on 8×8 digits: images, so the report draws them."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    x = (data.images[:70] / 16.0).astype("float32")[..., None]
    y = data.target[:70].astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, activation="relu"), keras.layers.Flatten(),
         keras.layers.Dense(10)]
    )  # fmt: skip
    model.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:60], y[:60], epochs=15, verbose=0)
    model.save(root / "model.keras")
    np.savez(root / "train.npz", x=x[:60], y=y[:60])
    np.savez(root / "test.npz", x=x[60:], y=y[60:])
    output = root / "out"
    argv = ["top-k", "--model", root / "model.keras", "--npz", root / "train.npz", "--test-npz", root / "test.npz",
            "-k", "4", "--report-examples", "3", "--output", output, "--no-progress",
            "--cache-dir", root / "cache"]  # fmt: skip
    assert main(argv) == 0
    return {"root": root, "model": keras.models.load_model(root / "model.keras"), "x": x, "y": y, "output": output}


@pytest.mark.slow
def test_top_k_csv_equals_the_influence_matrix(digits):
    columns, rows = read_csv(digits["output"] / "top_k.csv")
    assert columns == ["test_index", "rank", "kind", "train_index", "score"]
    assert len(rows) == 10 * 2 * 4
    x, y = digits["x"], digits["y"]
    calculator, train = api_first_order(digits["model"], x[:60], y[:60])
    matrix = calculator.influence_matrix(from_numpy(x[60:], y[60:], batch_size=64), train)
    for test_index in range(10):
        for kind, sign in (("proponent", -1.0), ("opponent", 1.0)):
            chosen = [r for r in rows if int(r["test_index"]) == test_index and r["kind"] == kind]
            assert [int(r["rank"]) for r in chosen] == [1, 2, 3, 4]
            expected = np.argsort(sign * matrix[test_index], kind="stable")[:4]
            assert [int(r["train_index"]) for r in chosen] == list(expected)
            np.testing.assert_allclose([float(r["score"]) for r in chosen], matrix[test_index, expected], rtol=1e-5)


@pytest.mark.slow
def test_top_k_report_draws_images_and_the_cache_is_reused(digits, capsys):
    output = digits["output"]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["test_data"]["num_examples"] == 10 and metrics["top_k"]["rows"] == 80
    assert set(metrics["files"]) == {"top_k.csv", "report.html", "top_k.png", "metrics.json"}
    page = (output / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1 and page.count("<h3>Test example #") == 3
    assert (output / "top_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((digits["root"] / "cache").iterdir())
    # one order only, reusing the cached influence vectors: the same opponents
    again = digits["root"] / "again"
    argv = ["top-k", "--model", digits["root"] / "model.keras", "--npz", digits["root"] / "train.npz", "--test-npz",
            digits["root"] / "test.npz", "-k", "4", "--order", "ascending", "--output", again, "--no-progress",
            "--cache-dir", digits["root"] / "cache"]  # fmt: skip
    assert run(argv, capsys)[0] == 0
    first = [r for r in read_csv(output / "top_k.csv")[1] if r["kind"] == "opponent"]
    assert read_csv(again / "top_k.csv")[1] == first


# ---------------------------------------------------------------------- errors and exit codes


@pytest.fixture(scope="module")
def ten_logits(tmp_path_factory):
    """A 10-logit classifier, a single-output model without a compiled loss, and labels up to 12."""
    root = tmp_path_factory.mktemp("mismatch")
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(10)])
    classifier.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.save(root / "ten.keras")
    keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(1)]).save(root / "regression.keras")
    x = np.random.default_rng(0).normal(size=(20, NUM_FEATURES)).astype("float32")
    labels = np.arange(20) % 13  # 0..12
    np.savez(root / "up_to_12.npz", x=x, y=labels)
    np.savez(root / "fine.npz", x=x, y=labels % 10)
    return root


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_labels_beyond_the_outputs_exit_1_with_one_line(ten_logits, tmp_path, capsys):
    argv = ["self-influence", "--model", ten_logits / "ten.keras", "--npz", ten_logits / "up_to_12.npz", "--output",
            tmp_path, "--no-progress"]  # fmt: skip
    code, captured = run(argv, capsys)
    assert code == 1
    line = _one_error_line(captured.err)
    assert line.startswith("influenciae self-influence: error: the model's outputs do not fit the labels")
    assert "training example 10 has label 10" in line and "labels go up to 12" in line and "10 outputs" in line
    assert not (tmp_path / "self_influence.csv").exists()


@pytest.mark.parametrize(
    ("model", "flags", "message"),
    [
        ("regression.keras", ["--loss", "sparse_categorical_crossentropy"], "1 output per example"),
        ("regression.keras", [], "saved without a compiled loss"),
        ("ten.keras", ["--loss", "mse"], "10 outputs per example but the training targets have 1 value"),
        ("ten.keras", ["--loss", "categorical_crossentropy"], "targets are class indices"),
        ("ten.keras", ["--loss", "binary_crossentropy"], "10 outputs per example"),
        (
            "regression.keras",
            ["--loss", "binary_crossentropy"],
            "needs targets in [0, 1], but training example 2 has 2",
        ),
    ],
)
def test_models_whose_outputs_do_not_fit_the_targets_exit_1(ten_logits, tmp_path, capsys, model, flags, message):
    argv = ["self-influence", "--model", ten_logits / model, "--npz", ten_logits / "fine.npz", "--output", tmp_path,
            "--no-progress", *flags]  # fmt: skip
    code, captured = run(argv, capsys)
    assert code == 1
    assert message in _one_error_line(captured.err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{root}/missing.keras", "--npz", "{root}/fine.npz"], "model file not found: {root}/missing.keras"),
        (["--model", "{root}/ten.keras", "--npz", "{root}/nope.npz"], "training data file not found: {root}/nope.npz"),
        (["--model", "{root}/ten.keras", "--tfrecords", "{root}/*.tfrecord"], "no TFRecord file matches {root}/*.tfr"),
        (["--model", "{root}/fine.npz", "--npz", "{root}/fine.npz"], "is not a saved Keras model"),
        (["--model", "{root}/ten.keras", "--npz", "{root}/fine.npz", "--x-key", "inputs"], "has no array 'inputs'"),
        (
            ["--model", "{root}/ten.keras", "--tfds", "surely_not_a_dataset", "--data-dir", "{root}"],
            "could not load tfds dataset 'surely_not_a_dataset'",
        ),
    ],
)
def test_missing_or_unreadable_inputs_exit_1_naming_them(ten_logits, tmp_path, capsys, argv, message):
    argv = [a.format(root=ten_logits) for a in argv]
    code, captured = run(["self-influence", *argv, "--output", tmp_path / "out", "--no-progress"], capsys)
    assert code == 1
    assert message.format(root=ten_logits) in _one_error_line(captured.err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "newton"], "invalid choice: 'newton' (choose from"),
        (["--solver", "newton"], "argument --solver: invalid choice"),
        (["--damping", "-1"], "expected a finite non-negative number"),
        (["--damping", "nan"], "expected a finite non-negative number"),
        (["-k", "0"], "expected an integer >= 1"),
        (["--batch-size", "ten"], "expected an integer >= 1"),
        (["--l2", "0.1"], "--l2 applies to --method representer, not first_order"),
        (["--method", "tracin", "--solver", "cg"], "--solver applies to --method first_order or relatif"),
        (["--from-logits"], "--from-logits goes with --loss"),
        (["--solver", "cg", "--solver-option", "tol=1"], "--solver-option tol is not an option of the cg solver"),
        (["--solver-option", "tolerance"], "expected KEY=VALUE"),
        (["--npz", "{root}/fine.npz"], "not allowed with argument"),
    ],
)
def test_usage_errors_exit_2(ten_logits, tmp_path, capsys, argv, message):
    base = [
        "self-influence",
        "--model",
        ten_logits / "ten.keras",
        "--tfrecords",
        ten_logits / "x",
        "--output",
        tmp_path,
    ]
    code, captured = run([*base, *(str(a).format(root=ten_logits) for a in argv)], capsys)
    assert code == 2
    assert "usage: influenciae self-influence" in captured.err
    assert message in captured.err
    if "newton" in argv and "--method" in argv:
        assert all(name in captured.err for name in cli.METHODS)  # the error lists the known methods


def test_top_k_usage_errors_exit_2(ten_logits, tmp_path, capsys):
    base = ["top-k", "--model", ten_logits / "ten.keras", "--npz", ten_logits / "fine.npz", "--output", tmp_path,
            "--no-progress"]  # fmt: skip
    code, captured = run([*base, "--method", "sample_boundary", "--test-npz", ten_logits / "fine.npz"], capsys)
    assert code == 2 and "invalid choice: 'sample_boundary'" in captured.err
    code, captured = run(base, capsys)
    assert code == 2 and "top-k needs test data" in captured.err
    code, captured = run([*base, "--test-npz", ten_logits / "fine.npz", "-k", "21"], capsys)
    assert code == 2 and "-k 21 is larger than the 20 training examples" in captured.err
    code, captured = run([*base, "--test-npz", ten_logits / "missing.npz"], capsys)
    assert code == 1 and f"test data file not found: {ten_logits / 'missing.npz'}" in _one_error_line(captured.err)


def test_help_lists_the_methods_and_exits_0(capsys):
    assert main(["self-influence", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--npz", "--tfrecords", "--tfds", "--data-dir", "--method", "--solver", "--damping", "--start-layer"):
        assert flag in out
    for name, method in cli.METHODS.items():
        assert name in out
        assert callable(method.build)
    assert main(["top-k", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--test-npz" in out and "--cache-dir" in out and "sample_boundary" not in out


@pytest.mark.slow
def test_python_dash_m_self_influence_subprocess(tabular, npz_run, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "influenciae.cli", *self_influence_command(tabular, tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr
    assert "Self-influence of 40 training examples" in result.stdout
    assert read_csv(tmp_path / "out" / "self_influence.csv") == read_csv(npz_run / "self_influence.csv")


# ---------------------------------------------------------------------- regression targets and report helpers


@pytest.mark.slow
def test_regression_targets_are_reshaped_like_keras_fit(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 3)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=30)).astype("float32")  # [N], the model outputs [N, 1]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(x, y, epochs=20, verbose=0)
    model.save(tmp_path / "regression.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    argv = ["self-influence", "--model", tmp_path / "regression.keras", "--npz", tmp_path / "data.npz", "--output",
            tmp_path / "out", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rows = read_csv(tmp_path / "out" / "self_influence.csv")[1]
    np.testing.assert_allclose([float(r["label"]) for r in rows], y, rtol=1e-6)
    np.testing.assert_allclose([float(r["predicted"]) for r in rows], np.asarray(model(x))[:, 0], rtol=1e-5)
    im = InfluenceModel(model, start_layer=-1, loss_function=keras.losses.MeanSquaredError(reduction="none"))
    train = from_numpy(x, y[:, None], batch_size=64)
    expected = FirstOrderInfluenceCalculator(im, train, "exact", damping=DAMPING).self_influence(train)
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, rtol=1e-5)


def test_report_helpers():
    table = report.html_table(["a", "<b>"], [[1.23456789, True], ["<i>", np.float32(2.5)]], ["flipped", ""])
    assert "<th>&lt;b&gt;</th>" in table and "<td>1.235</td>" in table and "<td>yes</td>" in table
    assert '<tr class="flipped">' in table and "&lt;i&gt;" in table and "<td>2.5</td>" in table
    wide = report.feature_table(["index"], [[0], [1]], np.arange(40).reshape(2, 20), max_features=3)
    assert "x[2]" in wide and "x[3]" not in wide and "+17 more" in wide
    assert report.is_image_batch(np.zeros((2, 8, 8, 1))) and report.is_image_batch(np.zeros((2, 28, 28)))
    assert not report.is_image_batch(np.zeros((2, 64))) and not report.is_image_batch(np.zeros((2, 8, 8, 7)))
    assert report.csv_value(0.1) == "0.1" and report.csv_value(np.float32(0.5)) == "0.5"
    figure = plots.plot_score_histogram(np.r_[np.arange(10.0), np.nan], highlighted={"top 2": [8.0, 9.0]})
    assert "1 non-finite left out" in figure.axes[0].get_title()
    plots.save_figure(figure, os.devnull, dpi=20)
    with pytest.raises(ValueError, match="finite"):
        plots.plot_score_histogram([np.nan])


def test_loss_resolution_and_scan_checks(ten_logits):
    model = io.load_model(ten_logits / "ten.keras")
    compiled = io.resolve_loss(model, None)
    assert (compiled.name, compiled.kind, compiled.from_logits, compiled.compiled) == (
        "sparse_categorical_crossentropy",
        "sparse",
        True,
        True,
    )
    named = io.resolve_loss(model, "binary_crossentropy", from_logits=True)
    assert named.kind == "binary" and named.from_logits and not named.compiled
    data = np.load(ten_logits / "fine.npz")
    dataset = io.load_npz(ten_logits / "fine.npz", batch_size=7)
    scan = io.scan_dataset(model, dataset, compiled)
    logits = np.asarray(model(data["x"]))
    np.testing.assert_array_equal(scan.predicted, np.argmax(logits, axis=1))
    np.testing.assert_array_equal(scan.labels, data["y"])
    expected = _loss()(data["y"], logits).numpy()
    np.testing.assert_allclose(scan.losses, expected, rtol=1e-6)
    assert scan.num_outputs == 10 and scan.num_examples == 20
    weighted = io.load_npz(ten_logits / "fine.npz", batch_size=7, limit=5)
    assert sum(len(b[0]) for b in weighted) == 5
    assert io.gather_inputs(dataset, [13, 2]).tolist() == data["x"][[13, 2]].tolist()


def test_a_refused_cache_tells_a_cli_user_what_to_do(capsys, monkeypatch):
    """The library's cache hint names overwrite=True, which the command line lacks: the CLI names --cache-dir."""
    from influenciae import cache, cli

    assert cli._OVERWRITE_HINT == cache._OVERWRITE_HINT

    def refuse(args):
        raise ValueError(f"The cache at /somewhere was built with other settings: x; {cache._OVERWRITE_HINT}.")

    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    monkeypatch.setattr(cli, "build_parser", lambda: _FixedParser(args, refuse))
    assert cli.main(["demo"]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "overwrite=True" not in err and "delete the --cache-dir directory" in err and "another --cache-dir" in err


class _FixedParser:
    def __init__(self, args, run):
        args.run = run
        args.traceback = False
        self.args = args

    def parse_args(self, argv):
        return self.args
