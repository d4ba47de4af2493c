"""Evaluate a kernel regression model on test rows: accuracy and MSE from K(test, train) @ alpha.

CROSS.zarr is `kernelscale gram TEST.zarr --against DATA.zarr`; its fingerprints must match TEST.zarr and the
model's training data. The product streams the cross store tile by tile.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..krr import evaluate


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.zarr", help="model store written by `kernelscale solve`")
    p.add_argument("--cross", required=True, metavar="CROSS.zarr", help="cross Gram K(test, train)")
    p.add_argument("--test", required=True, metavar="TEST.zarr", help="test dataset store")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return evaluate(args.model, args.cross, args.test)
