"""Evaluation figures as PNG files: confusion matrix, retrieval grid, probe accuracies, the WiSE-FT curve."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a pipeline worker

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402

from clipflow.evaluate.metrics import per_class_recall, row_normalised, top_confusions  # noqa: E402
from clipflow.evaluate.probes import ProbeResult  # noqa: E402
from clipflow.evaluate.retrieval import OTHER, PAIR, SAME_LABEL, GridRow, RetrievalGrid  # noqa: E402
from clipflow.evaluate.wiseft import WiseftCurve  # noqa: E402

# Beyond this many classes a matrix's cells and labels are too small to read (48 classes made a
# 2029 px figure with 7 px labels): the figure shows per-class recall and the top confusions instead.
MATRIX_MAX_CLASSES = 16
TOP_CONFUSIONS = 15
FRAME = {PAIR: "#1a9850", SAME_LABEL: "#f0a000", OTHER: "#d73027"}
VERSUS_CHANCE = {"below": "#d73027", "at": "#999999", "above": "#4575b4"}


def confusion_matrix(confusion: torch.Tensor, classes: list[str], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix with per-class recall beside it; for many classes, recall and top confusions.

    Rows: the true classes that have images. Columns: the same classes in the same order (so the
    diagonal is right), then the wrong classes predicted most often, up to `MATRIX_MAX_CLASSES`
    columns, then one column for all other classes. Each cell is the share of its row's images.
    """
    rows = (confusion.sum(dim=1) > 0).nonzero().flatten().tolist()
    if len(rows) > MATRIX_MAX_CLASSES:
        return _recall_and_confusions(confusion, classes, title, path)
    elsewhere = confusion[rows].sum(dim=0)
    elsewhere[rows] = 0
    wrong = [c for c in elsewhere.argsort(descending=True, stable=True).tolist() if elsewhere[c] > 0]
    extra, rest = wrong[: max(0, MATRIX_MAX_CLASSES - len(rows))], wrong[max(0, MATRIX_MAX_CLASSES - len(rows)) :]
    shares = row_normalised(confusion)[rows]
    matrix = shares[:, rows + extra]
    labels = [classes[c] for c in rows + extra]
    if rest:
        matrix = torch.cat([matrix, shares[:, rest].sum(dim=1, keepdim=True)], dim=1)
        labels.append(f"{len(rest)} other classes")
    matrix = matrix.numpy()
    recall = per_class_recall(confusion, classes)
    fig, ax = plt.subplots(figsize=(0.6 * len(labels) + 5, 0.5 * len(rows) + 3))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(len(rows)), [classes[r] for r in rows], fontsize=9)
    for (i, j), share in np.ndenumerate(matrix):
        if share > 0:
            # Dark cells get white text: black on the darkest blue does not read.
            colour = "white" if share > 0.55 else "black"
            ax.text(j, i, f"{share:.0%}", ha="center", va="center", fontsize=8, color=colour)
    for i in range(len(rows)):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    margin = ax.secondary_yaxis("right")
    margin.set_yticks(range(len(rows)), [f"{each.recall:.0%} of {each.samples}" for each in recall])
    margin.tick_params(labelsize=8)
    margin.set_ylabel("recall (of n images)", fontsize=9)
    # Sizes in inches: a fraction of a wide matrix would push the bar far from it.
    bar = fig.colorbar(image, cax=make_axes_locatable(ax).append_axes("right", size=0.2, pad=1.1))
    bar.set_label("share of the true class's images", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: each row sums to 100%; boxed: the correct class", fontsize=10)
    return _save(fig, path)


def _recall_and_confusions(confusion: torch.Tensor, classes: list[str], title: str, path: Path) -> Path:
    """Every class's recall, worst first, beside the most frequent wrong (true, predicted) pairs."""
    recall = sorted(per_class_recall(confusion, classes), key=lambda each: (each.recall, each.label))
    mixed = top_confusions(confusion, classes, TOP_CONFUSIONS)
    height = 0.26 * max(len(recall), len(mixed)) + 1.8
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [1, 1.2]})
    left.barh(range(len(recall)), [each.recall for each in recall], color="#4575b4")
    left.set_yticks(range(len(recall)), [each.label for each in recall], fontsize=8)
    for i, each in enumerate(recall):
        left.text(each.recall + 0.01, i, f"{each.recall:.0%} of {each.samples}", va="center", fontsize=7)
    left.set_xlim(0, 1.18)
    # Both panels on one scale of rows, top down, so a bar is as thick on either side.
    span = (max(len(recall), len(mixed)) - 0.5, -0.5)
    left.set_ylim(span)
    left.set_xlabel("recall (share of the class's images classified right)", fontsize=9)
    left.set_title("per-class recall, worst first", fontsize=10)
    right.barh(range(len(mixed)), [each.share for each in mixed], color="#d73027")
    right.set_yticks(range(len(mixed)), [f"{each.true} → {each.predicted}" for each in mixed], fontsize=8)
    for i, each in enumerate(mixed):
        right.text(each.share + 0.01, i, f"{each.count} images ({each.share:.0%})", va="center", fontsize=7)
    right.set_xlim(0, max([each.share for each in mixed], default=0) * 1.35 + 0.05)
    right.set_ylim(span)
    right.set_xlabel("share of the true class's images", fontsize=9)
    right.set_title(f"top {len(mixed)} confusions: true → predicted", fontsize=10)
    fig.suptitle(f"{title}: {len(recall)} classes with images", fontsize=11)
    return _save(fig, path)


