"""The test-set report a run logs with its predictions: confusion matrix, per-class accuracy, mistakes.

`write_report(folder, images, labels, predictions)` writes, from plain arrays:

- `confusion_matrix.png` — counts, rows = true class, columns = predicted class;
- `confusion_matrix.csv` — the same counts as a table;
- `per_class_accuracy.csv` and `per_class_accuracy.json` — one row per class: images, correct,
  accuracy (the JSON in MLflow's table layout, `{"columns": [...], "data": [[...], ...]}`);
- `misclassified.png` — a grid of the first misclassified test images, titled true -> predicted.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no display), so this
runs in a background thread.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from nin_dist.data import CLASSES

GRID_COLUMNS, GRID_MAX = 8, 48  # misclassified grid: images per row, images shown


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """[true, predicted] counts, int64 [C, C]."""
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_rows(cm: np.ndarray) -> list[list]:
    """[class index, class name, images, correct, accuracy] per class (accuracy 0 for no images)."""
    rows = []
    for k, name in enumerate(CLASSES):
        total, correct = int(cm[k].sum()), int(cm[k, k])
        rows.append([k, name, total, correct, correct / total if total else 0.0])
    return rows


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_confusion(cm: np.ndarray, path: Path) -> None:
    fig = _figure(8.0, 7.0)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"Confusion matrix: {cm.sum()} test images, accuracy {accuracy:.2%}")
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                color="white" if n > threshold else "black")
    fig.tight_layout()
    fig.savefig(path)


def plot_misclassified(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, path: Path) -> int:
    """A grid of up to GRID_MAX misclassified images; returns how many were wrong in all."""
    wrong = np.flatnonzero(labels != predictions)
    shown = wrong[:GRID_MAX]
    rows = max(1, -(-len(shown) // GRID_COLUMNS))
    fig = _figure(GRID_COLUMNS * 1.6, rows * 1.9 + 0.6)
    fig.suptitle(f"Misclassified: {len(wrong)} of {len(labels)} test images "
                 f"(first {len(shown)}; true -> predicted)")
    for n, i in enumerate(shown):
        ax = fig.add_subplot(rows, GRID_COLUMNS, n + 1)
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"#{i}\n{CLASSES[labels[i]]}\n-> {CLASSES[predictions[i]]}", fontsize=7)
        ax.axis("off")
    if not len(shown):
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return len(wrong)


def write_report(folder: Path, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> None:
    """All report files for uint8 images [N, 28, 28], int labels [N] and predictions [N] into `folder`."""
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    folder.mkdir(parents=True, exist_ok=True)
    cm = confusion_matrix(labels, predictions)
    plot_confusion(cm, folder / "confusion_matrix.png")
    with open(folder / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *CLASSES])
        for name, row in zip(CLASSES, cm.tolist(), strict=True):
            writer.writerow([name, *row])
    columns = ["class", "name", "images", "correct", "accuracy"]
    rows = per_class_rows(cm)
    with open(folder / "per_class_accuracy.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    (folder / "per_class_accuracy.json").write_text(json.dumps({"columns": columns, "data": rows}, indent=1))
    plot_misclassified(images, labels, predictions, folder / "misclassified.png")
