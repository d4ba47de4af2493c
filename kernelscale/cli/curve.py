"""Learning curve: KRR test accuracy on nested class-balanced subsets of a stored Gram (no kernel recomputation).

Each size n takes the first n rows of a seeded class-interleaved permutation of DATA; K[S, S] and K(test, S) are
read from the stores once. Sizes up to --direct-max are solved by float64 Cholesky, larger ones by Nyström PCG.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale import config
from kernelscale.krr import CurveConfig, curve


def register(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, CurveConfig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return curve(config=config.from_namespace(CurveConfig, args, progress=not args.no_progress)).to_json()
