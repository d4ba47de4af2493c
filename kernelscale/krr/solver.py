"""Kernel ridge solves on a stored train Gram: the checks, the solve (Cholesky or block PCG), the model.

The targets Y are the one-hot labels minus 1/C (``DatasetStore.one_hot``); the system is (K + r I) alpha = Y
with r = reg * trace(K) / N (``reg_scale="trace"``, neural-tangents' convention) or r = reg (``"absolute"``).
:func:`solve` is :func:`check_solve` (everything refusable, before any expensive work), :func:`run_solver`
and :func:`finish_solve` (the result, and the model store when the solve converged). Only converged solves
write a model; a solve that stops early writes nothing (its checkpoint, if asked for, lets ``--resume``
continue).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from kernelscale import storage
from kernelscale.config import build as config_build
from kernelscale.config import validate as config_validate
from kernelscale.data import DatasetStore, available_memory, open_dataset
from kernelscale.errors import InputError, StoreError
from kernelscale.gram.operators import RayGramOperator, ZarrGramOperator
from kernelscale.gram.store import GramStore, open_gram
from kernelscale.krr.config import OPERATORS, REG_SCALES, SOLVE_FLAG_NAMES, SolveConfig
from kernelscale.krr.model import write_model
from kernelscale.krr.results import SolveResult
from kernelscale.linalg import (
    CGOptions,
    CheckpointWriteError,
    DenseOperator,
    LinearOperator,
    PreconditionerSpec,
    Solution,
    build_preconditioner,
    cg,
    cholesky_solve,
)
from kernelscale.linalg.ridge import ridge

log = logging.getLogger(__name__)


# -- checks (all before any expensive work) ------------------------------------------------------------------


def check_reg(reg: float, reg_scale: str) -> None:
    if reg_scale not in REG_SCALES:
        raise InputError(f"--reg-scale must be one of {', '.join(REG_SCALES)}, got {reg_scale!r}")
    if not np.isfinite(reg) or reg < 0:
        raise InputError(f"--reg must be a finite number >= 0, got {reg}")


def effective_reg(reg: float, reg_scale: str, trace: float, n: int) -> float:
    """The value added to the diagonal: reg * trace / n (``trace``) or reg (``absolute``), see
    :func:`kernelscale.linalg.ridge.ridge`."""
    return float(ridge(reg, trace, n, reg_scale))


def check_gram_for_data(store: GramStore, data: DatasetStore) -> None:
    """Refuse a Gram that is not the symmetric, complete train Gram of ``data``."""
    attrs = store.attrs
    n, m = store.shape
    if n != m:
        raise StoreError(f"{store.path} is a rectangular ({n} x {m}) cross Gram; `solve` needs the square train "
                         f"Gram of {data.path} (`kernelscale gram {data.path} --out GRAM.zarr`)")
    if attrs.get("data_fingerprint") != data.fingerprint:
        raise StoreError(f"{store.path} was built on other data (its data_fingerprint {attrs.get('data_fingerprint')} "
                         f"!= {data.path}'s {data.fingerprint}); compute the Gram of this dataset")
    against = attrs.get("against_fingerprint")
    if against not in (None, data.fingerprint):
        raise StoreError(f"{store.path} is a cross Gram against other data ({against}); `solve` needs K(train, train)")
    if n != data.n:
        raise StoreError(f"{store.path} has {n} rows but {data.path} has {data.n}")
    if not store.symmetric:
        _check_numerically_symmetric(store)
    missing = store.missing_tiles()
    if missing:
        raise StoreError(f"{store.path} is incomplete: {len(missing)} of {len(store.grid)} tiles missing (e.g. "
                         f"{missing[:3]}); rerun `kernelscale gram` to finish it (it resumes)")


def _check_numerically_symmetric(store: GramStore) -> None:
    """A square store saved in full: compare a few mirrored tile pairs (and the diagonal tiles)."""
    rows = store.grid.shape[0]
    pairs = [(i, i) for i in range(min(rows, 3))] + [(0, j) for j in range(1, min(rows, 4))]
    for i, j in pairs:
        a, b = store.read_tile(i, j), store.read_tile(j, i)
        if not np.allclose(a, b.T, rtol=1e-5, atol=1e-6 * float(np.abs(a).max(initial=1.0))):
            raise StoreError(f"{store.path} is not symmetric (tile ({i}, {j}) != tile ({j}, {i})^T); "
                             "a kernel ridge solve needs a symmetric Gram")


def open_operator(store: GramStore, kind: str = "zarr", *, workers: int | None = None,
                  ray_address: str | None = None) -> LinearOperator:
    """The Gram as an operator: streamed from its store, loaded in memory, or spread over Ray actors."""
    if kind == "zarr":
        return ZarrGramOperator(store, prefetch=2)
    if kind == "memory":
        return DenseOperator(store.to_numpy(), symmetric=store.symmetric or None, psd=True)
    if kind == "ray":
        return RayGramOperator(store, workers=workers, address=ray_address)
    raise InputError(f"--operator must be one of {', '.join(OPERATORS)}, got {kind!r}")


def _check_out(out: str) -> None:
    """--out may be new or a kernelscale model store (replaced); anything else is refused."""
    if storage.exists(out) and storage.store_kind(out) != "model":
        raise InputError(f"--out {out} exists and is not a kernelscale model store; kernelscale replaces only its "
                         "own model stores: choose another path")


def check_checkpoint_path(checkpoint: str | None, resume: bool, overwrite: bool, stores: list[tuple[str, str]]) -> None:
    """A solver checkpoint file never replaces a file of the user's: an existing one is continued (``--resume``)
    or replaced only with ``--overwrite``, and it may not lie in or hold a store."""
    if not checkpoint:
        return
    if storage.is_url(checkpoint):
        raise InputError(f"--checkpoint {checkpoint}: the solver checkpoint is a local file; give a local path")
    for flag, path in stores:
        storage.check_disjoint(checkpoint, [(flag, path)], "--checkpoint")
    if os.path.isdir(checkpoint) or os.path.islink(checkpoint):
        raise InputError(f"--checkpoint {checkpoint} is a folder or a link; give the path of a .npz file")
    if os.path.exists(checkpoint) and not (resume or overwrite):
        raise InputError(f"--checkpoint {checkpoint} already exists; pass --resume to continue from it, or "
                         "--overwrite to replace it")


# -- solve --------------------------------------------------------------------------------------------------


def solve(gram: str | None = None, data: str | None = None, config: SolveConfig | None = None, *,
          callback: Callable[[dict[str, Any]], Any] | None = None, **overrides: Any) -> SolveResult:
    """Solve (K + r I) alpha = Y for a stored train Gram and write MODEL.zarr if it converges.

    Settings: a :class:`SolveConfig`, or its fields as keyword arguments (``reg`` and ``out`` are required),
    or both (the keywords replace the config's). ``callback(info)`` is called after each CG iteration.
    Returns a :class:`SolveResult`; a solve that stops without converging writes no model and says so in its
    ``status`` (``result.raise_for_status()`` turns that into :class:`NotConvergedError`).
    """
    paths = {k: v for k, v in (("gram", gram), ("data", data)) if v is not None}
    cfg = config_build(SolveConfig, config, paths | overrides)
    t0 = time.perf_counter()
    checked = check_solve(cfg)
    sol, details = run_solver(cfg, checked, callback)
    return finish_solve(cfg, checked, sol, details, seconds=time.perf_counter() - t0)


@dataclass(frozen=True, eq=False)
class CheckedSolve:
    """What :func:`check_solve` opened and derived: the stores, the targets Y (N, C) float64 and the ridge."""

    data: DatasetStore
    store: GramStore
    pspec: PreconditionerSpec
    options: CGOptions
    y: np.ndarray
    reg_effective: float


def check_solve(cfg: SolveConfig) -> CheckedSolve:
    """Validate ``cfg`` and the stores it names, before any expensive work; returns them opened."""
    config_validate(cfg)
    pspec = PreconditionerSpec.parse(cfg.precond, landmarks=cfg.landmarks, residual=cfg.nystrom_residual, seed=cfg.seed)
    options = CGOptions(tol=cfg.tol, max_iter=cfg.max_iter, true_residual_every=cfg.true_residual_every,
                        checkpoint_path=cfg.checkpoint, checkpoint_every=cfg.checkpoint_every)
    options.validate()
    if cfg.resume and not cfg.checkpoint:
        raise InputError("--resume needs --checkpoint PATH (the file a previous solve wrote)")
    storage.check_disjoint(cfg.out, [("GRAM", cfg.gram), ("--data", cfg.data)], "--out")
    check_checkpoint_path(cfg.checkpoint, cfg.resume, cfg.overwrite,
                          [("GRAM", cfg.gram), ("--data", cfg.data), ("--out", cfg.out)])
    ds = open_dataset(cfg.data)
    store = open_gram(cfg.gram)
    check_gram_for_data(store, ds)
    ds.check_content()  # rows/labels edited behind the fingerprint's back are refused (sampled chunks)
    _check_out(cfg.out)
    if cfg.solver == "cholesky" or cfg.operator == "memory":  # the whole Gram in memory (Cholesky: twice, float64)
        need = ds.n * ds.n * 8 * (2 if cfg.solver == "cholesky" else 1)
        if need > available_memory():
            raise InputError(f"{'--solver cholesky' if cfg.solver == 'cholesky' else '--operator memory'} needs "
                             f"{need / 2**30:.1f} GiB for the {ds.n} x {ds.n} Gram, more than the "
                             f"{available_memory() / 2**30:.1f} GiB available; use --solver cg --operator zarr")
    y = ds.one_hot(centred=True).astype(np.float64)
    diag = np.asarray(store.diag(), np.float64)
    reg_eff = effective_reg(cfg.reg, cfg.reg_scale, float(diag.sum()), ds.n)
    return CheckedSolve(ds, store, pspec, options, y, reg_eff)


def run_solver(cfg: SolveConfig, checked: CheckedSolve, callback: Callable[[dict[str, Any]], Any] | None = None
               ) -> tuple[Solution, dict[str, Any]]:
    """The solve itself (Cholesky, or block PCG over the chosen operator); returns the solution and the solver's
    details for the summary (precond, and for PCG the operator and its timings)."""
    store, ds, reg_eff = checked.store, checked.data, checked.reg_effective
    if cfg.solver == "cholesky":
        k = store.to_numpy()
        sol = cholesky_solve(k, checked.y, reg_eff)
        del k
        return sol, {"precond": "n/a"}
    op = open_operator(store, cfg.operator, workers=cfg.workers)
    try:
        pre = build_preconditioner(checked.pspec, op, reg_eff, progress=cfg.progress)
        bar = tqdm(total=cfg.max_iter, desc="cg", unit="it", disable=not cfg.progress)

        def _cb(info: dict[str, Any]) -> None:
            bar.update(1)
            bar.set_postfix(res=f"{info['max_rel_residual']:.2e}", active=info["active"])
            if callback is not None:
                callback(info)

        problem_id = f"{store.fingerprint}|{ds.fingerprint}|{reg_eff!r}|{checked.pspec!r}"
        try:
            sol = cg(op.shift(reg_eff), checked.y, pre, checked.options, callback=_cb,
                     resume_from=cfg.checkpoint if cfg.resume else None, problem_id=problem_id)
        except CheckpointWriteError as exc:
            if storage.is_disk_full(exc):
                raise storage.disk_full_error(exc.path, f"writing the solver checkpoint at iteration "
                                                        f"{exc.iteration} (the previous checkpoint is kept)") from None
            raise
        finally:
            bar.close()
    finally:
        op.close()
    used = checked.pspec.describe(ds.n) if "fallback" not in pre.info else f"none ({pre.info['fallback']})"
    return sol, {"precond": used, "operator": cfg.operator, "precond_seconds": round(pre.setup_seconds, 3),
                 "products": sol.products, "operator_seconds": round(sol.operator_seconds, 3),
                 "seconds_per_iteration": round(sol.operator_seconds / max(sol.products, 1), 4)}


def finish_solve(cfg: SolveConfig, checked: CheckedSolve, sol: Solution, details: dict[str, Any], *,
                 seconds: float) -> SolveResult:
    """The result, and the model store when the solve converged (else none, and the message says so)."""
    ds = checked.data
    message = sol.in_words(SOLVE_FLAG_NAMES)  # what `kernelscale solve` prints: its flags
    result = SolveResult(status=sol.status, iterations=sol.iterations, rel_residual=sol.max_rel_residual,
                         seconds=round(seconds, 3), message=message, solver=cfg.solver, n=ds.n,
                         classes=ds.num_classes, reg=cfg.reg, reg_scale=cfg.reg_scale,
                         reg_effective=checked.reg_effective, **details)
    if not sol.converged:
        log.error("solve did not converge: %s", message)
        return dataclasses.replace(result, message=message + " No model was written.")
    write_model(cfg.out, sol.x, store=checked.store, data=ds, summary=result.to_json(), tol=cfg.tol)
    return dataclasses.replace(result, out=cfg.out)
