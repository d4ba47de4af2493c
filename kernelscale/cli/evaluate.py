"""Evaluate a distilled support set: kernel regression from it onto TEST (accuracy, mse).

mse is the mean over rows and classes of (prediction - (one-hot - 1/C))^2. TEST must share DATA's input
shape and preprocessing (ingest it with --stats-from DATA.zarr or as DATA's --val-out split).
With --attack linf:EPS|l2:EPS also reports robust_accuracy under PGD in pixel space (pixels in [0, 1], mapped
through TEST's preprocessing) and noise_accuracy under random noise of the same norm (kernelscale.robust_run).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..kip_run import evaluate
from ..robust_run import attack_distilled
from .attack_flags import add_attack_flags, attack_from_args, attack_kwargs


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("distilled", metavar="DISTILLED.zarr", help="store written by `kernelscale distill`")
    p.add_argument("--test", required=True, metavar="TEST.zarr", help="dataset store to predict")
    p.add_argument("--batch", type=int, default=2048, metavar="N", help="test rows per kernel call")
    add_attack_flags(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    attack = attack_from_args(args)  # parsed before any compute
    summary = evaluate(args.distilled, args.test, batch=args.batch)
    if attack is not None:
        summary.update(attack_distilled(args.distilled, args.test, attack, **attack_kwargs(args)))
    return summary
