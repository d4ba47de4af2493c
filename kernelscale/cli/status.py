"""Show a Gram store's progress: tiles done/total, fingerprint summary, measured throughput and ETA.

Reads only metadata and one listing of the stored tiles, so it takes seconds even at N = 1.28M.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale.gram.engine import gram_status


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("gram", metavar="GRAM.zarr", help="Gram store (from `kernelscale gram`)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return gram_status(args.gram)
