"""Regression targets from integer class labels (numpy only: importable without the store dependencies)."""

from __future__ import annotations

import numpy as np


def one_hot(labels: np.ndarray, num_classes: int, centred: bool = True) -> np.ndarray:
    """float32 targets (n, C) of integer ``labels`` (n,): one-hot, minus 1/C when ``centred``."""
    y = np.eye(num_classes, dtype=np.float32)[labels]
    return y - 1.0 / num_classes if centred else y
