"""Speed and agreement against the peer libraries: the original Influenciae 0.3.0, Captum 0.9 and pyDVL 0.10.

From the repository root::

    make bench-peers    # = .venv/bin/python benchmarks/peers/run_peers.py --output docs/benchmarks.md

1. Creates one virtual environment per peer under ``.venv-peers/`` (once: a stamp file records what was installed).
2. ``ours.py prepare`` trains the MLP of ``problem.py`` on digits for each training-set size and exports data and
   weights (final and TracIn checkpoints) to ``.npz`` files.
3. Runs every measurement in a fresh subprocess, with the library's own virtual environment: one library, one
   method, one task, one size. Each reports its wall time (model load excluded; solver set-up included) and its
   peak RSS (``ru_maxrss``), and saves its scores.
4. Converts each peer's scores to our conventions and compares them with ours (Pearson, largest difference).
5. Writes the results between ``<!-- peers:begin -->`` and ``<!-- peers:end -->`` in the output file (replacing
   the block, or appending it), and exits non-zero when an exact method disagrees (Pearson < 0.99).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import blocks  # noqa: E402
from benchmarks.peers import problem as spec  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = ".venv/bin/python benchmarks/peers/run_peers.py --output docs/benchmarks.md"
DEFAULT_SIZES = (500, 1500)
VENVS = ROOT / ".venv-peers"
TIMEOUT_SECONDS = 600
EXACT_HESSIAN_BATCH_INFLUENCIAE = 10  # peer_influenciae030.EXACT_HESSIAN_BATCH
MEMORY_LIMIT_MIB = 6 * 1024  # a worker growing past this is stopped (reported as such)
EXACT_PEARSON = 0.99  # below this an exact method disagrees: run_peers exits non-zero


@dataclass(frozen=True)
class Library:
    """One library of the comparison.

    Attributes:
        name: Key (file names, venv directory).
        title: Name in the report.
        script: Worker script in this directory.
        install: pip steps, in order, each a list of arguments after ``pip install`` (empty for ours).
        env: Extra environment variables of its workers.
        support: Method -> tasks the library offers.
        scale: Method -> factor turning the library's score into ours, as a string of ``N`` (training-set size).
        train_limit: Method -> how many training examples to score (slow peers); the time is extrapolated.
        budget: Method -> (tasks, largest N) run by default (slow peers); ``--full`` runs everything.
        versions: Modules whose ``__version__`` the report shows (read with the venv's python).
    """

    name: str
    title: str
    script: str
    install: tuple[tuple[str, ...], ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    support: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scale: dict[str, str] = field(default_factory=dict)
    train_limit: dict[str, int] = field(default_factory=dict)
    budget: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    versions: tuple[str, ...] = ()

    @property
    def venv(self) -> Path:
        return ROOT / ".venv" if self.name == "ours" else VENVS / self.name

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def supports(self, method: str, task: str) -> bool:
        return task in self.support.get(method, ())

    def within_budget(self, method: str, task: str, size: int) -> bool:
        if method not in self.budget:
            return True
        tasks, largest = self.budget[method]
        return task in tasks and size <= largest


ALL_TASKS = spec.TASKS
TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}

OURS = Library(
    "ours",
    "influenciae (ours)",
    "ours.py",
    env=TF_ENV,
    support={method: ALL_TASKS for method in spec.METHODS},
    versions=("tensorflow", "keras"),
)
PEERS = (
    Library(
        "influenciae030",
        "Influenciae 0.3.0",
        "peer_influenciae030.py",
        install=(
            ("tensorflow-cpu==2.21.*",),
            # Both declare dependencies they do not need here (the full tensorflow wheel, tensorflow<2.10).
            ("--no-deps", "tf_keras==2.21.*", "influenciae==0.3.0"),
            ("matplotlib",),  # imported by deel.influenciae at import time
        ),
        env={**TF_ENV, "TF_USE_LEGACY_KERAS": "1"},
        support={method: ALL_TASKS for method in spec.METHODS},
        scale={},
        # One CG/LiSSA solve per training example, each a per-example map_fn over the Hessian set per step.
        train_limit={"cg": 1, "lissa": 1},
        # Minutes per process on a loaded 2-core machine: self-influence at the smaller size only, by default.
        budget={method: (("self",), 500) for method in ("exact", "cg", "lissa", "arnoldi")},
        versions=("deel.influenciae", "tensorflow", "tf_keras"),
    ),
    Library(
        "captum",
        "Captum 0.9",
        "peer_captum.py",
        install=(("torch==2.13.0",), ("captum==0.9.0",)),
        support={"exact": ALL_TASKS, "arnoldi": ALL_TASKS, "tracin": ALL_TASKS},
        scale={"exact": "N", "arnoldi": "N"},
        # Minutes per process here (Hessian by `torch.autograd.functional`, Arnoldi by per-batch HVP graphs).
        budget={"exact": (ALL_TASKS, 500), "arnoldi": (("self",), 500)},
        versions=("captum", "torch"),
    ),
    Library(
        "pydvl",
        "pyDVL 0.10",
        "peer_pydvl.py",
        install=(("torch==2.13.0",), ("pydvl[influence]==0.10.0",)),
        support={method: ("self", "matrix") for method in ("exact", "cg", "lissa", "arnoldi")},
        versions=("pydvl", "torch"),
    ),
)
METHOD_PEERS = {
    "exact": "Influenciae `ExactIHVP` · Captum `NaiveInfluenceFunction` · pyDVL `DirectInfluence`",
    "cg": "Influenciae `ConjugateGradientDescentIHVP` · pyDVL `CgInfluence`",
    "lissa": "Influenciae `LissaIHVP` · pyDVL `LissaInfluence`",
    "arnoldi": (
        "Influenciae `ArnoldiInfluenceCalculator` · Captum `ArnoldiInfluenceFunction` · pyDVL `ArnoldiInfluence`"
    ),
    "tracin": "Influenciae `TracIn` · Captum `TracInCP`",
}
OURS_CLASSES = {
    "exact": "`FirstOrderInfluenceCalculator`, `ExactIHVP`",
    "cg": "`FirstOrderInfluenceCalculator`, `ConjugateGradientDescentIHVP`",
    "lissa": "`FirstOrderInfluenceCalculator`, `LissaIHVP`",
    "arnoldi": "`ArnoldiInfluenceCalculator`",
    "tracin": "`TracIn`",
}
TASK_TITLES = {"self": "self-influence", "matrix": "test × train", "topk": f"top-{spec.TOP_K}"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- virtual environments


def ensure_venv(library: Library) -> None:
    """Create the library's venv once; a stamp file holding a hash of the install steps makes this idempotent."""
    if not library.install:
        return
    stamp = library.venv / ".installed"
    digest = hashlib.sha256(json.dumps(library.install).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == digest and library.python.exists():
        return
    log(f"== creating {library.venv.relative_to(ROOT)} (first time only, a few minutes)")
    if not library.python.exists():
        subprocess.run(
            [sys.executable if _is_base_python() else "python3", "-m", "venv", str(library.venv)], check=True
        )
    pip = [str(library.python), "-m", "pip", "install", "--quiet"]
    for step in library.install:
        subprocess.run([*pip, *step], check=True)
    if any("torch==" in arg for step in library.install for arg in step):
        # A peer's dependency must never replace the CPU torch pinned first (a CUDA build would be huge).
        check = "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)"
        subprocess.run([str(library.python), "-c", check], check=True)
    stamp.write_text(digest + "\n")


def _is_base_python() -> bool:
    return sys.prefix == sys.base_prefix


def library_versions(library: Library) -> str:
    code = (
        "import importlib, sys\n"
        "print(', '.join(f'{name} {importlib.import_module(name).__version__}' for name in sys.argv[1:]))"
    )
    try:
        completed = subprocess.run(
            [str(library.python), "-c", code, *library.versions],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **library.env},
        )
        return completed.stdout.strip().splitlines()[-1] if completed.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


# ---------------------------------------------------------------------- measurements


@dataclass
class Measurement:
    library: str
    method: str
    task: str
    size: int
    status: str  # "ok", "timeout", "failed: ..."
    seconds: float = float("nan")
    peak_rss_mib: float = float("nan")
    rss_before_mib: float = float("nan")
    train_limit: int | None = None
    result: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def full_seconds(self) -> float:
        """Wall time for the whole training set (extrapolated linearly when a subset was scored)."""
        if self.train_limit is None:
            return self.seconds
        return self.seconds * self.size / self.train_limit


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def _run_watched(
    command: list[str], *, env: dict[str, str], timeout: float, memory_limit_mib: float
) -> tuple[str, str]:
    """Run ``command``; kill it past ``timeout`` seconds or ``memory_limit_mib`` of RSS (a shared machine must not
    meet the OOM killer). Returns ``(status, stderr)``: status is empty on success."""
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=ROOT, text=True)
        deadline = time.monotonic() + timeout
        status = ""
        while process.poll() is None:
            if time.monotonic() > deadline:
                status = f"timeout (> {timeout:.0f} s)"
            elif _rss_mib(process.pid) > memory_limit_mib:
                status = f"stopped: RSS > {memory_limit_mib / 1024:.0f} GiB"
            if status:
                process.kill()
                process.wait()
                break
            time.sleep(0.25)
        stderr.seek(0)
        text = stderr.read()
    if not status and process.returncode != 0:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        status = "failed: " + (lines[-1][:160] if lines else f"exit code {process.returncode}")
    return status, text


