"""Evaluate a kernel regression model on test rows: accuracy and MSE from K(test, train) @ alpha.

CROSS.zarr is `kernelscale gram TEST.zarr --against DATA.zarr`; its fingerprints must match TEST.zarr and the
model's training data. The product streams the cross store tile by tile.
With --attack linf:EPS|l2:EPS also reports robust_accuracy under PGD through the analytic kernel against all
training rows (read from the DATA path the model's Gram recorded, or --data), --chunk rows at a time.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..krr import evaluate
from ..robust_run import attack_model
from .attack_flags import add_attack_flags, attack_from_args, attack_kwargs


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.zarr", help="model store written by `kernelscale solve`")
    p.add_argument("--cross", required=True, metavar="CROSS.zarr", help="cross Gram K(test, train)")
    p.add_argument("--test", required=True, metavar="TEST.zarr", help="test dataset store")
    add_attack_flags(p)
    p.add_argument("--data", metavar="DATA.zarr",
                   help="training data of the model, for --attack (default: the data path its Gram recorded)")
    p.add_argument("--chunk", type=int, default=4096, metavar="N",
                   help="training rows per kernel block in attack gradients (bounds memory)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    attack = attack_from_args(args)  # parsed before any compute
    summary = evaluate(args.model, args.cross, args.test)
    if attack is not None:
        summary.update(attack_model(args.model, args.test, attack, data=args.data, chunk=args.chunk,
                                    **attack_kwargs(args)))
    return summary
