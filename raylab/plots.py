"""Plots written by runs and by ``raylab analyze`` (matplotlib, Agg backend, atomic writes).

Every function writes one figure to ``path``: first to a temporary file with the same suffix in
the same folder, then ``os.replace`` onto ``path``, so that a crash never leaves a half-written
image. The parent folder is created if needed; the format follows the suffix (``.png``,
``.pdf``, ``.svg``, ...).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from raylab.errors import ConfigError, DataError  # noqa: E402
from raylab.metrics.classification import row_normalise  # noqa: E402


def _save_atomic(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` to ``path`` via a temporary file and ``os.replace``; always closes it."""
    target = Path(path)
    try:
        fmt = target.suffix.lstrip(".").lower()
        supported = fig.canvas.get_supported_filetypes()
        if fmt not in supported:
            raise ConfigError(
                f"cannot save a plot as {str(target)!r}: the suffix must be one of "
                f"{', '.join('.' + s for s in sorted(supported))}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix,
                                   dir=target.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    finally:
        plt.close(fig)
    return target


def plot_confusion(confusion: Any, labels: Sequence[str], path: str | os.PathLike,
                   title: str = "", normalise: bool = True) -> Path:
    """Confusion matrix as a heat map with every cell annotated.

    Args:
        confusion: ``[C, C]`` counts, rows = true class, columns = predicted class.
        labels: ``C`` class names in index order.
        path: Output image file.
        title: Figure title.
        normalise: Colour and annotate row-normalised fractions (recall per true class), with
            the count beside each fraction; rows with no samples stay zero.

    Returns:
        The path written.
    """
    counts = np.asarray(confusion)
    n = len(labels)
    if counts.shape != (n, n):
        raise DataError(f"confusion matrix has shape {counts.shape}, expected ({n}, {n})")
    values = row_normalise(counts) if normalise else counts.astype(np.float64)
    vmax = 1.0 if normalise else max(float(values.max()), 1.0)
    size = 1.6 + 0.9 * n
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for i in range(n):
        for j in range(n):
            text = f"{values[i, j]:.2f}\n({int(counts[i, j])})" if normalise else f"{counts[i, j]}"
            colour = "white" if values[i, j] > 0.5 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(n), labels=[str(s) for s in labels])
    ax.set_yticks(range(n), labels=[str(s) for s in labels])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    default = "Confusion matrix (row-normalised)" if normalise else "Confusion matrix"
    ax.set_title(title or default)
    return _save_atomic(fig, path)


def plot_accuracy_matrix(matrix: Any, buckets: Sequence[Any], path: str | os.PathLike,
                         title: str = "") -> Path:
    """CLEAR's accuracy matrix ``R`` (row = trained through bucket i, column = tested on
    bucket j) as an annotated heat map; cells not yet measured (None/NaN) stay blank.

    Args:
        matrix: ``[T, T]`` accuracies in [0, 1] (lists with None holes accepted).
        buckets: The ``T`` bucket names in stream order.
        path: Output image file.
        title: Figure title.

    Returns:
        The path written.
    """
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix],
                      dtype=np.float64)
    n = len(buckets)
    if values.shape != (n, n):
        raise DataError(f"accuracy matrix has shape {values.shape}, expected ({n}, {n})")
    size = 2.0 + 0.7 * n
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    for i in range(n):
        for j in range(n):
            if not np.isnan(values[i, j]):
                colour = "black" if values[i, j] > 0.6 else "white"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color=colour,
                        fontsize=8)
    names = [str(b) for b in buckets]
    ax.set_xticks(range(n), labels=names)
    ax.set_yticks(range(n), labels=names)
    ax.set_xlabel("tested on bucket j")
    ax.set_ylabel("trained through bucket i")
    ax.set_title(title or "Accuracy matrix R[i][j]")
    return _save_atomic(fig, path)


