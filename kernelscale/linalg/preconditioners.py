"""Preconditioners for K + reg * I: none, Jacobi, and Nyström of rank r (uniform or RPCholesky landmarks).

A preconditioner maps a residual block R (N, k) to Z = P^{-1} R (N, k), float64 (``apply``). It is the
symmetric positive definite operator P^{-1}: a ``LinearOperator`` (``mm``, ``mv``, ``diag``, ``columns``).
Nyström preconditioners read only the landmark columns of K through ``operator.columns`` (tile columns of a
Gram store).

Nyström with ``residual="diag"`` (default) preconditions with P = F F^T + diag(d) + reg * I, where
K ~ F F^T is the rank-r Nyström approximation and d >= 0 the diagonal it misses (the FITC / "Nyström plus
Jacobi" form), inverted with the Woodbury identity. ``residual="scalar"`` is the randomized Nyström
preconditioner of Frangella, Tropp & Udell (2023): P = F F^T + reg * I with the complement of span(F)
scaled by lambda_r + reg. Landmarks come uniformly at random or by block randomized pivoted Cholesky
(Chen, Epperly, Tropp & Webber 2023), which picks pivots with probability proportional to the diagonal
of the current residual K - F F^T.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import scipy.linalg

from kernelscale.errors import InputError
from kernelscale.linalg.operators import LinearOperator

log = logging.getLogger(__name__)

LANDMARKS = ("rpcholesky", "uniform")
RESIDUALS = ("diag", "scalar")
AUTO_RANK_MAX = 3000  # the automatic Nyström rank never exceeds this (F is N x rank float64: 2.2 GB at 90,000 rows)


def auto_rank(n: int) -> int:
    """The Nyström rank ``--precond nystrom`` uses for an N-row Gram: N/5, between 100 and 3,000 (and <= N).

    Measured on the fc NTK (docs/benchmarks.md, solver section): rank 2,000 at 10,000 rows is the fastest
    setting (30 iterations, 6.3 s against 385 iterations and 22 s for plain CG); rank 3,000 held 90,000 rows
    to 113 iterations.
    """
    return int(min(n, max(100, min(AUTO_RANK_MAX, n // 5))))


def precond_problem(text: str) -> str | None:
    """None for a preconditioner text :meth:`PreconditionerSpec.parse` reads, else what is wrong with it."""
    kind, _, arg = text.strip().partition(":")
    if kind in ("none", "jacobi"):
        return f"{kind} takes no argument (got {text!r})" if arg else None
    if kind != "nystrom":
        return f"must be none, jacobi, nystrom (automatic rank) or nystrom:RANK, got {text!r}"
    if arg in ("", "auto"):
        return None
    try:
        rank = int(arg)
    except ValueError:
        return f"nystrom:RANK needs an integer rank or auto, got {text!r}"
    return None if rank >= 1 else f"nystrom:RANK needs RANK >= 1, got {rank}"


@dataclass(frozen=True)
class PreconditionerSpec:
    """What ``--precond none|jacobi|nystrom[:RANK]`` asks for, with the Nyström options (rank 0: automatic)."""

    kind: str = "none"
    rank: int = 0
    landmarks: str = "rpcholesky"
    residual: str = "diag"
    seed: int = 0

    @classmethod
    def parse(cls, text: str, *, landmarks: str = "rpcholesky", residual: str = "diag", seed: int = 0) -> "PreconditionerSpec":
        """The spec of ``text`` (``none``, ``jacobi``, ``nystrom``, ``nystrom:auto`` or ``nystrom:RANK``)."""
        if landmarks not in LANDMARKS:
            raise InputError(f"landmarks must be one of {', '.join(LANDMARKS)}, got {landmarks!r}")
        if residual not in RESIDUALS:
            raise InputError(f"residual must be one of {', '.join(RESIDUALS)}, got {residual!r}")
        problem = precond_problem(text)
        if problem is not None:
            raise InputError(f"precond {problem}")
        kind, _, arg = text.strip().partition(":")
        return cls(kind, 0 if arg in ("", "auto") else int(arg), landmarks, residual, seed)

    def describe(self, n: int | None = None) -> str:
        """E.g. ``nystrom:2000 (rpcholesky landmarks, diag residual)``; the automatic rank is resolved for ``n`` rows."""
        if self.kind == "nystrom" and self.rank:
            return f"nystrom:{self.rank} ({self.landmarks} landmarks, {self.residual} residual)"
        if self.kind == "nystrom":
            rank = auto_rank(n) if n else "auto"
            return f"nystrom:{rank} (automatic rank, {self.landmarks} landmarks, {self.residual} residual)"
        return self.kind


class Preconditioner(LinearOperator):
    """Identity (no preconditioning) as the operator P^{-1} = I of ``n`` rows (None: any number of rows, then
    ``shape`` is (0, 0) and ``mm`` takes any block). Subclasses override ``apply`` and ``diag``."""

    name = "none"
    symmetric = True
    psd = True

    def __init__(self, n: int | None = None) -> None:
        self.n = n
        self.shape = (n, n) if n is not None else (0, 0)
        self.setup_seconds = 0.0
        self.info: dict[str, Any] = {}

    def apply(self, r: np.ndarray) -> np.ndarray:
        """P^{-1} R for R (N, k) -> (N, k) float64 (what CG calls; ``mm`` is the same with checked shapes)."""
        return np.array(r, np.float64, copy=True)

    def mm(self, x: np.ndarray) -> np.ndarray:
        if self.n is None:  # the identity of unknown size takes any block
            return self.apply(np.asarray(x, np.float64))
        return super().mm(x)

    def _mm(self, x: np.ndarray) -> np.ndarray:
        return self.apply(x)

    def diag(self) -> np.ndarray:
        """diag(P^{-1}) (N,) float64."""
        if self.n is None:
            raise ValueError("the identity preconditioner of unknown size has no diagonal; pass n")
        return np.ones(self.n)

    def columns(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        if self.n is None:
            raise ValueError("the identity preconditioner of unknown size has no columns; pass n")
        return super().columns(idx)


class JacobiPreconditioner(Preconditioner):
    """P = diag(K + reg * I). Needs a positive diagonal."""

    name = "jacobi"

    def __init__(self, diag: np.ndarray):
        super().__init__()
        diag = np.asarray(diag, np.float64)
        if not (np.isfinite(diag).all() and (diag > 0).all()):
            raise InputError("Jacobi preconditioning needs a positive, finite diagonal of K + reg*I; "
                             "use --precond none or a reg > 0")
        self.inv = 1.0 / diag
        self.n = len(diag)
        self.shape = (self.n, self.n)

    def apply(self, r: np.ndarray) -> np.ndarray:
        return np.asarray(r, np.float64) * self.inv[:, None]

    def diag(self) -> np.ndarray:
        return self.inv.copy()


@dataclass
class NystromFactor:
    """K ~ F F^T with F (N, r); ``pivots`` the landmark rows; ``residual_diag`` = diag(K - F F^T) >= 0."""

    factor: np.ndarray
    pivots: np.ndarray
    residual_diag: np.ndarray
    columns_read: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def _psd_factor(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """G H^{-1/2} on H's numerically positive eigenspace (robust to repeated/dependent pivots)."""
    h = 0.5 * (h + h.T)
    w, v = np.linalg.eigh(h)
    keep = w > max(w.max(initial=0.0), 0.0) * h.shape[0] * np.finfo(np.float64).eps * 10
    if not keep.any():
        return np.zeros((g.shape[0], 0))
    return (g @ v[:, keep]) / np.sqrt(w[keep])


