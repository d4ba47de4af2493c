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

from kernelscale.kip.run import distill


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA.zarr", help="dataset store (from `kernelscale ingest`)")
    p.add_argument("--arch", default="fc", metavar="SPEC", help="architecture, e.g. fc:depth=3 (default fc)")
    p.add_argument("--kernel", default="ntk", choices=["ntk", "nngp"])
    p.add_argument("--ipc", type=int, default=10, metavar="K", help="support images per class (default 10)")
    p.add_argument("--steps", type=int, default=6000, metavar="S", help="total KIP steps (default 6000)")
    p.add_argument("--target-batch", type=int, default=2000, metavar="B", help="target rows per step (default 2000)")
    p.add_argument("--lr", type=float, default=0.01, metavar="LR", help="Adam learning rate (default 0.01)")
    p.add_argument("--label-lr", type=float, default=None, metavar="LR",
                   help="Adam learning rate of the labels (default: --lr)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"],
                   help="learning-rate schedule over --steps: cosine/linear decay to 0, or constant (default cosine)")
    p.add_argument("--learn-labels", action="store_true", help="also learn the support labels")
    p.add_argument("--reg", type=float, default=1e-6, metavar="R", help="ridge, times trace(K_ss)/n_s (default 1e-6)")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="Ray actors sharing each target batch")
    p.add_argument("--seed", type=int, default=0, metavar="SEED")
    p.add_argument("--init", default="random", choices=["random", "gram"],
                   help="random: class-balanced real rows; gram: randomized pivoted Cholesky over --gram")
    p.add_argument("--gram", metavar="GRAM.zarr", help="stored Gram of DATA (for --init gram and the label-solve floor)")
    p.add_argument("--val", metavar="VAL.zarr", help="validation store for accuracy every --eval-every steps")
    p.add_argument("--eval-every", type=int, default=500, metavar="E")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="C")
    p.add_argument("--resume", action="store_true", help="continue --out from its last checkpoint")
    p.add_argument("--kss-tile", type=int, default=None, metavar="T",
                   help="compute K_ss in T x T tiles across the workers (large supports, e.g. 10,000 images)")
    p.add_argument("--target-augment", default="auto", metavar="SPEC",
                   help="translate/flip target images: auto (up to 1/16 of the image side: 2 px at 32x32; none for "
                        "non-image rows), none, or a comma list of shift=K and flip, e.g. shift=2,flip (flip only "
                        "for mirror-symmetric classes)")
    p.add_argument("--target-sampling", default="auto", choices=["auto", "rows", "chunks"],
                   help="rows: random rows of every class (a dataset larger than memory is read row by row, a "
                        "whole store chunk per row); chunks: rows from a few whole chunks per step, so a step "
                        "reads at most twice the bytes it uses (classes balanced as far as those chunks allow; "
                        "store rows that mix classes give balanced batches); auto: chunks when DATA does not "
                        "fit in memory (4 GiB), else rows. --resume keeps the run's choice")
    p.add_argument("--out", required=True, metavar="DISTILLED.zarr")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files at <out>_images.png / <out>_curves.png that this run did not write")
    p.add_argument("--adversarial", metavar="linf:EPS|l2:EPS",
                   help="adversarial KIP: replace target batches by PGD examples (pixel-space ball) against the support")
    p.add_argument("--pgd-steps", type=int, default=10, metavar="P", help="PGD steps per KIP step (default 10)")
    p.add_argument("--adv-mix", type=float, default=1.0, metavar="F",
                   help="fraction of target rows replaced by adversarial ones (default 1: all)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return distill(
        args.data, out=args.out, arch=args.arch, kernel=args.kernel, ipc=args.ipc, steps=args.steps,
        target_batch=args.target_batch, lr=args.lr, label_lr=args.label_lr, schedule=args.schedule,
        learn_labels=args.learn_labels, reg=args.reg, kss_tile=args.kss_tile,
        workers=args.workers, seed=args.seed, init=args.init, gram=args.gram, val=args.val,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=not args.no_progress, adversarial=args.adversarial, pgd_steps=args.pgd_steps,
        adv_mix=args.adv_mix, target_augment=args.target_augment, overwrite=args.overwrite,
        target_sampling=args.target_sampling,
    )
