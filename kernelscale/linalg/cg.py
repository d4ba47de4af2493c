"""Preconditioned conjugate gradients for many right-hand sides at once, as a plain loop (Falkon style).

Every column runs its own CG recurrence (vectorised: one ``A.mm`` per iteration serves all active
columns, so all classes share one pass over the Gram). Columns are independent, so duplicated or linearly
dependent right-hand sides cannot make the iteration singular (no NaN), unlike a textbook block CG.
Reductions (inner products, norms) are float64. A column stops when its relative residual
||b - A x|| / ||b|| <= tol, checked on the TRUE residual (a recurrence that claims convergence is verified
with one product; if the true residual is above tol the column restarts from it); converged columns are
frozen and no longer multiplied. The true residual also replaces the recurrence every
``true_residual_every`` iterations. The state after any iteration (x, r, p, rz, per-column status) can be
saved to an ``.npz`` checkpoint and a solve resumed from it gives the same iterates.

The solve is ``cg_init`` (the state before the first iteration, or a checkpoint's), ``cg_step`` (one
iteration: a new state, no I/O) until ``cg_done``, then ``cg_finish`` (true residuals); ``cg`` drives that
loop and calls its callbacks after every step (checkpoint writing is one of them).

Statuses: ``converged`` (every column), ``max_iterations``, ``breakdown`` (p^T A p <= 0 or r^T P^{-1} r
<= 0: indefinite/singular operator or preconditioner), ``non_finite`` (NaN/Inf from the operator).
A ``Solution`` that did not converge says what to change in ``fix``, naming the Python parameters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from kernelscale.config import at_least, option
from kernelscale.config import validate as validate_config
from kernelscale.errors import InputError
from kernelscale.linalg.operators import LinearOperator
from kernelscale.linalg.preconditioners import Preconditioner

log = logging.getLogger(__name__)

ACTIVE, CONVERGED, BREAKDOWN, NON_FINITE = 0, 1, 2, 3
STATUS_NAMES = {ACTIVE: "max_iterations", CONVERGED: "converged", BREAKDOWN: "breakdown", NON_FINITE: "non_finite"}


def tol_problem(tol: float) -> str | None:
    """None for a tolerance in (0, 1), else what is wrong with it ("must be in (0, 1) ..., got 0")."""
    return None if 0 < tol < 1 else f"must be in (0, 1) (a relative residual), got {tol}"


@dataclass
class CGOptions:
    """Solver options.

    tol: per-column relative residual ||b - A x|| / ||b||.
    max_iter: iterations (operator products) at most, counted over the whole solve incl. resumes.
    true_residual_every: recompute r = b - A x every k iterations, 0 never.
    checkpoint_path: ``.npz`` file the state is written to; None: no checkpoints.
    checkpoint_every: iterations between checkpoints.
    """

    tol: float = option(None, 1e-6, check=tol_problem)
    max_iter: int = option(None, 1000, check=at_least(0))
    true_residual_every: int = option(None, 50, check=at_least(0))
    checkpoint_path: str | None = option(None, None)
    checkpoint_every: int = option(None, 10, check=at_least(1))

    def validate(self) -> None:
        """Refuse options no solve can run with (:class:`InputError` naming the Python parameter)."""
        validate_config(self)


@dataclass
class Solution:
    """Result of a solve: ``x`` (N, k) float64 and how it ended.

    ``status``: converged, max_iterations, breakdown or non_finite. ``message``: what happened and what to
    change, naming the Python parameters (API_NAMES); ``fix``: just what to change ("" when converged);
    ``in_words(names)``: the message in another vocabulary (a command line renders its flags this way).
    """

    x: np.ndarray
    status: str
    message: str
    iterations: int
    rel_residual: np.ndarray  # (k,) true relative residuals at the end
    history: list[float] = field(default_factory=list)  # max relative residual (recurrence) per iteration
    seconds: float = 0.0
    column_status: list[str] = field(default_factory=list)
    products: int = 0  # operator products (mm calls), incl. true-residual checks
    operator_seconds: float = 0.0
    fix: str = ""  # what to change when not converged, naming the Python parameters (max_iter, reg, ...)
    template: str = field(default="", repr=False)  # the message with parameter names as {fields} (see in_words)

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    def in_words(self, names: Mapping[str, str]) -> str:
        """The message with the parameters named by ``names`` (e.g. ``API_NAMES`` or a command line's flags)."""
        return self.template.format_map(names) if self.template else self.message

    @property
    def max_rel_residual(self) -> float:
        return float(np.max(self.rel_residual)) if self.rel_residual.size else 0.0

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "iterations": self.iterations, "rel_residual": self.max_rel_residual,
                "seconds": round(self.seconds, 3), "message": self.message, "products": self.products}


