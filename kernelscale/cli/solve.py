"""Kernel ridge regression: solve (K + reg I) alpha = one-hot - 1/C on a stored Gram, write MODEL.zarr.

Refuses before compute a Gram built on other data, a non-symmetric or incomplete Gram and a negative reg.
Iterative solves (block PCG over the streamed Gram) that stop without reaching --tol exit with code 3 and write
no model; --checkpoint PATH saves the solver state every --checkpoint-every iterations and --resume continues.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale import config
from kernelscale.cli import CommandOutcome
from kernelscale.errors import NotConvergedError
from kernelscale.krr import SolveConfig, solve


def register(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, SolveConfig)


def run(args: argparse.Namespace) -> dict[str, Any] | CommandOutcome:
    result = solve(config=config.from_namespace(SolveConfig, args, progress=not args.no_progress))
    if not result.converged:  # no model written: the exit code of a solve that did not converge
        return CommandOutcome(result.to_json(), NotConvergedError.exit_code)
    return result.to_json()
