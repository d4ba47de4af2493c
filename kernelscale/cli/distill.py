"""Distil DATA into a small support set with KIP (Kernel Inducing Points), resumable and shardable.

Learns K images per class (and optionally their labels) such that kernel ridge regression on them predicts
DATA: loss = 1/2 ||y_t - K_ts (K_ss + reg*trace(K_ss)/n_s I)^-1 y_s||^2 averaged over class-balanced target
batches, optimised with Adam through the analytic NTK/NNGP kernel. Writes DISTILLED.zarr, an image grid
(<out>_images.png) and loss/accuracy curves (<out>_curves.png). Defaults: 6,000 steps, target batch 2,000,
Adam lr 0.01 (labels too) with a cosine decay to 0 over --steps, target images randomly translated by up
to 1/16 of the image side, 2 pixels at 32x32 (--target-augment auto).
A non-finite loss stops the run with exit code 3 and keeps the last good checkpoint.
--adversarial linf:EPS|l2:EPS (adversarial KIP) replaces each target batch (or a fraction --adv-mix of its rows)
by PGD examples against the current support (--pgd-steps steps in pixel space), see kernelscale.kip.adversarial.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale import config
from kernelscale.kip.run import KipConfig, distill


def register(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, KipConfig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return distill(config=config.from_namespace(KipConfig, args, progress=not args.no_progress)).to_json()
