"""Linear algebra over kernel matrices: operators, block PCG, preconditioners, Cholesky.

Knows nothing about neural networks or stores: it sees operators and right-hand sides. The store-backed
operators are in ``kernelscale.gram.operators``.
"""

from kernelscale.linalg.cg import (
    CGOptions,
    CGState,
    CheckpointWriteError,
    Solution,
    cg,
    cg_done,
    cg_finish,
    cg_init,
    cg_step,
)
from kernelscale.linalg.cholesky import cholesky_solve
from kernelscale.linalg.operators import DenseOperator, LinearOperator, PrincipalSubmatrix, ShiftedOperator
from kernelscale.linalg.preconditioners import (
    JacobiPreconditioner,
    NystromPreconditioner,
    Preconditioner,
    PreconditionerSpec,
    build_preconditioner,
    nystrom_uniform,
    rpcholesky,
)

__all__ = [
    "CGOptions", "CGState", "CheckpointWriteError", "Solution", "cg", "cg_init", "cg_step", "cg_done", "cg_finish",
    "cholesky_solve", "DenseOperator", "LinearOperator", "PrincipalSubmatrix",
    "ShiftedOperator", "JacobiPreconditioner", "NystromPreconditioner",
    "Preconditioner", "PreconditionerSpec", "build_preconditioner", "nystrom_uniform", "rpcholesky",
]
