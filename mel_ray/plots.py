"""Plots people would rather look at than read, written as PNG files for MLflow artifacts."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no display on workers or CI
import matplotlib.pyplot as plt
import numpy as np


def plot_curves(history: list[dict], path: str | Path, groups: dict[str, list[str]] | None = None) -> Path:
    """One panel per group of metrics (e.g. losses, dev hits), x = epoch."""
    groups = groups or {
        "training loss": [k for k in history[0] if k.startswith("loss")],
        "dev ranking": [k for k in history[0] if k.startswith("dev_H@") or k == "dev_MRR"],
    }
    groups = {title: keys for title, keys in groups.items() if keys}
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], groups.items()):
        for key in keys:
            points = [(h["epoch"], h[key]) for h in history if key in h and h[key] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_patch_maps(images: list[np.ndarray], alphas: list[np.ndarray], betas: list[np.ndarray],
                    titles: list[str], path: str | Path) -> Path:
    """Paper Fig. 6: each mention image next to the mean |alpha| and |beta| of its patches (CLS dropped)."""
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for r, (img, alpha, beta, title) in enumerate(zip(images, alphas, betas, titles)):
        side = math.isqrt(alpha.shape[0] - 1)      # token 0 is CLS, the rest a side x side grid
        axes[r][0].imshow(img)
        axes[r][0].set_title(title[:60], fontsize=8)
        for c, (values, name) in enumerate(((alpha, "alpha"), (beta, "beta")), start=1):
            grid = np.abs(values[1: 1 + side * side]).mean(axis=-1).reshape(side, side)
            im = axes[r][c].imshow(grid, cmap="viridis")
            axes[r][c].set_title(f"mean |{name}| per patch", fontsize=8)
            fig.colorbar(im, ax=axes[r][c], fraction=0.046)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(matrix: np.ndarray, row_labels: list, col_labels: list, title: str, path: str | Path,
                 row_name: str = "", col_name: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(1.2 * len(col_labels) + 2, 1.0 * len(row_labels) + 1.5))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
