"""Captum 0.9 (torch) on the shared problem: one measurement per process.

Runs in ``.venv-peers/captum`` (``torch==2.13.0`` CPU, ``captum==0.9.0``); ``run_peers.py`` starts it. The MLP is
rebuilt with ``nn.Linear`` layers whose ``weight`` is the exported Keras kernel transposed.

Conventions (converted to ours by ``run_peers.py``): the loss is the per-example cross-entropy
(``reduction="none"``), and Captum's influence functions form the Hessian of the **sum** of the per-example losses
over the Hessian dataset, ``N·H`` with ``H`` the Hessian of the mean loss. With ``hessian_reg = N·λ`` its inverse is
``(N (H + λI))⁻¹``, so Captum's scores are ours divided by ``N``. ``NaiveInfluenceFunction`` keeps every eigenpair
(``projection_dim = P``): the exact inverse. TracInCP is ``Σ_c η_c ∇ℓ_c(x)·∇ℓ_c(z)`` as ours.
``TracInCPFast`` (method ``tracin_fast``) takes the final ``nn.Linear``'s weight only, ``Σ_c η_c (a_x·a_z)(g_x·g_z)``,
where our ``TracInCPFast`` also counts its bias, ``Σ_c η_c (a_x·a_z + 1)(g_x·g_z)``: close, not equal.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import problem as spec  # noqa: E402
from torch_model import build_model  # noqa: E402


def setup(problem: spec.Problem, job: spec.Job) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    x_scored, y_scored = spec.scored_train(problem, job)

    def loader(x: np.ndarray, y: np.ndarray) -> Any:
        return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=spec.BATCH_SIZE)

    directory = tempfile.mkdtemp(prefix="captum_checkpoints_")
    checkpoints = problem.checkpoints if job.method in ("tracin", "tracin_fast") else [problem.layers]
    paths = []
    for index, layers in enumerate(checkpoints):
        path = os.path.join(directory, f"checkpoint_{index}.pt")
        torch.save(build_model(layers).state_dict(), path)
        paths.append(path)
    return {
        "model": build_model(problem.layers),
        "hessian_loader": loader(problem.x_train, problem.y_train),
        "train_loader": loader(x_scored, y_scored),
        "test_inputs": (torch.from_numpy(problem.x_test), torch.from_numpy(problem.y_test)),
        "checkpoints": paths,
        "num_hessian": problem.num_train,
        "num_params": problem.num_params,
    }


def _load_checkpoint(model: Any, path: str) -> float:
    import torch

    model.load_state_dict(torch.load(path))
    return spec.LEARNING_RATE


def calculator(state: dict[str, Any], method: str) -> Any:
    from captum.influence import NaiveInfluenceFunction, TracInCP, TracInCPFast
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction  # not re-exported
    from torch import nn

    loss = nn.CrossEntropyLoss(reduction="none")
    common = {
        "model": state["model"],
        "train_dataset": state["train_loader"],
        "checkpoints_load_func": _load_checkpoint,
        "loss_fn": loss,
        "batch_size": spec.BATCH_SIZE,
    }
    if method == "tracin":
        return TracInCP(checkpoints=state["checkpoints"], **common)
    if method == "tracin_fast":
        # The final Linear layer's weight only (Captum leaves its bias out); a summed loss, as Captum requires.
        common["loss_fn"] = nn.CrossEntropyLoss(reduction="sum")
        return TracInCPFast(final_fc_layer=state["model"][2], checkpoints=state["checkpoints"], **common)
    regularization = state["num_hessian"] * spec.DAMPING  # the Hessian is that of the summed loss
    common.update(checkpoint=state["checkpoints"][0], hessian_dataset=state["hessian_loader"])
    if method == "exact":
        return NaiveInfluenceFunction(
            projection_dim=state["num_params"], hessian_reg=regularization, hessian_inverse_tol=1e-12, **common
        )
    if method == "arnoldi":
        return ArnoldiInfluenceFunction(
            projection_dim=spec.ARNOLDI_RANK,
            arnoldi_dim=spec.ARNOLDI_SUBSPACE,
            hessian_reg=regularization,
            hessian_inverse_tol=1e-12,
            seed=0,
            **common,
        )
    raise ValueError(f"Captum has no {method!r} influence function.")


def compute(state: dict[str, Any], job: spec.Job) -> dict[str, np.ndarray]:
    calc = calculator(state, job.method)
    if job.task == "self":
        return {"scores": calc.self_influence(state["train_loader"]).detach().numpy()}
    if job.task == "matrix":
        return {"scores": calc.influence(state["test_inputs"]).detach().numpy()}
    indices, values = calc.influence(state["test_inputs"], k=spec.TOP_K, proponents=True)
    return {"indices": indices.numpy(), "values": values.detach().numpy()}


if __name__ == "__main__":
    spec.run_job(spec.parse_job(), setup, compute)
