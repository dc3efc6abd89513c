"""Speed and agreement against the peer libraries: Captum 0.9, pyDVL 0.10 and the original Influenciae 0.3.0.

From the repository root::

    make bench-peers    # = .venv/bin/python benchmarks/peers/run_peers.py --output docs/benchmarks.md

1. Creates one virtual environment per peer under ``.venv-peers/`` (once: a stamp file records what was installed).
2. ``ours.py prepare`` trains the MLP of ``problem.py`` on digits for each hidden width (``--hidden 8 32``: P = 610
   and 2,410) and training-set size (``--sizes 1000``) and exports data and weights (final and TracIn checkpoints)
   to ``.npz`` files.
3. Runs every measurement in a fresh subprocess, with the library's own virtual environment: one library, one
   method, one task, one problem. Each calls the computation twice (cold, then the warm repeat), reports wall and
   CPU seconds of both (model load excluded; solver set-up included), the load average at its start and end, its
   peak RSS (``ru_maxrss``) and, for our exact method, the float64 NumPy limit; it saves its cold scores.
4. Converts each peer's scores to our conventions and compares them with ours (Pearson, largest difference).
5. Writes the results between ``<!-- peers:begin -->`` and ``<!-- peers:end -->`` in the output file (replacing
   the block, or appending it), and exits non-zero when an exact method disagrees (Pearson < 0.99).

Influenciae 0.3.0 is not run by default (``--peers captum pydvl``; its processes take hours at both sizes): add
``--peers captum pydvl influenciae030`` to include it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import shlex
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
DEFAULT_SIZES = (1000,)
DEFAULT_HIDDEN = spec.HIDDEN_WIDTHS  # P = 610 and P = 2,410
DEFAULT_PEERS = ("captum", "pydvl", "kronfluence")  # Influenciae 0.3.0 takes hours: `--peers influenciae030 ...`
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
        support={method: ALL_TASKS for method in ("exact", "cg", "lissa", "arnoldi", "tracin")},
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
        support={"exact": ALL_TASKS, "arnoldi": ALL_TASKS, "tracin": ALL_TASKS, "tracin_fast": ALL_TASKS},
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
        support={method: ("self", "matrix") for method in ("exact", "cg", "lissa", "arnoldi", "nystrom", "ekfac")},
        versions=("pydvl", "torch"),
    ),
    Library(
        "kronfluence",
        "Kronfluence 1.0",
        "peer_kronfluence.py",
        # kronfluence requires torchvision, whose newest release pulls a newer (CUDA) torch: pin the pair.
        install=(("torch==2.13.0",), ("kronfluence==1.0.1", "torch==2.13.0", "torchvision==0.28.*")),
        support={"ekfac": ("self", "matrix")},
        versions=("kronfluence", "torch"),
    ),
)
METHOD_PEERS = {
    "exact": "Influenciae `ExactIHVP` · Captum `NaiveInfluenceFunction` · pyDVL `DirectInfluence`",
    "cg": "Influenciae `ConjugateGradientDescentIHVP` · pyDVL `CgInfluence`",
    "lissa": "Influenciae `LissaIHVP` · pyDVL `LissaInfluence`",
    "arnoldi": (
        "Influenciae `ArnoldiInfluenceCalculator` · Captum `ArnoldiInfluenceFunction` · pyDVL `ArnoldiInfluence`"
    ),
    "nystrom": "pyDVL `NystroemSketchInfluence`",
    "ekfac": "pyDVL `EkfacInfluence` · Kronfluence `Analyzer` (`strategy='ekfac'`)",
    "tracin": "Influenciae `TracIn` · Captum `TracInCP`",
    "tracin_fast": "Captum `TracInCPFast`",
}
OURS_CLASSES = {
    "exact": "`FirstOrderInfluenceCalculator`, `ExactIHVP`",
    "cg": "`FirstOrderInfluenceCalculator`, `ConjugateGradientDescentIHVP`",
    "lissa": "`FirstOrderInfluenceCalculator`, `LissaIHVP`",
    "arnoldi": "`ArnoldiInfluenceCalculator`",
    "nystrom": "`FirstOrderInfluenceCalculator`, `NystromIHVP`",
    "ekfac": "`FirstOrderInfluenceCalculator`, `EKFACIHVP`",
    "tracin": "`TracIn`",
    "tracin_fast": "`TracInCPFast`",
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
    """One worker's report (``problem.run_job``): cold and warm call of one library, method, task and problem.

    ``seconds``/``cpu_seconds`` are the cold call's wall and CPU (user + system) seconds, ``warm_*`` the repeat's in
    the same process; ``load_start``/``load_end`` the machine's 1-minute load average when the worker started and
    ended; ``limit_seconds`` the arithmetic limit of the task (ours, exact: the float64 NumPy closed form).
    """

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
    hidden: int = spec.HIDDEN_UNITS
    num_params: int = 0
    cpu_seconds: float = float("nan")
    warm_seconds: float = float("nan")
    warm_cpu_seconds: float = float("nan")
    warm_relative_difference: float = float("nan")
    load_start: float = float("nan")
    load_end: float = float("nan")
    limit_seconds: float = float("nan")
    limit_relative_difference: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> tuple[str, str, int, int]:
        """``(method, task, hidden, size)``: the comparison a row belongs to."""
        return (self.method, self.task, self.hidden, self.size)

    def _full(self, seconds: float) -> float:
        if self.train_limit is None:
            return seconds
        return seconds * self.size / self.train_limit

    @property
    def full_seconds(self) -> float:
        """Cold wall time for the whole training set (extrapolated linearly when a subset was scored)."""
        return self._full(self.seconds)

    @property
    def full_warm_seconds(self) -> float:
        """Warm wall time for the whole training set (extrapolated like :attr:`full_seconds`)."""
        return self._full(self.warm_seconds)


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
    library: Library,
    job: spec.Job,
    size: int,
    *,
    timeout: float,
    memory_limit_mib: float = MEMORY_LIMIT_MIB,
    hidden: int = spec.HIDDEN_UNITS,
) -> Measurement:
    script = HERE / library.script
    command = [str(library.python), str(script), *job.to_arguments()]
    env = {**os.environ, **library.env, "PYTHONHASHSEED": "0"}
    log(
        f"-- {library.name:>14} {job.method:>7} {job.task:>6} H={hidden} N={size}"
        + (f" (first {job.train_limit})" if job.train_limit else "")
    )
    for suffix in (".json", ".npz"):
        Path(job.output + suffix).unlink(missing_ok=True)
    started = time.perf_counter()
    status, stderr = _run_watched(command, env=env, timeout=timeout, memory_limit_mib=memory_limit_mib)
    if status:
        log(f"   {status}")
        return Measurement(library.name, job.method, job.task, size, status, train_limit=job.train_limit, hidden=hidden)
    report_path = Path(job.output + ".json")
    if not report_path.is_file():
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        reason = lines[-1][:160] if lines else "no report"
        log(f"   failed: {reason}")
        return Measurement(
            library.name, job.method, job.task, size, f"failed: {reason}", train_limit=job.train_limit, hidden=hidden
        )
    report = json.loads(report_path.read_text())
    with np.load(job.output + ".npz") as data:
        result = {name: data[name] for name in data.files}
    elapsed = time.perf_counter() - started
    log(
        f"   cold {report['seconds']:.2f} s, warm {report['warm_seconds']:.2f} s, peak {report['peak_rss_mib']:.0f} "
        f"MiB (process {elapsed:.0f} s)"
    )
    return measurement_from_report(library.name, job, size, report, result)


def measurement_from_report(
    library: str, job: spec.Job, size: int, report: dict, result: dict[str, np.ndarray]
) -> Measurement:
    """The :class:`Measurement` of a worker's JSON report (``problem.run_job``) and saved scores."""

    def number(name: str) -> float:
        value = report.get(name)
        return float("nan") if value is None else float(value)

    return Measurement(
        library,
        job.method,
        job.task,
        size,
        "ok",
        seconds=number("seconds"),
        peak_rss_mib=number("peak_rss_mib"),
        rss_before_mib=number("rss_before_mib"),
        train_limit=job.train_limit,
        result=result,
        hidden=int(report["hidden_units"]),
        num_params=int(report["num_params"]),
        cpu_seconds=number("cpu_seconds"),
        warm_seconds=number("warm_seconds"),
        warm_cpu_seconds=number("warm_cpu_seconds"),
        warm_relative_difference=number("warm_relative_difference"),
        load_start=number("load_start"),
        load_end=number("load_end"),
        limit_seconds=number("limit_seconds"),
        limit_relative_difference=number("limit_relative_difference"),
    )


