"""Kronfluence 1.0 (torch, EK-FAC) on the shared problem: one measurement per process.

Runs in ``.venv-peers/kronfluence`` (``torch==2.13.0`` CPU pinned after ``kronfluence==1.0.1``, whose torchvision
requirement would otherwise pull a newer CUDA torch); ``run_peers.py`` starts it. The MLP is rebuilt with
``nn.Linear`` layers whose ``weight`` is the exported Keras kernel transposed. (torchvision's compiled operators do not
load with the CPU torch; Kronfluence never imports torchvision.)

Conventions: the task's training loss is the summed cross-entropy of a batch (Kronfluence's convention: per-example
gradients are those of single examples); the measurement is the test example's cross-entropy. Kronfluence
averages its covariance and eigenvalue-correction statistics over the examples (the mean-loss curvature, like
ours) and adds ``ScoreArguments.damping_factor`` (here the absolute ``λ``) to every corrected eigenvalue. Its
statistics are those of the **sampled** (true) Fisher: labels drawn from the model's softmax once per example
(``use_empirical_fisher=False``, its default; torch seed 0), where ours uses the exact expectation over the classes
(``fisher="expected"``). Scores: ``compute_pairwise_scores`` (test × train) and ``compute_self_scores``; it has no
top-k search (n/a). Its factors and scores are written to a temporary directory, as Kronfluence always does.
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


def _task() -> Any:
    import torch
    from kronfluence.task import Task
    from torch.nn.functional import cross_entropy

    class Classification(Task):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            inputs, labels = batch
            return cross_entropy(model(inputs), labels, reduction="sum")

    return Classification()


def setup(problem: spec.Problem, job: spec.Job) -> dict[str, Any]:
    import torch
    from kronfluence.analyzer import prepare_model
    from torch.utils.data import TensorDataset

    if job.task == "topk":
        raise SystemExit("Kronfluence has no top-k search.")
    if job.method != "ekfac":
        raise SystemExit(f"Kronfluence has no {job.method!r} here (EK-FAC and K-FAC only).")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    x_scored, y_scored = spec.scored_train(problem, job)
    task = _task()
    return {
        "model": prepare_model(build_model(problem.layers), task),
        "task": task,
        "hessian": TensorDataset(torch.from_numpy(problem.x_train), torch.from_numpy(problem.y_train)),
        "train": TensorDataset(torch.from_numpy(x_scored), torch.from_numpy(y_scored)),
        "test": TensorDataset(torch.from_numpy(problem.x_test), torch.from_numpy(problem.y_test)),
        "directory": tempfile.mkdtemp(prefix="kronfluence_"),
        "calls": 0,
    }


def compute(state: dict[str, Any], job: spec.Job) -> dict[str, np.ndarray]:
    import torch
    from kronfluence.analyzer import Analyzer
    from kronfluence.arguments import FactorArguments, ScoreArguments

    torch.manual_seed(0)  # the sampled Fisher labels: the same in the cold and the warm call
    state["calls"] += 1
    name = f"run{state['calls']}"  # a fresh analysis per call: factors are fitted again, nothing read back
    analyzer = Analyzer(
        analysis_name=name,
        model=state["model"],
        task=state["task"],
        cpu=True,
        disable_tqdm=True,
        output_dir=state["directory"],
    )
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=state["hessian"],
        per_device_batch_size=spec.BATCH_SIZE,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    score_args = ScoreArguments(damping_factor=spec.DAMPING)
    if job.task == "matrix":
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=state["test"],
            train_dataset=state["train"],
            per_device_query_batch_size=spec.TEST_SIZE,
            per_device_train_batch_size=spec.BATCH_SIZE,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    else:
        analyzer.compute_self_scores(
            scores_name="self",
            factors_name="ekfac",
            train_dataset=state["train"],
            per_device_train_batch_size=spec.BATCH_SIZE,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_self_scores("self")["all_modules"]
    return {"scores": scores.detach().cpu().numpy()}


if __name__ == "__main__":
    spec.run_job(spec.parse_job(), setup, compute)
