"""Classification and regression metrics from plain label lists (no sklearn needed)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def confusion_matrix(
    y_true: Sequence[int], y_pred: Sequence[int], n_classes: int
) -> list[list[int]]:
    """m[t][p] = rows of true class t predicted as p."""
    m = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        m[int(t)][int(p)] += 1
    return m


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]
) -> dict:
    """accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    n = len(classes)
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"need equal, non-empty label lists, got {len(y_true)} and {len(y_pred)}")
    cm = confusion_matrix(y_true, y_pred, n)
    per_class = {}
    f1s = []
    for c in range(n):
        tp = cm[c][c]
        fp = sum(cm[t][c] for t in range(n)) - tp
        fn = sum(cm[c]) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[str(classes[c])] = {
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "support": sum(cm[c]),
        }
        f1s.append(f1)
    acc = sum(cm[c][c] for c in range(n)) / len(y_true)
    return {
        "accuracy": acc,
        "macro_f1": sum(f1s) / n,
        "n": len(y_true),
        "classes": list(map(str, classes)),
        "per_class": per_class,
        "confusion_matrix": cm,
    }


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int]) -> dict:
    """Accuracy of always predicting the most frequent training label."""
    majority = Counter(train_labels).most_common(1)[0][0]
    acc = sum(1 for t in test_labels if t == majority) / len(test_labels)
    return {"majority_class": int(majority), "accuracy": acc}


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict:
    n = len(y_true)
    mse = sum((a - b) ** 2 for a, b in zip(y_true, y_pred)) / n
    mae = sum(abs(a - b) for a, b in zip(y_true, y_pred)) / n
    mean = sum(y_true) / n
    var = sum((a - mean) ** 2 for a in y_true) / n
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": mae,
        "r2": 1 - mse / var if var > 0 else 0.0,
        "n": n,
    }
