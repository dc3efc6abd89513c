"""pyDVL 0.10 influence (torch) on the shared problem: one measurement per process.

Runs in ``.venv-peers/pydvl`` (``torch==2.13.0`` CPU, ``pydvl[influence]==0.10.0``); ``run_peers.py`` starts it.
The MLP is rebuilt with ``nn.Linear`` layers whose ``weight`` is the exported Keras kernel transposed.

Conventions: the loss is ``F.cross_entropy`` (mean over the batch) and pyDVL averages the Hessian over the data, so
its ``H`` and its ``regularization`` are our mean-loss Hessian and damping ``λ``; per-example gradients are those of
single examples. ``influences`` (``InfluenceMode.Up``) is ``⟨H⁻¹∇ℓ(x_test), ∇ℓ(z)⟩``: ours with the same sign and
scale. pyDVL has no self-influence method nor top-k search: self-influence is the diagonal of
``influences_from_factors`` applied to the training set's own factors (one solve per example, like ours), and
top-k is not offered (n/a). LiSSA reads the data loader with ``batch_size = N`` so that each of its steps uses the
full Hessian, like ours and Influenciae's.

``nystrom`` is ``NystroemSketchInfluence`` (rank :data:`problem.NYSTROM_RANK` sketch of the Hessian, inverted by
Woodbury with ``λ``), ``ekfac`` is ``EkfacInfluence(update_diagonal=True, hessian_regularization=λ)``: its own
cross-entropy, its Kronecker factors and corrected eigenvalues from one backward pass per batch of the pseudo-loss
``Σ_c √p_c log p_c`` (``empirical_cross_entropy_loss_fn``), averaged over the examples.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import problem as spec  # noqa: E402
from torch_model import build_model  # noqa: E402


def setup(problem: spec.Problem, job: spec.Job) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    if job.task == "topk":
        raise SystemExit("pyDVL has no top-k search.")
    if job.method == "tracin":
        raise SystemExit("pyDVL has no TracIn.")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    x_scored, y_scored = spec.scored_train(problem, job)
    full = TensorDataset(torch.from_numpy(problem.x_train), torch.from_numpy(problem.y_train))
    batch_size = problem.num_train if job.method == "lissa" else spec.BATCH_SIZE
    return {
        "model": build_model(problem.layers),
        "loader": DataLoader(full, batch_size=batch_size),
        "x": torch.from_numpy(x_scored),
        "y": torch.from_numpy(y_scored),
        "x_test": torch.from_numpy(problem.x_test),
        "y_test": torch.from_numpy(problem.y_test),
        "lissa_scale": problem.lissa_scale,
    }


def calculator(state: dict[str, Any], method: str) -> Any:
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        DirectInfluence,
        EkfacInfluence,
        LissaInfluence,
        NystroemSketchInfluence,
    )
    from torch.nn.functional import cross_entropy

    model = state["model"]
    if method == "exact":
        influence = DirectInfluence(model, cross_entropy, regularization=spec.DAMPING)
    elif method == "cg":
        influence = CgInfluence(
            model,
            cross_entropy,
            regularization=spec.DAMPING,
            rtol=spec.CG_TOLERANCE,
            atol=0.0,
            maxiter=spec.CG_MAX_ITERATIONS,
            solve_simultaneously=True,
            warn_on_max_iteration=False,
        )
    elif method == "lissa":
        influence = LissaInfluence(
            model,
            cross_entropy,
            regularization=spec.DAMPING,
            maxiter=spec.LISSA_DEPTH,
            scale=state["lissa_scale"],
            rtol=0.0,  # never stops early: a fixed number of steps
            warn_on_max_iteration=False,
        )
    elif method == "arnoldi":
        influence = ArnoldiInfluence(
            model,
            cross_entropy,
            regularization=spec.DAMPING,
            rank=spec.ARNOLDI_RANK,
            krylov_dimension=spec.ARNOLDI_SUBSPACE,
        )
    elif method == "nystrom":
        influence = NystroemSketchInfluence(model, cross_entropy, regularization=spec.DAMPING, rank=spec.NYSTROM_RANK)
    elif method == "ekfac":
        influence = EkfacInfluence(model, update_diagonal=True, hessian_regularization=spec.DAMPING)
    else:
        raise ValueError(f"pyDVL has no {method!r} influence.")
    return influence.fit(state["loader"])


def compute(state: dict[str, Any], job: spec.Job) -> dict[str, np.ndarray]:
    import torch

    influence = calculator(state, job.method)
    x, y = state["x"], state["y"]
    if job.task == "matrix":
        return {"scores": influence.influences(state["x_test"], state["y_test"], x, y).detach().numpy()}
    factors = influence.influence_factors(x, y)
    diagonal = []
    for start in range(0, len(x), spec.BATCH_SIZE):
        stop = start + spec.BATCH_SIZE
        block = influence.influences_from_factors(factors[start:stop], x[start:stop], y[start:stop])
        diagonal.append(torch.diagonal(block).detach())
    return {"scores": torch.cat(diagonal).numpy()}


if __name__ == "__main__":
    spec.run_job(spec.parse_job(), setup, compute)
