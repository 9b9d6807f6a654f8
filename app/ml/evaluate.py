"""Model evaluation: accuracy, F1, ROC AUC, calibration error, confusion matrix and their plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from app.ml.labels import LABELS
from app.ml.model import confidence_of, decide


def expected_calibration_error(labels: NDArray[np.int64], proba_positive: NDArray[np.float64], bins: int = 15) -> float:
    """Top-label ECE: confidence-weighted gap between stated confidence and observed accuracy.

    Predictions are grouped by their confidence (the larger of the two class probabilities) into equal-width
    bins; ECE is the sum over bins of (share of predictions) x |accuracy - mean confidence|.
    """
    rows = reliability_table(labels, proba_positive, bins)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / len(labels))


def reliability_table(
    labels: NDArray[np.int64], proba_positive: NDArray[np.float64], bins: int = 10
) -> list[dict[str, float]]:
    """Per confidence bin: its range, count, mean confidence and accuracy (the reliability diagram's data)."""
    predicted = decide(proba_positive)
    confidence = confidence_of(proba_positive)
    correct = predicted == labels
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": int(mask.sum()),
                "confidence": float(confidence[mask].mean()) if mask.any() else float("nan"),
                "accuracy": float(correct[mask].mean()) if mask.any() else float("nan"),
            }
        )
    return rows


def classification_report(labels: NDArray[np.int64], proba_positive: NDArray[np.float64]) -> dict[str, Any]:
    """Every figure the model report and the promotion gate use, from true labels and P(positive)."""
    predicted = decide(proba_positive)
    both_classes = len(np.unique(labels)) == 2
    return {
        "n": len(labels),
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "f1_positive": float(f1_score(labels, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(labels, proba_positive)) if both_classes else None,
        "ece": expected_calibration_error(labels, proba_positive),
        "confusion_matrix": {
            "labels": list(LABELS),
            "matrix": confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
        },
        "reliability": reliability_table(labels, proba_positive),
    }


def plot_confusion_matrix(report: dict[str, Any], path: Path, title: str) -> None:
    """PNG of the confusion matrix with counts and row-normalised shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(report["confusion_matrix"]["matrix"], dtype=np.float64)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}\n{shares[i, j]:.1%}",
                ha="center",
                va="center",
                color="white" if shares[i, j] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], LABELS)
    ax.set_yticks([0, 1], LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(report: dict[str, Any], path: Path, title: str) -> None:
    """PNG reliability diagram: accuracy per confidence bin against the diagonal, with bin counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["reliability"] if r["count"]]
    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    width = rows[0]["high"] - rows[0]["low"] if rows else 0.05
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers, [r["accuracy"] for r in rows], width=width * 0.9, color="#4c72b0", label="accuracy")
    ax.plot([0.5, 1], [0.5, 1], "k--", label="perfect calibration")
    ax.plot(centers, [r["confidence"] for r in rows], "o", color="#dd8452", label="mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {report['ece']:.3f})")
    ax.legend(loc="upper left")
    ax_count.bar(centers, [r["count"] for r in rows], width=width * 0.9, color="#8c8c8c")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
