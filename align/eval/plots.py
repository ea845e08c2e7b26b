"""PNG plots of an evaluation, written beside its JSON when matplotlib is installed (the ``dev`` and
``rec`` extras bring it); without it the evaluation runs the same and says that no plot was drawn."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

RECALL_PNG = "recall_at_k.png"


def matplotlib_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """``fig`` as a PNG at ``path``, written atomically, then closed."""
    from align.errors import atomic_open

    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_recall_curves(curves: Dict[str, List[float]], folder: str, title: str = "") -> Optional[str]:
    """``recall_at_k.png`` in ``folder``: Recall@K for K = 1 .. len(curve), one line per ordered
    modality pair. Returns its path, or None when matplotlib is not installed."""
    plt = matplotlib_pyplot()
    if plt is None or not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for pair, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=pair)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (share of queries with a positive in the top K)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "Zero-shot retrieval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, os.path.join(folder, RECALL_PNG))
