"""Direct float64 Cholesky solve of (K + reg * I) X = B for sizes that fit in memory (the cross-check path)."""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.linalg

from kernelscale.linalg.cg import API_NAMES, Solution

log = logging.getLogger(__name__)


#: largest true relative residual a direct solve reports as converged (a backward-stable factor of a
#: well-posed system leaves ~1e-12; a singular one leaves residuals of order 1 or more)
DIRECT_RESIDUAL_MAX = 1e-4


def _literal(text: str) -> str:
    """``text`` as literal text inside a message template (whose ``{name}`` fields are parameter names)."""
    return text.replace("{", "{{").replace("}", "}}")


def cholesky_solve(k: np.ndarray, b: np.ndarray, reg: float = 0.0) -> Solution:
    """Solve (K + reg I) X = B in float64. K (N, N) symmetric, B (N,) or (N, k).

    Returns a :class:`Solution` with status ``converged`` (true relative residuals reported), or
    ``breakdown`` with a zero solution when K + reg I is not numerically positive definite.
    Memory: one float64 copy of K (the factor) on top of K.
    """
    t0 = time.perf_counter()
    vector = np.ndim(b) == 1
    b2 = np.asarray(b, np.float64).reshape(k.shape[0], -1)
    a = np.array(k, np.float64, copy=True)
    a[np.diag_indices_from(a)] += reg
    try:
        factor = scipy.linalg.cho_factor(a, lower=True, overwrite_a=True, check_finite=True)
        x = scipy.linalg.cho_solve(factor, b2)
        status, template, fix = "converged", "direct float64 Cholesky solve", ""
    except (np.linalg.LinAlgError, ValueError) as exc:
        x = np.zeros_like(b2)
        status = "breakdown" if isinstance(exc, np.linalg.LinAlgError) else "non_finite"
        template = _literal(f"Cholesky failed ({exc}): K + reg*I is not positive definite (or holds NaN/Inf). ") + (
            "Use a larger {reg}, or {check_values}.")
        fix = "use a larger reg, or check K for NaN/Inf"
    del a
    if status == "converged":
        bn = np.linalg.norm(b2, axis=0)
        res = b2 - (k @ x + reg * x)  # float32 K is promoted to float64
        rel = np.linalg.norm(res, axis=0) / np.where(bn > 0, bn, 1.0)
        if not np.all(rel <= DIRECT_RESIDUAL_MAX):  # a factor of a numerically singular K: no solution
            status = "breakdown"
            template = (f"Cholesky factored K + reg*I but the true relative residual is {float(np.max(rel)):.2e} "
                        f"(> {DIRECT_RESIDUAL_MAX:g}): the matrix is numerically singular (duplicate inputs?). "
                        "Use a larger {reg}.")
            fix = "use a larger reg"
    else:
        rel = np.full(b2.shape[1], np.inf)
    sol = Solution(x[:, 0] if vector else x, status, template.format_map(API_NAMES), 0, np.asarray(rel, np.float64),
                   seconds=time.perf_counter() - t0, fix=fix, template=template)
    log.info("Cholesky %s in %.2f s", status, sol.seconds)
    return sol