def retrieval_grid(grid: RetrievalGrid, path: Path) -> Path:
    """Text to image, then image to text: each query's top matches with rank and score, framed by relation."""
    panels = [
        ("text → image: each caption's top images", grid.text_to_image),
        ("image → text: each image's top distinct captions", grid.image_to_text),
    ]
    k = max(len(row.retrieved) for _, rows in panels for row in rows)
    rows = sum(len(panel) for _, panel in panels)
    height = 1.5 * rows + 0.5 * len(panels) + 0.5
    fig = plt.figure(figsize=(2.2 + 1.5 * k, height))
    # Each panel starts with a low row that holds its title.
    ratios = [ratio for _, panel in panels for ratio in [0.3] + [1] * len(panel)]
    layout = fig.add_gridspec(len(ratios), k + 1, width_ratios=[1.3] + [1] * k, height_ratios=ratios)
    start = 0
    for title, panel in panels:
        heading = fig.add_subplot(layout[start, :])
        heading.axis("off")
        heading.text(0, 0, title, fontsize=11, weight="bold", va="bottom")
        for r, row in enumerate(panel, start=start + 1):
            _grid_row(fig, layout, r, row)
        start += len(panel) + 1
    legend = [Patch(edgecolor=FRAME[PAIR], facecolor="none", linewidth=3, label="pair: the query's own caption")]
    if grid.label_field:
        same = f"same label: another caption of the query's {grid.label_field!r}"
        legend.append(Patch(edgecolor=FRAME[SAME_LABEL], facecolor="none", linewidth=3, label=same))
    legend.append(Patch(edgecolor=FRAME[OTHER], facecolor="none", linewidth=3, label="other"))
    fig.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.4 / height, bottom=0.02, hspace=0.5, wspace=0.15)
    return _save(fig, path, tight=False)


def _grid_row(fig, layout, r: int, row: GridRow) -> None:
    query = fig.add_subplot(layout[r, 0])
    _tile(query, row.query, "none")
    query.set_title("query", fontsize=8, color="#555555")
    for c, found in enumerate(row.retrieved, start=1):
        ax = fig.add_subplot(layout[r, c])
        _tile(ax, found.item, FRAME[found.relation])
        ax.set_xlabel(f"#{found.rank} · {found.score:.3f} · {found.relation}", fontsize=8)


def _tile(ax, item, frame: str) -> None:
    """An image, or a caption written in a box, framed in `frame`."""
    if isinstance(item, str):
        ax.text(0.5, 0.5, textwrap.fill(item, 20), ha="center", va="center", fontsize=8, wrap=True)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    else:
        ax.imshow(item)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("#bbbbbb" if frame == "none" else frame)
        spine.set_linewidth(1 if frame == "none" else 3.5)


def probe_bars(probes: dict[str, ProbeResult], path: Path) -> Path:
    """Accuracy per probe with its 95% interval, n and chance level; bars coloured by where they stand to chance."""
    names = list(probes)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(names) + 1.5), 4.2))
    for i, name in enumerate(names):
        probe = probes[name]
        ax.bar(i, probe.accuracy, color=VERSUS_CHANCE[probe.versus_chance], width=0.6)
        ax.errorbar(
            i,
            probe.accuracy,
            yerr=[[probe.accuracy - probe.ci_low], [probe.ci_high - probe.accuracy]],
            color="black",
            capsize=6,
        )
        ax.hlines(probe.chance, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        verdict = f"{probe.versus_chance} chance"
        ax.text(i, probe.ci_high + 0.03, f"{probe.accuracy:.2f}\n{verdict}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), [f"{name}\n(n={probes[name].samples})" for name in names], fontsize=9)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title(
        "probes: accuracy with its 95% interval, dashes at chance\n"
        "red: the interval lies below chance, grey: it holds chance, blue: above",
        fontsize=10,
    )
    notes = "\n".join(textwrap.shorten(f"{name}: {probes[name].description}", 150) for name in names)
    fig.text(0.01, 0.01, notes, fontsize=7, va="bottom")
    fig.subplots_adjust(bottom=0.16 + 0.04 * len(names), top=0.9)
    return _save(fig, path, tight=False)


def wiseft_curve(curve: WiseftCurve, path: Path) -> Path:
    """Target (and retention) top-1 against the fine-tuned weights' share `a`, the chosen `a` marked.

    The shaded band is where retention top-1 may lie: no lower than the starting model's less the allowed drop.
    """
    alphas = [point.alpha for point in curve.points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(
        alphas, [point.target_top1 for point in curve.points], "o-", color="#4575b4", label=f"target: {curve.target}"
    )
    if curve.retention:
        retention = [point.retention_top1 for point in curve.points]
        ax.plot(alphas, retention, "s--", color="#f0a000", label=f"retention: {curve.retention}")
        floor = curve.pretrained_retention_top1 - curve.max_retention_drop
        ax.axhspan(floor, 1.0, color="#f0a000", alpha=0.08, label=f"retention kept (within {curve.max_retention_drop})")
    ax.axvline(curve.chosen, color="black", linestyle=":", linewidth=1.5, label=f"chosen a = {curve.chosen:g}")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("a: (1 - a) x starting weights + a x fine-tuned weights")
    ax.set_ylabel("zero-shot top-1")
    ax.set_title("WiSE-FT: top-1 along the line from the starting to the fine-tuned weights", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _save(fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
