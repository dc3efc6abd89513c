"""Side-by-side agreement with Captum 0.9 for attacks (FGSM, PGD), relevance (LRP) and concepts (TCAV) on digits.

From the repository root::

    .venv/bin/python benchmarks/peers/analysis.py --output docs/benchmarks.md

1. Creates ``.venv-peers/captum`` once (the environment of ``make bench-peers``: ``run_peers.ensure_venv``).
2. Trains a small CNN on scikit-learn's digits (8×8 images, float32: ``Conv2D → ReLU → MaxPool → Flatten → Dense →
   ReLU → Dense``), exports its weights to torch layout (:func:`export_torch_weights`) together with the inputs,
   concept examples and our CAVs, and runs ``peer_captum_analysis.py`` in the Captum environment on them.
3. Checks that both forward passes agree (max |Δ logit| ≤ 1e-5, else it stops), computes the same quantities with
   ``influenciae.robustness``, ``influenciae.relevance`` and ``influenciae.concepts``, and compares them.
4. Writes a markdown table between ``<!-- peers-analysis:begin -->`` and ``<!-- peers-analysis:end -->`` of the
   output file (replacing that block or appending it; the rest of the file is untouched).

A section whose module of ours is not importable is reported as such instead of failing the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- peers-analysis:begin -->"
END = "<!-- peers-analysis:end -->"
COMMAND = ".venv/bin/python benchmarks/peers/analysis.py --output docs/benchmarks.md"
PARTS = ("attacks", "relevance", "concepts")
FORWARD_TOLERANCE = 1e-5
PEER_EXTRAS = ("scikit-learn==1.9.1",)  # Captum's default CAV classifier is scikit-learn's SGDClassifier

SEED = 0
EPOCHS = 30
NUM_EVAL = 200  # test images attacked and explained
BOUNDS = (0.0, 1.0)
FGSM_EPSILONS = (0.05, 0.1, 0.2)
PGD_SETTINGS: dict[str, dict[str, Any]] = {
    "linf": {"epsilon": 0.1, "step_size": 0.02, "num_steps": 10},
    "l2": {"epsilon": 1.0, "step_size": 0.25, "num_steps": 10},
}
LRP_EPSILON = 1e-6
LRP_RULE_SETS = {
    "epsilon": "ε rule (ε = 1e-6) on every layer",
    "zplus_epsilon": "z⁺ (bias set to zero) on the convolution, ε (1e-6) on the Dense layers",
}
TCAV_LAYER = "hidden"  # the Dense pre-activation: after the last ReLU, ∇ₐ h_t would be a constant row of W
TCAV_TARGETS = tuple(range(10))  # each class, explained on its test images
NUM_CONCEPT = 60  # examples per concept and per random set
NUM_RANDOM_SETS = 3
UPPER_ROWS = 2  # the concept: ink in the top rows of the image ("a stroke in the upper part")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the model, both layouts


def build_cnn(*, filters: int = 8, hidden: int = 32, seed: int = SEED) -> Any:
    """The digits CNN in Keras: ``[B, 8, 8, 1] → Conv2D(3×3, valid) → ReLU → MaxPool(2) → Flatten → Dense → ReLU →
    Dense(10)`` (logits). Layers are named as the modules of the torch copy (``peer_captum_analysis.build_model``).
    """
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(filters, 3, name="conv"),
            keras.layers.ReLU(name="conv_relu"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(hidden, name="hidden"),
            keras.layers.ReLU(name="hidden_relu"),
            keras.layers.Dense(10, name="logits"),
        ]
    )


def export_torch_weights(model: Any) -> dict[str, np.ndarray]:
    """The weights of a Keras ``Sequential`` of Conv2D / Dense / activation / pooling / Flatten layers, in torch
    layout, keyed ``"<layer name>.weight"`` and ``"<layer name>.bias"``.

    * ``Conv2D`` kernel ``[kh, kw, in, out]`` → ``Conv2d.weight [out, in, kh, kw]``.
    * ``Dense`` kernel ``[in, out]`` → ``Linear.weight [out, in]``. A Dense layer fed by ``Flatten`` of an
      ``[H, W, C]`` feature map (Keras flattens channels-last, ``(h, w, c)`` order) gets its input columns reordered
      to torch's ``(c, h, w)`` flattening of the ``[C, H, W]`` map.

    Also stores ``"pool_size"`` (the MaxPooling2D pool, square) when the model has one.

    Args:
        model: A built Keras ``Sequential`` model with channels-last convolutions.

    Returns:
        ``{name: float32 array}``.

    Raises:
        TypeError: For a layer with weights that is neither Conv2D nor Dense.
        ValueError: For a channels-first or strided/dilated/padded convolution (the torch copy has none).
    """
    import keras

    weights: dict[str, np.ndarray] = {}
    flattened_from: tuple[int, int, int] | None = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            config = layer.get_config()
            if config["data_format"] != "channels_last" or tuple(config["strides"]) != (1, 1):
                raise ValueError(f"{layer.name}: only channels-last, stride-1 convolutions are exported.")
            if config["padding"] != "valid" or tuple(config["dilation_rate"]) != (1, 1):
                raise ValueError(f"{layer.name}: only 'valid', undilated convolutions are exported.")
            kernel, bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
            weights[f"{layer.name}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
            weights[f"{layer.name}.bias"] = bias
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
            if flattened_from is not None:
                kernel = dense_kernel_after_flatten(kernel, flattened_from)
                flattened_from = None
            weights[f"{layer.name}.weight"] = np.ascontiguousarray(kernel.T)
            weights[f"{layer.name}.bias"] = bias
        elif isinstance(layer, keras.layers.Flatten):
            shape = tuple(int(d) for d in layer.input.shape[1:])
            flattened_from = (shape[0], shape[1], shape[2]) if len(shape) == 3 else None
        elif isinstance(layer, keras.layers.MaxPooling2D):
            pool = tuple(layer.get_config()["pool_size"])
            weights["pool_size"] = np.asarray(pool[0])
        elif layer.weights:
            raise TypeError(f"{layer.name}: {type(layer).__name__} has weights and no torch export.")
    return weights


def dense_kernel_after_flatten(kernel: np.ndarray, shape_hwc: tuple[int, int, int]) -> np.ndarray:
    """Reorder the input rows of a Dense kernel ``[H·W·C, out]`` from ``(h, w, c)`` to ``(c, h, w)`` order.

    Args:
        kernel: ``[H * W * C, out]``, rows in Keras' channels-last flattening order.
        shape_hwc: ``(H, W, C)`` of the flattened feature map.

    Returns:
        ``[C * H * W, out]``: row ``c·H·W + h·W + w`` is the input row ``h·W·C + w·C + c``.
    """
    height, width, channels = shape_hwc
    if kernel.shape[0] != height * width * channels:
        raise ValueError(f"The kernel has {kernel.shape[0]} input rows, not H·W·C = {height * width * channels}.")
    return kernel.reshape(height, width, channels, -1).transpose(2, 0, 1, 3).reshape(kernel.shape[0], -1)


def to_nchw(x: np.ndarray) -> np.ndarray:
    """``[B, H, W, C]`` → ``[B, C, H, W]`` (contiguous)."""
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` → ``[B, H, W, C]`` (contiguous)."""
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def torch_layout_forward(weights: dict[str, np.ndarray], x_nchw: np.ndarray) -> np.ndarray:
    """The CNN's logits ``[B, 10]`` computed in NumPy from torch-layout weights on ``[B, 1, 8, 8]`` inputs, the way
    torch computes them (cross-correlation, NCHW, flatten in ``(c, h, w)`` order). Used to test the export."""
    weight, bias = weights["conv.weight"], weights["conv.bias"]
    out_channels, _, kernel, _ = weight.shape
    batch, _, height, width = x_nchw.shape
    rows, cols = height - kernel + 1, width - kernel + 1
    patches = np.stack(
        [x_nchw[:, :, i : i + kernel, j : j + kernel] for i in range(rows) for j in range(cols)], axis=1
    )  # [B, rows·cols, C, k, k]
    conv = np.einsum("bpckl,ockl->bop", patches, weight) + bias[None, :, None]
    feature = np.maximum(conv, 0.0).reshape(batch, out_channels, rows, cols)
    pool = int(weights.get("pool_size", 2))
    pooled = feature[:, :, : rows // pool * pool, : cols // pool * pool]
    pooled = pooled.reshape(batch, out_channels, rows // pool, pool, cols // pool, pool).max(axis=(3, 5))
    hidden = np.maximum(pooled.reshape(batch, -1) @ weights["hidden.weight"].T + weights["hidden.bias"], 0.0)
    return hidden @ weights["logits.weight"].T + weights["logits.bias"]


# ---------------------------------------------------------------------- the problem


@dataclass
class Problem:
    """Everything both sides see. Images are NHWC ``[n, 8, 8, 1]`` float32 in ``[0, 1]`` here."""

    model: Any
    x_train: np.ndarray
    y_train: np.ndarray
    x: np.ndarray  # the attacked / explained test images [NUM_EVAL, 8, 8, 1]
    y: np.ndarray
    targets: np.ndarray  # targeted attacks aim at these classes
    concept_x: np.ndarray
    random_x: list[np.ndarray]
    tcav_x: dict[int, np.ndarray]  # target class -> its test images
    test_accuracy: float
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def upper_stroke(images: np.ndarray) -> np.ndarray:
    """Ink in the top :data:`UPPER_ROWS` rows of ``[n, 8, 8, 1]`` images (mean intensity there), ``[n]``."""
    return images[:, :UPPER_ROWS, :, 0].mean(axis=(1, 2))


def make_problem(*, epochs: int = EPOCHS, num_eval: int = NUM_EVAL, seed: int = SEED) -> Problem:
    """Train the CNN on 75 % of digits and draw the evaluation inputs, concept and random sets from fixed seeds."""
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=seed, stratify=labels
    )
    model = build_cnn(seed=seed)
    model.compile(
        keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    test_accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))
    rng = np.random.default_rng(seed)
    # Concept: the training images with the most ink in their top rows; random sets: random training images.
    ink = upper_stroke(x_train)
    concept_index = np.argsort(-ink, kind="stable")[:NUM_CONCEPT]
    random_index = [rng.choice(len(x_train), NUM_CONCEPT, replace=False) for _ in range(NUM_RANDOM_SETS)]
    x, y = x_test[:num_eval], y_test[:num_eval]
    return Problem(
        model=model,
        x_train=x_train,
        y_train=y_train,
        x=x,
        y=y,
        targets=(y + 1) % 10,
        concept_x=x_train[concept_index],
        random_x=[x_train[index] for index in random_index],
        tcav_x={target: x_test[y_test == target] for target in TCAV_TARGETS},
        test_accuracy=test_accuracy,
    )


