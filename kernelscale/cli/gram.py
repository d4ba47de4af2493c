"""Compute (or resume) an NTK/NNGP Gram matrix into a tiled, checksummed Zarr store with Ray workers.

Without --against: the symmetric N x N Gram of DATA (only tiles on or above the diagonal are stored).
With --against OTHER.zarr: the rectangular cross Gram K(DATA, OTHER), N x M. Rerunning the same command
resumes (tiles already present are skipped); a store of another dataset, kernel, dtype or tile is refused
unless --overwrite. Runs on the Ray cluster at --address / RAY_ADDRESS, else on a local one.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale.gram.engine import compute_gram
from kernelscale.kernels import parse_arch


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA.zarr", help="dataset store (from `kernelscale ingest`)")
    p.add_argument("--arch", required=True, metavar="SPEC",
                   help="architecture, e.g. fc, fc:depth=3,W_std=1.4142,b_std=0.05, convnet, myrtle:depth=5")
    p.add_argument("--kernel", default="ntk", choices=["ntk", "nngp"], help="which infinite-width kernel")
    p.add_argument("--out", required=True, metavar="GRAM.zarr", help="Gram store to create or resume")
    p.add_argument("--against", metavar="OTHER.zarr", help="second dataset store: compute the cross Gram K(DATA, OTHER)")
    p.add_argument("--tile", type=int, metavar="T", help="tile side (default: 4096, smaller for small N; resume keeps the store's)")
    p.add_argument("--workers", type=int, metavar="W", help="Ray actors (default: one per CPU, or per GPU share)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="GPUs per actor (fractional packs several per GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--memory-budget", type=int, metavar="BYTES",
                   help="bytes per worker for one kernel call (default: 40%% of available RAM divided by the actors on "
                        "this machine: --workers, or one per CPU, at most one per tile)")
    p.add_argument("--max-tiles", type=int, metavar="K", help="compute at most K of the missing tiles (sampling)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store of another Gram")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--allow-code", action="store_true", help="allow --arch module.path:function (imports user code)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = parse_arch(args.arch, args.kernel, allow_code=args.allow_code)
    return compute_gram(
        args.data, spec, args.out, against=args.against, tile=args.tile, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, dtype=args.dtype, memory_budget=args.memory_budget,
        overwrite=args.overwrite, address=args.address, progress=not args.no_progress, max_tiles=args.max_tiles,
    )
