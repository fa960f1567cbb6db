"""Synthetic training data with a known signal, for the demo and the tests."""

from __future__ import annotations

import random

FEATURES = ("rooms", "age", "distance")
LABEL = "price"


def housing_csv(rows: int, *, seed: int, noise: float = 1.0, delimiter: str = ",") -> str:
    """Rows of price = 30*rooms - 0.8*age - 4*distance + 50 + noise."""
    rng = random.Random(seed)
    lines = [delimiter.join((*FEATURES, LABEL))]
    for _ in range(rows):
        rooms, age, distance = rng.uniform(1, 8), rng.uniform(0, 80), rng.uniform(0, 30)
        price = 30 * rooms - 0.8 * age - 4 * distance + 50 + rng.gauss(0, noise)
        lines.append(delimiter.join(f"{v:.4f}" for v in (rooms, age, distance, price)))
    return "\n".join(lines) + "\n"
