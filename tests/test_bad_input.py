"""Bad input gets a clear error in every batch (issue 14 §2): ValueError/TypeError naming the batch and the fix."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import classification_data, dataset, small_mlp, sparse_ce

from influenciae import EKFACIHVP, ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel, LissaIHVP
from influenciae.influence.base import _check_finite
from influenciae.model._backend import keras, tf


@pytest.fixture(scope="module")
def calculator():
    model = small_mlp(seed=0)
    x, y = classification_data(num_examples=12)
    im = InfluenceModel(model, loss_function=sparse_ce())
    train = dataset(x, y, batch_size=4)
    return FirstOrderInfluenceCalculator(im, train, ihvp_calculator=ExactIHVP(im, train, damping=1.0))


def good_data(num_examples: int = 12):
    return classification_data(num_examples=num_examples, seed=3)


@pytest.mark.parametrize(
    ("label", "words"), [(7, "sparse labels >= the 3 classes"), (-1, "negative"), (1.5, "fractional")]
)
def test_a_bad_label_after_the_first_batch_names_its_batch(calculator, label, words):
    x, y = good_data()
    y = y.astype("float64")
    y[9] = label
    with pytest.raises(ValueError, match=rf"batch 2 \(examples from index 8 on\) has .*{words}"):
        calculator.self_influence(dataset(x, y, batch_size=4))


@pytest.mark.parametrize("part", ["inputs", "sample weights"])
def test_nan_in_a_later_batch_is_refused(calculator, part):
    x, y = good_data()
    weights = np.ones(12)
    (x[10] if part == "inputs" else weights[10:11])[0] = np.nan
    with pytest.raises(ValueError, match=rf"batch 2 .*non-finite {part}.*NaN/inf"):
        calculator.self_influence(dataset(x, y, batch_size=4, sample_weight=weights))


def test_a_bad_batch_met_while_iterating_a_returned_dataset_is_the_library_value_error(calculator):
    x, y = good_data()
    x[10, 0] = np.nan
    bad = dataset(x, y, batch_size=4)
    # raised inside tf.data's generator, surfaced as the library's ValueError (not an InvalidArgumentError)
    with pytest.raises(ValueError, match=r"train_set: batch 2 .*non-finite inputs"):
        list(calculator.compute_influence_values(bad))
    with pytest.raises(ValueError, match=r"dataset_to_evaluate: batch 2 .*non-finite inputs"):
        list(calculator.top_k(bad, dataset(*good_data(), batch_size=4), k=2))


def test_inf_in_a_test_input_is_refused_not_returned(calculator):
    x, y = good_data()
    x[5, 2] = np.inf
    with pytest.raises(ValueError, match=r"test_set: batch 1 .*non-finite inputs"):
        calculator.influence_matrix(dataset(x, y, batch_size=4), dataset(*good_data(), batch_size=4))


def test_valid_sample_weights_and_a_one_example_set_give_finite_answers(calculator):
    x, y = good_data(1)
    values = calculator.self_influence(dataset(x, y, batch_size=4, sample_weight=np.ones(1)))
    assert values.shape == (1,) and np.isfinite(values).all() and values[0] > 0


def test_string_inputs_are_a_type_error(calculator):
    strings = tf.data.Dataset.from_tensor_slices((["a", "b"], [0, 1])).batch(2)
    with pytest.raises(TypeError, match="string inputs.*StringLookup"):
        calculator.self_influence(strings)


def test_an_infinite_dataset_is_refused(calculator):
    with pytest.raises(ValueError, match=r"infinite.*\.take"):
        calculator.self_influence(dataset(*good_data(), batch_size=4).repeat())


def test_an_empty_test_set_is_refused(calculator):
    x, y = good_data()
    empty = dataset(x, y, batch_size=4).take(0)
    with pytest.raises(ValueError, match="test_set is empty"):
        calculator.most_influential(empty, dataset(x, y, batch_size=4), k=2)


def test_non_finite_results_name_the_examples():
    values = np.array([1.0, np.nan, 2.0, np.inf])
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\), at training example index\(es\) 1, 3.*damping"):
        _check_finite(values, "self_influence", "training")
    np.testing.assert_array_equal(_check_finite(values[[0, 2]], "self_influence", "training"), [1.0, 2.0])


# ---------------------------------------------------------------------- CLI: user mistakes are usage errors (exit 2)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    import keras

    root = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(root / "model.keras")
    rng = np.random.default_rng(0)
    np.savez(root / "train.npz", x=rng.standard_normal((8, 4)).astype("float32"), y=rng.integers(0, 3, 8))
    (root / "a_file").write_text("not a directory")
    return root


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--solver", "cg", "--solver-option", "max_iterations=-5"], "max_iterations=-5: expected a whole number >= 1"),
        (["--solver", "cg", "--solver-option", "tolerance=-1e-3"], "tolerance=-0.001: expected a number >= 0"),
        (["--start-layer", "7"], "--start-layer 7 is not a layer of the model: give an index in [-1, 0]"),
        (["--start-layer", "nope"], "--start-layer nope is not a layer of the model"),
        (["--output", "{root}/a_file/sub"], "a file is in the way"),
    ],
)
def test_cli_user_mistakes_are_usage_errors(saved_model, tmp_path, capsys, flags, message):
    from influenciae import cli

    flags = [flag.format(root=saved_model) for flag in flags]
    output = [] if "--output" in flags else ["--output", str(tmp_path / "out")]
    argv = ["self-influence", "--model", str(saved_model / "model.keras"), "--npz", str(saved_model / "train.npz")]
    code = cli.main([*argv, "--no-progress", *output, *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "usage: influenciae self-influence" in err and "influenciae self-influence: error: --" in err
    assert message in err and "ValueError" not in err


def test_the_reliability_trials_script_classifies_its_input_cases():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "reliability_trials.py"
    spec = importlib.util.spec_from_file_location("reliability_trials", path)
    trials = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = trials  # dataclasses look their module up
    spec.loader.exec_module(trials)
    by_name = {case.name: case for case in trials.CASES}
    assert len(by_name) == len(trials.CASES) >= 15
    for name in ("label >= classes in batch 3", "inf in a test input", "one-example training set (valid)"):
        clear, message = trials.classify(by_name[name])
        assert clear, message
    not_clear = trials.Case("a crash", "test", lambda: (_ for _ in ()).throw(RuntimeError("deep inside TF")))
    assert trials.classify(not_clear) == (False, "RuntimeError: deep inside TF")
    vague = trials.Case("vague", "test", lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert trials.classify(vague) == (False, "ValueError: bad")


# ---------------------------------------------------------------------- test set only, disk cache, check_batches


def test_a_bad_label_only_in_the_test_set_is_refused(calculator):
    x, y = good_data()
    y[6] = 3  # classes 0..2: only the test set is wrong
    with pytest.raises(ValueError, match=r"test_set: batch 1 \(examples from index 4 on\) has sparse labels >= the 3"):
        calculator.most_influential(dataset(x, y, batch_size=4), dataset(*good_data(), batch_size=4), k=2)


def test_the_disk_cache_pass_checks_every_batch(calculator, tmp_path):
    x, y = good_data()
    y[11] = -2
    with pytest.raises(ValueError, match=r"train_set: batch 2 .*negative sparse labels"):
        calculator.compute_influence_vector(dataset(x, y, batch_size=4), str(tmp_path / "cache"))


def test_check_batches_reads_the_whole_dataset(calculator):
    x, y = good_data()
    calculator.check_batches(dataset(x, y, batch_size=4), name="dataset")  # clean data: no error
    x[11, 0] = np.inf
    with pytest.raises(ValueError, match=r"dataset: batch 2 \(examples from index 8 on\) has non-finite inputs"):
        calculator.check_batches(dataset(x, y, batch_size=4), name="dataset")


def test_the_checks_change_nothing_on_valid_data(calculator):
    """Same values as the unchecked per-batch hook; weights 2 double each loss, so self-influence quadruples."""
    x, y = good_data()
    expected = np.concatenate([calculator._self_influence(batch).numpy() for batch in dataset(x, y, batch_size=4)])
    assert np.all(expected > 0)  # damped positive-definite Hessian
    np.testing.assert_allclose(calculator.self_influence(dataset(x, y, batch_size=4)), expected, rtol=1e-10)
    weighted = calculator.self_influence(dataset(x, y, batch_size=4, sample_weight=np.full(12, 2.0)))
    np.testing.assert_allclose(weighted, 4 * expected, rtol=1e-8)


def test_other_tensorflow_errors_pass_through():
    """Only the library's own assertions become ValueErrors; an unrelated InvalidArgumentError is left as it is."""
    from influenciae.data import checked_iteration, with_checks, with_indices

    x, y = good_data()
    x[1, 0] = np.nan
    with pytest.raises(ValueError, match="data: batch 0 .*non-finite inputs"):
        list(checked_iteration(with_indices(with_checks(dataset(x, y, batch_size=4))), name="data"))

    def user_check(inputs, targets):
        with tf.control_dependencies(
            [tf.debugging.assert_less(inputs, tf.cast(-100.0, inputs.dtype), message="user assertion")]
        ):
            return tf.identity(inputs), targets

    other = dataset(*good_data(), batch_size=4).map(user_check)
    with pytest.raises(tf.errors.InvalidArgumentError, match="user assertion"):
        list(checked_iteration(with_indices(other), name="data"))


