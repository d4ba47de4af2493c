"""The typed configs of ``kernelscale solve`` (:class:`SolveConfig`) and ``kernelscale curve`` (:class:`CurveConfig`).

Each field declares its flag, help text and check once (:mod:`kernelscale.config`); the CLI's flags, the
Python API's defaults and the validation all come from here. :data:`SOLVE_FLAG_NAMES` is the solver's advice
(``Solution.in_words``) in the words of ``kernelscale solve``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from kernelscale.config import at_least, flags_of, non_negative, option
from kernelscale.linalg.cg import tol_problem
from kernelscale.linalg.preconditioners import LANDMARKS, RESIDUALS, precond_problem
from kernelscale.linalg.ridge import RIDGE_SCALES

REG_SCALES = RIDGE_SCALES
SOLVERS = ("cg", "cholesky")
OPERATORS = ("zarr", "memory", "ray")


@dataclass(frozen=True, kw_only=True)
class SolveConfig:
    """Settings of one kernel ridge solve (``kernelscale solve --help`` says what each one does)."""

    gram: str = option("gram", metavar="GRAM.zarr", help="train Gram store (`kernelscale gram DATA.zarr`)")
    data: str = option("--data", metavar="DATA.zarr", help="dataset store the Gram was computed on")
    reg: float = option("--reg", type=float, metavar="R", help="ridge regularisation (>= 0)",
                        check=non_negative("a finite number >= 0"))
    reg_scale: str = option("--reg-scale", "trace", choices=REG_SCALES,
                            help="trace: add R * trace(K)/N to the diagonal (neural-tangents' convention); "
                                 "absolute: add R")
    tol: float = option("--tol", 1e-6, type=float, metavar="T", help="relative residual per class column",
                        check=tol_problem)
    max_iter: int = option("--max-iter", 1000, type=int, metavar="K", help="CG iterations at most",
                           check=at_least(0))
    precond: str = option("--precond", "nystrom", metavar="none|jacobi|nystrom[:RANK]",
                          help="CG preconditioner; nystrom without a rank picks N/5 landmarks, between 100 and 3,000 "
                               "(default: nystrom)", check=precond_problem)
    landmarks: str = option("--landmarks", "rpcholesky", choices=LANDMARKS, help="Nyström landmark selection")
    nystrom_residual: str = option("--nystrom-residual", "diag", choices=RESIDUALS,
                                   help="diag: P = FF^T + diag(K - FF^T) + reg I; scalar: Frangella et al. "
                                        "(reg > 0 only)")
    seed: int = option("--seed", 0, type=int, metavar="S", help="seed of the landmark sampling")
    solver: str = option("--solver", "cg", choices=SOLVERS, help="cholesky: direct float64 (N must fit in memory)")
    operator: str = option("--operator", "zarr", choices=OPERATORS,
                           help="zarr: stream tiles from the store (out of core); memory: load the Gram; ray: actors")
    workers: int | None = option("--workers", None, type=int, metavar="W",
                                 help="Ray actors for --operator ray (default: CPU slots)",
                                 check=at_least(1, optional=True))
    true_residual_every: int = option("--true-residual-every", 50, type=int, metavar="K",
                                      help="recompute the true residual every K iterations (0: only to confirm "
                                           "convergence)", check=at_least(0))
    checkpoint: str | None = option("--checkpoint", None, metavar="PATH.npz", help="save the solver state here")
    checkpoint_every: int = option("--checkpoint-every", 10, type=int, metavar="K",
                                   help="iterations between checkpoints", check=at_least(1))
    resume: bool = option("--resume", False, action="store_true", help="continue from --checkpoint if it exists")
    overwrite: bool = option("--overwrite", False, action="store_true",
                             help="replace an existing --checkpoint file instead of refusing")
    out: str = option("--out", metavar="MODEL.zarr", help="model store to write (replaced if a model)")
    progress: bool = option(None, True)  # progress bars (the CLI's --no-progress)


@dataclass(frozen=True, kw_only=True)
class CurveConfig:
    """Settings of one learning curve (``kernelscale curve --help`` says what each one does)."""

    gram: str = option("gram", metavar="GRAM.zarr", help="train Gram store")
    data: str = option("--data", metavar="DATA.zarr", help="dataset store of the Gram")
    cross: str = option("--cross", metavar="CROSS.zarr", help="cross Gram K(test, train)")
    test: str = option("--test", metavar="TEST.zarr", help="test dataset store")
    sizes: str | tuple[int, ...] = option("--sizes", metavar="N1,N2,...",
                                          help="training set sizes, e.g. 500,1000,2000")
    reg: float = option("--reg", 1e-4, type=float, metavar="R", help="ridge regularisation (>= 0)",
                        check=non_negative("a finite number >= 0"))
    reg_scale: str = option("--reg-scale", "trace", choices=REG_SCALES, help="trace: R * trace(K_n)/n per size")
    seed: int = option("--seed", 0, type=int, metavar="S", help="seed of the nested subset order")
    direct_max: int = option("--direct-max", 20000, type=int, metavar="N",
                             help="largest size solved by Cholesky; larger sizes use Nyström PCG")
    tol: float = option("--tol", 1e-6, type=float, metavar="T", help="PCG tolerance for sizes above --direct-max",
                        check=tol_problem)
    max_iter: int = option("--max-iter", 1000, type=int, metavar="K", help="PCG iterations at most",
                           check=at_least(0))
    progress: bool = option(None, True)  # progress bars (the CLI's --no-progress)


def _solve_flags() -> dict[str, str]:
    """The parameters a solver's advice names (``Solution.in_words``), as ``kernelscale solve`` spells them."""
    flag = {name: meta.flag for name, meta in flags_of(SolveConfig)}
    return {
        "max_iter": flag["max_iter"], "tol": flag["tol"], "checkpoint": flag["checkpoint"], "resume": flag["resume"],
        "reg": flag["reg"], "reg_trace": f"1e-6 with {flag['reg_scale']} trace",
        "nystrom_1000": f"{flag['precond']} nystrom:1000", "cholesky": f"{flag['solver']} cholesky",
        "verify_store": "the Gram store (`kernelscale verify`)",
        "check_values": "check the Gram store with `kernelscale verify`",
    }


#: ``Solution.in_words(SOLVE_FLAG_NAMES)``: the solver's message as ``kernelscale solve`` and ``curve`` print it.
SOLVE_FLAG_NAMES: Mapping[str, str] = MappingProxyType(_solve_flags())
