"""Kernel ridge regression on stored Gram matrices: solve, evaluate, learning curves.

Targets are the one-hot labels minus 1/C (``DatasetStore.one_hot``). The system is (K + r I) alpha = Y with
r = reg * trace(K) / N (``reg_scale="trace"``, neural-tangents' convention) or r = reg (``"absolute"``).

A model store (``MODEL.zarr``) is a Zarr v3 group::

    alpha    float64 (N, C), crc32c
    attrs    kernelscale="model", gram_fingerprint, data_fingerprint, spec, reg, reg_scale, reg_effective,
             num_classes, class_names, solver, precond, status, iterations, rel_residual, tol, complete

Only converged solves write a model; a solve that stops early exits 3 and writes nothing (its checkpoint, if
asked for, lets ``--resume`` continue). Predictions on test rows are K(test, train) @ alpha, streamed tile by
tile from a cross Gram store (``kernelscale gram TEST.zarr --against DATA.zarr``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from kernelscale import storage
from kernelscale.config import build as config_build
from kernelscale.config import validate as config_validate
from kernelscale.data import DatasetStore, available_memory, open_dataset
from kernelscale.errors import InputError, NotConvergedError, StoreError
from kernelscale.data.labels import one_hot
from kernelscale.gram.operators import RayGramOperator, ZarrGramOperator
from kernelscale.gram.store import GramStore, open_gram
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
from kernelscale.krr.config import OPERATORS, REG_SCALES, SOLVERS, CurveConfig, SolveConfig
from kernelscale.krr.results import CurveResult, SolveResult

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Checks (all before any expensive work)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Solve
# ----------------------------------------------------------------------------------------------------------


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
    result = SolveResult(status=sol.status, iterations=sol.iterations, rel_residual=sol.max_rel_residual,
                         seconds=round(seconds, 3), message=sol.message, solver=cfg.solver, n=ds.n,
                         classes=ds.num_classes, reg=cfg.reg, reg_scale=cfg.reg_scale,
                         reg_effective=checked.reg_effective, **details)
    if not sol.converged:
        log.error("solve did not converge: %s", sol.message)
        return dataclasses.replace(result, message=sol.message + " No model was written.")
    write_model(cfg.out, sol.x, store=checked.store, data=ds, summary=result.to_json(), tol=cfg.tol)
    return dataclasses.replace(result, out=cfg.out)


def write_model(out: str, alpha: np.ndarray, *, store: GramStore, data: DatasetStore, summary: dict[str, Any],
                tol: float) -> None:
    """Write MODEL.zarr (``complete`` is set last: a model cut short by a crash is refused by eval)."""
    if storage.exists(out):
        storage.remove_store(out, "model")
    try:
        group = storage.open_group(out, "w-")
        group.attrs.update({"kernelscale": "model", "complete": False})  # ours from the first write on
        arr = storage.checksummed_array(group, "alpha", alpha.shape, (min(alpha.shape[0], 65536), alpha.shape[1]),
                                        "float64", np.nan)
        arr[...] = alpha
        group.attrs.update({
            "kernelscale": "model", "format_version": MODEL_FORMAT_VERSION, "gram_fingerprint": store.fingerprint,
            "gram_path": store.path, "data_fingerprint": data.fingerprint, "spec": store.attrs.get("spec"),
            "num_classes": data.num_classes, "class_names": data.class_names, "tol": tol,
            **{k: summary[k] for k in ("reg", "reg_scale", "reg_effective", "solver", "precond", "status",
                                       "iterations", "rel_residual")},
        })
        group.attrs["complete"] = True
    except OSError as exc:
        if storage.is_disk_full(exc):
            storage.remove(out)  # the partial model just created here: the rerun starts clean
            raise storage.disk_full_error(out, "writing the model (nothing of it was kept; a --checkpoint is)") from None
        raise


def check_model_layout(path: str, group: Any, attrs: dict[str, Any]) -> None:
    """Refuse a model store whose attributes or ``alpha`` differ from the layout in the module docstring."""
    fix = "rerun `kernelscale solve` to write it again"
    req = storage.require
    req(path, attrs.get("format_version") == MODEL_FORMAT_VERSION, "format_version", str(MODEL_FORMAT_VERSION),
        attrs.get("format_version"), fix)
    c = attrs.get("num_classes")
    req(path, storage.is_int(c, 1), "num_classes", "an integer >= 1", c, fix)
    for key in ("gram_fingerprint", "data_fingerprint"):
        req(path, isinstance(attrs.get(key), str) and attrs[key].startswith("sha256:"), key, "a 'sha256:...' string",
            attrs.get(key), fix)
    req(path, attrs.get("spec") is None or isinstance(attrs.get("spec"), dict), "spec", "a kernel spec object",
        attrs.get("spec"), fix)
    metas = storage.members(group, path)
    storage.check_members(path, metas, lambda name, meta: name == "alpha", fix)
    n = (metas.get("alpha") or {}).get("shape", [0])[0]
    storage.check_array(path, "alpha", metas.get("alpha"), dtype="float64", shape=(None, c),
                        chunks=(min(max(int(n), 1), 65536) if storage.is_int(n, 1) else None, c), fill="NaN", fix=fix)
    if int(n) * c * 8 > available_memory() // 2:
        raise StoreError(f"{path}: array 'alpha' of shape ({n}, {c}) would need {int(n) * c * 8 / 2**30:.1f} GiB, more "
                         f"than half the available memory; {fix}")


def open_model(path: str) -> tuple[dict[str, Any], np.ndarray]:
    """(attrs, alpha) of a model store; refuses incomplete or non-model stores."""
    if not storage.exists(path):
        raise StoreError(f"{path}: no model store there (create one with `kernelscale solve ... --out {path}`)")
    if storage.store_kind(path) == "distilled":
        raise StoreError(f"{path} is a distilled support set, not a model: score it without a cross Gram, "
                         f"`kernelscale evaluate {path} --test TEST.zarr` (in Python: kernelscale.kip.run.evaluate)")
    group = storage.open_group(path, "r")
    attrs = dict(group.attrs)
    if attrs.get("kernelscale") != "model":
        raise StoreError(f"{path} is not a kernelscale model store (create one with `kernelscale solve`)")
    if not attrs.get("complete") or attrs.get("status") != "converged":
        raise StoreError(f"{path} is incomplete or not converged; rerun `kernelscale solve`")
    check_model_layout(path, group, attrs)  # from the raw metadata, before zarr parses alpha
    try:
        alpha = np.asarray(group["alpha"][...], np.float64)
    except ValueError as exc:
        raise StoreError(f"{path}: alpha is corrupt ({exc}); rerun `kernelscale solve`") from exc
    if not np.isfinite(alpha).all():
        raise StoreError(f"{path}: alpha has missing or non-finite values; rerun `kernelscale solve`")
    return attrs, alpha


# ----------------------------------------------------------------------------------------------------------
# Eval
# ----------------------------------------------------------------------------------------------------------


def check_cross(cross: GramStore, test: DatasetStore, train_fingerprint: str, n_train: int,
                spec: dict[str, Any] | None) -> None:
    """Refuse a cross Gram that is not K(test, train) for these stores (and this kernel); the common mix-ups
    (the train Gram itself, the reversed K(train, test)) are named with the command that makes the right one."""
    attrs = cross.attrs
    make = f"`kernelscale gram {test.path} --against TRAIN.zarr --out CROSS.zarr` (TRAIN.zarr: the model's data)"
    if attrs.get("against_fingerprint") is None and attrs.get("data_fingerprint") == train_fingerprint:
        raise StoreError(f"{cross.path} is the train Gram K(train, train), not a cross Gram K(test, train); "
                         f"compute the cross Gram with {make}")
    if attrs.get("data_fingerprint") == train_fingerprint and attrs.get("against_fingerprint") == test.fingerprint:
        raise StoreError(f"{cross.path} is K(train, test), the reverse of the cross Gram needed, K(test, train): "
                         f"compute it with DATA and --against swapped, {make}")
    if attrs.get("data_fingerprint") != test.fingerprint:
        raise StoreError(f"{cross.path} was computed on other test rows (data_fingerprint "
                         f"{attrs.get('data_fingerprint')} != {test.path}'s {test.fingerprint})")
    if attrs.get("against_fingerprint") != train_fingerprint:
        raise StoreError(f"{cross.path} is against other training data (against_fingerprint "
                         f"{attrs.get('against_fingerprint')} != the model's data {train_fingerprint}); compute "
                         f"`kernelscale gram {test.path} --against TRAIN.zarr`")
    if cross.shape != (test.n, n_train):
        raise StoreError(f"{cross.path} has shape {cross.shape}, expected ({test.n}, {n_train})")
    if spec is not None and attrs.get("spec") is not None and attrs.get("spec") != spec:
        raise StoreError(f"{cross.path} was computed with another kernel ({attrs.get('spec')}) than the model ({spec})")
    missing = cross.missing_tiles()
    if missing:
        raise StoreError(f"{cross.path} is incomplete: {len(missing)} tiles missing; rerun `kernelscale gram` to finish it")


def scores(pred: np.ndarray, test: DatasetStore) -> dict[str, float]:
    """accuracy (argmax vs labels) and mse (mean over rows and classes of (pred - (one-hot - 1/C))^2)."""
    return label_scores(pred, test.labels, test.num_classes)


def label_scores(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """:func:`scores` against integer ``labels`` (n,) of ``num_classes`` classes: accuracy and centred-one-hot mse."""
    if not np.isfinite(pred).all():
        raise StoreError("predictions are not finite: a store holds NaN/Inf values; run `kernelscale verify`")
    y = one_hot(labels, num_classes).astype(np.float64)
    return {"accuracy": float(np.mean(np.argmax(pred, axis=1) == labels)),
            "mse": float(np.mean((pred - y) ** 2))}


def evaluate(model: str, cross: str, test: str) -> dict[str, Any]:
    """Test accuracy and MSE of a model: K(test, train) @ alpha streamed from the cross store."""
    t0 = time.perf_counter()
    attrs, alpha = open_model(model)
    ts = open_dataset(test)
    cs = open_gram(cross)
    check_cross(cs, ts, attrs["data_fingerprint"], alpha.shape[0], attrs.get("spec"))
    ts.check_content()  # test rows/labels edited behind the fingerprint's back are refused (sampled chunks)
    if ts.num_classes != alpha.shape[1]:
        raise InputError(f"{test} has {ts.num_classes} classes, the model {alpha.shape[1]}")
    with ZarrGramOperator(cs, prefetch=2, psd=False) as op:
        pred = op.mm(alpha)
    return scores(pred, ts) | {"n_test": ts.n, "n_train": alpha.shape[0], "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------------------------------------
# Learning curves
# ----------------------------------------------------------------------------------------------------------


def parse_sizes(text: str | Sequence[int], n: int) -> list[int]:
    try:
        sizes = [int(s) for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip()]
    except ValueError:
        raise InputError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise InputError("--sizes needs at least one size")
    bad = [s for s in sizes if not 1 <= s <= n]
    if bad:
        raise InputError(f"--sizes {bad} out of range: the Gram has {n} rows (sizes must be in 1..{n})")
    return sorted(set(sizes))


def nested_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation whose every prefix is class-balanced (classes interleaved round robin)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rounds = max(len(p) for p in per_class)
    order = [p[r] for r in range(rounds) for p in per_class if r < len(p)]
    return np.asarray(order, np.int64)


def curve(gram: str | None = None, data: str | None = None, cross: str | None = None, test: str | None = None,
          sizes: str | Sequence[int] | None = None, config: CurveConfig | None = None, **overrides: Any) -> CurveResult:
    """Test accuracy of KRR on nested class-balanced subsets of the stored Gram (no kernel recomputation).

    Settings: a :class:`CurveConfig`, or its fields as keyword arguments, or both (keywords win). Each size n
    uses the first n rows of :func:`nested_order`; K[S, S] and K(test, S) are gathered from the stores once for
    the largest size. Sizes up to ``direct_max`` use float64 Cholesky, larger ones Nyström PCG. A size whose
    solve fails raises :class:`NotConvergedError`.
    """
    given = {"gram": gram, "data": data, "cross": cross, "test": test, "sizes": sizes}
    cfg = config_build(CurveConfig, config, {k: v for k, v in given.items() if v is not None} | overrides)
    t0 = time.perf_counter()
    config_validate(cfg)
    CGOptions(tol=cfg.tol, max_iter=cfg.max_iter).validate()
    ds, ts = open_dataset(cfg.data), open_dataset(cfg.test)
    gs, cs = open_gram(cfg.gram), open_gram(cfg.cross)
    check_gram_for_data(gs, ds)
    check_cross(cs, ts, ds.fingerprint, ds.n, gs.attrs.get("spec"))
    sizes_l = parse_sizes(cfg.sizes, ds.n)
    order = nested_order(ds.labels, cfg.seed)[: sizes_l[-1]]
    with ZarrGramOperator(gs) as g_op, ZarrGramOperator(cs, psd=False) as c_op:
        k_full = g_op.submatrix(order, order)
        k_cross = c_op.submatrix(np.arange(ts.n), order)
    out = curve_arrays(k_full, k_cross, ds.labels[order], ts.labels, ds.num_classes, sizes_l, reg=cfg.reg,
                       reg_scale=cfg.reg_scale, seed=cfg.seed, tol=cfg.tol, max_iter=cfg.max_iter,
                       direct_max=cfg.direct_max, progress=cfg.progress)
    return dataclasses.replace(out, seed=cfg.seed, seconds=round(time.perf_counter() - t0, 3))


def curve_solves(k_full: np.ndarray, y: np.ndarray, sizes: Sequence[int], *, reg: float, reg_scale: str = "trace",
                 seed: int = 0, tol: float = 1e-6, max_iter: int = 1000, direct_max: int = 20000,
                 progress: bool = False, desc: str = "curve") -> Iterator[tuple[int, np.ndarray, str]]:
    """The learning-curve loop: for each size n (ascending), KRR on the first n rows of ``k_full`` (m, m) with
    targets ``y`` (m, C); yields ``(n, alpha (n, C) float64, solver)``, solver "cholesky" up to ``direct_max``
    rows, else "cg" (Nyström PCG). A failed solve raises :class:`NotConvergedError`."""
    check_reg(reg, reg_scale)
    for n in tqdm(sorted(sizes), desc=desc, disable=not progress):
        k = k_full[:n, :n]
        reg_eff = effective_reg(reg, reg_scale, float(np.trace(k)), n)
        if n <= direct_max:
            sol: Solution = cholesky_solve(k, y[:n], reg_eff)
        else:
            op = DenseOperator(k, symmetric=True, psd=True)
            pre = build_preconditioner(PreconditionerSpec("nystrom", min(2000, n), seed=seed), op, reg_eff)
            sol = cg(op.shift(reg_eff), y[:n], pre, CGOptions(tol=tol, max_iter=max_iter))
        if not sol.converged:
            raise NotConvergedError(f"curve: the solve at size {n} did not succeed ({sol.status}): {sol.message}")
        yield n, sol.x, "cholesky" if n <= direct_max else "cg"


def curve_arrays(k_full: np.ndarray, k_cross: np.ndarray, labels: np.ndarray, test_labels: np.ndarray,
                 num_classes: int, sizes: Sequence[int], *, reg: float = 1e-4, reg_scale: str = "trace",
                 seed: int = 0, tol: float = 1e-6, max_iter: int = 1000, direct_max: int = 20000,
                 progress: bool = False) -> CurveResult:
    """The learning curve of :func:`curve` on in-memory matrices: ``k_full`` (m, m) over training rows already in
    nested order, ``k_cross`` (n_test, m), their ``labels`` (m,) and ``test_labels`` (n_test,); for each size n,
    KRR on the first n rows, scored on every test row."""
    check_reg(reg, reg_scale)
    y_all = one_hot(labels, num_classes).astype(np.float64)
    result = CurveResult(sizes=sorted(sizes), reg=reg, reg_scale=reg_scale)
    t = time.perf_counter()
    for n, alpha, how in curve_solves(k_full, y_all, sizes, reg=reg, reg_scale=reg_scale, seed=seed, tol=tol,
                                      max_iter=max_iter, direct_max=direct_max, progress=progress):
        sc = label_scores(k_cross[:, :n] @ alpha, test_labels, num_classes)
        result.accuracy.append(sc["accuracy"])
        result.mse.append(sc["mse"])
        result.solve_seconds.append(round(time.perf_counter() - t, 3))
        result.solver.append(how)
        t = time.perf_counter()
    return result