def run_measurement(
    library: Library, job: spec.Job, size: int, *, timeout: float, memory_limit_mib: float = MEMORY_LIMIT_MIB
) -> Measurement:
    script = HERE / library.script
    command = [str(library.python), str(script), *job.to_arguments()]
    env = {**os.environ, **library.env, "PYTHONHASHSEED": "0"}
    log(
        f"-- {library.name:>14} {job.method:>7} {job.task:>6} N={size}"
        + (f" (first {job.train_limit})" if job.train_limit else "")
    )
    for suffix in (".json", ".npz"):
        Path(job.output + suffix).unlink(missing_ok=True)
    started = time.perf_counter()
    status, stderr = _run_watched(command, env=env, timeout=timeout, memory_limit_mib=memory_limit_mib)
    if status:
        log(f"   {status}")
        return Measurement(library.name, job.method, job.task, size, status, train_limit=job.train_limit)
    report_path = Path(job.output + ".json")
    if not report_path.is_file():
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        reason = lines[-1][:160] if lines else "no report"
        log(f"   failed: {reason}")
        return Measurement(library.name, job.method, job.task, size, f"failed: {reason}", train_limit=job.train_limit)
    report = json.loads(report_path.read_text())
    with np.load(job.output + ".npz") as data:
        result = {name: data[name] for name in data.files}
    elapsed = time.perf_counter() - started
    log(f"   {report['seconds']:.2f} s, peak {report['peak_rss_mib']:.0f} MiB (process {elapsed:.0f} s)")
    return Measurement(
        library.name,
        job.method,
        job.task,
        size,
        "ok",
        seconds=float(report["seconds"]),
        peak_rss_mib=float(report["peak_rss_mib"]),
        rss_before_mib=float(report["rss_before_mib"]),
        train_limit=job.train_limit,
        result=result,
    )


