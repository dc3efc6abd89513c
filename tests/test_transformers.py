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
OPTIONAL = {"lissa", "tracincp_fast", "tracincp_fast_randproj", "representer_l2"}


def run_cases(names: list[str]) -> dict[str, dict]:
    """Run ``names`` in one subprocess (TensorFlow and KerasHub imported once) and return their results by name."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    completed = subprocess.run(
        [sys.executable, CASES_SCRIPT, *names], capture_output=True, text=True, timeout=900, env=environment, cwd=ROOT
    )
    started = [line.split()[1] for line in completed.stderr.splitlines() if line.startswith("CASE ")]
    assert completed.returncode == 0, (
        f"case {started[-1] if started else names[0]} exited with {completed.returncode} (134/139 = the interpreter "
        f"aborted)\n{completed.stderr[-4000:]}"
    )
    results = [
        json.loads(line[len("RESULT ") :]) for line in completed.stdout.splitlines() if line.startswith("RESULT ")
    ]
    assert [result["case"] for result in results] == names, completed.stdout[-2000:]
    return {result["case"]: result for result in results}


def check_case(name: str, results: dict) -> None:
    """Every path of one case ran (or refused cleanly where allowed), with exact gradients and a symmetric HVP."""
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
    assert gradients["max_error"] < 1e-5, (name, gradients)
    if "padding_invariance_error" in gradients:
        assert gradients["padding_invariance_error"] < 1e-5, (name, gradients)
    hvp = paths["hvp"]
    assert hvp["status"] == "ok"
    assert hvp["batching_error"] < 1e-4 and hvp["symmetry_error"] < 1e-3, (name, hvp)
    for required in ("cg_ggn", "arnoldi", "ekfac", "tracin", "tracincp"):
        assert paths[required]["status"] == "ok", (name, required, paths[required])


# Two processes of about the same length (the KerasHub cases trace the longest), three cases each.
CASE_GROUPS = {"bert+mha+cnn": ["bert", "mha", "cnn"], "gpt2+dict_mask+resnet": ["gpt2", "dict_mask", "resnet"]}


@pytest.mark.slow
@pytest.mark.parametrize("group", list(CASE_GROUPS))
def test_transformer_cases_run_every_path(group: str) -> None:
    names = CASE_GROUPS[group]
    if importlib.util.find_spec("keras_hub") is None:
        names = [name for name in names if name not in HUB_CASES]  # pip install 'influenciae[hub]' for the others
    for name, results in run_cases(names).items():
        check_case(name, results)


@pytest.mark.slow
def test_unknown_case_is_refused() -> None:
    completed = subprocess.run([sys.executable, CASES_SCRIPT, "nope"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "usage" in completed.stderr


ONEDNN_PROBE = r"""
import json, warnings
import numpy as np, keras
import influenciae as inf
from influenciae.model import _autodiff as model_module

def build(attention):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Embedding(20, 8)(tokens)
    hidden = keras.layers.MultiHeadAttention(2, 4)(hidden, hidden) if attention else keras.layers.Dense(8)(hidden)
    return keras.Model(tokens, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(hidden)))

x = np.random.default_rng(0).integers(0, 20, (4, 6)).astype("int32")
y = np.array([0, 1, 2, 0])
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
out = {"onednn": model_module._onednn_enabled()}
for attention in (True, False):
    im = inf.InfluenceModel(build(attention), loss_function=loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jacobian = im.batch_jacobian_tensor((x, y)).numpy()
    rows = []
    for i in range(4):  # the per-example reference, one example at a time (batch size 1 needs no batched product)
        rows.append(im.batch_jacobian_tensor((x[i : i + 1], y[i : i + 1])).numpy()[0])
    out[str(attention)] = {
        "unsafe": im._unsafe_ops.get("jacobian"),
        "looped": "jacobian" in im._looped,
        "warned": any("TF_ENABLE_ONEDNN_OPTS=0" in str(w.message) for w in caught),
        "error": float(np.abs(jacobian - np.stack(rows)).max()),
    }
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_attention_under_onednn_runs_looped_and_exact(onednn: str) -> None:
    """With oneDNN on, attention's rank-5 vectorized products (which abort the interpreter on some CPUs) are looped
    instead, with a warning naming TF_ENABLE_ONEDNN_OPTS=0; with it off (and for models without attention) the
    vectorized map runs. Both give the per-example gradients exactly."""
    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(
        [sys.executable, "-c", ONEDNN_PROBE], capture_output=True, text=True, timeout=600, env=environment, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["onednn"] == (onednn == "1")
    attention, dense = result["True"], result["False"]
    assert dense == {"unsafe": [], "looped": False, "warned": False, "error": dense["error"]}
    if onednn == "1":
        assert attention["looped"] and attention["warned"] and set(attention["unsafe"]) <= {"Einsum", "BatchMatMulV2"}
        assert attention["unsafe"]
    else:
        assert attention == {"unsafe": [], "looped": False, "warned": False, "error": attention["error"]}
    assert attention["error"] < 1e-6 and dense["error"] < 1e-6
