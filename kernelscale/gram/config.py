"""The typed config of ``kernelscale gram`` (:class:`GramConfig`): each field declares its flag, help text and
check once (:mod:`kernelscale.config`); the CLI's flags come from here, in field order."""

from __future__ import annotations

from dataclasses import dataclass

from kernelscale.config import option
from kernelscale.kernels import KERNELS

DTYPES = ("float32", "float64")


@dataclass(frozen=True, kw_only=True)
class GramConfig:
    """Settings of one Gram computation (``kernelscale gram --help`` says what each one does)."""

    data: str = option("data", metavar="DATA.zarr", help="dataset store (from `kernelscale ingest`)")
    arch: str = option("--arch", metavar="SPEC",
                       help="architecture, e.g. fc, fc:depth=3,W_std=1.4142,b_std=0.05, convnet, myrtle:depth=5")
    kernel: str = option("--kernel", "ntk", choices=list(KERNELS), help="which infinite-width kernel")
    out: str = option("--out", metavar="GRAM.zarr", help="Gram store to create or resume")
    against: str | None = option("--against", None, metavar="OTHER.zarr",
                                 help="second dataset store: compute the cross Gram K(DATA, OTHER)")
    tile: int | None = option("--tile", None, type=int, metavar="T",
                              help="tile side (default: 4096, smaller for small N; resume keeps the store's)")
    workers: int | None = option("--workers", None, type=int, metavar="W",
                                 help="Ray actors (default: one per CPU, or per GPU share)")
    gpus_per_worker: float = option("--gpus-per-worker", 0.0, type=float, metavar="G",
                                    help="GPUs per actor (fractional packs several per GPU)")
    dtype: str = option("--dtype", "float32", choices=list(DTYPES))
    memory_budget: int | None = option("--memory-budget", None, type=int, metavar="BYTES",
                                       help="bytes per worker for one kernel call (default: 40%% of available RAM "
                                            "divided by the actors on this machine: --workers, or one per CPU, at "
                                            "most one per tile)")
    max_tiles: int | None = option("--max-tiles", None, type=int, metavar="K",
                                   help="compute at most K of the missing tiles (sampling)")
    overwrite: bool = option("--overwrite", False, action="store_true",
                             help="replace an existing store of another Gram")
    address: str | None = option("--address", None, metavar="ADDR",
                                 help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    allow_code: bool = option("--allow-code", False, action="store_true",
                              help="allow --arch module.path:function (imports user code)")
    progress: bool = option(None, True)  # progress bars (the CLI's --no-progress)