def plot_timeline(times_s: Any, probs: Any, labels: Sequence[str], path: str | os.PathLike,
                  running: Any = None, title: str = "") -> Path:
    """Per-window class probabilities over a trial, and the running estimate.

    Args:
        times_s: ``[N]`` time of each window in seconds (e.g. its centre).
        probs: ``[N, C]`` class probabilities of each window.
        labels: ``C`` class names.
        path: Output image file.
        running: ``[N, C]`` running estimate after each window; None uses the cumulative mean
            of ``probs`` (the estimate an online assessor would show).
        title: Figure title.

    Returns:
        The path written.
    """
    t = np.asarray(times_s, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    n = len(labels)
    if p.ndim != 2 or p.shape != (t.size, n):
        raise DataError(f"probs must be [{t.size}, {n}] (windows x classes), got {p.shape}")
    if running is None:
        run = np.cumsum(p, axis=0) / np.arange(1, t.size + 1)[:, None]
    else:
        run = np.asarray(running, dtype=np.float64)
        if run.shape != p.shape:
            raise DataError(f"running must have the shape of probs {p.shape}, got {run.shape}")
    fig, ax = plt.subplots(figsize=(9, 3.6))
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(labels):
        ax.plot(t, p[:, k], color=colours(k % 10), alpha=0.35, linewidth=1)
        ax.plot(t, run[:, k], color=colours(k % 10), linewidth=2.2, label=f"{name} (running)")
    ax.plot([], [], color="grey", alpha=0.5, linewidth=1, label="per window (thin)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("Time (s)")
    ax.set_ylabel("Probability")
    if t.size:
        final = labels[int(np.argmax(run[-1]))]
        title = f"{title} - final estimate: {final}" if title else f"Final estimate: {final}"
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(alpha=0.3)
    return _save_atomic(fig, path)


def _lookup(row: Mapping[str, Any], key: str) -> Any:
    """``row[key]``, or the nested value at a dotted key (``optim.lr``); None if absent."""
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _knob_axis(ax: Any, xs: list[Any], ys: list[float], knob: str) -> None:
    if all(_is_number(x) for x in xs):
        xv = np.asarray(xs, dtype=np.float64)
        ax.scatter(xv, ys, s=18, alpha=0.75)
        lo, hi = float(xv.min()), float(xv.max())
        if lo > 0 and hi / lo > 100.0:
            ax.set_xscale("log")
    else:
        names = sorted({str(x) for x in xs})
        pos = {name: i for i, name in enumerate(names)}
        xi = np.array([pos[str(x)] for x in xs], dtype=np.float64)
        jitter = (np.arange(xi.size) % 7 - 3) * 0.03  # deterministic spread of equal points
        ax.scatter(xi + jitter, ys, s=18, alpha=0.75)
        by_name: dict[str, list[float]] = {name: [] for name in names}
        for x, y in zip(xs, ys, strict=True):
            by_name[str(x)].append(y)
        means = [float(np.mean(by_name[name])) for name in names]
        ax.scatter(range(len(names)), means, marker="_", s=400, color="black", label="mean")
        ax.set_xticks(range(len(names)), labels=names, rotation=30 if len(names) > 4 else 0)
        ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel(knob)
    ax.grid(alpha=0.3)


def plot_metric_vs_knobs(rows: Sequence[Mapping[str, Any]], knobs: Sequence[str], metric: str,
                         path: str | os.PathLike) -> Path:
    """One subplot per knob: the metric of every run against that knob's value.

    Numeric knobs are scattered (log x-axis when positive values span more than two decades);
    other knobs (strings, booleans, lists) are placed as categories, with each category's mean.
    Keys may be dotted (``optim.lr``), looked up flat first and then in nested dicts. Rows
    without the metric (or with a non-finite one) are skipped.

    Args:
        rows: One mapping per run (e.g. Tune results: config values and metrics).
        knobs: Keys of the knobs to plot.
        metric: Key of the metric (y-axis).
        path: Output image file.

    Returns:
        The path written.

    Raises:
        ConfigError: ``knobs`` is empty.
        DataError: No row has a finite value for ``metric``.
    """
    if not knobs:
        raise ConfigError("plot_metric_vs_knobs needs at least one knob")
    usable = [r for r in rows if _is_number(_lookup(r, metric))
              and math.isfinite(float(_lookup(r, metric)))]
    if not usable:
        raise DataError(f"no run has a finite value for metric {metric!r}")
    cols = min(len(knobs), 3)
    nrows = math.ceil(len(knobs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, knob in zip(axes.flat, knobs, strict=False):
        pairs = [(_lookup(r, knob), float(_lookup(r, metric))) for r in usable]
        pairs = [(x, y) for x, y in pairs if x is not None]
        if not pairs:
            ax.text(0.5, 0.5, f"no values for {knob}", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_xlabel(knob)
            continue
        xs = [x if _is_number(x) or isinstance(x, str) else str(x) for x, _ in pairs]
        _knob_axis(ax, xs, [y for _, y in pairs], knob)
    for ax in list(axes.flat)[len(knobs):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} vs knobs ({len(usable)} runs)")
    fig.tight_layout()
    return _save_atomic(fig, path)


def plot_learning_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                         metric: str, path: str | os.PathLike) -> Path:
    """Metric against epoch, one line per run/trial.

    Args:
        curves: ``{name: (epochs, values)}``.
        metric: Name of the metric (y-axis label).
        path: Output image file.

    Returns:
        The path written.

    Raises:
        DataError: ``curves`` is empty, or a curve's epochs and values differ in length.
    """
    if not curves:
        raise DataError(f"no learning curves to plot for {metric!r}")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, (epochs, values) in curves.items():
        if len(epochs) != len(values):
            plt.close(fig)
            raise DataError(
                f"learning curve {name!r}: {len(epochs)} epochs but {len(values)} values"
            )
        ax.plot(epochs, values, marker="o" if len(values) < 30 else None, markersize=3,
                linewidth=1.4, label=str(name))
    ax.set_xlabel("Epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch")
    ax.grid(alpha=0.3)
    if len(curves) <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save_atomic(fig, path)


def plot_attention_maps(image: np.ndarray, maps: np.ndarray, path: str | os.PathLike,
                        title: str | None = None) -> Path:
    """An image and one overlay per attention head (e.g. DINO's CLS attention maps).

    Each map is min-max scaled to [0, 1] on its own and stretched over the whole image
    with nearest-neighbour upsampling (one block per patch), drawn half-transparent over
    the image.

    Args:
        image: ``[H, W, 3]`` uint8 RGB image (un-normalised).
        maps: ``[heads, h, w]`` attention per patch, e.g. one image of
            :func:`raylab.models.dino.cls_attention_maps`.
        path: Output image file.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        DataError: ``image`` is not ``[H, W, 3]`` uint8 or ``maps`` is not a non-empty
            ``[heads, h, w]`` array.
    """
    img = np.asarray(image)
    att = np.asarray(maps, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise DataError(f"image must be [H, W, 3] uint8, got shape {img.shape} {img.dtype}")
    if att.ndim != 3 or 0 in att.shape:
        raise DataError(f"attention maps must be [heads, h, w], got shape {att.shape}")
    heads = att.shape[0]
    panels = heads + 1
    ncols = min(panels, 5)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.4 * nrows + 0.4),
                             squeeze=False)
    height, width = img.shape[:2]
    extent = (0, width, height, 0)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(img, extent=extent)
    axes.flat[0].set_title("image", fontsize=9)
    low = att.min(axis=(1, 2), keepdims=True)
    span = att.max(axis=(1, 2), keepdims=True) - low
    scaled = np.divide(att - low, span, out=np.zeros_like(att), where=span > 0)
    for head in range(heads):
        ax = axes.flat[head + 1]
        ax.imshow(img, extent=extent)
        ax.imshow(scaled[head], cmap="inferno", alpha=0.55, vmin=0.0, vmax=1.0,
                  interpolation="nearest", extent=extent)
        ax.set_title(f"head {head}", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save_atomic(fig, path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (empty when the file does not exist)."""
    import json

    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metric_history(rows: Sequence[Mapping[str, Any]], series: Mapping[str, str],
                        ylabel: str, path: str | os.PathLike) -> Path | None:
    """Plot ``{label: metric key}`` against epoch from metrics rows; None if none present."""
    curves = {}
    for label, key in series.items():
        points = [(r["epoch"], r[key]) for r in rows if key in r and "epoch" in r]
        if points:
            curves[label] = ([p[0] for p in points], [p[1] for p in points])
    return plot_learning_curves(curves, ylabel, path) if curves else None


def plot_segmentations(rows: Sequence[Mapping[str, np.ndarray]], class_names: Sequence[str],
                       path: str | os.PathLike, void: int = 255) -> Path:
    """One row per image: the image, then each label map (ground truth and predictions in
    class ids, void pixels black) in one fixed colour per class, with a legend.

    Args:
        rows: ``{"image": [H, W, 3] uint8, "<title>": [H, W] int class ids, ...}`` each.
        class_names: The classes, in id order.
        path: Output image file.
        void: The id of ignored pixels.
    """
    if not rows:
        raise DataError("no images to draw")
    titles = list(rows[0])
    cmap = plt.get_cmap("tab20" if len(class_names) <= 20 else "gist_ncar")
    colours = np.array([cmap(i / max(len(class_names) - 1, 1))[:3] if len(class_names) > 20
                        else cmap(i % 20)[:3] for i in range(len(class_names))])
    fig, axes = plt.subplots(len(rows), len(titles), squeeze=False,
                             figsize=(2.4 * len(titles), 2.4 * len(rows) + 0.8))
    for r, row in enumerate(rows):
        for c, title in enumerate(titles):
            ax = axes[r][c]
            ax.axis("off")
            value = np.asarray(row[title])
            if value.ndim == 3:
                ax.imshow(value)
            else:
                ids = value.astype(np.int64)
                shown = np.zeros((*ids.shape, 3))
                known = (ids != void) & (ids >= 0) & (ids < len(class_names))
                shown[known] = colours[ids[known]]
                ax.imshow(shown, interpolation="nearest")
            if r == 0:
                ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[i], label=name)
               for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7)
    return _save_atomic(fig, path)
