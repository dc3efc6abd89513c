"""The documentation site: every public name is documented and rendered, the nav is whole, the site builds strictly.

Public modules are discovered with ``pkgutil`` (private ``_modules`` skipped), so a new module is checked without
editing this file. A module's public names are its ``__all__``; a module without ``__all__`` exposes what it defines
(not what it imports) under a name without a leading underscore, which is also what the API reference renders
(mkdocstrings' ``filters: public``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

import influenciae

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
CONFIG = ROOT / "mkdocs.yml"
NOTEBOOKS = ROOT / "notebooks"

_DIRECTIVE = re.compile(r"^::: *([\w.]+)[ \t]*$")


# ---------------------------------------------------------------------------------------------- discovery


@cache
def discovered_modules() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(importable public modules, public modules needing an optional dependency that is not installed)``."""
    names, unavailable = ["influenciae"], []
    for info in pkgutil.walk_packages(influenciae.__path__, "influenciae.", onerror=lambda name: None):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as error:  # an optional dependency (faiss, Apache Beam, ...) missing or unusable here
            if (error.name or "").partition(".")[0] == "influenciae":
                raise
            unavailable.append(info.name)
            continue
        names.append(info.name)
    return tuple(sorted(names)), tuple(sorted(unavailable))


def public_modules() -> tuple[str, ...]:
    return discovered_modules()[0]


@cache
def module_attribute_docstrings(module_name: str) -> dict[str, str]:
    """Docstrings of module-level assignments (a string literal right after ``NAME = ...``), as griffe reads them."""
    source = inspect.getsource(importlib.import_module(module_name))
    body = ast.parse(source).body
    docstrings = {}
    for statement, following in zip(body, body[1:], strict=False):
        targets: list[ast.expr] = []
        if isinstance(statement, ast.Assign):
            targets = statement.targets
        elif isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        is_docstring = (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        )
        for target in targets:
            if isinstance(target, ast.Name) and is_docstring:
                docstrings[target.id] = following.value.value
    return docstrings


@cache
def module_assignments(module_name: str) -> tuple[str, ...]:
    source = inspect.getsource(importlib.import_module(module_name))
    names = []
    for statement in ast.parse(source).body:
        targets = statement.targets if isinstance(statement, ast.Assign) else []
        if isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        names += [target.id for target in targets if isinstance(target, ast.Name)]
    return tuple(names)


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        defined_here = getattr(value, "__module__", None) == module_name and (
            inspect.isclass(value) or inspect.isfunction(value)
        )
        if defined_here or name in module_assignments(module_name):
            names.append(name)
    return names


@cache
def imported_from(module_name: str) -> dict[str, str]:
    """``{name: source module}`` of the module's ``from influenciae... import name`` statements (re-exports)."""
    module = importlib.import_module(module_name)
    sources = {}
    for statement in ast.parse(inspect.getsource(module)).body:
        if isinstance(statement, ast.ImportFrom) and statement.module:
            package = module_name if hasattr(module, "__path__") else module_name.rpartition(".")[0]
            source = importlib.util.resolve_name("." * statement.level + statement.module, package)
            if statement.level == 0:
                source = statement.module
            for alias in statement.names:
                if source.startswith("influenciae"):
                    sources[alias.asname or alias.name] = source
    return sources


def canonical(module_name: str, name: str) -> str:
    """The path under which the API reference renders ``module.name``: where it is defined, not re-exported."""
    value = getattr(importlib.import_module(module_name), name)
    if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__.startswith("influenciae"):
        return f"{value.__module__}.{value.__qualname__}"
    source = imported_from(module_name).get(name)
    return canonical(source, name) if source else f"{module_name}.{name}"


