"""Reliability trials (issue 14): run each bad-input / bad-setting case and say whether its outcome is clear.

A case is *clear* when the call raises a ``ValueError``/``TypeError`` whose message says what to do, or gives the
right answer for valid input. Everything else (a crash from deep inside TensorFlow, a silent non-finite result, a
hang) is *NOT clear*. One line per case, then ``N/M clear``.

Run: ``.venv/bin/python benchmarks/reliability_trials.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from influenciae import ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel  # noqa: E402
from influenciae._backend import tf  # noqa: E402
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


def _with(
    edit: Callable[[np.ndarray, np.ndarray, np.ndarray], None], method: str = "self_influence"
) -> Callable[[], None]:
    def run() -> None:
        model, x, y = _problem()
        calculator = _calculator(model, x.copy(), y.copy())
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


CASES: tuple[Case, ...] = (
    Case("label >= classes in batch 3", "2-input", _with(_set("y", 9, 7.0))),
    Case("negative label in batch 3", "2-input", _with(_set("y", 9, -1.0))),
    Case("fractional sparse label", "2-input", _with(_set("y", 5, 1.5))),
    Case("NaN input in a later batch", "2-input", _with(_set("x", (10, 0), np.nan))),
    Case("NaN label in a later batch", "2-input", _with(_set("y", 10, np.nan))),
    Case("inf sample weight in a later batch", "2-input", _with(_set("w", 10, np.inf))),
    Case("inf in a test input", "2-input", _with(_set("x", (5, 2), np.inf), method="influence_matrix")),
    Case("label >= classes in the Hessian set's batch 3", "2-input", _bad_hessian_set(_set("y", 9, 7.0))),
    Case("NaN input in the Hessian set's batch 3", "2-input", _bad_hessian_set(_set("x", (10, 0), np.nan))),
    Case("string inputs", "2-input", _strings),
    Case("infinite (.repeat()) dataset", "2-input", _repeat),
    Case("empty test set", "2-input", _empty_test),
    Case("one-example training set (valid)", "2-input", _one_example),
    Case("sample weights as a third element (valid)", "2-input", _with(lambda x, y, w: None)),
    Case("multi-output model", "2-input", _multi_output),
    Case("float16 model", "2-numerics", _float16),
    Case("FirstOrderInfluenceCalculator(im, ds, ihvp, 25, 25)", "5-migration", _positional_migration),
)


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


def main(cases: tuple[Case, ...] = CASES) -> int:
    """Print one line per case and ``N/M clear``; return the number of cases that are not clear."""
    clear = 0
    for case in cases:
        ok, message = classify(case)
        clear += ok
        print(f"[{case.section}] {case.name}: {'clear' if ok else 'NOT clear'} - {message[:300]}", flush=True)
    print(f"{clear}/{len(cases)} clear")
    return len(cases) - clear


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