def run_all(
    libraries: Sequence[Library],
    problems: dict[tuple[int, int], Path],
    methods: Sequence[str],
    tasks: Sequence[str],
    workdir: Path,
    *,
    timeout: float,
    full: bool = False,
    on_progress: Callable[[list[Measurement]], None] | None = None,
) -> list[Measurement]:
    """Every supported (library, method, task, problem), ours first in each group so that load hits them alike.

    ``problems`` maps ``(hidden width, training-set size)`` to the exported problem.
    """
    measurements = []
    for (hidden, size), problem_path in problems.items():
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
                    output = workdir / f"{library.name}_{method}_{task}_h{hidden}_n{size}"
                    job = spec.Job(str(problem_path), method, task, str(output), limit)
                    measurements.append(run_measurement(library, job, size, timeout=timeout, hidden=hidden))
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
    hidden: int = spec.HIDDEN_UNITS


def scale_factor(library: Library, method: str, size: int) -> float:
    rule = library.scale.get(method, "1")
    return float(size) if rule == "N" else float(rule)


def compare(ours: Measurement, peer: Measurement, library: Library) -> Agreement | None:
    """Pearson and ``max |ours − c·peer| / max |ours|`` on the scores both computed (c: convention factor)."""
    if not (ours.ok and peer.ok):
        return None
    factor = scale_factor(library, peer.method, peer.size)
    overlap = float("nan")
    if peer.task == "topk":
        ours_values, peer_values = ours.result["values"], factor * peer.result["values"]
        overlap = float(
            np.mean(
                [
                    len(set(a) & set(b)) / len(a)
                    for a, b in zip(ours.result["indices"], peer.result["indices"], strict=True)
                ]
            )
        )
        first, second = ours_values.ravel(), peer_values.ravel()
    else:
        first, second = ours.result["scores"], factor * peer.result["scores"]
        if peer.train_limit is not None:  # the peer scored the first train_limit training examples only
            first = first[..., : peer.train_limit]
        first, second = first.ravel(), second.ravel()
    return Agreement(
        library.name,
        peer.method,
        peer.task,
        peer.size,
        _pearson(first, second),
        _relative(first, second),
        first.size,
        overlap,
        peer.hidden,
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
    ours = {m.key: m for m in measurements if m.library == "ours"}
    by_name = {library.name: library for library in libraries}
    found = []
    for measurement in measurements:
        if measurement.library == "ours" or measurement.key not in ours:
            continue
        agreement = compare(ours[measurement.key], measurement, by_name[measurement.library])
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


def _percent(value: float) -> str:
    if not np.isfinite(value):
        return "—"
    return f"{100 * value:.2g} %" if value < 0.1 else f"{100 * value:.0f} %"


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
    num_params: dict[int, int],
    full: bool = False,
    command: str = COMMAND,
    commit: str = "`unknown`",
    note: str = "",
) -> str:
    """The markdown peers block of one run.

    Args:
        measurements: Every worker's result, in run order.
        found: Their agreements with ours (:func:`agreements`).
        libraries: Ours first, then the peers that ran.
        sizes: Training-set sizes N.
        versions: Library name -> versions text.
        started: UTC start of the run.
        elapsed: Seconds of the run so far.
        load: The machine's 1-minute load average at the start and now.
        num_params: Hidden width -> P of the MLP.
        full: Whether the slow peers' budgets were ignored.
        command: The exact command of this run (shown in the block).
        commit: The measured commit (``git rev-parse --short HEAD``), as markdown.
        note: A sentence on a reduced run (what was left out and why), shown near the top.
    """
    titles = {library.name: library.title for library in libraries}
    peers = [library for library in libraries if library.name != "ours"]
    hiddens = sorted(num_params)
    index = {(m.library, *m.key): m for m in measurements}
    parameter_text = " and ".join(f"H = {h}: **P = {num_params[h]:,}**" for h in hiddens)
    lines = [
        blocks.BEGIN,
        "## Peer libraries: speed and agreement",
        "",
        f"Generated by `make bench-peers` (`{COMMAND}`; the peers' virtual environments are created under "
        "`.venv-peers/` the first time). This block was written by:",
        "",
        "```",
        command,
        "```",
        "",
        "Do not edit this section by hand: rerun the command (`make bench` keeps it).",
        "",
    ]
    if note:
        lines += [f"**This run.** {note}", ""]
    lines += [
        "| Run | |",
        "|---|---|",
        f"| Date | {started:%Y-%m-%d %H:%M} UTC |",
        f"| Commit measured | {commit} |",
        f"| Machine | {_cpu_count()} cores available, {platform.platform()} |",
        f"| Total time (measurements) | {elapsed:.0f} s |",
        f"| Load average (1 min), start / end of the run | {load[0]:.2f} / {load[1]:.2f} |",
        *(f"| {titles[name]} | {version} |" for name, version in versions.items()),
        "",
        "### Problem",
        "",
        f"scikit-learn digits (64 pixels scaled to [0, 1], 10 classes), an MLP 64 → H (tanh) → 10 logits at two "
        f"model sizes, {parameter_text} parameters, trained by our side with SGD (learning rate "
        f"{spec.LEARNING_RATE:g}, batches of {spec.BATCH_SIZE}, checkpoints after epochs "
        f"{', '.join(map(str, spec.CHECKPOINT_EPOCHS))}; the last is the model scored), once per (H, training-set "
        f"size) with **N ∈ {{{', '.join(map(str, sizes))}}}**. {spec.TEST_SIZE} held-out test examples, "
        f"top-{spec.TOP_K}. The weights are exported once and loaded by every library: **identical weights** "
        "(torch `nn.Linear` gets the Keras kernel transposed; every worker reads H from the exported kernel shapes; "
        "a unit test checks the export reproduces the Keras outputs). Every library reads the data in batches of "
        f"{spec.BATCH_SIZE} and uses the per-example cross-entropy and the Hessian of the training loss over all N "
        f"examples with damping **λ = {spec.DAMPING:g}**, i.e. `(H + λI)⁻¹` where H is the Hessian of the mean loss.",
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
        f"| nystrom | {OURS_CLASSES['nystrom']} | {METHOD_PEERS['nystrom']} | rank-{spec.NYSTROM_RANK} randomized "
        "Nyström sketch of the Hessian, `(Â + λI)⁻¹` by Woodbury (each library its own random test matrix) |",
        f"| ekfac | {OURS_CLASSES['ekfac']} | {METHOD_PEERS['ekfac']} | EK-FAC of the Gauss-Newton/Fisher, "
        "corrected eigenvalues, absolute damping λ per layer block (statistics differ: see Conventions) |",
        f"| tracin | {OURS_CLASSES['tracin']} | {METHOD_PEERS['tracin']} | {len(spec.CHECKPOINT_EPOCHS)} "
        f"checkpoints, learning rate {spec.LEARNING_RATE:g} each, all weights |",
        f"| tracin_fast | {OURS_CLASSES['tracin_fast']} | {METHOD_PEERS['tracin_fast']} | the same checkpoints, last "
        "layer only, no per-example backward pass (Captum: its weight; ours: weight and bias) |",
        "",
        "Tasks: **self-influence** of the N training examples; the **test × train** score matrix "
        f"({spec.TEST_SIZE} × N); the **top-{spec.TOP_K}** most positive training examples of each test example. "
        "Our calls: `self_influence`, `influence_matrix` (for cg and lissa `compute_influence_factors` + "
        "`influence_from_factors`, which solves for the 50 test gradients instead of the N training ones, as "
        "pyDVL's `influences` does) and `most_influential`.",
        "",
        "**What is timed.** Each measurement is a fresh process running one library, one method, one task, one "
        "problem, which calls the computation **twice**. *Cold* is the first call: it starts after the imports, "
        "the data and the model with its weights are loaded, and ends when the scores are a NumPy array; solver "
        "set-up (Hessian, factorization, Arnoldi iteration, sketch, factors) and tracing of `tf.function`s are "
        "included, because a user pays them once per call of this kind. *Warm* is the repeat in the same process: "
        "for us a new calculator on the same `InfluenceModel` (the solver is set up again; traced functions are "
        "reused), for the torch peers the same code again. *CPU* is the process's user + system CPU seconds "
        "(`getrusage`) over the same interval: CPU > wall means several threads worked. *Load* is the machine's "
        "1-minute load average when the worker started and when it ended (2 cores: above 2, other work competed). "
        "*Peak RSS* is the process's `ru_maxrss` after the cold call (framework included: TensorFlow processes "
        "start near 0.5–0.7 GiB, torch near 0.3 GiB). *Ours/peer* is our time over the peer's (below 1: ours "
        "faster), cold over cold and warm over warm; **ours/best peer** divides by the fastest peer of that "
        "(method, task, P, N). *limit (numpy)* (exact only) is the arithmetic limit of the task: the float64 NumPy "
        "closed form given the per-example gradients and the dense `H + λI` (`np.linalg.solve` plus the products, "
        "best of three, gradients and Hessian not counted), and *fraction of the limit* = limit / ours (1 would "
        "be ours at the limit). One run per measurement on a shared machine: the load adds noise of tens of "
        "percent; ratios within one run are meaningful, absolute times less so.",
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
            "takes minutes here); `--full` runs them. Run by default: " + "; ".join(budgeted) + ".",
            "",
        ]
    if any(lib.name == "influenciae030" for lib in peers):
        lines += [
            f"Influenciae 0.3.0's exact Hessian is read in batches of {EXACT_HESSIAN_BATCH_INFLUENCIAE} (not "
            f"{spec.BATCH_SIZE}): it takes `tape.jacobian` of the per-example gradients, nested `pfor`s whose memory "
            "grows like B²P (batches of 50 reached 21 GB with P = 1,210 and met the OOM killer).",
            "",
        ]
    lines += _summary_lines(measurements, peers, hiddens, sizes)
    lines += _timing_lines(measurements, peers, index, hiddens, sizes, full)
    lines += ["", _support_sentence(peers), "", *_growth_lines(measurements, libraries, hiddens, sizes)]
    lines += [*_warm_lines(measurements, titles)]
    lines += [
        "### Agreement on identical weights",
        "",
        "Peer scores (cold call) are first converted to our convention (score = `∇ℓ(x)ᵀ (H + λI)⁻¹ ∇ℓ(z)`, H of "
        "the mean loss, positive = proponent; TracIn `Σ_c η_c ∇ℓ_c(x)·∇ℓ_c(z)`). *Max rel. diff.* is "
        "`max |ours − c·peer| / max |ours|` over all compared scores (c the factor below); for top-k the values "
        "are compared rank by rank and *overlap* is the mean fraction of our top-k indices the peer also lists. "
        "Exact methods must reach Pearson ≥ 0.99 (otherwise the command fails); the approximate solvers differ by "
        "construction where noted (Arnoldi, Nyström: each library's own random start; EK-FAC: different Fisher "
        "statistics), so their Pearson is reported, not required.",
        "",
        "| Method | Task | P | N | Peer | Factor c | Pearson | Max rel. diff. | Top-k overlap | Scores compared |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    by_name = {library.name: library for library in libraries}
    for agreement in sorted(
        found, key=lambda a: (spec.METHODS.index(a.method), spec.TASKS.index(a.task), a.hidden, a.size)
    ):
        library = by_name[agreement.library]
        rule = library.scale.get(agreement.method, "1")
        factor = f"N = {agreement.size}" if rule == "N" else rule
        overlap = f"{agreement.overlap:.2f}" if np.isfinite(agreement.overlap) else ""
        lines.append(
            f"| {agreement.method} | {TASK_TITLES[agreement.task]} | {num_params.get(agreement.hidden, 0):,} | "
            f"{agreement.size} | {library.title} | {factor} | {agreement.pearson:.6f} | "
            f"{agreement.max_relative_difference:.2e} | {overlap} | {agreement.compared:,} |"
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
            else "**disagreement** for "
            + ", ".join(f"{a.library} {a.task} P={num_params.get(a.hidden, 0):,} N={a.size}" for a in failures)
            + "."
        ),
        "",
        *CONVENTIONS,
        blocks.END,
    ]
    return "\n".join(lines) + "\n"


