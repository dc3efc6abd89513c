"""`make evaluate`: how well every method finds mislabeled examples and predicts retraining, written to the docs.

The page is a list of sections (:data:`SECTIONS`), each a function returning markdown:

* ``mislabeled``: mislabeled detection of every method on the digits MLP (10 % of the labels flipped), beside the
  "training loss" and "random" baselines;
* ``faithfulness``: leave-one-out correlations, the linear datamodeling score and mislabeled-detection ROC AUC of
  every first-order solver and the other pairwise methods, on logistic regression and a small MLP, on digits and
  breast cancer, with "loss only" and "random" baselines;
* ``curvature``: curvature-approximation accuracy, when ``influenciae.evaluation.curvature`` provides it.

The shared problems are in :mod:`influenciae.evaluation.problems`, the faithfulness section in
:mod:`influenciae.evaluation.faithfulness`.

Run (``--sections`` picks some, the size options shrink them for a quick look)::

    python -m influenciae.evaluation.report --output docs/evaluation.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import platform
import re
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.data import from_numpy
from influenciae.evaluation.mislabeling import MislabelingDetectorEvaluator
from influenciae.evaluation.problems import (
    BATCH_SIZE,
    digits_loss,
    digits_problem,
    train_digits_mlp,
)
from influenciae.model import InfluenceModel

__all__ = [
    "SECTIONS",
    "ReportOptions",
    "main",
    "mislabeled_section",
    "run_section",
    "scorers",
]


Scorer = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]


def _self_influence(build: Callable[[Any, tf.data.Dataset], Any]) -> Scorer:
    def score(model: Any, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        train = from_numpy(inputs, labels, batch_size=BATCH_SIZE)
        return np.asarray(build(model, train).self_influence(train))

    return score


def _registered(name: str, watched: Callable[[Any], InfluenceModel] | None = None, **options: Any) -> Scorer:
    """Self-influence of the registered calculator method ``name`` (:mod:`influenciae.influence.registry`).

    Args:
        name: The method's name.
        watched: ``model -> InfluenceModel`` the gradient methods use (which layers); ``None`` for the others.
        **options: Fields of :class:`~influenciae.influence.registry.CalculatorOptions`.
    """
    from influenciae.influence.registry import CalculatorOptions, CalculatorSetup, build_calculator

    def build(model: Any, train: tf.data.Dataset) -> Any:
        influence_model = None if watched is None else watched(model)
        setup = CalculatorSetup(
            model, train, digits_loss(), CalculatorOptions(**options), influence_model=influence_model
        )
        return build_calculator(name, setup)

    return _self_influence(build)


def scorers() -> dict[str, tuple[str, Scorer]]:
    """``{name: (description, scorer)}`` for every method in the table; heavy imports stay inside."""
    from influenciae.influence.first_order import FirstOrderInfluenceCalculator

    damping = 1e-3
    # A network trained by Adam is not exactly at a minimum: over all layers its Hessian has eigenvalues down to about
    # -0.02 here (measured with ExactIHVP), so methods on all layers use a damping that makes H + λI definite.
    network_damping = 3e-2

    def last_layer(model: Any) -> InfluenceModel:
        return InfluenceModel(model, start_layer=-1, loss_function=digits_loss())

    def all_layers(model: Any) -> InfluenceModel:
        return InfluenceModel(model, loss_function=digits_loss())

    table: dict[str, tuple[str, Scorer]] = {
        "influence, exact (last layer)": (
            "FirstOrderInfluenceCalculator, ExactIHVP, damping 1e-3, last Dense layer (330 parameters)",
            _registered("first_order", last_layer, damping=damping),
        ),
        "influence, CG (last layer, Hessian on 512 examples)": (
            "FirstOrderInfluenceCalculator, CG (tolerance 1e-4), n_samples_for_hessian=512, damping 1e-3, last layer",
            _self_influence(
                lambda m, t: FirstOrderInfluenceCalculator(
                    last_layer(m), t, "cg", n_samples_for_hessian=512, damping=damping, ihvp_options={"tolerance": 1e-4}
                )
            ),
        ),
        "RelatIF (last layer)": (
            "FirstOrderInfluenceCalculator(normalize=True), exact, damping 1e-3, last Dense layer",
            _registered("relatif", last_layer, damping=damping),
        ),
        "Arnoldi embeddings (all layers, k=50)": (
            "ArnoldiInfluenceCalculator, subspace 100, 50 eigenvalues of largest magnitude, damping 3e-2",
            _registered("arnoldi", all_layers, subspace_dim=100, rank=50, damping=network_damping),
        ),
    }
    table.update(_optional_scorers(last_layer, all_layers))
    table["training loss (baseline)"] = (
        "per-example training loss",
        lambda m, x, y: all_layers(m).batch_loss((x, y)).numpy(),
    )
    return table


def _optional_scorers(
    last_layer: Callable[[Any], InfluenceModel], all_layers: Callable[[Any], InfluenceModel]
) -> dict[str, tuple[str, Scorer]]:
    """Methods of the other attribution families, when present (those with settings the registry's methods do not
    take, such as TracInCPFast, TRAK's default damping or DeepFool's step count, are built directly)."""
    from influenciae.influence.boundary import SampleBoundaryCalculator
    from influenciae.influence.tracin import TracInCPFast, TracInCPFastRandProj
    from influenciae.influence.trak import TrakCalculator

    extra: dict[str, tuple[str, Scorer]] = {}
    loss = digits_loss()
    extra["TracIn (final model, all layers)"] = (
        "TracIn with the final model as its only checkpoint, learning rate 1",
        _registered("tracin", all_layers, learning_rate=1.0),
    )
    extra["TracInCPFast (final model)"] = (
        "TracInCPFast: last Dense layer through the outer-product identity",
        _self_influence(lambda m, t: TracInCPFast([m], 1.0, loss_function=loss, keep_in_memory=True)),
    )
    extra["TracInCPFastRandProj (k=64)"] = (
        "TracInCPFastRandProj, projection_dim 64, seed 0",
        _self_influence(
            lambda m, t: TracInCPFastRandProj(
                [m], 1.0, projection_dim=64, seed=0, loss_function=loss, keep_in_memory=True
            )
        ),
    )
    extra["representer points, L2 (λ=1e-3)"] = (
        "RepresenterPointL2, last layer refit with λ = 1e-3, explaining the predicted class",
        _registered("representer", l2=1e-3),
    )
    extra["representer points, LJE"] = (
        "RepresenterPointLJE, step 1e-2, exact solver, damping 1e-3",
        _registered("representer_lje", step_size=1e-2, solver="exact", damping=1e-3),
    )
    extra["TRAK (k=512)"] = (
        "TrakCalculator, margin output, Gaussian projection to 512 dimensions of all 2,410 gradients, seed 0",
        _self_influence(lambda m, t: TrakCalculator(all_layers(m), t, 512)),
    )
    extra["sample boundary (DeepFool, input space)"] = (
        "SampleBoundaryCalculator: minus the DeepFool distance to the decision boundary (label-free)",
        _self_influence(lambda m, t: SampleBoundaryCalculator(m, step_nbr=50)),
    )
    extra["weights boundary (DeepFool, last layer)"] = (
        "WeightsBoundaryCalculator: minus the distance in the last layer's weight space (label-free)",
        _registered("weights_boundary"),
    )
    extra["similarity (dot product, hidden layer)"] = (
        "SimilarityInfluence on the hidden layer's activations, dot product: self-influence = squared norm "
        "(cosine self-similarity is always 1 and cannot rank)",
        _registered("similarity", layer=0, similarity="dot"),
    )
    return extra


def mislabeled_section(options: ReportOptions) -> str:
    """Mislabeled detection on the digits MLP, every method: the markdown of one section."""
    inputs, labels = digits_problem()
    table = scorers()
    evaluator = MislabelingDetectorEvaluator(
        inputs,
        labels,
        10,
        lambda x, y, seed: train_digits_mlp(x, y, seed, options.epochs),
        {name: scorer for name, (_, scorer) in table.items()},
        flip_fraction=0.1,
    )
    report = evaluator.evaluate(seeds=tuple(range(options.mislabeled_seeds)))
    return "\n".join(
        [
            "## Finding mislabeled examples: every method on the digits MLP",
            "",
            f"scikit-learn's digits (1,797 images), 10 % of the labels flipped to another class, a 64-32-10 tanh MLP "
            f"trained for {options.epochs} epochs with Adam on the noisy labels; every method ranks the training "
            f"examples by its self-influence (higher = more suspicious). Mean ± standard deviation over "
            f"{options.mislabeled_seeds} seeds (each seed flips other labels and trains a new model).",
            "",
            "* **roc_auc**: probability that a flipped example scores above a clean one.",
            "* **curve_auc**: area under the fraction of flipped labels found vs fraction of the data inspected (the "
            "original Influenciae metric; 0.5 is random).",
            "* **found_at_10 / found_at_20**: fraction of flipped labels among the top 10 % / 20 %.",
            "",
            report.to_markdown(),
            "",
            "| Method | Configuration |",
            "|---|---|",
            *[f"| {name} | {description} |" for name, (description, _) in table.items()],
            "| random | a seeded uniform draw |",
        ]
    )


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """Sizes of the experiments; section functions take the ones they need.

    Attributes:
        epochs: Adam epochs of the digits MLP of the mislabeled-detection section.
        mislabeled_seeds: Seeds of the mislabeled-detection section.
        faithfulness_seeds: Seeds of the faithfulness section.
        num_removals: Leave-one-out retrainings per seed.
        num_subsets: LDS subsets per seed.
        problems: Problems of the faithfulness section.
        kinds: Model kinds of the faithfulness section.
    """

    epochs: int = 200
    mislabeled_seeds: int = 2
    faithfulness_seeds: int = 1
    num_removals: int = 20
    num_subsets: int = 20
    problems: tuple[str, ...] = ("digits", "breast_cancer")
    kinds: tuple[str, ...] = ("logistic", "mlp")


# Sections, in page order: "module:function" taking a ReportOptions (or no positional argument, then it is called
# without arguments, with its own defaults) and returning markdown that
# starts with a "## " heading. A section whose module is missing is skipped; one that fails is reported on the page
# without losing the others.
SECTIONS = {
    "mislabeled": "influenciae.evaluation.report:mislabeled_section",
    "faithfulness": "influenciae.evaluation.faithfulness:faithfulness_section",
    "curvature": "influenciae.evaluation.curvature:curvature_accuracy_section",
}
"""The page's sections, in order: name -> ``"module:function"`` returning the section's markdown."""


COMMAND = "python -m influenciae.evaluation.report --output docs/evaluation.md"


def run_section(target: str, options: ReportOptions) -> str | None:
    """The markdown of one section; None when its module does not exist (yet)."""
    import importlib
    import inspect

    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise
    function = getattr(module, function_name, None)
    if function is None:
        return None
    positional = [
        parameter
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    return str(function(options) if positional else function())


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation sections and write the markdown page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/evaluation.md")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--epochs", type=int, default=ReportOptions.epochs)
    parser.add_argument("--seeds", type=int, default=ReportOptions.mislabeled_seeds, help="mislabeled-detection seeds")
    parser.add_argument("--faithfulness-seeds", type=int, default=ReportOptions.faithfulness_seeds)
    parser.add_argument("--removals", type=int, default=ReportOptions.num_removals)
    parser.add_argument("--subsets", type=int, default=ReportOptions.num_subsets)
    parser.add_argument(
        "--problems", nargs="+", choices=["digits", "breast_cancer"], default=list(ReportOptions.problems)
    )
    parser.add_argument("--kinds", nargs="+", choices=["logistic", "mlp"], default=list(ReportOptions.kinds))
    arguments = parser.parse_args(argv)
    options = ReportOptions(
        epochs=arguments.epochs,
        mislabeled_seeds=arguments.seeds,
        faithfulness_seeds=arguments.faithfulness_seeds,
        num_removals=arguments.removals,
        num_subsets=arguments.subsets,
        problems=tuple(arguments.problems),
        kinds=tuple(arguments.kinds),
    )

    start = time.perf_counter()
    bodies: list[tuple[str, str, float]] = []
    for name in arguments.sections:
        section_start = time.perf_counter()
        try:
            body = run_section(SECTIONS[name], options)
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
            where = traceback.extract_tb(error.__traceback__)[-1]
            body = (
                f"## {name}\n\nThis section failed at `{where.filename}:{where.lineno}`: "
                f"`{type(error).__name__}: {str(error).strip()[:500]}`."
            )
        if body is None:
            continue
        bodies.append((name, body.strip(), time.perf_counter() - section_start))
        print(body, flush=True)
    stamp = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, TensorFlow "
        f"{tf.__version__}, Keras {importlib.metadata.version('keras')}"
    )
    blocks = {name: _section_block(name, body, stamp, seconds) for name, body, seconds in bodies}
    previous = Path(arguments.output).read_text(encoding="utf-8") if Path(arguments.output).is_file() else ""
    page = _assemble(blocks, previous)
    Path(arguments.output).write_text(page, encoding="utf-8")
    print(f"wrote {arguments.output} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def _section_block(name: str, body: str, stamp: str, seconds: float) -> str:
    return (
        f"<!-- section:{name} -->\n{body}\n\n*Section `{name}`: run on {stamp}, in {seconds:.0f} s.*\n"
        f"<!-- /section:{name} -->"
    )


def _assemble(blocks: dict[str, str], previous: str) -> str:
    """The page: the sections just run, and the other sections' blocks kept from the previous page.

    Running ``--sections curvature`` alone therefore refreshes that section and leaves the others as they were
    generated (each block carries its own run date and duration).
    """
    parts = []
    for name in SECTIONS:
        if name in blocks:
            parts.append(blocks[name])
            continue
        match = re.search(rf"<!-- section:{name} -->.*?<!-- /section:{name} -->", previous, flags=re.DOTALL)
        if match:
            parts.append(match.group(0))
    header = ["# Evaluation", "", f"Generated by `make evaluate` (`{COMMAND}`); do not edit by hand.", ""]
    return "\n".join([*header, *[part for block in parts for part in (block, "")]])


if __name__ == "__main__":
    raise SystemExit(main())
