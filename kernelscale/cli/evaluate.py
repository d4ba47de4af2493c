"""Evaluate a distilled support set: kernel regression from it onto TEST (accuracy, mse).

mse is the mean over rows and classes of (prediction - (one-hot - 1/C))^2. TEST must share DATA's input
shape and preprocessing (ingest it with --stats-from DATA.zarr or as DATA's --val-out split).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..kip_run import evaluate


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("distilled", metavar="DISTILLED.zarr", help="store written by `kernelscale distill`")
    p.add_argument("--test", required=True, metavar="TEST.zarr", help="dataset store to predict")
    p.add_argument("--batch", type=int, default=2048, metavar="N", help="test rows per kernel call")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return evaluate(args.distilled, args.test, batch=args.batch)
