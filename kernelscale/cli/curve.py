"""Learning curve: KRR test accuracy on nested class-balanced subsets of a stored Gram (no kernel recomputation).

Each size n takes the first n rows of a seeded class-interleaved permutation of DATA; K[S, S] and K(test, S) are
read from the stores once. Sizes up to --direct-max are solved by float64 Cholesky, larger ones by Nyström PCG.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale.krr import REG_SCALES, curve


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("gram", metavar="GRAM.zarr", help="train Gram store")
    p.add_argument("--data", required=True, metavar="DATA.zarr", help="dataset store of the Gram")
    p.add_argument("--cross", required=True, metavar="CROSS.zarr", help="cross Gram K(test, train)")
    p.add_argument("--test", required=True, metavar="TEST.zarr", help="test dataset store")
    p.add_argument("--sizes", required=True, metavar="N1,N2,...", help="training set sizes, e.g. 500,1000,2000")
    p.add_argument("--reg", type=float, default=1e-4, metavar="R", help="ridge regularisation (>= 0)")
    p.add_argument("--reg-scale", default="trace", choices=REG_SCALES, help="trace: R * trace(K_n)/n per size")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the nested subset order")
    p.add_argument("--direct-max", type=int, default=20000, metavar="N",
                   help="largest size solved by Cholesky; larger sizes use Nyström PCG")
    p.add_argument("--tol", type=float, default=1e-6, metavar="T", help="PCG tolerance for sizes above --direct-max")
    p.add_argument("--max-iter", type=int, default=1000, metavar="K", help="PCG iterations at most")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return curve(args.gram, args.data, args.cross, args.test, args.sizes, reg=args.reg, reg_scale=args.reg_scale,
                 seed=args.seed, tol=args.tol, max_iter=args.max_iter, direct_max=args.direct_max,
                 progress=not args.no_progress)