@cache
def directives() -> dict[str, dict[str, Any]]:
    """``{identifier: options}`` of every ``::: identifier`` block of the API pages."""
    found: dict[str, dict[str, Any]] = {}
    for page in sorted(API.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            match = _DIRECTIVE.match(line)
            if not match:
                continue
            block = []
            for following in lines[number + 1 :]:
                if following.strip() and not following.startswith(" "):
                    break
                block.append(following)
            options = (yaml.safe_load("\n".join(block)) or {}).get("options", {}) if block else {}
            identifier = match.group(1)
            assert identifier not in found, f"{identifier} is rendered twice ({page.name})"
            found[identifier] = options
    return found


def rendered_paths() -> set[str]:
    """Canonical paths of the objects the API pages render (module directives render their public names)."""
    rendered = set()
    modules = set(public_modules())
    for identifier, options in directives().items():
        if identifier in discovered_modules()[1]:
            continue  # not importable here: its names are not checked in this environment
        if identifier in modules:
            rendered.add(identifier)
            members = options.get("members", None)
            if members is False:
                continue
            names = public_names(identifier) if members in (None, True) else members
            rendered.update(canonical(identifier, name) for name in names)
        else:
            module_name, _, name = identifier.rpartition(".")
            rendered.add(canonical(module_name, name) if module_name in modules else identifier)
    return rendered


def all_public_objects() -> list[tuple[str, str]]:
    return [(module_name, name) for module_name in public_modules() for name in public_names(module_name)]


def own_docstring(value: Any) -> str:
    """The docstring written for ``value`` (not the one dataclasses and named tuples generate)."""
    if inspect.isclass(value):
        text = value.__dict__.get("__doc__") or ""
        return "" if text.startswith(f"{value.__name__}(") else text
    return getattr(value, "__doc__", None) or ""


def load_config() -> dict[str, Any]:
    class TolerantLoader(yaml.SafeLoader):
        """Ignores the tags mkdocs configurations use (``!!python/name:...``, ``!ENV``, ``!relative``)."""

    TolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load(CONFIG.read_text(encoding="utf-8"), Loader=TolerantLoader)  # a SafeLoader subclass


def nav_files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [] if "://" in nav else [nav]
    if isinstance(nav, list):
        return [file for item in nav for file in nav_files(item)]
    if isinstance(nav, dict):
        return [file for value in nav.values() for file in nav_files(value)]
    return []


# ---------------------------------------------------------------------------------------------- names


def test_discovery_finds_the_package_layout():
    modules = public_modules()
    for expected in ("influenciae", "influenciae.model", "influenciae.hessian", "influenciae.influence.base"):
        assert expected in modules
    assert not any("._" in name for name in modules)
    for name in discovered_modules()[1]:  # optional dependency missing here: still rendered (griffe reads source)
        assert name in directives(), f"add '::: {name}' to a page of docs/api/"
    assert "InfluenceModel" in public_names("influenciae")
    assert canonical("influenciae", "InfluenceModel") == "influenciae.model.InfluenceModel"
    # re-exports are followed to the defining module (how constants re-exported by a package are found)
    assert imported_from("influenciae")["InfluenceModel"] == "influenciae.model"
    assert imported_from("influenciae.influence.first_order")["InfluenceModel"] == "influenciae.model"
    # without __all__: what the module defines, not what it imports
    cache_names = public_names("influenciae.cache")
    assert "DiskCache" in cache_names and "FORMAT_VERSION" in cache_names
    assert "np" not in cache_names and "Path" not in cache_names


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_module_has_a_docstring(module_name):
    assert (importlib.import_module(module_name).__doc__ or "").strip(), f"{module_name} has no module docstring"


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_module_is_rendered(module_name):
    assert module_name in directives(), f"add '::: {module_name}' to a page of docs/api/"


def test_every_public_name_is_rendered_by_an_api_directive():
    rendered = rendered_paths()
    missing = [
        f"{module_name}.{name} (rendered as {canonical(module_name, name)})"
        for module_name, name in all_public_objects()
        if not name.startswith("__") and canonical(module_name, name) not in rendered
    ]
    assert not missing, "not in the API reference (add a '::: module' directive to docs/api/):\n" + "\n".join(missing)


def test_every_public_name_has_a_docstring():
    undocumented = set()
    for module_name, name in all_public_objects():
        if name.startswith("__"):
            continue
        value = getattr(importlib.import_module(module_name), name)
        if inspect.isclass(value) or inspect.isfunction(value) or isinstance(value, types.ModuleType):
            documented = own_docstring(value).strip()
        else:  # a constant or type alias: the string literal after its assignment, where it is defined
            home = canonical(module_name, name).rpartition(".")[0]
            documented = module_attribute_docstrings(home).get(name, "").strip()
        if not documented:
            undocumented.add(canonical(module_name, name))
    assert not undocumented, "public names without a docstring:\n" + "\n".join(sorted(undocumented))


def test_every_public_method_has_a_docstring():
    """Methods and properties of public classes: their own docstring or an inherited one (rendered at the base)."""
    undocumented = set()
    for module_name, name in all_public_objects():
        value = getattr(importlib.import_module(module_name), name)
        if not inspect.isclass(value) or not value.__module__.startswith("influenciae"):
            continue
        for attribute, member in vars(value).items():
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if attribute.startswith("_") or not inspect.isfunction(function):
                continue
            inherited = (getattr(getattr(base, attribute, None), "__doc__", None) for base in value.__mro__)
            if not (function.__doc__ or "").strip() and not any((doc or "").strip() for doc in inherited):
                undocumented.add(f"{value.__module__}.{value.__qualname__}.{attribute}")
    assert not undocumented, "public methods without a docstring:\n" + "\n".join(sorted(undocumented))


def test_the_api_overview_lists_every_top_level_name():
    overview = (API / "index.md").read_text(encoding="utf-8")
    missing = [name for name in influenciae.__all__ if f"`{name}`" not in overview]
    assert not missing, f"docs/api/index.md does not list {missing}"


def test_directives_name_existing_objects():
    modules = set(public_modules()) | set(discovered_modules()[1])
    for identifier in directives():
        if identifier in modules:
            continue
        module_name, _, name = identifier.rpartition(".")
        assert module_name in modules and hasattr(importlib.import_module(module_name), name), identifier


# ---------------------------------------------------------------------------------------------- site structure


def test_every_nav_file_exists_and_every_page_is_in_the_nav():
    config = load_config()
    files = nav_files(config["nav"])
    missing = [file for file in files if not (DOCS / file).is_file()]
    assert not missing, f"nav files missing from docs/: {missing}"
    assert len(files) == len(set(files)), "a page appears twice in the nav"
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md") if "hooks" not in path.parts}
    assert pages - set(files) == set(), f"pages not in the nav: {sorted(pages - set(files))}"
    for expected in ("index.md", "theory.md", "cli.md", "notebooks.md", "migration.md", "methods.md"):
        assert expected in files


def test_build_code_named_by_the_config_exists():
    config = load_config()
    for hook in config.get("hooks", []):
        assert (ROOT / hook).is_file(), hook
    python = next(plugin["mkdocstrings"] for plugin in config["plugins"] if isinstance(plugin, dict))
    options = python["handlers"]["python"]["options"]
    for extension in options.get("extensions", []):
        if isinstance(extension, str) and extension.endswith(".py"):
            assert (ROOT / extension).is_file(), extension
    assert options["docstring_style"] == "google"
    assert options["show_source"] is False


def test_the_notebooks_page_links_every_notebook_and_only_existing_ones():
    text = (DOCS / "notebooks.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(notebooks/([^)#\s]+\.ipynb)\)", text))
    present = {path.name for path in NOTEBOOKS.glob("*.ipynb")} if NOTEBOOKS.is_dir() else set()
    assert linked <= present, f"docs/notebooks.md links missing notebooks: {sorted(linked - present)}"
    assert present <= linked, f"notebooks not listed in docs/notebooks.md: {sorted(present - linked)}"


# ---------------------------------------------------------------------------------------------- the real build


@pytest.mark.slow
def test_mkdocs_builds_strictly_and_renders_every_public_name(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG), "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    html = "\n".join(path.read_text(encoding="utf-8") for path in (site / "api").rglob("*.html"))
    anchors = set(re.findall(r'id="(influenciae[\w.]*)"', html))
    missing = sorted(
        {canonical(module_name, name) for module_name, name in all_public_objects() if not name.startswith("__")}
        - anchors
    )
    assert not missing, f"public names without an anchor in the built API reference: {missing}"
    assert not (site / "hooks").exists(), "build code was published"
    present = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) if NOTEBOOKS.is_dir() else []
    for notebook in present:
        assert (site / "notebooks" / notebook).is_file(), notebook
