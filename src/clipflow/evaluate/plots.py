"""Evaluation figures as PNG files: confusion matrix, retrieval grid, probe accuracies."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a pipeline worker

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def confusion_matrix(confusion: torch.Tensor, classes: list[str], title: str, path: Path) -> Path:
    """Rows: true classes that occur; columns: every class predicted at least once."""
    rows = (confusion.sum(dim=1) > 0).nonzero().flatten().tolist()
    cols = (confusion.sum(dim=0) > 0).nonzero().flatten().tolist()
    matrix = confusion[rows][:, cols].numpy()
    # Room below for the rotated class names and the axis label.
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(cols) + 2), 0.35 * len(rows) + 3))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cols)), [classes[c] for c in cols], rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), [classes[r] for r in rows], fontsize=7)
    for i, j in np.argwhere(matrix):
        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6, color="black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def retrieval_grid(queries: list[str], top_images: list[list[Image.Image]], hits: list[list[bool]], path: Path) -> Path:
    """One row per query text: its top-k images, the paired ones framed green, the others red."""
    k = len(top_images[0])
    fig, axes = plt.subplots(len(queries), k, figsize=(1.4 * k + 2.5, 1.4 * len(queries)), squeeze=False)
    for row, (query, images, row_hits) in enumerate(zip(queries, top_images, hits, strict=True)):
        for col, (image, hit) in enumerate(zip(images, row_hits, strict=True)):
            ax = axes[row][col]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if hit else "red")
                spine.set_linewidth(3)
        axes[row][0].set_ylabel(query, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("text to image: top matches (green = a paired image)", fontsize=9)
    return _save(fig, path)


def probe_bars(accuracy: dict[str, float], chance: dict[str, float], path: Path) -> Path:
    """Accuracy per probe with its chance level marked."""
    names = list(accuracy)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 1.5, 3))
    ax.bar(names, [accuracy[n] for n in names], color="tab:blue")
    for i, name in enumerate(names):
        ax.hlines(chance[name], i - 0.4, i + 0.4, colors="red", linestyles="dashed")
        ax.text(i, accuracy[name] + 0.02, f"{accuracy[name]:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("probes (red dashes: chance)", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