def run_all(
    libraries: Sequence[Library],
    problems: dict[int, Path],
    methods: Sequence[str],
    tasks: Sequence[str],
    workdir: Path,
    *,
    timeout: float,
    full: bool = False,
    on_progress: Callable[[list[Measurement]], None] | None = None,
) -> list[Measurement]:
    """Every supported (library, method, task, size), ours first in each group so that load hits them alike."""
    measurements = []
    for size, problem_path in problems.items():
        for method in methods:
            for task in tasks:
                for library in libraries:
                    if not library.supports(method, task):
                        continue
                    limit = library.train_limit.get(method)
                    if limit is not None and task == "topk":
                        continue  # a top-k over a subset compares with nothing; reported as not run
                    if not (full or library.within_budget(method, task, size)):
                        continue
                    output = workdir / f"{library.name}_{method}_{task}_{size}"
                    job = spec.Job(str(problem_path), method, task, str(output), limit)
                    measurements.append(run_measurement(library, job, size, timeout=timeout))
                    if on_progress is not None:
                        on_progress(measurements)
    return measurements


# ---------------------------------------------------------------------- agreement


@dataclass(frozen=True)
class Agreement:
    library: str
    method: str
    task: str
    size: int
    pearson: float
    max_relative_difference: float
    compared: int
    overlap: float = float("nan")  # top-k: mean fraction of our k indices the peer also lists