def peer_arrays(problem: Problem, weights: dict[str, np.ndarray], cavs: Sequence[np.ndarray] | None) -> dict[str, Any]:
    """The arrays of the peer's input file (torch layout)."""
    arrays: dict[str, Any] = {f"w:{name}": value for name, value in weights.items()}
    arrays.update(
        x=to_nchw(problem.x),
        y=problem.y,
        targets=problem.targets,
        lrp_x=to_nchw(problem.x),
        lrp_target=problem.y,
        concept_x=to_nchw(problem.concept_x),
    )
    for index, random in enumerate(problem.random_x):
        arrays[f"random_x{index}"] = to_nchw(random)
    for target, images in problem.tcav_x.items():
        arrays[f"tcav_x{target}"] = to_nchw(images)
    for index, cav in enumerate(cavs or ()):
        arrays[f"our_cav{index}"] = np.asarray(cav, dtype=np.float32)
    return arrays


def peer_config(parts: Sequence[str]) -> dict[str, Any]:
    zplus = {"name": "zplus", "set_bias_to_zero": True}
    epsilon = {"name": "epsilon", "epsilon": LRP_EPSILON}
    linear_layers = ("conv", "hidden", "logits")
    return {
        "parts": list(parts),
        "seed": SEED,
        "bounds": list(BOUNDS),
        "fgsm_epsilons": list(FGSM_EPSILONS),
        "pgd": PGD_SETTINGS,
        "lrp": {
            "epsilon": {**{name: epsilon for name in linear_layers}, "pool": epsilon},
            "zplus_epsilon": {"conv": zplus, "pool": epsilon, "hidden": epsilon, "logits": epsilon},
        },
        "tcav": {"layer": TCAV_LAYER, "targets": list(TCAV_TARGETS), "num_random": NUM_RANDOM_SETS},
    }


