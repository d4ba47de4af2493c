"""Run the main job end to end on the embedded default (mnist5k, local Ray, local Zarr stores).

Rerunning resumes: finished stages are reused, not recomputed.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale import config
from kernelscale.cli.demo_pipeline import DemoConfig, run_demo


def register(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, DemoConfig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_demo(config.from_namespace(DemoConfig, args, progress=not args.no_progress))
