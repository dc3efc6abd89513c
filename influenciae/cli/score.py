"""``influenciae score``: score a sharded training set on an Apache Beam runner, with a reusable solver state.

Two phases:

1. **Solver state** (``--state``): loaded when the file exists and fits the model; otherwise computed in this
   process (the Hessian products optionally on a ``tf.distribute`` strategy, ``--strategy``) and saved atomically.
   A failed or interrupted job restarts from the saved state instead of recomputing it.
2. **Scoring pass**: the Beam pipeline of :mod:`influenciae.distributed.beam` on ``--runner`` (DirectRunner here,
   ``DataflowRunner``/``FlinkRunner``/``SparkRunner`` on a cluster, with ``--pipeline-options``). A complete output of
   the same job is kept as is; an incomplete one is recomputed.

The command is registered in ``influenciae.cli.COMMANDS`` through :func:`add_arguments` and :func:`run`.

Example:
    $ influenciae score --model model.keras --train "data/train-*.tfrecord" --test "data/test-*.tfrecord" \\
        --state runs/state.npz --output runs/scores --mode top_k -k 10 --num-workers 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from influenciae.app.arguments import integer_at_least, non_negative_float  # the types of every command

__all__ = ["add_arguments", "run", "HELP"]

HELP = "score a sharded training set (influence vectors, self-influence, top-k) on an Apache Beam runner"
"""One-line help of the ``score`` subcommand."""


_positive_int = integer_at_least(1)


def _output_dir(text: str) -> str:
    """A local output path must not be, or lie under, a file (remote ``scheme://`` paths are left to Beam)."""
    if "://" in text:
        return text
    path = Path(text)
    for candidate in (path, *path.parents):
        if candidate.is_file():
            raise argparse.ArgumentTypeError(
                f"{candidate} is a file, so {text} cannot be a directory: give a directory"
            )
        if candidate.exists():
            break
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``influenciae score``."""
    from influenciae.hessian.registry import registered_solvers  # the package (and TensorFlow) is imported already
    from influenciae.influence.registry import registered_methods

    data = parser.add_argument_group("inputs and outputs")
    data.add_argument("--model", required=True, help="saved .keras model (compiled with its loss, or see --loss)")
    data.add_argument(
        "--train", required=True, help="glob of the training TFRecord files (records with an 'index', 'x', 'y')"
    )
    data.add_argument(
        "--output", "-o", required=True, type=_output_dir, help="output directory (parts, top_k.npz, _MANIFEST.json)"
    )
    data.add_argument(
        "--state", help="first_order: solver state file, reused if present, else computed and saved (required)"
    )
    data.add_argument("--test", help="glob of the test TFRecord files (to compute the state for --mode top_k)")
    data.add_argument("--loss", help="Keras loss name instead of the compiled loss")
    data.add_argument("--from-logits", action="store_true", help="with --loss: the model outputs logits")

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--method",
        choices=registered_methods(),
        default="first_order",
        help="calculator each worker builds (default: first_order, through --state); others need no state",
    )
    scoring.add_argument("--learning-rate", type=float, help="tracin: the checkpoint's learning rate (default: 1)")
    scoring.add_argument("--projection-dim", type=_positive_int, help="trak: projection dimension (default: none)")
    scoring.add_argument("--seed", type=int, default=0, help="trak, arnoldi: seed (default: 0)")
    scoring.add_argument("--mode", choices=("top_k", "self_influence", "vectors"), default="top_k")
    scoring.add_argument("-k", type=_positive_int, default=10, help="examples kept per test example (default: 10)")
    scoring.add_argument("--order", choices=("descending", "ascending"), default="descending")
    scoring.add_argument("--batch-size", type=_positive_int, default=64, help="examples per batch and output part")

    solver = parser.add_argument_group("solver state (computed only when --state does not exist)")
    solver.add_argument(
        "--solver",
        choices=registered_solvers(operator_only=True),  # those that run on a (distributed) Hessian operator
        default="exact",
        help="inverse-HVP solver (default: exact)",
    )
    solver.add_argument("--damping", type=non_negative_float, default=1e-3, help="Hessian damping (default: 1e-3)")
    solver.add_argument("--rank", type=_positive_int, default=50, help="eigenpairs kept by arnoldi (default: 50)")
    solver.add_argument("--hessian-data", help="glob of the Hessian's TFRecord files (default: --train)")
    solver.add_argument("--hessian-samples", type=_positive_int, help="use the first N examples for the Hessian")
    solver.add_argument(
        "--strategy",
        choices=("default", "mirrored", "multi_worker"),
        default="default",
        help="tf.distribute strategy of the Hessian products (multi_worker reads TF_CONFIG)",
    )

    engine = parser.add_argument_group("Beam runner")
    engine.add_argument("--runner", default="DirectRunner", help="Beam runner (default: %(default)s)")
    engine.add_argument("--num-workers", type=_positive_int, default=1, help="DirectRunner workers (default: 1)")
    engine.add_argument(
        "--direct-running-mode",
        choices=("in_memory", "multi_threading", "multi_processing"),
        default=None,
        help="DirectRunner mode (default: multi_processing with several workers, else in_memory)",
    )
    engine.add_argument(
        "--pipeline-options",
        default="",
        help='more Beam options in one string, e.g. "--project=p --region=r --temp_location=gs://b/tmp"',
    )
    engine.add_argument("--overwrite", action="store_true", help="replace a complete output of another job")


def _strategy(name: str) -> Any:
    from influenciae._backend import tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return None


def _solver_state(args: argparse.Namespace) -> tuple[Any, str]:
    """Load the state when it exists (checked against the model), else compute and save it."""
    from influenciae.distributed.beam import copy_to, exists, local_copy
    from influenciae.distributed.records import read_tfrecords
    from influenciae.distributed.state import SolverState, load_influence_model
    from influenciae.distributed.strategy import distributed_ihvp

    model_path = local_copy(args.model, ".keras")  # the model and the state may live in gs://, s3://...
    # what the state's arrays depend on besides the model: a saved state made for another request is refused
    request = {
        "solver": args.solver,
        "damping": args.damping,
        "rank": args.rank if args.solver == "arnoldi" else None,
        "hessian_data": args.hessian_data or args.train,
        "hessian_samples": args.hessian_samples,
        "test": args.test,
    }
    if exists(args.state):
        model = load_influence_model(model_path, loss=args.loss, from_logits=args.from_logits)
        return SolverState.load(local_copy(args.state, ".npz"), model=model, request=request), "reused"
    if args.mode == "top_k" and not args.test:
        raise ValueError("--mode top_k needs --test to compute the solver state (the test factors).")
    if args.mode != "top_k" and args.solver not in ("exact", "arnoldi"):
        raise ValueError(f"--mode {args.mode} needs a preconditioner: use --solver exact or --solver arnoldi.")
    strategy = _strategy(args.strategy)
    model = load_influence_model(model_path, loss=args.loss, from_logits=args.from_logits, strategy=strategy)
    hessian_data = read_tfrecords(
        args.hessian_data or args.train, batch_size=args.batch_size, limit=args.hessian_samples
    )
    options: dict[str, Any] = {}
    if args.solver == "arnoldi":
        rank = min(args.rank, model.nb_params)
        options = {"subspace_dim": min(2 * rank, model.nb_params), "k_largest_eig_vals": rank}
    ihvp = distributed_ihvp(strategy, model, hessian_data, args.solver, damping=args.damping, **options)
    test = read_tfrecords(args.test, batch_size=args.batch_size) if args.test else None
    state = SolverState.from_solver(model, ihvp, test_set=test, request=request)
    if strategy is None or _is_chief(strategy):  # every worker computed it; the chief writes it, atomically
        with tempfile.TemporaryDirectory() as directory:
            copy_to(state.save(Path(directory) / "state.npz"), args.state)
    return state, "computed"


def _is_chief(strategy: Any) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is None or resolver.task_id in (0, None)


def _pipeline_args(args: argparse.Namespace) -> list[str]:
    pipeline = [f"--runner={args.runner}"]
    if args.runner == "DirectRunner":
        mode = args.direct_running_mode or ("multi_processing" if args.num_workers > 1 else "in_memory")
        pipeline += [f"--direct_num_workers={args.num_workers}", f"--direct_running_mode={mode}"]
    return pipeline + shlex.split(args.pipeline_options)


def run(args: argparse.Namespace) -> int:
    """Run ``influenciae score``; returns the exit code (0)."""
    try:
        from influenciae.distributed.beam import ScoringJob, is_complete, run_scoring
    except ImportError as error:
        raise ImportError(
            "influenciae score runs on Apache Beam: pip install 'influenciae[beam]' (in an environment with "
            f"protobuf < 7, see docs/distributed.md). ({error})"
        ) from error

    if args.method == "first_order":
        if not args.state:
            raise ValueError("--method first_order scores through a solver state: pass --state (a file path).")
        started = time.perf_counter()
        state, how = _solver_state(args)
        state_seconds = time.perf_counter() - started
        print(
            f"solver state {how}: {args.state} ({state.preconditioner} preconditioner, "
            f"{0 if state.factors is None else state.factors.shape[0]} test factors, {state_seconds:.1f} s)"
        )
    elif args.mode == "top_k" and not args.test:
        raise ValueError(f"--method {args.method} --mode top_k needs --test (the test TFRecords).")
    options = {
        "learning_rate": args.learning_rate,
        "projection_dim": args.projection_dim,
        "seed": args.seed,
        "damping": args.damping,
    }
    job = ScoringJob(
        input_pattern=args.train,
        model_path=args.model,
        state_path=args.state if args.method == "first_order" else None,
        method=args.method,
        options={} if args.method == "first_order" else {k: v for k, v in options.items() if v is not None},
        test_pattern=None if args.method == "first_order" else args.test,
        output_dir=args.output,
        mode=args.mode,
        k=args.k,
        order=args.order,
        batch_size=args.batch_size,
        loss=args.loss,
        from_logits=args.from_logits,
    )
    already = is_complete(args.output)
    started = time.perf_counter()
    manifest = run_scoring(job, _pipeline_args(args), overwrite=args.overwrite)
    summary = {
        "output": args.output,
        "mode": args.mode,
        "num_examples": manifest["num_examples"],
        "parts": len(manifest["parts"]),
        "top_k": manifest["top_k"],
        "seconds": round(time.perf_counter() - started, 1),
        "status": "complete output kept" if already and not args.overwrite else "scored",
    }
    print(json.dumps(summary))
    return 0
