"""Shared ``--attack`` flags of ``evaluate`` and ``eval`` (PGD robust accuracy); not a subcommand."""

from __future__ import annotations

import argparse

from kernelscale.attack.kernel_pgd import Attack


def add_attack_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adversarial attack (PGD in pixel space, through the dataset's preprocessing)")
    g.add_argument("--attack", metavar="linf:EPS|l2:EPS",
                   help="also report robust_accuracy under PGD in this ball, e.g. linf:8/255 (pixels in [0, 1])")
    g.add_argument("--pgd-steps", type=int, default=20, metavar="P", help="PGD steps (default 20)")
    g.add_argument("--restarts", type=int, default=1, metavar="R", help="PGD random restarts (default 1)")
    g.add_argument("--step-size", type=float, default=None, metavar="A",
                   help="PGD step size in pixel units (default 2.5 * EPS / P)")
    g.add_argument("--attack-limit", type=int, default=None, metavar="N", help="attack only the first N test rows")
    g.add_argument("--attack-batch", type=int, default=100, metavar="N", help="test rows attacked together")
    g.add_argument("--attack-seed", type=int, default=0, metavar="S", help="seed of random starts and noise")
    g.add_argument("--workers", type=int, default=1, metavar="W",
                   help="Ray workers attacking slices of the test rows (results equal the local run)")


def attack_from_args(args: argparse.Namespace) -> Attack | None:
    if not args.attack:
        return None
    return Attack.parse(args.attack, steps=args.pgd_steps, restarts=args.restarts, step_size=args.step_size)


def attack_kwargs(args: argparse.Namespace) -> dict:
    return {"limit": args.attack_limit, "seed": args.attack_seed, "batch": args.attack_batch, "workers": args.workers}
