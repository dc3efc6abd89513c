"""The layering of ``docs/architecture.md``, checked on the source: who may import whom, where Keras lives, file sizes.

These tests read the package as text (``ast``), import nothing and take well under a second. They fail when a change
puts Keras code outside the model wing, makes a lower layer import a higher one, or grows a library file past the
size the architecture allows; the message names the file and the line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "influenciae"

# Layers, bottom to top (docs/architecture.md). A module may import its own wing and any wing of a LOWER layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("types", "_backend"),
    ("cache", "data"),
    ("model",),
    ("hessian", "search"),
    ("influence", "language"),
    ("concepts", "relevance", "robustness", "evaluation", "distributed", "compat"),
    ("app", "cli", "<root>"),
)
RANK = {wing: rank for rank, wings in enumerate(LAYERS) for wing in wings}

# The only places allowed to touch Keras objects (the model wing) and to build models (the application wing).
KERAS_WINGS = {"model", "app", "cli"}
KERAS_PATTERN = re.compile(r"import keras|keras_module_of|variable_tensor")

MAX_LINES = 520  # "no library file over ~500 lines"


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, target) for line, target in found if target.split(".")[0] == "influenciae"]


def test_every_wing_has_a_layer() -> None:
    wings = {_wing(module) for module, _ in _modules()}
    assert wings <= set(RANK), f"wings without a layer in docs/architecture.md: {sorted(wings - set(RANK))}"


def test_imports_only_go_down() -> None:
    upward = []
    for module, path in _modules():
        source = _wing(module)
        for line, target in _imports(module, path):
            destination = _wing(target)
            if destination != source and RANK[destination] > RANK[source]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({source}) imports {target} ({destination})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_keras_is_touched_only_by_the_model_and_application_wings() -> None:
    outside = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {text.strip()}"
        for module, path in _modules()
        if _wing(module) not in KERAS_WINGS
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if KERAS_PATTERN.search(text)
    ]
    assert not outside, "Keras outside influenciae/model/ (move it into the model wing):\n" + "\n".join(outside)


@pytest.mark.parametrize("module,path", _modules(), ids=[module for module, _ in _modules()])
def test_library_files_stay_small(module: str, path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (> {MAX_LINES}): split it"
