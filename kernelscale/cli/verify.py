"""Verify a Gram store: every tile present, checksum-valid and finite, diagonal tiles symmetric.

Exits 2 when a tile is bad. With --repair, bad tiles are recomputed from the dataset store recorded in the
Gram's attributes (exit 0 once every tile is good).
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale.cli import CommandOutcome
from kernelscale.errors import InputError
from kernelscale.gram.engine import verify_gram


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("gram", metavar="GRAM.zarr", help="Gram store (from `kernelscale gram`)")
    p.add_argument("--repair", action="store_true", help="recompute missing, corrupt or asymmetric tiles")
    p.add_argument("--workers", type=int, metavar="W", help="Ray actors for --repair")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster address for --repair")
    p.add_argument("--allow-code", action="store_true",
                   help="--repair of a Gram of user code: import that code (checked against its recorded source hash)")


def run(args: argparse.Namespace) -> dict[str, Any] | CommandOutcome:
    summary = verify_gram(args.gram, repair=args.repair, progress=not args.no_progress,
                          workers=args.workers, address=args.address, allow_code=args.allow_code)
    if not summary["ok"]:  # a bad tile is bad input: exit 2
        return CommandOutcome(summary, InputError.exit_code)
    return summary
