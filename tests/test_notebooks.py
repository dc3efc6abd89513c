"""Execute every tutorial notebook of ``notebooks/`` so that none of them rots.

Each notebook runs top to bottom in a fresh ``python3`` kernel (the interpreter running the tests: checked by an
injected first cell), in a temporary working directory, with ``INFLUENCIAE_NOTEBOOK_FAST=1`` (fewer epochs, smaller
subsets). The notebooks ``assert`` their key numbers, so a run that completes has checked them. A failure reports
the failing cell's source and error. The committed files must carry no outputs and match their source,
``notebooks/build_notebooks.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_SECONDS = 600


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOK_DIR / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 6, [path.name for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for position, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {position} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {position} has an execution count"


def test_notebooks_match_their_source() -> None:
    builder = _load_builder()
    assert sorted(builder.NOTEBOOKS) == [path.name for path in NOTEBOOKS], "every notebook comes from the builder"
    stale = [
        name for name in builder.NOTEBOOKS if (NOTEBOOK_DIR / name).read_text(encoding="utf-8") != builder.render(name)
    ]
    assert not stale, f"run `python notebooks/build_notebooks.py`: {stale} differ from their source"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(path, as_version=4)
    # The kernel must be the interpreter running the tests (jupyter_client maps the kernelspec's "python" to it).
    probe = nbformat.v4.new_code_cell(f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix")
    notebook.cells.insert(0, probe)
    monkeypatch.setenv("INFLUENCIAE_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_SECONDS,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
    except nbclient.exceptions.DeadKernelError as error:
        # The kernel is a subprocess: an interpreter abort (e.g. TensorFlow's pfor on attention) fails the test at
        # once with the cell that was running, instead of hanging until the cell timeout.
        running = next(
            (cell.source[:200] for cell in notebook.cells if cell.cell_type == "code" and not cell.execution_count),
            "?",
        )
        pytest.fail(f"{path.name}: the kernel died ({error}) while running the cell\n{running}", pytrace=False)
    unexecuted = [cell.source[:60] for cell in notebook.cells if cell.cell_type == "code" and not cell.execution_count]
    assert not unexecuted, f"{path.name}: cells not executed: {unexecuted}"
