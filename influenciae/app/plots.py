"""Matplotlib figures for influence results: image grids, proponents/opponents, score histograms, detection and
cleaning curves.

matplotlib is optional (``pip install 'influenciae[plots]'``) and imported only when a figure is drawn. Every function
returns the :class:`matplotlib.figure.Figure`, so it displays in a notebook and saves with ``fig.savefig(path)``.
Without a display (a server, CI), the non-interactive Agg backend is selected unless ``MPLBACKEND`` says otherwise.

Example:
    >>> from influenciae.app.plots import plot_detection_curve
    >>> fig = plot_detection_curve({"self-influence": found_si, "loss": found_loss})
    >>> fig.savefig("detection_curve.png")
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "plot_image_grid",
    "plot_proponents_opponents",
    "plot_detection_curve",
    "plot_score_histogram",
    "plot_cleaning_curve",
    "new_figure",
    "save_figure",
    "require_matplotlib",
]

PROPONENT_COLOR = "#1a7f37"  # green: helpful training examples (positive influence)
OPPONENT_COLOR = "#b42318"  # red: harmful training examples (negative influence)


def require_matplotlib() -> Any:
    """Import and return ``matplotlib.pyplot``, choosing Agg when there is no display, with an install hint if missing.

    Raises:
        ImportError: If matplotlib is not installed (names ``pip install 'influenciae[plots]'``).
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "influenciae.app.plots needs matplotlib, which is not installed. Install it with "
            "`pip install 'influenciae[plots]'` (or `pip install matplotlib`)."
        ) from error
    headless = sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    # Respect an explicit choice (MPLBACKEND, e.g. the notebook inline backend) and never switch once pyplot is live.
    if headless and "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(figsize: tuple[float, float], **kwargs: Any) -> Any:
    """A new pyplot ``Figure`` with constrained layout (e.g. to stack several plots with ``fig.subfigures``)."""
    return require_matplotlib().figure(figsize=figsize, layout="constrained", **kwargs)


def save_figure(figure: Any, path: Any, *, dpi: int = 120, close: bool = True) -> None:
    """Save a figure (format from the file name) and close it, so loops over many figures do not pile them up."""
    figure.savefig(path, dpi=dpi)
    if close:
        require_matplotlib().close(figure)


