"""MkDocs hook: publish the repository's ``notebooks/*.ipynb`` as downloadable files of the site.

The notebooks live outside ``docs/``, where strict mode cannot check links to them. Adding them to the site's files
under ``notebooks/`` makes ``docs/notebooks.md`` link them with ordinary relative links (``notebooks/name.ipynb``),
which strict mode then validates: a renamed or deleted notebook fails the build. They are copied, not executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

NOTEBOOKS = "notebooks"


def on_files(files: Files, config: Any) -> Files:
    """Add every notebook of the repository's ``notebooks/`` directory to the site's files."""
    repository = Path(config["config_file_path"]).resolve().parent
    directory = repository / NOTEBOOKS
    for notebook in sorted(directory.glob("*.ipynb")) if directory.is_dir() else []:
        files.append(File.generated(config, f"{NOTEBOOKS}/{notebook.name}", abs_src_path=str(notebook)))
    return files
