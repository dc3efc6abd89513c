"""Self-contained HTML reports and CSV files of ``influenciae demo``, ``self-influence`` and ``top-k``.

A report is one HTML file with inline CSS and PNG figures embedded as base64 ``data:`` URIs, so it can be mailed or
archived alone (no scripts, no external resources). Numbers in tables are formatted by :func:`format_cell` (4
significant digits); CSV files keep full precision (``repr`` of floats) so they can be compared to the library's
output exactly.

Example:
    >>> body = heading("Summary") + html_table(["setting", "value"], [["method", "first_order"]])
    >>> write_html(Path("runs/report.html"), "influenciae", body)
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CSS",
    "html_table",
    "format_cell",
    "image_tag",
    "heading",
    "paragraph",
    "html_page",
    "write_html",
    "write_text",
    "write_csv",
    "csv_value",
    "is_image_batch",
    "feature_table",
    "self_influence_report",
    "top_k_report",
]

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
tr.flipped td, tr.mismatch td { background: #fde8e6; }
tr.proponent td:first-child { color: #1a7f37; }
tr.opponent td:first-child { color: #b42318; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
"""
"""The style sheet embedded in every HTML report, so a report is one self-contained file."""


def format_cell(value: Any) -> str:
    """A table cell: ``yes``/``no`` for booleans, 4 significant digits for floats, ``str`` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; every cell is escaped.

    Args:
        header: Column titles.
        rows: One sequence of cells per row (formatted by :func:`format_cell`).
        row_classes: Optional CSS class per row (``""`` for none), e.g. ``"flipped"`` to highlight a row.

    Returns:
        The ``<table>`` element as a string.
    """
    if row_classes is not None and len(row_classes) != len(rows):
        raise ValueError(f"row_classes has {len(row_classes)} entries for {len(rows)} rows.")
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = []
    for position, row in enumerate(rows):
        css = f' class="{html.escape(row_classes[position])}"' if row_classes and row_classes[position] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(format_cell(cell))}</td>" for cell in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def image_tag(images: Mapping[str, bytes], name: str) -> str:
    """A paragraph holding the PNG ``images[name]`` inline (base64), with the file name as alt text."""
    encoded = base64.b64encode(images[name]).decode("ascii")
    return f'<p><img src="data:image/png;base64,{encoded}" alt="{html.escape(name)}"></p>'


def heading(text: str, level: int = 2) -> str:
    """An escaped ``<h{level}>`` heading."""
    return f"<h{level}>{html.escape(text)}</h{level}>\n"


def paragraph(text: str, *, note: bool = False) -> str:
    """An escaped paragraph; ``note=True`` renders it smaller and grey."""
    css = ' class="note"' if note else ""
    return f"<p{css}>{html.escape(text)}</p>\n"


def html_page(title: str, body: str) -> str:
    """A complete HTML document with the shared style sheet; ``body`` is inserted as is (already escaped)."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` in UTF-8, atomically (:func:`influenciae.cache.atomic_write`): a reader, or a rerun
    after a crash, never sees a partial file."""
    from influenciae.cache import atomic_write

    atomic_write(path, text.encode("utf-8"))


def write_html(path: str | os.PathLike[str], title: str, body: str) -> None:
    """Write :func:`html_page` to ``path`` (UTF-8, atomically)."""
    write_text(path, html_page(title, body))