def _as_image(image: Any) -> np.ndarray:
    """A numpy image ``[H, W]`` or ``[H, W, 3|4]`` for ``imshow`` (a trailing channel of 1 is dropped)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"An image must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}.")
    return array


def _draw_image(axis: Any, image: Any, title: str | None, *, cmap: str, color: str | None = None) -> None:
    axis.imshow(_as_image(image), cmap=cmap, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if color is not None:
        for spine in axis.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2.5)
    if title:
        axis.set_title(title, fontsize=8, color=color or "black")


def plot_image_grid(
    images: Sequence[Any] | np.ndarray,
    titles: Sequence[str] | None = None,
    *,
    num_columns: int = 8,
    title_colors: Sequence[str | None] | None = None,
    suptitle: str | None = None,
    cmap: str = "gray_r",
    image_size: float = 1.5,
) -> Any:
    """A grid of images with one title each.

    Args:
        images: ``[n, H, W]``, ``[n, H, W, 1]`` or ``[n, H, W, 3]`` images (or a list of them).
        titles: One title per image (``\\n`` starts a new line), or ``None``.
        num_columns: Images per row.
        title_colors: One colour per image for its title and frame (``None`` entries keep the default).
        suptitle: Title of the whole figure.
        cmap: Colour map for single-channel images.
        image_size: Width of one image in inches.

    Returns:
        The matplotlib ``Figure``.

    Example:
        >>> fig = plot_image_grid(x_train[suspects], [f"label {y}" for y in y_train[suspects]])
    """
    images = list(images)
    if not images:
        raise ValueError("plot_image_grid needs at least one image.")
    for name, values in (("titles", titles), ("title_colors", title_colors)):
        if values is not None and len(values) != len(images):
            raise ValueError(f"{name} has {len(values)} entries for {len(images)} images.")
    if not isinstance(num_columns, int) or num_columns <= 0:
        raise ValueError(f"num_columns must be a positive integer, got {num_columns!r}.")
    columns = min(num_columns, len(images))
    rows = -(-len(images) // columns)
    title_lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles is not None else 0
    figure = new_figure((columns * image_size, rows * (image_size + 0.2 * title_lines) + (0.5 if suptitle else 0.0)))
    axes = figure.subplots(rows, columns, squeeze=False)
    for position, axis in enumerate(axes.flat):
        if position >= len(images):
            axis.axis("off")
            continue
        title = None if titles is None else titles[position]
        color = None if title_colors is None else title_colors[position]
        _draw_image(axis, images[position], title, cmap=cmap, color=color)
    if suptitle:
        figure.suptitle(suptitle)
    return figure


def plot_proponents_opponents(
    test_image: Any,
    proponents: Sequence[Any] | np.ndarray,
    opponents: Sequence[Any] | np.ndarray,
    scores: tuple[Sequence[float], Sequence[float]],
    *,
    test_title: str | None = None,
    proponent_titles: Sequence[str] | None = None,
    opponent_titles: Sequence[str] | None = None,
    figure: Any | None = None,
    cmap: str = "gray_r",
    image_size: float = 1.3,
) -> Any:
    """One test image with its proponents (top row) and opponents (bottom row).

    Proponents have the largest positive influence on the test example (they helped: removing one raises the test
    loss); opponents the most negative (removing one lowers it). Frames are green for proponents, red for opponents.

    Args:
        test_image: The test image ``[H, W]`` or ``[H, W, C]``.
        proponents: The proponent images ``[k, H, W(, C)]``, strongest first.
        opponents: The opponent images ``[k, H, W(, C)]``, strongest (most negative) first.
        scores: ``(proponent_scores [k], opponent_scores [k])``, shown under each image.
        test_title: Title of the test image.
        proponent_titles: Extra first line of each proponent's title (e.g. its index and label).
        opponent_titles: Extra first line of each opponent's title.
        figure: Draw into this ``Figure`` or ``SubFigure`` (e.g. one of ``fig.subfigures(n, 1)`` to stack several
            test images in one figure); a new figure when ``None``.
        cmap: Colour map for single-channel images.
        image_size: Width of one image in inches.

    Returns:
        The ``Figure`` (or the ``SubFigure`` that was passed).

    Example:
        >>> indices, values = calculator.most_influential(test_ds, train_ds, k=8)
        >>> lows, low_values = calculator.most_influential(test_ds, train_ds, k=8, order=ORDER.ASCENDING)
        >>> fig = plot_proponents_opponents(x_test[0], x_train[indices[0]], x_train[lows[0]],
        ...                                 (values[0], low_values[0]))
    """
    proponents, opponents = list(proponents), list(opponents)
    if len(scores) != 2:
        raise ValueError("scores must be a pair (proponent_scores, opponent_scores).")
    proponent_scores, opponent_scores = (np.asarray(s, dtype=float).reshape(-1) for s in scores)
    for name, images, values, titles in (
        ("proponents", proponents, proponent_scores, proponent_titles),
        ("opponents", opponents, opponent_scores, opponent_titles),
    ):
        if len(values) != len(images):
            raise ValueError(f"{len(images)} {name} but {len(values)} scores for them.")
        if titles is not None and len(titles) != len(images):
            raise ValueError(f"{len(images)} {name} but {len(titles)} titles for them.")
    columns = max(len(proponents), len(opponents), 1)
    if figure is None:
        figure = new_figure(((columns + 1.3) * image_size, 2 * image_size + 1.0))
    grid = figure.add_gridspec(2, columns + 1, width_ratios=[1.3] + [1.0] * columns)
    _draw_image(figure.add_subplot(grid[:, 0]), test_image, test_title or "test example", cmap=cmap)
    for row, (images, values, titles, kind, color) in enumerate(
        (
            (proponents, proponent_scores, proponent_titles, "proponent", PROPONENT_COLOR),
            (opponents, opponent_scores, opponent_titles, "opponent", OPPONENT_COLOR),
        )
    ):
        for column in range(columns):
            axis = figure.add_subplot(grid[row, column + 1])
            if column >= len(images):
                axis.axis("off")
                continue
            first_line = titles[column] if titles is not None else f"{kind} {column + 1}"
            _draw_image(axis, images[column], f"{first_line}\n{values[column]:+.3g}", cmap=cmap, color=color)
    return figure


def plot_detection_curve(
    curves: Mapping[str, np.ndarray],
    *,
    markers: Sequence[float] = (0.1, 0.2),
    max_inspected: float = 1.0,
    title: str = "Mislabeled-example detection",
    axis: Any | None = None,
) -> Any:
    """Fraction of mislabeled examples found against the fraction of the training set inspected.

    Args:
        curves: Name -> ``found [n + 1]``, where ``found[i]`` is the fraction of mislabeled examples among the first
            ``i`` examples of that ranking (so ``found[0] = 0`` and ``found[n] = 1``); curves may differ in length.
            A name containing "random" is drawn dashed, one containing "perfect" or "oracle" dotted black.
        markers: Inspected fractions marked by dotted vertical lines.
        max_inspected: Right end of the x axis (zoom on the start of the rankings, where they differ).
        title: Title of the plot.
        axis: Draw on this ``Axes``; a new figure when ``None``.

    Returns:
        The ``Figure`` holding the plot.

    Example:
        >>> fig = plot_detection_curve({"self-influence": found_si, "training loss": found_loss})
    """
    if not curves:
        raise ValueError("plot_detection_curve needs at least one curve.")
    if axis is None:
        figure = new_figure((5.5, 4.2))
        axis = figure.add_subplot()
    for name, found in curves.items():
        found = np.asarray(found, dtype=float).reshape(-1)
        if found.size < 2:
            raise ValueError(f"Curve {name!r} needs at least two points, got {found.size}.")
        inspected = np.linspace(0.0, 1.0, found.size)
        lowered = name.lower()
        style: dict[str, Any] = {"linestyle": "--"} if "random" in lowered else {}
        if "perfect" in lowered or "oracle" in lowered:
            style = {"linestyle": ":", "color": "black", "linewidth": 1.2}
        axis.plot(inspected, found, label=name, **style)
    for fraction in markers:
        axis.axvline(fraction, color="gray", linestyle=":", linewidth=1)
    axis.set_xlim(0.0, max_inspected)
    axis.set_ylim(0.0, 1.02)
    axis.set_xlabel("fraction of training set inspected")
    axis.set_ylabel("fraction of mislabeled examples found")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    return axis.figure


def plot_score_histogram(
    scores: Any,
    *,
    highlighted: Mapping[str, Sequence[float]] | None = None,
    bins: int = 50,
    title: str = "Distribution of scores",
    xlabel: str = "score",
    log_scale: bool = True,
    axis: Any | None = None,
) -> Any:
    """A histogram of scores (e.g. the self-influence of every training example), with some scores marked.

    Args:
        scores: ``[n]`` finite scores (non-finite values are left out and counted in the title).
        highlighted: Name -> scores to mark with vertical lines (e.g. ``{"top 10": values}``), one colour per name.
        bins: Number of bins.
        title: Title of the plot.
        xlabel: Label of the x axis.
        log_scale: Logarithmic counts (influence scores are heavy-tailed: a few examples dominate).
        axis: Draw on this ``Axes``; a new figure when ``None``.

    Returns:
        The ``Figure`` holding the plot.

    Example:
        >>> fig = plot_score_histogram(self_influence, highlighted={"top 10": np.sort(self_influence)[-10:]})
    """
    values = np.asarray(scores, dtype=float).reshape(-1)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("plot_score_histogram needs at least one finite score.")
    if not isinstance(bins, int) or bins <= 0:
        raise ValueError(f"bins must be a positive integer, got {bins!r}.")
    if axis is None:
        figure = new_figure((6.0, 3.6))
        axis = figure.add_subplot()
    axis.hist(finite, bins=bins, color="#4c72b0", alpha=0.85, log=log_scale)
    colors = (OPPONENT_COLOR, PROPONENT_COLOR, "#7a4fa3", "#c77c02")
    for position, (name, marks) in enumerate((highlighted or {}).items()):
        color = colors[position % len(colors)]
        for number, mark in enumerate(np.asarray(marks, dtype=float).reshape(-1)):
            axis.axvline(mark, color=color, linewidth=0.8, alpha=0.7, label=name if number == 0 else None)
    if highlighted:
        axis.legend(loc="upper right")
    dropped = values.size - finite.size
    axis.set_title(title + (f" ({dropped} non-finite left out)" if dropped else ""))
    axis.set_xlabel(xlabel)
    axis.set_ylabel("examples" + (" (log scale)" if log_scale else ""))
    axis.grid(alpha=0.3)
    return axis.figure


def plot_cleaning_curve(
    budgets: Sequence[float],
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    before: tuple[float, float],
    ceiling: float | None = None,
    title: str = "Test accuracy after cleaning the top-ranked training labels",
    ylabel: str = "test accuracy",
    axis: Any | None = None,
) -> Any:
    """Test accuracy (mean ± std over retraining seeds) against the fraction of the training set cleaned.

    Every curve starts at budget 0 from ``before`` (the model trained on the noisy data), so the lines show what each
    ranking buys for the same budget.

    Args:
        budgets: Fractions of the training set cleaned ``[B]``, increasing, in ``(0, 1]``.
        curves: Ranking name -> ``(mean [B], std [B])``; a name containing "random" is drawn dashed.
        before: ``(mean, std)`` at budget 0.
        ceiling: Drawn as a dashed black horizontal line (e.g. the accuracy with every label clean).
        title: Title of the plot.
        ylabel: Label of the y axis.
        axis: Draw on this ``Axes``; a new figure when ``None``.

    Returns:
        The ``Figure`` holding the plot.

    Example:
        >>> fig = plot_cleaning_curve([0.05, 0.1], {"loss": ([0.96, 0.97], [0.01, 0.0])}, before=(0.95, 0.01))
    """
    fractions = np.asarray(budgets, dtype=float).reshape(-1)
    if fractions.size == 0 or not np.all((fractions > 0) & (fractions <= 1)) or np.any(np.diff(fractions) <= 0):
        raise ValueError(f"budgets must be increasing fractions in (0, 1], got {list(budgets)!r}.")
    if not curves:
        raise ValueError("plot_cleaning_curve needs at least one curve.")
    if axis is None:
        figure = new_figure((6.0, 4.2))
        axis = figure.add_subplot()
    x = 100.0 * np.concatenate([[0.0], fractions])
    for position, (name, (mean_values, std_values)) in enumerate(curves.items()):
        mean, std = np.asarray(mean_values, dtype=float).reshape(-1), np.asarray(std_values, dtype=float).reshape(-1)
        if mean.shape != fractions.shape or std.shape != fractions.shape:
            raise ValueError(
                f"Curve {name!r} needs {fractions.size} means and stds (one per budget), got {mean.size} and "
                f"{std.size}."
            )
        style: dict[str, Any] = {"linestyle": "--"} if "random" in name.lower() else {}
        axis.errorbar(
            x + 0.25 * (position - (len(curves) - 1) / 2),  # a small offset keeps overlapping error bars visible
            np.concatenate([[before[0]], mean]),
            yerr=np.concatenate([[before[1]], std]),
            marker="o",
            markersize=4,
            capsize=3,
            label=name,
            **style,
        )
    if ceiling is not None:
        axis.axhline(ceiling, color="black", linestyle="--", linewidth=1.2, label=f"all labels clean ({ceiling:.3f})")
    axis.set_xlabel("training examples cleaned (% of the training set, top of each ranking)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    return axis.figure
