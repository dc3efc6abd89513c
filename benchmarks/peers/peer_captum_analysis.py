"""Captum 0.9 side of the robustness / relevance / concepts comparison (``analysis.py``): one process, every method.

Runs in ``.venv-peers/captum`` (``torch==2.13.0`` CPU, ``captum==0.9.0``)::

    .venv-peers/captum/bin/python benchmarks/peers/peer_captum_analysis.py --problem P.npz --output R.npz

``P.npz`` (written by ``analysis.py``) holds the digits CNN's weights already in torch layout (``conv.weight
[out, in, kh, kw]``, ``hidden.weight [out, in]`` with its input columns reordered from Keras' HWC flattening to
torch's CHW one), the inputs in NCHW, labels, attack targets, concept examples, the CAVs computed by our side and
a JSON ``config`` (epsilons, PGD steps, LRP rule sets, TCAV layer and target). ``R.npz`` gets one array per result,
named as ``analysis.py`` reads them. NumPy and the standard library are the only imports besides torch and Captum.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import numpy as np


def build_model(weights: dict[str, np.ndarray]) -> Any:
    """The digits CNN ``Conv2d → ReLU → MaxPool2d → flatten → Linear → ReLU → Linear`` with ``weights`` loaded.

    Every layer is its own module used once (Captum's LRP needs that); the flattening is ``torch.flatten``, a view
    that LRP passes through as the gradient does.
    """
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            out_channels, in_channels, kernel, _ = weights["conv.weight"].shape
            self.conv = nn.Conv2d(in_channels, out_channels, kernel)
            self.conv_relu = nn.ReLU()
            self.pool = nn.MaxPool2d(int(weights["pool_size"]))
            self.hidden = nn.Linear(weights["hidden.weight"].shape[1], weights["hidden.weight"].shape[0])
            self.hidden_relu = nn.ReLU()
            self.logits = nn.Linear(weights["logits.weight"].shape[1], weights["logits.weight"].shape[0])

        def forward(self, x: Any) -> Any:
            x = self.pool(self.conv_relu(self.conv(x)))
            return self.logits(self.hidden_relu(self.hidden(torch.flatten(x, 1))))

    model = DigitsCNN()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(weights[name])))
    return model.eval()


def attacks(model: Any, data: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """FGSM and PGD (L∞, L2; untargeted on the labels, targeted on ``targets``), no random start."""
    import torch
    from captum.robust import FGSM, PGD
    from torch import nn

    x = torch.from_numpy(data["x"])
    labels = torch.from_numpy(data["y"])
    targets = torch.from_numpy(data["targets"])
    # Per example: Captum differentiates the sum of the entries, so each image's gradient is that of its own loss
    # (a mean would divide it by the batch size and push more entries under Captum's zero threshold of 1e-6).
    loss = nn.CrossEntropyLoss(reduction="none")
    lower, upper = config["bounds"]
    out: dict[str, np.ndarray] = {}
    fgsm = FGSM(model, loss_func=loss, lower_bound=lower, upper_bound=upper)
    pgd = PGD(model, loss_func=loss, lower_bound=lower, upper_bound=upper)
    # The same attacks without Captum's zero threshold (|gradient| ≤ 1e-6 leaves a pixel unperturbed).
    fgsm_no_threshold = FGSM(model, loss_func=loss, lower_bound=lower, upper_bound=upper)
    fgsm_no_threshold.zero_thresh = 0.0
    pgd_no_threshold = PGD(model, loss_func=loss, lower_bound=lower, upper_bound=upper)
    pgd_no_threshold.fgsm.zero_thresh = 0.0
    for targeted, target in ((False, labels), (True, targets)):
        kind = "targeted" if targeted else "untargeted"
        for epsilon in config["fgsm_epsilons"]:
            out[f"fgsm_{kind}_{epsilon}"] = fgsm.perturb(x, epsilon, target, targeted=targeted).detach().numpy()
            adversarial = fgsm_no_threshold.perturb(x, epsilon, target, targeted=targeted)
            out[f"nothreshold:fgsm_{kind}_{epsilon}"] = adversarial.detach().numpy()
        for norm, settings in config["pgd"].items():
            adversarial = pgd.perturb(
                x,
                settings["epsilon"],
                settings["step_size"],
                settings["num_steps"],
                target,
                targeted=targeted,
                random_start=False,
                norm={"linf": "Linf", "l2": "L2"}[norm],
            )
            out[f"pgd_{norm}_{kind}"] = adversarial.detach().numpy()
            adversarial = pgd_no_threshold.perturb(
                x,
                settings["epsilon"],
                settings["step_size"],
                settings["num_steps"],
                target,
                targeted=targeted,
                random_start=False,
                norm={"linf": "Linf", "l2": "L2"}[norm],
            )
            out[f"nothreshold:pgd_{norm}_{kind}"] = adversarial.detach().numpy()
            if norm == "l2":
                out[f"l2reference:pgd_l2_{kind}"] = normalized_l2_pgd(
                    model, loss, x, target, settings, targeted, (lower, upper)
                )
    return out


def normalized_l2_pgd(
    model: Any, loss: Any, x: Any, target: Any, settings: dict[str, Any], targeted: bool, bounds: tuple[float, float]
) -> np.ndarray:
    """Textbook L2 PGD in torch: steps along ``g / ‖g‖₂`` (Madry et al.), projection on the ball, then the bounds.

    Captum's ``PGD(norm="L2")`` takes *sign* steps and only projects on the L2 ball; this reference shows what a
    normalized-gradient L2 attack gives in torch on the same weights.
    """
    import torch

    direction = -1.0 if targeted else 1.0
    adversarial = x.clone()
    for _ in range(settings["num_steps"]):
        adversarial.requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(model(adversarial), target).sum(), adversarial)
        norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        step = adversarial.detach() + direction * settings["step_size"] * gradient / norms
        delta = torch.renorm(step - x, 2, 0, settings["epsilon"])
        adversarial = torch.clamp(x + delta, *bounds).detach()
    return adversarial.numpy()


def relevance(weights: dict[str, np.ndarray], data: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, Any]:
    """LRP input relevances ``[n, 1, 8, 8]`` for each rule set, on a fresh model each (rules change the weights)."""
    import torch
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule

    out = {}
    x = torch.from_numpy(data["lrp_x"])
    target = torch.from_numpy(data["lrp_target"])
    for name, rules in config["lrp"].items():
        model = build_model(weights)
        for layer, rule in rules.items():
            module = getattr(model, layer)
            if rule["name"] == "epsilon":
                module.rule = EpsilonRule(epsilon=rule["epsilon"])
            elif rule["name"] == "zplus":
                module.rule = Alpha1_Beta0_Rule(set_bias_to_zero=rule["set_bias_to_zero"])
            else:
                raise ValueError(f"Unknown rule {rule!r}.")
        out[f"lrp_{name}"] = LRP(model).attribute(x, target=target).detach().numpy()
    return out


def concepts(model: Any, data: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """TCAV at one layer: with Captum's own CAVs (default SGD classifier), and with the CAVs our side computed."""
    import torch
    from captum.attr import LayerGradientXActivation
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import Classifier, DefaultClassifier
    from torch.utils.data import DataLoader

    layer = config["tcav"]["layer"]
    targets = [int(target) for target in config["tcav"]["targets"]]
    concept = Concept(0, "concept", DataLoader(torch.from_numpy(data["concept_x"]), batch_size=64))
    randoms = [
        Concept(1 + index, f"random_{index}", DataLoader(torch.from_numpy(data[f"random_x{index}"]), batch_size=64))
        for index in range(int(config["tcav"]["num_random"]))
    ]
    experimental_sets = [[concept, random] for random in randoms]
    out: dict[str, np.ndarray] = {}

    # Directional derivatives: the layer gradients TCAV uses (LayerGradientXActivation without the activation).
    layer_gradients = LayerGradientXActivation(model, getattr(model, layer), multiply_by_inputs=False)
    for target in targets:
        inputs = torch.from_numpy(data[f"tcav_x{target}"])
        gradients = layer_gradients.attribute(inputs, target=target)
        out[f"tcav_layer_gradients{target}"] = gradients.reshape(len(inputs), -1).detach().numpy()

    class FixedClassifier(Classifier):
        """Returns the CAV of our side for each experimental set (``[v, -v]`` for classes ``[concept, random]``)."""

        def __init__(self) -> None:
            self.cav: np.ndarray | None = None
            self.pair: list[int] = []

        def train_and_eval(self, dataloader: Any, **kwargs: Any) -> dict[str, Any]:
            labels = torch.cat([label for _, label in dataloader])
            self.pair = sorted({int(value) for value in labels.tolist()})
            self.cav = data[f"our_cav{self.pair[1] - 1}"]
            return {"accs": torch.tensor(float("nan"))}

        def weights(self) -> Any:
            assert self.cav is not None
            vector = torch.from_numpy(self.cav)
            return torch.stack([vector, -vector])

        def classes(self) -> list[int]:
            return self.pair

    torch.manual_seed(int(config["seed"]))
    classifiers: list[tuple[str, Any]] = [("own", DefaultClassifier())]
    if "our_cav0" in data:
        classifiers.append(("ours", FixedClassifier()))
    for kind, classifier in classifiers:
        with tempfile.TemporaryDirectory(prefix=f"captum_tcav_{kind}_") as directory:
            tcav = TCAV(model, [layer], model_id=f"digits_{kind}", classifier=classifier, save_path=directory)
            for target in targets:  # the CAVs are trained once, at the first target
                inputs = torch.from_numpy(data[f"tcav_x{target}"])
                scores = tcav.interpret(inputs, experimental_sets, target=target)
                for index, experimental_set in enumerate(experimental_sets):
                    key = "-".join(str(member.id) for member in experimental_set)
                    result = scores[key][layer]
                    out[f"tcav_{kind}_sign_count{index}_{target}"] = result["sign_count"].numpy()
                    out[f"tcav_{kind}_magnitude{index}_{target}"] = result["magnitude"].numpy()
            if kind == "own":
                for index, experimental_set in enumerate(experimental_sets):
                    key = "-".join(str(member.id) for member in experimental_set)
                    stats = tcav.cavs[key][layer].stats
                    out[f"tcav_own_cav{index}"] = stats["weights"][0].detach().numpy()  # the concept's row (class 0)
                    out[f"tcav_own_accuracy{index}"] = np.asarray(float(stats["accs"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    with np.load(args.problem) as stored:
        data = {name: stored[name] for name in stored.files}
    config = json.loads(str(data.pop("config")))
    weights = {name[len("w:") :]: value for name, value in data.items() if name.startswith("w:")}
    model = build_model(weights)
    out: dict[str, Any] = {"logits": model(torch.from_numpy(data["x"])).detach().numpy()}
    for part in config["parts"]:
        if part == "attacks":
            out.update(attacks(model, data, config))
        elif part == "relevance":
            out.update(relevance(weights, data, config))
        elif part == "concepts":
            out.update(concepts(model, data, config))
    out["versions"] = np.asarray(f"captum {__import__('captum').__version__}, torch {torch.__version__}")
    np.savez(args.output, **out)


if __name__ == "__main__":
    main()