def nystrom_uniform(kernel: LinearOperator, rank: int, seed: int = 0) -> NystromFactor:
    """Nyström from ``rank`` landmarks drawn uniformly without replacement."""
    n = kernel.shape[0]
    rank = min(rank, n)
    rng = np.random.default_rng(seed)
    pivots = np.sort(rng.choice(n, size=rank, replace=False))
    c = kernel.columns(pivots)
    f = _psd_factor(c, c[pivots])
    d = np.maximum(kernel.diag() - np.einsum("ij,ij->i", f, f), 0.0)
    return NystromFactor(f, pivots, d, rank)


def rpcholesky(kernel: LinearOperator, rank: int, seed: int | np.random.Generator = 0, block: int | None = None,
               progress: bool = False) -> NystromFactor:
    """Block randomized pivoted Cholesky: ``rank`` pivots sampled ∝ the residual diagonal, ``block`` at a time.

    Reads only the pivot columns (``kernel.columns``), one call per block; a smaller block adapts better,
    a larger one reads the store fewer times. ``progress`` shows a bar of landmark columns read. ``seed`` may
    be a Generator, which the draws then advance (one ``choice`` per block). Stops early, with fewer pivots,
    once the residual is numerically exhausted (trace below 1e-14 of the start, or a non-positive pivot block).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    n = kernel.shape[0]
    rank = min(rank, n)
    block = block or max(1, min(rank, -(-rank // 8)))
    rng = np.random.default_rng(seed)
    bar = tqdm(total=rank, desc="nystrom landmarks", unit="col", disable=not progress, leave=False)
    d = np.maximum(kernel.diag().astype(np.float64), 0.0)
    trace0 = float(d.sum())
    pivots: list[int] = []
    f = np.zeros((n, 0))
    while len(pivots) < rank:
        total = float(d.sum())
        if not total > trace0 * 1e-14:
            break
        b = min(block, rank - len(pivots), int(np.count_nonzero(d > 0)))
        if b <= 0:
            break
        s = rng.choice(n, size=b, replace=False, p=d / total)
        g = kernel.columns(s) - f @ f[s].T
        new = _psd_factor(g, g[s])
        if new.shape[1] == 0:
            break
        f = np.hstack([f, new]) if f.size else new
        pivots.extend(int(i) for i in s)
        d = np.maximum(d - np.einsum("ij,ij->i", new, new), 0.0)
        d[s] = 0.0
        bar.update(len(s))
    bar.close()
    return NystromFactor(f, np.asarray(pivots, np.int64), d, len(pivots),
                         {"residual_trace_fraction": float(d.sum() / trace0) if trace0 > 0 else 0.0})


class NystromPreconditioner(Preconditioner):
    """Nyström preconditioner of K + reg * I (see the module docstring for the two residual models)."""

    name = "nystrom"

    def __init__(self, nys: NystromFactor, reg: float, residual: str = "diag"):
        super().__init__()
        if residual not in RESIDUALS:
            raise InputError(f"Nyström residual must be one of {', '.join(RESIDUALS)}")
        self.residual = residual
        f = nys.factor
        self.rank = f.shape[1]
        self.n = f.shape[0]
        self.shape = (self.n, self.n)
        if residual == "diag":
            dvec = nys.residual_diag + reg
            if not (dvec > 0).all():
                # reg == 0 and an exactly captured row: fall back to a tiny positive floor
                floor = max(float(np.max(dvec, initial=0.0)) * 1e-12, np.finfo(np.float64).tiny)
                dvec = np.maximum(dvec, floor)
            self.dinv = 1.0 / dvec
            self.f = f
            m = np.eye(self.rank) + (f.T * self.dinv) @ f
            self.chol = scipy.linalg.cho_factor(m, lower=True)
        else:
            if reg <= 0:
                raise InputError("the scalar-residual Nyström preconditioner needs reg > 0; use --nystrom-residual diag")
            u, s, _ = np.linalg.svd(f, full_matrices=False) if self.rank else (np.zeros((f.shape[0], 0)), np.zeros(0), None)
            lam = s**2
            self.u = u
            self.reg = reg
            lam_r = float(lam[-1]) if len(lam) else 0.0
            # P^{-1} = (lam_r + reg) U (Lam + reg)^{-1} U^T + (I - U U^T) = I + U diag(scale) U^T
            self.scale = (lam_r + reg) / (lam + reg) - 1.0
        self.info = {"rank": self.rank, "residual": residual, "pivots": len(nys.pivots)} | nys.info

    def apply(self, r: np.ndarray) -> np.ndarray:
        r = np.asarray(r, np.float64)
        if self.residual == "diag":
            z = r * self.dinv[:, None]
            if self.rank:
                z -= (self.f @ scipy.linalg.cho_solve(self.chol, self.f.T @ z)) * self.dinv[:, None]
            return z
        if not self.rank:
            return r.copy()
        return r + self.u @ (self.scale[:, None] * (self.u.T @ r))

    def diag(self) -> np.ndarray:
        """diag(P^{-1}): D^{-1} - diag(D^{-1} F M^{-1} F^T D^{-1}) (Woodbury), or 1 + diag(U diag(scale) U^T)."""
        if self.residual == "diag":
            if not self.rank:
                return self.dinv.copy()
            w = scipy.linalg.solve_triangular(self.chol[0], self.f.T, lower=self.chol[1])  # L^{-1} F^T (r, N)
            return self.dinv - self.dinv**2 * np.einsum("ij,ij->j", w, w)
        return 1.0 + np.einsum("ij,j,ij->i", self.u, self.scale, self.u) if self.rank else np.ones(self.n)


def build_preconditioner(spec: PreconditionerSpec, kernel: LinearOperator, reg: float, *,
                         progress: bool = False) -> Preconditioner:
    """The preconditioner of ``kernel + reg * I`` that ``spec`` names (reads the diagonal / landmark columns).

    ``progress`` shows a bar while Nyström landmark columns are read (one pass over a Gram store per block).
    """
    t0 = time.perf_counter()
    if spec.kind == "none":
        pre: Preconditioner = Preconditioner(kernel.shape[0])
    elif spec.kind == "jacobi":
        pre = JacobiPreconditioner(kernel.diag() + reg)
    elif spec.kind == "nystrom":
        rank = spec.rank or auto_rank(kernel.shape[0])
        if spec.landmarks == "uniform":
            nys = nystrom_uniform(kernel, rank, spec.seed)
        else:
            nys = rpcholesky(kernel, rank, spec.seed, progress=progress)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                pre = NystromPreconditioner(nys, reg, spec.residual)
            pre.info["landmarks"] = spec.landmarks
        except (ValueError, np.linalg.LinAlgError) as exc:
            # e.g. reg 0 on a singular or indefinite Gram: the Woodbury factor is not finite. CG without a
            # preconditioner still reports how such a system ends (breakdown, max_iterations).
            log.warning("the Nyström preconditioner cannot be built (%s); solving without one", exc)
            pre = Preconditioner(kernel.shape[0])
            pre.info = {"fallback": f"nystrom failed: {exc}"}
    else:
        raise InputError(f"unknown preconditioner {spec.kind!r}")
    pre.setup_seconds = time.perf_counter() - t0
    log.info("preconditioner %s built in %.2f s", spec.describe(kernel.shape[0]), pre.setup_seconds)
    return pre
