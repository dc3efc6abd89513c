"""What every subcommand shares: exit codes, the :class:`Command` record, usage errors, the step logger and
timer, and the JSON writer of ``metrics.json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXIT_OK = 0
"""Exit code of a successful run (also after ``--help``)."""
EXIT_FAILURE = 1
"""Exit code of a valid command line whose run failed (a missing file, data that do not fit, a computation error)."""
EXIT_USAGE = 2
"""Exit code of a usage error (argparse's convention)."""
EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C."""
# influenciae.cache's hint (not imported: it loads TensorFlow); tests/test_cli.py checks the two are equal
_OVERWRITE_HINT = "pass overwrite=True to rebuild the cache (this deletes its files) or choose another path"


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args) -> exit code`` does the work."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _UsageError(Exception):
    """A combination of arguments argparse cannot check by itself (exit code 2)."""


def _finish_timings(timings: dict[str, float], start: float) -> dict[str, float]:
    timings["total"] = time.perf_counter() - start
    return {name: round(value, 3) for name, value in timings.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from influenciae.app.report import write_text

    write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