def timing(measurement: Measurement, *, warm: bool = False, cpu: bool = False) -> float:
    """Cold or warm, wall or CPU seconds of ``measurement`` for the whole training set (extrapolated from a subset)."""
    if cpu:
        return measurement._full(measurement.warm_cpu_seconds if warm else measurement.cpu_seconds)
    return measurement.full_warm_seconds if warm else measurement.full_seconds


def best_peer(
    measurements: Sequence[Measurement], key: tuple[str, str, int, int], *, warm: bool = False, cpu: bool = False
) -> Measurement | None:
    """The fastest successful peer measurement of ``key`` = ``(method, task, hidden, size)`` (cold or warm, wall or
    CPU seconds)."""
    candidates = [
        m
        for m in measurements
        if m.library != "ours" and m.ok and m.key == key and np.isfinite(timing(m, warm=warm, cpu=cpu))
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda m: timing(m, warm=warm, cpu=cpu))


def ratio_to_best(
    measurements: Sequence[Measurement], ours: Measurement, *, warm: bool = False, cpu: bool = False
) -> float:
    """Ours / the fastest peer for ours' ``(method, task, hidden, size)``: NaN when no peer ran."""
    best = best_peer(measurements, ours.key, warm=warm, cpu=cpu)
    if best is None or not ours.ok:
        return float("nan")
    return timing(ours, warm=warm, cpu=cpu) / timing(best, warm=warm, cpu=cpu)