def scale_factor(library: Library, method: str, size: int) -> float:
    rule = library.scale.get(method, "1")
    return float(size) if rule == "N" else float(rule)


def compare(ours: Measurement, peer: Measurement, library: Library) -> Agreement | None:
    """Pearson and ``max |ours − c·peer| / max |ours|`` on the scores both computed (c: convention factor)."""
    if not (ours.ok and peer.ok):
        return None
    factor = scale_factor(library, peer.method, peer.size)
    if peer.task == "topk":
        ours_values, peer_values = ours.result["values"], factor * peer.result["values"]
        overlap = np.mean(
            [len(set(a) & set(b)) / len(a) for a, b in zip(ours.result["indices"], peer.result["indices"], strict=True)]
        )
        first, second = ours_values.ravel(), peer_values.ravel()
        return Agreement(
            library.name,
            peer.method,
            peer.task,
            peer.size,
            _pearson(first, second),
            _relative(first, second),
            first.size,
            float(overlap),
        )
    first, second = ours.result["scores"], factor * peer.result["scores"]
    if peer.train_limit is not None:  # the peer scored the first train_limit training examples only
        first = first[..., : peer.train_limit]
    first, second = first.ravel(), second.ravel()
    return Agreement(
        library.name, peer.method, peer.task, peer.size, _pearson(first, second), _relative(first, second), first.size
    )


def _pearson(first: np.ndarray, second: np.ndarray) -> float:
    if first.shape != second.shape or first.size < 2:
        return float("nan")
    return float(np.corrcoef(first.astype(np.float64), second.astype(np.float64))[0, 1])


def _relative(first: np.ndarray, second: np.ndarray) -> float:
    if first.shape != second.shape:
        return float("nan")
    return float(np.max(np.abs(first - second)) / max(np.max(np.abs(first)), 1e-300))


def agreements(measurements: Sequence[Measurement], libraries: Sequence[Library]) -> list[Agreement]:
    ours = {(m.method, m.task, m.size): m for m in measurements if m.library == "ours"}
    by_name = {library.name: library for library in libraries}
    found = []
    for measurement in measurements:
        if measurement.library == "ours" or (measurement.method, measurement.task, measurement.size) not in ours:
            continue
        agreement = compare(
            ours[measurement.method, measurement.task, measurement.size], measurement, by_name[measurement.library]
        )
        if agreement is not None:
            found.append(agreement)
    return found


def exact_failures(found: Sequence[Agreement]) -> list[Agreement]:
    return [a for a in found if a.method == "exact" and a.task != "topk" and not a.pearson >= EXACT_PEARSON]


# ---------------------------------------------------------------------- report


def _seconds(value: float) -> str:
    if not np.isfinite(value):
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _ratio(value: float) -> str:
    if not np.isfinite(value):
        return "—"
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×" if value < 100 else f"{value:.0f}×"


