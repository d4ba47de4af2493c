"""Same as `kernelscale evaluate` (its earlier name, kept for scripts): score a model or a distilled support set.

MODEL.zarr with --cross CROSS.zarr (`kernelscale gram TEST.zarr --against DATA.zarr`), or DISTILLED.zarr
without it; see `kernelscale evaluate --help`.
"""

from __future__ import annotations

from kernelscale.cli.evaluate import register, run

__all__ = ["register", "run"]
