"""Run the main job end to end on the embedded default (mnist5k, local Ray, local Zarr stores).

Rerunning resumes: finished stages are reused, not recomputed.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale.cli.demo_pipeline import DemoOptions, run_demo


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="report folder (stores and plots go here)")
    p.add_argument("--limit", type=int, default=DemoOptions.limit, help="rows of mnist5k to use")
    p.add_argument("--kip-steps", type=int, default=DemoOptions.kip_steps, help="KIP steps")
    p.add_argument("--attack", default=DemoOptions.attack, help="PGD attack for the robust accuracy")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_demo(DemoOptions(out=args.out, limit=args.limit, kip_steps=args.kip_steps, attack=args.attack,
                                progress=not args.no_progress))
