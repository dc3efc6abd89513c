"""Griffe extension: render the package's docstrings as they are written, in the Markdown API reference.

Two habits of the docstrings that the Google-style parser of mkdocstrings does not know:

* Sphinx roles (``:class:`~influenciae.InfluenceModel```), which Markdown would print literally. Each role is
  rewritten into an *optional* autorefs link to the object's canonical path: a link when the object is rendered
  somewhere in the API reference, plain code otherwise (private helpers, external objects), never a build warning.
* ``Example:`` sections (singular), which the parser reads as an admonition, so that their ``>>>`` lines become
  nested quotes; they are renamed ``Examples:`` and rendered as Python sessions.

Role names are resolved like Python would read them from the docstring's place: the object itself (``:meth:`solve```
inside a class), its parents, its module, then the top-level package; re-exports are followed to the defining
module. ``~`` shows the last component only, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|obj|exc|const):`(~?)([\w.]+)(?:\(\))?`")


def _lookup(scope: Any, dotted: str) -> Any | None:
    try:
        return scope[dotted]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _canonical_path(found: Any, collection: Any) -> str:
    seen: set[str] = set()
    while found.is_alias and found.target_path not in seen:
        seen.add(found.target_path)
        target = _lookup(collection, found.target_path)
        if target is None:
            return found.target_path
        found = target
    return found.path


def _resolve(name: str, obj: Any, collection: Any) -> str | None:
    scopes: list[Any] = []
    scope = obj
    while scope is not None:
        scopes.append(scope)
        scope = scope.parent
    for candidate in scopes:
        found = _lookup(candidate, name)
        if found is not None:
            return _canonical_path(found, collection)
    found = _lookup(collection, name)
    return None if found is None else _canonical_path(found, collection)


class DocstringCompatibility(griffe.Extension):
    """Rewrites Sphinx roles and ``Example:`` headings once the whole package is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite every docstring of the package."""
        collection = loader.modules_collection
        for obj in _walk(pkg):
            docstring = obj.docstring
            if docstring is None or ":" not in docstring.value:
                continue
            text = _EXAMPLE_HEADING.sub(r"\1Examples:", docstring.value)

            def replace(match: re.Match[str], obj: Any = obj) -> str:
                short, name = match.group(1), match.group(2)
                display = name.rsplit(".", 1)[-1] if short else name
                path = _resolve(name, obj, collection)
                if path is None:
                    return f"`{display}`"
                return f'<autoref identifier="{path}" optional><code>{display}</code></autoref>'

            docstring.value = _ROLE.sub(replace, text)
            docstring.__dict__.pop("parsed", None)  # re-parse with the new text if it was parsed already


def _walk(obj: Any) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)
