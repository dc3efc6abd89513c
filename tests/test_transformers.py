"""Transformer-style models through every influence path, each in its own process (a TF abort must not kill pytest).

``tests/transformer_cases.py`` runs one model per subprocess and prints its results; these tests assert the exit code
(an interpreter abort is 134/139), finite scores, per-sample gradients equal to a per-example GradientTape loop, and
that tokens under a padding mask change nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

CASES_SCRIPT = os.path.join(os.path.dirname(__file__), "transformer_cases.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_CASES = {"bert", "gpt2", "resnet"}
# every path must run; only these may refuse cleanly with a ValueError on some models
OPTIONAL = {"lissa", "ekfac", "tracincp_fast", "tracincp_fast_randproj", "representer_l2"}


def run_case(name: str) -> dict:
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    completed = subprocess.run(
        [sys.executable, CASES_SCRIPT, name], capture_output=True, text=True, timeout=900, env=environment, cwd=ROOT
    )
    assert completed.returncode == 0, (
        f"case {name} exited with {completed.returncode} (134/139 = the interpreter aborted)\n"
        f"{completed.stderr[-4000:]}"
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, completed.stdout[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mha", "dict_mask", "cnn", "bert", "gpt2", "resnet"])
def test_transformer_case_runs_every_path(name: str) -> None:
    if name in HUB_CASES and importlib.util.find_spec("keras_hub") is None:
        pytest.skip("keras_hub is not installed (pip install 'influenciae[hub]')")
    results = run_case(name)
    paths = results["paths"]
    for path, entry in paths.items():
        status = entry["status"]
        assert not status.startswith("error"), f"{name}/{path}: {status}"
        if status.startswith("unsupported"):
            assert path in OPTIONAL, f"{name}/{path} refused: {status}"
            continue
        assert entry.get("finite", True), f"{name}/{path} returned non-finite values"
    gradients = paths["gradients"]
    assert gradients["status"] == "ok"
    assert gradients["max_error"] < 1e-5, gradients
    if "padding_invariance_error" in gradients:
        assert gradients["padding_invariance_error"] < 1e-5, gradients
    hvp = paths["hvp"]
    assert hvp["status"] == "ok"
    assert hvp["batching_error"] < 1e-4 and hvp["symmetry_error"] < 1e-3, hvp
    for required in ("cg_ggn", "arnoldi", "tracin", "tracincp"):
        assert paths[required]["status"] == "ok", (required, paths[required])


@pytest.mark.slow
def test_unknown_case_is_refused() -> None:
    completed = subprocess.run([sys.executable, CASES_SCRIPT, "nope"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "usage" in completed.stderr