def limit_fraction(ours: Measurement, *, warm: bool = False) -> float:
    """``limit / ours`` (cold or warm): 1 is ours at the arithmetic limit; NaN without a limit."""
    seconds = ours.warm_seconds if warm else ours.seconds
    return ours.limit_seconds / seconds if ours.ok and np.isfinite(ours.limit_seconds) else float("nan")


def _summary_lines(
    measurements: Sequence[Measurement], peers: Sequence[Library], hiddens: Sequence[int], sizes: Sequence[int]
) -> list[str]:
    ours_rows = [m for m in measurements if m.library == "ours" and m.ok]
    lines = [
        "### Ours against the best peer",
        "",
        "One row per (method, task, P, N) that at least one peer offers: the fastest peer's time, ours, and "
        "**ours/best peer** (below 1: ours faster; 0.33× is the issue's 3× target), cold and warm; for exact the "
        "arithmetic limit and the fraction of it we reach. On a loaded machine wall time includes waiting for a "
        "core; the CPU-seconds ratio (each against the peer with the fewest CPU seconds) is the steadier one.",
        "",
        "| Method | Task | P | N | Best peer cold (s) | Ours cold (s) | **Ours/best peer, cold** | Best peer warm (s) "
        "| Ours warm (s) | **Ours/best peer, warm** | Ours/best peer in CPU seconds, cold / warm | limit (numpy) (s) "
        "| Fraction of the limit, cold / warm |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ours in sorted(
        ours_rows, key=lambda m: (spec.METHODS.index(m.method), spec.TASKS.index(m.task), m.hidden, m.size)
    ):
        cold, warm = best_peer(measurements, ours.key), best_peer(measurements, ours.key, warm=True)
        if cold is None and warm is None:
            continue
        approx_cold = "~" if cold is not None and cold.train_limit is not None else ""
        approx_warm = "~" if warm is not None and warm.train_limit is not None else ""
        fractions = f"{_percent(limit_fraction(ours))} / {_percent(limit_fraction(ours, warm=True))}"
        limit = f"{_seconds(ours.limit_seconds)} | {fractions}" if np.isfinite(ours.limit_seconds) else " | "
        lines.append(
            f"| {ours.method} | {TASK_TITLES[ours.task]} | {ours.num_params:,} | {ours.size} | "
            f"{approx_cold}{_seconds(cold.full_seconds) if cold else '—'} "
            f"({_title(peers, cold)}) | {_seconds(ours.seconds)} | "
            f"**{approx_cold}{_ratio(ratio_to_best(measurements, ours))}** | "
            f"{approx_warm}{_seconds(warm.full_warm_seconds) if warm else '—'} ({_title(peers, warm)}) | "
            f"{_seconds(ours.warm_seconds)} | **{approx_warm}{_ratio(ratio_to_best(measurements, ours, warm=True))}** "
            f"| {_ratio(ratio_to_best(measurements, ours, cpu=True))} / "
            f"{_ratio(ratio_to_best(measurements, ours, warm=True, cpu=True))} | {limit} |"
        )
    return [*lines, ""]


