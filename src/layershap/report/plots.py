"""The report's figures. Each function draws data it is given and returns a matplotlib Figure; nothing here
computes a result (that is done in `layershap.report.load`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

KEPT = "#4c72b0"
REMOVED = "#dd5555"
NEUTRAL = "#8c8c8c"


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def layer_values(values: Sequence[float], stderr: Sequence[float] | None, removed: Sequence[int] = (), *,
                 title: str, ylabel: str):
    """One bar per layer, error bars of one standard error, removed layers in red."""
    fig = _figure(max(6.0, 0.22 * len(values) + 2), 3.4)
    ax = fig.add_subplot()
    gone = set(removed)
    colours = [REMOVED if i in gone else KEPT for i in range(len(values))]
    errors = list(stderr) if stderr is not None and any(s > 0 for s in stderr) else None
    ax.bar(range(len(values)), values, yerr=errors, color=colours, capsize=2, error_kw={"elinewidth": 0.8})
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(range(0, len(values), max(1, len(values) // 16)))
    if gone:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=KEPT, label="kept"), Patch(color=REMOVED, label="removed")],
                  loc="best", fontsize=8)
    return fig


def depth_map(n_layers: int, rows: Sequence[tuple[str, Sequence[int]]], *, title: str):
    """One row per plan, one cell per block from input (left) to output (right): kept blue, removed red."""
    from matplotlib.colors import ListedColormap

    fig = _figure(max(6.0, 0.22 * n_layers + 3), 0.9 + 0.32 * max(1, len(rows)))
    ax = fig.add_subplot()
    grid = [[1 if i in set(removed) else 0 for i in range(n_layers)] for _, removed in rows]
    ax.imshow(grid, cmap=ListedColormap([KEPT, REMOVED]), vmin=0, vmax=1, aspect="auto",
              interpolation="nearest")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_xticks(range(0, n_layers, max(1, n_layers // 16)))
    ax.set_xticks([i - 0.5 for i in range(1, n_layers)], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, len(rows))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("depth: layer index, input to output (blue kept, red removed)")
    ax.set_title(title)
    return fig


def surrogate_fit(measured: Sequence[float], predicted: Sequence[float], *, title: str, label: str,
                  summary: str):
    """Predicted against measured values with the identity line; `summary` (the fit's scores) as a caption.
    With no points, a panel that says so and shows the summary alone."""
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    if measured:
        ax.scatter(measured, predicted, s=14, color=KEPT, alpha=0.8, edgecolors="none")
        finite = [v for v in (*measured, *predicted) if math.isfinite(v)]
        if finite:
            low, high = min(finite), max(finite)
            pad = 0.05 * (high - low or 1.0)
            ax.plot([low - pad, high + pad], [low - pad, high + pad], color=NEUTRAL, linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.55, "held-out predictions were not saved in this run", ha="center", va="center",
                fontsize=10, transform=ax.transAxes)
    ax.text(0.02, 0.98, summary, ha="left", va="top", fontsize=8, transform=ax.transAxes,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    ax.set_title(title)
    return fig


def ppl_against_ratio(series: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], *, title: str):
    """One panel per evaluation text, one line per method: perplexity (log scale) against pruning ratio."""
    texts = list(series)
    fig = _figure(max(5.0, 4.4 * len(texts)), 3.8)
    axes = fig.subplots(1, len(texts), squeeze=False)[0]
    for ax, text in zip(axes, texts):
        for method, points in series[text].items():
            ordered = sorted(points)
            ys = [y if math.isfinite(y) else float("nan") for _, y in ordered]
            ax.plot([x for x, _ in ordered], ys, marker="o", markersize=4, label=method)
        ax.set_yscale("log")
        ax.set_xlabel("pruning ratio (fraction of blocks removed)")
        ax.set_ylabel(f"perplexity on {text}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def save_png(fig, path) -> bytes:
    """Write the figure as PNG and return its bytes."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    with open(path, "wb") as handle:
        handle.write(data)
    return data