def ensure_extras(python: Path, stamp: Path) -> None:
    """Install :data:`PEER_EXTRAS` into the peer's environment once (its own stamp: ``make bench-peers``'s is kept)."""
    digest = json.dumps(PEER_EXTRAS)
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return
    log(f"== installing {', '.join(PEER_EXTRAS)} into {python.parent.parent.relative_to(ROOT)}")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_EXTRAS], check=True)
    stamp.write_text(digest + "\n")


def run_peer(arrays: dict[str, Any], config: dict[str, Any], workdir: Path, *, timeout: float) -> dict[str, Any]:
    """Run ``peer_captum_analysis.py`` in the Captum environment; its results as ``{name: array}``."""
    from benchmarks.peers import run_peers

    captum = next(peer for peer in run_peers.PEERS if peer.name == "captum")
    run_peers.ensure_venv(captum)
    ensure_extras(captum.python, captum.venv / ".analysis-installed")
    problem_path, output_path = workdir / "analysis_problem.npz", workdir / "analysis_captum.npz"
    np.savez(problem_path, config=np.asarray(json.dumps(config)), **arrays)
    command = [
        str(captum.python),
        str(HERE / "peer_captum_analysis.py"),
        "--problem",
        str(problem_path),
        "--output",
        str(output_path),
    ]
    log("== Captum: " + " ".join(command[1:2]))
    started = time.perf_counter()
    subprocess.run(command, check=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"})
    log(f"   {time.perf_counter() - started:.0f} s")
    with np.load(output_path) as stored:
        return {name: stored[name] for name in stored.files}


# ---------------------------------------------------------------------- our side


def _loss() -> Any:
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def ours_attacks(problem: Problem) -> dict[str, np.ndarray]:
    """Our FGSM and PGD on the same inputs; perturbed images in NCHW (as the peer returns them)."""
    from influenciae.robustness import FGSM, PGD

    lower, upper = BOUNDS
    fgsm = FGSM(problem.model, loss_function=_loss(), lower_bound=lower, upper_bound=upper)
    pgd = PGD(problem.model, loss_function=_loss(), lower_bound=lower, upper_bound=upper)
    out = {}
    for targeted, target in ((False, problem.y), (True, problem.targets)):
        kind = "targeted" if targeted else "untargeted"
        for epsilon in FGSM_EPSILONS:
            adversarial = fgsm.perturb(problem.x, target, epsilon, targeted=targeted)
            out[f"fgsm_{kind}_{epsilon}"] = to_nchw(np.asarray(adversarial))
        for norm, settings in PGD_SETTINGS.items():
            adversarial = pgd.perturb(
                problem.x,
                target,
                settings["epsilon"],
                settings["step_size"],
                int(settings["num_steps"]),
                norm=norm,
                random_start=False,
                targeted=targeted,
            )
            out[f"pgd_{norm}_{kind}"] = to_nchw(np.asarray(adversarial))
    return out


def ours_relevance(problem: Problem) -> dict[str, np.ndarray]:
    """Our LRP input relevances (NCHW) for each rule set of :data:`LRP_RULE_SETS`."""
    from influenciae.relevance import LRP, EpsilonRule, PropagationRule, ZPlusRule

    rule_sets: dict[str, dict[str, PropagationRule]] = {
        "epsilon": {name: EpsilonRule(LRP_EPSILON) for name in ("conv", "pool", "hidden", "logits")},
        "zplus_epsilon": {
            "conv": ZPlusRule(set_bias_to_zero=True),
            "pool": EpsilonRule(LRP_EPSILON),
            "hidden": EpsilonRule(LRP_EPSILON),
            "logits": EpsilonRule(LRP_EPSILON),
        },
    }
    out = {}
    for name, rules in rule_sets.items():
        relevance = LRP(problem.model, rules=rules).attribute(problem.x, problem.y)
        out[f"lrp_{name}"] = to_nchw(np.asarray(relevance))
    return out


def ours_concepts(problem: Problem) -> dict[str, Any]:
    """Our TCAV at :data:`TCAV_LAYER`, one experimental set ``[concept, random_i]`` per random set.

    Returns:
        ``{"scores": {target: interpret(...) result}, "keys": [set key], "cavs": [[F] unit vector toward the
        concept], "accuracies": [held-out accuracy], "gradients": {target: [N_t, F] layer gradients of its logit}}``.
    """
    from influenciae.concepts import TCAV, Concept

    concept = Concept("upper_stroke", problem.concept_x)
    randoms = [Concept(f"random_{index}", random) for index, random in enumerate(problem.random_x)]
    experimental_sets = [[concept, random] for random in randoms]
    tcav = TCAV(problem.model, [TCAV_LAYER])
    cavs = [tcav.cav(concepts, TCAV_LAYER) for concepts in experimental_sets]
    scores, gradients = {}, {}
    for target, images in problem.tcav_x.items():
        scores[target] = tcav.interpret(images, target, experimental_sets)
        gradients[target] = tcav.sensitivities(images, target)[TCAV_LAYER]
    return {
        "scores": scores,
        "keys": [cav.key for cav in cavs],
        "cavs": [np.asarray(cav.vector) for cav in cavs],
        "accuracies": [cav.accuracy for cav in cavs],
        "gradients": gradients,
    }


def our_cavs(concepts: dict[str, Any]) -> list[np.ndarray]:
    """The CAVs (toward the concept) that Captum is given for its second TCAV run."""
    return [np.asarray(vector, dtype=np.float32) for vector in concepts["cavs"]]


def _ratio_magnitude(derivatives: np.ndarray) -> float:
    """``Σ_{S>0} |S| / Σ |S|``: the magnitude score of the TCAV paper (and of Captum's docstring)."""
    total = float(np.abs(derivatives).sum())
    return float(np.abs(derivatives[derivatives > 0]).sum() / total) if total > 0 else 0.0


# ---------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Row:
    """One line of a table: the cells after the first column, already formatted."""

    name: str
    cells: tuple[str, ...]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def max_relative_difference(ours: np.ndarray, peer: np.ndarray) -> float:
    """``max |ours − peer| / max |ours|``."""
    scale = float(np.max(np.abs(ours)))
    return float(np.max(np.abs(ours - peer)) / scale) if scale > 0 else float("nan")


def attack_rows(ours: dict[str, np.ndarray], peer: dict[str, Any], problem: Problem) -> list[Row]:
    """Per attack, against Captum as shipped, Captum without its zero threshold, and (L2) a normalized-gradient
    PGD in torch: max |Δx′|, identical signs of the perturbations x′ − x, and accuracy on x′."""
    weights = export_torch_weights(problem.model)
    x = to_nchw(problem.x)

    def accuracy(adversarial: np.ndarray) -> float:
        return float(np.mean(np.argmax(torch_layout_forward(weights, adversarial), axis=1) == problem.y))

    def compare(mine: np.ndarray, theirs: np.ndarray) -> str:
        same_sign = float(np.mean(np.sign(mine - x) == np.sign(theirs - x)))
        return f"{float(np.max(np.abs(mine - theirs))):.1e} · {same_sign:.4f} · {accuracy(theirs):.3f}"

    rows = []
    for key in sorted(ours, key=_attack_order):
        if key not in peer:
            continue
        cells = [f"{accuracy(ours[key]):.3f}", compare(ours[key], peer[key])]
        for variant in ("nothreshold", "l2reference"):
            other = peer.get(f"{variant}:{key}")
            cells.append("" if other is None else compare(ours[key], other))
        rows.append(Row(_attack_title(key), tuple(cells)))
    return rows


def _attack_order(key: str) -> tuple[int, str]:
    return (0 if key.startswith("fgsm") else 1, key)


def _attack_title(key: str) -> str:
    parts = key.split("_")
    if parts[0] == "fgsm":
        return f"FGSM, {parts[1]}, ε = {parts[2]}"
    settings = PGD_SETTINGS[parts[1]]
    return (
        f"PGD {'L∞' if parts[1] == 'linf' else 'L2'}, {parts[2]}, ε = {settings['epsilon']}, "
        f"step {settings['step_size']} × {settings['num_steps']}"
    )


def relevance_rows(ours: dict[str, np.ndarray], peer: dict[str, Any]) -> list[Row]:
    rows = []
    for name, title in LRP_RULE_SETS.items():
        key = f"lrp_{name}"
        if key not in ours or key not in peer:
            continue
        a, b = ours[key].reshape(len(ours[key]), -1), peer[key].reshape(len(peer[key]), -1)
        per_example = [pearson(a[i], b[i]) for i in range(len(a))]
        rows.append(
            Row(
                title,
                (
                    f"{pearson(a, b):.6f}",
                    f"{np.nanmin(per_example):.6f}",
                    f"{max_relative_difference(a, b):.2e}",
                    f"{a.sum(axis=1).mean():.4f} / {b.sum(axis=1).mean():.4f}",
                ),
            )
        )
    return rows


def concept_rows(ours: dict[str, Any], peer: dict[str, Any]) -> tuple[list[Row], list[Row], dict[str, float]]:
    """Per target class: scores with the same CAV (ours given to Captum) and with each library's own CAV, each a
    mean over the experimental sets; and the largest differences over every (set, target)."""
    same, own = [], []
    worst = {"derivatives": 0.0, "gradients": 0.0, "sign_count": 0.0, "ratio": 0.0, "mean": 0.0}
    peer_cavs = [np.asarray(peer[f"tcav_own_cav{index}"], np.float64) for index in range(len(ours["keys"]))]
    for target in TCAV_TARGETS:
        gradients_ours = ours["gradients"][target]
        gradients_peer = np.asarray(peer[f"tcav_layer_gradients{target}"], np.float64)
        worst["gradients"] = max(worst["gradients"], max_relative_difference(gradients_ours, gradients_peer))
        cells: dict[str, list[tuple[float, float]]] = {
            "sign": [],
            "ratio": [],
            "mean": [],
            "own_sign": [],
            "own_ratio": [],
        }
        for index, key in enumerate(ours["keys"]):
            result = ours["scores"][target][key][TCAV_LAYER]
            cav = ours["cavs"][index].astype(np.float64)
            derivatives_ours, derivatives_peer = gradients_ours @ cav, gradients_peer @ cav
            worst["derivatives"] = max(
                worst["derivatives"], max_relative_difference(derivatives_ours, derivatives_peer)
            )
            pairs = {
                "sign": (float(result["sign_count"][0]), float(peer[f"tcav_ours_sign_count{index}_{target}"][0])),
                "ratio": (float(result["magnitude"][0]), _ratio_magnitude(derivatives_peer)),
                "mean": (float(result["mean_derivative"][0]), float(peer[f"tcav_ours_magnitude{index}_{target}"][0])),
                "own_sign": (float(result["sign_count"][0]), float(peer[f"tcav_own_sign_count{index}_{target}"][0])),
                "own_ratio": (float(result["magnitude"][0]), _ratio_magnitude(gradients_peer @ peer_cavs[index])),
            }
            for name, pair in pairs.items():
                cells[name].append(pair)
            for name, slot in (("sign", "sign_count"), ("ratio", "ratio"), ("mean", "mean")):
                worst[slot] = max(worst[slot], abs(pairs[name][0] - pairs[name][1]))

        def mean_pair(name: str, digits: int = 3, cells: dict[str, list[tuple[float, float]]] = cells) -> str:
            values = np.asarray(cells[name])
            return f"{values[:, 0].mean():.{digits}f} / {values[:, 1].mean():.{digits}f}"

        title = f"{target} ({len(gradients_ours)} images)"
        same.append(Row(title, (mean_pair("sign"), mean_pair("ratio"), mean_pair("mean", 4))))
        own.append(Row(title, (mean_pair("own_sign"), mean_pair("own_ratio"))))
    return same, own, worst


# ---------------------------------------------------------------------- report


def render_block(sections: dict[str, list[str]], meta: dict[str, str]) -> str:
    lines = [
        BEGIN,
        "## Robustness, relevance and concepts: agreement with Captum",
        "",
        f"Generated by `{COMMAND}` on {meta['date']} ({meta['elapsed']}; {meta['machine']}). "
        f"Versions: {meta['ours']} (ours); {meta['peer']}.",
        "",
        f"Model: a digits CNN (`{meta['architecture']}`, {meta['num_params']} parameters, float32) trained "
        f"{EPOCHS} epochs with Adam on 75 % of scikit-learn's digits (test accuracy {meta['accuracy']}); its weights "
        "are exported to a torch copy (`benchmarks/peers/analysis.py: export_torch_weights`, Conv2D kernels "
        "`[kh, kw, in, out] → [out, in, kh, kw]`, the Dense kernel after `Flatten` reordered from HWC to CHW). "
        f"Forward check on the {NUM_EVAL} evaluation images: max |Δ logit| = {meta['forward']} for logits up to "
        f"{meta['logit_scale']} in magnitude (must be ≤ {FORWARD_TOLERANCE:g} × max(1, max |logit|): float32 "
        "rounding of two different convolution kernels).",
        "",
    ]
    for title, body in sections.items():
        lines += [f"### {title}", "", *body, ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def table(header: Sequence[str], rows: Sequence[Row]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join((row.name, *row.cells)) + " |" for row in rows),
    ]


def replace_block(text: str, block: str) -> str:
    """``text`` with its analysis block replaced by ``block`` (markers included), or ``block`` appended."""
    block = block.rstrip()
    if not (block.startswith(BEGIN) and block.endswith(END)):
        raise ValueError(f"The block must start with {BEGIN!r} and end with {END!r}.")
    start = text.find(BEGIN)
    stop = text.find(END, start + len(BEGIN)) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        return text[:start] + block + text[stop + len(END) :]
    if not text.strip():
        return block + "\n"
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_block(path: Path, block: str) -> None:
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    path.write_text(replace_block(old, block), encoding="utf-8")


def _section(name: str, compute: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(result, None)``, or ``(None, reason)`` when our module for it is missing."""
    try:
        return compute(), None
    except ImportError as error:
        log(f"   {name}: not available ({error})")
        return None, f"not available in this tree ({error})"


def attack_section(
    ours: dict[str, np.ndarray] | None, reason: str | None, peer: dict[str, Any], problem: Problem
) -> list[str]:
    if ours is None:
        return [f"`influenciae.robustness`: {reason}."]
    lines = [
        f"{len(problem.y)} test images, pixels bounded to [{BOUNDS[0]:g}, {BOUNDS[1]:g}], cross-entropy on the "
        "logits (Captum: `CrossEntropyLoss(reduction='none')`, each image's gradient its own), untargeted on "
        "the labels, targeted on `(label + 1) mod 10`, no random start. Each comparison cell reads *max |Δx′| · same "
        "sign · accuracy*: the largest difference between our adversarial images and the peer's, the fraction of "
        "pixels where the perturbations `x′ − x` have the same sign (zero counting as a sign), and the peer's "
        "accuracy on its adversarial images (ours in the second column).",
        "",
        *table(
            (
                "Attack",
                "Accuracy (ours)",
                "Captum 0.9",
                "Captum, `zero_thresh = 0`",
                "L2 PGD along g/‖g‖₂ in torch",
            ),
            attack_rows(ours, peer, problem),
        ),
        "",
        "Two conventions differ. Captum's `FGSM` (also each step of its `PGD`) leaves a pixel unperturbed where "
        "|∂loss/∂x| ≤ 1e-6 (`zero_thresh`), which on confidently classified images (saturated softmax, tiny "
        "gradients) is a large share of the pixels of an untargeted attack; ours moves every pixel with a non-zero "
        "gradient: the third column sets Captum's threshold to 0. Captum's `PGD(norm='L2')` takes **sign** steps "
        "and only projects on the L2 ball, whereas ours steps along `g / ‖g‖₂` (Madry et al.): the last column "
        "compares ours with that attack written in torch on the same weights "
        "(`peer_captum_analysis.normalized_l2_pgd`). The pixels that still differ (well under 1 %) have gradients "
        "at float32 round-off, whose sign TensorFlow and torch do not agree on: they move by ε in opposite "
        "directions (max |Δx′| = 2ε), and an L2 step amplifies the same round-off where it normalizes the tiny "
        "gradient of a saturated image.",
    ]
    return lines


def relevance_section(ours: dict[str, np.ndarray] | None, reason: str | None, peer: dict[str, Any]) -> list[str]:
    if ours is None:
        return [f"`influenciae.relevance`: {reason}."]
    return [
        f"Input relevances `[{NUM_EVAL}, 8, 8]` of the true-label logit, `influenciae.relevance.LRP` vs "
        "`captum.attr.LRP` (Captum rules `EpsilonRule`, `Alpha1_Beta0_Rule(set_bias_to_zero=True)` for z⁺; the "
        "max-pool layer takes the ε rule in both, i.e. winner-take-all). *Pearson* over all pixels of all images, "
        "*min per image* the lowest per-image Pearson, *max rel. diff.* `max |ours − Captum| / max |ours|`, and the "
        "mean total relevance per image (ours / Captum; the bias terms absorb the rest of the logit).",
        "",
        *table(
            ("Rules", "Pearson", "Min per image", "Max rel. diff.", "Σ relevance ours / Captum"),
            relevance_rows(ours, peer),
        ),
    ]


def concept_section(
    ours: dict[str, Any] | None, reason: str | None, peer: dict[str, Any], problem: Problem
) -> list[str]:
    if ours is None:
        return [f"`influenciae.concepts`: {reason}."]
    same, own, worst = concept_rows(ours, peer)
    cosines = []
    for index, cav in enumerate(ours["cavs"]):
        peer_cav = np.asarray(peer[f"tcav_own_cav{index}"], np.float64)
        cosines.append(float(cav @ peer_cav / (np.linalg.norm(cav) * np.linalg.norm(peer_cav))))
    accuracies = ", ".join(f"{accuracy:.3f}" for accuracy in ours["accuracies"])
    captum_accuracies = ", ".join(f"{float(peer[f'tcav_own_accuracy{i}']):.3f}" for i in range(len(cosines)))
    features = next(iter(ours["gradients"].values())).shape[1]
    return [
        f"Concept *upper_stroke*: the {NUM_CONCEPT} training images with the most ink in their top {UPPER_ROWS} "
        f"rows; {NUM_RANDOM_SETS} random sets of {NUM_CONCEPT} training images, one experimental set "
        f"`[upper_stroke, random_i]` each; layer `{TCAV_LAYER}` (the Dense pre-activation, {features} features). "
        "Every class is explained on its test images (its own logit as target). Each cell is *ours / Captum's*, "
        "averaged over the experimental sets.",
        "",
        "**Same CAV.** Captum's `TCAV` is given our CAV through a `Classifier` whose `weights()` returns it, so both "
        "compute the directional derivatives `S(x) = ∇ₐ h_t · v` along the same vector. Layer gradients "
        "(ours `TCAV.sensitivities`, Captum `LayerGradientXActivation(multiply_by_inputs=False)`, what its TCAV "
        f"uses): max rel. diff. {worst['gradients']:.1e} (here they are `W_t ⊙ 1[h > 0]`, exact in both); "
        f"directional derivatives: max rel. diff. {worst['derivatives']:.1e}; over every (set, class): "
        f"max |Δ sign_count| = {worst['sign_count']:.2e}, max |Δ magnitude| = {worst['ratio']:.2e}, "
        f"max |Δ mean S| = {worst['mean']:.2e}. Captum 0.9 returns the *mean* of `S` under the key `magnitude` "
        "(its docstring states the paper's ratio `Σ_{S>0}|S| / Σ|S|`, which is ours): the *magnitude* column "
        "gives our ratio and the ratio recomputed from Captum's derivatives, the *mean S* column our "
        "`mean_derivative` and Captum's `magnitude`.",
        "",
        *table(("Class", "sign_count", "magnitude (ratio)", "mean S (Captum `magnitude`)"), same),
        "",
        "**Own CAVs.** Each library trains its own CAV on the same concept and random examples: ours "
        "(`CAVClassifier` default, its own held-out split; held-out accuracy "
        f"{accuracies}) vs Captum's `DefaultClassifier` (scikit-learn `SGDClassifier(alpha=0.01)` on a random "
        f"67/33 split drawn by torch). Cosine between the two CAVs of each set: "
        + ", ".join(f"{cosine:.3f}" for cosine in cosines)
        + ". Captum's CAVs are the raw classifier weights (ours are unit vectors), so only the scale-free scores "
        "compare; Captum's ratio magnitude is recomputed from its derivatives along its own CAV. Captum's "
        f"reported CAV accuracies ({captum_accuracies}) are not held-out accuracies: its linear model has one "
        "output column for two classes and it predicts `classes()[argmax]`, always the first class, so each is "
        "the share of the concept's examples in its test split.",
        "",
        *table(("Class", "sign_count", "magnitude (ratio)"), own),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="markdown file whose analysis block is replaced (default: stdout)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the Captum process")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()

    log("== training the digits CNN")
    problem = make_problem(epochs=args.epochs)
    weights = export_torch_weights(problem.model)
    keras_logits = np.asarray(problem.model.predict(problem.x, verbose=0))
    reference = float(np.max(np.abs(torch_layout_forward(weights, to_nchw(problem.x)) - keras_logits)))
    log(f"   test accuracy {problem.test_accuracy:.3f}; NumPy torch-layout forward max |Δ| {reference:.2e}")

    concepts, concept_reason = (None, None)
    if "concepts" in args.parts:
        concepts, concept_reason = _section("concepts", lambda: ours_concepts(problem))
    cavs = our_cavs(concepts) if concepts is not None else None
    with tempfile.TemporaryDirectory(prefix="influenciae_analysis_") as directory:
        peer = run_peer(
            peer_arrays(problem, weights, cavs), peer_config(args.parts), Path(directory), timeout=args.timeout
        )
    forward = float(np.max(np.abs(peer["logits"] - keras_logits)))
    logit_scale = max(1.0, float(np.max(np.abs(keras_logits))))
    log(f"   Captum forward max |Δ logit| {forward:.2e} (largest |logit| {logit_scale:.1f})")
    if forward > FORWARD_TOLERANCE * logit_scale:
        log(
            f"the torch copy disagrees with the Keras model: max |Δ logit| {forward:.2e} > {FORWARD_TOLERANCE:g} × "
            f"{logit_scale:.1f}"
        )
        return 1

    sections: dict[str, list[str]] = {}
    if "attacks" in args.parts:
        log("== attacks (ours)")
        attacks, reason = _section("attacks", lambda: ours_attacks(problem))
        sections["Attacks: FGSM and PGD"] = attack_section(attacks, reason, peer, problem)
    if "relevance" in args.parts:
        log("== relevance (ours)")
        relevance, reason = _section("relevance", lambda: ours_relevance(problem))
        sections["Relevance: LRP"] = relevance_section(relevance, reason, peer)
    if "concepts" in args.parts:
        sections["Concepts: TCAV"] = concept_section(concepts, concept_reason, peer, problem)

    import keras

    from influenciae import __version__ as ours_version

    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed": f"{time.perf_counter() - clock:.0f} s",
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "ours": f"influenciae {ours_version}, Keras {keras.__version__}",
        "peer": str(peer["versions"]),
        "architecture": " → ".join(layer.__class__.__name__ for layer in problem.model.layers),
        "num_params": f"{problem.model.count_params():,}",
        "accuracy": f"{problem.test_accuracy:.3f}",
        "forward": f"{forward:.1e}",
        "logit_scale": f"{logit_scale:.1f}",
    }
    block = render_block(sections, meta)
    if args.output is None:
        print(block)
    else:
        write_block(args.output, block)
        log(f"wrote the analysis block of {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