class CheckpointWriteError(OSError):
    """A solver checkpoint could not be written (the OSError is its ``__cause__``); the previous one is kept."""

    def __init__(self, path: str, iteration: int) -> None:
        super().__init__(f"{path}: writing the solver checkpoint at iteration {iteration} failed")
        self.path, self.iteration = path, iteration


@dataclass
class CGState:
    """Everything the recurrences need to continue; saved to / loaded from a checkpoint."""

    x: np.ndarray
    r: np.ndarray
    p: np.ndarray
    rz: np.ndarray
    col: np.ndarray  # per-column status code
    true_rel: np.ndarray  # last verified true relative residual per column (NaN: not yet)
    iteration: int
    history: list[float]
    rhs_digest: str

    def save(self, path: str) -> None:
        """Write atomically (tmp file + rename): a kill mid-write leaves the previous checkpoint intact."""
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        try:
            np.savez(tmp, x=self.x, r=self.r, p=self.p, rz=self.rz, col=self.col, true_rel=self.true_rel,
                     iteration=np.int64(self.iteration), history=np.asarray(self.history, np.float64),
                     rhs_digest=np.str_(self.rhs_digest))
            os.replace(tmp, path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.remove(tmp)  # our own partial file: a rerun must not meet it
            raise CheckpointWriteError(path, self.iteration) from exc

    @classmethod
    def load(cls, path: str) -> "CGState":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["x"], z["r"], z["p"], z["rz"], z["col"], z["true_rel"], int(z["iteration"]),
                           [float(h) for h in z["history"]], str(z["rhs_digest"]))
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: not a readable solver checkpoint ({exc}); start without --resume") from exc


def rhs_digest(b: np.ndarray, extra: str = "") -> str:
    """Identity of a problem for checkpoints: sha256 of the right-hand sides and ``extra`` (operator id)."""
    h = hashlib.sha256(np.ascontiguousarray(b, np.float64).tobytes())
    h.update(extra.encode())
    return h.hexdigest()


def cg_init(
    a: LinearOperator,
    b: np.ndarray,
    precond: Preconditioner | None = None,
    *,
    resume_from: str | None = None,
    problem_id: str = "",
) -> CGState:
    """The state before the first iteration of solving A X = B (``b`` (N, k) float64), or the state saved in
    the checkpoint ``resume_from`` when it exists (it must have been written for the same B and ``problem_id``).
    """
    precond = precond or Preconditioner()
    digest = rhs_digest(b, problem_id)
    if resume_from and os.path.exists(resume_from):
        st = CGState.load(resume_from)
        if st.rhs_digest != digest or st.x.shape != b.shape:
            raise InputError(f"{resume_from} was written for another problem (different Gram, data, reg or "
                             "preconditioner); delete it or start without --resume")
        log.info("resuming from %s at iteration %d", resume_from, st.iteration)
        return st
    if resume_from:
        log.warning("no checkpoint at %s yet; starting from zero", resume_from)
    bnorm = np.linalg.norm(b, axis=0)
    x = np.zeros_like(b)
    r = b.copy()
    col = np.where(bnorm > 0, ACTIVE, CONVERGED).astype(np.int8)
    true_rel = np.where(bnorm > 0, np.nan, 0.0)
    z = precond.apply(r)
    rz = np.einsum("ij,ij->j", r, z)
    st = CGState(x, r, z, rz, col, true_rel, 0, [], digest)
    _check_rz(st, np.flatnonzero(col == ACTIVE))
    return st


def cg_done(state: CGState, options: CGOptions) -> bool:
    """Whether the loop stops: ``max_iter`` reached or no active column left."""
    return state.iteration >= options.max_iter or not (state.col == ACTIVE).any()


