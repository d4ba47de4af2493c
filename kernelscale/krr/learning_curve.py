"""Learning curves: KRR test accuracy on nested class-balanced subsets of a stored Gram.

One loop (:func:`curve_solves`) serves the stores (:func:`curve`), in-memory matrices (:func:`curve_arrays`)
and the robust learning curves of ``kernelscale.robust``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from kernelscale.config import build as config_build
from kernelscale.config import validate as config_validate
from kernelscale.data import open_dataset
from kernelscale.data.labels import one_hot
from kernelscale.errors import InputError, NotConvergedError
from kernelscale.gram.operators import ZarrGramOperator
from kernelscale.gram.store import open_gram
from kernelscale.krr.config import SOLVE_FLAG_NAMES, CurveConfig
from kernelscale.krr.evaluation import check_cross, label_scores
from kernelscale.krr.results import CurveResult
from kernelscale.krr.solver import check_gram_for_data, check_reg, effective_reg
from kernelscale.linalg import CGOptions, DenseOperator, PreconditionerSpec, Solution, build_preconditioner, cg, cholesky_solve


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
            raise NotConvergedError(f"curve: the solve at size {n} did not succeed ({sol.status}): "
                                    f"{sol.in_words(SOLVE_FLAG_NAMES)}")
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
