"""A 2-D projection of a catalogue's vectors, fitted once on every modality of every item, so that
an item's text, image, audio and fused points lie in one plane and can be linked.

PCA (the default) is exact and deterministic: the top two eigenvectors of the float64 covariance
of all the vectors, each signed so that its largest-magnitude entry is positive. UMAP
(``umap-learn``) is used only when asked for and installed; it keeps neighbourhoods rather than
distances, and its layout depends on its seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Tuple

import numpy as np

from align.errors import ConfigError, RunError

Method = Literal["pca", "umap"]
METHODS = ("pca", "umap")
CHUNK_ROWS = 65_536  # rows per covariance update: D x D float64 memory, whatever the catalogue's size


@dataclass
class Projection:
    """How the 2-D coordinates were made (written to map.json and shown on the maps).

    Attributes:
        method: ``"pca"`` or ``"umap"``.
        fit_rows: layer -> how many of its vectors the projection was fitted on.
        explained: PCA only: the share of the total variance each axis keeps.
        detail: method parameters (UMAP's metric, neighbours and seed).
    """

    method: str
    fit_rows: Dict[str, int]
    explained: List[float] = field(default_factory=list)
    detail: Dict[str, object] = field(default_factory=dict)

    def axis_labels(self) -> List[str]:
        """``["PC1 (12.3% of variance)", ...]`` for PCA, ``["UMAP 1", "UMAP 2"]`` for UMAP."""
        if self.method == "pca":
            return [f"PC{k + 1} ({share:.1%} of variance)" for k, share in enumerate(self.explained)]
        return ["UMAP 1", "UMAP 2"]

    def statement(self) -> str:
        """One line naming the method and what it was fitted on, for the maps' titles."""
        rows = sum(self.fit_rows.values())
        layers = ", ".join(f"{name} {n}" for name, n in self.fit_rows.items())
        if self.method == "pca":
            kept = sum(self.explained)
            return f"PCA (exact) fitted on all {rows} vectors ({layers}); the two axes keep {kept:.1%} of the variance"
        return (f"UMAP ({self.detail.get('metric')}, {self.detail.get('n_neighbors')} neighbours, seed "
                f"{self.detail.get('seed')}) fitted on all {rows} vectors ({layers}); distances are not to scale")


def pca_2d(vectors: np.ndarray) -> Tuple[np.ndarray, List[float]]:
    """The exact 2-D PCA of ``vectors`` (M, D): (coordinates (M, 2) float64, explained variance shares).

    cov = (X - mean)^T (X - mean) / M in float64, accumulated in chunks of rows (so M may be large);
    the axes are its two top eigenvectors, each flipped so that its largest-magnitude entry is
    positive (an eigenvector's sign is arbitrary; this makes the map the same on every run).
    """
    rows, dim = vectors.shape
    if rows < 2 or dim < 2:
        raise RunError(f"a 2-D projection needs at least 2 vectors of at least 2 dimensions, got {rows} x {dim}")
    mean = np.zeros(dim)
    for start in range(0, rows, CHUNK_ROWS):
        mean += vectors[start:start + CHUNK_ROWS].astype(np.float64).sum(axis=0)
    mean /= rows
    cov = np.zeros((dim, dim))
    for start in range(0, rows, CHUNK_ROWS):
        centred = vectors[start:start + CHUNK_ROWS].astype(np.float64) - mean  # (m, D)
        cov += centred.T @ centred
    cov /= rows
    values, vecs = np.linalg.eigh(cov)  # ascending
    axes = vecs[:, ::-1][:, :2].copy()  # (D, 2): the two largest
    top = values[::-1][:2].clip(min=0)
    biggest = np.abs(axes).argmax(axis=0)
    axes *= np.sign(axes[biggest, [0, 1]])
    total = float(values.clip(min=0).sum())
    explained = [float(v / total) if total > 0 else 0.0 for v in top]
    coords = np.concatenate([(vectors[start:start + CHUNK_ROWS].astype(np.float64) - mean) @ axes
                             for start in range(0, rows, CHUNK_ROWS)])  # (M, 2)
    return coords, explained


def umap_2d(vectors: np.ndarray, seed: int, neighbours: int = 15) -> np.ndarray:
    """UMAP's 2-D layout of ``vectors`` (M, D) under cosine distance: (M, 2) float64."""
    try:
        import umap
    except ImportError:
        raise ConfigError("--method umap needs umap-learn (pip install umap-learn); "
                          "leave --method out for the exact PCA map") from None
    layout = umap.UMAP(n_components=2, metric="cosine", n_neighbors=neighbours, random_state=seed)
    return np.asarray(layout.fit_transform(vectors), dtype=np.float64)


def project_layers(layers: Dict[str, np.ndarray], method: Method = "pca",
                   seed: int = 0) -> Tuple[Dict[str, np.ndarray], Projection]:
    """One projection fitted on the vectors of every layer together, applied to each.

    Args:
        layers: layer name (a modality or ``"fused"``) -> its real vectors (n_layer, D), any float type.
        method: ``"pca"`` (exact, deterministic) or ``"umap"`` (needs umap-learn; ``seed`` fixes it).
    Returns:
        (layer -> (n_layer, 2) float64 coordinates, in the rows given; the ``Projection``).
    """
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    names = [name for name in layers if len(layers[name])]
    if not names:
        raise RunError("no vectors to project: every item's masks are False")
    stacked = np.concatenate([np.asarray(layers[name], dtype=np.float32) for name in names])  # (M, D)
    fit_rows = {name: len(layers[name]) for name in names}
    if method == "pca":
        coords, explained = pca_2d(stacked)
        projection = Projection("pca", fit_rows, explained)
    else:
        coords = umap_2d(stacked, seed)
        projection = Projection("umap", fit_rows, detail={"metric": "cosine", "n_neighbors": 15, "seed": seed})
    out, start = {}, 0
    for name in layers:
        count = len(layers[name])
        out[name] = coords[start:start + count] if name in fit_rows else np.zeros((0, 2))
        start += count if name in fit_rows else 0
    return out, projection