def render_block(
    measurements: Sequence[Measurement],
    found: Sequence[Agreement],
    libraries: Sequence[Library],
    *,
    sizes: Sequence[int],
    versions: dict[str, str],
    started: datetime.datetime,
    elapsed: float,
    load: tuple[float, float],
    num_params: int,
    full: bool = False,
) -> str:
    titles = {library.name: library.title for library in libraries}
    peers = [library for library in libraries if library.name != "ours"]
    index = {(m.library, m.method, m.task, m.size): m for m in measurements}
    lines = [
        blocks.BEGIN,
        "## Peer libraries: speed and agreement",
        "",
        "Generated by `make bench-peers`, i.e. from the repository root (the peers' virtual environments are "
        "created under `.venv-peers/` the first time):",
        "",
        "```",
        COMMAND,
        "```",
        "",
        "Do not edit this section by hand: rerun the command (`make bench` keeps it).",
        "",
        "| Run | |",
        "|---|---|",
        f"| Date | {started:%Y-%m-%d %H:%M} UTC |",
        f"| Machine | {_cpu_count()} cores available, {platform.platform()} |",
        f"| Total time (measurements) | {elapsed:.0f} s |",
        f"| Load average (1 min), start / end | {load[0]:.2f} / {load[1]:.2f} |",
        *(f"| {titles[name]} | {version} |" for name, version in versions.items()),
        "",
        "### Problem",
        "",
        f"scikit-learn digits (64 pixels scaled to [0, 1], 10 classes), an MLP 64 → {spec.HIDDEN_UNITS} (tanh) → "
        f"10 logits with **P = {num_params:,}** parameters, trained by our side with SGD (learning rate "
        f"{spec.LEARNING_RATE:g}, batches of {spec.BATCH_SIZE}, checkpoints after epochs "
        f"{', '.join(map(str, spec.CHECKPOINT_EPOCHS))}; the last is the model scored), once per training-set size "
        f"**N ∈ {{{', '.join(map(str, sizes))}}}**. {spec.TEST_SIZE} held-out test examples, top-{spec.TOP_K}. "
        "The weights are exported once and loaded by every library: **identical weights** (torch `nn.Linear` gets "
        "the Keras kernel transposed; a unit test checks the export reproduces the Keras outputs). Every library "
        f"reads the data in batches of {spec.BATCH_SIZE} and uses the per-example cross-entropy and the Hessian of "
        f"the training loss over all N examples with damping **λ = {spec.DAMPING:g}**, i.e. `(H + λI)⁻¹` where H "
        "is the Hessian of the mean loss.",
        "",
        "| Method | Ours | Peers | Settings |",
        "|---|---|---|---|",
        f"| exact | {OURS_CLASSES['exact']} | {METHOD_PEERS['exact']} | dense Hessian, factorized/inverted once |",
        f"| cg | {OURS_CLASSES['cg']} | {METHOD_PEERS['cg']} | relative residual {spec.CG_TOLERANCE:g} "
        f"(Influenciae: its fixed 1e-3), at most {spec.CG_MAX_ITERATIONS} iterations |",
        f"| lissa | {OURS_CLASSES['lissa']} | {METHOD_PEERS['lissa']} | exactly {spec.LISSA_DEPTH} full-batch "
        "steps, same scale s = 1.1·λ_max(H + λI) for all (the same truncated series) |",
        f"| arnoldi | {OURS_CLASSES['arnoldi']} | {METHOD_PEERS['arnoldi']} | Krylov dimension "
        f"{spec.ARNOLDI_SUBSPACE}, {spec.ARNOLDI_RANK} eigenpairs of largest magnitude |",
        f"| tracin | {OURS_CLASSES['tracin']} | {METHOD_PEERS['tracin']} | {len(spec.CHECKPOINT_EPOCHS)} "
        f"checkpoints, learning rate {spec.LEARNING_RATE:g} each, all weights |",
        "",
        "Tasks: **self-influence** of the N training examples; the **test × train** score matrix "
        f"({spec.TEST_SIZE} × N); the **top-{spec.TOP_K}** most positive training examples of each test example. "
        "Our calls: `self_influence`, `influence_matrix` (for cg and lissa `compute_influence_factors` + "
        "`influence_from_factors`, which solves for the 50 test gradients instead of the N training ones, as "
        "pyDVL's `influences` does) and `most_influential`.",
        "",
        "**What is timed.** Each measurement is a fresh process running one library, one method, one task, one "
        "size. *Wall time* starts after the imports, the data and the model with its weights are loaded, and ends "
        "when the scores are a NumPy array: solver set-up (Hessian, factorization, Arnoldi iteration) and tracing "
        "of `tf.function`s are included, because a user pays them once per call of this kind. *Peak RSS* is the "
        "process's `ru_maxrss` at the end (framework included: TensorFlow processes start near 0.5–0.7 GiB, torch "
        "near 0.3 GiB); *ΔRSS* is how much it grew during the timed part. *Time ratio* is ours / peer (below 1: "
        "ours faster). One run per measurement: the load of the shared machine adds noise of tens of percent; "
        "ratios within one run are meaningful, absolute times are not.",
        "",
    ]
    limited = sorted({(lib.title, m, n) for lib in peers for m, n in lib.train_limit.items()})
    if limited:
        lines += [
            "**Extrapolated rows.** "
            + "; ".join(
                f"{title} `{method}` scores only the first {n if n > 1 else ''} training example{'s' if n > 1 else ''}"
                for title, method, n in limited
            )
            + " (its Hessian still covers all N): one solve per training example, each step a per-example `map_fn` "
            "over the N Hessian examples, would take hours for all N. Their wall time (marked ~) is scaled "
            "linearly to N, which overstates it slightly (their small set-up is counted N/n times); their top-k "
            "is not run. Agreement is computed on the scored examples.",
            "",
        ]
    budgeted = [
        f"{lib.title} `{method}`: {', '.join(TASK_TITLES[t] for t in tasks)} at N ≤ {largest}"
        for lib in peers
        for method, (tasks, largest) in lib.budget.items()
    ]
    if budgeted and not full:
        lines += [
            "**Not run** rows are outside the default time budget of the slowest peers (each of their processes "
            "takes minutes here); `--full` runs them. Run by default: " + "; ".join(budgeted) + ". Influenciae 0.3.0's "
            f"exact Hessian is read in batches of {EXACT_HESSIAN_BATCH_INFLUENCIAE} (not {spec.BATCH_SIZE}): it "
            "takes `tape.jacobian` of the per-example gradients, nested `pfor`s whose memory grows like B²P "
            "(batches of 50 reached 21 GB with P = 1,210 and met the OOM killer).",
            "",
        ]
    lines += [
        "### Wall time and peak memory",
        "",
        "| Method | Task | N | Library | Wall time (s) | Peak RSS (MiB) | ΔRSS (MiB) | Time ratio ours/peer | "
        "Peak RSS ratio ours/peer |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for method in spec.METHODS:
        for task in spec.TASKS:
            for size in sizes:
                ours = index.get(("ours", method, task, size))
                for library in [OURS, *peers]:
                    if library.name != "ours" and not library.supports(method, task):
                        continue
                    measurement = index.get((library.name, method, task, size))
                    if measurement is None:
                        if library.name != "ours" and ours is not None:
                            skipped = (library.train_limit.get(method) and task == "topk") or not (
                                full or library.within_budget(method, task, size)
                            )
                            state = "not run" if skipped else "pending"
                            lines.append(
                                f"| {method} | {TASK_TITLES[task]} | {size} | {library.title} | {state} | | | | |"
                            )
                        continue
                    if not measurement.ok:
                        lines.append(
                            f"| {method} | {TASK_TITLES[task]} | {size} | {library.title} | {measurement.status} "
                            "| | | | |"
                        )
                        continue
                    approx = "~" if measurement.train_limit is not None else ""
                    time_ratio = peak_ratio = "1×" if library.name == "ours" else "—"
                    if library.name != "ours" and ours is not None and ours.ok:
                        time_ratio = approx + _ratio(ours.seconds / measurement.full_seconds)
                        peak_ratio = _ratio(ours.peak_rss_mib / measurement.peak_rss_mib)
                    delta = measurement.peak_rss_mib - measurement.rss_before_mib
                    lines.append(
                        f"| {method} | {TASK_TITLES[task]} | {size} | {library.title} | "
                        f"{approx}{_seconds(measurement.full_seconds)} | {measurement.peak_rss_mib:.0f} | "
                        f"{delta:.0f} | {time_ratio} | {peak_ratio} |"
                    )
    lines += ["", _support_sentence(peers), "", *_growth_lines(measurements, libraries, sizes)]
    lines += [
        "### Agreement on identical weights",
        "",
        "Peer scores are first converted to our convention (score = `∇ℓ(x)ᵀ (H + λI)⁻¹ ∇ℓ(z)`, H of the mean "
        "loss, positive = proponent; TracIn `Σ_c η_c ∇ℓ_c(x)·∇ℓ_c(z)`). *Max rel. diff.* is "
        "`max |ours − c·peer| / max |ours|` over all compared scores (c the factor below); for top-k the values "
        "are compared rank by rank and *overlap* is the mean fraction of our top-k indices the peer also lists. "
        "Exact methods must reach Pearson ≥ 0.99 (otherwise the command fails); the approximate solvers differ by "
        "construction where noted.",
        "",
        "| Method | Task | N | Peer | Factor c | Pearson | Max rel. diff. | Top-k overlap | Scores compared |",
        "|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    by_name = {library.name: library for library in libraries}
    for agreement in sorted(found, key=lambda a: (spec.METHODS.index(a.method), spec.TASKS.index(a.task), a.size)):
        library = by_name[agreement.library]
        rule = library.scale.get(agreement.method, "1")
        factor = f"N = {agreement.size}" if rule == "N" else rule
        overlap = f"{agreement.overlap:.2f}" if np.isfinite(agreement.overlap) else ""
        lines.append(
            f"| {agreement.method} | {TASK_TITLES[agreement.task]} | {agreement.size} | {library.title} | {factor} | "
            f"{agreement.pearson:.6f} | {agreement.max_relative_difference:.2e} | {overlap} | {agreement.compared:,} |"
        )
    failures = exact_failures(found)
    lines += [
        "",
        "**Exact methods:** "
        + (
            "no comparison yet."
            if not any(a.method == "exact" for a in found)
            else "every peer agrees with us (Pearson ≥ 0.99)."
            if not failures
            else "**disagreement** for " + ", ".join(f"{a.library} {a.task} N={a.size}" for a in failures) + "."
        ),
        "",
        *CONVENTIONS,
        blocks.END,
    ]
    return "\n".join(lines) + "\n"


CONVENTIONS = [
    "### Conventions, and why the factors",
    "",
    "* **Sign.** All four libraries report the up-weighting influence `∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z)` with a positive sign for "
    "proponents (pyDVL's `InfluenceMode.Up` is `⟨H⁻¹∇ℓ(x_test), ∇ℓ(z)⟩`; Captum's and Influenciae's scores are the "
    "same product). No sign flip is needed; a flipped sign would show as Pearson −1.",
    "* **Mean vs sum (Captum, factor N).** Captum's influence functions form the Hessian of the *summed* loss over "
    "the Hessian dataset, `N·H`. We pass `hessian_reg = N·λ`, so Captum computes `∇ℓ(x)ᵀ (N(H + λI))⁻¹ ∇ℓ(z)`, our "
    "score divided by N. Influenciae 0.3.0 and pyDVL average the Hessian like us (factor 1).",
    "* **Damping.** Ours, pyDVL (`regularization`) and Captum (`hessian_reg`, scaled as above) add λI to the "
    "Hessian. Influenciae 0.3.0 has no damping for its exact, CG and Arnoldi solvers (the exact one takes a "
    "pseudo-inverse): it receives it through its loss function, `CE + (λ/2)‖w − stop_gradient(w)‖²`, a term with "
    "value 0 and gradient 0 at the current weights but Hessian λI, so every Hessian it forms is `H + λI` and its "
    "gradients are unchanged. Its LiSSA has a `damping` d in `v + (1 − d)h − Hh/s`, which solves "
    "`(H + s·d I)x = v`: we pass d = λ/s.",
    "* **LiSSA.** Ours, pyDVL and Influenciae run the same recursion `h ← v + h − (H + λI)h/s` from `h = v` and "
    "return `h/s`; with the same s, the same number of steps and full-batch Hessians (pyDVL reads a loader of N "
    "examples per step) they compute the same truncated series, not the converged solve.",
    "* **Arnoldi.** Each library starts its Krylov iteration from its own random vector (pyDVL calls ARPACK's "
    "implicitly restarted Lanczos through scipy `eigsh`; Captum, Influenciae and we run plain Arnoldi), so the kept "
    "eigenpairs and hence the scores agree only as far as the top eigenpairs have converged: lower agreement there "
    "is expected, not a convention difference.",
    "* **CG.** Converged solutions agree to the solvers' tolerances (Influenciae stops at its fixed 1e-3).",
    "* **TracIn.** Influenciae 0.3.0 puts `√η` on both sides, Captum and we put `η` on one side: the same score.",
    "* **Top-k.** pyDVL offers no top-k search (n/a). Influenciae 0.3.0 returns the training *samples*, mapped back "
    "to their indices by value.",
    "",
]


def _support_sentence(peers: Sequence[Library]) -> str:
    missing = []
    for library in peers:
        for method in spec.METHODS:
            tasks = [TASK_TITLES[t] for t in spec.TASKS if not library.supports(method, t)]
            if len(tasks) == len(spec.TASKS):
                missing.append(f"{library.title} has no `{method}`")
            elif tasks:
                missing.append(f"{library.title} `{method}` has no {', '.join(tasks)}")
    return "Not offered by the peer (n/a, no row): " + "; ".join(missing) + "." if missing else ""


def _growth_lines(measurements: Sequence[Measurement], libraries: Sequence[Library], sizes: Sequence[int]) -> list[str]:
    if len(sizes) < 2:
        return []
    small, large = sizes[0], sizes[-1]
    index = {(m.library, m.method, m.task, m.size): m for m in measurements if m.ok}
    lines = [
        f"**Growth** from N = {small} to N = {large} (×{large / small:g} examples): wall-time ratio "
        f"t(N={large}) / t(N={small}).",
        "",
        "| Method | Task | " + " | ".join(library.title for library in libraries) + " |",
        "|---|---|" + "---:|" * len(libraries),
    ]
    for method in spec.METHODS:
        for task in spec.TASKS:
            cells = []
            for library in libraries:
                first, last = (
                    index.get((library.name, method, task, small)),
                    index.get((library.name, method, task, large)),
                )
                cells.append(_ratio(last.full_seconds / first.full_seconds) if first and last else "")
            if any(cells):
                lines.append(f"| {method} | {TASK_TITLES[task]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 0


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return float("nan")


def write_block(path: Path, block: str) -> None:
    """Replace (or append) the peers block of ``path``, leaving the rest of the file untouched."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(blocks.replace_block(old, block), encoding="utf-8")


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="markdown file whose peers block is replaced (default: stdout)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="training-set sizes")
    parser.add_argument("--methods", nargs="+", choices=spec.METHODS, default=list(spec.METHODS))
    parser.add_argument("--tasks", nargs="+", choices=spec.TASKS, default=list(spec.TASKS))
    parser.add_argument("--peers", nargs="+", choices=[p.name for p in PEERS], default=[p.name for p in PEERS])
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS, help="seconds per measurement")
    parser.add_argument("--full", action="store_true", help="ignore the slow peers' budgets (hours)")
    parser.add_argument("--setup-only", action="store_true", help="create the peers' environments and stop")
    parser.add_argument("--keep", type=Path, help="keep problems and scores in this directory")
    parser.add_argument(
        "--reuse-problems", action="store_true", help="with --keep: reuse the problems found there (no training)"
    )
    args = parser.parse_args(argv)

    libraries = [OURS, *(peer for peer in PEERS if peer.name in args.peers)]
    for library in libraries:
        ensure_venv(library)
    if args.setup_only:
        return 0
    versions = {library.name: library_versions(library) for library in libraries}
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="influenciae_peers_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    load_at_start = _load_average()
    try:
        problems = {size: workdir / f"problem_{size}.npz" for size in args.sizes}
        if not (args.reuse_problems and all(path.is_file() for path in problems.values())):
            log("== preparing the problems (training the MLP once per size)")
            subprocess.run(
                [
                    str(OURS.python),
                    str(HERE / "ours.py"),
                    "prepare",
                    "--directory",
                    str(workdir),
                    "--sizes",
                    *map(str, args.sizes),
                ],
                check=True,
                env={**os.environ, **OURS.env},
                cwd=ROOT,
            )
        num_params = spec.load_problem(problems[args.sizes[0]]).num_params
        outputs = workdir / "scores"
        outputs.mkdir(exist_ok=True)

        def report(measurements: list[Measurement]) -> str:
            return render_block(
                measurements,
                agreements(measurements, libraries),
                libraries,
                sizes=args.sizes,
                versions=versions,
                started=started,
                elapsed=time.perf_counter() - clock,
                load=(load_at_start, _load_average()),
                num_params=num_params,
                full=args.full,
            )

        def progress(measurements: list[Measurement]) -> None:
            if args.output is not None:  # partial results land in the file as they come
                write_block(args.output, report(measurements))

        measurements = run_all(
            libraries,
            problems,
            args.methods,
            args.tasks,
            outputs,
            timeout=args.timeout,
            full=args.full,
            on_progress=progress,
        )
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    found = agreements(measurements, libraries)
    block = report(measurements)
    if args.output is None:
        print(block)
    else:
        write_block(args.output, block)
        log(f"wrote the peers block of {args.output}")
    failures = exact_failures(found)
    for failure in failures:
        log(f"DISAGREEMENT: exact {failure.library} {failure.task} N={failure.size}: Pearson {failure.pearson:.4f}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
