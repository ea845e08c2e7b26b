"""map.png: the catalogue's fused points coloured by category (left) and every modality's points in
the same plane, with a few items' modalities linked (right), drawn with matplotlib."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from align.eval.plots import matplotlib_pyplot, save_figure
from align.map.items import FUSED, ItemMap

PNG_FILE = "map.png"
LEGEND_CATEGORIES = 19  # the rest share one grey "other" entry: a legend of 500 names helps nobody
OTHER_COLOUR = "#b0b0b0"
FLAG_COLOUR = "#e00000"
LAYER_STYLE = {FUSED: ("o", "#222222"), "text": ("s", "#1f77b4"), "image": ("^", "#ff7f0e"),
               "audio": ("D", "#2ca02c")}
LINKED_ITEMS = 40  # items whose modality points the right panel joins by lines


def _marker_size(count: int) -> float:
    """Smaller points for bigger catalogues, so that clusters stay readable."""
    return float(np.clip(3000 / max(count, 1), 2, 30))


def plot_map(item_map: ItemMap, folder: str) -> Optional[str]:
    """Write ``map.png`` into ``folder``; its path, or None when matplotlib is not installed."""
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.8), gridspec_kw={"wspace": 0.45})
    axes = item_map.projection.axis_labels()
    fused = item_map.points[FUSED]
    size = _marker_size(len(item_map.ids))
    shown = list(item_map.palette)[:LEGEND_CATEGORIES]
    colours = np.array([item_map.palette[c] if c in shown else OTHER_COLOUR for c in item_map.categories])
    left.scatter(fused[:, 0], fused[:, 1], s=size, c=colours, linewidths=0)
    for name in shown:  # legend entries only: the points are drawn above in one call
        left.scatter([], [], s=30, c=item_map.palette[name], label=name)
    if len(item_map.palette) > LEGEND_CATEGORIES:
        rest = len(item_map.palette) - LEGEND_CATEGORIES
        left.scatter([], [], s=30, c=OTHER_COLOUR, label=f"other ({rest} categories)")
    if item_map.flags:
        rows = sorted(item_map.flags)
        left.scatter(fused[rows, 0], fused[rows, 1], s=size * 6, facecolors="none", edgecolors=FLAG_COLOUR,
                     linewidths=1.2, label=f"flagged by the audit ({len(rows)})")
    left.set_title(f"{len(item_map.ids)} items (fused vectors) by category", fontsize=10)
    left.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=1.0)
    right.set_title("every modality in the same plane; lines join one item's points", fontsize=10)
    linked = np.random.default_rng(0).permutation(len(item_map.ids))[:LINKED_ITEMS]
    for row in linked:
        xy = np.array([item_map.points[layer][row] for layer in item_map.layers])
        xy = xy[~np.isnan(xy[:, 0])]
        right.plot(xy[:, 0], xy[:, 1], color="#555555", linewidth=0.5, alpha=0.6, zorder=1)
    for layer in item_map.layers:
        marker, colour = LAYER_STYLE.get(layer, ("x", "#8c564b"))
        xy = item_map.points[layer]
        right.scatter(xy[:, 0], xy[:, 1], s=size * 0.7, marker=marker, c=colour, alpha=0.5, linewidths=0,
                      label=f"{layer} ({int((~np.isnan(xy[:, 0])).sum())})", zorder=2)
    right.legend(fontsize=8, markerscale=2)
    for ax in (left, right):
        ax.set_xlabel(axes[0], fontsize=8)
        ax.set_ylabel(axes[1], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.2)
    fig.suptitle(item_map.projection.statement(), fontsize=9)
    return save_figure(fig, os.path.join(folder, PNG_FILE))