def test_score_output_under_a_file_is_a_usage_error(tmp_path, capsys):
    from influenciae import cli

    (tmp_path / "a_file").write_text("x")
    argv = ["score", "--model", "m.keras", "--train", "t*.tfrecord", "--state", "s.npz", "--output"]
    assert cli.main([*argv, str(tmp_path / "a_file" / "out")]) == 2
    err = capsys.readouterr().err
    assert "usage: influenciae score" in err and "a_file is a file" in err and "give a directory" in err


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda im, ds: ExactIHVP(im, ds, damping=1.0).solve(tf.ones([1, im.nb_params])), id="exact"),
        pytest.param(
            lambda im, ds: FirstOrderInfluenceCalculator(
                im, ds, "cg", damping=1.0, curvature="ggn", ihvp_options={"max_iterations": 2}
            ).self_influence(dataset(*good_data(), batch_size=4)),
            id="cg-ggn",
        ),
        pytest.param(lambda im, ds: EKFACIHVP(im, ds, damping=1.0).solve(tf.ones([1, im.nb_params])), id="ekfac"),
        pytest.param(
            lambda im, ds: LissaIHVP(im, ds, damping=1.0, depth=3, scale=10.0, batches_per_step=1).solve(
                tf.ones([1, im.nb_params])
            ),
            id="stochastic-lissa",
        ),
    ],
)
@pytest.mark.parametrize(("label", "words"), [(7, "sparse labels >= the 3 classes"), (np.nan, "non-finite targets")])
def test_a_bad_batch_in_the_dataset_a_curvature_is_built_on_names_its_batch(build, label, words):
    """Solvers read the Hessian dataset themselves (in the constructor or on the first solve): same checks there."""
    im = InfluenceModel(small_mlp(seed=0), loss_function=sparse_ce())
    x, y = good_data()
    y = y.astype("float64")
    y[9] = label
    with pytest.raises(ValueError, match=rf"dataset: batch \d \(examples from index \d+ on\) has {words}"):
        build(im, dataset(x, y, batch_size=4))


def test_a_multi_output_model_is_told_how_to_give_one_loss_per_example():
    keras.utils.set_random_seed(0)
    x, y = good_data(8)
    x = x.astype("float32")
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(1)(inputs)])
    wrong = InfluenceModel(model, loss_function=keras.losses.SparseCategoricalCrossentropy(reduction="none"))
    with pytest.raises(ValueError, match=r"2 outputs .*callable \(targets, outputs\) -> \[B\].*model.outputs\[0\]"):
        wrong.batch_loss(next(iter(dataset(x, y, batch_size=4))))

    sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def combined(targets, outputs):  # the advice works: one loss value per example from both outputs
        return sparse(targets[0], outputs[0]) + tf.reduce_mean(tf.square(outputs[1] - targets[1]), axis=-1)

    right = InfluenceModel(model, loss_function=combined)
    pairs = tf.data.Dataset.from_tensor_slices((x, (y, x[:, :1]))).batch(4)
    calculator = FirstOrderInfluenceCalculator(right, pairs, ihvp_calculator=ExactIHVP(right, pairs, damping=1.0))
    values = calculator.self_influence(pairs)
    assert values.shape == (8,) and np.isfinite(values).all() and (values > 0).all()
