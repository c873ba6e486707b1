"""The experiments' figures: accuracy curves (MQAR), heat maps (NIAH), grouped bars (perplexity),
and :func:`save_figure` for experiments that draw their own (continual, test-time, zero-shot).

Each function draws with matplotlib's Agg backend and writes a PNG atomically; missing values
(``None``: a setting a model could not run) are left blank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Series = Mapping[str, tuple[Sequence[float], Sequence[float | None]]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    tmp.replace(path)


def save_figure(path: Path, draw: Callable[[Any], None], size: tuple[float, float]) -> Path:
    """Create a figure of ``size`` inches, let ``draw(fig)`` fill it, save it atomically as PNG."""
    fig = _pyplot().figure(figsize=size, dpi=120)
    try:
        draw(fig)
        fig.tight_layout()
    except BaseException:
        _pyplot().close(fig)
        raise
    _save(fig, path)
    return Path(path)


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def plot_curves(
    panels: Mapping[str, Series],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = (0.0, 1.05),
    logx: bool = False,
    baseline: float | None = None,
    errors: Mapping[str, Mapping[str, Sequence[float | None]]] | None = None,
) -> None:
    """One panel per key of ``panels``; in each, one line per series name (same colour, marker
    and line style across panels, so equal curves stay distinguishable).

    ``errors[panel][name]``: a spread per point (the standard deviation over seeds), drawn as a
    band of ± that value around the line (none where it is ``None``).

    ``logx``: a base-2 x axis with a tick at every x value (pair counts, lengths); ``baseline``:
    a dashed grey line (chance). Series are drawn slightly apart along x (a few percent of a
    tick gap) and semi-transparent, so a curve on top of another does not hide it; the legend
    sits outside the panels, on the right, where it covers no data."""
    plt = _pyplot()
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    n = max(1, len(panels))
    fig, axes = plt.subplots(
        1, n, figsize=(3.6 * n + 1.8, 3.4), dpi=120, squeeze=False, layout="constrained"
    )
    handles: dict[str, Any] = {}
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=False):
        for name, (xs, ys) in series.items():
            j = names.index(name)
            (line,) = ax.plot(
                _spread(xs, j, len(names), logx),
                _nan(ys),
                color=f"C{j % 10}",
                marker=_MARKERS[j % len(_MARKERS)],
                ls=_LINESTYLES[(j // len(_MARKERS) + j) % len(_LINESTYLES)],
                lw=1.6,
                ms=5,
                alpha=0.8,
                label=name,
            )
            handles.setdefault(name, line)
            spread = (errors or {}).get(panel, {}).get(name)
            if spread is not None:
                mean, err = _nan(ys), _nan(spread)
                ax.fill_between(
                    _spread(xs, j, len(names), logx),
                    [m - e for m, e in zip(mean, err, strict=True)],
                    [m + e for m, e in zip(mean, err, strict=True)],
                    color=f"C{j % 10}", alpha=0.15, lw=0,
                )  # fmt: skip
        if baseline is not None:
            handles["chance"] = ax.axhline(baseline, color="0.5", ls="--", lw=1.0, label="chance")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        if logx:
            ticks = sorted({x for xs, _ in series.values() for x in xs})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")


def _spread(xs: Sequence[float], j: int, n: int, logx: bool) -> list[float]:
    """``xs`` shifted for series ``j`` of ``n``: by 5 % of a doubling per series on a log-2
    axis, else by ±1 % of the x range, centred on the true values."""
    xs = [float(x) for x in xs]
    k = j - (n - 1) / 2
    if logx:
        return [x * 2.0 ** (0.05 * k) for x in xs]
    span = (max(xs) - min(xs)) if len(xs) > 1 else 1.0
    return [x + 0.01 * k * span for x in xs]


def plot_heatmaps(
    panels: Mapping[str, Sequence[Sequence[float | None]]],
    path: Path,
    *,
    rows: Sequence[str],
    cols: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> None:
    """One heat map per panel: ``grid[i][j]`` in [0, 1] at row ``rows[i]``, column ``cols[j]``;
    each cell is annotated with its value (blank where None)."""
    import numpy as np

    plt = _pyplot()
    n = max(1, len(panels))
    width = 0.5 * len(cols) + 1.6
    fig, axes = plt.subplots(
        1, n, figsize=(width * n + 1.0, 0.42 * len(rows) + 2.0), dpi=120, squeeze=False,
        layout="constrained",
    )  # fmt: skip
    image = None
    for ax, (panel, grid) in zip(axes[0], panels.items(), strict=False):
        values = np.array([_nan(r) for r in grid], dtype=float)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            if not math.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cols)), list(cols), fontsize=8, rotation=45)
        ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_title(panel, fontsize=10)
    axes[0][0].set_ylabel(ylabel)
    if image is not None:
        from matplotlib.ticker import PercentFormatter

        bar = fig.colorbar(image, ax=axes[0].tolist(), fraction=0.05, label="accuracy")
        bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))  # in %, like the cell labels
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)


def plot_bars(
    groups: Mapping[str, Mapping[str, float | None]],
    path: Path,
    *,
    ylabel: str,
    title: str = "",
    errors: Mapping[str, Mapping[str, float | None]] | None = None,
    symlog: float | None = None,
) -> None:
    """Grouped bars: one group per key of ``groups``, one bar per inner key; ``errors`` (same
    keys) draws ± that value (the standard deviation over seeds) as an error bar. ``symlog``:
    a y axis linear within ± that value and logarithmic beyond (one huge bar then leaves the
    small ones readable)."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(k for bars in groups.values() for k in bars))
    width = 0.8 / max(1, len(kinds))
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) * max(1, len(kinds)) ** 0.5 + 2.5, 3.6))
    for j, kind in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(groups))]
        ys = _nan([bars.get(kind) for bars in groups.values()])
        err = None
        if errors is not None:
            err = [0.0 if math.isnan(e) else e for e in
                   _nan([errors.get(g, {}).get(kind) for g in groups])]  # fmt: skip
        bars = ax.bar(xs, ys, width=width, label=kind, color=f"C{j % 10}", yerr=err, capsize=2)
        ax.bar_label(bars, fmt="%.4g", fontsize=7)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=9)
    ax.set_ylabel(ylabel)
    if symlog is not None:
        ax.set_yscale("symlog", linthresh=symlog)
        ax.axhline(0.0, color="0.3", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
