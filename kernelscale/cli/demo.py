"""Run the main job end to end on the embedded default (mnist5k, local Ray, local Zarr stores).

Rerunning resumes: finished stages are reused, not recomputed.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..demo import DemoOptions, run_demo


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="report folder (stores and plots go here)")
    p.add_argument("--limit", type=int, default=DemoOptions.limit, help="rows of mnist5k to use")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_demo(DemoOptions(out=args.out, limit=args.limit, progress=not args.no_progress))