def _title(peers: Sequence[Library], measurement: Measurement | None) -> str:
    if measurement is None:
        return "none"
    return next((lib.title for lib in peers if lib.name == measurement.library), measurement.library)


def _timing_lines(
    measurements: Sequence[Measurement],
    peers: Sequence[Library],
    index: dict[tuple[str, str, str, int, int], Measurement],
    hiddens: Sequence[int],
    sizes: Sequence[int],
    full: bool,
) -> list[str]:
    params = {m.hidden: m.num_params for m in measurements if m.ok}
    lines = [
        "### Every measurement: cold and warm wall and CPU time, load, memory",
        "",
        "| Method | Task | P | N | Library | Cold wall (s) | Cold CPU (s) | Warm wall (s) | Warm CPU (s) | "
        "Load start → end | Peak RSS (MiB) | Ours/peer cold | Ours/peer warm |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for method in spec.METHODS:
        for task in spec.TASKS:
            for hidden in hiddens:
                for size in sizes:
                    ours = index.get(("ours", method, task, hidden, size))
                    p_text = f"{params.get(hidden, 0):,}"
                    prefix = f"| {method} | {TASK_TITLES[task]} | {p_text} | {size} |"
                    for library in [OURS, *peers]:
                        if library.name != "ours" and not library.supports(method, task):
                            continue
                        measurement = index.get((library.name, method, task, hidden, size))
                        if measurement is None:
                            if library.name != "ours" and ours is not None:
                                skipped = (library.train_limit.get(method) and task == "topk") or not (
                                    full or library.within_budget(method, task, size)
                                )
                                state = "not run" if skipped else "pending"
                                lines.append(f"{prefix} {library.title} | {state} |" + " |" * 7)
                            continue
                        if not measurement.ok:
                            lines.append(f"{prefix} {library.title} | {measurement.status} |" + " |" * 7)
                            continue
                        approx = "~" if measurement.train_limit is not None else ""
                        cold_ratio = warm_ratio = "—"
                        if library.name == "ours":
                            cold_ratio = f"best: {_ratio(ratio_to_best(measurements, measurement))}"
                            warm_ratio = f"best: {_ratio(ratio_to_best(measurements, measurement, warm=True))}"
                        elif ours is not None and ours.ok:
                            cold_ratio = approx + _ratio(ours.seconds / measurement.full_seconds)
                            warm_ratio = approx + _ratio(ours.warm_seconds / measurement.full_warm_seconds)
                        lines.append(
                            f"{prefix} {library.title} | {approx}{_seconds(measurement.full_seconds)} | "
                            f"{approx}{_seconds(measurement._full(measurement.cpu_seconds))} | "
                            f"{approx}{_seconds(measurement.full_warm_seconds)} | "
                            f"{approx}{_seconds(measurement._full(measurement.warm_cpu_seconds))} | "
                            f"{measurement.load_start:.1f} → {measurement.load_end:.1f} | "
                            f"{measurement.peak_rss_mib:.0f} | {cold_ratio} | {warm_ratio} |"
                        )
                        if library.name == "ours" and np.isfinite(measurement.limit_seconds):
                            lines.append(
                                f"{prefix} limit (numpy) | {_seconds(measurement.limit_seconds)} | | "
                                f"{_seconds(measurement.limit_seconds)} | | | | fraction of the limit: "
                                f"{_percent(limit_fraction(measurement))} | "
                                f"{_percent(limit_fraction(measurement, warm=True))} |"
                            )
    return lines


def _warm_lines(measurements: Sequence[Measurement], titles: dict[str, str]) -> list[str]:
    """How far each library's warm repeat is from its cold scores (ours must reproduce them to 1e-6)."""
    worst: dict[str, float] = {}
    for m in measurements:
        if m.ok and np.isfinite(m.warm_relative_difference):
            worst[m.library] = max(worst.get(m.library, 0.0), m.warm_relative_difference)
    if not worst:
        return []
    ours = worst.get("ours", float("nan"))
    verdict = (
        f"within {spec.WARM_RELATIVE_TOLERANCE:g}"
        if ours <= spec.WARM_RELATIVE_TOLERANCE
        else f"**above {spec.WARM_RELATIVE_TOLERANCE:g}**"
    )
    limits = [m.limit_relative_difference for m in measurements if m.ok and np.isfinite(m.limit_relative_difference)]
    lines = [
        "**Warm = cold.** Largest `max |warm − cold| / max |cold|` over every measurement of a library: "
        + ", ".join(f"{titles.get(name, name)} {value:.1e}" for name, value in worst.items())
        + f"; ours is {verdict} (our randomized solvers reseed per call). A peer above 0 computes different numbers "
        "in its repeat: e.g. pyDVL's Nyström draws a new random sketch per call.",
    ]
    if limits:
        lines += [
            "",
            f"**Limit check.** The float64 NumPy closed form is within {max(limits):.1e} (max rel. diff.) of our "
            "float32 exact scores.",
        ]
    return [*lines, ""]


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
    "* **Nyström.** Ours (`NystromIHVP`, `curvature='hessian'`) and pyDVL (`NystroemSketchInfluence`, "
    "`SecondOrderMode.HESSIAN`) sketch the same mean-loss Hessian with the same rank and invert `Â + λI` by "
    "Woodbury; the random test matrices differ (NumPy seed 0 vs torch seed 0), so the scores agree as far as the "
    "rank captures the spectrum. The Hessian here is indefinite (lowest eigenvalue about −0.03): neither sketch is "
    "then guaranteed PSD.",
    "* **EK-FAC.** Both keep the Kronecker eigenbasis of each Dense/Linear layer (bias appended to the layer input), "
    "average the statistics over the N examples, replace the eigenvalues by the second moments of the rotated "
    "per-example pseudo-gradients, and add the absolute damping λ to each of them. They differ in the statistics: "
    "ours (`fisher='expected'`) uses the exact Gauss-Newton/expected Fisher of the softmax cross-entropy (all "
    "classes, weights p_c); pyDVL backpropagates one pseudo-loss `Σ_c √p_c log p_c` per example, i.e. one output "
    "gradient `Σ_c √p_c ∇log p_c` whose outer product has the cross terms between classes that the Fisher "
    "`Σ_c p_c ∇log p_c ∇log p_cᵀ` lacks. So neither is the other's approximation and Pearson is reported, not "
    "required to reach 0.99. Kronfluence (`FactorArguments(strategy='ekfac')`, `ScoreArguments(damping_factor=λ)`) "
    "averages its statistics over the examples and adds λ to the corrected eigenvalues like ours, but samples one "
    "label per example from the softmax (the sampled true Fisher, torch seed 0) where ours takes the expectation.",
    "* **TracIn.** Influenciae 0.3.0 puts `√η` on both sides, Captum and we put `η` on one side: the same score.",
    "* **TracInCPFast.** Captum's takes the final layer's weight only, `Σ_c η_c (a_x·a_z)(g_x·g_z)`; ours counts its "
    "bias too, `Σ_c η_c (a_x·a_z + 1)(g_x·g_z)` (= `TracIn(start_layer=-1)`): close scores, not equal ones.",
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


def _growth_lines(
    measurements: Sequence[Measurement], libraries: Sequence[Library], hiddens: Sequence[int], sizes: Sequence[int]
) -> list[str]:
    """Cold wall-time growth from the smaller to the larger model (each N) and training set (each P)."""
    index = {(m.library, *m.key): m for m in measurements if m.ok}
    params = {m.hidden: m.num_params for m in measurements if m.ok}
    comparisons: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
    if len(hiddens) >= 2:
        small, large = hiddens[0], hiddens[-1]
        comparisons += [
            (f"P {params.get(small, 0):,} → {params.get(large, 0):,} (N = {n})", (small, n), (large, n)) for n in sizes
        ]
    if len(sizes) >= 2:
        comparisons += [
            (f"N {sizes[0]} → {sizes[-1]} (P = {params.get(h, 0):,})", (h, sizes[0]), (h, sizes[-1])) for h in hiddens
        ]
    if not comparisons:
        return []
    lines = [
        "**Growth**: cold wall-time ratio t(larger) / t(smaller).",
        "",
        "| Method | Task | Growth | " + " | ".join(library.title for library in libraries) + " |",
        "|---|---|---|" + "---:|" * len(libraries),
    ]
    for method in spec.METHODS:
        for task in spec.TASKS:
            for title, first_key, last_key in comparisons:
                cells = []
                for library in libraries:
                    first = index.get((library.name, method, task, *first_key))
                    last = index.get((library.name, method, task, *last_key))
                    cells.append(_ratio(last.full_seconds / first.full_seconds) if first and last else "")
                if any(cells):
                    lines.append(f"| {method} | {TASK_TITLES[task]} | {title} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _commit() -> str:
    """``git rev-parse --short HEAD`` of the repository (plus ``+dirty`` with uncommitted changes to tracked files)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=30, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "influenciae", "benchmarks/peers"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=list(DEFAULT_HIDDEN), help="hidden widths H (model sizes)"
    )
    parser.add_argument("--peers", nargs="+", choices=[p.name for p in PEERS], default=list(DEFAULT_PEERS))
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS, help="seconds per measurement")
    parser.add_argument("--full", action="store_true", help="ignore the slow peers' budgets (hours)")
    parser.add_argument("--setup-only", action="store_true", help="create the peers' environments and stop")
    parser.add_argument("--keep", type=Path, help="keep problems and scores in this directory")
    parser.add_argument(
        "--reuse-problems", action="store_true", help="with --keep: reuse the problems found there (no training)"
    )
    parser.add_argument("--note", default="", help="a sentence shown in the block (e.g. why a run was reduced)")
    args = parser.parse_args(argv)
    command = ".venv/bin/python benchmarks/peers/run_peers.py " + " ".join(
        shlex.quote(arg) for arg in (sys.argv[1:] if argv is None else argv)
    )

    libraries = [OURS, *(peer for peer in PEERS if peer.name in args.peers)]
    for library in libraries:
        ensure_venv(library)
    if args.setup_only:
        return 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(libraries)) as pool:  # each import takes a while
        versions = dict(zip([lib.name for lib in libraries], pool.map(library_versions, libraries), strict=True))
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="influenciae_peers_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    load_at_start = _load_average()
    try:
        problems = {
            (hidden, size): workdir / f"problem_h{hidden}_n{size}.npz" for hidden in args.hidden for size in args.sizes
        }
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
                    "--hidden",
                    *map(str, args.hidden),
                ],
                check=True,
                env={**os.environ, **OURS.env},
                cwd=ROOT,
            )
        num_params = {hidden: spec.load_problem(problems[hidden, args.sizes[0]]).num_params for hidden in args.hidden}
        commit = _commit()
        outputs = workdir / "scores"
        outputs.mkdir(exist_ok=True)

        def report(measurements: list[Measurement]) -> str:
            now = _commit()  # the workers import the working tree: a commit landing mid-run shows here
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
                command=command,
                commit=f"`{commit}`" if now == commit else f"`{commit}` at the start, `{now}` at the last measurement",
                note=args.note,
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
        log(
            f"DISAGREEMENT: exact {failure.library} {failure.task} H={failure.hidden} N={failure.size}: "
            f"Pearson {failure.pearson:.4f}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
