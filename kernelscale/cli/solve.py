"""Kernel ridge regression: solve (K + reg I) alpha = one-hot - 1/C on a stored Gram, write MODEL.zarr.

Refuses before compute a Gram built on other data, a non-symmetric or incomplete Gram and a negative reg.
Iterative solves (block PCG over the streamed Gram) that stop without reaching --tol exit with code 3 and write
no model; --checkpoint PATH saves the solver state every --checkpoint-every iterations and --resume continues.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale.krr import OPERATORS, REG_SCALES, SOLVERS, solve
from kernelscale.linalg.preconditioners import LANDMARKS, RESIDUALS


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("gram", metavar="GRAM.zarr", help="train Gram store (`kernelscale gram DATA.zarr`)")
    p.add_argument("--data", required=True, metavar="DATA.zarr", help="dataset store the Gram was computed on")
    p.add_argument("--reg", type=float, required=True, metavar="R", help="ridge regularisation (>= 0)")
    p.add_argument("--reg-scale", default="trace", choices=REG_SCALES,
                   help="trace: add R * trace(K)/N to the diagonal (neural-tangents' convention); absolute: add R")
    p.add_argument("--tol", type=float, default=1e-6, metavar="T", help="relative residual per class column")
    p.add_argument("--max-iter", type=int, default=1000, metavar="K", help="CG iterations at most")
    p.add_argument("--precond", default="nystrom", metavar="none|jacobi|nystrom[:RANK]",
                   help="CG preconditioner; nystrom without a rank picks N/5 landmarks, between 100 and 3,000 "
                        "(default: nystrom)")
    p.add_argument("--landmarks", default="rpcholesky", choices=LANDMARKS, help="Nyström landmark selection")
    p.add_argument("--nystrom-residual", default="diag", choices=RESIDUALS,
                   help="diag: P = FF^T + diag(K - FF^T) + reg I; scalar: Frangella et al. (reg > 0 only)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the landmark sampling")
    p.add_argument("--solver", default="cg", choices=SOLVERS, help="cholesky: direct float64 (N must fit in memory)")
    p.add_argument("--operator", default="zarr", choices=OPERATORS,
                   help="zarr: stream tiles from the store (out of core); memory: load the Gram; ray: actors")
    p.add_argument("--workers", type=int, metavar="W", help="Ray actors for --operator ray (default: CPU slots)")
    p.add_argument("--true-residual-every", type=int, default=50, metavar="K",
                   help="recompute the true residual every K iterations (0: only to confirm convergence)")
    p.add_argument("--checkpoint", metavar="PATH.npz", help="save the solver state here")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="K", help="iterations between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --checkpoint file instead of refusing")
    p.add_argument("--out", required=True, metavar="MODEL.zarr", help="model store to write (replaced if a model)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return solve(
        args.gram, args.data, reg=args.reg, out=args.out, reg_scale=args.reg_scale, tol=args.tol,
        max_iter=args.max_iter, precond=args.precond, solver=args.solver, operator=args.operator,
        landmarks=args.landmarks, nystrom_residual=args.nystrom_residual, seed=args.seed,
        true_residual_every=args.true_residual_every, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every, resume=args.resume, workers=args.workers, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