def csv_value(value: Any) -> Any:
    """A CSV cell that keeps full precision: ``repr`` of floats (round-trips exactly), ints and strings as is."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """Write a CSV file with a header row (atomically); returns the number of data rows written."""
    count = 0
    stream = io.StringIO(newline="")
    writer = csv.writer(stream)
    writer.writerow(list(header))
    for row in rows:
        writer.writerow([csv_value(cell) for cell in row])
        count += 1
    write_text(path, stream.getvalue())
    return count


def is_image_batch(examples: Any) -> bool:
    """Whether ``examples [n, ...]`` look like images: ``[n, H, W]`` or ``[n, H, W, 1|3|4]`` with ``H, W ≥ 4``.

    Anything else (flat feature vectors ``[n, d]``, sequences, several inputs) is shown as a table of values.
    """
    if not isinstance(examples, np.ndarray):
        return False
    shape = examples.shape[1:]
    if len(shape) == 3 and shape[-1] not in (1, 3, 4):
        return False
    return len(shape) in (2, 3) and shape[0] >= 4 and shape[1] >= 4


def feature_table(
    leading_header: Sequence[str],
    leading: Sequence[Sequence[Any]],
    features: Any,
    *,
    max_features: int = 12,
    row_classes: Sequence[str] | None = None,
) -> str:
    """A table of tabular examples: some leading columns (index, score, label...) then their first feature values.

    Args:
        leading_header: Titles of the leading columns.
        leading: One row of leading cells per example.
        features: ``[n, ...]`` feature values (flattened per example), or ``None`` to show no features.
        max_features: Features shown; a last ``…`` column says how many are left out.
        row_classes: Optional CSS class per row.

    Returns:
        The ``<table>`` element as a string.
    """
    if features is None:
        return html_table(leading_header, leading, row_classes)
    flat = np.asarray(features).reshape(len(leading), -1)
    shown = min(max_features, flat.shape[1])
    header = [*leading_header, *(f"x[{j}]" for j in range(shown))]
    rows = [[*cells, *(_feature(v) for v in values[:shown])] for cells, values in zip(leading, flat, strict=True)]
    if flat.shape[1] > shown:
        header.append("…")
        rows = [[*row, f"+{flat.shape[1] - shown} more"] for row in rows]
    return html_table(header, rows, row_classes)


def _feature(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


# ---------------------------------------------------------------------- the reports of the console commands


def _is_class(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _mismatch(label: Any, predicted: Any) -> bool:
    """Whether a classification example is misclassified (regression and text labels are never flagged)."""
    return _is_class(label) and _is_class(predicted) and int(label) != int(predicted)


def _cell(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _settings_rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
    model, method = metrics["model"], metrics["method"]
    rows: list[list[Any]] = [
        ["model", model["path"]],
        ["loss", model["loss"] + (" (from logits)" if model["from_logits"] else "")],
        ["parameters / outputs per example", f"{model['num_params']} / {model['num_outputs']}"],
        ["training data", f"{metrics['train_data']['source']}: {metrics['train_data']['num_examples']} examples"],
    ]
    if "test_data" in metrics:
        rows.append(["test data", f"{metrics['test_data']['source']}: {metrics['test_data']['num_examples']} examples"])
    rows.append(["method", f"{method['name']}: {method['description']}"])
    if model["watched_weights"]:
        rows.append(["watched weights (P)", f"{', '.join(model['watched_weights'])} ({model['num_watched_params']})"])
    if method.get("solver"):
        options = ", ".join(f"{key}={value}" for key, value in method["solver_options"].items())
        rows.append(
            ["solver / damping", f"{method['solver']}{f' ({options})' if options else ''} / {method['damping']:g}"]
        )
    extras = {key: method[key] for key in ("subspace_dim", "rank", "learning_rate", "l2", "step_size") if key in method}
    extras.update({key: method[key] for key in ("projection_dim", "layer") if key in method})
    if extras:
        rows.append(["method options", ", ".join(f"{key}={value}" for key, value in extras.items())])
    return rows


def _save_figures(output: Path, figures: Mapping[str, Any]) -> dict[str, bytes]:
    from influenciae.app import plots

    images = {}
    for name, figure in figures.items():
        plots.save_figure(figure, output / name)
        images[name] = (output / name).read_bytes()
    return images


def _matplotlib_available() -> bool:
    try:
        from influenciae.app import plots

        plots.require_matplotlib()
    except ImportError:
        return False
    return True


def self_influence_report(
    output: Path,
    metrics: Mapping[str, Any],
    scores: np.ndarray,
    scan: Any,
    shown: np.ndarray,
    inputs: np.ndarray | None,
    *,
    title: str,
) -> list[str]:
    """Write ``report.html`` (and its PNG figures) of ``influenciae self-influence``.

    Args:
        output: The output directory.
        metrics: The run's metrics (``model``, ``method``, ``train_data``, ``summary``, ``ranking``).
        scores: Self-influence ``[N]``.
        scan: The :class:`~influenciae.app.io.ScanResult` of the training data (labels, predictions, losses).
        shown: Indices of the ranked examples shown ``[k]``, first to last.
        inputs: Their inputs ``[k, ...]`` (images are drawn, other inputs tabulated), or None.
        title: Title of the page.

    Returns:
        The files written, ``report.html`` first.
    """
    from influenciae.app import plots

    order = metrics["ranking"]["order"]
    summary = metrics["summary"]
    figures: dict[str, Any] = {}
    images_available = _matplotlib_available()
    images_of_inputs = inputs if inputs is not None and is_image_batch(inputs) and len(shown) > 0 else None
    draw_images = images_available and images_of_inputs is not None
    if images_available and summary["num_non_finite"] < scores.size:
        figures["score_histogram.png"] = plots.plot_score_histogram(
            scores,
            highlighted={f"{'top' if order == 'descending' else 'bottom'} {len(shown)}": scores[shown]},
            title=f"Self-influence of {scores.size} training examples",
            xlabel="self-influence",
        )
    labels = [_cell(scan.labels[i]) for i in shown]
    predicted = [_cell(scan.predicted[i]) for i in shown]
    if draw_images and images_of_inputs is not None:
        figures["ranking.png"] = plots.plot_image_grid(
            images_of_inputs,
            [f"#{i} y={y} p={p}\n{scores[i]:.3g}" for i, y, p in zip(shown, labels, predicted, strict=True)],
            title_colors=[
                plots.OPPONENT_COLOR if _mismatch(y, p) else None for y, p in zip(labels, predicted, strict=True)
            ],
            suptitle=f"{'Highest' if order == 'descending' else 'Lowest'} self-influence (red: misclassified)",
        )
    images = _save_figures(output, figures)
    leading = [
        [rank, int(i), float(scores[i]), float(scan.losses[i]), y, p]
        for rank, (i, y, p) in enumerate(zip(shown, labels, predicted, strict=True), start=1)
    ]
    classes = ["mismatch" if _mismatch(y, p) else "" for y, p in zip(labels, predicted, strict=True)]
    header = ["rank", "index", "self-influence", "loss", "label", "predicted"]
    table = feature_table(header, leading, None if draw_images or inputs is None else inputs, row_classes=classes)
    summary_rows = [
        ["examples", summary["num_examples"]],
        ["min / median / max", f"{summary['min']:.4g} / {summary['median']:.4g} / {summary['max']:.4g}"],
        ["mean", summary["mean"]],
        ["non-finite scores", summary["num_non_finite"]],
    ]
    if "rank_correlation_with_loss" in summary:
        summary_rows.append(["rank correlation with the training loss", summary["rank_correlation_with_loss"]])
    body = [
        heading(title, 1),
        paragraph(
            "Every training example scored by its self-influence, the score of the example with itself. For "
            "influence methods it is high for atypical or mislabeled examples, which are the first to inspect. "
            "All scores are in self_influence.csv, one row per training example in data order."
        ),
        heading("Settings"),
        html_table(["setting", "value"], _settings_rows(metrics)),
        heading("Summary"),
        html_table(["statistic", "value"], summary_rows),
    ]
    if "score_histogram.png" in images:
        body.append(image_tag(images, "score_histogram.png"))
    body.append(
        heading(
            f"The {len(shown)} training examples of {'highest' if order == 'descending' else 'lowest'} self-influence"
        )
    )
    body.append(paragraph("Highlighted rows are misclassified by the model (label ≠ predicted).", note=True))
    if "ranking.png" in images:
        body.append(image_tag(images, "ranking.png"))
    body.append(table)
    if not images_available:
        body.append(
            paragraph("Figures left out: matplotlib is not installed (pip install 'influenciae[plots]').", note=True)
        )
    body.append(paragraph(f"Files: {', '.join(['self_influence.csv', *images, 'metrics.json'])}.", note=True))
    write_html(output / "report.html", title, "".join(body))
    return ["report.html", *images]


def top_k_report(
    output: Path,
    metrics: Mapping[str, Any],
    results: Mapping[str, tuple[np.ndarray, np.ndarray]],
    train_scan: Any,
    test_scan: Any,
    shown: np.ndarray,
    *,
    train_inputs: Mapping[int, np.ndarray],
    test_inputs: Mapping[int, np.ndarray],
    title: str,
) -> list[str]:
    """Write ``report.html`` (and its PNG figure) of ``influenciae top-k``.

    Args:
        output: The output directory.
        metrics: The run's metrics (``model``, ``method``, ``train_data``, ``test_data``, ``top_k``).
        results: ``{"proponent"|"opponent": (indices [N_test, k], scores [N_test, k])}``.
        train_scan: Labels and predictions of the training examples.
        test_scan: Labels and predictions of the test examples.
        shown: The test examples shown in the report.
        train_inputs: ``{train index: input}`` of the training examples listed for ``shown`` (may be empty).
        test_inputs: ``{test index: input}`` of ``shown`` (may be empty).
        title: Title of the page.

    Returns:
        The files written, ``report.html`` first.
    """
    from influenciae.app import plots

    kinds = list(results)
    some_test = np.stack([test_inputs[int(i)] for i in shown]) if len(test_inputs) == len(shown) else None
    draw_images = _matplotlib_available() and some_test is not None and is_image_batch(some_test) and len(shown) > 0
    figures: dict[str, Any] = {}
    if draw_images:
        k = max(results[kind][0].shape[1] for kind in kinds)
        figure = plots.new_figure(figsize=(1.3 * (k + 1.3), 3.4 * len(shown)))
        panels = figure.subfigures(len(shown), 1, squeeze=False)[:, 0]
        for panel, test_index in zip(panels, shown, strict=True):
            parts: dict[str, tuple[list[Any], list[float], list[str]]] = {
                "proponent": ([], [], []),
                "opponent": ([], [], []),
            }
            for kind in kinds:
                indices, values = results[kind][0][test_index], results[kind][1][test_index]
                parts[kind] = (
                    [train_inputs[int(i)] for i in indices],
                    [float(v) for v in values],
                    [f"#{i} y={_cell(train_scan.labels[i])}" for i in indices],
                )
            plots.plot_proponents_opponents(
                test_inputs[int(test_index)],
                parts["proponent"][0],
                parts["opponent"][0],
                (parts["proponent"][1], parts["opponent"][1]),
                test_title=f"test #{test_index}\ny={_cell(test_scan.labels[test_index])}, "
                f"p={_cell(test_scan.predicted[test_index])}",
                proponent_titles=parts["proponent"][2],
                opponent_titles=parts["opponent"][2],
                figure=panel,
            )
        figure.suptitle("Proponents (green) and opponents (red)")
        figures["top_k.png"] = figure
    images = _save_figures(output, figures)
    header = ["kind", "rank", "index", "score", "label", "predicted"]
    sections = []
    for test_index in shown:
        test_index = int(test_index)
        label, predicted = _cell(test_scan.labels[test_index]), _cell(test_scan.predicted[test_index])
        leading: list[list[Any]] = []
        features: list[Any] = []
        classes: list[str] = []
        if not draw_images and test_index in test_inputs:
            leading.append(["test", "", test_index, "", label, predicted])
            features.append(test_inputs[test_index])
            classes.append("")
        for kind in kinds:
            indices, values = results[kind]
            for rank, (train_index, value) in enumerate(zip(indices[test_index], values[test_index], strict=True), 1):
                train_index = int(train_index)
                y, p = _cell(train_scan.labels[train_index]), _cell(train_scan.predicted[train_index])
                leading.append([kind, rank, train_index, float(value), y, p])
                features.append(train_inputs.get(train_index))
                classes.append(kind)
        tabulate = not draw_images and all(row is not None for row in features) and features
        sections.append(
            heading(f"Test example #{test_index}: label {label}, predicted {predicted}", 3)
            + feature_table(header, leading, np.stack(features) if tabulate else None, row_classes=classes)
        )
    top_k = metrics["top_k"]
    body = [
        heading(title, 1),
        paragraph(
            "For each test example, the training examples of highest score (proponents: for influence methods, those "
            "that helped its prediction, removing one would raise its loss) and of lowest score (opponents: those "
            f"that hurt it). k = {top_k['k']}; every test example is in top_k.csv, the first {len(shown)} are shown "
            "here."
        ),
        heading("Settings"),
        html_table(["setting", "value"], _settings_rows(metrics)),
        heading("Proponents and opponents"),
    ]
    if "top_k.png" in images:
        body.append(image_tag(images, "top_k.png"))
    body.extend(sections)
    body.append(paragraph(f"Files: {', '.join(['top_k.csv', *images, 'metrics.json'])}.", note=True))
    write_html(output / "report.html", title, "".join(body))
    return ["report.html", *images]
