"""Train a finite network of the kernel's architecture on a distilled support set; test it on held-out data.

Reports the finite network's held-out accuracy beside the kernel's own (kernel regression from the same
support onto the same test set): the generalisation gap between the infinite-width kernel and a finite net.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from kernelscale.errors import InputError
from kernelscale.kernels.finite import train_finite
from kernelscale.kip.run import evaluate as kernel_evaluate
from kernelscale.kip.run import open_support


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("distilled", metavar="DISTILLED.zarr", help="support set written by `kernelscale distill`")
    p.add_argument("--test", required=True, metavar="TEST.zarr", help="held-out dataset store")
    p.add_argument("--width", type=int, default=1024, help="hidden width (channels for convolutions)")
    p.add_argument("--epochs", type=int, default=1000, help="passes over the support set")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=256, help="mini-batch (full batch when the support is smaller)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    _, test, spec, x_s, y_s = open_support(args.distilled, args.test)
    if spec.arch == "code":
        raise InputError("train-finite needs a built-in architecture (fc, convnet, myrtle)")
    x_test = test.rows(0, test.n)
    result = train_finite(spec, x_s, y_s, x_test, test.labels, width=args.width, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, seed=args.seed)
    kernel = kernel_evaluate(args.distilled, args.test)
    return {"distilled": args.distilled, "test": args.test, "n_support": int(len(x_s)), "arch": spec.to_json()} | \
        result.to_json() | {"kernel_accuracy": kernel["accuracy"],
                            "gap": float(kernel["accuracy"] - result.accuracy),
                            "final_loss": float(np.round(result.final_loss, 6))}
