"""Solver benchmark: Cholesky vs plain CG vs preconditioned CG on a stored Gram, out-of-core cost, crossover.

Run under the benchmark lock, on a train Gram + cross Gram made by ``kernelscale gram`` (see docs/benchmarks.md)::

    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/bench_solver.py \
        --gram G.zarr --data TRAIN.zarr --cross X.zarr --test TEST.zarr --json-out results.json

Everything is measured in one run, side by side: (1) the time to read the Gram once from its store (every
stored tile, checksums verified: the I/O limit); (2) float64 Cholesky and its test accuracy; (3) plain CG
and preconditioned CG (Nyström uniform / RPCholesky, both residual models, several ranks) to --tol with the
in-memory operator: iterations, seconds, accuracy; (4) the best preconditioner again with the out-of-core
Zarr operator: seconds per iteration vs the read time; (5) Cholesky vs best PCG time on leading N x N
subsets, to see where CG overtakes Cholesky.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np

from kernelscale.data import open_dataset
from kernelscale.gram.operators import ZarrGramOperator
from kernelscale.gram.store import open_gram
from kernelscale.krr import effective_reg, scores
from kernelscale.linalg import (
    CGOptions,
    DenseOperator,
    PreconditionerSpec,
    build_preconditioner,
    cg,
    cholesky_solve,
)


def read_once(store: Any) -> float:
    """Seconds to read every stored tile once (checksummed), nothing else."""
    op = ZarrGramOperator(store, prefetch=2)
    t = time.perf_counter()
    for _ in op.iter_tiles():
        pass
    op.close()
    return time.perf_counter() - t


def pcg_run(kernel: Any, y: np.ndarray, reg: float, spec: PreconditionerSpec, tol: float, max_iter: int) -> dict[str, Any]:
    t = time.perf_counter()
    pre = build_preconditioner(spec, kernel, reg)
    sol = cg(kernel.shift(reg), y, pre, CGOptions(tol=tol, max_iter=max_iter))
    return {"precond": spec.describe(), "status": sol.status, "iterations": sol.iterations,
            "rel_residual": sol.max_rel_residual, "setup_s": round(pre.setup_seconds, 2),
            "total_s": round(time.perf_counter() - t, 2), "products": sol.products,
            "s_per_product": round(sol.operator_seconds / max(sol.products, 1), 4), "x": sol.x}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gram", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cross", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--reg", type=float, default=1e-4, help="times trace(K)/N")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--configs", default="uniform:scalar:2000,rpcholesky:scalar:2000,rpcholesky:diag:2000,"
                                         "rpcholesky:diag:3000,rpcholesky:scalar:3000",
                    help="LANDMARKS:RESIDUAL:RANK,... preconditioners to compare")
    ap.add_argument("--skip-plain", action="store_true", help="skip plain CG (the slow baseline)")
    ap.add_argument("--crossover-sizes", default="2000,4000,6000,8000,10000")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    results: dict[str, Any] = {"machine": platform.platform(), "reg": args.reg, "tol": args.tol}
    store, ds, ts, cross = open_gram(args.gram), open_dataset(args.data), open_dataset(args.test), open_gram(args.cross)
    n = ds.n
    y = ds.one_hot().astype(np.float64)
    results["n"], results["n_test"], results["gram_dtype"], results["tile"] = n, ts.n, str(store.dtype), store.tile

    results["read_once_s"] = round(read_once(store), 3)
    print(f"read Gram once: {results['read_once_s']} s", flush=True)
    t = time.perf_counter()
    k32 = store.to_numpy()
    results["load_s"] = round(time.perf_counter() - t, 3)
    with ZarrGramOperator(cross, psd=False) as c_op:
        kx = c_op.submatrix(np.arange(ts.n), np.arange(n))
    reg = effective_reg(args.reg, "trace", float(np.trace(k32, dtype=np.float64)), n)
    results["reg_effective"] = reg

    def acc(x: np.ndarray) -> float:
        return scores(kx @ x, ts)["accuracy"]

    chol = cholesky_solve(k32, y, reg)
    results["cholesky"] = {"status": chol.status, "seconds": round(chol.seconds, 2), "accuracy": acc(chol.x),
                           "rel_residual": chol.max_rel_residual}
    print("cholesky", results["cholesky"], flush=True)
    kernel = DenseOperator(k32, symmetric=True, psd=True)
    lam = np.linalg.eigvalsh(kernel.to_dense())
    results["condition_number"] = float((lam[-1] + reg) / (lam[0] + reg))
    del lam
    runs = []
    if not args.skip_plain:
        r = pcg_run(kernel, y, reg, PreconditionerSpec("none"), args.tol, args.max_iter)
        runs.append(r)
        r["accuracy"] = acc(r.pop("x"))
        print("plain", r, flush=True)
    for cfg in filter(None, args.configs.split(",")):
        landmarks, residual, rank = cfg.split(":")
        r = pcg_run(kernel, y, reg, PreconditionerSpec("nystrom", int(rank), landmarks, residual, 0), args.tol, args.max_iter)
        r["accuracy"] = acc(r.pop("x"))
        runs.append(r)
        print(cfg, r, flush=True)
    results["cg"] = runs
    best_i = min(range(len(runs)), key=lambda i: (runs[i]["status"] != "converged", runs[i]["iterations"]))
    best = runs[best_i]
    results["best"] = best["precond"]
    plain = next((r for r in runs if r["precond"] == "none"), None)
    if plain:
        results["iteration_ratio_plain_over_best"] = round(plain["iterations"] / max(best["iterations"], 1), 2)
    results["accuracy_gap_points"] = round(100 * abs(best["accuracy"] - results["cholesky"]["accuracy"]), 3)

    # out of core: the best preconditioner with the Zarr operator
    best_cfg = [c for c in filter(None, args.configs.split(","))][best_i - (1 if plain else 0)] if best["precond"] != "none" else None
    if best_cfg:
        landmarks, residual, rank = best_cfg.split(":")
        spec = PreconditionerSpec("nystrom", int(rank), landmarks, residual, 0)
        with ZarrGramOperator(store, prefetch=2) as zop:
            ooc = pcg_run(zop, y, reg, spec, args.tol, args.max_iter)
        ooc["accuracy"] = acc(ooc.pop("x"))
        ooc["ratio_s_per_product_over_read"] = round(ooc["s_per_product"] / results["read_once_s"], 3)
        results["out_of_core"] = ooc
        print("out-of-core", ooc, flush=True)

    # crossover: Cholesky vs best PCG (in memory) on leading subsets
    cross_rows = []
    for m in [int(s) for s in args.crossover_sizes.split(",") if int(s) <= n]:
        km = np.ascontiguousarray(k32[:m, :m])
        rm = effective_reg(args.reg, "trace", float(np.trace(km, dtype=np.float64)), m)
        c = cholesky_solve(km, y[:m], rm)
        landmarks, residual, rank = (best_cfg or "rpcholesky:diag:1000").split(":")
        spec = PreconditionerSpec("nystrom", min(int(rank), m // 2), landmarks, residual, 0)
        p = pcg_run(DenseOperator(km, symmetric=True, psd=True), y[:m], rm, spec, args.tol, args.max_iter)
        cross_rows.append({"n": m, "cholesky_s": round(c.seconds, 2), "pcg_s": p["total_s"], "pcg_iterations": p["iterations"],
                           "pcg_rank": spec.rank})
        print("crossover", cross_rows[-1], flush=True)
    results["crossover"] = cross_rows
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