def cg_step(a: LinearOperator, b: np.ndarray, precond: Preconditioner | None, state: CGState,
            options: CGOptions) -> CGState:
    """One PCG iteration of every active column of A X = B (``b`` (N, k) float64): a new state, ``state`` is
    left as it was. One product with A, plus one per true-residual check; no I/O, logging or checkpointing."""
    precond = precond or Preconditioner()
    st = replace(state, x=state.x.copy(), r=state.r.copy(), p=state.p.copy(), rz=state.rz.copy(),
                 col=state.col.copy(), true_rel=state.true_rel.copy(), history=list(state.history))
    bnorm = np.linalg.norm(b, axis=0)
    safe_bnorm = np.where(bnorm > 0, bnorm, 1.0)
    idx = np.flatnonzero(st.col == ACTIVE)
    p = st.p[:, idx]
    ap = a.mm(p)
    pap = np.einsum("ij,ij->j", p, ap)
    bad_nf = ~np.isfinite(pap) | ~np.isfinite(ap).all(axis=0)
    bad_bd = ~bad_nf & ~(pap > 0)
    st.col[idx[bad_nf]] = NON_FINITE
    st.col[idx[bad_bd]] = BREAKDOWN
    good = ~(bad_nf | bad_bd)
    gi = idx[good]
    alpha = st.rz[gi] / pap[good]
    st.x[:, gi] += p[:, good] * alpha
    st.r[:, gi] -= ap[:, good] * alpha
    st.iteration += 1
    if options.true_residual_every and st.iteration % options.true_residual_every == 0 and len(gi):
        st.r[:, gi] = b[:, gi] - a.mm(st.x[:, gi])
    rel = np.linalg.norm(st.r[:, gi], axis=0) / safe_bnorm[gi]
    claim = gi[rel <= options.tol]
    if len(claim):  # verify on the true residual before freezing
        true_r = b[:, claim] - a.mm(st.x[:, claim])
        st.r[:, claim] = true_r
        true_rel = np.linalg.norm(true_r, axis=0) / safe_bnorm[claim]
        st.true_rel[claim] = true_rel
        st.col[claim[true_rel <= options.tol]] = CONVERGED
    cont = np.flatnonzero(st.col == ACTIVE)
    if len(cont):
        z = precond.apply(st.r[:, cont])
        rz_new = np.einsum("ij,ij->j", st.r[:, cont], z)
        restarted = np.isin(cont, claim)  # true residual replaced the recurrence: restart direction
        beta = np.where(restarted, 0.0, rz_new / np.where(st.rz[cont] != 0, st.rz[cont], 1.0))
        st.p[:, cont] = z + st.p[:, cont] * beta
        st.rz[cont] = rz_new
        _check_rz(st, cont)
    cur = np.linalg.norm(st.r, axis=0) / safe_bnorm
    st.history.append(float(np.max(cur[np.isfinite(cur)], initial=0.0)))
    return st


def cg_finish(a: LinearOperator, b: np.ndarray, state: CGState, options: CGOptions) -> CGState:
    """The state with a true relative residual for every column not verified yet (one product with A); a
    column whose true residual is within ``tol`` counts as converged. A new state, ``state`` is left as it was."""
    st = replace(state, col=state.col.copy(), true_rel=state.true_rel.copy())
    bnorm = np.linalg.norm(b, axis=0)
    safe_bnorm = np.where(bnorm > 0, bnorm, 1.0)
    todo = np.flatnonzero((st.col != CONVERGED) | np.isnan(st.true_rel))
    todo = todo[bnorm[todo] > 0]
    if len(todo):
        res = b[:, todo] - a.mm(st.x[:, todo])
        st.true_rel[todo] = np.linalg.norm(res, axis=0) / safe_bnorm[todo]
        late = todo[np.isin(st.col[todo], (ACTIVE, BREAKDOWN)) & (st.true_rel[todo] <= options.tol)]
        st.col[late] = CONVERGED
    return st


def checkpoint_callback(options: CGOptions) -> Callable[[CGState], None] | None:
    """The callback that saves the state every ``options.checkpoint_every`` iterations to
    ``options.checkpoint_path`` (None: checkpoints are off)."""
    path, every = options.checkpoint_path, options.checkpoint_every
    if not path:
        return None

    def save(state: CGState) -> None:
        if state.iteration % every == 0:
            state.save(path)

    return save


def progress_callback(callback: Callable[[dict[str, Any]], Any], columns: int) -> Callable[[CGState], None]:
    """Adapts ``cg``'s ``callback(info)`` (iteration, max_rel_residual, active, columns) to a state callback."""

    def report(state: CGState) -> None:
        callback({"iteration": state.iteration, "max_rel_residual": state.history[-1],
                  "active": int(np.count_nonzero(state.col == ACTIVE)), "columns": columns})

    return report


