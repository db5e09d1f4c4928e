"""PNG plots for run reports.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure` + the Agg canvas), so no
backend is selected and no global pyplot state is touched. Output is deterministic (no timestamp or
software metadata) and stays readable up to ~64 layers x 128 experts: tick labels are thinned when
there are many layers or experts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

__all__ = ["plot_usage_heatmap", "plot_saliency", "plot_kept_map"]

_MAX_TICKS = 32  # tick labels per axis before thinning
_DPI = 90
_HATCH_CELLS = 32 * 32  # above this, dropped cells are only faded (hatching bloats the PNG)
_KEPT_COLORS = {"dropped": "#d9d9d9", "kept": "#2b8cbe", "protected": "#e6550d", "never routed": "#756bb1"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return path


def _thinned(n: int) -> list[int]:
    step = max(1, math.ceil(n / _MAX_TICKS))
    return list(range(0, n, step))


def _axes_labels(ax, *, layer_ids: list[int], n_experts: int) -> None:
    rows = _thinned(len(layer_ids))
    ax.set_yticks(rows)
    ax.set_yticklabels([str(layer_ids[r]) for r in rows], fontsize=8 if len(layer_ids) > 16 else 9)
    cols = _thinned(n_experts)
    ax.set_xticks(cols)
    ax.set_xticklabels([str(c) for c in cols], fontsize=7 if n_experts > 16 else 9)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")


def _figure(n_layers: int, n_experts: int) -> Figure:
    width = min(max(4.5 + 0.3 * n_experts, 6.0), 16.0)
    height = min(max(1.2 + 0.3 * n_layers, 3.0), 14.0)
    return Figure(figsize=(width, height))


def _below(fig: Figure) -> float:
    """Axes-fraction y that sits ~0.6 inch under the axes (below the x label) at any figure height."""
    return -0.6 / (0.77 * fig.get_figheight())


def _cells(mask: np.ndarray, **style) -> PatchCollection:
    """One rectangle per True cell of a (layers, experts) mask, drawn as a single collection."""
    rects = [Rectangle((c - 0.5, r - 0.5), 1, 1) for r, c in zip(*np.nonzero(mask))]
    return PatchCollection(rects, match_original=False, **style)


def _mask(layer_ids: list[int], n_experts: int, members: dict[int, list[int]]) -> np.ndarray:
    out = np.zeros((len(layer_ids), n_experts), dtype=bool)
    for r, i in enumerate(layer_ids):
        out[r, [j for j in members.get(i, []) if j < n_experts]] = True
    return out


def plot_usage_heatmap(obs, path: str | Path) -> Path:
    """Heatmap (layers x experts) of each expert's share of the layer's routed tokens.

    The colorbar marks the uniform share 1/E; never-routed experts show as 0 %.
    """
    layer_ids = sorted(obs.layers)
    n_experts = max(obs.layers[i].num_experts for i in layer_ids)
    counts = np.zeros((len(layer_ids), n_experts))  # (L, E)
    for r, i in enumerate(layer_ids):
        c = obs.layers[i].count.double().numpy()
        counts[r, : c.size] = c
    share = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = _figure(len(layer_ids), n_experts)
    ax = fig.add_subplot()
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    uniform = 100 / n_experts
    label = "share of the layer's routed tokens (%)"
    if uniform <= float(share.max()):
        cbar.ax.axhline(uniform, color="white", linewidth=1.5)
        label += f"\nwhite line: uniform share {uniform:.3g}%"
    cbar.set_label(label)
    if len(layer_ids) * n_experts <= 16 * 16:
        top = float(share.max()) or 1.0
        for (r, c), v in np.ndenumerate(share):
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 * top else "white")
    _axes_labels(ax, layer_ids=layer_ids, n_experts=n_experts)
    tokens = obs.meta.get("num_tokens") if isinstance(obs.meta, dict) else None
    ax.set_title("Expert usage on the calibration data" + (f" ({tokens} tokens)" if tokens else ""))
    return _save(fig, path)


def _scaled_scores(selection, layer_ids: list[int], n_experts: int) -> np.ndarray:
    """Scores scaled per layer to [0, 1] (layer min -> 0, max -> 1); NaN where not finite."""
    grid = np.full((len(layer_ids), n_experts), np.nan)  # (L, E)
    for r, i in enumerate(layer_ids):
        row = np.asarray(selection.scores[i], dtype=float)
        row = np.where(np.isfinite(row), row, np.nan)
        if np.isfinite(row).any():
            lo, hi = np.nanmin(row), np.nanmax(row)
            row = (row - lo) / (hi - lo) if hi > lo else np.where(np.isnan(row), np.nan, 1.0)
        grid[r, : row.size] = row
    return grid


def plot_saliency(selection, path: str | Path) -> Path:
    """The method's score per expert (layers x experts), scaled per layer.

    Dropped experts are faded (and hatched on small grids), protected (super) experts carry a star, and experts with a
    non-finite score (-inf: never routed) are left empty with a cross hatch.
    """
    layer_ids = sorted(selection.scores)
    n_experts = max(len(selection.scores[i]) for i in layer_ids)
    grid = _scaled_scores(selection, layer_ids, n_experts)
    fig = _figure(len(layer_ids), n_experts)
    ax = fig.add_subplot()
    cmap = colormaps["magma"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cbar.set_label(f"{selection.method} score\n(0 = layer min, 1 = layer max)")
    never = np.isnan(grid)
    dropped = _mask(layer_ids, n_experts, selection.dropped) & ~never
    fade = np.zeros((*dropped.shape, 4))  # (L, E, RGBA): dropped cells washed out towards white
    fade[dropped] = (1.0, 1.0, 1.0, 0.6)
    ax.imshow(fade, aspect="auto", interpolation="nearest")
    if dropped.size <= _HATCH_CELLS:  # hatching on top while cells are large enough to show it
        ax.add_collection(_cells(dropped, facecolor="none", edgecolor="#aaaaaa", hatch="///", linewidth=0))
    ax.add_collection(_cells(never, facecolor="none", edgecolor="#999999", hatch="xx", linewidth=0))
    prot = np.nonzero(_mask(layer_ids, n_experts, selection.protected))
    if prot[0].size:
        ax.scatter(prot[1], prot[0], marker="*", s=60 if n_experts <= 32 else 25, c="#00e5ff", edgecolors="black",
                   linewidths=0.4, zorder=3)
    handles = [Patch(facecolor="#fcfdbf", edgecolor="#888888", label="kept"),
               Patch(facecolor="#fefef2", edgecolor="#888888", hatch="///" if dropped.size <= _HATCH_CELLS else None,
                     label="dropped (faded)"),
               Patch(facecolor="white", edgecolor="#888888", hatch="xx", label="never routed (-inf)"),
               ax.scatter([], [], marker="*", c="#00e5ff", edgecolors="black", label="protected")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, _below(fig)),
              ncol=4, frameon=False, fontsize=8)
    _axes_labels(ax, layer_ids=layer_ids, n_experts=n_experts)
    ax.set_xlim(-0.5, n_experts - 0.5)
    ax.set_ylim(len(layer_ids) - 0.5, -0.5)
    ax.set_title(f"{selection.method} scores per expert ({selection.allocation} allocation)")
    return _save(fig, path)


def plot_kept_map(selection, path: str | Path) -> Path:
    """Layers x experts grid of the decision: kept / dropped / protected / never routed."""
    layer_ids = sorted(selection.kept)
    n_experts = max([*(j + 1 for i in layer_ids for j in selection.kept[i]),
                     *(j + 1 for i in layer_ids for j in selection.dropped.get(i, [])), 1])
    states = list(_KEPT_COLORS)
    grid = np.zeros((len(layer_ids), n_experts))  # 0 dropped, 1 kept, 2 protected, 3 never routed
    grid[_mask(layer_ids, n_experts, selection.kept)] = 1
    grid[_mask(layer_ids, n_experts, selection.protected)] = 2
    grid[_mask(layer_ids, n_experts, selection.never_routed)] = 3
    fig = _figure(len(layer_ids), n_experts)
    ax = fig.add_subplot()
    ax.imshow(grid, aspect="auto", cmap=ListedColormap(list(_KEPT_COLORS.values())), vmin=0, vmax=3,
              interpolation="nearest")
    if n_experts <= 64 and len(layer_ids) <= 64:  # thin white grid lines between cells
        ax.set_xticks(np.arange(-0.5, n_experts), minor=True)
        ax.set_yticks(np.arange(-0.5, len(layer_ids)), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
    _axes_labels(ax, layer_ids=layer_ids, n_experts=n_experts)
    handles = [Patch(color=_KEPT_COLORS[s], label=s) for s in states]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, _below(fig)),
              ncol=4, frameon=False, fontsize=8)
    kept_n = sorted({len(selection.kept[i]) for i in layer_ids})
    per = str(kept_n[0]) if len(kept_n) == 1 else f"{kept_n[0]}-{kept_n[-1]}"
    ax.set_title(f"Experts kept per layer ({per} of {n_experts})")
    return _save(fig, path)
