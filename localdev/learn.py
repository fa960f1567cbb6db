"""Small real learners for the emulator: least squares and logistic regression, pure Python."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

HOLDOUT_EVERY = 5
"""Every fifth data row is held out for evaluation; the others train."""


@dataclass(frozen=True)
class Table:
    """Numeric features and a label parsed from delimited text."""

    features: list[str]
    label: str
    rows: list[list[float]]
    labels: list[float]


def read_table(text: str, label: str, *, delimiter: str = ",") -> Table:
    """Parse CSV/TSV text; rows whose features or label are not numbers are skipped."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")), delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    if label not in header:
        raise ValueError(f"label column {label!r} is not in the header {header}")
    li = header.index(label)
    features = [h for i, h in enumerate(header) if i != li]
    rows, labels = [], []
    for record in reader:
        if len(record) != len(header):
            continue
        try:
            values = [float(v) for v in record]
        except ValueError:
            continue
        labels.append(values[li])
        rows.append([v for i, v in enumerate(values) if i != li])
    if len(rows) < 5:
        raise ValueError(f"only {len(rows)} usable numeric rows; need at least 5")
    return Table(features, label, rows, labels)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-12:
            m[col][col] = 1e-12
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit(table: Table, rows: list[int]) -> dict[str, Any]:
    """Fit on the given row indexes: logistic regression for 0/1 labels, else least squares."""
    xs = [[1.0, *table.rows[i]] for i in rows]
    ys = [table.labels[i] for i in rows]
    binary = set(ys) <= {0.0, 1.0}
    k = len(xs[0])
    if binary:
        w = [0.0] * k
        means = [sum(x[j] for x in xs) / len(xs) for j in range(k)]
        scales = [
            max(1e-9, math.sqrt(sum((x[j] - means[j]) ** 2 for x in xs) / len(xs)))
            for j in range(k)
        ]
        means[0], scales[0] = 0.0, 1.0
        zs = [[(x[j] - means[j]) / scales[j] for j in range(k)] for x in xs]
        for _ in range(300):
            grad = [0.0] * k
            for z, y in zip(zs, ys, strict=True):
                p = _sigmoid(sum(wj * zj for wj, zj in zip(w, z, strict=True)))
                for j in range(k):
                    grad[j] += (p - y) * z[j]
            w = [wj - 0.5 * g / len(zs) for wj, g in zip(w, grad, strict=True)]
        weights = [w[j] / scales[j] for j in range(k)]
        weights[0] = w[0] - sum(w[j] * means[j] / scales[j] for j in range(1, k))
    else:
        xtx = [
            [sum(x[i] * x[j] for x in xs) + (1e-9 if i == j else 0.0) for j in range(k)]
            for i in range(k)
        ]
        xty = [sum(x[i] * y for x, y in zip(xs, ys, strict=True)) for i in range(k)]
        weights = _solve(xtx, xty)
    return {
        "format": "retrain-emulator-ilearner/1",
        "family": "binary" if binary else "regression",
        "features": table.features,
        "label": table.label,
        "weights": weights,
        "training_rows": len(rows),
    }


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, v))))


def predict(model: dict[str, Any], features: list[float]) -> float:
    """Score one row: a number (regression) or a probability of class 1 (binary)."""
    w = model["weights"]
    value = w[0] + sum(wi * xi for wi, xi in zip(w[1:], features, strict=True))
    return _sigmoid(value) if model["family"] == "binary" else value


def aligned(model: dict[str, Any], table: Table, row: list[float]) -> list[float]:
    """The row's values in the order of the model's features."""
    index = {name: i for i, name in enumerate(table.features)}
    return [row[index[name]] for name in model["features"]]


def evaluate(model: dict[str, Any], table: Table, rows: list[int]) -> dict[str, float]:
    """Evaluate Model metrics (classic names) of `model` on the given rows."""
    ys = [table.labels[i] for i in rows]
    ps = [predict(model, aligned(model, table, table.rows[i])) for i in rows]
    n = len(ys)
    if model["family"] == "regression":
        mean = sum(ys) / n
        abs_err = sum(abs(p - y) for p, y in zip(ps, ys, strict=True))
        sq_err = sum((p - y) ** 2 for p, y in zip(ps, ys, strict=True))
        abs_dev = sum(abs(y - mean) for y in ys) or 1e-12
        sq_dev = sum((y - mean) ** 2 for y in ys) or 1e-12
        return {
            "Mean Absolute Error": abs_err / n,
            "Root Mean Squared Error": math.sqrt(sq_err / n),
            "Relative Absolute Error": abs_err / abs_dev,
            "Relative Squared Error": sq_err / sq_dev,
            "Coefficient of Determination": 1 - sq_err / sq_dev,
        }
    predicted = [1.0 if p >= 0.5 else 0.0 for p in ps]
    tp = sum(1 for p, y in zip(predicted, ys, strict=True) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(predicted, ys, strict=True) if p == 1 and y == 0)
    fn = sum(1 for p, y in zip(predicted, ys, strict=True) if p == 0 and y == 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    eps = 1e-15
    log_loss = (
        -sum(
            y * math.log(max(p, eps)) + (1 - y) * math.log(max(1 - p, eps))
            for p, y in zip(ps, ys, strict=True)
        )
        / n
    )
    return {
        "Accuracy": sum(1 for p, y in zip(predicted, ys, strict=True) if p == y) / n,
        "Precision": precision,
        "Recall": recall,
        "F-Score": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "AUC": _auc(ps, ys),
        "Average Log Loss": log_loss,
    }


def _auc(scores: list[float], labels: list[float]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not pos or not neg:
        return 0.5
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def split(n: int) -> tuple[list[int], list[int]]:
    """Training and hold-out row indexes."""
    holdout = [i for i in range(n) if i % HOLDOUT_EVERY == 0]
    train = [i for i in range(n) if i % HOLDOUT_EVERY != 0]
    return train, holdout


def evaluation_csv(rows: list[dict[str, float]]) -> str:
    """Evaluate Model output: header of metric names, one row per scored model."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(list(rows[0]))
    for row in rows:
        writer.writerow([repr(float(row[name])) for name in rows[0]])
    return out.getvalue()
