"""Compute (or resume) an NTK/NNGP Gram matrix into a tiled, checksummed Zarr store with Ray workers.

Without --against: the symmetric N x N Gram of DATA (only tiles on or above the diagonal are stored).
With --against OTHER.zarr: the rectangular cross Gram K(DATA, OTHER), N x M. Rerunning the same command
resumes (tiles already present are skipped); a store of another dataset, kernel, dtype or tile is refused
unless --overwrite. Runs on the Ray cluster at --address / RAY_ADDRESS, else on a local one.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale.config import add_arguments, from_namespace
from kernelscale.gram.config import GramConfig
from kernelscale.gram.engine import compute_gram
from kernelscale.kernels import parse_arch


def register(p: argparse.ArgumentParser) -> None:
    add_arguments(p, GramConfig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = from_namespace(GramConfig, args, progress=not args.no_progress)
    spec = parse_arch(config.arch, config.kernel, allow_code=config.allow_code)
    return compute_gram(
        config.data, spec, config.out, against=config.against, tile=config.tile, workers=config.workers,
        gpus_per_worker=config.gpus_per_worker, dtype=config.dtype, memory_budget=config.memory_budget,
        overwrite=config.overwrite, address=config.address, progress=config.progress, max_tiles=config.max_tiles,
    )
