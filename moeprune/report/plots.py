"""PNG plots for run reports (matplotlib's object API; no global pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = ["plot_usage_heatmap", "plot_saliency", "plot_kept_map"]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight", metadata={"Software": None})
    return path


def _ticks(ax, n_layers: int, layer_ids: list[int], n_experts: int) -> None:
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([str(i) for i in layer_ids] if n_layers <= 64 else [""] * n_layers)
    if n_experts <= 64:
        ax.set_xticks(range(n_experts))
        ax.tick_params(axis="x", labelsize=7 if n_experts > 16 else 9)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")


def _size(n_layers: int, n_experts: int) -> tuple[float, float]:
    return min(3 + 0.35 * n_experts, 16), min(1.5 + 0.35 * n_layers, 14)


def plot_usage_heatmap(obs, path: str | Path) -> Path:
    """Share of routed tokens per expert (layers x experts)."""
    layer_ids = sorted(obs.layers)
    counts = np.stack([obs.layers[i].count.numpy() for i in layer_ids])
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=_size(*share.shape))
    ax = fig.add_subplot()
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    _ticks(ax, len(layer_ids), layer_ids, share.shape[1])
    ax.set_title("Expert usage on the calibration data")
    return _save(fig, Path(path))


def plot_saliency(selection, path: str | Path) -> Path:
    """The method's score per expert (layers x experts); dropped experts hatched, never-routed blank."""
    layer_ids = sorted(selection.scores)
    scores = np.array([[s for s in selection.scores[i]] for i in layer_ids], dtype=float)
    finite = np.where(np.isfinite(scores), scores, np.nan)
    fig = Figure(figsize=_size(*scores.shape))
    ax = fig.add_subplot()
    im = ax.imshow(finite, aspect="auto", cmap="magma")
    fig.colorbar(im, ax=ax, label=f"{selection.method} score")
    for r, i in enumerate(layer_ids):
        for j in selection.dropped.get(i, []):
            ax.add_patch(_cell(j, r, hatch="///"))
        for j in selection.protected.get(i, []):
            ax.text(j, r, "S", ha="center", va="center", color="cyan", fontsize=8, fontweight="bold")
    _ticks(ax, len(layer_ids), layer_ids, scores.shape[1])
    ax.set_title(f"{selection.method} scores (hatched: dropped, S: protected, blank: never routed)")
    return _save(fig, Path(path))


def _cell(x: int, y: int, **kw):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=0.0, **kw)


_STATES = ("dropped", "kept", "protected", "never routed")


def plot_kept_map(selection, path: str | Path) -> Path:
    """Layers x experts: kept / dropped / protected / never routed."""
    layer_ids = sorted(selection.kept)
    n_experts = max(len(selection.kept[i]) + len(selection.dropped.get(i, [])) for i in layer_ids)
    grid = np.zeros((len(layer_ids), n_experts))
    for r, i in enumerate(layer_ids):
        grid[r, selection.kept[i]] = 1
        grid[r, selection.protected.get(i, [])] = 2
        grid[r, selection.never_routed.get(i, [])] = 3
    colors = ["#d9d9d9", "#2b8cbe", "#e6550d", "#756bb1"]
    fig = Figure(figsize=_size(len(layer_ids), n_experts))
    ax = fig.add_subplot()
    ax.imshow(grid, aspect="auto", cmap=ListedColormap(colors), vmin=0, vmax=3, interpolation="nearest")
    _ticks(ax, len(layer_ids), layer_ids, n_experts)
    ax.legend(handles=[Patch(color=c, label=s) for c, s in zip(colors, _STATES)], loc="upper center",
              bbox_to_anchor=(0.5, -0.12), ncol=4, frameon=False)
    ax.set_title("Experts kept per layer")
    return _save(fig, Path(path))