class _CountedOperator(LinearOperator):
    """``a`` with a count of its products and the seconds spent in them (for ``Solution``)."""

    def __init__(self, a: LinearOperator):
        self.a = a
        self.shape, self.symmetric, self.psd = a.shape, a.symmetric, a.psd
        self.products = 0
        self.seconds = 0.0

    def mm(self, x: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = self.a.mm(x)
        self.seconds += time.perf_counter() - t
        self.products += 1
        return out


def cg(
    a: LinearOperator,
    b: np.ndarray,
    precond: Preconditioner | None = None,
    options: CGOptions | None = None,
    *,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    resume_from: str | None = None,
    problem_id: str = "",
) -> Solution:
    """Solve A X = B column by column (shared products) by preconditioned CG: ``cg_init``, then ``cg_step``
    until ``cg_done`` with the callbacks after every step, then ``cg_finish``.

    ``a`` must be symmetric (PSD for convergence; breakdown is reported otherwise). ``b`` (N,) or (N, k).
    ``callback(info)`` is called after every iteration with iteration, max_rel_residual, active columns;
    raising from it stops the solve (the last checkpoint stays). ``resume_from`` continues from a checkpoint
    written for the same B and ``problem_id``.
    """
    options = options or CGOptions()
    options.validate()
    if a.shape[0] != a.shape[1] or not a.symmetric:
        raise InputError(f"CG needs a square symmetric operator, got {a!r}")
    vector = np.ndim(b) == 1
    b = np.asarray(b, np.float64).reshape(a.shape[0], -1)
    if not np.isfinite(b).all():
        raise InputError("right-hand sides contain NaN/Inf")
    precond = precond or Preconditioner()
    t0 = time.perf_counter()
    counted = _CountedOperator(a)
    st = cg_init(counted, b, precond, resume_from=resume_from, problem_id=problem_id)
    callbacks = [cb for cb in (checkpoint_callback(options),
                               progress_callback(callback, b.shape[1]) if callback is not None else None) if cb]
    while not cg_done(st, options):
        st = cg_step(counted, b, precond, st, options)
        for cb in callbacks:
            cb(st)
    st = cg_finish(counted, b, st, options)
    if options.checkpoint_path:
        st.save(options.checkpoint_path)
    st.col[~np.isfinite(st.x).all(axis=0)] = NON_FINITE
    status, message, fix, template = _verdict(st, options)
    x = st.x[:, 0] if vector else st.x
    sol = Solution(x, status, message, st.iteration, st.true_rel.copy(), list(st.history),
                   time.perf_counter() - t0, [STATUS_NAMES[int(c)] for c in st.col], counted.products,
                   counted.seconds, fix, template)
    log.info("CG %s after %d iterations, max rel residual %.3g, %.2f s", status, sol.iterations,
             sol.max_rel_residual, sol.seconds)
    return sol


def _check_rz(st: CGState, cols: np.ndarray) -> None:
    """r^T P^{-1} r must be positive for an active column: else the preconditioner is not PD (or NaN)."""
    rz = st.rz[cols]
    st.col[cols[~np.isfinite(rz)]] = NON_FINITE
    st.col[cols[np.isfinite(rz) & ~(rz > 0)]] = BREAKDOWN


#: How a message names the parameters it advises changing: the keyword arguments of
#: ``cg``/``CGOptions``/``PreconditionerSpec``/``cholesky_solve``. A command line passes its own names, with these
#: keys, to ``Solution.in_words``.
API_NAMES = {
    "max_iter": "max_iter", "tol": "tol", "checkpoint": "checkpoint_path", "resume": "resume_from",
    "reg": "reg", "reg_trace": "reg = 1e-6 * trace(K) / N", "nystrom_1000": "PreconditionerSpec('nystrom', 1000)",
    "cholesky": "cholesky_solve", "verify_store": "the operator's values", "check_values": "check K for NaN/Inf",
}

def _verdict(st: CGState, options: CGOptions) -> tuple[str, str, str, str]:
    """(status, message, fix-it, message template) of a finished solve; message and fix-it in API_NAMES words."""
    status, what, fix = _advice(st, options)
    return status, (what + fix).format_map(API_NAMES), fix.format_map(API_NAMES).strip(), what + fix


def _advice(st: CGState, options: CGOptions) -> tuple[str, str, str]:
    """(status, what happened, what to change) with parameter names as ``{name}`` fields (keys of API_NAMES)."""
    worst = float(np.nanmax(st.true_rel)) if np.isfinite(st.true_rel).any() else float("nan")
    if (st.col == CONVERGED).all():
        return "converged", f"all {len(st.col)} columns reached relative residual <= {options.tol:g}", ""
    if (st.col == NON_FINITE).any():
        cols = np.flatnonzero(st.col == NON_FINITE).tolist()
        return "non_finite", (
            f"non-finite values in columns {cols[:10]} by iteration {st.iteration}: the operator produced NaN/Inf."
        ), " Check {verify_store} and the inputs for NaN/Inf rows; the solution is not usable."
    if (st.col == BREAKDOWN).any():
        cols = np.flatnonzero(st.col == BREAKDOWN).tolist()
        return "breakdown", (
            f"CG broke down in columns {cols[:10]} by iteration {st.iteration} (p^T A p <= 0 or r^T P^-1 r <= 0): "
            f"the operator is indefinite or singular (max relative residual {worst:.3g})."
        ), (" Use {reg} > 0 (e.g. {reg_trace}), check the Gram is a valid kernel, or try {cholesky} "
            "to see whether K + reg*I is positive definite.")
    return "max_iterations", (
        f"not converged: {st.iteration} iterations reached {{max_iter}} {options.max_iter} with max relative "
        f"residual {worst:.3g} > {{tol}} {options.tol:g}."
    ), (" Try a stronger preconditioner ({nystrom_1000} or more), more iterations ({max_iter}; add "
        "{checkpoint}/{resume} to continue this run), a larger {reg}, or {cholesky} if N fits in memory.")
