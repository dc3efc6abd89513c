"""The registry of influence-calculator methods: one entry per method, by name.

Each :class:`CalculatorMethod` names a calculator family, says which tasks it supports (self-influence only, or also
scores of training examples against test examples) and which of the common options it reads, and builds a calculator
from a :class:`CalculatorSetup` (a Keras model, the training dataset, the per-example loss and the options). The
command line (``influenciae self-influence`` / ``top-k``), the demo, the evaluation harnesses and the registry tests
read :data:`METHODS`; a new calculator family is one entry here.

Example:
    >>> setup = CalculatorSetup(model, train, loss, CalculatorOptions(damping=1e-3, solver="cg"))
    >>> calculator = build_calculator("first_order", setup)
    >>> scores = calculator.self_influence(train)  # [N_train]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "TASKS",
    "CalculatorMethod",
    "CalculatorOptions",
    "CalculatorSetup",
    "METHODS",
    "build_calculator",
    "get_method",
    "registered_methods",
]

TASKS = ("self_influence", "top_k")
"""``self_influence``: a score per training example; ``top_k``: scores of training examples against test examples."""


@dataclasses.dataclass(frozen=True)
class CalculatorOptions:
    """The options the methods share; ``None`` means the method's own default.

    Attributes:
        damping: λ added to the Hessian (first_order, relatif, arnoldi, representer_lje, trak).
        solver: Inverse-HVP solver name of first_order, relatif and representer_lje (``None``: ``"exact"``).
        solver_options: Keyword options of the solver's constructor.
        start_layer: First watched layer (index or name) of the gradient methods (``None``: ``-1``, the last layer).
        subspace_dim: arnoldi's Krylov dimension (``None``: ``min(P, 200)``).
        rank: arnoldi's eigenpairs kept (``None``: the subspace dimension).
        learning_rate: tracin's checkpoint learning rate (``None``: 1).
        l2: representer's λ of the last layer's refit (``None``: 1e-3).
        step_size: representer_lje's step away from the weights (``None``: 1e-2).
        projection_dim: trak's projection dimension (``None``: no projection).
        layer: similarity's compared layer (``None``: -2).
        similarity: similarity's measure (``None``: ``"cosine"``).
        seed: Seed of arnoldi and trak.
        show_progress: Progress bars of the calculator.
    """

    damping: float = 0.0
    solver: str | None = None
    solver_options: Mapping[str, Any] | None = None
    start_layer: int | str | None = None
    subspace_dim: int | None = None
    rank: int | None = None
    learning_rate: float | None = None
    l2: float | None = None
    step_size: float | None = None
    projection_dim: int | None = None
    layer: int | str | None = None
    similarity: str | None = None
    seed: int = 0
    show_progress: bool = False


@dataclasses.dataclass(frozen=True)
class CalculatorSetup:
    """What a builder needs.

    Attributes:
        model: The Keras model (outputs ``[B, C]``).
        train: The training ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])`` batches.
        loss_function: The per-example loss (reduction none), ``loss(y_true, y_pred) -> [B]``.
        options: The common options.
        regression: Whether the targets are regression targets (TRAK then measures the output, not the margin).
        influence_model: An :class:`~influenciae.model.InfluenceModel` of ``model`` the gradient methods use as is
            (its watched weights, loss and HVP settings); ``None`` builds one from ``model``, ``options.start_layer``
            and ``loss_function``.
    """

    model: Any
    train: Any
    loss_function: Any
    options: CalculatorOptions = dataclasses.field(default_factory=CalculatorOptions)
    regression: bool = False
    influence_model: Any = None


@dataclasses.dataclass(frozen=True)
class CalculatorMethod:
    """An influence method, by name.

    Attributes:
        name: The method's name (the CLI's ``--method`` value).
        description: One line for ``--help`` and reports, with the score's sign.
        build: ``build(setup) -> calculator`` (a :class:`~influenciae.influence.base.BaseInfluenceCalculator`).
        tasks: The tasks of :data:`TASKS` it supports.
        options: The fields of :class:`CalculatorOptions` specific to it (besides ``damping``, ``seed`` and
            ``show_progress``); the CLI refuses the others.
        gradients: Whether it differentiates a loss with respect to watched weights.
    """

    name: str
    description: str
    build: Callable[[CalculatorSetup], Any]
    tasks: tuple[str, ...] = TASKS
    options: tuple[str, ...] = ()
    gradients: bool = True

    @property
    def pairwise(self) -> bool:
        """Whether it scores training examples against test examples (``top_k``), not only self-influence."""
        return "top_k" in self.tasks


def _influence_model(setup: CalculatorSetup) -> Any:
    from influenciae.model import InfluenceModel

    if setup.influence_model is not None:
        return setup.influence_model
    start = setup.options.start_layer
    # "from this layer to the output" (start -1 = the last layer's weights), which also keeps the MigrationWarning
    # (for code written for the original's "layer k only") away.
    return InfluenceModel(
        setup.model, start_layer=-1 if start is None else start, last_layer=-1, loss_function=setup.loss_function
    )


def _first_order(setup: CalculatorSetup, *, normalize: bool = False) -> Any:
    from influenciae.influence.first_order import FirstOrderInfluenceCalculator

    options = setup.options
    return FirstOrderInfluenceCalculator(
        _influence_model(setup),
        setup.train,
        ihvp_calculator=options.solver or "exact",
        normalize=normalize,
        damping=options.damping,
        ihvp_options=dict(options.solver_options) if options.solver_options else None,
        show_progress=options.show_progress,
    )


def _relatif(setup: CalculatorSetup) -> Any:
    return _first_order(setup, normalize=True)


def _arnoldi(setup: CalculatorSetup) -> Any:
    from influenciae.influence.arnoldi import ArnoldiInfluenceCalculator

    options = setup.options
    return ArnoldiInfluenceCalculator(
        _influence_model(setup),
        setup.train,
        subspace_dim=options.subspace_dim,
        k_largest_eig_vals=options.rank,
        damping=options.damping,
        seed=options.seed,
        show_progress=options.show_progress,
    )


def _tracin(setup: CalculatorSetup) -> Any:
    from influenciae.influence.tracin import TracIn

    learning_rate = 1.0 if setup.options.learning_rate is None else setup.options.learning_rate
    return TracIn([_influence_model(setup)], learning_rate, show_progress=setup.options.show_progress)


def _representer(setup: CalculatorSetup) -> Any:
    from influenciae.influence.representer import RepresenterPointL2

    l2 = 1e-3 if setup.options.l2 is None else setup.options.l2
    return RepresenterPointL2(
        setup.model, setup.train, setup.loss_function, l2, show_progress=setup.options.show_progress
    )


def _representer_lje(setup: CalculatorSetup) -> Any:
    from influenciae.influence.representer import RepresenterPointLJE

    options = setup.options
    return RepresenterPointLJE(
        setup.model,
        setup.train,
        setup.loss_function,
        step_size=1e-2 if options.step_size is None else options.step_size,
        ihvp_calculator=options.solver or "exact",
        damping=options.damping,
        ihvp_options=dict(options.solver_options) if options.solver_options else None,
        show_progress=options.show_progress,
    )


def _trak(setup: CalculatorSetup) -> Any:
    from influenciae.influence.trak import TrakCalculator

    options = setup.options
    return TrakCalculator(
        _influence_model(setup),
        setup.train,
        options.projection_dim,
        seed=options.seed,
        damping=options.damping,
        output_function="output" if setup.regression else "margin",
        show_progress=options.show_progress,
    )


def _similarity(setup: CalculatorSetup) -> Any:
    from influenciae.influence.similarity import SimilarityInfluence

    layer = -2 if setup.options.layer is None else setup.options.layer
    measure = setup.options.similarity or "cosine"
    return SimilarityInfluence(setup.model, layer, measure, show_progress=setup.options.show_progress)


def _sample_boundary(setup: CalculatorSetup) -> Any:
    from influenciae.influence.boundary import SampleBoundaryCalculator

    return SampleBoundaryCalculator(setup.model, show_progress=setup.options.show_progress)


def _weights_boundary(setup: CalculatorSetup) -> Any:
    from influenciae.influence.boundary import WeightsBoundaryCalculator

    return WeightsBoundaryCalculator(setup.model, show_progress=setup.options.show_progress)


_GRADIENT = ("start_layer",)
_SOLVED = ("solver", "solver_options")
_SELF_ONLY = ("self_influence",)
METHODS: dict[str, CalculatorMethod] = {
    method.name: method
    for method in (
        CalculatorMethod(
            "first_order",
            "Koh & Liang's influence ∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z) (positive: z helps x; high self-influence: atypical, mislabeled)",
            _first_order,
            options=(*_GRADIENT, *_SOLVED),
        ),
        CalculatorMethod(
            "relatif",
            "RelatIF: first-order influence with the training side normalized by ‖H⁻¹∇ℓ(z)‖",
            _relatif,
            options=(*_GRADIENT, *_SOLVED),
        ),
        CalculatorMethod(
            "arnoldi",
            "first-order influence through the top eigenpairs of H (Schioppa et al.); same sign and scale",
            _arnoldi,
            options=(*_GRADIENT, "subspace_dim", "rank"),
        ),
        CalculatorMethod(
            "tracin",
            "TracIn with the saved model as its single checkpoint: η ∇ℓ(x)·∇ℓ(z) (positive: z helps x)",
            _tracin,
            options=(*_GRADIENT, "learning_rate"),
        ),
        CalculatorMethod(
            "representer",
            "representer points with an L2-refit last layer (Yeh et al.): positive = excitatory for the prediction",
            _representer,
            options=("l2",),
        ),
        CalculatorMethod(
            "representer_lje",
            "representer points by local Jacobian expansion of the last layer (Sui et al.)",
            _representer_lje,
            options=(*_SOLVED, "step_size"),
        ),
        CalculatorMethod(
            "trak",
            "TRAK (Park et al.) with the saved model as its single checkpoint: positive = z raises x's margin",
            _trak,
            options=(*_GRADIENT, "projection_dim"),
        ),
        CalculatorMethod(
            "similarity",
            "similarity of a layer's activations (not an influence): higher = more similar",
            _similarity,
            options=("layer", "similarity"),
            gradients=False,
        ),
        CalculatorMethod(
            "sample_boundary",
            "minus the DeepFool distance of the input to the decision boundary (self-influence only, label-free)",
            _sample_boundary,
            tasks=_SELF_ONLY,
            gradients=False,
        ),
        CalculatorMethod(
            "weights_boundary",
            "minus the distance of the last layer's weights to the example's boundary (self-influence only)",
            _weights_boundary,
            tasks=_SELF_ONLY,
            gradients=False,
        ),
    )
}
"""The registered calculator methods, by name (the CLI's ``--method`` values, in ``--help`` order)."""


def registered_methods(task: str | None = None) -> tuple[str, ...]:
    """The registered method names, in registration order.

    Args:
        task: One of :data:`TASKS` to keep only the methods supporting it; ``None`` lists all.

    Returns:
        The names.

    Raises:
        ValueError: If ``task`` is not one of :data:`TASKS`.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}.")
    return tuple(name for name, method in METHODS.items() if task is None or task in method.tasks)


def get_method(name: str) -> CalculatorMethod:
    """The registered method called ``name``.

    Raises:
        ValueError: If no method has that name (the message lists the registered ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown calculator method {name!r}; registered: {', '.join(METHODS)}.") from None


def build_calculator(name: str, setup: CalculatorSetup) -> Any:
    """Build the calculator of the method ``name`` from ``setup``.

    Args:
        name: A registered method name (:func:`registered_methods`).
        setup: The model, the training data, the loss and the options.

    Returns:
        The calculator (a :class:`~influenciae.influence.base.BaseInfluenceCalculator`).

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return get_method(name).build(setup)
