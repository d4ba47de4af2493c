"""Linear operators over kernel matrices in memory (the store-backed ones are in ``kernelscale.gram.operators``).

Every operator has ``shape``, ``symmetric``/``psd`` tags, ``mm(X)`` on an (M, k) block (returns (N, k)
float64, products accumulated in float64 even when tiles are float32), ``mv(x)``, ``diag()`` (N,) float64,
``columns(idx)`` (N, len(idx)) float64 (what Nyström preconditioners read) and ``shift(reg)`` -> the
operator ``A + reg * I``. Operators know nothing about neural networks; they see matrices and stores.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from kernelscale.errors import InputError


class LinearOperator:
    """Base class: subclasses implement ``_mm`` (and ``diag``/``columns`` where they make sense)."""

    shape: tuple[int, int]
    symmetric: bool = False
    psd: bool = False

    def mm(self, x: np.ndarray) -> np.ndarray:
        """A @ X for X of shape (M, k) -> (N, k) float64."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[0] != self.shape[1]:
            raise ValueError(f"mm expects an ({self.shape[1]}, k) block, got shape {x.shape}")
        if x.shape[1] == 0:
            return np.zeros((self.shape[0], 0))
        return self._mm(np.ascontiguousarray(x))

    def mv(self, x: np.ndarray) -> np.ndarray:
        """A @ x for a vector x (M,) -> (N,) float64."""
        return self.mm(np.asarray(x, np.float64).reshape(-1, 1))[:, 0]

    def _mm(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def diag(self) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no diagonal")

    def columns(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """A[:, idx] as (N, len(idx)) float64, in the order given."""
        idx = np.asarray(idx, np.int64)
        e = np.zeros((self.shape[1], len(idx)))
        e[idx, np.arange(len(idx))] = 1.0
        return self.mm(e)

    def trace(self) -> float:
        return float(np.sum(self.diag()))

    def shift(self, reg: float) -> "ShiftedOperator":
        """The operator A + reg * I (square operators only)."""
        return ShiftedOperator(self, reg)

    def to_dense(self) -> np.ndarray:
        """The whole matrix in memory (float64; tests and small sizes only)."""
        return self.mm(np.eye(self.shape[1]))

    def close(self) -> None:
        """Release threads/actors held by the operator (idempotent)."""

    def __enter__(self) -> "LinearOperator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, symmetric={self.symmetric}, psd={self.psd})"


class ShiftedOperator(LinearOperator):
    """``base + reg * I``: PSD when the base is PSD and reg >= 0."""

    def __init__(self, base: LinearOperator, reg: float):
        if base.shape[0] != base.shape[1]:
            raise InputError(f"cannot add reg * I to a non-square operator of shape {base.shape}")
        if not math.isfinite(reg):
            raise InputError(f"reg must be finite, got {reg}")
        self.base = base
        self.reg = float(reg)
        self.shape = base.shape
        self.symmetric = base.symmetric
        self.psd = base.psd and self.reg >= 0

    def _mm(self, x: np.ndarray) -> np.ndarray:
        return self.base.mm(x) + self.reg * x

    def diag(self) -> np.ndarray:
        return self.base.diag() + self.reg

    def columns(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        out = self.base.columns(idx)
        out[idx, np.arange(len(idx))] += self.reg
        return out

    def close(self) -> None:
        self.base.close()


class DenseOperator(LinearOperator):
    """An in-memory numpy matrix. ``symmetric`` defaults to a check (to 1e-12 relative) of the matrix."""

    def __init__(self, matrix: np.ndarray, *, symmetric: bool | None = None, psd: bool = False):
        matrix = np.asarray(matrix)
        if matrix.ndim != 2:
            raise ValueError(f"DenseOperator needs a 2-D matrix, got shape {matrix.shape}")
        self.matrix = matrix
        # products accumulate in float64: a float32 matrix is promoted once here (2x its memory), not per product
        self._m64 = matrix if matrix.dtype == np.float64 else matrix.astype(np.float64)
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        if symmetric is None:
            symmetric = self.shape[0] == self.shape[1] and bool(
                np.abs(matrix - matrix.T).max(initial=0.0) <= 1e-12 * np.abs(matrix).max(initial=0.0))
        self.symmetric = symmetric
        self.psd = psd and symmetric

    def _mm(self, x: np.ndarray) -> np.ndarray:
        return self._m64 @ x

    def diag(self) -> np.ndarray:
        return np.diag(self._m64).copy()

    def columns(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.array(self._m64[:, np.asarray(idx, np.int64)], np.float64)

    def to_dense(self) -> np.ndarray:
        return self._m64


class PrincipalSubmatrix(LinearOperator):
    """The principal submatrix ``base[rows][:, rows]`` (n, n) of a square operator, read through ``base.columns``.

    ``diag`` is ``base.diag()[rows]``; ``columns(idx)`` reads the base columns ``rows[idx]`` (N, len(idx)) and
    keeps their ``rows``. Products read ``columns`` of all n rows (fine for the small views it is meant for).
    """

    def __init__(self, base: LinearOperator, rows: Sequence[int] | np.ndarray):
        if base.shape[0] != base.shape[1]:
            raise InputError(f"a principal submatrix needs a square operator, got shape {base.shape}")
        self.base = base
        self.rows = np.asarray(rows, np.int64)
        n = len(self.rows)
        self.shape = (n, n)
        self.symmetric = base.symmetric
        self.psd = base.psd

    def _mm(self, x: np.ndarray) -> np.ndarray:
        return self.columns(np.arange(self.shape[0])) @ x

    def diag(self) -> np.ndarray:
        return np.asarray(self.base.diag(), np.float64)[self.rows]

    def columns(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.asarray(self.base.columns(self.rows[np.asarray(idx, np.int64)])[self.rows], np.float64)

    def close(self) -> None:
        self.base.close()
