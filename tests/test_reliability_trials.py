"""The reliability trials script (benchmarks/reliability_trials.py): one real case per section, and its classifier.

The whole script takes a few minutes; here one fast case of each section runs, so a change that breaks a case's
setup (or turns a clear case unclear) fails the suite, and the classifier is shown to call stale, refused or crashing
outcomes NOT clear.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability_trials.py"


@pytest.fixture(scope="module")
def trials():
    spec = importlib.util.spec_from_file_location("reliability_trials", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def by_name(trials, name: str):
    (case,) = [case for case in trials.CASES if case.name == name]
    return case


def test_every_section_has_cases_with_unique_names(trials):
    names = [case.name for case in trials.CASES]
    assert len(set(names)) == len(names)
    counts = {section: sum(case.section.startswith(section) for case in trials.CASES) for section in trials.SECTIONS}
    assert counts["1"] >= 23 and counts["2"] >= 20 and counts["3"] >= 5 and counts["4"] >= 8 and counts["5"] >= 8


@pytest.mark.parametrize(
    ("name", "outcome"),
    [
        ("a truncated shard (ValueError naming it)", "ValueError: Shard 3 of the cache"),
        ("string inputs", "TypeError: train_set has string inputs"),
        ("damping=0.0 is exactly zero (positive-definite H)", "right answer"),
        ("show_progress passed to the solver", "right answer"),
        ("(g) tf_keras BinaryCrossentropy with [B] targets", "right answer"),
    ],
)
def test_one_case_per_section_is_clear(trials, name, outcome):
    clear, message = trials.classify(by_name(trials, name))
    assert clear, message
    assert message.startswith(outcome), message


def test_a_stale_cache_a_refused_default_and_a_crash_are_not_clear(trials):
    calculator, train = trials._reference_request(None)
    fresh = trials._vectors(calculator, train)
    trials._same_as_fresh(fresh.copy(), calculator, train)  # equal: no error
    with pytest.raises(RuntimeError, match="off by 1"):
        trials._same_as_fresh(fresh + 1.0, calculator, train)
    with pytest.raises(RuntimeError, match="48 vectors returned, a fresh run gives 64"):
        trials._same_as_fresh(fresh[:48], calculator, train)

    def refuses() -> None:
        raise ValueError("pass damping=1.0")

    assert trials.classify(trials.Case("refuses", "test", refuses)) == (True, "ValueError: pass damping=1.0")
    refused_default = trials.Case("refused default", "test", trials._answers(refuses))
    assert trials.classify(refused_default) == (
        False,
        "RuntimeError: refused instead of answering: ValueError: pass damping=1.0",
    )
    crash = trials.Case("a crash", "test", lambda: (_ for _ in ()).throw(RuntimeError("deep inside TF")))
    assert trials.classify(crash) == (False, "RuntimeError: deep inside TF")


def test_main_prints_each_case_and_the_counts_per_section(trials, capsys):
    cases = (
        by_name(trials, "(c) FirstOrderInfluenceCalculator(im, ds, ihvp, 25, 25)"),
        trials.Case("a crash", "5-migration", lambda: (_ for _ in ()).throw(RuntimeError("boom"))),
        by_name(trials, "string inputs"),
    )
    assert trials.main(["--section", "5"], cases) == 1  # one case not clear; section 2 not run
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[5-migration] (c) FirstOrderInfluenceCalculator(im, ds, ihvp, 25, 25): clear (")
    assert lines[1].startswith("[5-migration] a crash: NOT clear (") and lines[1].endswith("RuntimeError: boom")
    assert lines[2:] == ["section 5 (migration): 1/2 clear", "1/2 clear"]
